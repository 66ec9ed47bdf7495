/*
 * norm.c: layer norm and RMS norm over the rows of an (N, C) array.
 * The contract is in attnkit.h; simd.h says which ISA and precision this
 * copy is compiled for.
 *
 * Layer norm, three passes over a row (it stays in L1/L2 between them):
 *   1. mean0 = x[0] + sum(x - x[0]) / C
 *   2. d = x - mean0,  s1 = sum(d),  s2 = sum(d^2)
 *      mean = mean0 + s1/C,  var = s2/C - (s1/C)^2
 *   3. out = (x - mean) * rstd * weight + bias,  rstd = 1/sqrt(var + eps)
 * Pass 2 is the corrected two-pass algorithm: the variance is a sum of
 * squared deviations (never E[x^2] - E[x]^2, which cancels catastrophically
 * for a row like 1e4 + noise), and s1 repairs whatever rounding mean0 had.
 * The mean is kept as two reals, hi + lo, so x - mean is (x - hi) - lo: for a
 * row near 1e4 the deviation is then exact, not rounded to 1e4's ulp.
 *
 * Sums are accumulated as simd.h's vacc (float data: float lanes flushed
 * into a double every few terms; double data: compensated sums).
 * A row whose squares overflow or underflow `real` (|x - mean| above ~1e19 in
 * float, or a variance so small that eps does not hide the underflow) is
 * redone by a careful scalar path that scales the row by a power of two
 * first. Ordinary rows never take it.
 */
#include <float.h>

#include "attnkit.h"
#include "simd.h"



#if ATTNKIT_REAL_BITS == 32
/* Below this, squares of the row's deviations may have lost bits to underflow. */
#define TINY_SUM_OF_SQUARES 0x1p-100
#else
#define TINY_SUM_OF_SQUARES 0x1p-960
#endif

/* ---------------------------------------------------------------------------
 * The careful path, in double, for rows the fast path cannot do exactly.
 * The row is scaled by 2^-k so its largest magnitude is in [0.5, 1): then no
 * sum or square can overflow, and the ratio (x - mean) / std is unchanged.
 */

/* 2^-k with max|x| * 2^-k in [0.5, 1) (or as near as double allows); 1 for a
 * zero row; 0 if the row holds an infinity, NaN if it holds a NaN. */
static double row_scale(const real* x, int64_t C)
{
    double amax = 0.0;
    for (int64_t c = 0; c < C; c++) {
        double a = fabs((double)x[c]);
        if (a != a) return NAN;
        if (a > amax) amax = a;
    }
    if (amax == 0.0) return 1.0;
    if (amax > DBL_MAX) return 0.0;
    int k;
    frexp(amax, &k);
    /* a subnormal row would want up to 2^1074, past double's range; 2^1000
     * is enough to lift its squares clear of underflow */
    return ldexp(1.0, -k < 1000 ? -k : 1000);
}

static void layer_norm_row_careful(real* out, real* mean_out, real* rstd_out, const real* x,
                                   const real* weight, const real* bias, int64_t C, double eps)
{
    const double scale = row_scale(x, C);
    if (!(scale > 0)) { /* an infinity or a NaN: mean and variance are NaN */
        for (int64_t c = 0; c < C; c++) out[c] = NAN;
        if (mean_out) *mean_out = NAN;
        if (rstd_out) *rstd_out = NAN;
        return;
    }
    double mean = 0.0, s1 = 0.0, s2 = 0.0;
    for (int64_t c = 0; c < C; c++) mean += x[c] * scale;
    mean /= (double)C;
    for (int64_t c = 0; c < C; c++) {
        double d = x[c] * scale - mean;
        s1 += d;
        s2 += d * d;
    }
    mean += s1 / (double)C;
    double var = s2 / (double)C - (s1 / (double)C) * (s1 / (double)C);
    if (var < 0) var = 0;
    /* sqrt(var_true + eps) = hypot(std_true, sqrt(eps)), and in scaled units
     * (std_true = std/scale) the denominator of (x*scale - mean) is: */
    const double denom = hypot(sqrt(var), sqrt(eps) * scale);
    for (int64_t c = 0; c < C; c++) {
        double y = (x[c] * scale - mean) / denom;
        if (weight) y *= weight[c];
        if (bias) y += bias[c];
        out[c] = (real)y;
    }
    if (mean_out) *mean_out = (real)(mean / scale);
    if (rstd_out) *rstd_out = (real)(1.0 / hypot(sqrt(var) / scale, sqrt(eps)));
}

