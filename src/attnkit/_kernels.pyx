# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The binding: NumPy arrays in, C kernels called without the GIL.

functional.py checks what the user passed and lays it out; this module
re-checks only what memory safety rests on (dtypes, dimensions, strides) and
raises ValueError/TypeError if a caller got that wrong, so no call from Python
can make a kernel read or write outside an array.

The arrays are read through NumPy's C API rather than typed memoryviews:
acquiring a memoryview costs about 0.3 us per argument, which is a fifth of a
whole softmax call on a small row.
"""
cimport numpy as cnp
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc

cnp.import_array()

# the C declarations are in _kernels.pxd, which Cython reads with this file
attnkit_init()

ctypedef fused real:
    float
    double


# ---------------------------------------------------------------------------
# Checks

cdef inline object shape_of(cnp.ndarray a):
    return (<object>a).shape


cdef inline bint is_native_float(cnp.ndarray a) noexcept:
    cdef int t = cnp.PyArray_TYPE(a)
    return (t == cnp.NPY_FLOAT or t == cnp.NPY_DOUBLE) and cnp.PyArray_ISNOTSWAPPED(a)


cdef inline cnp.ndarray plain_float_array(object x):
    """x itself if it is an ndarray of native float32/float64, C-contiguous and
    aligned, with at least one dimension (what the fast paths take), else None."""
    if type(x) is not cnp.ndarray:
        return None
    cdef cnp.ndarray a = <cnp.ndarray>x
    if cnp.PyArray_NDIM(a) == 0 or not is_native_float(a) or not cnp.PyArray_CHKFLAGS(
            a, cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED):
        return None
    return a


cdef int64_t element_stride(cnp.ndarray a, int axis, str what) except? -1:
    """a's stride along axis, in elements; ValueError if not a whole number."""
    cdef int64_t size = cnp.PyArray_ITEMSIZE(a)
    cdef int64_t s = cnp.PyArray_STRIDE(a, axis)
    if s % size != 0:
        raise ValueError(f"{what}: stride {s} bytes along axis {axis} is not a multiple of "
                         f"the item size {size}")
    return s // size


cdef check_float_operand(cnp.ndarray a, int ndim, int type_num, str what, bint writable):
    if cnp.PyArray_NDIM(a) != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {shape_of(a)}")
    if cnp.PyArray_TYPE(a) != type_num or not cnp.PyArray_ISNOTSWAPPED(a):
        raise TypeError(f"{what}: expected native {'float32' if type_num == cnp.NPY_FLOAT else 'float64'}, "
                        f"got {a.dtype}")
    if not cnp.PyArray_ISALIGNED(a):
        raise ValueError(f"{what}: array is not aligned")
    if writable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{what}: array is read-only")


cdef check_rows(cnp.ndarray a, cnp.ndarray like, str what):
    """a is (N, C) with contiguous rows and the shape of like."""
    if a.shape[0] != like.shape[0] or a.shape[1] != like.shape[1]:
        raise ValueError(f"{what}: shape {shape_of(a)} differs from {shape_of(like)}")
    if a.shape[0] > 0 and a.shape[1] > 1 and cnp.PyArray_STRIDE(a, 1) != cnp.PyArray_ITEMSIZE(a):
        raise ValueError(f"{what}: rows of shape {shape_of(a)} are not contiguous")


cdef void* optional_matrix(object v, int64_t rows, int64_t cols, int type_num, str what,
                           bint writable) except? NULL:
    """Data pointer of a C-contiguous (rows, cols) array, or NULL for None."""
    if v is None:
        return NULL
    cdef cnp.ndarray a = <cnp.ndarray?>v
    check_float_operand(a, 2, type_num, what, writable)
    if a.shape[0] != rows or a.shape[1] != cols or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{what}: expected a C-contiguous ({rows}, {cols}), got {shape_of(a)}")
    return cnp.PyArray_DATA(a)


cdef void* optional_vector(object v, int64_t length, int type_num, str what, bint writable) except? NULL:
    """Data pointer of a contiguous 1-D array of `length` elements, or NULL for None."""
    if v is None:
        return NULL
    if not isinstance(v, cnp.ndarray):
        raise TypeError(f"{what}: expected an ndarray or None, got {type(v).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>v
    check_float_operand(a, 1, type_num, what, writable)
    if a.shape[0] != length or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{what}: expected a contiguous vector of {length} elements, "
                         f"got shape {shape_of(a)}")
    if length == 0:
        return NULL
    return cnp.PyArray_DATA(a)


# ---------------------------------------------------------------------------
# Softmax

cdef inline void run_softmax(real* out, const real* x, const uint8_t* where,
                             const attnkit_softmax_args* args) noexcept nogil:
    if real is float:
        attnkit_softmax_f32(out, x, where, args)
    else:
        attnkit_softmax_f64(out, x, where, args)


def softmax_last_axis(object x, bint log):
    """softmax (log=True: log_softmax) over the last axis of x, into a new array.

    Only for a C-contiguous, aligned, native float32/float64 ndarray with at
    least one dimension; returns None for anything else, which the caller
    then sends down the general path. This is the path small calls take, so
    it does nothing it need not do.
    """
    cdef cnp.ndarray a = plain_float_array(x)
    if a is None:
        return None
    cdef int ndim = cnp.PyArray_NDIM(a)
    cdef int type_num = cnp.PyArray_TYPE(a)
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(ndim, cnp.PyArray_DIMS(a), type_num, 0)
    cdef attnkit_softmax_args args
    args.C = cnp.PyArray_DIM(a, ndim - 1)
    if args.C == 0:
        return out
    args.N = cnp.PyArray_SIZE(a) // args.C
    args.K = 1
    args.out_strides.n = args.C
    args.out_strides.c = 1
    args.out_strides.k = 1
    args.x_strides = args.out_strides
    args.where_strides.n = 0
    args.where_strides.c = 0
    args.where_strides.k = 0
    args.log = log
    cdef void* po = cnp.PyArray_DATA(out)
    cdef const void* px = cnp.PyArray_DATA(a)
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            run_softmax(<float*>po, <const float*>px, NULL, &args)
        else:
            run_softmax(<double*>po, <const double*>px, NULL, &args)
    return out


cdef set_strides(attnkit_strides* s, cnp.ndarray a, str what):
    s.n = element_stride(a, 0, what)
    s.c = element_stride(a, 1, what)
    s.k = element_stride(a, 2, what)


cdef const uint8_t* where_mask(object where, cnp.ndarray like, attnkit_strides* strides, str func,
                               str like_name) except? NULL:
    """softmax's (and its backward's) where: None, or a bool array of like's
    (N, C, K) shape with any strides, 0 for broadcast dimensions. Sets its
    strides (all 0 for None) and gives its data pointer (NULL for None)."""
    strides.n = strides.c = strides.k = 0
    if where is None:
        return NULL
    if not isinstance(where, cnp.ndarray):
        raise TypeError(f"{func} where: expected an ndarray or None, got {type(where).__name__}")
    cdef cnp.ndarray w = <cnp.ndarray>where
    if cnp.PyArray_TYPE(w) != cnp.NPY_BOOL or cnp.PyArray_NDIM(w) != 3:
        raise TypeError(f"{func} where: expected a 3-d bool array, got {w.dtype} {shape_of(w)}")
    cdef int d
    for d in range(3):
        if w.shape[d] != like.shape[d]:
            raise ValueError(f"{func}: where shape {shape_of(w)} differs from {like_name} {shape_of(like)}")
    strides.n = cnp.PyArray_STRIDE(w, 0)
    strides.c = cnp.PyArray_STRIDE(w, 1)
    strides.k = cnp.PyArray_STRIDE(w, 2)
    return <const uint8_t*>cnp.PyArray_DATA(w)


