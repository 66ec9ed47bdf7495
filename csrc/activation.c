/*
 * activation.c: a bias add and an elementwise activation in one pass,
 * out (rows, cols) = f(x (rows, cols) + bias (cols)), as a linear layer's
 * output needs. The contract is in attnkit.h; simd.h says which ISA and
 * precision.
 *
 *   identity       out = x + bias
 *   relu           out = max(x + bias, 0), NaN kept
 *   gelu (exact)   out = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))
 *   gelu (tanh)    out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
 *   silu           out = x * sigmoid(x) = x / (1 + exp(-x))
 *
 * The exact GELU is vectorised for float (through erfc, below) and uses the
 * C library's erf and erfc for double; tanh and
 * the sigmoid are written with exp of a non-positive argument, so nothing
 * overflows: tanh(|y|) = (1 - e) / (1 + e) and sigmoid(x) = 1 / (1 + e) for
 * x >= 0, e / (1 + e) for x < 0, with e = exp(-2|y|) or exp(-|x|).
 */
#include "attnkit.h"
#include "simd.h"
#include "tiles.h"

enum { CHUNK = 4096 }; /* elements a thread takes at a time */

/* independent vectors a run carries through each step together (see
 * gelu_erf_n); 8 made the exact GELU 1.5x faster than 1, 4 and 16 less */
enum { WAYS = 8 };

#if ATTNKIT_REAL_BITS == 32
/* The exact GELU, float. gelu(x) = x Phi(x): for x < 0 Phi(x) = Phi(-|x|)
 * directly (the tail keeps its relative precision), for x >= 0 1 - Phi(-|x|).
 *
 * Phi(-|x|) = erfc(z) / 2 for z = |x| / sqrt 2, as t exp(-z^2 + P(t)) / 2,
 * t = 1 / (1 + z/2), P the degree-9 polynomial of the Chebyshev-fitted
 * approximation in Press et al., Numerical Recipes (erfcc), whose relative
 * error against the C library's erfc over [0, 12] is at most 1.05e-7.
 * z^2 = x^2 / 2 is carried as two floats (x*x and its fma-exact error), and
 * the exponent's own rounding is put back as a factor (1 + err): exp(-z^2)
 * multiplies a rounding error of z^2 by z^2, 68 at z = 8, and the tail would
 * otherwise keep only four digits. The exponent is below 7e-4, inside
 * v_exp_nonpositive's range. |x| is first held to 16, where Phi(-|x|) is
 * already below the smallest float, so that x^2 cannot overflow (it made
 * gelu(1e20) NaN); v_min(16, NaN) is NaN, so NaN still passes through. */
#define EACH for (int k = 0; k < count; k++)

/* Phi(x) of count (<= WAYS) vectors x = v into cdf; gelu_erf_n below makes
 * the exact GELU of them, in place, x Phi(x). Its chain of
 * dependent operations is about 150 cycles long, longer than the core's
 * reorder window covers one vector after another: written as one loop per
 * step (each unrolled whole, count being a constant where it is inlined),
 * the steps of WAYS vectors interleave. */
