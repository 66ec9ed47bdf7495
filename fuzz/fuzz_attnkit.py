"""fuzz/fuzz_attnkit.py: one coverage-guided (atheris) entry point over attnkit's
public surface: every kernel forward and backward, the nn modules' forward and
backward (and an AdamW step), and the file loaders.

    python fuzz/fuzz_attnkit.py [libFuzzer flags] [corpus dirs]
    bash tools/fuzz.sh           (the sanitized build, see there)

The first byte of an input picks the target; the rest drives it, through
atheris.FuzzedDataProvider (shapes, dtypes, layouts, masks, special values) or,
for the loaders' raw-bytes targets, as the file itself.

What counts as a finding (the process stops, libFuzzer saves the input):
  - a crash or a sanitizer report (the C kernels are built with ASan + UBSan);
  - an exception other than the clean ones a wrong argument may raise
    (ValueError, TypeError; RuntimeError for a module's misuse), e.g.
    SystemError, MemoryError, ZeroDivisionError, KeyError, OverflowError;
  - a result of the wrong shape or dtype;
  - NaN or inf from finite, moderate inputs where the result must be finite,
    and results far from attnkit.reference (float64 NumPy) on such inputs;
  - a loader that raises anything but ValueError on a malformed file, or a
    save/load round trip that does not give the arrays back.

Replay one input without libFuzzer: python fuzz/fuzz_attnkit.py CRASH_FILE
(libFuzzer runs a file argument once).
"""
import math
import os
import sys
import tempfile
import warnings

import atheris
import numpy as np

with atheris.instrument_imports():
    import attnkit
    import attnkit.functional as F
    from attnkit import io as akio
    from attnkit import nn, optim, reference

warnings.simplefilter("ignore")
np.seterr(all="ignore")

CLEAN = (ValueError, TypeError)             # what a wrong argument may raise
CLEAN_MODULE = CLEAN + (RuntimeError, IndexError)  # + a module's misuse, an embedding index out of range
SIMD_PATHS = attnkit.supported_simd_paths()
TMP = tempfile.mkdtemp(prefix="attnkit-fuzz-")


class Finding(Exception):
    """An invariant that failed: never one of the clean exception types."""


def check(cond, what):
    if not cond:
        raise Finding(what)


# ---------------------------------------------------------------------------
# Inputs

FLOATS = (np.float32, np.float64)
ODD_DTYPES = (np.float16, np.int32, np.int64, np.bool_, object, np.complex64,
              np.dtype(">f4"), np.dtype(">f8"), np.uint8)


class Gen:
    """Draws arguments from a FuzzedDataProvider; `moderate` stays True while
    every float drawn is finite and of moderate size (the invariants on
    results hold for such inputs)."""

    def __init__(self, fdp):
        self.fdp = fdp
        self.moderate = True
        self.rng = np.random.default_rng(fdp.ConsumeIntInRange(0, 2**32 - 1))

    def int(self, lo, hi):
        return self.fdp.ConsumeIntInRange(lo, hi)

    def bool(self):
        return self.fdp.ConsumeBool()

    def pick(self, options):
        return options[self.fdp.ConsumeIntInRange(0, len(options) - 1)]

    def dim(self, lo=0):
        # mostly tiny; sometimes around SIMD widths and tile edges
        k = self.int(0, 9)
        if k < 6:
            return max(lo, self.int(0, 4))
        if k < 9:
            return max(lo, self.pick((5, 7, 8, 9, 15, 16, 17, 31, 33)))
        return max(lo, self.pick((63, 64, 65, 127, 129)))

    def shape(self, ndim=None, lo=0, budget=6000):
        if ndim is None:
            ndim = self.int(0, 4)
        dims = [self.dim(lo) for _ in range(ndim)]
        while math.prod(dims) > budget:
            i = int(np.argmax(dims))
            dims[i] //= 2
        return tuple(dims)

    def dtype(self, floats_only=False):
        if floats_only or self.int(0, 15):
            return self.pick(FLOATS)
        return self.pick(ODD_DTYPES)

    def values(self, shape, dtype, scale=None, specials=True):
        dtype = np.dtype(dtype)
        if scale is None:
            scale = self.pick((1.0, 1.0, 1.0, 1e-3, 10.0, 1e3))
        a = self.rng.standard_normal(shape) * scale
        if dtype.kind == "f" and specials and a.size and self.int(0, 3) == 0:
            big = float(np.finfo(dtype).max)
            tiny = float(np.finfo(dtype).smallest_subnormal)
            for _ in range(self.int(1, 4)):
                v = self.pick((np.inf, -np.inf, np.nan, big, -big, big / 4, tiny, -tiny, 0.0, -0.0, 1e-30))
                if not (math.isfinite(v) and abs(v) < 1e4):
                    self.moderate = False
                a.flat[self.int(0, a.size - 1)] = v
        if dtype.kind == "O":
            return np.array(a, dtype=object)
        if dtype.kind in "iub":
            return np.asarray((a * 3).astype(dtype))
        return np.asarray(np.asarray(a).astype(dtype))

    def layout(self, a):
        """a (contiguous) in another memory layout with the same values (a
        broadcast one has fewer distinct values: the caller reads the array
        returned, never `a`)."""
        k = self.int(0, 9)
        if a.ndim == 0 or k <= 3:
            out = a
        elif k == 4:
            out = np.asfortranarray(a)
        elif k == 5:                                # a step along one axis
            ax = self.int(0, a.ndim - 1)
            step = self.pick((2, 3))
            shape = list(a.shape)
            shape[ax] *= step
            big = np.zeros(shape, a.dtype)
            idx = [slice(None)] * a.ndim
            idx[ax] = slice(None, None, step)
            big[tuple(idx)] = a
            out = big[tuple(idx)]
        elif k == 6:                                # negative stride
            ax = self.int(0, a.ndim - 1)
            out = np.flip(np.flip(a, ax).copy(), ax)
        elif k == 7:                                # broadcast: zero strides
            ax = self.int(0, a.ndim - 1)
            idx = [slice(None)] * a.ndim
            idx[ax] = slice(0, 1)
            out = np.broadcast_to(a[tuple(idx)], a.shape)
        elif k == 8 and a.dtype.kind != "O":        # unaligned
            buf = np.zeros(a.nbytes + 1, np.uint8)
            out = buf[1:].view(a.dtype).reshape(a.shape)
            out[...] = a
        else:                                       # transposed view of a transposed copy
            out = np.ascontiguousarray(a.T).T
        if self.int(0, 7) == 0 and out.flags.writeable:
            out = out.view()
            out.flags.writeable = False
        return out

    def array(self, shape=None, dtype=None, floats_only=False, scale=None, specials=True):
        if shape is None:
            shape = self.shape()
        if dtype is None:
            dtype = self.dtype(floats_only)
        return self.layout(self.values(shape, dtype, scale, specials))

    def weird(self):
        """Something that is not an array at all, now and then. NaN and
        1 << 70 are not moderate values: the invariants on finite inputs do
        not hold for them."""
        value = self.pick((None, "abc", [1.0, 2.0], [[1.0], [2.0, 3.0]], 3.0, np.float32(1.5), {}, (),
                           np.array(1.0), np.array([], dtype=np.float32), 1 << 70, float("nan"), b"x"))
        if isinstance(value, (int, float)) and not (math.isfinite(value) and abs(value) < 1e4):
            self.moderate = False
        return value

    def maybe_weird(self, arr):
        return self.weird() if self.int(0, 40) == 0 else arr


