/*
 * softmax.c: softmax and log-softmax along C of an (N, C, K) array.
 * The contract is in attnkit.h; simd.h says which ISA and precision this
 * copy is compiled for.
 *
 * Three passes over each slice, which stays in L1/L2 between them:
 *   1. m   = max(x)                      (masked elements count as -inf)
 *   2. e   = exp(x - m),  sum = sum(e)   (softmax stores e in out)
 *   3. out = e / sum                     softmax
 *      out = (x - m) - log(sum)          log_softmax
 * Subtracting the max keeps every exponential in [0, 1], so no logit, however
 * large, can overflow. A slice whose max is -inf has nothing to attend to:
 * m is taken as 0, every e is then 0 (or NaN, if the slice holds a NaN), and
 * sum == 0 turns into 0 (softmax) or -inf (log_softmax) instead of 0/0.
 */

#include "attnkit.h"
#include "simd.h"

/* Exponentials are added in `real` lanes for SUM_BLOCK elements, then the
 * block's total is added into a double. The block is short, so each lane adds
 * a handful of terms: a row of one 1 among many 1e-5 (a lone peak) loses at
 * most a few ulps of its sum, where a long block would lose the small terms'
 * bits against the large one. */
enum { SUM_BLOCK = 128 };

/* n lanes (n <= VLEN) of x, with lanes masked out by `where` (and lanes past
 * n) read as -inf. where == NULL means every element is in. */
AK_INLINE vreal load_masked(const real* x, const uint8_t* where, int64_t where_step, int64_t n)
{
    vreal v = n == VLEN ? v_load(x) : v_load_part(x, n, -INFINITY);
    if (where) v = v_select(v_where(where, where_step, n), v, v_set1(-INFINITY));
    return v;
}

AK_INLINE void store_n(real* p, vreal v, int64_t n)
{
    if (n == VLEN) v_store(p, v);
    else v_store_part(p, v, n);
}

/* One contiguous slice: out (C), x (C), where (C) at where_step or NULL.
 * Inlined twice below, once with where == NULL, so that the unmasked loops
 * carry no test of the mask. */