AK_INLINE void normal_cdf_n(const vreal* v, vreal* cdf, int count)
{
    vreal x[WAYS], t[WAYS], p[WAYS], a[WAYS], b[WAYS], e[WAYS];
    EACH x[k] = v_min(v_set1(16.0f), v_abs(v[k]));
    EACH t[k] = v_div(v_set1(1), v_fma(v_mul(x[k], v_set1(0.70710678118654752f)), v_set1(0.5f), v_set1(1)));
    EACH p[k] = v_fma(v_set1(0.17087277f), t[k], v_set1(-0.82215223f));
    EACH p[k] = v_fma(p[k], t[k], v_set1(1.48851587f));
    EACH p[k] = v_fma(p[k], t[k], v_set1(-1.13520398f));
    EACH p[k] = v_fma(p[k], t[k], v_set1(0.27886807f));
    EACH p[k] = v_fma(p[k], t[k], v_set1(-0.18628806f));
    EACH p[k] = v_fma(p[k], t[k], v_set1(0.09678418f));
    EACH p[k] = v_fma(p[k], t[k], v_set1(0.37409196f));
    EACH p[k] = v_fma(p[k], t[k], v_set1(1.00002368f));
    EACH p[k] = v_fma(p[k], t[k], v_set1(-1.26551223f));
    EACH {
        const vreal sq = v_mul(x[k], x[k]), sq_err = v_fma(x[k], x[k], v_sub(v_set1(0), sq)); /* x^2 exactly */
        a[k] = v_mul(sq, v_set1(-0.5f));                                                    /* -z^2, head */
        b[k] = v_fma(sq_err, v_set1(-0.5f), p[k]);                                          /* small rest */
    }
    EACH {                                                            /* exp(a + b) (1 + TwoSum error) */
        const vreal arg = v_add(a[k], b[k]), bb = v_sub(arg, a[k]);
        const vreal err = v_add(v_sub(a[k], v_sub(arg, bb)), v_sub(b[k], bb));
        e[k] = v_exp_nonpositive(arg);
        e[k] = v_fma(e[k], err, e[k]);
    }
    EACH {                /* x < 0: Phi(-|x|), the tail keeping its relative precision; else 1 - tail */
        const vreal tail = v_mul(v_mul(t[k], v_set1(0.5f)), e[k]);
        cdf[k] = v_select(v_is_less(v[k], v_set1(0)), tail, v_sub(v_set1(1), tail));
    }
}

AK_INLINE void gelu_erf_n(vreal* v, int count)
{
    vreal cdf[WAYS];
    normal_cdf_n(v, cdf, count);
    EACH v[k] = v_mul(v[k], cdf[k]);
}

/* The exact GELU's derivative times g, float: v = g (Phi(x) + x phi(x)) of
 * count vectors x = v in place. phi(x) = exp(-x^2/2) / sqrt(2 pi) with x^2
 * carried as two floats, as in normal_cdf_n; x phi(x) is taken at |x| held
 * to 16, where it is already 0 in float, so that x = +-inf gives 1 and 0,
 * not inf * 0. */
AK_INLINE void gelu_erf_backward_n(vreal* v, const vreal* g, int count)
{
    vreal cdf[WAYS];
    normal_cdf_n(v, cdf, count);
    EACH {
        const vreal a = v_min(v_set1(16.0f), v_abs(v[k]));
        const vreal sq = v_mul(a, a), sq_err = v_fma(a, a, v_sub(v_set1(0), sq));
        vreal e = v_exp_nonpositive(v_mul(sq, v_set1(-0.5f)));
        e = v_fma(e, v_mul(sq_err, v_set1(-0.5f)), e);                /* exp(-(sq + sq_err)/2) */
        const vreal pdf = v_mul(e, v_set1(0.39894228040143267794f));
        const vreal x_pdf = v_mul(v_select(v_is_less(v[k], v_set1(0)), v_sub(v_set1(0), a), a), pdf);
        v[k] = v_mul(g[k], v_add(cdf[k], x_pdf));
    }
}
#undef EACH

#endif

AK_INLINE vreal v_tanh(vreal y)
{
    const vreal a = v_abs(y);
    const vreal e = v_exp_nonpositive(v_mul(a, v_set1(-2)));
    const vreal t = v_div(v_sub(v_set1(1), e), v_add(v_set1(1), e));
    return v_select(v_is_less(y, v_set1(0)), v_sub(v_set1(0), t), t);
}

AK_INLINE vreal v_gelu_tanh(vreal v)
{
    const vreal inner = v_mul(v_set1((real)0.79788456080286535588),
                              v_fma(v_mul(v_set1((real)0.044715), v), v_mul(v, v), v));
    return v_mul(v_mul(v_set1((real)0.5), v), v_add(v_set1(1), v_tanh(inner)));
}