static void rms_norm_row_careful(real* out, real* rrms_out, const real* x, const real* weight,
                                 int64_t C, double eps)
{
    const double scale = row_scale(x, C);
    if (!(scale > 0)) {
        /* rms is inf (an infinity) or NaN (a NaN): out = x * (1/rms) * weight
         * as IEEE arithmetic has it, so finite elements of a row with an
         * infinity give 0 and the infinities NaN, as in PyTorch. */
        const double rrms = scale == 0.0 ? 0.0 : NAN;
        for (int64_t c = 0; c < C; c++) out[c] = (real)(x[c] * rrms * (weight ? weight[c] : 1));
        if (rrms_out) *rrms_out = (real)rrms;
        return;
    }
    double s2 = 0.0;
    for (int64_t c = 0; c < C; c++) s2 += (x[c] * scale) * (x[c] * scale);
    const double rms = sqrt(s2 / (double)C);
    const double denom = hypot(rms, sqrt(eps) * scale);
    for (int64_t c = 0; c < C; c++) {
        double y = x[c] * scale / denom;
        if (weight) y *= weight[c];
        out[c] = (real)y;
    }
    if (rrms_out) *rrms_out = (real)(1.0 / hypot(rms / scale, sqrt(eps)));
}

/* ---------------------------------------------------------------------------
 * The fast path.
 */

/* The row's mean, first estimate: x[0] + sum(x - x[0]) / C, the sum
 * accumulated as simd.h's vacc. Shifting by an element of the row keeps the
 * terms small, and makes the sum of a row of equal values exactly 0, so such
 * a row has its exact mean and normalises to exactly the bias. */
static double row_mean(const real* x, int64_t C)
{
    const real first = x[0];
    const vreal shift = v_set1(first);
    vacc a0 = vacc_zero(), a1 = vacc_zero();
    int64_t c = 0;
    for (; c + 2 * VLEN <= C; c += 2 * VLEN) {
        a0 = vacc_add(a0, v_sub(v_load(x + c), shift));
        a1 = vacc_add(a1, v_sub(v_load(x + c + VLEN), shift));
    }
    for (; c + VLEN <= C; c += VLEN) a0 = vacc_add(a0, v_sub(v_load(x + c), shift));
    double tail = 0.0;
    for (; c < C; c++) tail += x[c] - first;
    return (double)first + ((vacc_sum(a0) + vacc_sum(a1)) + tail) / (double)C;
}

/* sum(d) and sum(d^2) for d = (x - hi) - lo over one row, accumulated as
 * simd.h's vacc: a row of one large deviation among many small ones (a lone
 * 2 among 559 zeros) loses nothing to the small ones' rounding against it */
static void row_centred_sums(double* sum_d, double* sum_d2, const real* x, real hi, real lo, int64_t C)
{
    const vreal vhi = v_set1(hi), vlo = v_set1(lo);
    vacc a0 = vacc_zero(), a1 = vacc_zero(), q0 = vacc_zero(), q1 = vacc_zero();
    int64_t c = 0;
    for (; c + 2 * VLEN <= C; c += 2 * VLEN) {
        const vreal d0 = v_sub(v_sub(v_load(x + c), vhi), vlo);
        const vreal d1 = v_sub(v_sub(v_load(x + c + VLEN), vhi), vlo);
        a0 = vacc_add(a0, d0);
        a1 = vacc_add(a1, d1);
        q0 = vacc_add_square(q0, d0);
        q1 = vacc_add_square(q1, d1);
    }
    for (; c + VLEN <= C; c += VLEN) {
        const vreal d = v_sub(v_sub(v_load(x + c), vhi), vlo);
        a0 = vacc_add(a0, d);
        q0 = vacc_add_square(q0, d);
    }
    double t1 = 0.0, t2 = 0.0;
    for (; c < C; c++) {
        const real d = (x[c] - hi) - lo;
        t1 += d;
        t2 += (double)d * d;
    }
    *sum_d = vacc_sum(a0) + vacc_sum(a1) + t1;
    *sum_d2 = vacc_sum(q0) + vacc_sum(q1) + t2;
}