def softmax(cnp.ndarray out, cnp.ndarray x, object where, bint log):
    """softmax along axis 1 of the (N, C, K) array x, into out (N, C, K).

    where is None or a bool array of shape (N, C, K), any strides (0 for
    broadcast dimensions). x and out must have unit stride along K, and along
    C too when K == 1; out may be x itself.
    """
    cdef int type_num = cnp.PyArray_TYPE(x)
    check_float_operand(x, 3, type_num, "softmax input", False)
    if not is_native_float(x):
        raise TypeError(f"softmax input: expected native float32 or float64, got {x.dtype}")
    check_float_operand(out, 3, type_num, "softmax output", True)
    cdef int d
    for d in range(3):
        if out.shape[d] != x.shape[d]:
            raise ValueError(f"softmax: output shape {shape_of(out)} differs from input shape {shape_of(x)}")
    cdef attnkit_softmax_args args
    args.N = x.shape[0]
    args.C = x.shape[1]
    args.K = x.shape[2]
    args.log = log
    if args.N == 0 or args.C == 0 or args.K == 0:
        return out
    set_strides(&args.x_strides, x, "softmax input")
    set_strides(&args.out_strides, out, "softmax output")
    if args.K > 1 and (args.x_strides.k != 1 or args.out_strides.k != 1):
        raise ValueError(f"softmax: the inner axis must be contiguous (input strides {(<object>x).strides}, "
                         f"output strides {(<object>out).strides})")
    if args.K == 1 and args.C > 1 and (args.x_strides.c != 1 or args.out_strides.c != 1):
        raise ValueError(f"softmax: rows must be contiguous (input strides {(<object>x).strides}, "
                         f"output strides {(<object>out).strides})")
    args.x_strides.k = 1
    args.out_strides.k = 1
    if args.K == 1:
        args.x_strides.c = 1
        args.out_strides.c = 1

    cdef const uint8_t* pw = where_mask(where, x, &args.where_strides, "softmax", "input shape")

    cdef void* po = cnp.PyArray_DATA(out)
    cdef const void* px = cnp.PyArray_DATA(x)
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            run_softmax(<float*>po, <const float*>px, pw, &args)
        else:
            run_softmax(<double*>po, <const double*>px, pw, &args)
    return out


cdef bint same_shape_and_type(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Whether b has a's dtype and shape."""
    if cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(b) or cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b):
        return False
    cdef int d
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, d) != cnp.PyArray_DIM(b, d):
            return False
    return True


cdef void call_softmax_backward(int type_num, void* pdx, const void* pdy, const void* py,
                                const uint8_t* pw, const attnkit_softmax_backward_args* args) noexcept nogil:
    """softmax's (or log_softmax's) backward kernel in y's precision."""
    if type_num == cnp.NPY_FLOAT:
        attnkit_softmax_backward_f32(<float*>pdx, <const float*>pdy, <const float*>py, pw, args)
    else:
        attnkit_softmax_backward_f64(<double*>pdx, <const double*>pdy, <const double*>py, pw, args)


def softmax_backward_last_axis(object grad, object y, bint log):
    """softmax_backward (log=True: log_softmax_backward) over the last axis,
    into a new array, for plain arrays only (as softmax_last_axis): grad and
    y C-contiguous, aligned, native float32/float64 ndarrays of one shape
    and dtype. Returns None for anything else, for the general path."""
    cdef cnp.ndarray a = plain_float_array(y)
    cdef cnp.ndarray g = plain_float_array(grad)
    if a is None or g is None or not same_shape_and_type(a, g):
        return None
    cdef int ndim = cnp.PyArray_NDIM(a)
    cdef int type_num = cnp.PyArray_TYPE(a)
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(ndim, cnp.PyArray_DIMS(a), type_num, 0)
    cdef attnkit_softmax_backward_args args
    args.C = cnp.PyArray_DIM(a, ndim - 1)
    if args.C == 0 or cnp.PyArray_SIZE(a) == 0:
        return out
    args.N = cnp.PyArray_SIZE(a) // args.C
    args.K = 1
    args.dx_strides.n = args.C
    args.dx_strides.c = 1
    args.dx_strides.k = 1
    args.dy_strides = args.dx_strides
    args.y_strides = args.dx_strides
    args.where_strides.n = args.where_strides.c = args.where_strides.k = 0
    args.log = log
    cdef void* po = cnp.PyArray_DATA(out)
    cdef const void* pg = cnp.PyArray_DATA(g)
    cdef const void* py = cnp.PyArray_DATA(a)
    with nogil:
        call_softmax_backward(type_num, po, pg, py, NULL, &args)
    return out


def softmax_backward(cnp.ndarray dx, cnp.ndarray dy, cnp.ndarray y, object where, bint log):
    """The gradient of softmax (log=True: log_softmax) along axis 1 of (N, C, K)
    arrays: dx from dy (the gradient of the output) and y (the forward's
    output). where as for softmax. dx, dy and y need unit stride along K, and
    along C too when K == 1; dx may be dy itself, and must not overlap y."""
    cdef int type_num = cnp.PyArray_TYPE(y)
    check_float_operand(y, 3, type_num, "softmax_backward output", False)
    if not is_native_float(y):
        raise TypeError(f"softmax_backward output: expected native float32 or float64, got {y.dtype}")
    check_float_operand(dy, 3, type_num, "softmax_backward grad", False)
    check_float_operand(dx, 3, type_num, "softmax_backward grad_input", True)
    cdef int d
    for d in range(3):
        if dy.shape[d] != y.shape[d] or dx.shape[d] != y.shape[d]:
            raise ValueError(f"softmax_backward: shapes differ: grad {shape_of(dy)}, output {shape_of(y)}, "
                             f"grad_input {shape_of(dx)}")
    cdef attnkit_softmax_backward_args args
    args.N = y.shape[0]
    args.C = y.shape[1]
    args.K = y.shape[2]
    args.log = log
    if args.N == 0 or args.C == 0 or args.K == 0:
        return dx
    set_strides(&args.dx_strides, dx, "softmax_backward grad_input")
    set_strides(&args.dy_strides, dy, "softmax_backward grad")
    set_strides(&args.y_strides, y, "softmax_backward output")
    if args.K > 1 and (args.dx_strides.k != 1 or args.dy_strides.k != 1 or args.y_strides.k != 1):
        raise ValueError("softmax_backward: the inner axis must be contiguous")
    if args.K == 1 and args.C > 1 and (args.dx_strides.c != 1 or args.dy_strides.c != 1
                                       or args.y_strides.c != 1):
        raise ValueError("softmax_backward: rows must be contiguous")
    args.dx_strides.k = args.dy_strides.k = args.y_strides.k = 1
    if args.K == 1:
        args.dx_strides.c = args.dy_strides.c = args.y_strides.c = 1
    cdef const uint8_t* pw = where_mask(where, y, &args.where_strides, "softmax_backward", "output shape")
    cdef void* pdx = cnp.PyArray_DATA(dx)
    cdef const void* pdy = cnp.PyArray_DATA(dy)
    cdef const void* py = cnp.PyArray_DATA(y)
    with nogil:
        call_softmax_backward(type_num, pdx, pdy, py, pw, &args)
    return dx


# ---------------------------------------------------------------------------
# Norms

cdef inline bint is_plain_vector(object v, int type_num, int64_t length) noexcept:
    """v is None, or a contiguous aligned 1-D ndarray of type_num and length."""
    if v is None:
        return True
    if type(v) is not cnp.ndarray:
        return False
    cdef cnp.ndarray a = <cnp.ndarray>v
    return (cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIM(a, 0) == length
            and cnp.PyArray_TYPE(a) == type_num and cnp.PyArray_ISNOTSWAPPED(a)
            and cnp.PyArray_CHKFLAGS(a, cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED))


cdef inline const void* vector_data(object v) noexcept:
    return NULL if v is None else cnp.PyArray_DATA(<cnp.ndarray>v)


