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

/* The exact GELU of count (<= WAYS) vectors, in place. Its chain of
 * dependent operations is about 150 cycles long, longer than the core's
 * reorder window covers one vector after another: written as one loop per
 * step (each unrolled whole, count being a constant where it is inlined),
 * the steps of WAYS vectors interleave. */
AK_INLINE void gelu_erf_n(vreal* v, int count)
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
    EACH {                /* x < 0: x Phi(-|x|), the tail keeping its relative precision; else x (1 - tail) */
        const vreal tail = v_mul(v_mul(t[k], v_set1(0.5f)), e[k]);
        v[k] = v_mul(v[k], v_select(v_is_less(v[k], v_set1(0)), tail, v_sub(v_set1(1), tail)));
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
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++)
        apply_range(run, out, x, bias, cols, c * CHUNK, min_i64(n, (c + 1) * CHUNK));
}