/* Pass 3 of layer norm: out = ((x - hi) - lo) * rstd [* weight] [+ bias].
 * Inlined once per combination of weight and bias, so the loop tests neither.
 * With `stream`, whole aligned vectors of out are written past the caches. */
AK_INLINE vreal layer_norm_value(const real* x, const real* weight, const real* bias, int64_t c,
                                 int64_t n, vreal vhi, vreal vlo, vreal vr)
{
    const int full = n == VLEN;
    vreal y = v_mul(v_sub(v_sub(full ? v_load(x + c) : v_load_part(x + c, n, 0), vhi), vlo), vr);
    if (weight && bias)
        y = v_fma(y, full ? v_load(weight + c) : v_load_part(weight + c, n, 0),
                  full ? v_load(bias + c) : v_load_part(bias + c, n, 0));
    else if (weight) y = v_mul(y, full ? v_load(weight + c) : v_load_part(weight + c, n, 0));
    else if (bias) y = v_add(y, full ? v_load(bias + c) : v_load_part(bias + c, n, 0));
    return y;
}

AK_INLINE void layer_norm_apply(real* out, const real* x, const real* weight, const real* bias,
                                int64_t C, real hi, real lo, real rstd, int stream,
                                real* out_next, const real* x_next)
{
    const vreal vhi = v_set1(hi), vlo = v_set1(lo), vr = v_set1(rstd);
    int64_t c = 0;
    if (stream) {
        /* plain stores up to the first aligned vector, then streaming ones */
        const int64_t head = stream_head(out);
        if (head > 0 && head < C) {
            v_store_part(out, layer_norm_value(x, weight, bias, 0, head, vhi, vlo, vr), head);
            c = head;
        }
        for (; c + VLEN <= C; c += VLEN) {
            v_stream(out + c, layer_norm_value(x, weight, bias, c, VLEN, vhi, vlo, vr));
            prefetch_read(x_next, c, VLEN);
        }
    }
    for (; c + VLEN <= C; c += VLEN) {
        v_store(out + c, layer_norm_value(x, weight, bias, c, VLEN, vhi, vlo, vr));
        prefetch_read(x_next, c, VLEN);
        prefetch_write(out_next, c, VLEN);
    }
    if (c < C) v_store_part(out + c, layer_norm_value(x, weight, bias, c, C - c, vhi, vlo, vr), C - c);
}

/* out (C), mean_out and rstd_out (1) or NULL, x (C), weight (C) or NULL,
 * bias (C) or NULL; out_next and x_next (or NULL): the next row, to prefetch */
static void layer_norm_row(real* out, real* mean_out, real* rstd_out, const real* x,
                           const real* weight, const real* bias, int64_t C, double eps,
                           int stream, real* out_next, const real* x_next)
{
    /* passes 1 and 2 */
    const double mean0 = row_mean(x, C);
    real hi = (real)mean0, lo = (real)(mean0 - (double)hi);
    double s1, s2;
    row_centred_sums(&s1, &s2, x, hi, lo, C);
    const double shift = s1 / (double)C;
    double var = s2 / (double)C - shift * shift;
    if (var < 0) var = 0;
    /* The refined mean is hi + (lo + shift), kept as a pair of reals by an
     * exact two-sum: in double, rounding it to one number would cost up to
     * half an ulp of the mean, which is a lot of a row 1e4 + 1e-2 noise. */
    const real tail = (real)((double)lo + shift);
    const real sum = hi + tail, hi_part = sum - tail;
    lo = (hi - hi_part) + (tail - (sum - hi_part));
    hi = sum;
    const double mean = (double)hi + (double)lo;
    if (!(isfinite(mean) && var <= DBL_MAX && var + eps >= TINY_SUM_OF_SQUARES)) {
        layer_norm_row_careful(out, mean_out, rstd_out, x, weight, bias, C, eps);
        return;
    }
    const double rstd = 1.0 / sqrt(var + eps);
    if (mean_out) *mean_out = (real)mean;
    if (rstd_out) *rstd_out = (real)rstd;

    /* pass 3 */
    const real r = (real)rstd;
    if (weight && bias) layer_norm_apply(out, x, weight, bias, C, hi, lo, r, stream, out_next, x_next);
    else if (weight) layer_norm_apply(out, x, weight, NULL, C, hi, lo, r, stream, out_next, x_next);
    else if (bias) layer_norm_apply(out, x, NULL, bias, C, hi, lo, r, stream, out_next, x_next);
    else layer_norm_apply(out, x, NULL, NULL, C, hi, lo, r, stream, out_next, x_next);
}

