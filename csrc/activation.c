/*
 * activation.c: elementwise activations over n contiguous elements.
 * The contract is in attnkit.h; simd.h says which ISA and precision.
 *
 *   gelu (exact)   out = x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))
 *   gelu (tanh)    out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
 *   silu           out = x * sigmoid(x) = x / (1 + exp(-x))
 *
 * erf comes from the C library (correctly rounded to about an ulp); tanh and
 * the sigmoid are written with exp of a non-positive argument, so nothing
 * overflows: tanh(|y|) = (1 - e) / (1 + e) and sigmoid(x) = 1 / (1 + e) for
 * x >= 0, e / (1 + e) for x < 0, with e = exp(-2|y|) or exp(-|x|).
 */
#include "attnkit.h"
#include "simd.h"

enum { CHUNK = 4096 }; /* elements a thread takes at a time */

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

static void gelu_erf_range(real* out, const real* x, int64_t begin, int64_t end)
{
    for (int64_t i = begin; i < end; i++) {
        const double v = x[i];
        out[i] = (real)(0.5 * v * (1.0 + erf(v * 0.70710678118654752440)));
    }
}

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
    const int threads = attnkit_plan_threads(chunks, kind == ATTNKIT_GELU_ERF ? 8 * CHUNK : 2 * CHUNK);
    if (threads <= 1) {
        range(out, x, 0, n);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; c++) range(out, x, c * CHUNK, min_i64(n, (c + 1) * CHUNK));
}
