"""Backward of MultiHeadAttention, single-head Attention and the position
encodings (sinusoidal, learned, rotary): input and parameter gradients against
torch.autograd with the same weights (tests/gradients.py's rule), and float64
central differences where PyTorch has no counterpart (grouped-query attention,
attnkit's dropout)."""
import numpy as np
import pytest

from attnkit import nn
from accuracy import torch_or_skip
from gradients import check_module
from threads import thread_count

DTYPES = [np.float32, np.float64]
E, H, N, L, S = 12, 3, 2, 5, 7


def randn(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------
# MultiHeadAttention against torch.nn.MultiheadAttention

class Case:
    """One way of calling MultiHeadAttention: constructor options and call options."""

    def __init__(self, name, layout="seq_first", self_attn=False, attn=None, kpm=None, causal=False,
                 need_weights=True, average=True, **options):
        self.name, self.layout, self.self_attn = name, layout, self_attn
        self.attn, self.kpm, self.causal = attn, kpm, causal
        self.need_weights, self.average, self.options = need_weights, average, options


CASES = [
    Case("cross"),
    Case("cross-batch-first", layout="batch_first"),
    Case("cross-unbatched", layout="unbatched"),
    Case("self", self_attn=True),
    Case("self-batch-first", layout="batch_first", self_attn=True),
    Case("self-unbatched", layout="unbatched", self_attn=True, kpm="bool"),
    Case("attn-bool", attn="bool2"),
    Case("attn-float", attn="float2", layout="batch_first"),
    Case("attn-bool-per-head", attn="bool3", self_attn=True),
    Case("attn-float-per-head", attn="float3"),
    Case("attn-per-head-unbatched", attn="float3", layout="unbatched"),
    Case("kpm-bool", kpm="bool"),
    Case("kpm-float", kpm="float", layout="batch_first"),
    Case("both-bool", attn="bool2", kpm="bool", self_attn=True),
    Case("both-float", attn="float3", kpm="float"),
    Case("causal", causal=True, self_attn=True, layout="batch_first"),
    Case("causal-cross-kpm", causal=True, kpm="bool"),
    Case("kdim-vdim", kdim=5, vdim=7, kpm="bool"),
    Case("kdim-vdim-batch-first-no-bias", layout="batch_first", kdim=5, vdim=7, bias=False),
    Case("bias-kv", add_bias_kv=True, kpm="bool"),
    Case("bias-kv-self", add_bias_kv=True, self_attn=True, attn="bool3"),
    Case("zero-attn", add_zero_attn=True, attn="float2", layout="batch_first"),
    Case("bias-kv-zero-attn-kdim", add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=7,
         kpm="float"),
    Case("bias-kv-zero-attn-unbatched", add_bias_kv=True, add_zero_attn=True, layout="unbatched",
         self_attn=True),
    Case("no-weights", need_weights=False, kpm="bool"),
    Case("per-head-weights", average=False, self_attn=True),
    Case("no-bias", bias=False, self_attn=True, attn="bool2"),
]


def visible_pattern(rng, shape):
    """Random visibility with key 0 always visible (PyTorch gives NaN for a
    query that sees nothing)."""
    visible = rng.random(shape) < 0.7
    visible[..., 0] = True
    return visible


def mha_setup(case, dtype, rng):
    """(ours, theirs, inputs, call, torch_call) for check_module."""
    torch = torch_or_skip()
    batch_first = case.layout == "batch_first"
    kdim, vdim = case.options.get("kdim", E), case.options.get("vdim", E)
    ours = nn.MultiHeadAttention(E, H, batch_first=batch_first, dtype=dtype, rng=rng, **case.options)
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, **case.options)
    for name, p in ours.named_parameters():     # non-zero biases, so that every term counts
        if "bias" in name:
            p[...] = randn(rng, p.shape, dtype) * 0.5
    length = L if case.self_attn else S
    unbatched = case.layout == "unbatched"

    def shape(T, features):
        return (T, features) if unbatched else (N, T, features) if batch_first else (T, N, features)

    q = randn(rng, shape(L, E), dtype)
    if case.self_attn:
        inputs = [q, q, q]
    else:
        inputs = [q, randn(rng, shape(length, kdim), dtype), randn(rng, shape(length, vdim), dtype)]
    n = 1 if unbatched else N
    kwargs = dict(need_weights=case.need_weights, average_attn_weights=case.average)
    torch_kwargs = dict(kwargs)
    attn_mask = None
    if case.attn:
        per_head = case.attn.endswith("3")
        visible = visible_pattern(rng, (n * H, L, length) if per_head else (L, length))
        if case.attn.startswith("bool"):
            attn_mask = ~visible
        else:
            attn_mask = np.where(visible, randn(rng, visible.shape, dtype), -np.inf).astype(dtype)
        kwargs["attn_mask"] = attn_mask
    if case.kpm:
        pad = np.zeros((n, length), bool)
        pad[-1, -2:] = True
        pad = pad[0] if unbatched else pad
        kpm = pad if case.kpm == "bool" else np.where(pad, -np.inf, randn(rng, pad.shape, dtype)).astype(dtype)
        kwargs["key_padding_mask"] = kpm
        torch_kwargs["key_padding_mask"] = torch.from_numpy(kpm)
    if case.causal:
        # attnkit needs no mask for causality; PyTorch takes is_causal as a hint about its mask
        kwargs["is_causal"] = True
        attn_mask = np.triu(np.ones((L, length), bool), 1)
        torch_kwargs["is_causal"] = True
    if attn_mask is not None:
        torch_kwargs["attn_mask"] = torch.from_numpy(attn_mask)

    def call(m, q, k, v):
        return m(q, q, q, **kwargs) if case.self_attn else m(q, k, v, **kwargs)

    def torch_call(m, q, k, v):
        return m(q, k, v, **torch_kwargs)

    return ours, theirs, inputs, call, torch_call


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_mha_matches_pytorch(case, dtype, rng):
    ours, theirs, inputs, call, torch_call = mha_setup(case, dtype, rng)
    check_module(ours, theirs, inputs, dtype, call=call, torch_call=torch_call, output_index=0)
    assert ours.out_proj._saved is not None            # the child ran, so its backward did