/* out (C), rrms_out (1) or NULL, x (C), weight (C) or NULL; next row to prefetch */
static void rms_norm_row(real* out, real* rrms_out, const real* x, const real* weight,
                         int64_t C, double eps, int stream, real* out_next, const real* x_next)
{
    /* pass 1: sum of squares, in double */
    vacc q0 = vacc_zero(), q1 = vacc_zero();
    int64_t c = 0;
    for (; c + 2 * VLEN <= C; c += 2 * VLEN) {
        q0 = vacc_add_square(q0, v_load(x + c));
        q1 = vacc_add_square(q1, v_load(x + c + VLEN));
    }
    for (; c + VLEN <= C; c += VLEN) q0 = vacc_add_square(q0, v_load(x + c));
    double tail = 0.0;
    for (; c < C; c++) tail += (double)x[c] * x[c];
    const double s2 = vacc_sum(q0) + vacc_sum(q1) + tail;
    const double mean_square = s2 / (double)C;
    if (!(mean_square <= DBL_MAX && mean_square + eps >= TINY_SUM_OF_SQUARES)) {
        rms_norm_row_careful(out, rrms_out, x, weight, C, eps);
        return;
    }
    const double rrms = 1.0 / sqrt(mean_square + eps);
    if (rrms_out) *rrms_out = (real)rrms;

    /* pass 2: out = x * rrms * weight, streamed as in layer_norm_apply */
    const vreal vr = v_set1((real)rrms);
#define SCALED(c, n) (weight                                                                   \
    ? v_mul(v_mul((n) == VLEN ? v_load(x + (c)) : v_load_part(x + (c), n, 0), vr),             \
            (n) == VLEN ? v_load(weight + (c)) : v_load_part(weight + (c), n, 0))              \
    : v_mul((n) == VLEN ? v_load(x + (c)) : v_load_part(x + (c), n, 0), vr))
    c = 0;
    if (stream) {
        const int64_t head = stream_head(out);
        if (head > 0 && head < C) {
            v_store_part(out, SCALED(0, head), head);
            c = head;
        }
        for (; c + VLEN <= C; c += VLEN) {
            v_stream(out + c, SCALED(c, VLEN));
            prefetch_read(x_next, c, VLEN);
        }
    }
    for (; c + VLEN <= C; c += VLEN) {
        v_store(out + c, SCALED(c, VLEN));
        prefetch_read(x_next, c, VLEN);
        prefetch_write(out_next, c, VLEN);
    }
    if (c < C) v_store_part(out + c, SCALED(c, C - c), C - c);
#undef SCALED
}

/* ---------------------------------------------------------------------------
 * Entry points: chunks of rows go to whichever thread is free (as in
 * softmax.c); which thread computes a row never changes what it computes.
 */
typedef struct {
    real* out;
    real* stat0; /* mean or rrms, or NULL */
    real* stat1; /* rstd, or NULL         */
    const real* x;
    const real* weight;
    const real* bias;
    int64_t C, out_row_stride, x_row_stride;
    double eps;
    int rms;
    int stream; /* write the output past the caches (it is larger than they are) */
} norm_job;