AK_INLINE void softmax_row_impl(real* out, const real* x, const uint8_t* where,
                                int64_t where_step, int64_t C, int take_log,
                                real* out_next, const real* x_next)
{
#define WHERE_AT(c) (where ? where + (c) * where_step : NULL)
    /* pass 1: the largest element */
    vreal m0 = v_set1(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t c = 0;
    for (; c + 4 * VLEN <= C; c += 4 * VLEN) {
        m0 = v_max(m0, load_masked(x + c, WHERE_AT(c), where_step, VLEN));
        m1 = v_max(m1, load_masked(x + c + VLEN, WHERE_AT(c + VLEN), where_step, VLEN));
        m2 = v_max(m2, load_masked(x + c + 2 * VLEN, WHERE_AT(c + 2 * VLEN), where_step, VLEN));
        m3 = v_max(m3, load_masked(x + c + 3 * VLEN, WHERE_AT(c + 3 * VLEN), where_step, VLEN));
    }
    for (; c < C; c += VLEN)
        m0 = v_max(m0, load_masked(x + c, WHERE_AT(c), where_step, min_i64(VLEN, C - c)));
    real m = v_reduce_max(v_max(v_max(m0, m1), v_max(m2, m3)));
    if (m == -INFINITY) m = 0; /* nothing to attend to: see the top of the file */
    const vreal vm = v_set1(m);

    /* pass 2: e = exp(x - m) and its sum */
    double sum = 0.0;
    for (int64_t block = 0; block < C; block += SUM_BLOCK) {
        const int64_t end = min_i64(C, block + SUM_BLOCK);
        vreal s0 = v_set1(0), s1 = s0;
        c = block;
        for (; c + 2 * VLEN <= end; c += 2 * VLEN) {
            vreal e0 = v_exp_nonpositive(v_sub(load_masked(x + c, WHERE_AT(c), where_step, VLEN), vm));
            vreal e1 = v_exp_nonpositive(
                v_sub(load_masked(x + c + VLEN, WHERE_AT(c + VLEN), where_step, VLEN), vm));
            if (!take_log) {
                v_store(out + c, e0);
                v_store(out + c + VLEN, e1);
            }
            prefetch_read(x_next, c, 2 * VLEN);
            prefetch_write(out_next, c, 2 * VLEN);
            s0 = v_add(s0, e0);
            s1 = v_add(s1, e1);
        }
        for (; c < end; c += VLEN) {
            const int64_t n = min_i64(VLEN, end - c);
            vreal e = v_exp_nonpositive(v_sub(load_masked(x + c, WHERE_AT(c), where_step, n), vm));
            if (!take_log) store_n(out + c, e, n);
            s0 = v_add(s0, e);
        }
        sum += v_reduce_add(v_add(s0, s1));
    }

    /* pass 3: normalise */
    if (!take_log) {
        const vreal inv = v_set1((real)(sum == 0.0 ? 0.0 : 1.0 / sum));
        for (c = 0; c + VLEN <= C; c += VLEN) v_store(out + c, v_mul(v_load(out + c), inv));
        if (c < C) v_store_part(out + c, v_mul(v_load_part(out + c, C - c, 0), inv), C - c);
    } else {
        const vreal lse = v_set1((real)(sum == 0.0 ? INFINITY : log(sum)));
        for (c = 0; c + VLEN <= C; c += VLEN)
            v_store(out + c, v_sub(v_sub(load_masked(x + c, WHERE_AT(c), where_step, VLEN), vm), lse));
        if (c < C)
            v_store_part(out + c, v_sub(v_sub(load_masked(x + c, WHERE_AT(c), where_step, C - c), vm), lse),
                         C - c);
    }
#undef WHERE_AT
}

/* out_next and x_next (or NULL) are the row the caller does next, to prefetch */
static void softmax_row(real* out, const real* x, const uint8_t* where, int64_t where_step,
                        int64_t C, int take_log, real* out_next, const real* x_next)
{
    if (where) softmax_row_impl(out, x, where, where_step, C, take_log, out_next, x_next);
    else softmax_row_impl(out, x, NULL, 0, C, take_log, out_next, x_next);
}

/* `width` (<= VLEN) neighbouring slices, one per lane: element (c, lane) of x
 * is x[c*x_step + lane], of where where[c*where_step_c + lane*where_step_i]. */
static void softmax_columns(real* out, const real* x, const uint8_t* where, int64_t width,
                            int64_t C, int64_t out_step, int64_t x_step,
                            int64_t where_step_c, int64_t where_step_i, int take_log)
{
#define WHERE_AT(c) (where ? where + (c) * where_step_c : NULL)
    /* pass 1: each lane's max; lanes with nothing to attend to use 0 */
    vreal vm = v_set1(-INFINITY);
    for (int64_t c = 0; c < C; c++)
        vm = v_max(vm, load_masked(x + c * x_step, WHERE_AT(c), where_step_i, width));
    vm = v_select(v_is_equal(vm, v_set1(-INFINITY)), v_set1(0), vm);

    /* pass 2: each lane's sum of exponentials, carried in double per block */
    double sum[VLEN] = {0};
    real lanes[VLEN];
    enum { ROWS_PER_BLOCK = 64 };
    for (int64_t block = 0; block < C; block += ROWS_PER_BLOCK) {
        const int64_t end = min_i64(C, block + ROWS_PER_BLOCK);
        vreal s = v_set1(0);
        for (int64_t c = block; c < end; c++) {
            vreal e = v_exp_nonpositive(v_sub(load_masked(x + c * x_step, WHERE_AT(c), where_step_i, width), vm));
            if (!take_log) store_n(out + c * out_step, e, width);
            s = v_add(s, e);
        }
        v_lanes(lanes, s);
        for (int k = 0; k < VLEN; k++) sum[k] += lanes[k];
    }

    /* pass 3: normalise, each lane by its own sum */
    for (int k = 0; k < VLEN; k++) {
        if (take_log) lanes[k] = (real)(sum[k] == 0.0 ? INFINITY : log(sum[k]));
        else lanes[k] = (real)(sum[k] == 0.0 ? 0.0 : 1.0 / sum[k]);
    }
    const vreal scale = v_load(lanes);
    for (int64_t c = 0; c < C; c++) {
        real* o = out + c * out_step;
        if (!take_log) {
            store_n(o, v_mul(width == VLEN ? v_load(o) : v_load_part(o, width, 0), scale), width);
        } else {
            vreal v = load_masked(x + c * x_step, WHERE_AT(c), where_step_i, width);
            store_n(o, v_sub(v_sub(v, vm), scale), width);
        }
    }
#undef WHERE_AT
}

/* Tasks [begin, end): rows when K == 1, (row, group of VLEN columns) pairs
 * otherwise. */
static void softmax_tasks(real* out, const real* x, const uint8_t* where,
                          const attnkit_softmax_args* a, int64_t begin, int64_t end)
{
    const attnkit_strides os = a->out_strides, xs = a->x_strides, ws = a->where_strides;
    if (a->K == 1) {
        for (int64_t n = begin; n < end; n++) {
            const int last = n + 1 == end;
            softmax_row(out + n * os.n, x + n * xs.n, where ? where + n * ws.n : NULL, ws.c,
                        a->C, a->log, last ? NULL : out + (n + 1) * os.n,
                        last ? NULL : x + (n + 1) * xs.n);
        }
        return;
    }
    const int64_t groups = (a->K + VLEN - 1) / VLEN;
    for (int64_t t = begin; t < end; t++) {
        const int64_t n = t / groups, i0 = (t % groups) * VLEN;
        softmax_columns(out + n * os.n + i0, x + n * xs.n + i0,
                        where ? where + n * ws.n + i0 * ws.k : NULL, min_i64(VLEN, a->K - i0),
                        a->C, os.c, xs.c, ws.c, ws.k, a->log);
    }
}

void KERNEL(softmax)(real* out, const real* x, const uint8_t* where, const attnkit_softmax_args* a)
{
    if (a->N == 0 || a->C == 0 || a->K == 0) return;
    const int64_t tasks = a->K == 1 ? a->N : a->N * ((a->K + VLEN - 1) / VLEN);
    /* an exponential costs about four of a norm's element-operations */
    const int64_t work_per_task = 4 * (a->K == 1 ? a->C : a->C * VLEN);
    const int threads = attnkit_plan_threads(tasks, work_per_task);
    if (threads <= 1) {
        softmax_tasks(out, x, where, a, 0, tasks);
        return;
    }
    /* Chunks of tasks go to whichever thread is free, so a thread slowed by
     * another process does not hold the rest back. Every task is computed
     * whole by one thread, so how they are dealt never changes a result. */
    const int64_t chunk = attnkit_chunk_size(tasks, threads);
    const int64_t chunks = (tasks + chunk - 1) / chunk;
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < chunks; k++)
            softmax_tasks(out, x, where, a, k * chunk, min_i64(tasks, (k + 1) * chunk));
        fp_controls_restore(own_fp);
    }
}