def safe_shape(x):
    try:
        return np.shape(x)
    except ValueError:      # a ragged list
        return ()


def oracle(fn, *args, **kwargs):
    """attnkit.reference's answer, or None where it has none (the reference
    is the oracle, not the target: its own errors are no finding)."""
    try:
        return fn(*args, **kwargs)
    except Exception:
        return None


def finite(a):
    return bool(np.all(np.isfinite(np.asarray(a, dtype=np.float64))))


def close(got, want, dtype, scale=1.0, what=""):
    """got ~ want (float64) within a tolerance for dtype, relative to scale."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    check(got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}")
    tol = 2e-3 if np.dtype(dtype) == np.float32 else 1e-8
    bad = ~np.isclose(got, want, rtol=tol, atol=tol * max(scale, 1e-30), equal_nan=True)
    if bad.any():
        i = np.argwhere(bad)[0]
        raise Finding(f"{what}: got {got[tuple(i)]!r}, reference {want[tuple(i)]!r} at {tuple(i)} "
                      f"(shape {got.shape}, {np.dtype(dtype)})")


def is_float(a):
    """Whether a is array_like of native float32/float64 (what the kernels accept)."""
    try:
        return np.asarray(a).dtype in (np.dtype(np.float32), np.dtype(np.float64))
    except (ValueError, TypeError):
        return False


def maxabs(*arrays):
    return max([1.0] + [float(np.max(np.abs(np.asarray(a, np.float64)))) for a in arrays
                        if a is not None and np.size(a)])


def axis_arg(g, ndim):
    k = g.int(0, 9)
    if k <= 4:
        return -1
    if k == 5:
        return g.int(-ndim - 1, ndim) if ndim else 0
    if k == 6:
        return None
    if k == 7:
        return tuple(sorted({g.int(-ndim, max(ndim - 1, 0)) for _ in range(g.int(0, 3))})) if ndim else ()
    if k == 8:
        return g.pick((True, 1.5, "0", [0]))
    return 0


def where_arg(g, shape):
    k = g.int(0, 5)
    if k <= 2:
        return None
    if k == 3:
        return g.array(shape, np.bool_)
    if k == 4 and shape:    # broadcast from a smaller shape
        return g.array(tuple(1 if g.bool() else d for d in shape[-g.int(1, len(shape)):]), np.bool_)
    return g.array(g.shape(), g.pick((np.bool_, np.float32, np.int8)))


def with_threads_and_isa(g):
    """A thread count (3 on 2 cores splits the work a third way) and a SIMD
    path, for this input."""
    attnkit.set_num_threads(g.int(1, 3))
    return attnkit._runtime.use_simd_path(g.pick(SIMD_PATHS))


# ---------------------------------------------------------------------------
# Kernel targets


def t_softmax(g):
    log = g.bool()
    x = g.maybe_weird(g.array())
    nd = len(safe_shape(x))
    axis = axis_arg(g, nd)
    where = where_arg(g, safe_shape(x))
    use_out = g.int(0, 4) == 0
    out = None
    if use_out and isinstance(x, np.ndarray) and is_float(x):
        out = x if g.bool() and x.flags.writeable and x is not None else g.layout(np.empty(x.shape, x.dtype))
        if not out.flags.writeable:
            out = np.empty(x.shape, x.dtype)
    x_before = np.array(x, copy=True) if is_float(x) else None
    fn = F.log_softmax if log else F.softmax
    kwargs = {}
    if where is not None:
        kwargs["where"] = where
    if out is not None:
        kwargs["out"] = out
    try:
        y = fn(x, axis, **kwargs) if axis != -1 or kwargs or g.bool() else fn(x)
    except CLEAN:
        return
    check(is_float(x), f"softmax accepted {type(x).__name__} {getattr(x, 'dtype', '')}")
    x = np.asarray(x)
    check(y.shape == x.shape and y.dtype == x.dtype, f"softmax: {y.shape} {y.dtype} for {x.shape} {x.dtype}")
    if out is not None:
        check(y is out, "softmax: out= not returned")
    else:
        check(np.array_equal(x, x_before, equal_nan=True), "softmax modified its input")
    if x.size == 0:
        return
    xs = x_before
    if not np.isnan(xs).any() and not np.isposinf(xs).any():
        check(not np.isnan(y).any(), f"{fn.__name__}: NaN from input without NaN/+inf, axis={axis}")
    rfn = reference.log_softmax if log else reference.softmax
    ref = None
    if g.moderate and where is None:
        ref = oracle(rfn, xs, axis)
    elif where is not None and g.moderate and np.asarray(where).dtype == np.bool_:
        ref = oracle(rfn, xs, axis, np.asarray(where))
    if ref is not None:
        close(y, ref, x.dtype, maxabs(np.where(np.isfinite(ref), ref, 0)) if log else 1.0, fn.__name__)


def t_softmax_backward(g):
    log = g.bool()
    dt = g.dtype()
    shape = g.shape()
    x = g.values(shape, np.float64 if dt not in FLOATS else dt, specials=False)
    y = (reference.log_softmax if log else reference.softmax)(x).astype(x.dtype)
    y = g.maybe_weird(g.layout(y.astype(dt) if dt not in FLOATS else y))
    gshape = shape if g.int(0, 5) else g.shape()
    grad = g.maybe_weird(g.array(gshape, dt if g.int(0, 5) else g.dtype()))
    axis = -1 if g.int(0, 2) else axis_arg(g, len(shape))
    where = None if g.int(0, 3) else where_arg(g, shape)
    fn = F.log_softmax_backward if log else F.softmax_backward
    try:
        dx = fn(grad, y, axis, where=where) if (axis != -1 or where is not None) else fn(grad, y)
    except CLEAN:
        return
    check(is_float(y) and is_float(grad), "softmax_backward accepted a non-float operand")
    y = np.asarray(y)                   # a list of floats is array-like, and accepted
    check(dx.shape == y.shape and dx.dtype == y.dtype, f"{fn.__name__}: result {dx.shape} {dx.dtype}")
    if g.moderate and y.size:
        check(finite(dx), f"{fn.__name__}: non-finite gradient from finite input")
        ref = oracle(reference.log_softmax_backward if log else reference.softmax_backward,
                     np.array(grad), np.array(y), axis) if where is None else None
        if ref is not None:
            close(dx, ref, np.asarray(y).dtype, maxabs(ref, grad), fn.__name__)


def _spread(x, C, rms, per_column=False):
    """Whether every group of C values that a norm normalises over (the last
    C of x; per_column: the values of each of x's last C columns) has a
    variance (rms_norm: a mean square) well above zero."""
    a = np.asarray(x, np.float64).reshape(-1, C)
    axis = 0 if per_column else 1
    s = (a * a).mean(axis=axis) if rms else a.var(axis=axis)
    return bool(a.size and np.all(s > 1e-20))


def t_norm(g):
    rms = g.bool()
    dt = g.dtype()
    shape = g.shape(g.int(0, 4))
    x = g.maybe_weird(g.array(shape, dt))
    k = g.int(0, min(len(shape), 3)) if shape else 0
    nshape = shape[len(shape) - k:]
    if g.int(0, 9) == 0:
        nshape = g.pick((g.shape(g.int(0, 2)), -1, 0, (True,), 2.0, "3", (-1,)))
    elif g.int(0, 2) == 0 and k == 1:
        nshape = nshape[0]
    if isinstance(nshape, tuple) and all(type(d) is int and d >= 0 for d in nshape):
        pshape = nshape
    elif type(nshape) is int and nshape >= 0:
        pshape = (nshape,)
    else:
        pshape = (1,)
    pdt = dt if g.int(0, 9) else g.dtype()
    weight = None if g.bool() else g.array(pshape if g.int(0, 9) else g.shape(1), pdt, scale=1.0)
    bias = None if g.bool() else g.array(pshape if g.int(0, 9) else g.shape(1), pdt, scale=1.0)
    eps = g.pick((1e-5, 1e-5, 1e-6, 0.0, None, -1.0, float("nan"), float("inf"), 1, np.float32(1e-5), "1e-5"))
    if not rms and eps is None:
        eps = 1e-5
    stats = g.int(0, 2) == 0
    try:
        if rms:
            r = F.rms_norm(x, nshape, weight, eps, return_stats=stats)
        else:
            r = F.layer_norm(x, nshape, weight, bias, eps, return_stats=stats)
    except CLEAN:
        return
    name = "rms_norm" if rms else "layer_norm"
    y = r[0] if stats else r
    check(is_float(x), f"{name} accepted {getattr(x, 'dtype', type(x))}")
    x = np.asarray(x)
    check(y.shape == x.shape and y.dtype == x.dtype, f"{name}: result {y.shape} {y.dtype} for {x.shape}")
    nk = len(pshape) if isinstance(nshape, tuple) else 1
    C = math.prod(x.shape[x.ndim - nk:])
    epsv = float(np.finfo(x.dtype).eps) if eps is None else float(eps)
    # with eps=0 a group of constant values (for rms_norm: of zeros) is 0/0,
    # NaN by right: each normalised group must have some spread then
    if g.moderate and x.size and C and (epsv > 0 or _spread(x, C, rms)):
        check(finite(y), f"{name}: non-finite output from finite input (eps={eps})")
        if epsv > 1e-7 or x.dtype == np.float64:
            if rms:
                ref = oracle(reference.rms_norm, np.array(x), nshape, weight, eps)
            else:
                ref = oracle(reference.layer_norm, np.array(x), nshape, weight, bias, eps)
            if ref is not None:
                close(y, ref, x.dtype, maxabs(ref), name)
    if not stats or not x.size or not C:
        return
    # the backward from the saved statistics
    grad = g.maybe_weird(g.array(x.shape if g.int(0, 5) else g.shape(), dt))
    try:
        if rms:
            dx, dw = F.rms_norm_backward(grad, x, r[1], nshape, weight)
        else:
            dx, dw, db = F.layer_norm_backward(grad, x, r[1], r[2], nshape, weight)
    except CLEAN:
        return
    check(dx.shape == x.shape and dw.shape == tuple(pshape[-nk:]) if isinstance(nshape, tuple) else True,
          f"{name}_backward: shapes {dx.shape} {dw.shape}")
    if g.moderate and epsv > 1e-7:
        check(finite(dx) and finite(dw), f"{name}_backward: non-finite gradient from finite input")


def t_batch_norm(g):
    dt = g.dtype()
    shape = g.shape(g.pick((2, 3, 2, 3, 1, 4)))
    x = g.maybe_weird(g.array(shape, dt))
    C = shape[1] if len(shape) > 1 else 1
    Cp = C if g.int(0, 9) else g.dim()
    rm = None if g.int(0, 3) == 0 else np.zeros(Cp, np.float64 if g.bool() else dt if dt in FLOATS else np.float32)
    rv = None if g.int(0, 3) == 0 else np.ones(Cp, rm.dtype if rm is not None else np.float64)
    w = None if g.bool() else g.array((Cp,), dt, scale=1.0)
    b = None if g.bool() else g.array((Cp,), dt, scale=1.0)
    training = g.pick((True, False, True, 1))
    mask = None
    if g.int(0, 3) == 0 and len(shape) >= 2:
        mshape = (shape[0],) if len(shape) == 2 else (shape[0], shape[2])
        mask = g.array(mshape if g.int(0, 5) else g.shape(), np.bool_ if g.int(0, 5) else g.dtype())
    try:
        momentum, eps = g.pick((0.1, 0.0, 1.0, None)), g.pick((1e-5, 0.0, 1.0))
        y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps, padding_mask=mask)
    except CLEAN:
        return
    check(is_float(x), "batch_norm accepted a non-float input")
    x = np.asarray(x)
    check(y.shape == x.shape, f"batch_norm: {y.shape} for {x.shape}")
    # with eps=0 a channel of constant values (a broadcast input, one sample)
    # is 0/0, NaN by right: each channel must have some spread then
    spread = eps > 0 or (mask is None and x.ndim >= 2 and x.shape[1] and
                         _spread(np.moveaxis(np.asarray(x), 1, -1), x.shape[1], False, per_column=True))
    if g.moderate and training is True and x.size and spread:
        check(finite(y) or not finite(np.array(x).var()), f"batch_norm: non-finite output from finite input (eps={eps})")


def attn_inputs(g):
    """(q, k, v, kwargs) for scaled_dot_product_attention."""
    dt = g.dtype()
    nb = g.int(0, 2)
    batch = tuple(g.int(1, 3) for _ in range(nb))
    H = g.int(1, 4)
    gqa = g.int(0, 3) == 0
    Hkv = g.pick([d for d in range(1, H + 1) if H % d == 0]) if gqa else g.pick((H, H, 1))
    L, S = g.dim(), g.dim()
    E = g.pick((g.dim(), 1, 4, 8, 16, 0))
    Ev = E if g.bool() else g.dim()
    two_d = g.int(0, 5) == 0
    def shp(h, n, e):
        if two_d:
            return (n, e)
        s = batch + (h, n, e)
        if g.int(0, 7) == 0 and s[:-2]:       # broadcast a leading dimension
            s = (1,) * len(s[:-2]) + s[-2:] if g.bool() else s[1:]
        return s
    scale_v = g.pick((1.0, 1.0, 0.3, 3.0))
    q = g.maybe_weird(g.array(shp(H, L, E), dt, scale=scale_v))
    k = g.maybe_weird(g.array(shp(Hkv, S, E) if g.int(0, 15) else g.shape(), dt, scale=scale_v))
    v = g.maybe_weird(g.array(shp(Hkv, S, Ev), dt if g.int(0, 15) else g.dtype()))
    kw = {}
    if g.bool():
        kw["enable_gqa"] = gqa if g.int(0, 9) else g.pick((True, 1, "yes"))
    m = g.int(0, 7)
    full = (batch + (H, L, S)) if not two_d else (L, S)
    if m == 1:
        kw["attn_mask"] = g.array(full[-2:] if g.bool() else full, np.bool_)
    elif m == 2:
        mk = g.values(full[-2:] if g.bool() else full, dt if dt in FLOATS else np.float32, scale=1.0,
                      specials=False)
        mk[g.rng.random(mk.shape) < 0.3] = -np.inf
        kw["attn_mask"] = g.layout(mk)
    elif m == 3:
        kw["attn_mask"] = g.array(g.shape(), g.dtype())          # wrong shape or dtype
    elif m == 4:
        kw["attn_mask"] = np.zeros((L, S), bool)                 # everything hidden
    if g.int(0, 3) == 0:
        kw["is_causal"] = True if g.int(0, 9) else g.pick((1, "no", np.True_))
        if g.bool():
            kw["causal_alignment"] = g.pick(("bottom_right", "top_left", "middle"))
    if g.int(0, 5) == 0:
        kw["scale"] = g.pick((0.0, -1.0, 1e-3, 1e3, float("nan"), "1", None))
    if g.int(0, 5) == 0:
        kw["dropout_p"] = g.pick((0.5, 0.0, 1.0, 0.999, -0.1, 1.5, float("nan")))
        kw["dropout_seed"] = g.pick((0, 1, 2**32 - 1, 2**32, -1, None, 1.5))
    return q, k, v, kw


def t_attention(g):
    q, k, v, kw = attn_inputs(g)
    ret_w = g.pick((False, False, True, "mean", "bad"))
    ret_lse = g.int(0, 2) == 0
    try:
        r = F.scaled_dot_product_attention(q, k, v, return_weights=ret_w, return_lse=ret_lse, **kw)
    except CLEAN:
        return
    out = r if not (ret_w or ret_lse) else r[0]
    check(all(is_float(a) for a in (q, k, v)), "attention accepted a non-float operand")
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    check(out.dtype == q.dtype, f"attention: out dtype {out.dtype}")
    check(out.shape[-2:] == (q.shape[-2], v.shape[-1]), f"attention: out {out.shape} for q {q.shape} v {v.shape}")
    mask = kw.get("attn_mask")
    mask_ok = mask is None or (isinstance(mask, np.ndarray) and (mask.dtype == np.bool_ or
                                                               not np.isnan(mask).any() and not np.isposinf(mask).any()))
    sc = kw.get("scale", None)
    scale_ok = sc is None or (isinstance(sc, float) and math.isfinite(sc) and abs(sc) <= 1e3)
    if g.moderate and mask_ok and scale_ok:
        check(finite(out), f"attention: non-finite output from finite input ({kw})")
        if ret_lse:
            check(not np.isnan(r[-1]).any(), "attention: NaN lse")
        if ret_w:
            check(finite(r[1]), "attention: non-finite weights")
        if not kw.get("dropout_p") and q.size and v.size:
            ref_kw = {a: b for a, b in kw.items() if a not in ("dropout_p", "dropout_seed")}
            ref = oracle(reference.scaled_dot_product_attention, np.array(q), np.array(k), np.array(v), **ref_kw)
            if ref is None:
                return
            if isinstance(ref, tuple):
                ref = ref[0]
            close(out, ref, q.dtype, maxabs(v), "attention vs reference")


def t_attention_backward(g):
    q, k, v, kw = attn_inputs(g)
    kw.pop("scale", None) if g.bool() else None
    try:
        out, lse = F.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    except CLEAN:
        return
    gout = g.maybe_weird(g.array(out.shape if g.int(0, 7) else g.shape(), out.dtype if g.int(0, 7) else g.dtype()))
    o = out if g.int(0, 9) else g.maybe_weird(g.array(g.shape(), out.dtype))
    ls = g.layout(lse) if g.int(0, 9) else g.array(g.shape(), out.dtype)
    if g.int(0, 9) == 0:
        kw["dropout_seed"] = g.pick((None, 7, -3))
    try:
        dq, dk, dv = F.scaled_dot_product_attention_backward(gout, q, k, v, o, ls, **kw)
    except CLEAN:
        return
    check(dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape,
          f"attention_backward: {dq.shape} {dk.shape} {dv.shape} for {q.shape} {k.shape} {v.shape}")
    mask = kw.get("attn_mask")
    mask_ok = mask is None or (mask.dtype == np.bool_ or not np.isnan(mask).any() and not np.isposinf(mask).any())
    sc = kw.get("scale", None)
    scale_ok = sc is None or (isinstance(sc, float) and math.isfinite(sc) and abs(sc) <= 1e3)
    if g.moderate and mask_ok and scale_ok and o is out and finite(out):
        check(finite(dq) and finite(dk) and finite(dv), f"attention_backward: non-finite gradient ({kw})")


def t_linear(g):
    dt = g.dtype()
    K, N = g.dim(), g.dim()
    xshape = g.shape(g.int(0, 3)) + (K,)
    x = g.maybe_weird(g.array(xshape if g.int(0, 15) else g.shape(), dt))
    w = g.maybe_weird(g.array((N, K) if g.int(0, 15) else g.shape(), dt if g.int(0, 15) else g.dtype()))
    b = None if g.bool() else g.array((N,) if g.int(0, 15) else g.shape(), dt)
    act = g.pick((None, None, "gelu", "gelu_tanh", "silu", "relu", "tanh"))
    res = None if g.int(0, 2) else g.array(xshape[:-1] + (N,) if g.int(0, 9) else g.shape(), dt)
    try:
        y = F.linear(x, w, b, activation=act, residual=res)
    except CLEAN:
        return
    check(is_float(x) and is_float(w), "linear accepted a non-float operand")
    x, w = np.asarray(x), np.asarray(w)
    check(y.shape == x.shape[:-1] + (w.shape[0],) and y.dtype == x.dtype, f"linear: {y.shape} {y.dtype}")
    if g.moderate and y.size:
        check(finite(y), "linear: non-finite output from finite input")
        ref = reference.linear(np.array(x, np.float64), np.array(w, np.float64),
                               None if b is None else np.array(b, np.float64))
        if act is not None:
            ref = {"gelu": reference.gelu, "gelu_tanh": lambda z: reference.gelu(z, "tanh"),
                   "silu": reference.silu, "relu": reference.relu}[act](ref)
        if res is not None:
            ref = ref + np.array(res, np.float64)
        sc = maxabs(x) * maxabs(w) * max(K, 1) + maxabs(b, res)
        close(y, ref, x.dtype, sc, f"linear activation={act}")
    # and the backward
    grad = g.maybe_weird(g.array(y.shape if g.int(0, 9) else g.shape(), dt))
    wg = g.pick((None, None, False, "acc", "bad"))
    if wg == "acc":
        wg = g.layout(np.zeros(w.shape, w.dtype))
    elif wg == "bad":
        wg = g.array(g.shape(), g.dtype())
    bg = g.pick((None, None, False, "acc"))
    if bg == "acc":
        bg = g.layout(np.zeros(w.shape[:1], w.dtype))
    try:
        dx, dw, db = F.linear_backward(grad, x, w, weight_grad=wg, bias_grad=bg)
    except CLEAN:
        return
    check(dx.shape == x.shape, f"linear_backward: dx {dx.shape} for x {x.shape}")
    check(dw is None or dw.shape == w.shape, "linear_backward: dw shape")
    check(db is None or db.shape == w.shape[:1], "linear_backward: db shape")
    if g.moderate and is_float(grad) and finite(grad):
        M = math.prod(x.shape[:-1])
        g64 = np.array(grad, np.float64).reshape(M, w.shape[0])
        x64 = np.array(x, np.float64).reshape(M, K)
        sc = maxabs(grad) * max(maxabs(w), maxabs(x)) * max(K, N, g64.shape[0], 1)
        close(dx, (g64 @ np.array(w, np.float64)).reshape(x.shape), x.dtype, sc, "linear_backward dx")
        if dw is not None:
            close(dw, g64.T @ x64, x.dtype, sc, "linear_backward dw")
        if db is not None:
            close(db, g64.sum(0), x.dtype, sc, "linear_backward db")


def t_activation(g):
    name = g.pick(("gelu", "gelu_tanh", "silu", "relu", "sigmoid"))
    x = g.maybe_weird(g.array())
    out = None
    if g.int(0, 4) == 0 and isinstance(x, np.ndarray) and is_float(x) and name != "sigmoid":
        out = x if g.bool() and x.flags.writeable else g.layout(np.empty(x.shape, x.dtype))
    x0 = np.array(x, copy=True) if is_float(x) else None
    fn = {"gelu": F.gelu, "gelu_tanh": lambda a, **k: F.gelu(a, "tanh", **k), "silu": F.silu,
          "relu": F.relu, "sigmoid": F.sigmoid}[name]
    try:
        y = fn(x, out=out) if out is not None else fn(x)
    except CLEAN:
        return
    check(is_float(x), f"{name} accepted {getattr(x, 'dtype', type(x))}")
    x = np.asarray(x)
    check(y.shape == x.shape and y.dtype == x.dtype, f"{name}: {np.shape(y)} for {x.shape}")
    if finite(x0):
        check(finite(y), f"{name}: non-finite output from finite input")
        if g.moderate:
            ref = {"gelu": reference.gelu, "gelu_tanh": lambda z: reference.gelu(z, "tanh"),
                   "silu": reference.silu, "relu": reference.relu, "sigmoid": reference.sigmoid}[name](x0)
            close(y, ref, x.dtype, maxabs(x0), name)
    # backward
    if name == "sigmoid":
        return
    grad = g.maybe_weird(g.array(x.shape if g.int(0, 9) else g.shape(), x.dtype if g.int(0, 9) else g.dtype()))
    try:
        if g.int(0, 2) == 0:
            bias = None if g.bool() else g.array(x.shape[-1:] if g.int(0, 9) else g.shape(), x.dtype)
            dx, db = F.bias_activation_backward(grad, x0, bias, None if name == "relu" and g.bool() else name)
            check(db.shape == (x.shape[-1],), "bias_activation_backward: dbias shape")
        else:
            dx = {"gelu": F.gelu_backward, "gelu_tanh": lambda a, b: F.gelu_backward(a, b, "tanh"),
                  "silu": F.silu_backward, "relu": F.relu_backward}[name](grad, x0)
    except CLEAN:
        return
    check(dx.shape == x.shape, f"{name}_backward: {dx.shape}")
    if finite(x0) and is_float(grad) and np.all(np.abs(grad) < 1e4):
        check(finite(dx) or not g.moderate, f"{name}_backward: non-finite gradient from finite input")


def t_dropout(g):
    x = g.maybe_weird(g.array())
    p = g.pick((0.5, 0.1, 0.0, 1.0, 0.999999, -0.5, 2.0, float("nan"), "0.5", np.float32(0.3)))
    seed = g.pick((None, 0, 123, 2**32 - 1, 2**32, -1, True))
    x0 = np.array(x, copy=True) if is_float(x) else None
    training = g.pick((True, True, False, 1))
    try:
        y = F.dropout(x, p, training=training, seed=seed)
    except CLEAN:
        return
    check(y.shape == np.shape(x), "dropout: shape")
    if is_float(x) and finite(x0) and isinstance(p, float) and p < 1:
        kept = y != 0
        # in training, kept values are scaled by 1/(1-p); out of it (and a
        # Python float or 0-d input comes back as a new 0-d array) untouched
        expected = x0[kept] / (1 - p) if training else x0[kept]
        check(np.allclose(np.asarray(y)[kept], expected, rtol=1e-5, atol=0, equal_nan=False)
              or not g.moderate, "dropout: kept values wrong")


# ---------------------------------------------------------------------------
# Modules (forward and backward in training mode, then an optimiser step)


def run_module(g, m, inputs, grad_like=None):
    """forward in train mode, backward with a gradient of the output's shape,
    an AdamW step; checks shapes and finiteness."""
    m.train(g.int(0, 7) != 0)
    try:
        out = m(*inputs)
    except CLEAN_MODULE:
        return
    y = out[0] if isinstance(out, tuple) else out
    check(isinstance(y, np.ndarray), f"{type(m).__name__}: forward gave {type(y).__name__}")
    if g.moderate:
        check(finite(y), f"{type(m).__name__}: non-finite output from finite input")
    grad = g.array(y.shape if g.int(0, 9) else g.shape(), y.dtype if y.dtype in FLOATS else np.float32,
                   scale=1.0, specials=False)
    try:
        dx = m.backward(grad)
    except CLEAN_MODULE:
        return
    arrays = dx if isinstance(dx, tuple) else (dx,)
    for a, inp in zip(arrays, inputs):
        if a is not None and isinstance(inp, np.ndarray) and inp.dtype.kind == "f":
            check(a.shape == inp.shape, f"{type(m).__name__}.backward: {a.shape} for input {inp.shape}")
            if g.moderate:
                check(finite(a), f"{type(m).__name__}.backward: non-finite input gradient")
    params = dict(m.named_parameters())
    for name, gr in m.grads().items():
        check(gr.shape == params[name].shape, f"{type(m).__name__}: grad {name} {gr.shape}")
        if g.moderate:
            check(finite(gr), f"{type(m).__name__}: non-finite gradient of {name}")
    if g.bool():
        try:
            opt = optim.AdamW(m, lr=g.pick((1e-3, 0.0, 1.0, -1.0, float("nan"))),
                              weight_decay=g.pick((0.01, 0.0, 1.0)), amsgrad=g.bool())
            opt.step()
        except CLEAN_MODULE:
            return
        if g.moderate:
            for name, p in m.named_parameters():
                check(finite(p), f"AdamW: non-finite parameter {name} after a step")


def t_module_layers(g):
    dt = g.pick(FLOATS)
    kind = g.int(0, 7)
    rng = np.random.default_rng(0)
    n = g.dim(1)
    lead = g.shape(g.int(0, 2), lo=0)
    x = g.array(lead + (n,) if g.int(0, 9) else g.shape(), dt if g.int(0, 15) else g.dtype())
    try:
        if kind == 0:
            m = nn.Linear(n, g.dim(1), bias=g.bool(), dtype=dt, rng=rng)
        elif kind == 1:
            m = nn.LayerNorm(n, eps=g.pick((1e-5, 1e-3)), elementwise_affine=g.bool(), bias=g.bool(), dtype=dt)
        elif kind == 2:
            m = nn.RMSNorm(n, dtype=dt)
        elif kind == 3:
            m = nn.BatchNorm1d(n, momentum=g.pick((0.1, None, 1.0)), affine=g.bool(),
                               track_running_stats=g.bool(), channels_last=g.bool(), dtype=dt)
        elif kind == 4:
            m = nn.Dropout(g.pick((0.0, 0.5, 1.0)), rng=rng)
        elif kind == 5:
            m = g.pick((nn.GELU(), nn.GELU("tanh"), nn.ReLU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.Identity()))
        elif kind == 6:
            num = g.dim(1)
            m = nn.Embedding(num, n, padding_idx=g.pick((None, 0, -1, num)), dtype=dt, rng=rng)
            x = g.array(g.shape(g.int(0, 3), budget=200), g.pick((np.int64, np.int32, np.int64, np.float32, np.bool_)),
                        scale=num / 2)
            if x.dtype.kind == "i" and g.int(0, 3):
                x = np.abs(np.asarray(x)) % num
        else:
            m = nn.Sequential([nn.Linear(n, 4, dtype=dt, rng=rng), nn.GELU(), nn.Linear(4, n, dtype=dt, rng=rng)])
    except CLEAN:
        return
    run_module(g, m, (x,))


def t_module_mha(g):
    dt = g.pick(FLOATS)
    H = g.int(1, 4)
    E = H * g.int(1, 4)
    Hkv = g.pick([d for d in range(1, H + 1) if H % d == 0])
    batch_first = g.bool()
    kdim = g.pick((None, E, g.dim(1)))
    try:
        m = nn.MultiHeadAttention(E, H, dropout=g.pick((0.0, 0.0, 0.5)), bias=g.bool(),
                                  add_bias_kv=g.int(0, 4) == 0, add_zero_attn=g.int(0, 4) == 0,
                                  kdim=kdim, vdim=kdim, batch_first=batch_first, num_kv_heads=Hkv,
                                  dtype=dt, rng=np.random.default_rng(1))
    except CLEAN:
        return
    N, L, S = g.int(1, 3), g.dim(), g.dim()
    unbatched = g.int(0, 4) == 0
    def shp(n, e):
        if unbatched:
            return (n, e)
        return (N, n, e) if batch_first else (n, N, e)
    q = g.array(shp(L, E) if g.int(0, 15) else g.shape(), dt)
    self_attn = g.bool()
    k = q if self_attn else g.array(shp(S, kdim or E), dt)
    v = q if self_attn else g.array(shp(S, kdim or E), dt)
    Skey = L if self_attn else S
    kw = {}
    c = g.int(0, 5)
    if c == 1:
        kw["key_padding_mask"] = g.array((N, Skey) if not unbatched else (Skey,), np.bool_)
    elif c == 2:
        kw["attn_mask"] = g.array((L, Skey), g.pick((np.bool_, dt)), specials=False)
    elif c == 3:
        kw["attn_mask"] = g.array(g.shape(), g.dtype())
    elif c == 4:
        kw["is_causal"] = True
    kw["need_weights"] = g.bool()
    kw["average_attn_weights"] = g.bool()

    class Call:   # run_module's calling convention with keyword arguments
        pass
    m.train(g.int(0, 7) != 0)
    try:
        out, w = m(q, k, v, **kw)
    except CLEAN_MODULE:
        return
    check(out.shape == q.shape, f"MultiHeadAttention: out {out.shape} for query {q.shape}")
    if g.moderate and kw.get("attn_mask") is None and "key_padding_mask" not in kw:
        check(finite(out), "MultiHeadAttention: non-finite output from finite input")
    grad = g.array(out.shape if g.int(0, 9) else g.shape(), dt, scale=1.0, specials=False)
    try:
        grads = m.backward(grad)
    except CLEAN_MODULE:
        return
    for a, inp in zip(grads, (q, k, v)):
        check(a.shape == inp.shape, f"MultiHeadAttention.backward: {a.shape} for {inp.shape}")
        if g.moderate and "attn_mask" not in kw:
            check(finite(a), "MultiHeadAttention.backward: non-finite gradient")
    if g.moderate and "attn_mask" not in kw:
        for name, gr in m.grads().items():
            check(finite(gr), f"MultiHeadAttention: non-finite gradient of {name}")


def t_module_transformer(g):
    dt = g.pick(FLOATS)
    H = g.int(1, 3)
    d = H * g.int(1, 4)
    batch_first = g.bool()
    decoder = g.bool()
    cls = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
    try:
        m = cls(d, H, dim_feedforward=g.pick((4, 8, 17)), dropout=g.pick((0.0, 0.1)),
                activation=g.pick(("relu", "gelu", "silu", "tanh")), batch_first=batch_first,
                norm_first=g.bool(), bias=g.bool(), dtype=dt, rng=np.random.default_rng(2))
    except CLEAN:
        return
    N, L, S = g.int(1, 3), g.dim(1), g.dim(1)
    shp = (lambda n: (N, n, d)) if batch_first else (lambda n: (n, N, d))
    x = g.array(shp(L) if g.int(0, 15) else g.shape(), dt)
    inputs = (x, g.array(shp(S), dt)) if decoder else (x,)
    run_module(g, m, inputs)


# ---------------------------------------------------------------------------
# Loaders


def _load_bytes(data, ext):
    """A malformed file must give ValueError (anything else is a finding)."""
    path = os.path.join(TMP, "f" + ext)
    with open(path, "wb") as f:
        f.write(data)
    try:
        akio.load_state_dict(path, max_bytes=None if len(data) % 3 else 1 << 20)
    except ValueError:
        pass


def t_load_safetensors_raw(data):
    _load_bytes(data, ".safetensors")


def t_load_npz_raw(data):
    _load_bytes(data, ".npz")


def random_state(g):
    state = {}
    for i in range(g.int(0, 4)):
        dt = g.pick((np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_,
                     np.uint64, np.dtype(">f4")))
        name = g.pick(("w", "b", "layer.0.weight", "x" * 5, "é", "a.npy", "__metadata__", "")) + str(i)
        state[name] = g.array(g.shape(budget=64), dt)
    return state


def t_load_mutated(g):
    ext = g.pick((".safetensors", ".npz"))
    state = random_state(g)
    path = os.path.join(TMP, "m" + ext)
    try:
        akio.save_state_dict(state, path)
    except CLEAN:
        return
    back = akio.load_state_dict(path)
    check(set(back) == set(state), f"round trip {ext}: names {sorted(back)} != {sorted(state)}")
    for name, a in state.items():
        b = back[name]
        check(b.shape == a.shape and np.array_equal(b, a, equal_nan=True)
              and b.dtype == (a.dtype.newbyteorder("=") if ext == ".safetensors" else a.dtype),
              f"round trip {ext}: {name!r} {a.dtype}{a.shape} came back {b.dtype}{b.shape}")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for _ in range(g.int(1, 6)):
        op = g.int(0, 4)
        if not data:
            break
        pos = g.int(0, len(data) - 1)
        if op == 0:
            data[pos] = g.int(0, 255)
        elif op == 1:
            del data[pos:]
        elif op == 2:
            data[pos:pos] = g.fdp.ConsumeBytes(g.int(1, 16))
        elif op == 3 and ext == ".safetensors" and len(data) > 8:
            # a field of the JSON header rewritten
            n = int.from_bytes(data[:8], "little")
            header = bytes(data[8:8 + n]).decode("utf-8", "replace")
            for a, b in ((g.pick(('"F32"', '"F64"', '"shape"', '"data_offsets"', "[", ",", "0", "1", ":")),
                          g.pick(('"BF16"', '"I64"', '"U8"', '"shape":[-1]', "[[", ",,", "18446744073709551615",
                                  "1e400", "-0", "{}", '"__metadata__":{"a":1}', "null")),),):
                header = header.replace(a, b, 1)
            hb = header.encode("utf-8", "surrogatepass")
            data[:8 + n] = (len(hb) if g.int(0, 5) else g.int(0, 2**64 - 1)).to_bytes(8, "little") + hb
        else:
            data[pos:pos + 4] = g.int(0, 2**32 - 1).to_bytes(4, "little")
    _load_bytes(bytes(data), ext)


# ---------------------------------------------------------------------------

KERNEL_TARGETS = [t_softmax, t_softmax_backward, t_norm, t_batch_norm, t_attention, t_attention_backward,
                  t_linear, t_activation, t_dropout, t_module_layers, t_module_mha, t_module_transformer,
                  t_load_mutated]
RAW_TARGETS = [t_load_safetensors_raw, t_load_npz_raw]
N_TARGETS = len(KERNEL_TARGETS) + len(RAW_TARGETS)


def TestOneInput(data):
    if not data:
        return
    t = data[0] % N_TARGETS
    if t >= len(KERNEL_TARGETS):
        RAW_TARGETS[t - len(KERNEL_TARGETS)](data[1:])
        return
    g = Gen(atheris.FuzzedDataProvider(data[1:]))
    with with_threads_and_isa(g):
        KERNEL_TARGETS[t](g)


def target_byte(name):
    """The first byte that selects the target called `name` (for the seed corpus)."""
    names = [f.__name__ for f in KERNEL_TARGETS + RAW_TARGETS]
    return bytes([names.index(name)])


def main():
    # internal_libfuzzer=True: always atheris' own libFuzzer module. Under the
    # sanitizers tools/fuzz.sh preloads that very module (ahead of libasan, so
    # that its coverage callbacks win over libasan's empty ones); atheris
    # would otherwise see LLVMFuzzerRunDriver already in the process and load
    # its other module, core_without_libfuzzer, whose state is not the one
    # the preloaded copy uses ("You must call Setup() before Fuzz()").
    atheris.Setup(sys.argv, TestOneInput, internal_libfuzzer=True)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