def norm_last_axis(object x, object normalized_shape, object weight, object bias,
                   double eps, bint rms):
    """layer_norm (rms=False) or rms_norm (rms=True, bias ignored) over the last
    axis of x, into a new array, for the common case only: x a C-contiguous,
    aligned, native float32/float64 ndarray whose last axis is
    normalized_shape (an int or a 1-tuple), weight and bias None or
    contiguous vectors of x's dtype, eps finite and >= 0. Returns None for
    anything else; the caller then takes the general path, which explains
    what is wrong."""
    cdef cnp.ndarray a = plain_float_array(x)
    if a is None or not (eps >= 0 and eps <= 1.7976931348623157e308):
        return None
    cdef int ndim = cnp.PyArray_NDIM(a)
    cdef int64_t C = cnp.PyArray_DIM(a, ndim - 1)
    if type(normalized_shape) is tuple and len(<tuple>normalized_shape) == 1:
        normalized_shape = (<tuple>normalized_shape)[0]
    if type(normalized_shape) is not int or normalized_shape != C or C == 0:
        return None
    cdef int type_num = cnp.PyArray_TYPE(a)
    if not (is_plain_vector(weight, type_num, C) and is_plain_vector(bias, type_num, C)):
        return None
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(ndim, cnp.PyArray_DIMS(a), type_num, 0)
    cdef int64_t N = cnp.PyArray_SIZE(a) // C
    cdef void* po = cnp.PyArray_DATA(out)
    cdef const void* px = cnp.PyArray_DATA(a)
    cdef const void* pw = vector_data(weight)
    cdef const void* pb = vector_data(bias)
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            if rms:
                attnkit_rms_norm_f32(<float*>po, NULL, <const float*>px, <const float*>pw,
                                     N, C, C, C, eps)
            else:
                attnkit_layer_norm_f32(<float*>po, NULL, NULL, <const float*>px, <const float*>pw,
                                       <const float*>pb, N, C, C, C, eps)
        else:
            if rms:
                attnkit_rms_norm_f64(<double*>po, NULL, <const double*>px, <const double*>pw,
                                     N, C, C, C, eps)
            else:
                attnkit_layer_norm_f64(<double*>po, NULL, NULL, <const double*>px,
                                       <const double*>pw, <const double*>pb, N, C, C, C, eps)
    return out


cdef int check_norm_operands(cnp.ndarray out, cnp.ndarray x, str name) except -1:
    """x (N, C) and out (N, C): native floats of one dtype, rows contiguous;
    returns the dtype's type number."""
    cdef int type_num = cnp.PyArray_TYPE(x)
    check_float_operand(x, 2, type_num, f"{name} input", False)
    if not is_native_float(x):
        raise TypeError(f"{name} input: expected native float32 or float64, got {x.dtype}")
    check_float_operand(out, 2, type_num, f"{name} output", True)
    check_rows(x, x, f"{name} input")
    check_rows(out, x, f"{name} output")
    return type_num


def layer_norm(cnp.ndarray out, object mean, object rstd, cnp.ndarray x,
               object weight, object bias, double eps):
    """Layer norm of each row of x (N, C) into out (N, C).

    mean and rstd, if not None, are float vectors (N) that receive each row's
    mean and 1/sqrt(var + eps). weight and bias are vectors (C) or None.
    """
    cdef int type_num = check_norm_operands(out, x, "layer_norm")
    cdef int64_t N = x.shape[0], C = x.shape[1]
    cdef void* pm = optional_vector(mean, N, type_num, "layer_norm mean", True)
    cdef void* pr = optional_vector(rstd, N, type_num, "layer_norm rstd", True)
    cdef const void* pw = optional_vector(weight, C, type_num, "layer_norm weight", False)
    cdef const void* pb = optional_vector(bias, C, type_num, "layer_norm bias", False)
    if N == 0 or C == 0:
        return out
    cdef int64_t os = element_stride(out, 0, "layer_norm output")
    cdef int64_t xs = element_stride(x, 0, "layer_norm input")
    cdef void* po = cnp.PyArray_DATA(out)
    cdef const void* px = cnp.PyArray_DATA(x)
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            attnkit_layer_norm_f32(<float*>po, <float*>pm, <float*>pr, <const float*>px,
                                   <const float*>pw, <const float*>pb, N, C, os, xs, eps)
        else:
            attnkit_layer_norm_f64(<double*>po, <double*>pm, <double*>pr, <const double*>px,
                                   <const double*>pw, <const double*>pb, N, C, os, xs, eps)
    return out


def rms_norm(cnp.ndarray out, object rrms, cnp.ndarray x, object weight, double eps):
    """RMS norm of each row of x (N, C) into out (N, C).

    rrms, if not None, is a float vector (N) that receives 1/sqrt(mean(x^2) + eps).
    """
    cdef int type_num = check_norm_operands(out, x, "rms_norm")
    cdef int64_t N = x.shape[0], C = x.shape[1]
    cdef void* pr = optional_vector(rrms, N, type_num, "rms_norm rrms", True)
    cdef const void* pw = optional_vector(weight, C, type_num, "rms_norm weight", False)
    if N == 0 or C == 0:
        return out
    cdef int64_t os = element_stride(out, 0, "rms_norm output")
    cdef int64_t xs = element_stride(x, 0, "rms_norm input")
    cdef void* po = cnp.PyArray_DATA(out)
    cdef const void* px = cnp.PyArray_DATA(x)
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            attnkit_rms_norm_f32(<float*>po, <float*>pr, <const float*>px, <const float*>pw,
                                 N, C, os, xs, eps)
        else:
            attnkit_rms_norm_f64(<double*>po, <double*>pr, <const double*>px, <const double*>pw,
                                 N, C, os, xs, eps)
    return out


cdef inline bint is_stats_vector(object v, cnp.ndarray x) noexcept:
    """v a C-contiguous aligned ndarray of x's dtype shaped x.shape[:-1] + (1,)
    or x.shape[:-1], as the forwards' return_stats give them."""
    if type(v) is not cnp.ndarray:
        return False
    cdef cnp.ndarray a = <cnp.ndarray>v
    cdef int nd = cnp.PyArray_NDIM(a), ndim = cnp.PyArray_NDIM(x), d
    if not (cnp.PyArray_TYPE(a) == cnp.PyArray_TYPE(x) and cnp.PyArray_ISNOTSWAPPED(a)
            and cnp.PyArray_CHKFLAGS(a, cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED)):
        return False
    if not (nd == ndim and cnp.PyArray_DIM(a, nd - 1) == 1 or nd == ndim - 1):
        return False
    for d in range(ndim - 1):
        if cnp.PyArray_DIM(a, d) != cnp.PyArray_DIM(x, d):
            return False
    return True


cdef int call_norm_backward(int type_num, void* pdx, void* pdw, void* pdb, const void* pdy,
                            const void* pm, const void* pr, const void* px, const void* pw, int64_t N,
                            int64_t C, int64_t dx_row, int64_t dy_row, int64_t x_row) noexcept nogil:
    """The layer norm backward (pm, the mean, not NULL) or the RMS norm one (pm
    NULL, pdb NULL) in x's precision."""
    if type_num == cnp.NPY_FLOAT:
        if pm == NULL:
            return attnkit_rms_norm_backward_f32(<float*>pdx, <float*>pdw, <const float*>pdy,
                                                 <const float*>pr, <const float*>px, <const float*>pw,
                                                 N, C, dx_row, dy_row, x_row)
        return attnkit_layer_norm_backward_f32(<float*>pdx, <float*>pdw, <float*>pdb, <const float*>pdy,
                                               <const float*>pm, <const float*>pr, <const float*>px,
                                               <const float*>pw, N, C, dx_row, dy_row, x_row)
    if pm == NULL:
        return attnkit_rms_norm_backward_f64(<double*>pdx, <double*>pdw, <const double*>pdy,
                                             <const double*>pr, <const double*>px, <const double*>pw,
                                             N, C, dx_row, dy_row, x_row)
    return attnkit_layer_norm_backward_f64(<double*>pdx, <double*>pdw, <double*>pdb, <const double*>pdy,
                                           <const double*>pm, <const double*>pr, <const double*>px,
                                           <const double*>pw, N, C, dx_row, dy_row, x_row)