AK_INLINE vreal v_silu(vreal v)
{
    const vreal one = v_set1(1);
    const vreal e = v_exp_nonpositive(v_sub(v_set1(0), v_abs(v)));
    return v_mul(v, v_div(v_select(v_is_less(v, v_set1(0)), e, one), v_add(one, e)));
}

AK_INLINE vreal v_identity(vreal v) { return v; }

/* max(x, 0) with v_max's NaN rule: 0 > NaN is false, so NaN stays NaN */
AK_INLINE vreal v_relu(vreal v) { return v_max(v_set1(0), v); }

/* f of count vectors in place, the shape gelu_erf_n has */
#define DEFINE_EACH(name_n, f)                                                                 \
    AK_INLINE void name_n(vreal* v, int count)                                                 \
    {                                                                                          \
        for (int k = 0; k < count; k++) v[k] = f(v[k]);                                        \
    }
DEFINE_EACH(gelu_tanh_n, v_gelu_tanh)
DEFINE_EACH(silu_n, v_silu)
DEFINE_EACH(relu_n, v_relu)
DEFINE_EACH(identity_n, v_identity)

/* A run of n elements that share one bias row: out (n) = f(x (n) + bias (n)),
 * bias NULL for none; f_n applies f to WAYS vectors (or 1, at the end).
 * Every vector of a step is loaded before any is stored, so out may be x. */
#define DEFINE_RUN(name, f_n)                                                                  \
    static void name(real* out, const real* x, const real* bias, int64_t n)                    \
    {                                                                                          \
        int64_t j = 0;                                                                         \
        for (; j + WAYS * VLEN <= n; j += WAYS * VLEN) {                                       \
            vreal v[WAYS];                                                                     \
            for (int k = 0; k < WAYS; k++) {                                                   \
                v[k] = v_load(x + j + k * VLEN);                                               \
                if (bias) v[k] = v_add(v[k], v_load(bias + j + k * VLEN));                     \
            }                                                                                  \
            f_n(v, WAYS);                                                                      \
            for (int k = 0; k < WAYS; k++) v_store(out + j + k * VLEN, v[k]);                  \
        }                                                                                      \
        for (; j < n; j += VLEN) {                                                             \
            const int64_t m = min_i64(VLEN, n - j);                                            \
            vreal v = m == VLEN ? v_load(x + j) : v_load_part(x + j, m, 0);                    \
            if (bias) v = v_add(v, m == VLEN ? v_load(bias + j) : v_load_part(bias + j, m, 0)); \
            f_n(&v, 1);                                                                        \
            if (m == VLEN) v_store(out + j, v);                                                \
            else v_store_part(out + j, v, m);                                                  \
        }                                                                                      \
    }

#if ATTNKIT_REAL_BITS == 32
DEFINE_RUN(gelu_erf_run, gelu_erf_n)
#else
/* double: the C library's erf, element by element (to about an ulp) */
static void gelu_erf_run(real* out, const real* x, const real* bias, int64_t n)
{
    for (int64_t j = 0; j < n; j++) {
        const double v = bias ? x[j] + bias[j] : x[j];
        out[j] = v < 0 ? 0.5 * v * erfc(-v * 0.70710678118654752440)
                       : 0.5 * v * (1.0 + erf(v * 0.70710678118654752440));
    }
}
#endif
DEFINE_RUN(gelu_tanh_run, gelu_tanh_n)
DEFINE_RUN(silu_run, silu_n)
DEFINE_RUN(relu_run, relu_n)
DEFINE_RUN(identity_run, identity_n)

typedef void (*run_fn)(real*, const real*, const real*, int64_t);

/* elements [begin, end) of the flat (rows, cols) arrays, split where rows
 * end so that each run sees its slice of the bias */