/* ---------------------------------------------------------------------------
 * Backward (the contract is in attnkit.h), two passes over each slice:
 *   1. s = sum(dy * y) (softmax), or s = sum(dy) and m = max(y) (log_softmax),
 *      over the kept elements, in `real` lanes for a block of elements and
 *      then in double, as the forward's sum (BACKWARD_SUM_VECTORS below)
 *   2. dx = y * (dy - s)  or  dx = dy - exp(y) * s;  0 where masked out
 * log_softmax's y is <= 0 (-log of a sum >= 1, or -inf), so exp(y) is
 * v_exp_nonpositive's; m == -inf marks the forward's empty slice (every
 * kept y is -inf), whose gradient is 0, not dy.
 */

/* n lanes (n <= VLEN) of p, lanes past n read as fill */
AK_INLINE vreal load_n(const real* p, int64_t n, real fill)
{
    return n == VLEN ? v_load(p) : v_load_part(p, n, fill);
}

/* Pass 1's sums are added in `real` lanes for BACKWARD_SUM_VECTORS vectors
 * (four accumulators, so each lane takes 8 terms) and then into a double:
 * longer blocks than the forward's, as each term here is a plain load and
 * multiply and the block's reduction would otherwise cost as much as the
 * block. */
enum { BACKWARD_SUM_VECTORS = 32 };

/* Pass 1's term at c (n <= VLEN lanes): dy * y, or dy with the max of y
 * kept in *m (log_softmax); 0 (and -inf for the max) where masked out. */
AK_INLINE vreal backward_term(const real* dy, const real* y, const uint8_t* where,
                              int64_t where_step, int64_t c, int64_t n, int take_log, vreal* m)
{
    vreal t = load_n(dy + c, n, 0);
    const vmask k = where ? v_where(where + c * where_step, where_step, n) : v_is_equal(t, t);
    if (take_log) {
        vreal yv = load_n(y + c, n, -INFINITY);
        if (where) {
            t = v_select(k, t, v_set1(0));
            yv = v_select(k, yv, v_set1(-INFINITY));
        }
        *m = v_max(*m, yv);
        return t;
    }
    t = v_mul(t, load_n(y + c, n, 0));
    return where ? v_select(k, t, v_set1(0)) : t;
}