static void norm_rows(const norm_job* j, int64_t begin, int64_t end)
{
    for (int64_t n = begin; n < end; n++) {
        real* out = j->out + n * j->out_row_stride;
        const real* x = j->x + n * j->x_row_stride;
        const int last = n + 1 == end;
        real* out_next = last ? NULL : out + j->out_row_stride;
        const real* x_next = last ? NULL : x + j->x_row_stride;
        if (j->rms)
            rms_norm_row(out, j->stat0 ? j->stat0 + n : NULL, x, j->weight, j->C, j->eps,
                         j->stream, out_next, x_next);
        else
            layer_norm_row(out, j->stat0 ? j->stat0 + n : NULL, j->stat1 ? j->stat1 + n : NULL, x,
                           j->weight, j->bias, j->C, j->eps, j->stream, out_next, x_next);
    }
    if (j->stream) v_stream_fence();
}

static void norm_run(const norm_job* j, int64_t N)
{
    if (N == 0 || j->C == 0) return;
    const int threads = attnkit_plan_threads(N, (j->rms ? 2 : 3) * j->C);
    if (threads <= 1) {
        norm_rows(j, 0, N);
        return;
    }
    const int64_t chunk = attnkit_chunk_size(N, threads);
    const int64_t chunks = (N + chunk - 1) / chunk;
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < chunks; k++) norm_rows(j, k * chunk, min_i64(N, (k + 1) * chunk));
        fp_controls_restore(own_fp);
    }
}

void KERNEL(layer_norm)(real* out, real* mean, real* rstd, const real* x, const real* weight,
                        const real* bias, int64_t N, int64_t C, int64_t out_row_stride,
                        int64_t x_row_stride, double eps)
{
    const norm_job j = {out, mean, rstd, x, weight, bias, C, out_row_stride, x_row_stride, eps, 0,
                        N * C * (int64_t)sizeof(real) > STREAM_MIN_BYTES};
    norm_run(&j, N);
}

void KERNEL(rms_norm)(real* out, real* rrms, const real* x, const real* weight, int64_t N,
                      int64_t C, int64_t out_row_stride, int64_t x_row_stride, double eps)
{
    const norm_job j = {out, rrms, NULL, x, weight, NULL, C, out_row_stride, x_row_stride, eps, 1,
                        N * C * (int64_t)sizeof(real) > STREAM_MIN_BYTES};
    norm_run(&j, N);
}

/* ---------------------------------------------------------------------------
 * Backward (the contract is in attnkit.h), two passes over a row, which stays
 * in L1/L2 between them:
 *   1. xhat = (x - mean) * rstd, g = dy * weight;  sums of g and g * xhat
 *      (in `real` lanes, then double: NORM_SUM_VECTORS), and the row's terms of dweight
 *      (dy * xhat) and dbias (dy) added into its block's partial sums
 *   2. dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
 * RMS norm is the same with mean = 0 and no mean(g) term.
 */
#include "colsum.h"

/* The row sums of pass 1 are added in `real` lanes for NORM_SUM_VECTORS
 * vectors (two accumulators each, so each lane takes 8 terms), then into a
 * double: the block's reduction is paid once per 16 vectors, where simd.h's
 * vacc pays it every 8 terms of each sum. */
enum { NORM_SUM_VECTORS = 16 };

/* Pass 2 at c (n <= VLEN lanes): rstd * (g - a + xhat * nb), with a =
 * mean(g) (0 for RMS norm) and nb = -mean(g * xhat) */
AK_INLINE vreal norm_backward_value(const real* dy, const real* x, const real* weight, int64_t c,
                                    int64_t n, vreal vmean, vreal vr, vreal va, vreal vnb, int rms)
{
    const int full = n == VLEN;
    const vreal vx = full ? v_load(x + c) : v_load_part(x + c, n, 0);
    const vreal vdy = full ? v_load(dy + c) : v_load_part(dy + c, n, 0);
    const vreal xh = rms ? v_mul(vx, vr) : v_mul(v_sub(vx, vmean), vr);
    const vreal g = weight ? v_mul(vdy, full ? v_load(weight + c) : v_load_part(weight + c, n, 0)) : vdy;
    return v_mul(vr, v_fma(xh, vnb, rms ? g : v_sub(g, va)));
}