def norm_backward_last_axis(object grad, object x, object mean, object rstd,
                            object normalized_shape, object weight):
    """layer_norm_backward (mean not None) or rms_norm_backward (mean None)
    over the last axis, for the common case only (as norm_last_axis): x and
    grad plain arrays of one shape and dtype, normalized_shape x's last
    dimension (an int or a 1-tuple), mean and rstd contiguous, shaped as the
    forward returns them; weight None or a contiguous vector. Returns (dx,
    dweight, dbias) or (dx, dweight), or None for the general path."""
    cdef cnp.ndarray a = plain_float_array(x)
    cdef cnp.ndarray g = plain_float_array(grad)
    if a is None or g is None or not same_shape_and_type(a, g):
        return None
    cdef int ndim = cnp.PyArray_NDIM(a)
    cdef int type_num = cnp.PyArray_TYPE(a)
    cdef int64_t C = cnp.PyArray_DIM(a, ndim - 1)
    if type(normalized_shape) is tuple and len(<tuple>normalized_shape) == 1:
        normalized_shape = (<tuple>normalized_shape)[0]
    if type(normalized_shape) is not int or normalized_shape != C or C == 0:
        return None
    cdef int64_t N = cnp.PyArray_SIZE(a) // C
    cdef bint rms = mean is None
    if not (is_stats_vector(rstd, a) and (rms or is_stats_vector(mean, a))
            and is_plain_vector(weight, type_num, C)):
        return None
    cdef cnp.npy_intp length = C
    cdef cnp.ndarray dx = cnp.PyArray_EMPTY(ndim, cnp.PyArray_DIMS(a), type_num, 0)
    cdef cnp.ndarray dw = cnp.PyArray_ZEROS(1, &length, type_num, 0)
    cdef cnp.ndarray db = None if rms else cnp.PyArray_ZEROS(1, &length, type_num, 0)
    cdef void* pdx = cnp.PyArray_DATA(dx)
    cdef void* pdw = cnp.PyArray_DATA(dw)
    cdef void* pdb = NULL if rms else cnp.PyArray_DATA(db)
    cdef const void* pg = cnp.PyArray_DATA(g)
    cdef const void* px = cnp.PyArray_DATA(a)
    cdef const void* pm = NULL if rms else cnp.PyArray_DATA(<cnp.ndarray>mean)
    cdef const void* pr = cnp.PyArray_DATA(<cnp.ndarray>rstd)
    cdef const void* pw = vector_data(weight)
    cdef int status
    with nogil:
        status = call_norm_backward(type_num, pdx, pdw, pdb, pg, pm, pr, px, pw, N, C, C, C, C)
    if status != 0:
        raise MemoryError(f"norm backward: could not allocate the workspace for {C} columns")
    return (dx, dw) if rms else (dx, dw, db)


def norm_backward(cnp.ndarray dx, object dweight, object dbias, cnp.ndarray dy, object mean,
                  cnp.ndarray rstd, cnp.ndarray x, object weight):
    """The gradients of layer norm (mean an array) or RMS norm (mean None: rstd
    is then rrms, and dbias must be None) over the rows of x (N, C), from dy
    (N, C): dx (N, C) written; dweight, dbias (C) or None accumulated (+=).
    mean, rstd (N) and weight (C) or None are contiguous vectors; the rows of
    dx, dy and x are contiguous, and dx overlaps none of the others."""
    cdef bint rms = mean is None
    name = "rms_norm_backward" if rms else "layer_norm_backward"
    cdef int type_num = cnp.PyArray_TYPE(x)
    check_float_operand(x, 2, type_num, f"{name} input", False)
    if not is_native_float(x):
        raise TypeError(f"{name} input: expected native float32 or float64, got {x.dtype}")
    check_float_operand(dy, 2, type_num, f"{name} grad", False)
    check_float_operand(dx, 2, type_num, f"{name} grad_input", True)
    check_rows(x, x, f"{name} input")
    check_rows(dy, x, f"{name} grad")
    check_rows(dx, x, f"{name} grad_input")
    cdef int64_t N = x.shape[0], C = x.shape[1]
    if rms and dbias is not None:
        raise ValueError("rms_norm_backward: RMS norm has no bias")
    cdef const void* pm = NULL if rms else optional_vector(mean, N, type_num, f"{name} mean", False)
    cdef const void* pr = optional_vector(rstd, N, type_num, f"{name} rstd", False)
    cdef const void* pw = optional_vector(weight, C, type_num, f"{name} weight", False)
    cdef void* pdw = optional_vector(dweight, C, type_num, f"{name} grad_weight", True)
    cdef void* pdb = optional_vector(dbias, C, type_num, f"{name} grad_bias", True)
    if N == 0 or C == 0:
        return dx
    cdef int64_t xs = element_stride(x, 0, f"{name} input")
    cdef int64_t ds = element_stride(dy, 0, f"{name} grad")
    cdef int64_t os = element_stride(dx, 0, f"{name} grad_input")
    cdef void* pdx = cnp.PyArray_DATA(dx)
    cdef const void* pdy = cnp.PyArray_DATA(dy)
    cdef const void* px = cnp.PyArray_DATA(x)
    cdef int status
    with nogil:
        status = call_norm_backward(type_num, pdx, pdw, pdb, pdy, pm, pr, px, pw, N, C, os, ds, xs)
    if status != 0:
        raise MemoryError(f"{name}: could not allocate the workspace for {C} columns")
    return dx


# ---------------------------------------------------------------------------
# Activations

ACTIVATIONS = {"gelu": ATTNKIT_GELU_ERF, "gelu_tanh": ATTNKIT_GELU_TANH, "silu": ATTNKIT_SILU,
               "relu": ATTNKIT_RELU, "identity": ATTNKIT_IDENTITY}


def bias_activation(cnp.ndarray out, cnp.ndarray x, object bias, str name):
    """out = f(x + bias) elementwise, f one of ACTIVATIONS, bias (x's last
    dimension) broadcast over x's rows, or None; x and out C-contiguous, of
    one shape and float dtype (out may be x)."""
    cdef int kind = ACTIVATIONS[name]
    cdef int type_num = cnp.PyArray_TYPE(x)
    if not is_native_float(x) or cnp.PyArray_TYPE(out) != type_num or not cnp.PyArray_ISNOTSWAPPED(out):
        raise TypeError(f"{name}: expected native float32 or float64 arrays, got {x.dtype}, {out.dtype}")
    if (<object>out).shape != (<object>x).shape:
        raise ValueError(f"{name}: output shape {shape_of(out)} differs from input {shape_of(x)}")
    for arr in (x, out):
        if not cnp.PyArray_CHKFLAGS(arr, cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED):
            raise ValueError(f"{name}: arrays must be C-contiguous and aligned")
    if not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError(f"{name}: output is read-only")
    cdef int64_t n = cnp.PyArray_SIZE(x)
    cdef int64_t cols = cnp.PyArray_DIM(x, cnp.PyArray_NDIM(x) - 1) if cnp.PyArray_NDIM(x) > 0 else 1
    cdef int64_t rows = n // cols if cols > 0 else 0
    cdef const void* pb = NULL
    if bias is not None:
        pb = optional_vector(bias, cols, type_num, f"{name} bias", False)
    cdef void* po = cnp.PyArray_DATA(out)
    cdef const void* px = cnp.PyArray_DATA(x)
    if n == 0:
        return out
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            attnkit_bias_activation_f32(<float*>po, <const float*>px, <const float*>pb, rows, cols, kind)
        else:
            attnkit_bias_activation_f64(<double*>po, <const double*>px, <const double*>pb, rows, cols,
                                        kind)
    return out


