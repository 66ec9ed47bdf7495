/*
 * gemm.c: a linear layer's product on attnkit's threads,
 *
 *   out (M, N) = f(x (M, K) @ w (N, K)^T + bias (N))
 *
 * with f one of attnkit_bias_activation's kinds, applied as each task's
 * last step while its rows are still in cache. The contract is in
 * attnkit.h; simd.h says which ISA and precision.
 *
 * w is read in place, in PyTorch's (out_features, in_features) layout, and
 * never packed: a weight edited in place (lin.weight[:] = w, an optimiser's
 * step) is what the next call sees, with no cached copy to go stale. What is
 * packed is a panel of x's rows, once per task.
 *
 * Two paths, chosen by M alone, so that no result depends on the number of
 * threads (each output element is summed by one thread, in one order):
 *
 *  rows path (M > FEW_ROWS): the micro-kernel (tiles.h) computes tiles of
 *    out^T: C (MR features, NR rows) = w (MR, K) @ xt (K, NR), w's elements
 *    broadcast from its rows, xt the task's NR rows of x transposed into the
 *    workspace. A task is FC features by NR rows; the tasks over one block of
 *    features come one after another, so that block of w stays in L2 while
 *    the panels of x pass through.
 *  few rows (decoding, a sentence of a few tokens): dot products along K,
 *    DR rows by DF features at a time in DR*DF vector accumulators, each
 *    reduced once; w is read once, at memory speed.
 */
#include <stdlib.h>

#include "attnkit.h"
#include "simd.h"
#include "tiles.h"

/* M at or below which the dot-product path runs: below NR/2 rows a panel of
 * the rows path is more than half padding. */
enum { FEW_ROWS = NR / 2 > 4 ? NR / 2 : 4 };
/* the few-rows path's register block, and the features a task takes */
enum { DR = 4, DF = 4, FEW_FEATURES = 64 };

/* ---------------------------------------------------------------------------
 * The few-rows path
 */

/* out[m][n] = x[m] . w[n] for dr rows from m0 and df features from n0; rows
 * and features past dr, df repeat the last one and are not stored, so each
 * (dr, df) is one fully unrolled body. */