FROZEN = [("self", ("in_proj_weight", "out_proj.bias")),
          ("self", ("in_proj_weight", "in_proj_bias")),
          ("cross", ("in_proj_bias", "out_proj.weight")),
          ("kdim-vdim", ("k_proj_weight", "in_proj_bias")),
          ("bias-kv-self", ("bias_k", "in_proj_bias")),
          ("bias-kv-zero-attn-kdim", ("bias_v", "q_proj_weight", "out_proj"))]


@pytest.mark.parametrize("name, frozen", FROZEN, ids=[f"{n}-{'+'.join(f)}" for n, f in FROZEN])
def test_mha_frozen_parameters_get_no_gradient(name, frozen, rng):
    case = next(c for c in CASES if c.name == name)
    ours, theirs, inputs, call, torch_call = mha_setup(case, np.float64, rng)
    if "out_proj" in frozen:
        frozen = tuple(f for f in frozen if f != "out_proj") + ("out_proj.weight", "out_proj.bias")
    check_module(ours, theirs, inputs, np.float64, call=call, torch_call=torch_call, output_index=0,
                 frozen=frozen)
    assert not any(name in ours._grads for name in frozen if "." not in name)   # no work for them


# ---------------------------------------------------------------------------
# Central differences: grouped-query attention and dropout

def central_differences(module, arrays, loss, h=1e-5):
    """d loss / d array for each array (inputs and parameters, perturbed in place)."""
    grads = []
    for a in arrays:
        g = np.empty(a.shape)
        for index in np.ndindex(a.shape):
            old = a[index]
            a[index] = old + h
            up = loss()
            a[index] = old - h
            down = loss()
            a[index] = old
            g[index] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def assert_matches_differences(analytic, numeric, what, rtol=1e-7):
    scale = max(float(np.max(np.abs(numeric))), 1e-12)
    err = float(np.max(np.abs(np.asarray(analytic) - numeric)))
    assert err <= rtol * scale, f"{what}: error {err:.3g} against central differences, scale {scale:.3g}"