/* One row: dx (C), dy (C), x (C), weight (C) or NULL; dw, db (C) the block's
 * partial sums of dweight and dbias, or NULL. Inlined per combination of
 * NULLs below, so the loops test none of them. With `stream`, whole aligned
 * vectors of dx are written past the caches. */
AK_INLINE void norm_backward_row_impl(real* dx, real* dw, real* db, const real* dy, const real* x,
                                      const real* weight, real mean, real rstd, int64_t C, int rms,
                                      int stream)
{
    const vreal vmean = v_set1(mean), vr = v_set1(rstd);
#define LOAD(p, c, n) ((n) == VLEN ? v_load((p) + (c)) : v_load_part((p) + (c), n, 0))
#define STORE(p, c, v, n) ((n) == VLEN ? v_store((p) + (c), v) : v_store_part((p) + (c), v, n))
    /* pass 1; lanes past C load dy = 0, so they add nothing */
#define STEP(c, n, sg, sgx)                                                                    \
    do {                                                                                       \
        const vreal vdy = LOAD(dy, c, n), vx = LOAD(x, c, n);                                  \
        const vreal xh = rms ? v_mul(vx, vr) : v_mul(v_sub(vx, vmean), vr);                    \
        const vreal g = weight ? v_mul(vdy, LOAD(weight, c, n)) : vdy;                         \
        if (!rms) sg = v_add(sg, g);                                                           \
        sgx = v_fma(g, xh, sgx);                                                               \
        if (dw) STORE(dw, c, v_fma(vdy, xh, LOAD(dw, c, n)), n);                               \
        if (db) STORE(db, c, v_add(vdy, LOAD(db, c, n)), n);                                   \
    } while (0)
    dsum sum_g = {0.0, 0.0}, sum_gx = {0.0, 0.0};
    for (int64_t block = 0; block < C; block += NORM_SUM_VECTORS * VLEN) {
        const int64_t end = min_i64(C, block + NORM_SUM_VECTORS * VLEN);
        vreal g0 = v_set1(0), g1 = g0, q0 = g0, q1 = g0;
        int64_t c = block;
        for (; c + 2 * VLEN <= end; c += 2 * VLEN) {
            STEP(c, VLEN, g0, q0);
            STEP(c + VLEN, VLEN, g1, q1);
        }
        for (; c < end; c += VLEN) STEP(c, min_i64(VLEN, end - c), g0, q0);
        if (!rms) dsum_add(&sum_g, v_reduce_add(v_add(g0, g1)));
        dsum_add(&sum_gx, v_reduce_add(v_add(q0, q1)));
    }
#undef STEP
    /* pass 2 */
    const vreal va = v_set1(rms ? 0 : (real)(dsum_value(sum_g) / (double)C));
    const vreal vnb = v_set1((real)(-dsum_value(sum_gx) / (double)C));
#define VALUE(c, n) norm_backward_value(dy, x, weight, c, n, vmean, vr, va, vnb, rms)
    int64_t c = 0;
    if (stream) {
        const int64_t head = stream_head(dx);
        if (head > 0 && head < C) {
            v_store_part(dx, VALUE(0, head), head);
            c = head;
        }
        for (; c + VLEN <= C; c += VLEN) v_stream(dx + c, VALUE(c, VLEN));
    }
    for (; c < C; c += VLEN) {
        const int64_t n = min_i64(VLEN, C - c);
        STORE(dx, c, VALUE(c, n), n);
    }
#undef VALUE
#undef LOAD
#undef STORE
}

static void norm_backward_row(real* dx, real* dw, real* db, const real* dy, const real* x,
                              const real* weight, real mean, real rstd, int64_t C, int rms,
                              int stream)
{
    const int sums = dw || db;
#define ROW(W, DW, DB) norm_backward_row_impl(dx, DW, DB, dy, x, W, mean, rstd, C, rms, stream)
    if (rms) {
        if (weight) { if (sums) ROW(weight, dw, NULL); else ROW(weight, NULL, NULL); }
        else { if (sums) ROW(NULL, dw, NULL); else ROW(NULL, NULL, NULL); }
    } else if (weight) {
        if (sums) ROW(weight, dw, db); else ROW(weight, NULL, NULL);
    } else {
        if (sums) ROW(NULL, dw, db); else ROW(NULL, NULL, NULL);
    }
#undef ROW
}