/* Pass 2's result at c (n <= VLEN lanes) */
AK_INLINE vreal backward_value(const real* dy, const real* y, const uint8_t* where,
                               int64_t where_step, int64_t c, int64_t n, int take_log, vreal vs)
{
    const vreal vdy = load_n(dy + c, n, 0), vy = load_n(y + c, n, take_log ? -INFINITY : 0);
    const vreal d = take_log ? v_sub(vdy, v_mul(v_exp_nonpositive(vy), vs)) : v_mul(vy, v_sub(vdy, vs));
    return where ? v_select(v_where(where + c * where_step, where_step, n), d, v_set1(0)) : d;
}

/* One contiguous slice: dx, dy, y (C), where (C) at where_step or NULL.
 * Inlined twice below, once with where == NULL, as softmax_row_impl. With
 * `stream`, whole aligned vectors of dx are written past the caches. */
AK_INLINE void softmax_backward_row_impl(real* dx, const real* dy, const real* y,
                                         const uint8_t* where, int64_t where_step, int64_t C,
                                         int take_log, int stream)
{
    /* pass 1 */
    dsum total = {0.0, 0.0};
    vreal m0 = v_set1(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    for (int64_t block = 0; block < C; block += BACKWARD_SUM_VECTORS * VLEN) {
        const int64_t end = min_i64(C, block + BACKWARD_SUM_VECTORS * VLEN);
        vreal s0 = v_set1(0), s1 = s0, s2 = s0, s3 = s0;
        int64_t c = block;
        for (; c + 4 * VLEN <= end; c += 4 * VLEN) {
            s0 = v_add(s0, backward_term(dy, y, where, where_step, c, VLEN, take_log, &m0));
            s1 = v_add(s1, backward_term(dy, y, where, where_step, c + VLEN, VLEN, take_log, &m1));
            s2 = v_add(s2, backward_term(dy, y, where, where_step, c + 2 * VLEN, VLEN, take_log, &m2));
            s3 = v_add(s3, backward_term(dy, y, where, where_step, c + 3 * VLEN, VLEN, take_log, &m3));
        }
        for (; c < end; c += VLEN)
            s0 = v_add(s0, backward_term(dy, y, where, where_step, c, min_i64(VLEN, end - c), take_log, &m0));
        dsum_add(&total, v_reduce_add(v_add(v_add(s0, s1), v_add(s2, s3))));
    }
    const double s = dsum_value(total);
    const int empty = take_log && v_reduce_max(v_max(v_max(m0, m1), v_max(m2, m3))) == -INFINITY;
    /* pass 2 */
    if (empty) { /* zeros are written as any result is, streamed or not */
        for (int64_t c = 0; c < C; c += VLEN) store_n(dx + c, v_set1(0), min_i64(VLEN, C - c));
        return;
    }
    const vreal vs = v_set1((real)s);
    int64_t c = 0;
    if (stream) {
        const int64_t head = stream_head(dx);
        if (head > 0 && head < C) {
            v_store_part(dx, backward_value(dy, y, where, where_step, 0, head, take_log, vs), head);
            c = head;
        }
        for (; c + VLEN <= C; c += VLEN)
            v_stream(dx + c, backward_value(dy, y, where, where_step, c, VLEN, take_log, vs));
    }
    for (; c < C; c += VLEN) {
        const int64_t n = min_i64(VLEN, C - c);
        store_n(dx + c, backward_value(dy, y, where, where_step, c, n, take_log, vs), n);
    }
}

static void softmax_backward_row(real* dx, const real* dy, const real* y, const uint8_t* where,
                                 int64_t where_step, int64_t C, int take_log, int stream)
{
    if (where) softmax_backward_row_impl(dx, dy, y, where, where_step, C, take_log, stream);
    else if (stream) softmax_backward_row_impl(dx, dy, y, NULL, 0, C, take_log, 1);
    else softmax_backward_row_impl(dx, dy, y, NULL, 0, C, take_log, 0);
}

/* `width` (<= VLEN) neighbouring slices, one per lane, as softmax_columns:
 * element (c, lane) of dy at dy[c*dy_step + lane], of where at
 * where[c*where_step_c + lane*where_step_i]. */
static void softmax_backward_columns(real* dx, const real* dy, const real* y, const uint8_t* where,
                                     int64_t width, int64_t C, int64_t dx_step, int64_t dy_step,
                                     int64_t y_step, int64_t where_step_c, int64_t where_step_i,
                                     int take_log)
{
    const vreal zero = v_set1(0);
    /* pass 1: each lane's sum, carried in double per block, and max of y */
    dsum sum[VLEN] = {{0.0, 0.0}};
    real lanes[VLEN];
    vreal vm = v_set1(-INFINITY);
    enum { ROWS_PER_BLOCK = 64 };
    for (int64_t block = 0; block < C; block += ROWS_PER_BLOCK) {
        const int64_t end = min_i64(C, block + ROWS_PER_BLOCK);
        vreal s = zero;
        for (int64_t c = block; c < end; c++) {
            vreal t = load_n(dy + c * dy_step, width, 0);
            vreal yv = load_n(y + c * y_step, width, take_log ? -INFINITY : 0);
            if (where) {
                const vmask k = v_where(where + c * where_step_c, where_step_i, width);
                t = v_select(k, t, zero);
                yv = v_select(k, yv, take_log ? v_set1(-INFINITY) : zero);
            }
            if (take_log) vm = v_max(vm, yv);
            else t = v_mul(t, yv);
            s = v_add(s, t);
        }
        v_lanes(lanes, s);
        for (int k = 0; k < VLEN; k++) dsum_add(&sum[k], lanes[k]);
    }
    /* pass 2: a lane whose slice is empty (log_softmax) gets 0 */
    for (int k = 0; k < VLEN; k++) lanes[k] = (real)dsum_value(sum[k]);
    const vreal vs = v_load(lanes);
    const vmask empty = v_is_equal(vm, v_set1(-INFINITY));
    for (int64_t c = 0; c < C; c++) {
        const vreal vdy = load_n(dy + c * dy_step, width, 0);
        const vreal vy = load_n(y + c * y_step, width, take_log ? -INFINITY : 0);
        vreal d = take_log ? v_sub(vdy, v_mul(v_exp_nonpositive(vy), vs)) : v_mul(vy, v_sub(vdy, vs));
        if (take_log) d = v_select(empty, zero, d);
        if (where) d = v_select(v_where(where + c * where_step_c, where_step_i, width), d, zero);
        store_n(dx + c * dx_step, d, width);
    }
}

static void softmax_backward_tasks(real* dx, const real* dy, const real* y, const uint8_t* where,
                                   const attnkit_softmax_backward_args* a, int64_t begin, int64_t end)
{
    const attnkit_strides xs = a->dx_strides, ds = a->dy_strides, ys = a->y_strides,
                          ws = a->where_strides;
    if (a->K == 1) {
        /* when dy, y and dx together are larger than the L3 (2 x STREAM_MIN_BYTES,
         * simd.h), dx is written past the caches (as the forward's out): that
         * spares reading each of its lines in first, a quarter of the traffic.
         * Below, streaming costs more than it saves: 12288 x 128 float took
         * 1.3x as long streamed, 4096 x 1024 0.85x. */
        const int stream = 3 * a->N * a->C * (int64_t)sizeof(real) > 2 * STREAM_MIN_BYTES;
        for (int64_t n = begin; n < end; n++)
            softmax_backward_row(dx + n * xs.n, dy + n * ds.n, y + n * ys.n,
                                 where ? where + n * ws.n : NULL, ws.c, a->C, a->log, stream);
        if (stream) v_stream_fence();
        return;
    }
    const int64_t groups = (a->K + VLEN - 1) / VLEN;
    for (int64_t t = begin; t < end; t++) {
        const int64_t n = t / groups, i0 = (t % groups) * VLEN;
        softmax_backward_columns(dx + n * xs.n + i0, dy + n * ds.n + i0, y + n * ys.n + i0,
                                 where ? where + n * ws.n + i0 * ws.k : NULL,
                                 min_i64(VLEN, a->K - i0), a->C, xs.c, ds.c, ys.c, ws.c, ws.k,
                                 a->log);
    }
}

void KERNEL(softmax_backward)(real* dx, const real* dy, const real* y, const uint8_t* where,
                              const attnkit_softmax_backward_args* a)
{
    if (a->N == 0 || a->C == 0 || a->K == 0) return;
    const int64_t tasks = a->K == 1 ? a->N : a->N * ((a->K + VLEN - 1) / VLEN);
    /* two passes of a few operations; log_softmax's exponential costs more */
    const int64_t work_per_task = (a->log ? 4 : 2) * (a->K == 1 ? a->C : a->C * VLEN);
    const int threads = attnkit_plan_threads(tasks, work_per_task);
    if (threads <= 1) {
        softmax_backward_tasks(dx, dy, y, where, a, 0, tasks);
        return;
    }
    /* as the forward: every slice is computed whole by one thread */
    const int64_t chunk = attnkit_chunk_size(tasks, threads);
    const int64_t chunks = (tasks + chunk - 1) / chunk;
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t k = 0; k < chunks; k++)
            softmax_backward_tasks(dx, dy, y, where, a, k * chunk, min_i64(tasks, (k + 1) * chunk));
        fp_controls_restore(own_fp);
    }
}