def check_mha_by_differences(m, inputs, kwargs, self_attn, dropout_rng_seed=None, rng=None):
    """m's input and parameter gradients against float64 central differences
    of sum(output * G). With dropout, the module's rng is reset before every
    forward so that each one drops the same weights."""
    def forward():
        if dropout_rng_seed is not None:
            m.rng = np.random.default_rng(dropout_rng_seed)
        q, k, v = inputs
        return (m(q, q, q, **kwargs) if self_attn else m(q, k, v, **kwargs))[0]

    m.train()
    m.zero_grad()
    out = forward()
    G = rng.standard_normal(out.shape)
    d_inputs = m.backward(G)
    grads = {k: v.copy() for k, v in m.grads().items()}
    params = [p for _, p in m.named_parameters()]
    arrays = ([inputs[0]] if self_attn else list(inputs)) + params
    numeric = central_differences(m, arrays, lambda: float(np.sum(forward() * G)))
    analytic = ([sum(d_inputs)] if self_attn else list(d_inputs)) + list(grads.values())
    names = (["input"] if self_attn else ["query", "key", "value"]) + list(grads)
    for a, n, name in zip(analytic, numeric, names):
        assert_matches_differences(a, n, name)
    return out


GQA_CASES = [
    dict(options=dict(num_kv_heads=2), call=dict(is_causal=True), layout="batch_first", self_attn=True),
    dict(options=dict(num_kv_heads=1, kdim=5, vdim=7, add_bias_kv=True, add_zero_attn=True),
         call=dict(key_padding_mask="bool"), layout="seq_first", self_attn=False),
    dict(options=dict(num_kv_heads=2, bias=False), call=dict(attn_mask="float3"),
         layout="unbatched", self_attn=False),
]


@pytest.mark.parametrize("case", GQA_CASES, ids=["self-causal", "kdim-bias-kv-zero-attn-kpm",
                                                  "unbatched-per-head-mask"])
def test_mha_grouped_query_attention_by_central_differences(case, rng):
    Hq = 4
    m = nn.MultiHeadAttention(E, Hq, batch_first=case["layout"] == "batch_first", dtype=np.float64,
                              rng=rng, **case["options"])
    for name, p in m.named_parameters():
        if "bias" in name:
            p[...] = rng.standard_normal(p.shape) * 0.5
    unbatched = case["layout"] == "unbatched"
    n = 1 if unbatched else N

    def shape(T, features):
        return (T, features) if unbatched else (N, T, features) if m.batch_first else (T, N, features)

    length = L if case["self_attn"] else S
    q = rng.standard_normal(shape(L, E))
    inputs = [q, rng.standard_normal(shape(length, m.kdim)), rng.standard_normal(shape(length, m.vdim))]
    kwargs = dict(case["call"])
    if kwargs.get("key_padding_mask") == "bool":
        pad = np.zeros((n, length), bool)
        pad[-1, -3:] = True
        kwargs["key_padding_mask"] = pad
    if kwargs.get("attn_mask") == "float3":
        visible = visible_pattern(rng, (n * Hq, L, length))
        kwargs["attn_mask"] = np.where(visible, rng.standard_normal(visible.shape), -np.inf)
    check_mha_by_differences(m, inputs, kwargs, case["self_attn"], rng=rng)


@pytest.mark.parametrize("self_attn, options", [(True, dict()),
                                                (False, dict(num_kv_heads=1, add_bias_kv=True))],
                         ids=["self", "cross-gqa-bias-kv"])
def test_mha_dropout_by_central_differences(self_attn, options, rng):
    m = nn.MultiHeadAttention(E, H if not options else 4, dropout=0.3, batch_first=True,
                              dtype=np.float64, rng=rng, **options)
    q = rng.standard_normal((N, L, E))
    length = L if self_attn else S
    inputs = [q, rng.standard_normal((N, length, E)), rng.standard_normal((N, length, E))]
    kwargs = dict(key_padding_mask=np.eye(N, length, dtype=bool))
    out = check_mha_by_differences(m, inputs, kwargs, self_attn, dropout_rng_seed=5, rng=rng)
    # dropout did drop something: without it the output differs
    m.dropout = 0.0
    q, k, v = inputs
    assert not np.allclose(out, (m(q, q, q, **kwargs) if self_attn else m(q, k, v, **kwargs))[0])