typedef struct {
    real* dx;
    const real* dy;
    const real* mean; /* (N), NULL for RMS norm */
    const real* rstd; /* (N) */
    const real* x;
    const real* weight;
    int64_t N, C, dx_row_stride, dy_row_stride, x_row_stride;
    int rms;
    const colsum* sums; /* NULL: no dweight, no dbias */
    int want_dw, want_db;
    int stream; /* write dx past the caches (it is larger than they are) */
} norm_backward_job;

/* Block b of rows (colsum.h's blocks, used whether or not sums are wanted) */
static void norm_backward_block(const norm_backward_job* j, int64_t blocks, int64_t b)
{
    const int64_t begin = colsum_first_row(j->N, blocks, b), end = colsum_first_row(j->N, blocks, b + 1);
    real* dw = j->sums && j->want_dw ? colsum_part(j->sums, b, 0) : NULL;
    real* db = j->sums && j->want_db && !j->rms ? colsum_part(j->sums, b, 1) : NULL;
    for (int64_t n = begin; n < end; n++) {
        norm_backward_row(j->dx + n * j->dx_row_stride, dw, db, j->dy + n * j->dy_row_stride,
                          j->x + n * j->x_row_stride, j->weight, j->rms ? 0 : j->mean[n],
                          j->rstd[n], j->C, j->rms, j->stream);
        if (j->sums && ((n - begin + 1) % COLSUM_FLUSH_ROWS == 0 || n + 1 == end))
            colsum_flush(j->sums, b);
    }
    if (j->stream) v_stream_fence();
}

static int norm_backward_run(norm_backward_job* j, real* dweight, real* dbias)
{
    if (j->N == 0 || j->C == 0) return 0;
    colsum sums;
    /* dy, x and dx together larger than the L3: dx past the caches (softmax.c) */
    j->stream = 3 * j->N * j->C * (int64_t)sizeof(real) > 2 * STREAM_MIN_BYTES;
    j->want_dw = dweight != NULL;
    j->want_db = dbias != NULL;
    j->sums = NULL;
    if (dweight || dbias) {
        if (colsum_alloc(&sums, j->N, j->C, j->rms ? 1 : 2) != 0) return -1;
        j->sums = &sums;
    }
    const int64_t blocks = colsum_blocks(j->N, j->C);
    const int threads = attnkit_plan_threads(blocks, (j->N / blocks + 1) * j->C * 3);
    if (threads <= 1) {
        for (int64_t b = 0; b < blocks; b++) norm_backward_block(j, blocks, b);
    } else {
        const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
        {
            const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(dynamic, 1)
            for (int64_t b = 0; b < blocks; b++) norm_backward_block(j, blocks, b);
            fp_controls_restore(own_fp);
        }
    }
    if (j->sums) {
        real* const out[2] = {dweight, dbias};
        colsum_finish(&sums, out);
    }
    return 0;
}

int KERNEL(layer_norm_backward)(real* dx, real* dweight, real* dbias, const real* dy,
                                const real* mean, const real* rstd, const real* x,
                                const real* weight, int64_t N, int64_t C, int64_t dx_row_stride,
                                int64_t dy_row_stride, int64_t x_row_stride)
{
    norm_backward_job j = {dx, dy, mean, rstd, x, weight, N, C, dx_row_stride, dy_row_stride,
                           x_row_stride, 0, NULL, 0, 0, 0};
    return norm_backward_run(&j, dweight, dbias);
}

int KERNEL(rms_norm_backward)(real* dx, real* dweight, const real* dy, const real* rrms,
                              const real* x, const real* weight, int64_t N, int64_t C,
                              int64_t dx_row_stride, int64_t dy_row_stride, int64_t x_row_stride)
{
    norm_backward_job j = {dx, dy, NULL, rrms, x, weight, N, C, dx_row_stride, dy_row_stride,
                           x_row_stride, 1, NULL, 0, 0, 0};
    return norm_backward_run(&j, dweight, NULL);
}