static void apply_range(run_fn run, real* out, const real* x, const real* bias, int64_t cols,
                        int64_t begin, int64_t end)
{
    if (!bias) {
        run(out + begin, x + begin, NULL, end - begin);
        return;
    }
    for (int64_t i = begin; i < end;) {
        const int64_t col = i % cols, stop = min_i64(end, i - col + cols);
        run(out + i, x + i, bias + col, stop - i);
        i = stop;
    }
}

static run_fn run_of(int kind)
{
    return kind == ATTNKIT_GELU_ERF    ? gelu_erf_run
           : kind == ATTNKIT_GELU_TANH ? gelu_tanh_run
           : kind == ATTNKIT_SILU      ? silu_run
           : kind == ATTNKIT_RELU      ? relu_run
                                       : identity_run;
}

void KERNEL(activation_run)(real* out, const real* x, const real* bias, int64_t n, int kind)
{
    run_of(kind)(out, x, bias, n);
}

void KERNEL(bias_activation)(real* out, const real* x, const real* bias, int64_t rows, int64_t cols,
                             int kind)
{
    const run_fn run = run_of(kind);
    const int64_t n = rows * cols;
    if (n == 0) return;
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
    /* a bias add (and ReLU) is one pass over memory; the exact GELU about
     * fifty operations an element */
    const int64_t cost = kind == ATTNKIT_IDENTITY || kind == ATTNKIT_RELU ? 1 : kind == ATTNKIT_GELU_ERF ? 8 : 2;
    const int threads = attnkit_plan_threads(chunks, cost * CHUNK);
    if (threads <= 1) {
        apply_range(run, out, x, bias, cols, 0, n);
        return;
    }
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++)
            apply_range(run, out, x, bias, cols, c * CHUNK, min_i64(n, (c + 1) * CHUNK));
        fp_controls_restore(own_fp);
    }
}

/* ---------------------------------------------------------------------------
 * Backward (the contract is in attnkit.h): dx = dy * f'(x + bias), and
 * dbias += the column sums of dx. Each f' is written so that nothing
 * overflows or cancels: with e = exp(-|y|) (or exp(-2|u|)),
 *   sigmoid(y) = 1 / (1 + e) for y >= 0, e / (1 + e) below, and
 *   sigmoid(y) (1 - sigmoid(y)) = e / (1 + e)^2 for either sign;
 *   tanh GELU: 0.5 (1 + tanh u) = sigmoid(2u), 1 - tanh(u)^2 = 4e / (1 + e)^2.
 * The factor x multiplying a term that vanishes for large |x| is held to a
 * bound past which that term is exactly 0, so +-inf gives the limit, not
 * inf * 0 = NaN.
 */
#include "colsum.h"

/* 1 / (1 + e) or e / (1 + e) (y >= 0 or not), and e / (1 + e)^2 */
AK_INLINE void sigmoid_parts(vreal y, vreal e, vreal* s, vreal* s_1ms)
{
    const vreal one = v_set1(1), inv = v_div(one, v_add(one, e));
    *s = v_select(v_is_less(y, v_set1(0)), v_mul(e, inv), inv);
    *s_1ms = v_mul(v_mul(e, inv), inv);
}

AK_INLINE vreal v_clamp(vreal x, real bound) /* NaN stays NaN (v_min, v_max's rule) */
{
    return v_max(v_set1(-bound), v_min(v_set1(bound), x));
}

AK_INLINE vreal v_silu_backward(vreal x, vreal g)
{
    vreal s, s_1ms;
    sigmoid_parts(x, v_exp_nonpositive(v_sub(v_set1(0), v_abs(x))), &s, &s_1ms);
    /* s + x s (1 - s) = s (1 + x (1 - s)); e is 0 for |x| > 1000 */
    return v_mul(g, v_fma(v_clamp(x, 1000), s_1ms, s));
}