def test_mha_dropout_draws_as_before(rng):
    """A seeded module draws the dropout seed as the inference path always has
    (the first draw of its rng), so training outputs did not change."""
    from attnkit import functional as F
    m = nn.MultiHeadAttention(E, H, dropout=0.4, batch_first=True, dtype=np.float64,
                              rng=rng)
    x = rng.standard_normal((N, L, E))
    m.rng = np.random.default_rng(3)
    out, _ = m(x, x, x, need_weights=False)
    (Wq, Wk, Wv), (bq, bk, bv) = m._weights()
    heads = [(x @ W.T + b).reshape(N, L, H, E // H).transpose(0, 2, 1, 3)
             for W, b in ((Wq, bq), (Wk, bk), (Wv, bv))]
    o = F.scaled_dot_product_attention(*heads, dropout_p=0.4, rng=np.random.default_rng(3))
    expected = o.transpose(0, 2, 1, 3).reshape(N, L, E) @ m.out_proj.weight.T + m.out_proj.bias
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# Threads, eval mode, accumulation, errors

@pytest.mark.parametrize("options, self_attn", [(dict(dropout=0.1), True),
                                                (dict(num_kv_heads=2, kdim=48, add_bias_kv=True), False)],
                         ids=["self-dropout", "cross-gqa"])
def test_mha_gradients_bitwise_the_same_at_1_2_and_3_threads(options, self_attn):
    rng = np.random.default_rng(20)
    m = nn.MultiHeadAttention(64, 4, rng=rng, **options)
    q = randn(rng, (40, 3, 64), np.float32)
    k = q if self_attn else randn(rng, (33, 3, m.kdim), np.float32)
    v = q if self_attn else randn(rng, (33, 3, 64), np.float32)
    kpm = np.zeros((3, k.shape[0]), bool)
    kpm[1, -5:] = True
    g = randn(rng, (40, 3, 64), np.float32)
    results = []
    for threads in (1, 2, 3):
        with thread_count(threads):
            m.rng = np.random.default_rng(7)
            m.zero_grad()
            m(q, k, v, key_padding_mask=kpm, need_weights=False, is_causal=self_attn)
            d = m.backward(g)
            results.append((d, {n: a.copy() for n, a in m.grads().items()}))
    for other in results[1:]:
        for a, b in zip(results[0][0], other[0]):
            np.testing.assert_array_equal(a, b)
        for name in results[0][1]:
            np.testing.assert_array_equal(results[0][1][name], other[1][name])


@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "unbatched"])
@pytest.mark.parametrize("options", [dict(), dict(kdim=5, vdim=7, num_kv_heads=1),
                                     dict(add_bias_kv=True, add_zero_attn=True)],
                         ids=["plain", "kdim-gqa", "bias-kv-zero-attn"])
def test_mha_eval_matches_training_without_dropout(layout, options, rng):
    """Eval mode keeps the inference path (and nothing for backward); a
    training-mode forward without dropout gives the very same numbers."""
    m = nn.MultiHeadAttention(E, H if "num_kv_heads" not in options else 3, rng=rng,
                              batch_first=layout == "batch_first", **options)
    shape = ((lambda T, f: (T, f)) if layout == "unbatched" else
             (lambda T, f: (N, T, f)) if layout == "batch_first" else (lambda T, f: (T, N, f)))
    q = randn(rng, shape(L, E), np.float32)
    k, v = randn(rng, shape(S, m.kdim), np.float32), randn(rng, shape(S, m.vdim), np.float32)
    calls = [(q, k, v)] + ([(q, q, q)] if not options.get("kdim") else [])
    for args in calls:
        for need, average in [(True, True), (True, False), (False, True)]:
            kwargs = dict(need_weights=need, average_attn_weights=average, is_causal=True)
            m.train()
            out_t, w_t = m(*args, **kwargs)
            assert m._saved is not None and m.out_proj._saved is not None
            m.eval()
            out_e, w_e = m(*args, **kwargs)
            assert all(mod._saved is None for _, mod in m.named_modules())
            assert out_e.shape == out_t.shape and out_e.tobytes() == out_t.tobytes()
            assert (w_e is None) == (w_t is None)
            if need:
                assert w_e.shape == w_t.shape and w_e.tobytes() == w_t.tobytes()


def test_mha_gradients_accumulate(rng):
    m = nn.MultiHeadAttention(E, H, batch_first=True, dtype=np.float64, rng=rng)
    x = rng.standard_normal((N, L, E))
    g = rng.standard_normal((N, L, E))
    m(x, x, x)
    first = m.backward(g)
    once = {n: a.copy() for n, a in m.grads().items()}
    m(x, x, x)
    second = m.backward(g)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    for name, a in m.grads().items():
        # (the key bias's gradient is 0 up to rounding: softmax ignores a shift)
        np.testing.assert_allclose(a, 2 * once[name], rtol=1e-13, atol=1e-14 * np.abs(a).max())


