/*
 * activation.c: elementwise activations over n contiguous elements.
 * The contract is in attnkit.h; simd.h says which ISA and precision.
 *
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

enum { CHUNK = 4096 }; /* elements a thread takes at a time */

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

#if ATTNKIT_REAL_BITS == 32
/* Phi(-|x|) = erfc(z) / 2 for z = |x| / sqrt 2, as t exp(-z^2 + P(t)) / 2,
 * t = 1 / (1 + z/2), P the degree-9 polynomial of the Chebyshev-fitted
 * approximation in Press et al., Numerical Recipes (erfcc), whose relative
 * error against the C library's erfc over [0, 12] is at most 1.05e-7.
 * z^2 = x^2 / 2 is carried as two floats (x*x and its fma-exact error), and
 * the exponent's own rounding is put back as a factor (1 + err): exp(-z^2)
 * multiplies a rounding error of z^2 by z^2, 68 at z = 8, and the tail would
 * otherwise keep only four digits. The exponent is below 7e-4, inside
 * v_exp_nonpositive's range. */
AK_INLINE vreal v_half_erfc_abs(vreal x)
{
    const vreal z = v_mul(v_abs(x), v_set1(0.70710678118654752f));
    const vreal t = v_div(v_set1(1), v_fma(z, v_set1(0.5f), v_set1(1)));
    vreal p = v_set1(0.17087277f);
    p = v_fma(p, t, v_set1(-0.82215223f));
    p = v_fma(p, t, v_set1(1.48851587f));
    p = v_fma(p, t, v_set1(-1.13520398f));
    p = v_fma(p, t, v_set1(0.27886807f));
    p = v_fma(p, t, v_set1(-0.18628806f));
    p = v_fma(p, t, v_set1(0.09678418f));
    p = v_fma(p, t, v_set1(0.37409196f));
    p = v_fma(p, t, v_set1(1.00002368f));
    p = v_fma(p, t, v_set1(-1.26551223f));
    const vreal sq = v_mul(x, x), sq_err = v_fma(x, x, v_sub(v_set1(0), sq));   /* x^2 exactly */
    const vreal a = v_mul(sq, v_set1(-0.5f));                                   /* -z^2, head */
    const vreal b = v_fma(sq_err, v_set1(-0.5f), p);                            /* small rest */
    const vreal arg = v_add(a, b), bb = v_sub(arg, a);
    const vreal err = v_add(v_sub(a, v_sub(arg, bb)), v_sub(b, bb));           /* TwoSum    */
    const vreal e = v_exp_nonpositive(arg);
    return v_mul(v_mul(t, v_set1(0.5f)), v_fma(e, err, e));
}

/* gelu(x) = x Phi(x): for x < 0 Phi(x) = Phi(-|x|) directly (the tail keeps
 * its relative precision), for x >= 0 1 - Phi(-|x|). Four vectors a step, so
 * that their long chains of dependent operations overlap. */
AK_INLINE vreal v_gelu(vreal v)
{
    const vreal tail = v_half_erfc_abs(v);
    return v_mul(v, v_select(v_is_less(v, v_set1(0)), tail, v_sub(v_set1(1), tail)));
}

static void gelu_erf_range(real* out, const real* x, int64_t begin, int64_t end)
{
    int64_t i = begin;
    for (; i + 4 * VLEN <= end; i += 4 * VLEN) {
        const vreal y0 = v_gelu(v_load(x + i)), y1 = v_gelu(v_load(x + i + VLEN));
        const vreal y2 = v_gelu(v_load(x + i + 2 * VLEN)), y3 = v_gelu(v_load(x + i + 3 * VLEN));
        v_store(out + i, y0);
        v_store(out + i + VLEN, y1);
        v_store(out + i + 2 * VLEN, y2);
        v_store(out + i + 3 * VLEN, y3);
    }
    for (; i < end; i += VLEN) {
        const int64_t n = min_i64(VLEN, end - i);
        const vreal y = v_gelu(n == VLEN ? v_load(x + i) : v_load_part(x + i, n, 0));
        if (n == VLEN) v_store(out + i, y);
        else v_store_part(out + i, y, n);
    }
}
#else
/* double: the C library's erf, element by element (to about an ulp) */
static void gelu_erf_range(real* out, const real* x, int64_t begin, int64_t end)
{
    for (int64_t i = begin; i < end; i++) {
        const double v = x[i];
        out[i] = v < 0 ? 0.5 * v * erfc(-v * 0.70710678118654752440)
                       : 0.5 * v * (1.0 + erf(v * 0.70710678118654752440));
    }
}
#endif

AK_INLINE vreal v_tanh(vreal y)
{
    const vreal a = v_abs(y);
    const vreal e = v_exp_nonpositive(v_mul(a, v_set1(-2)));
    const vreal t = v_div(v_sub(v_set1(1), e), v_add(v_set1(1), e));
    return v_select(v_is_less(y, v_set1(0)), v_sub(v_set1(0), t), t);
}

static void gelu_tanh_range(real* out, const real* x, int64_t begin, int64_t end)
{
    const vreal k = v_set1((real)0.79788456080286535588), c = v_set1((real)0.044715);
    const vreal half = v_set1((real)0.5), one = v_set1(1);
    for (int64_t i = begin; i < end; i += VLEN) {
        const int64_t n = min_i64(VLEN, end - i);
        const vreal v = n == VLEN ? v_load(x + i) : v_load_part(x + i, n, 0);
        const vreal inner = v_mul(k, v_fma(v_mul(c, v), v_mul(v, v), v));
        const vreal y = v_mul(v_mul(half, v), v_add(one, v_tanh(inner)));
        if (n == VLEN) v_store(out + i, y);
        else v_store_part(out + i, y, n);
    }
}

static void silu_range(real* out, const real* x, int64_t begin, int64_t end)
{
    const vreal one = v_set1(1);
    for (int64_t i = begin; i < end; i += VLEN) {
        const int64_t n = min_i64(VLEN, end - i);
        const vreal v = n == VLEN ? v_load(x + i) : v_load_part(x + i, n, 0);
        const vreal e = v_exp_nonpositive(v_sub(v_set1(0), v_abs(v)));
        const vreal sig = v_div(v_select(v_is_less(v, v_set1(0)), e, one), v_add(one, e));
        const vreal y = v_mul(v, sig);
        if (n == VLEN) v_store(out + i, y);
        else v_store_part(out + i, y, n);
    }
}

void KERNEL(activation)(real* out, const real* x, int64_t n, int kind)
{
    void (*range)(real*, const real*, int64_t, int64_t) =
        kind == ATTNKIT_GELU_ERF ? gelu_erf_range : kind == ATTNKIT_GELU_TANH ? gelu_tanh_range : silu_range;
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
    const int threads = attnkit_plan_threads(chunks, (kind == ATTNKIT_GELU_ERF ? 8 : 2) * CHUNK);
    if (threads <= 1) {
        range(out, x, 0, n);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) range(out, x, c * CHUNK, min_i64(n, (c + 1) * CHUNK));
}
