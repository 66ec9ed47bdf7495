"""Position information (sinusoidal, learned, rotary, ALiBi) and single-head
attention with the classic score functions and normalisers, each against a
direct formula written out in the test."""
import math

import numpy as np
import pytest

import attnkit
from attnkit import nn, reference
from accuracy import assert_accurate

DTYPES = [np.float32, np.float64]


# ---------------------------------------------------------------------------
# Sinusoidal

def sinusoid_formula(length, dim, base=10000.0, offset=0):
    """PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)), element by element."""
    pe = np.empty((length, dim))
    for row in range(length):
        p = offset + row
        for c in range(dim):
            i = c // 2
            angle = p / base ** (2 * i / dim)
            pe[row, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("dim", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("offset", [0, 5, 1000])
def test_sinusoidal_encoding_matches_the_formula(dim, offset):
    pe = nn.sinusoidal_positional_encoding(20, dim, offset=offset, dtype=np.float64)
    assert pe.shape == (20, dim) and pe.dtype == np.float64
    np.testing.assert_allclose(pe, sinusoid_formula(20, dim, offset=offset), rtol=0, atol=1e-12)


def test_sinusoidal_encoding_base_and_rounding():
    pe = nn.sinusoidal_positional_encoding(12, 6, base=100.0, dtype=np.float64)
    np.testing.assert_allclose(pe, sinusoid_formula(12, 6, base=100.0), rtol=0, atol=1e-13)
    # float32 is the float64 table rounded once
    pe32 = nn.sinusoidal_positional_encoding(50, 16)
    assert pe32.dtype == np.float32
    np.testing.assert_array_equal(pe32, nn.sinusoidal_positional_encoding(50, 16, dtype=np.float64)
                                  .astype(np.float32))
    # position 0: sin 0 = 0 in even columns, cos 0 = 1 in odd ones
    np.testing.assert_array_equal(pe32[0], np.tile([0.0, 1.0], 8))
    with pytest.raises(ValueError, match="dim"):
        nn.sinusoidal_positional_encoding(4, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinusoidal_module_adds_the_encoding(dtype, rng):
    enc = nn.SinusoidalPositionalEncoding(10, max_length=16, dtype=dtype)
    assert enc.num_parameters() == 0 and list(enc.state_dict()) == []
    x = rng.standard_normal((3, 6, 10)).astype(dtype)
    table = nn.sinusoidal_positional_encoding(40, 10, dtype=dtype)
    y = enc(x)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x + table[:6])
    np.testing.assert_array_equal(enc(x, offset=7), x + table[7:13])
    # beyond max_length: computed for those positions, not refused or wrapped
    beyond = enc(x, offset=14)
    np.testing.assert_array_equal(beyond, x + table[14:20])
    np.testing.assert_allclose(enc(x[0], offset=30), x[0] + sinusoid_formula(6, 10, offset=30),
                               rtol=0, atol=1e-12 if dtype == np.float64 else 1e-6)
    with pytest.raises(ValueError, match=r"\(\.\.\., length, 10\)"):
        enc(rng.standard_normal((6, 9)).astype(dtype))


# ---------------------------------------------------------------------------
# Learned

def test_learned_positional_embedding(rng):
    emb = nn.LearnedPositionalEmbedding(12, 5, rng=rng)
    assert list(emb.state_dict()) == ["weight"] and emb.weight.shape == (12, 5)
    assert emb.weight.dtype == np.float32
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(emb(x), x + emb.weight[:4])
    np.testing.assert_array_equal(emb(x, offset=8), x + emb.weight[8:12])
    np.testing.assert_array_equal(emb(x[0], offset=3), x[0] + emb.weight[3:7])
    emb.weight[...] = 0
    np.testing.assert_array_equal(emb(x), x)   # the table is the module's own array
    with pytest.raises(ValueError, match="beyond the 12"):
        emb(x, offset=9)
    with pytest.raises(ValueError, match="beyond the 12"):
        emb(rng.standard_normal((13, 5)).astype(np.float32))
    with pytest.raises(ValueError, match="offset must be >= 0, got offset -1 for a sequence of length 4"):
        emb(x, offset=-1)
    with pytest.raises(ValueError, match=r"length, 5"):
        emb(rng.standard_normal((4, 6)).astype(np.float32))


def test_learned_positional_embedding_init_is_seeded_standard_normal():
    a = nn.LearnedPositionalEmbedding(500, 64, rng=np.random.default_rng(0)).weight
    b = nn.LearnedPositionalEmbedding(500, 64, rng=np.random.default_rng(0)).weight
    np.testing.assert_array_equal(a, b)
    assert abs(a.mean()) < 0.02 and abs(a.std() - 1) < 0.02


# ---------------------------------------------------------------------------
# Rotary

def rotate_pairs(x, positions, base=10000.0, interleaved=False):
    """The rotation written out: pair j ((j, j + d/2), or (2j, 2j + 1) when
    interleaved) at position m turned by m * base^(-2j/d)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    out = np.empty_like(x)
    for row, m in enumerate(positions):
        for j in range(d // 2):
            theta = m * base ** (-2 * j / d)
            c, s = math.cos(theta), math.sin(theta)
            i1, i2 = (2 * j, 2 * j + 1) if interleaved else (j, j + d // 2)
            a, b = x[..., row, i1], x[..., row, i2]
            out[..., row, i1] = a * c - b * s
            out[..., row, i2] = a * s + b * c
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim", [2, 8, 14])
def test_rotary_matches_pairwise_rotation(interleaved, head_dim, rng):
    rope = nn.RotaryEmbedding(head_dim, interleaved=interleaved)
    assert rope.num_parameters() == 0
    x = rng.standard_normal((2, 3, 9, head_dim))                       # (N, H, L, d)
    np.testing.assert_allclose(rope(x), rotate_pairs(x, range(9), interleaved=interleaved),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(rope(x, offset=40), rotate_pairs(x, range(40, 49), interleaved=interleaved),
                               rtol=0, atol=1e-11)
    positions = [5, 0, 17, 3, 3, 100, 2, 1, 9]
    np.testing.assert_allclose(rope(x, positions=positions),
                               rotate_pairs(x, positions, interleaved=interleaved), rtol=0, atol=1e-11)


def test_rotary_layouts_differ_and_base_matters(rng):
    x = rng.standard_normal((5, 8))
    a = nn.RotaryEmbedding(8)(x)
    b = nn.RotaryEmbedding(8, interleaved=True)(x)
    assert not np.allclose(a, b)
    c = nn.RotaryEmbedding(8, base=100.0)(x)
    np.testing.assert_allclose(c, rotate_pairs(x, range(5), base=100.0), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(a[0], x[0])   # position 0 is not rotated


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_scores_depend_on_relative_position_only(interleaved, rng):
    d = 16
    rope = nn.RotaryEmbedding(d, interleaved=interleaved)
    q, k = rng.standard_normal(d), rng.standard_normal(d)

    def score(m, n):
        return float(rope(q[None], positions=[m])[0] @ rope(k[None], positions=[n])[0])

    for delta in (0, 1, 3, -2, 7):
        scores = [score(m, m - delta) for m in (max(delta, 0), 10, 37, 250)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-10, atol=1e-10)
    assert score(0, 0) == pytest.approx(float(q @ k), rel=1e-12)
    assert abs(score(5, 4) - score(5, 1)) > 1e-3      # different distances, different scores


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_preserves_norms_and_dtype(dtype, interleaved, rng):
    x = rng.standard_normal((4, 30, 12)).astype(dtype)
    y = nn.RotaryEmbedding(12, interleaved=interleaved)(x, offset=3)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(np.linalg.norm(y.astype(np.float64), axis=-1),
                               np.linalg.norm(x.astype(np.float64), axis=-1), rtol=tol)
    # every pair keeps its own length too
    half = 6
    pairs = ((x[..., 0::2], x[..., 1::2]), (y[..., 0::2], y[..., 1::2])) if interleaved else \
        ((x[..., :half], x[..., half:]), (y[..., :half], y[..., half:]))
    (xa, xb), (ya, yb) = pairs
    np.testing.assert_allclose(np.hypot(ya, yb).astype(np.float64), np.hypot(xa, xb), rtol=tol * 10)


def test_positional_modules_take_an_empty_batch_or_sequence(rng):
    for x in (np.zeros((0, 5, 8), np.float32), np.zeros((2, 0, 8), np.float32),
              np.zeros((0, 2, 0, 8), np.float32)):
        for module in (nn.SinusoidalPositionalEncoding(8, max_length=4),
                       nn.LearnedPositionalEmbedding(5, 8, rng=rng), nn.RotaryEmbedding(8)):
            y = module(x, offset=0)
            assert y.shape == x.shape and y.dtype == x.dtype


def test_rotary_errors(rng):
    with pytest.raises(ValueError, match="even"):
        nn.RotaryEmbedding(7)
    rope = nn.RotaryEmbedding(8)
    with pytest.raises(ValueError, match=r"positions must be \(3,\)"):
        rope(rng.standard_normal((3, 8)), positions=[0, 1])
    with pytest.raises(ValueError, match=r"length, 8"):
        rope(rng.standard_normal((3, 6)))


# ---------------------------------------------------------------------------
# Offsets: one rule in every encoding

def _sinusoidal_function(x, offset=0):
    return x + nn.sinusoidal_positional_encoding(x.shape[-2], 8, offset=offset, dtype=x.dtype)


OFFSET_TAKERS = {
    "sinusoidal_positional_encoding": _sinusoidal_function,
    "SinusoidalPositionalEncoding": nn.SinusoidalPositionalEncoding(8, max_length=100),
    "LearnedPositionalEmbedding": nn.LearnedPositionalEmbedding(100, 8, rng=np.random.default_rng(0)),
    "RotaryEmbedding": nn.RotaryEmbedding(8),
}


@pytest.mark.parametrize("owner", OFFSET_TAKERS)
@pytest.mark.parametrize("offset", [-1, -2, -5, -100, np.int64(-3)])
def test_negative_offset_is_refused_not_wrapped(owner, offset, rng):
    # The table slice [offset:offset + L] would wrap a negative offset to the
    # end of the table (offset -5 of 100 added positions 95-97), or fail to
    # broadcast (offset -2 gives a slice of 2 rows for 3).
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=rf"^{owner}: offset must be >= 0, got offset {int(offset)} "
                                         rf"for a sequence of length 3$"):
        OFFSET_TAKERS[owner](x, offset=offset)


@pytest.mark.parametrize("owner", OFFSET_TAKERS)
@pytest.mark.parametrize("offset", [2.0, 1.5, np.float32(3), True, False, np.bool_(True), "1", None,
                                    np.array([1, 2])])
def test_offset_that_is_not_an_int_is_a_type_error(owner, offset, rng):
    x = rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.raises(TypeError, match=rf"^{owner}: offset must be an int, got "):
        OFFSET_TAKERS[owner](x, offset=offset)


@pytest.mark.parametrize("owner", OFFSET_TAKERS)
def test_numpy_integer_offsets_are_ints(owner, rng):
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    take = OFFSET_TAKERS[owner]
    expected = take(x, offset=7)
    for offset in (np.int64(7), np.int32(7), np.uint8(7), np.array(7)):
        np.testing.assert_array_equal(take(x, offset=offset), expected)
    np.testing.assert_array_equal(take(x, offset=0), take(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_offsets_at_the_end_of_max_length(dtype, rng):
    L, max_length = 4, 10
    x = rng.standard_normal((2, L, 8)).astype(dtype)
    sinusoidal = nn.SinusoidalPositionalEncoding(8, max_length=max_length)
    learned = nn.LearnedPositionalEmbedding(max_length, 8, dtype=dtype, rng=rng)
    table = nn.sinusoidal_positional_encoding(max_length + 1, 8, dtype=dtype)
    last = max_length - L                          # offset + L == max_length: the table's last rows
    np.testing.assert_array_equal(sinusoidal(x, offset=last), x + table[last:max_length])
    np.testing.assert_array_equal(learned(x, offset=last), x + learned.weight[last:])
    # one past: the sinusoidal encoding computes position max_length, the same
    # numbers the table would have held; the learned one has no row for it
    np.testing.assert_array_equal(sinusoidal(x, offset=last + 1), x + table[last + 1:])
    with pytest.raises(ValueError, match=r"positions 7\.\.10 \(offset 7, length 4\) are beyond the 10"):
        learned(x, offset=last + 1)
    with pytest.raises(ValueError, match="beyond the 10"):
        learned(rng.standard_normal((max_length + 1, 8)).astype(dtype))
    np.testing.assert_array_equal(learned(x[:, :0], offset=max_length), x[:, :0])    # nothing to add
    # the rotary embedding has no table: any offset >= 0 is a position
    rope = nn.RotaryEmbedding(8)
    np.testing.assert_allclose(rope(x, offset=10**6), rotate_pairs(x, range(10**6, 10**6 + L)),
                               rtol=0, atol=1e-9 if dtype == np.float64 else 1e-5)


def test_the_audit_example():
    enc = nn.SinusoidalPositionalEncoding(8, max_length=100)
    x = np.zeros((3, 8), np.float32)
    for offset in (-5, -2):
        with pytest.raises(ValueError, match=f"got offset {offset} for a sequence of length 3"):
            enc(x, offset=offset)


def test_sinusoidal_function_checks_its_length():
    assert nn.sinusoidal_positional_encoding(0, 8).shape == (0, 8)
    assert nn.sinusoidal_positional_encoding(np.int64(3), 8, offset=np.int64(2)).shape == (3, 8)
    with pytest.raises(TypeError, match="length must be an int, got float 3.0"):
        nn.sinusoidal_positional_encoding(3.0, 8)
    with pytest.raises(ValueError, match="length must be >= 0, got -1"):
        nn.sinusoidal_positional_encoding(-1, 8)
    with pytest.raises(TypeError, match="max_length must be an int"):
        nn.SinusoidalPositionalEncoding(8, max_length=10.5)


def test_rotary_positions_are_ints_or_floats_at_least_zero(rng):
    rope = nn.RotaryEmbedding(8)
    x = rng.standard_normal((2, 4, 8))
    # fractional positions (position interpolation) are rotations too
    fractional = [0.0, 0.5, 2.25, 1000.75]
    np.testing.assert_allclose(rope(x, positions=fractional), rotate_pairs(x, fractional),
                               rtol=0, atol=1e-11)
    np.testing.assert_array_equal(rope(x, positions=np.arange(4, dtype=np.float32)), rope(x))
    np.testing.assert_array_equal(rope(x, positions=np.arange(3, 7, dtype=np.uint16)), rope(x, offset=3))
    np.testing.assert_array_equal(rope(x, positions=[2, 3, 4, 5], offset=0), rope(x, offset=2))
    for bad in ([0, 1, -1, 2], [0.0, -0.5, 1.0, 2.0], [0, np.nan, 1, 2], [0, 1, np.inf, 2]):
        with pytest.raises(ValueError, match=r"positions must be finite and >= 0, got \[-?(1|0\.5|nan|inf)"):
            rope(x, positions=bad)
    with pytest.raises(TypeError, match="positions must be ints or floats, got dtype bool"):
        rope(x, positions=[True, False, True, True])
    with pytest.raises(TypeError, match="positions must be ints or floats, got dtype complex"):
        rope(x, positions=np.zeros(4, complex))
    with pytest.raises(ValueError, match=r"give offset \(3\) or positions, not both"):
        rope(x, offset=3, positions=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="positions must be finite and >= 0"):
        rope.angles([-1])
    np.testing.assert_array_equal(rope.angles([0.5]), 0.5 * rope.angles([1]))


# ---------------------------------------------------------------------------
# ALiBi

def paper_slopes(n):
    """The recipe of Press et al.'s code: a geometric sequence starting (and
    with ratio) 2^(-8/n) for a power of two; otherwise the closest power of two
    below, then every other slope of twice that."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + paper_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20, 24, 32])
def test_alibi_slopes_follow_the_paper(heads):
    slopes = nn.alibi_slopes(heads)
    assert slopes.shape == (heads,)
    np.testing.assert_allclose(slopes, paper_slopes(heads), rtol=1e-14)


def test_alibi_slopes_known_values():
    np.testing.assert_array_equal(nn.alibi_slopes(8), [2.0**-k for k in range(1, 9)])
    np.testing.assert_allclose(nn.alibi_slopes(16), [2.0**(-k / 2) for k in range(1, 17)], rtol=1e-14)
    # 6 heads: the 4-head slopes 1/4 .. 1/256, then 1/2 and 1/8 from the 8-head ones
    np.testing.assert_array_equal(nn.alibi_slopes(6), [1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8])
    with pytest.raises(ValueError, match="num_heads"):
        nn.alibi_slopes(0)


@pytest.mark.parametrize("L, S", [(5, 5), (1, 9), (3, 8)])
def test_alibi_bias_values(L, S):
    H = 6
    bias = nn.alibi_bias(H, L, S, dtype=np.float64)
    assert bias.shape == (H, L, S)
    slopes = paper_slopes(H)
    for h in range(H):
        for i in range(L):
            for j in range(S):
                assert bias[h, i, j] == -slopes[h] * abs((S - L + i) - j)
    assert nn.alibi_bias(H, L, S).dtype == np.float32
    # the diagonal where query and key positions meet is 0
    assert np.all(bias[:, np.arange(L), S - L + np.arange(L)] == 0)


def test_alibi_bias_lengths():
    # The queries are the last L of S positions: with L > S the first would
    # sit at a negative position, which is refused as a negative offset is.
    assert nn.alibi_bias(4, 7, 7).shape == (4, 7, 7)
    assert nn.alibi_bias(4, 0, 5).shape == (4, 0, 5)
    assert nn.alibi_bias(4, 0, 0).shape == (4, 0, 0)
    with pytest.raises(ValueError, match=r"query_length \(6\) must not exceed key_length \(4\).*"
                                         r"position -2"):
        nn.alibi_bias(4, 6, 4)
    with pytest.raises(ValueError, match="must not exceed"):
        nn.alibi_bias(4, 1, 0)
    with pytest.raises(ValueError, match="key_length must be >= 0, got -3"):
        nn.alibi_bias(4, 2, -3)
    with pytest.raises(TypeError, match="query_length must be an int, got float 2.0"):
        nn.alibi_bias(4, 2.0, 3)
    with pytest.raises(TypeError, match="key_length must be an int, got a bool"):
        nn.alibi_bias(4, 1, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L, S", [(6, 6), (3, 10)])
def test_alibi_as_an_attention_mask(simd, dtype, causal, L, S, rng):
    H, E = 4, 16
    q = rng.standard_normal((2, H, L, E)).astype(dtype)
    k = rng.standard_normal((2, H, S, E)).astype(dtype)
    v = rng.standard_normal((2, H, S, E)).astype(dtype)
    bias = nn.alibi_bias(H, L, S, dtype=dtype)
    kwargs = dict(attn_mask=bias, is_causal=causal, causal_alignment="bottom_right")
    out = attnkit.scaled_dot_product_attention(q, k, v, **kwargs)
    assert_accurate(out, lambda dt: reference.scaled_dot_product_attention(q, k, v, dtype=dt, **kwargs)[0],
                    dtype)


def test_alibi_weights_decay_with_distance():
    """With equal scores, ALiBi alone sets the weights: adjacent keys differ by
    a factor exp(slope)."""
    H, L, S = 4, 1, 6
    q = np.zeros((H, L, 8))
    k = np.ones((H, S, 8))
    v = np.ones((H, S, 8))
    _, w = attnkit.scaled_dot_product_attention(q, k, v, attn_mask=nn.alibi_bias(H, L, S, dtype=np.float64),
                                                return_weights=True)
    w = w[:, 0]                                                          # (H, S)
    slopes = nn.alibi_slopes(H)
    np.testing.assert_allclose(w[:, 1:] / w[:, :-1], np.exp(slopes)[:, None] * np.ones((1, S - 1)),
                               rtol=1e-12)
    assert np.all(np.argmax(w, axis=-1) == S - 1)                        # the nearest key


# ---------------------------------------------------------------------------
# Single-head attention with the classic scores and normalisers

def scores_formula(q, k, score, p):
    """Score of every query against every key, sums written out."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    *lead, L, dq = q.shape
    S, dk = k.shape[-2:]
    out = np.empty((*lead, L, S))
    for idx in np.ndindex(*lead):
        for i in range(L):
            for j in range(S):
                a, b = q[idx + (i,)], k[idx + (j,)]
                if score == "dot":
                    s = sum(a[e] * b[e] for e in range(dq))
                elif score == "scaled_dot":
                    s = sum(a[e] * b[e] for e in range(dq)) / math.sqrt(dq)
                elif score == "general":
                    W = p["weight"]
                    s = sum(a[x] * W[x, y] * b[y] for x in range(dq) for y in range(dk))
                else:   # additive
                    Wq, Wk, v = p["w_query"], p["w_key"], p["v"]
                    s = sum(v[h] * math.tanh(sum(Wq[h, x] * a[x] for x in range(dq))
                                             + sum(Wk[h, y] * b[y] for y in range(dk)))
                            for h in range(len(v)))
                out[idx + (i, j)] = s
    return out


def normalise_formula(s, normalizer, mask):
    allowed = np.ones(s.shape, bool) if mask is None else np.broadcast_to(mask, s.shape)
    if normalizer == "softmax":
        e = np.where(allowed, np.exp(s - np.max(np.where(allowed, s, -np.inf), axis=-1, keepdims=True)), 0)
        total = e.sum(axis=-1, keepdims=True)
        return np.where(total > 0, e / np.where(total > 0, total, 1), 0)
    w = 1 / (1 + np.exp(-s)) if normalizer == "sigmoid" else np.maximum(s, 0)
    return np.where(allowed, w, 0)


SCORE_DIMS = {"scaled_dot": (6, 6), "dot": (6, 6), "general": (6, 4), "additive": (6, 4)}


@pytest.mark.parametrize("score", ["scaled_dot", "dot", "general", "additive"])
@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid", "relu"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_the_formulas(score, normalizer, masked, rng):
    dq, dk = SCORE_DIMS[score]
    att = nn.Attention(dq, dk, score=score, normalizer=normalizer, hidden_dim=5, dtype=np.float64, rng=rng)
    q = rng.standard_normal((2, 3, dq))
    k = rng.standard_normal((2, 4, dk))
    v = rng.standard_normal((2, 4, 5))
    mask = None
    if masked:
        mask = rng.random((2, 3, 4)) < 0.6
        mask[0, 1] = False                # a query with nothing to attend to
        mask[1, :, 0] = True
    p = att.state_dict()
    s = scores_formula(q, k, score, p)
    np.testing.assert_allclose(nn.attention_scores(q, k, score, **p), s, rtol=1e-12, atol=1e-12)
    w_expected = normalise_formula(s, normalizer, mask)
    out, w = att(q, k, v, mask=mask)
    assert out.shape == (2, 3, 5) and w.shape == (2, 3, 4)
    np.testing.assert_allclose(w, w_expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out, w_expected @ v, rtol=1e-12, atol=1e-13)
    if masked:
        assert np.all(w[~np.broadcast_to(mask, w.shape)] == 0)
        np.testing.assert_array_equal(out[0, 1], 0)


def test_attention_parameters():
    assert list(nn.Attention(6).state_dict()) == []
    g = nn.Attention(6, 4, score="general")
    assert {k: v.shape for k, v in g.state_dict().items()} == {"weight": (6, 4)}
    a = nn.Attention(6, 4, score="additive", hidden_dim=3)
    assert {k: v.shape for k, v in a.state_dict().items()} == {"w_query": (3, 6), "w_key": (3, 4), "v": (3,)}
    assert nn.Attention(6, 4, score="additive").w_query.shape == (6, 6)   # hidden defaults to query_dim


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_keeps_the_dtype(dtype, rng):
    att = nn.Attention(4, score="general", dtype=dtype, rng=rng)
    q, k, v = (rng.standard_normal((3, 4)).astype(dtype) for _ in range(3))
    out, w = att(q, k, v)
    assert out.dtype == dtype and w.dtype == dtype


def test_softmax_weights_sum_to_one_others_need_not(rng):
    q = np.full((3, 4), 2.0)
    k = np.full((5, 4), 2.0)                      # every score = 16 / sqrt(4) = 8
    v = rng.standard_normal((5, 2))
    mask = np.ones((3, 5), bool)
    mask[1, 3:] = False
    _, w = nn.Attention(4, normalizer="softmax", dtype=np.float64)(q, k, v, mask=mask)
    np.testing.assert_allclose(w.sum(axis=-1), 1, rtol=1e-14)
    np.testing.assert_allclose(w[1, :3], 1 / 3, rtol=1e-14)
    _, w = nn.Attention(4, normalizer="sigmoid", dtype=np.float64)(q, k, v)
    np.testing.assert_allclose(w, 1 / (1 + math.exp(-8)), rtol=1e-14)
    assert np.all(w.sum(axis=-1) > 4.9)          # about 5, not 1
    _, w = nn.Attention(4, normalizer="relu", dtype=np.float64)(q, k, v)
    np.testing.assert_allclose(w.sum(axis=-1), 40, rtol=1e-14)
    out, w = nn.Attention(4, normalizer="relu", dtype=np.float64)(q, -k, v)   # all scores -8
    np.testing.assert_array_equal(w, 0)
    np.testing.assert_array_equal(out, 0)
    # sigmoid: each weight alone, so adding keys does not take weight from the others
    att = nn.Attention(4, normalizer="sigmoid", dtype=np.float64)
    _, w3 = att(q, k[:3], v[:3])
    _, w5 = att(q, k, v)
    np.testing.assert_array_equal(w5[:, :3], w3)


def test_attention_errors(rng):
    with pytest.raises(ValueError, match="unknown score 'cosine'"):
        nn.Attention(4, score="cosine")
    with pytest.raises(ValueError, match="unknown normalizer 'tanh'"):
        nn.Attention(4, normalizer="tanh")
    for score in ("dot", "scaled_dot"):
        with pytest.raises(ValueError, match="query_dim == key_dim.*4 and 6"):
            nn.Attention(4, 6, score=score)
        with pytest.raises(ValueError, match=r"one size.*\(2, 4\).*\(3, 6\)"):
            nn.attention_scores(rng.standard_normal((2, 4)), rng.standard_normal((3, 6)), score)
    with pytest.raises(ValueError, match="unknown score 'cosine'"):
        nn.attention_scores(rng.standard_normal((2, 4)), rng.standard_normal((3, 4)), "cosine")