@pytest.mark.parametrize("sizes", [(0, L, S), (N, 0, S), (N, L, 0)], ids=["N0", "L0", "S0"])
def test_mha_backward_of_empty_shapes(sizes, rng):
    n, l, s = sizes
    m = nn.MultiHeadAttention(E, H, batch_first=True, rng=rng, add_bias_kv=s == 0)
    q, k, v = (randn(rng, (n, t, E), np.float32) for t in (l, s, s))
    out, _ = m(q, k, v)
    dq, dk, dv = m.backward(np.ones(out.shape, np.float32))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert all(np.isfinite(a).all() for a in m.grads().values())


def test_mha_errors(rng):
    m = nn.MultiHeadAttention(E, H, batch_first=True, rng=rng)
    x = randn(rng, (N, L, E), np.float32)
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        m.backward(np.ones((N, L, E), np.float32))
    m(x, x, x)
    with pytest.raises(ValueError, match=r"grad_output has shape \(2, 5, 11\)"):
        m.backward(np.ones((N, L, 11), np.float32))
    with pytest.raises(ValueError, match="grad_output has shape"):
        m.backward(np.ones((L, N, E), np.float32))
    m.eval()
    m(x, x, x)
    with pytest.raises(RuntimeError, match="eval mode"):
        m.backward(np.ones((N, L, E), np.float32))
    m.train()
    m(x, x, x, kv_cache=nn.KVCache())                  # a training-mode forward may decode...
    with pytest.raises(RuntimeError, match="kv_cache"):  # ...but that has no backward
        m.backward(np.ones((N, L, E), np.float32))


# ---------------------------------------------------------------------------
# Single-head Attention against a PyTorch composition of the same formula

def torch_attention(torch, ours):
    """A torch module with ours's parameter names computing ours's formula."""

    class TorchAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, p in ours.named_parameters():
                self.register_parameter(name, torch.nn.Parameter(torch.zeros(p.shape)))

        def forward(self, q, k, v, mask=None):
            if ours.score in ("scaled_dot", "dot"):
                s = q @ k.transpose(-1, -2)
                if ours.score == "scaled_dot":
                    s = s / q.shape[-1] ** 0.5
            elif ours.score == "general":
                s = (q @ self.weight) @ k.transpose(-1, -2)
            else:
                hq, hk = q @ self.w_query.T, k @ self.w_key.T
                s = torch.tanh(hq[..., :, None, :] + hk[..., None, :, :]) @ self.v
            if ours.normalizer == "softmax":
                w = (s if mask is None else s.masked_fill(~mask, -torch.inf)).softmax(-1)
            else:
                w = torch.sigmoid(s) if ours.normalizer == "sigmoid" else torch.relu(s)
                if mask is not None:
                    w = torch.where(mask, w, torch.zeros_like(w))
            return w @ v, w

    return TorchAttention()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid", "relu"])
@pytest.mark.parametrize("score", ["scaled_dot", "dot", "general", "additive"])
def test_attention_matches_pytorch(score, normalizer, masked, dtype, rng):
    torch = torch_or_skip()
    dq, dk = (6, 6) if score in ("scaled_dot", "dot") else (6, 4)
    ours = nn.Attention(dq, dk, score=score, normalizer=normalizer, hidden_dim=5, dtype=dtype, rng=rng)
    theirs = torch_attention(torch, ours)
    inputs = [randn(rng, (N, L, dq), dtype), randn(rng, (N, S, dk), dtype), randn(rng, (N, S, 3), dtype)]
    if masked:
        inputs.append(visible_pattern(rng, (N, L, S)))
    check_module(ours, theirs, inputs, dtype, output_index=0)


@pytest.mark.parametrize("score", ["scaled_dot", "general", "additive"])
def test_attention_with_broadcast_keys(score, rng):
    """Keys and values shared by every batch entry, a mask shared too: their
    gradients sum over the batch."""
    torch = torch_or_skip()
    ours = nn.Attention(6, 6, score=score, hidden_dim=5, dtype=np.float64, rng=rng)
    theirs = torch_attention(torch, ours)
    inputs = [randn(rng, (N, L, 6), np.float64), randn(rng, (S, 6), np.float64),
              randn(rng, (S, 3), np.float64), visible_pattern(rng, (L, S))]
    check_module(ours, theirs, inputs, np.float64, output_index=0)