AK_INLINE vreal v_gelu_tanh_backward(vreal x, vreal g)
{
    const real k0 = (real)0.79788456080286535588, k1 = (real)0.044715;
    const vreal xc = v_clamp(x, 1e4); /* |x| > 1e4: e is 0, and x^3 stays finite */
    const vreal x2 = v_mul(xc, xc);
    const vreal u = v_mul(v_set1(k0), v_fma(v_mul(v_set1(k1), xc), x2, xc));
    const vreal du = v_mul(v_set1(k0), v_fma(v_set1(3 * k1), x2, v_set1(1)));
    vreal left, quarter_sech2; /* sigmoid(2u) and sech(u)^2 / 4 */
    sigmoid_parts(u, v_exp_nonpositive(v_mul(v_abs(u), v_set1(-2))), &left, &quarter_sech2);
    /* 0.5 (1 + tanh u) + 0.5 x sech(u)^2 u' */
    const vreal d = v_fma(v_mul(v_mul(v_set1(2), xc), quarter_sech2), du, left);
    return v_mul(g, v_select(v_is_equal(x, x), d, x)); /* NaN x: NaN */
}

/* PyTorch's: 0 at x == 0 (and where x < 0, whatever g holds); NaN x: NaN */
AK_INLINE vreal v_relu_backward(vreal x, vreal g)
{
    const vreal zero = v_set1(0);
    return v_select(v_is_less(zero, x), g, v_select(v_is_equal(x, x), zero, x));
}

AK_INLINE vreal v_identity_backward(vreal x, vreal g)
{
    (void)x;
    return g;
}

#define DEFINE_EACH_BACKWARD(name_n, f)                                                        \
    AK_INLINE void name_n(vreal* v, const vreal* g, int count)                                 \
    {                                                                                          \
        for (int k = 0; k < count; k++) v[k] = f(v[k], g[k]);                                  \
    }
DEFINE_EACH_BACKWARD(gelu_tanh_backward_n, v_gelu_tanh_backward)
DEFINE_EACH_BACKWARD(silu_backward_n, v_silu_backward)
DEFINE_EACH_BACKWARD(relu_backward_n, v_relu_backward)
DEFINE_EACH_BACKWARD(identity_backward_n, v_identity_backward)

/* A run of n elements that share one bias row: dx (n) = dy (n) * f'(x (n) +
 * bias (n)), bias NULL for none; part (n), or NULL, += dx. Every vector of
 * a step is loaded before any is stored, so dx may be dy. */
#define DEFINE_BACKWARD_RUN(name, df_n)                                                        \
    static void name(real* dx, real* part, const real* dy, const real* x, const real* bias,    \
                     int64_t n)                                                                \
    {                                                                                          \
        int64_t j = 0;                                                                         \
        for (; j + WAYS * VLEN <= n; j += WAYS * VLEN) {                                       \
            vreal v[WAYS], g[WAYS];                                                            \
            for (int k = 0; k < WAYS; k++) {                                                   \
                v[k] = v_load(x + j + k * VLEN);                                               \
                if (bias) v[k] = v_add(v[k], v_load(bias + j + k * VLEN));                     \
                g[k] = v_load(dy + j + k * VLEN);                                              \
            }                                                                                  \
            df_n(v, g, WAYS);                                                                  \
            for (int k = 0; k < WAYS; k++) {                                                   \
                v_store(dx + j + k * VLEN, v[k]);                                              \
                if (part) v_store(part + j + k * VLEN, v_add(v_load(part + j + k * VLEN), v[k])); \
            }                                                                                  \
        }                                                                                      \
        for (; j < n; j += VLEN) {                                                             \
            const int64_t m = min_i64(VLEN, n - j);                                            \
            vreal v = m == VLEN ? v_load(x + j) : v_load_part(x + j, m, 0);                    \
            if (bias) v = v_add(v, m == VLEN ? v_load(bias + j) : v_load_part(bias + j, m, 0)); \
            const vreal g = m == VLEN ? v_load(dy + j) : v_load_part(dy + j, m, 0);            \
            df_n(&v, &g, 1);                                                                   \
            if (m == VLEN) v_store(dx + j, v);                                                 \
            else v_store_part(dx + j, v, m);                                                   \
            if (part) {                                                                        \
                const vreal p = v_add(m == VLEN ? v_load(part + j) : v_load_part(part + j, m, 0), v); \
                if (m == VLEN) v_store(part + j, p);                                           \
                else v_store_part(part + j, p, m);                                             \
            }                                                                                  \
        }                                                                                      \
    }