def dropout(cnp.ndarray out, cnp.ndarray x, double p, uint32_t seed):
    """out = x / (1 - p) where the hash of (seed, element) keeps it, else 0;
    x and out C-contiguous, aligned, of one shape and float dtype (out may be x)."""
    cdef int type_num = cnp.PyArray_TYPE(x)
    if not is_native_float(x) or cnp.PyArray_TYPE(out) != type_num or not cnp.PyArray_ISNOTSWAPPED(out):
        raise TypeError(f"dropout: expected native float32 or float64 arrays, got {x.dtype}, {out.dtype}")
    if (<object>out).shape != (<object>x).shape:
        raise ValueError(f"dropout: output shape {shape_of(out)} differs from input {shape_of(x)}")
    for arr in (x, out):
        if not cnp.PyArray_CHKFLAGS(arr, cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED):
            raise ValueError("dropout: arrays must be C-contiguous and aligned")
    if not cnp.PyArray_ISWRITEABLE(out):
        raise ValueError("dropout: output is read-only")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    cdef int64_t n = cnp.PyArray_SIZE(x)
    cdef void* po = cnp.PyArray_DATA(out)
    cdef const void* px = cnp.PyArray_DATA(x)
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            attnkit_dropout_f32(<float*>po, <const float*>px, n, p, seed)
        else:
            attnkit_dropout_f64(<double*>po, <const double*>px, n, p, seed)
    return out


def bias_activation_backward(cnp.ndarray dx, object dbias, cnp.ndarray dy, cnp.ndarray x,
                             object bias, str name):
    """dx = dy * f'(x + bias) elementwise, f one of ACTIVATIONS, and dbias (x's
    last dimension, or None) += the sum of dx over rows. dx, dy and x are
    C-contiguous, of one shape and float dtype (dx may be dy); bias None or
    a contiguous vector."""
    cdef int kind = ACTIVATIONS[name]
    cdef int type_num = cnp.PyArray_TYPE(x)
    if not is_native_float(x):
        raise TypeError(f"{name}_backward: expected native float32 or float64, got {x.dtype}")
    for what, arr in (("grad", dy), ("grad_input", dx)):
        if cnp.PyArray_TYPE(arr) != type_num or not cnp.PyArray_ISNOTSWAPPED(arr):
            raise TypeError(f"{name}_backward {what}: expected {x.dtype}, got {arr.dtype}")
        if (<object>arr).shape != (<object>x).shape:
            raise ValueError(f"{name}_backward: {what} shape {shape_of(arr)} differs from input {shape_of(x)}")
    for arr in (x, dy, dx):
        if not cnp.PyArray_CHKFLAGS(arr, cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED):
            raise ValueError(f"{name}_backward: arrays must be C-contiguous and aligned")
    if not cnp.PyArray_ISWRITEABLE(dx):
        raise ValueError(f"{name}_backward: grad_input is read-only")
    cdef int64_t n = cnp.PyArray_SIZE(x)
    cdef int64_t cols = cnp.PyArray_DIM(x, cnp.PyArray_NDIM(x) - 1) if cnp.PyArray_NDIM(x) > 0 else 1
    cdef int64_t rows = n // cols if cols > 0 else 0
    cdef const void* pb = optional_vector(bias, cols, type_num, f"{name}_backward bias", False)
    cdef void* pdb = optional_vector(dbias, cols, type_num, f"{name}_backward grad_bias", True)
    if n == 0:
        return dx
    cdef void* pdx = cnp.PyArray_DATA(dx)
    cdef const void* pdy = cnp.PyArray_DATA(dy)
    cdef const void* px = cnp.PyArray_DATA(x)
    cdef int status
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            status = attnkit_bias_activation_backward_f32(<float*>pdx, <float*>pdb, <const float*>pdy,
                                                          <const float*>px, <const float*>pb, rows,
                                                          cols, kind)
        else:
            status = attnkit_bias_activation_backward_f64(<double*>pdx, <double*>pdb,
                                                          <const double*>pdy, <const double*>px,
                                                          <const double*>pb, rows, cols, kind)
    if status != 0:
        raise MemoryError(f"{name}_backward: could not allocate the workspace for {cols} columns")
    return dx


# ---------------------------------------------------------------------------
# Linear

cdef bint weight_layout(cnp.ndarray w, int64_t* w_n, int64_t* w_k) except -1:
    """w (N, K)'s element (n, k) is at n*w_n + k*w_k elements: rows along K
    (w_k = 1, w_n >= K, PyTorch's layout) or stored transposed (w_n = 1,
    w_k >= N). Returns False for any other layout."""
    cdef int64_t N = w.shape[0], K = w.shape[1]
    cdef int64_t size = cnp.PyArray_ITEMSIZE(w)
    cdef int64_t s0 = cnp.PyArray_STRIDE(w, 0), s1 = cnp.PyArray_STRIDE(w, 1)
    if N == 0 or K == 0:           # nothing is read
        w_n[0], w_k[0] = max(K, 1), 1
        return True
    if s0 % size or s1 % size:
        return False
    s0 //= size
    s1 //= size
    if K <= 1:
        s1 = 1                     # a stride along an axis of one element is never used
    if N <= 1:
        s0 = max(K, 1)
    if s1 == 1 and s0 >= K:
        w_n[0], w_k[0] = s0, 1
        return True
    if s0 == 1 and s1 >= N:
        w_n[0], w_k[0] = 1, s1
        return True
    return False


def has_weight_layout(cnp.ndarray w):
    """Whether the linear kernels read w (N, K) in place: rows along K, or
    stored transposed (w.T's rows contiguous)."""
    cdef int64_t w_n, w_k
    return cnp.PyArray_NDIM(w) == 2 and cnp.PyArray_ISALIGNED(w) and weight_layout(w, &w_n, &w_k)


cdef check_weight(cnp.ndarray w, int type_num, str what, bint writable, int64_t* w_n, int64_t* w_k):
    check_float_operand(w, 2, type_num, what, writable)
    if not weight_layout(w, w_n, w_k):
        raise ValueError(f"{what}: neither its rows nor its columns are contiguous "
                         f"(shape {shape_of(w)}, strides {(<object>w).strides})")


cdef int64_t rows_stride(cnp.ndarray x, str what) except? -1:
    """The element stride between x (M, K)'s rows, whose elements must be
    contiguous. -1 is a stride like any other (an (M, 1) array read
    backwards), hence `except? -1`: Cython then checks for a raised error."""
    cdef int64_t M = x.shape[0], K = x.shape[1]
    if K > 1 and M > 0 and cnp.PyArray_STRIDE(x, 1) != cnp.PyArray_ITEMSIZE(x):
        raise ValueError(f"{what}: the rows must be contiguous (strides {(<object>x).strides})")
    return element_stride(x, 0, what) if M > 1 else K


