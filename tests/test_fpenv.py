"""The floating-point environment is the caller's.

No call changes the calling thread's floating-point controls (x87 control
word, MXCSR rounding, flush-to-zero, denormals-are-zero, exception masks).
(The sticky exception flags are not the caller's to keep in any NumPy
program: every NumPy ufunc clears them as it checks for errors.) And the controls the caller
set hold on every thread a kernel runs on: OpenMP's threads keep the MXCSR
they were made with, so without care a caller who turned on flush-to-zero or
another rounding mode after the first parallel call got results that depended
on the thread count.

The environment is read and written through C's fenv (glibc's x86-64 fenv_t:
the x87 environment, then MXCSR), so these tests run on x86-64 Linux.
"""
import ctypes
import ctypes.util
import platform
import sys

import numpy as np
import pytest

from attnkit import functional as F
from attnkit import nn, optim

from threads import thread_count

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")),
    reason="reads MXCSR through glibc's x86-64 fenv_t")

ROUND_TOWARD_ZERO = 0x6000
FLUSH_TO_ZERO, DENORMALS_ARE_ZERO = 0x8000, 0x0040
MXCSR_CONTROLS = 0xffc0             # the low six bits are the sticky flags


class _FloatEnv(ctypes.Structure):
    _fields_ = [("x87_control", ctypes.c_uint16), ("x87_rest", ctypes.c_ubyte * 26),
                ("mxcsr", ctypes.c_uint32)]


_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6") if sys.platform.startswith("linux") else None


def _get_env():
    env = _FloatEnv()
    assert _libm.fegetenv(ctypes.byref(env)) == 0
    return env


def _set_env(env):
    assert _libm.fesetenv(ctypes.byref(env)) == 0


@pytest.fixture
def user_env():
    """A caller's unusual environment: round toward zero, flush-to-zero and
    denormals-are-zero on. The test's own environment is put back afterwards."""
    before = _get_env()
    env = _get_env()
    env.mxcsr = (env.mxcsr & ~MXCSR_CONTROLS) | 0x1f80 | ROUND_TOWARD_ZERO | FLUSH_TO_ZERO | DENORMALS_ARE_ZERO
    _set_env(env)
    try:
        yield _get_env()
    finally:
        _set_env(before)


def _inputs(rng, dtype):
    x = rng.standard_normal((64, 1024)).astype(dtype)
    x[:, :8] *= np.finfo(dtype).tiny                                  # subnormal inputs too
    q = rng.standard_normal((2, 4, 96, 32)).astype(dtype)
    w = rng.standard_normal((256, 1024)).astype(dtype) * 0.03
    return x, q, w


def _calls(rng, dtype):
    """One call into every C kernel, forward and backward, plus a module's
    training step and an optimiser's step, each large enough to use a team."""
    x, q, w = _inputs(rng, dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    y = F.softmax(x, -1)
    ln, mean, rstd = F.layer_norm(x, (1024,), return_stats=True)
    rms, rms_rstd = F.rms_norm(x, (1024,), return_stats=True)
    attn, lse = F.scaled_dot_product_attention(q, q, q, is_causal=True, return_lse=True)
    h = F.linear(x, w)

    def module_step():
        mha = nn.MultiHeadAttention(64, 4, dropout=0.1, batch_first=True, dtype=dtype,
                                    rng=np.random.default_rng(0)).train()
        t = q.reshape(4, 96, 64)
        out, _ = mha(t, t, t, need_weights=False)
        mha.backward(np.ones_like(out))
        adam = optim.AdamW(mha, lr=1e-3)
        adam.step()
        return mha.out_proj.weight.copy()

    return {
        "softmax": lambda: F.softmax(x, -1),
        "log_softmax": lambda: F.log_softmax(x, -1),
        "softmax_backward": lambda: F.softmax_backward(dy, y, -1),
        "layer_norm": lambda: F.layer_norm(x, (1024,)),
        "layer_norm_backward": lambda: F.layer_norm_backward(dy, x, mean, rstd, (1024,))[0],
        "rms_norm": lambda: F.rms_norm(x, (1024,)),
        "rms_norm_backward": lambda: F.rms_norm_backward(dy, x, rms_rstd, (1024,))[0],
        "batch_norm": lambda: F.batch_norm(x, None, None, training=True),
        "attention": lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True, dropout_p=0.2,
                                                            dropout_seed=7),
        "attention_backward": lambda: F.scaled_dot_product_attention_backward(q, q, q, q, attn, lse,
                                                                              is_causal=True)[0],
        "linear": lambda: F.linear(x, w, activation="gelu"),
        "linear_backward": lambda: F.linear_backward(h, x, w)[1],
        "gelu": lambda: F.gelu(x),
        "gelu_backward": lambda: F.gelu_backward(dy, x),
        "dropout": lambda: F.dropout(x, 0.3, seed=11),
        "module_and_adam_step": module_step,
    }


CALLS = list(_calls(np.random.default_rng(0), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", CALLS)
def test_no_call_changes_the_callers_environment(name, dtype, user_env, simd):
    call = _calls(np.random.default_rng(0), dtype)[name]
    with thread_count(2):
        result = call()
    after = _get_env()
    assert after.x87_control == user_env.x87_control
    assert hex(after.mxcsr & MXCSR_CONTROLS) == hex(user_env.mxcsr & MXCSR_CONTROLS)
    assert np.all(np.isfinite(np.asarray(result[0] if isinstance(result, tuple) else result)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", CALLS)
def test_every_thread_computes_under_the_callers_controls(name, dtype, user_env, simd):
    """Round-toward-zero and flush-to-zero, set after the thread pool was made
    (the earlier tests made it), give the same bits on 1, 2 and 3 threads."""
    call = _calls(np.random.default_rng(0), dtype)[name]
    results = []
    for threads in (1, 2, 3):
        with thread_count(threads):
            results.append(call())
    first = [np.asarray(r) for r in (results[0] if isinstance(results[0], tuple) else (results[0],))]
    for other in results[1:]:
        other = [np.asarray(r) for r in (other if isinstance(other, tuple) else (other,))]
        for a, b in zip(first, other):
            assert a.tobytes() == b.tobytes()


def test_the_controls_take_effect(user_env):
    """The environment the tests above set is one the kernels obey: a
    subnormal input is flushed, on the calling thread and in a team."""
    tiny = np.full((64, 1024), np.finfo(np.float32).smallest_subnormal * 4, np.float32)
    for threads in (1, 2):
        with thread_count(threads):
            assert not F.layer_norm(tiny, (1024,)).any()          # x - mean of zeros