#if ATTNKIT_REAL_BITS == 32
DEFINE_BACKWARD_RUN(gelu_erf_backward_run, gelu_erf_backward_n)
#else
/* double: the C library's erf, erfc and exp, element by element */
static void gelu_erf_backward_run(real* dx, real* part, const real* dy, const real* x,
                                  const real* bias, int64_t n)
{
    for (int64_t j = 0; j < n; j++) {
        const double v = bias ? x[j] + bias[j] : x[j];
        /* Phi(v) = erfc(-v / sqrt 2) / 2, accurate for either sign (the
         * division rounds the argument once, as the reference's does) */
        const double cdf = 0.5 * erfc(-v / 1.41421356237309504880);
        /* v phi(v), with v^2's rounding error put back; 0 past |v| = 40 (and for +-inf, NaN) */
        const double sq = v * v, sq_err = fma(v, v, -sq);
        const double x_pdf = fabs(v) < 40 ? v * exp(-0.5 * sq) * (1.0 - 0.5 * sq_err) * 0.39894228040143267794 : 0.0;
        const double d = dy[j] * (cdf + x_pdf);
        dx[j] = d;
        if (part) part[j] += d;
    }
}
#endif
DEFINE_BACKWARD_RUN(gelu_tanh_backward_run, gelu_tanh_backward_n)
DEFINE_BACKWARD_RUN(silu_backward_run, silu_backward_n)
DEFINE_BACKWARD_RUN(relu_backward_run, relu_backward_n)
DEFINE_BACKWARD_RUN(identity_backward_run, identity_backward_n)

typedef void (*backward_run_fn)(real*, real*, const real*, const real*, const real*, int64_t);

static backward_run_fn backward_run_of(int kind)
{
    return kind == ATTNKIT_GELU_ERF    ? gelu_erf_backward_run
           : kind == ATTNKIT_GELU_TANH ? gelu_tanh_backward_run
           : kind == ATTNKIT_SILU      ? silu_backward_run
           : kind == ATTNKIT_RELU      ? relu_backward_run
                                       : identity_backward_run;
}

/* elements [begin, end) of the flat arrays, split where rows end (as apply_range) */
static void backward_range(backward_run_fn run, real* dx, const real* dy, const real* x,
                           const real* bias, int64_t cols, int64_t begin, int64_t end)
{
    if (!bias) {
        run(dx + begin, NULL, dy + begin, x + begin, NULL, end - begin);
        return;
    }
    for (int64_t i = begin; i < end;) {
        const int64_t col = i % cols, stop = min_i64(end, i - col + cols);
        run(dx + i, NULL, dy + i, x + i, bias + col, stop - i);
        i = stop;
    }
}

/* rows of colsum.h's block b, each row's dx added into the block's partial sums */
static void backward_block(backward_run_fn run, real* dx, const colsum* sums, const real* dy,
                           const real* x, const real* bias, int64_t rows, int64_t cols, int64_t b)
{
    const int64_t begin = colsum_first_row(rows, sums->blocks, b);
    const int64_t end = colsum_first_row(rows, sums->blocks, b + 1);
    real* part = colsum_part(sums, b, 0);
    for (int64_t r = begin; r < end; r++) {
        run(dx + r * cols, part, dy + r * cols, x + r * cols, bias, cols);
        if ((r - begin + 1) % COLSUM_FLUSH_ROWS == 0 || r + 1 == end) colsum_flush(sums, b);
    }
}