def linear(cnp.ndarray out, cnp.ndarray x, cnp.ndarray w, object bias, str name, object residual=None):
    """out (M, N) = f(x (M, K) @ w (N, K).T + bias (N)) + residual (M, N), f
    one of ACTIVATIONS; bias and residual may be None. x's rows may be apart
    but each is contiguous; w's rows or its columns are contiguous
    (has_weight_layout); out and residual are C-contiguous; out is a fresh
    array (it may not overlap x, w, bias or residual)."""
    cdef int kind = ACTIVATIONS[name]
    cdef int type_num = cnp.PyArray_TYPE(x)
    check_float_operand(x, 2, type_num, "linear input", False)
    if not is_native_float(x):
        raise TypeError(f"linear input: expected native float32 or float64, got {x.dtype}")
    cdef int64_t w_n, w_k
    check_weight(w, type_num, "linear weight", False, &w_n, &w_k)
    check_float_operand(out, 2, type_num, "linear output", True)
    cdef int64_t M = x.shape[0], K = x.shape[1], N = w.shape[0]
    if w.shape[1] != K or out.shape[0] != M or out.shape[1] != N:
        raise ValueError(f"linear: shapes do not fit: input {shape_of(x)}, weight {shape_of(w)}, "
                         f"output {shape_of(out)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(out):
        raise ValueError("linear: the output must be C-contiguous")
    cdef int64_t x_row = rows_stride(x, "linear input")
    cdef const void* pb = optional_vector(bias, N, type_num, "linear bias", False)
    cdef const void* pr = optional_matrix(residual, M, N, type_num, "linear residual", False)
    if M == 0 or N == 0:
        return out
    cdef void* po = cnp.PyArray_DATA(out)
    cdef const void* px = cnp.PyArray_DATA(x)
    cdef const void* pw = cnp.PyArray_DATA(w)
    cdef int status
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            status = attnkit_linear_f32(<float*>po, <const float*>px, <const float*>pw,
                                        <const float*>pb, <const float*>pr, M, N, K, x_row, w_n, w_k,
                                        kind)
        else:
            status = attnkit_linear_f64(<double*>po, <const double*>px, <const double*>pw,
                                        <const double*>pb, <const double*>pr, M, N, K, x_row, w_n,
                                        w_k, kind)
    if status != 0:
        raise MemoryError(f"linear: could not allocate the workspace for in_features = {K}")
    return out


def linear_backward(object dx, object dw, object dbias, cnp.ndarray dy, cnp.ndarray x, cnp.ndarray w):
    """The gradients of out = x @ w.T + bias, given dy = dLoss/dout (M, N):
    dx (M, K) = dy @ w (overwritten); dw (N, K) += dy.T @ x and dbias (N) +=
    dy's column sums (accumulated). Any of dx, dw, dbias may be None. dy and
    dx are C-contiguous, x's rows contiguous, w and dw in has_weight_layout's
    layouts; the outputs may not overlap each other or the inputs."""
    cdef int type_num = cnp.PyArray_TYPE(dy)
    check_float_operand(dy, 2, type_num, "linear_backward grad_output", False)
    if not is_native_float(dy):
        raise TypeError(f"linear_backward grad_output: expected native float32 or float64, got {dy.dtype}")
    check_float_operand(x, 2, type_num, "linear_backward input", False)
    cdef int64_t w_n, w_k, dw_n = 0, dw_k = 0
    check_weight(w, type_num, "linear_backward weight", False, &w_n, &w_k)
    cdef int64_t M = dy.shape[0], N = dy.shape[1], K = w.shape[1]
    if x.shape[0] != M or x.shape[1] != K or w.shape[0] != N:
        raise ValueError(f"linear_backward: shapes do not fit: grad_output {shape_of(dy)}, "
                         f"input {shape_of(x)}, weight {shape_of(w)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(dy):
        raise ValueError("linear_backward: grad_output must be C-contiguous")
    cdef int64_t x_row = rows_stride(x, "linear_backward input")
    cdef cnp.ndarray a
    cdef void* pdx = optional_matrix(dx, M, K, type_num, "linear_backward grad_input", True)
    cdef void* pdw = NULL
    if dw is not None:
        a = <cnp.ndarray?>dw
        check_weight(a, type_num, "linear_backward grad_weight", True, &dw_n, &dw_k)
        if a.shape[0] != N or a.shape[1] != K:
            raise ValueError(f"linear_backward grad_weight: expected ({N}, {K}), got {shape_of(a)}")
        pdw = cnp.PyArray_DATA(a)
    cdef void* pdb = optional_vector(dbias, N, type_num, "linear_backward grad_bias", True)
    if M == 0 or N == 0 or K == 0 and dbias is None:
        if dx is not None and K > 0:
            (<cnp.ndarray>dx).fill(0)
        return
    cdef const void* pdy = cnp.PyArray_DATA(dy)
    cdef const void* px = cnp.PyArray_DATA(x)
    cdef const void* pw = cnp.PyArray_DATA(w)
    cdef int status
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            status = attnkit_linear_backward_f32(<float*>pdx, <float*>pdw, <float*>pdb, <const float*>pdy,
                                                 <const float*>px, <const float*>pw, M, N, K, x_row,
                                                 w_n, w_k, dw_n, dw_k)
        else:
            status = attnkit_linear_backward_f64(<double*>pdx, <double*>pdw, <double*>pdb,
                                                 <const double*>pdy, <const double*>px,
                                                 <const double*>pw, M, N, K, x_row, w_n, w_k,
                                                 dw_n, dw_k)
    if status != 0:
        raise MemoryError(f"linear_backward: could not allocate the workspace")


# ---------------------------------------------------------------------------
# Attention

cdef int batch_offsets(int64_t* offsets, cnp.ndarray a, int nbatch, str what) except -1:
    """offsets[b] = the element offset of batch index b (row-major over a's
    first nbatch dimensions, which may have any strides, 0 included)."""
    cdef int64_t itemsize = cnp.PyArray_ITEMSIZE(a)
    cdef int64_t B = 1, b, rest, offset, d_size
    cdef int d
    for d in range(nbatch):
        B *= cnp.PyArray_DIM(a, d)
    for b in range(B):
        rest = b
        offset = 0
        for d in range(nbatch - 1, -1, -1):
            d_size = cnp.PyArray_DIM(a, d)
            offset += (rest % d_size) * element_stride(a, d, what)
            rest //= d_size
        offsets[b] = offset
    return 0


cdef object attention_layout(attnkit_attention_args* a, cnp.ndarray q, cnp.ndarray k, cnp.ndarray v,
                             object mask, double scale, bint causal, int64_t causal_offset,
                             double dropout_p, uint32_t dropout_seed, str func):
    """Checks q (*batch, H, L, E), k (*batch, Hkv, S, E), v (*batch, Hkv, S, Ev)
    and the mask (None or (*batch, H, L, S), bool or q's dtype, any strides:
    0 for broadcast dimensions; along S 0 or 1 element), and fills every field
    of a but B and the batch offsets. Returns the batch count (a Python int:
    broadcast views can have more entries than an int64_t counts)."""
    cdef int type_num = cnp.PyArray_TYPE(q)
    cdef int nd = cnp.PyArray_NDIM(q), nbatch = nd - 3, d
    if nd < 3:
        raise ValueError(f"{func}: query needs 3 or more dimensions, got shape {shape_of(q)}")
    for name, arr in (("query", q), ("key", k), ("value", v)):
        check_float_operand(arr, nd, type_num, f"{func} {name}", False)
    if not is_native_float(q):
        raise TypeError(f"{func}: expected native float32 or float64, got {q.dtype}")
    for d in range(nbatch):
        if not (k.shape[d] == v.shape[d] == q.shape[d]):
            raise ValueError(f"{func}: batch dimensions differ: "
                             f"{shape_of(q)}, {shape_of(k)}, {shape_of(v)}")
    a.H = q.shape[nd - 3]
    a.L = q.shape[nd - 2]
    a.E = q.shape[nd - 1]
    a.Hkv = k.shape[nd - 3]
    a.S = k.shape[nd - 2]
    a.Ev = v.shape[nd - 1]
    if k.shape[nd - 1] != a.E or v.shape[nd - 3] != a.Hkv or v.shape[nd - 2] != a.S:
        raise ValueError(f"{func}: shapes do not fit: query {shape_of(q)}, key {shape_of(k)}, "
                         f"value {shape_of(v)}")
    if (a.H % a.Hkv != 0) if a.Hkv else a.H != 0:
        raise ValueError(f"{func}: {a.H} query heads do not share {a.Hkv} key/value heads evenly")
    for name, arr, last in (("query", q, a.E), ("key", k, a.E), ("value", v, a.Ev)):
        if last > 1 and cnp.PyArray_SIZE(arr) > 0 and \
                cnp.PyArray_STRIDE(arr, nd - 1) != cnp.PyArray_ITEMSIZE(arr):
            raise ValueError(f"{func} {name}: the last axis must be contiguous "
                             f"(strides {(<object>arr).strides})")
    a.q_head = element_stride(q, nd - 3, f"{func} query")
    a.q_row = element_stride(q, nd - 2, f"{func} query")
    a.k_head = element_stride(k, nd - 3, f"{func} key")
    a.k_row = element_stride(k, nd - 2, f"{func} key")
    a.v_head = element_stride(v, nd - 3, f"{func} value")
    a.v_row = element_stride(v, nd - 2, f"{func} value")
    a.mask_kind = ATTNKIT_MASK_NONE
    a.mask_head = a.mask_row = a.mask_col = 0
    cdef cnp.ndarray m
    if mask is not None:
        m = <cnp.ndarray?>mask
        if cnp.PyArray_NDIM(m) != nd or m.shape[nd - 3] != a.H or m.shape[nd - 2] != a.L \
                or m.shape[nd - 1] != a.S or any(m.shape[d] != q.shape[d] for d in range(nbatch)):
            raise ValueError(f"{func}: mask {shape_of(m)} is not (..., {a.H}, {a.L}, {a.S})")
        if cnp.PyArray_TYPE(m) == cnp.NPY_BOOL:
            a.mask_kind = ATTNKIT_MASK_BOOL
        else:
            check_float_operand(m, nd, type_num, f"{func} mask", False)
            a.mask_kind = ATTNKIT_MASK_ADD
        a.mask_head = element_stride(m, nd - 3, f"{func} mask")
        a.mask_row = element_stride(m, nd - 2, f"{func} mask")
        a.mask_col = element_stride(m, nd - 1, f"{func} mask")
        if a.S > 1 and a.mask_col not in (0, 1):
            raise ValueError(f"{func}: the mask's last axis must be contiguous or broadcast "
                             f"(strides {(<object>m).strides})")
    if not (0 <= dropout_p <= 1):
        raise ValueError(f"{func}: dropout_p must be in [0, 1], got {dropout_p}")
    a.scale = scale
    a.causal = causal
    a.causal_offset = causal_offset
    a.dropout_p = dropout_p
    a.dropout_seed = dropout_seed
    a.weights_mean = NULL
    batch_count = 1
    for d in range(nbatch):
        batch_count *= q.shape[d]
    return batch_count


cdef int64_t* attention_offsets(attnkit_attention_args* a, cnp.ndarray q, cnp.ndarray k, cnp.ndarray v,
                                object mask, object batch_count, str func) except NULL:
    """The four (B) tables of batch offsets, in one allocation the caller frees;
    sets a.B and the table pointers."""
    # the outputs already hold batch_count rows, so this only fails on a view
    # whose batch count exceeds any allocation
    if batch_count > <object>PY_SSIZE_T_MAX // (4 * <object>sizeof(int64_t)):
        raise MemoryError(f"{func}: {batch_count} batch entries are more than can be addressed")
    cdef int64_t B = batch_count
    cdef int nbatch = cnp.PyArray_NDIM(q) - 3
    cdef int64_t* offsets = <int64_t*>malloc(<size_t>(4 * B + 1) * sizeof(int64_t))
    if offsets == NULL:
        raise MemoryError(f"{func}: could not allocate the batch offsets of {B} batch entries")
    try:
        batch_offsets(offsets, q, nbatch, f"{func} query")
        batch_offsets(offsets + B, k, nbatch, f"{func} key")
        batch_offsets(offsets + 2 * B, v, nbatch, f"{func} value")
        a.mask_batch = NULL
        if mask is not None:
            batch_offsets(offsets + 3 * B, <cnp.ndarray>mask, nbatch, f"{func} mask")
            a.mask_batch = offsets + 3 * B
    except BaseException:
        free(offsets)
        raise
    a.B = B
    a.q_batch = offsets
    a.k_batch = offsets + B
    a.v_batch = offsets + 2 * B
    return offsets


cdef check_contiguous_like(object arr, int nd, int type_num, tuple lead, tuple last, str what,
                           bint writable):
    """arr is a C-contiguous array of q's dtype shaped lead + last."""
    cdef cnp.ndarray a = <cnp.ndarray?>arr
    check_float_operand(a, nd, type_num, what, writable)
    if (<object>a).shape != lead + last or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{what}: {shape_of(a)} is not a contiguous {lead + last} array")


def attention(cnp.ndarray out, object lse, object weights, cnp.ndarray q, cnp.ndarray k,
              cnp.ndarray v, object mask, double scale, bint causal, int64_t causal_offset,
              double dropout_p, uint32_t dropout_seed, object weights_mean=None):
    """Fused attention (attnkit.h) over arrays that share their batch dimensions
    (see attention_layout): out (*batch, H, L, Ev), lse None or (*batch, H, L),
    weights None or (*batch, H, L, S), all C-contiguous. weights_mean None or
    (*batch, L, S), C-contiguous: the weights averaged over heads (weights is
    then scratch)."""
    cdef attnkit_attention_args a
    batch_count = attention_layout(&a, q, k, v, mask, scale, causal, causal_offset, dropout_p,
                                   dropout_seed, "attention")
    cdef int type_num = cnp.PyArray_TYPE(q)
    cdef int nd = cnp.PyArray_NDIM(q)
    lead = (<object>q).shape[:nd - 3]
    check_contiguous_like(out, nd, type_num, lead, (a.H, a.L, a.Ev), "attention output", True)
    cdef void* plse = NULL
    cdef void* pweights = NULL
    if lse is not None:
        check_contiguous_like(lse, nd - 1, type_num, lead, (a.H, a.L), "attention lse", True)
        plse = cnp.PyArray_DATA(<cnp.ndarray>lse)
    if weights is not None:
        check_contiguous_like(weights, nd, type_num, lead, (a.H, a.L, a.S), "attention weights", True)
        pweights = cnp.PyArray_DATA(<cnp.ndarray>weights)
    if weights_mean is not None:
        if weights is None:
            raise ValueError("attention: weights_mean needs the weights array as scratch")
        check_contiguous_like(weights_mean, nd - 1, type_num, lead, (a.L, a.S),
                              "attention weights_mean", True)
        a.weights_mean = cnp.PyArray_DATA(<cnp.ndarray>weights_mean)
    # a call with no rows to compute returns before anything is sized by the
    # batch count: (2**59 + 1, 1, 0, 1) is a valid empty view
    if batch_count * a.H * a.L == 0 or (a.Ev == 0 and lse is None and weights is None):
        return out
    if a.E == 0:
        raise ValueError("attention: the kernel needs E >= 1 (the caller pads q and k with a zero column)")
    if a.Ev == 0:
        raise ValueError("attention: the kernel needs Ev >= 1 to compute lse or weights "
                         "(the caller pads v with a zero column)")
    cdef int64_t* offsets = attention_offsets(&a, q, k, v, mask, batch_count, "attention")
    cdef const void* pmask = NULL if mask is None else cnp.PyArray_DATA(<cnp.ndarray>mask)
    cdef void* pout = cnp.PyArray_DATA(out)
    cdef const void* pq = cnp.PyArray_DATA(q)
    cdef const void* pk = cnp.PyArray_DATA(k)
    cdef const void* pv = cnp.PyArray_DATA(v)
    cdef int status
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            status = attnkit_attention_f32(<float*>pout, <float*>plse, <float*>pweights, <const float*>pq,
                                           <const float*>pk, <const float*>pv, pmask, &a)
        else:
            status = attnkit_attention_f64(<double*>pout, <double*>plse, <double*>pweights,
                                           <const double*>pq, <const double*>pk, <const double*>pv,
                                           pmask, &a)
    free(offsets)
    if status != 0:
        raise MemoryError("attention: could not allocate the kernel's workspace")
    return out


def attention_backward(cnp.ndarray dq, cnp.ndarray dk, cnp.ndarray dv, cnp.ndarray dout,
                       cnp.ndarray out, cnp.ndarray lse, cnp.ndarray q, cnp.ndarray k, cnp.ndarray v,
                       object mask, double scale, bint causal, int64_t causal_offset,
                       double dropout_p, uint32_t dropout_seed):
    """The gradient of attention (attnkit.h): q, k, v and mask as for attention;
    dout and out (*batch, H, L, Ev), lse (*batch, H, L), and the gradients
    dq (*batch, H, L, E), dk (*batch, Hkv, S, E), dv (*batch, Hkv, S, Ev),
    all C-contiguous. E and Ev >= 1."""
    cdef attnkit_attention_args a
    batch_count = attention_layout(&a, q, k, v, mask, scale, causal, causal_offset, dropout_p,
                                   dropout_seed, "attention_backward")
    cdef int type_num = cnp.PyArray_TYPE(q)
    cdef int nd = cnp.PyArray_NDIM(q)
    lead = (<object>q).shape[:nd - 3]
    check_contiguous_like(dout, nd, type_num, lead, (a.H, a.L, a.Ev), "attention_backward grad_out", False)
    check_contiguous_like(out, nd, type_num, lead, (a.H, a.L, a.Ev), "attention_backward out", False)
    check_contiguous_like(lse, nd - 1, type_num, lead, (a.H, a.L), "attention_backward lse", False)
    check_contiguous_like(dq, nd, type_num, lead, (a.H, a.L, a.E), "attention_backward dq", True)
    check_contiguous_like(dk, nd, type_num, lead, (a.Hkv, a.S, a.E), "attention_backward dk", True)
    check_contiguous_like(dv, nd, type_num, lead, (a.Hkv, a.S, a.Ev), "attention_backward dv", True)
    if batch_count * a.Hkv == 0:
        return
    if a.E == 0 or a.Ev == 0:
        raise ValueError("attention_backward: the kernel needs E, Ev >= 1 (the caller handles empty heads)")
    cdef int64_t* offsets = attention_offsets(&a, q, k, v, mask, batch_count, "attention_backward")
    cdef const void* pmask = NULL if mask is None else cnp.PyArray_DATA(<cnp.ndarray>mask)
    cdef void* pdq = cnp.PyArray_DATA(dq)
    cdef void* pdk = cnp.PyArray_DATA(dk)
    cdef void* pdv = cnp.PyArray_DATA(dv)
    cdef const void* pdout = cnp.PyArray_DATA(dout)
    cdef const void* pout = cnp.PyArray_DATA(out)
    cdef const void* plse = cnp.PyArray_DATA(lse)
    cdef const void* pq = cnp.PyArray_DATA(q)
    cdef const void* pk = cnp.PyArray_DATA(k)
    cdef const void* pv = cnp.PyArray_DATA(v)
    cdef int status
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            status = attnkit_attention_backward_f32(
                <float*>pdq, <float*>pdk, <float*>pdv, <const float*>pdout, <const float*>pout,
                <const float*>plse, <const float*>pq, <const float*>pk, <const float*>pv, pmask, &a)
        else:
            status = attnkit_attention_backward_f64(
                <double*>pdq, <double*>pdk, <double*>pdv, <const double*>pdout, <const double*>pout,
                <const double*>plse, <const double*>pq, <const double*>pk, <const double*>pv, pmask, &a)
    free(offsets)
    if status != 0:
        raise MemoryError("attention_backward: could not allocate the kernel's workspace")


# ---------------------------------------------------------------------------
# Instruction sets, threads, build

# ---------------------------------------------------------------------------
# Optimisers

def adam_step(cnp.ndarray param, cnp.ndarray exp_avg, cnp.ndarray exp_avg_sq, object max_exp_avg_sq,
              cnp.ndarray grad, double lr, double beta1, double beta2, double eps,
              double weight_decay, double step_size, double bias_correction2_sqrt, bint decoupled):
    """Adam's (decoupled: AdamW's) update of param, the moments and
    max_exp_avg_sq (None without amsgrad) in place from grad: every array
    C-contiguous, aligned, of param's shape and float dtype."""
    cdef int type_num = cnp.PyArray_TYPE(param)
    cdef list arrays = [param, exp_avg, exp_avg_sq, grad]
    if max_exp_avg_sq is not None:
        if type(max_exp_avg_sq) is not cnp.ndarray:
            raise TypeError(f"adam_step: max_exp_avg_sq must be an ndarray or None")
        arrays.append(max_exp_avg_sq)
    cdef cnp.ndarray a
    for i, a in enumerate(arrays):
        if not is_native_float(a) or cnp.PyArray_TYPE(a) != type_num:
            raise TypeError(f"adam_step: expected native float32 or float64 arrays of one dtype, "
                            f"got {a.dtype} beside {param.dtype}")
        if (<object>a).shape != (<object>param).shape:
            raise ValueError(f"adam_step: shape {shape_of(a)} differs from the parameter's {shape_of(param)}")
        if not cnp.PyArray_CHKFLAGS(a, cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED):
            raise ValueError("adam_step: arrays must be C-contiguous and aligned")
        if i != 3 and not cnp.PyArray_ISWRITEABLE(a):
            raise ValueError("adam_step: the parameter and the moments must be writable")
    cdef attnkit_adam_args args
    args.lr, args.beta1, args.beta2, args.eps = lr, beta1, beta2, eps
    args.weight_decay, args.step_size = weight_decay, step_size
    args.bias_correction2_sqrt, args.decoupled = bias_correction2_sqrt, decoupled
    cdef void* p = cnp.PyArray_DATA(param)
    cdef void* m = cnp.PyArray_DATA(exp_avg)
    cdef void* v = cnp.PyArray_DATA(exp_avg_sq)
    cdef void* vmax = NULL if max_exp_avg_sq is None else cnp.PyArray_DATA(<cnp.ndarray>max_exp_avg_sq)
    cdef const void* g = cnp.PyArray_DATA(grad)
    cdef int64_t n = cnp.PyArray_SIZE(param)
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            attnkit_adam_step_f32(<float*>p, <float*>m, <float*>v, <float*>vmax, <const float*>g, n, &args)
        else:
            attnkit_adam_step_f64(<double*>p, <double*>m, <double*>v, <double*>vmax, <const double*>g,
                                  n, &args)


def isa_names():
    """Names of the compiled instruction-set paths, lowest first."""
    return [attnkit_isa_name(i).decode() for i in range(ATTNKIT_ISA_COUNT)]


def isa_supported(int isa):
    return bool(attnkit_isa_supported(isa))


def get_isa():
    return attnkit_get_isa()


def set_isa(int isa):
    if attnkit_set_isa(isa) != 0:
        raise ValueError(f"instruction set {attnkit_isa_name(isa).decode()!r} ({isa}) "
                         "is not supported by this CPU")


def set_num_threads(int n):
    attnkit_set_num_threads(n)


def get_num_threads():
    return attnkit_get_num_threads()


def in_forked_child():
    return bool(attnkit_in_forked_child())


def build_info():
    return {
        "compiler": attnkit_build_compiler().decode(),
        "flags": attnkit_build_flags(-1).decode(),
        "isa_flags": {attnkit_isa_name(i).decode(): attnkit_build_flags(i).decode()
                      for i in range(ATTNKIT_ISA_COUNT)},
        "sanitized": bool(attnkit_build_sanitized()),
        "avx512_emulated": bool(attnkit_build_emulated_avx512()),
    }