def test_attention_frozen_and_errors(rng):
    torch = torch_or_skip()
    ours = nn.Attention(6, 4, score="additive", hidden_dim=5, dtype=np.float64, rng=rng)
    inputs = [randn(rng, (N, L, 6), np.float64), randn(rng, (N, S, 4), np.float64),
              randn(rng, (N, S, 3), np.float64)]
    check_module(ours, torch_attention(torch, ours), inputs, np.float64, output_index=0,
                 frozen=("w_key", "v"))
    fresh = nn.Attention(6, score="general", rng=rng)
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        fresh.backward(np.ones((L, 3), np.float32))
    fresh(randn(rng, (L, 6), np.float32), randn(rng, (S, 6), np.float32), randn(rng, (S, 3), np.float32))
    with pytest.raises(ValueError, match="grad_output has shape"):
        fresh.backward(np.ones((L, 4), np.float32))
    fresh.eval()
    assert fresh._saved is None
    with pytest.raises(RuntimeError, match="eval mode"):
        fresh.backward(np.ones((L, 3), np.float32))


# ---------------------------------------------------------------------------
# Position encodings

def test_sinusoidal_passes_the_gradient_through(rng):
    enc = nn.SinusoidalPositionalEncoding(8, max_length=6, dtype=np.float64)
    for dtype in DTYPES:
        for offset in (0, 4):                          # 4 + 5 > 6: computed past the table
            x = randn(rng, (N, 5, 8), dtype)
            y = enc(x, offset=offset)
            g = randn(rng, y.shape, dtype)
            dx = enc.backward(g)
            assert dx.dtype == dtype
            np.testing.assert_array_equal(dx, g)
    assert enc.grads() == {}
    with pytest.raises(ValueError, match="grad_output has shape"):
        enc.backward(np.ones((N, 4, 8)))
    enc.eval()
    enc(x)
    assert enc._saved is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, offset", [((N, L, 6), 0), ((N, 3, L, 6), 4), ((L, 6), 7)])
def test_learned_positional_embedding_matches_pytorch(shape, offset, dtype, rng):
    torch = torch_or_skip()

    class Learned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(12, 6))

        def forward(self, x):
            return x + self.weight[offset:offset + x.shape[-2]]

    ours = nn.LearnedPositionalEmbedding(12, 6, dtype=dtype, rng=rng)
    check_module(ours, Learned(), [randn(rng, shape, dtype)], dtype,
                 call=lambda m, x: m(x, offset=offset) if isinstance(m, nn.Module) else m(x))


def test_learned_positional_embedding_frozen(rng):
    ours = nn.LearnedPositionalEmbedding(12, 6, dtype=np.float64, rng=rng).freeze()
    x = rng.standard_normal((N, L, 6))
    ours(x, offset=2)
    g = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(ours.backward(g), g)
    assert not ours.grads()["weight"].any() and not ours._grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("where", [dict(), dict(offset=9), dict(positions=[0.5, 2, 3, 7.25, 40])],
                         ids=["offset0", "offset9", "positions"])
def test_rotary_matches_pytorch(where, interleaved, dtype, rng):
    torch = torch_or_skip()
    ours = nn.RotaryEmbedding(8, base=500.0, interleaved=interleaved)
    positions = np.asarray(where.get("positions", np.arange(where.get("offset", 0),
                                                            where.get("offset", 0) + L)))
    angle = ours.angles(positions)
    cos = torch.from_numpy(np.cos(angle).astype(dtype))
    sin = torch.from_numpy(np.sin(angle).astype(dtype))

    class Rotary(torch.nn.Module):
        def forward(self, x):
            if interleaved:
                a, b = x[..., 0::2], x[..., 1::2]
                return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
            a, b = x[..., :4], x[..., 4:]
            return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    check_module(ours, Rotary(), [randn(rng, (N, H, L, 8), dtype)], dtype,
                 call=lambda m, x: m(x, **where) if isinstance(m, nn.Module) else m(x))


def test_rotary_backward_is_the_inverse_rotation(rng):
    """A rotation is orthogonal: backward of the forward's output gives back
    the input, and gradient norms are kept."""
    rope = nn.RotaryEmbedding(6, interleaved=True)
    x = rng.standard_normal((3, L, 6))
    y = rope(x, offset=3)
    np.testing.assert_allclose(rope.backward(y), x, rtol=0, atol=1e-14)
    g = rng.standard_normal(y.shape)
    np.testing.assert_allclose(np.linalg.norm(rope.backward(g)), np.linalg.norm(g), rtol=1e-14)
    with pytest.raises(ValueError, match="grad_output has shape"):
        rope.backward(np.ones((3, L, 4)))