int KERNEL(bias_activation_backward)(real* dx, real* dbias, const real* dy, const real* x,
                                     const real* bias, int64_t rows, int64_t cols, int kind)
{
    const backward_run_fn run = backward_run_of(kind);
    const int64_t n = rows * cols;
    if (n == 0) return 0;
    /* as the forward's costs, the derivative's being about twice f's */
    const int64_t cost = kind == ATTNKIT_IDENTITY || kind == ATTNKIT_RELU ? 1 : kind == ATTNKIT_GELU_ERF ? 16 : 4;
    if (!dbias) {
        const int64_t chunks = (n + CHUNK - 1) / CHUNK;
        const int threads = attnkit_plan_threads(chunks, cost * CHUNK);
        if (threads <= 1) {
            backward_range(run, dx, dy, x, bias, cols, 0, n);
            return 0;
        }
        const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
        {
            const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(static)
            for (int64_t c = 0; c < chunks; c++)
                backward_range(run, dx, dy, x, bias, cols, c * CHUNK, min_i64(n, (c + 1) * CHUNK));
            fp_controls_restore(own_fp);
        }
        return 0;
    }
    colsum sums;
    if (colsum_alloc(&sums, rows, cols, 1) != 0) return -1;
    const int64_t blocks = sums.blocks;
    const int threads = attnkit_plan_threads(blocks, cost * (rows / blocks + 1) * cols);
    if (threads <= 1) {
        for (int64_t b = 0; b < blocks; b++) backward_block(run, dx, &sums, dy, x, bias, rows, cols, b);
    } else {
        const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
        {
            const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(dynamic, 1)
            for (int64_t b = 0; b < blocks; b++) backward_block(run, dx, &sums, dy, x, bias, rows, cols, b);
            fp_controls_restore(own_fp);
        }
    }
    real* const out[1] = {dbias};
    colsum_finish(&sums, out);
    return 0;
}

/* ---------------------------------------------------------------------------
 * Dropout (the contract is in attnkit.h): a row of ATTNKIT_DROPOUT_ROW
 * elements shares one hash key, and each element's decision is one more
 * mix of it with the column, which the compiler vectorises. */

static void dropout_rows(real* out, const real* x, int64_t n, uint32_t threshold, real scale,
                         uint32_t seed, int64_t first_row, int64_t end_row)
{
    for (int64_t r = first_row; r < end_row; r++) {
        const uint32_t key = attnkit_dropout_row_key(seed, 0, (uint32_t)r);
        const int64_t begin = r * ATTNKIT_DROPOUT_ROW;
        const int64_t count = min_i64(n - begin, ATTNKIT_DROPOUT_ROW);
        real* o = out + begin;
        const real* in = x + begin;
        for (int64_t j = 0; j < count; j++)
            o[j] = attnkit_dropout_keep(key, (uint32_t)j, threshold) ? in[j] * scale : (real)0;
    }
}

void KERNEL(dropout)(real* out, const real* x, int64_t n, double p, uint32_t seed)
{
    if (n <= 0) return;
    const uint32_t threshold = (uint32_t)ceil(p * 16777216.0);       /* p as a 24-bit fraction */
    const real scale = p < 1 ? (real)(1.0 / (1.0 - p)) : (real)0;
    const int64_t rows = (n + ATTNKIT_DROPOUT_ROW - 1) / ATTNKIT_DROPOUT_ROW;
    const int threads = attnkit_plan_threads(rows, 4 * ATTNKIT_DROPOUT_ROW);
    if (threads <= 1) {
        dropout_rows(out, x, n, threshold, scale, seed, 0, rows);
        return;
    }
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            dropout_rows(out, x, n, threshold, scale, seed, r, r + 1);
        fp_controls_restore(own_fp);
    }
}