AK_INLINE void dot_block(real* out, int64_t N, const real* x, int64_t x_row, const real* w,
                         int64_t K, int64_t m0, int64_t n0, int dr, int df)
{
    vreal acc[DR][DF];
    const real* xr[DR];
    const real* wr[DF];
#pragma GCC unroll 4
    for (int i = 0; i < DR; i++) xr[i] = x + (m0 + (i < dr ? i : dr - 1)) * x_row;
#pragma GCC unroll 4
    for (int j = 0; j < DF; j++) wr[j] = w + (n0 + (j < df ? j : df - 1)) * K;
#pragma GCC unroll 4
    for (int i = 0; i < DR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < DF; j++) acc[i][j] = v_set1(0);
    int64_t k = 0;
    for (; k + VLEN <= K; k += VLEN) {
        vreal wv[DF];
#pragma GCC unroll 4
        for (int j = 0; j < DF; j++) wv[j] = v_load(wr[j] + k);
#pragma GCC unroll 4
        for (int i = 0; i < DR; i++) {
            const vreal xv = v_load(xr[i] + k);
#pragma GCC unroll 4
            for (int j = 0; j < DF; j++) acc[i][j] = v_fma(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) { /* the last K % VLEN, zero-filled */
        vreal wv[DF];
#pragma GCC unroll 4
        for (int j = 0; j < DF; j++) wv[j] = v_load_part(wr[j] + k, K - k, 0);
#pragma GCC unroll 4
        for (int i = 0; i < DR; i++) {
            const vreal xv = v_load_part(xr[i] + k, K - k, 0);
#pragma GCC unroll 4
            for (int j = 0; j < DF; j++) acc[i][j] = v_fma(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < dr; i++)
        for (int j = 0; j < df; j++) out[(m0 + i) * N + n0 + j] = (real)v_reduce_add(acc[i][j]);
}

/* features [n0, n1) of every row */
static void few_rows_task(real* out, const real* x, int64_t x_row, const real* w, const real* bias,
                          int64_t M, int64_t N, int64_t K, int kind, int64_t n0, int64_t n1)
{
    for (int64_t n = n0; n < n1; n += DF) {
        const int df = (int)min_i64(DF, n1 - n);
        for (int64_t m = 0; m < M; m += DR) {
            const int dr = (int)min_i64(DR, M - m);
            /* constant (dr, df) in the common cases, so the body unrolls */
            if (dr == DR && df == DF) dot_block(out, N, x, x_row, w, K, m, n, DR, DF);
            else if (dr == 1 && df == DF) dot_block(out, N, x, x_row, w, K, m, n, 1, DF);
            else if (dr == 2 && df == DF) dot_block(out, N, x, x_row, w, K, m, n, 2, DF);
            else if (dr == 3 && df == DF) dot_block(out, N, x, x_row, w, K, m, n, 3, DF);
            else dot_block(out, N, x, x_row, w, K, m, n, dr, df);
        }
    }
    if (bias || kind != ATTNKIT_IDENTITY)
        for (int64_t m = 0; m < M; m++)
            KERNEL(activation_run)(out + m * N + n0, out + m * N + n0, bias ? bias + n0 : NULL, n1 - n0, kind);
}

static void few_rows(real* out, const real* x, int64_t x_row, const real* w, const real* bias,
                     int64_t M, int64_t N, int64_t K, int kind)
{
    const int64_t tasks = (N + FEW_FEATURES - 1) / FEW_FEATURES;
    const int threads = attnkit_plan_threads(tasks, FEW_FEATURES * M * K);
    if (threads <= 1) {
        few_rows_task(out, x, x_row, w, bias, M, N, K, kind, 0, N);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; t++)
        few_rows_task(out, x, x_row, w, bias, M, N, K, kind, t * FEW_FEATURES,
                      min_i64(N, (t + 1) * FEW_FEATURES));
}

/* ---------------------------------------------------------------------------
 * The rows path
 *
 * A task is a group of up to PG panels of NR rows against a chunk of up to
 * FCHUNK features. It transposes its panels of x into the workspace once, then
 * walks w's rows MR at a time, each met by every panel of the group while it
 * is in L1. Per task: PG*NR*K reals packed for PG*NR*FCHUNK*K multiply-adds.
 */
enum { FCHUNK = 32 * MR, PANELS_BYTES = 256 * 1024, PG_MAX = 4 };

typedef struct {
    real* xt; /* (PG, K, NR): each panel's rows of x, transposed; rows past M are 0 */
    real* ct; /* (MR, NR): one tile of out^T                                        */
    void* block;
} workspace;

/* panels per group: as many as keep PANELS_BYTES of transposed x */
static int64_t panel_group(int64_t K)
{
    const int64_t fit = PANELS_BYTES / (K * NR * (int64_t)sizeof(real));
    return fit < 1 ? 1 : fit > PG_MAX ? PG_MAX : fit;
}

static int workspace_alloc(workspace* ws, int64_t K, int64_t pg)
{
    const int64_t xt_bytes = round_up(pg * K * NR * (int64_t)sizeof(real), 64);
    const int64_t ct_bytes = round_up(MR * NR * (int64_t)sizeof(real), 64);
    if (posix_memalign(&ws->block, 64, (size_t)(xt_bytes + ct_bytes)) != 0) return -1;
    ws->xt = (real*)ws->block;
    ws->ct = (real*)((char*)ws->block + xt_bytes);
    return 0;
}

/* xt (K, NR) = rows [m0, m0 + rows) of x, transposed, zero past rows; read
 * a row at a time (contiguous), written down a column */
static void transpose_panel(real* xt, const real* x, int64_t x_row, int64_t K, int64_t m0, int64_t rows)
{
    for (int64_t j = 0; j < NR; j++) {
        if (j < rows) {
            const real* xr = x + (m0 + j) * x_row;
            for (int64_t k = 0; k < K; k++) xt[k * NR + j] = xr[k];
        } else {
            for (int64_t k = 0; k < K; k++) xt[k * NR + j] = 0;
        }
    }
}

/* features [n0, n1) of rows [m0, m1) */
static void rows_task(const workspace* ws, real* out, const real* x, int64_t x_row, const real* w,
                      const real* bias, int64_t N, int64_t K, int kind, int64_t n0, int64_t n1,
                      int64_t m0, int64_t m1)
{
    const int64_t panels = (m1 - m0 + NR - 1) / NR;
    for (int64_t p = 0; p < panels; p++)
        transpose_panel(ws->xt + p * K * NR, x, x_row, K, m0 + p * NR, min_i64(NR, m1 - m0 - p * NR));
    for (int64_t n = n0; n < n1; n += MR) {
        const int64_t mr = min_i64(MR, n1 - n);
        for (int64_t p = 0; p < panels; p++) {
            const int64_t first = m0 + p * NR, rows = min_i64(NR, m1 - first);
            micro_kernel(ws->ct, NR, w + n * K, K, 1, ws->xt + p * K * NR, NR, K, mr, NULL);
            for (int64_t j = 0; j < rows; j++) {
                real* orow = out + (first + j) * N + n;
                for (int64_t i = 0; i < mr; i++) orow[i] = ws->ct[i * NR + j];
            }
        }
    }
    if (bias || kind != ATTNKIT_IDENTITY)
        for (int64_t m = m0; m < m1; m++)
            KERNEL(activation_run)(out + m * N + n0, out + m * N + n0, bias ? bias + n0 : NULL, n1 - n0, kind);
}

static int rows_path(real* out, const real* x, int64_t x_row, const real* w, const real* bias,
                     int64_t M, int64_t N, int64_t K, int kind)
{
    const int64_t pg = panel_group(K), group_rows = pg * NR;
    const int64_t groups = (M + group_rows - 1) / group_rows, chunks = (N + FCHUNK - 1) / FCHUNK;
    const int64_t tasks = groups * chunks;
    const int threads = attnkit_plan_threads(tasks, group_rows * FCHUNK * K);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        workspace ws;
        const int ok = workspace_alloc(&ws, K, pg) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!ok) continue;
            const int64_t g = t / chunks, c = t % chunks;
            rows_task(&ws, out, x, x_row, w, bias, N, K, kind, c * FCHUNK, min_i64(N, (c + 1) * FCHUNK),
                      g * group_rows, min_i64(M, (g + 1) * group_rows));
        }
        if (ok) free(ws.block);
    }
    return failed ? -1 : 0;
}

int KERNEL(linear)(real* out, const real* x, const real* w, const real* bias, int64_t M, int64_t N,
                   int64_t K, int64_t x_row, int kind)
{
    if (M == 0 || N == 0) return 0;
    if (K == 0) { /* an empty sum: f(bias) */
        for (int64_t m = 0; m < M; m++) {
            for (int64_t n = 0; n < N; n++) out[m * N + n] = 0;
            KERNEL(activation_run)(out + m * N, out + m * N, bias, N, kind);
        }
        return 0;
    }
    if (M <= FEW_ROWS) {
        few_rows(out, x, x_row, w, bias, M, N, K, kind);
        return 0;
    }
    return rows_path(out, x, x_row, w, bias, M, N, K, kind);
}
