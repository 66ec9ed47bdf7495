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
 * never cached: a weight edited in place (lin.weight[:] = w, an optimiser's
 * step) is what the next call sees, with no packed copy to go stale. The
 * rows path packs what it needs of w into each task's workspace as it goes.
 *
 * Two paths, chosen by M alone, so that no result depends on the number of
 * threads (each output element is summed by one thread, in one order):
 *
 *  rows path (M > FEW_ROWS): the micro-kernel (tiles.h) on packed panels of
 *    x and w, as BLIS does (below).
 *  few rows (decoding, a sentence of a few tokens): dot products along K,
 *    DR rows by DF features at a time in DR*DF vector accumulators, each
 *    reduced once; w is read once, at memory speed.
 */
#include <stdlib.h>

#include "attnkit.h"
#include "simd.h"
#include "tiles.h"

/* M at or below which the dot-product path runs. Where the two cross, M
 * from 32 to 48, was measured on one AVX-512 core (K, N = 384, 1152 and
 * 1536, 384): the rows path packs each panel of w for at most M rows. */
enum { FEW_ROWS = 40 };
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
 * The rows path, BLIS's way round: C (MR rows, NR features) = xp (MR, K) @
 * wp (K, NR), with xp a micro-panel of the task's rows of x (MR of them,
 * interleaved along K) and wp NR of w's rows transposed, both packed into the
 * workspace by the task. A task is a group of up to RG rows against a chunk
 * of up to FCHUNK features: it packs its rows once, then each panel of w,
 * KC of K at a time (KC * NR reals, 32 KB, stay in L1), which every
 * micro-panel of rows then meets. Per task RG*K + FCHUNK*K reals are packed
 * for RG*FCHUNK*K multiply-adds. The blocks of K are summed in order, so the
 * order of every sum is fixed by the shape.
 */
enum { FCHUNK = 16 * NR, RG = 32 * MR, KC = 8192 / NR, LDC = FCHUNK + 64 / (int)sizeof(real) };

typedef struct {
    real* xp; /* (RG/MR, KC, MR): KC columns of the task's rows, MR rows at a time */
    real* wp; /* (KC, NR): KC columns of NR of w's rows, transposed; features past N are 0 */
    real* ct; /* (RG, LDC): the task's sums, FCHUNK wide, a cache line of padding   */
    void* block;
} workspace;

static int workspace_alloc(workspace* ws)
{
    const int64_t xp_bytes = round_up(RG * KC * (int64_t)sizeof(real), 64);
    const int64_t wp_bytes = round_up(KC * NR * (int64_t)sizeof(real), 64);
    const int64_t ct_bytes = round_up(RG * LDC * (int64_t)sizeof(real), 64);
    if (posix_memalign(&ws->block, 64, (size_t)(xp_bytes + wp_bytes + ct_bytes)) != 0) return -1;
    ws->xp = (real*)ws->block;
    ws->wp = (real*)((char*)ws->block + xp_bytes);
    ws->ct = (real*)((char*)ws->block + xp_bytes + wp_bytes);
    return 0;
}

/* dst (K, width) = K columns of rows [first, first + count) of src (rows at
 * src_row), transposed; columns past count are 0. Each source row is read
 * straight through; the writes go down a column. */
static void pack_transposed(real* dst, int64_t width, const real* src, int64_t src_row, int64_t K,
                            int64_t first, int64_t count)
{
    for (int64_t j = 0; j < width; j++) {
        if (j < count) {
            const real* row = src + (first + j) * src_row;
            for (int64_t k = 0; k < K; k++) dst[k * width + j] = row[k];
        } else {
            for (int64_t k = 0; k < K; k++) dst[k * width + j] = 0;
        }
    }
}

/* alpha for the micro-kernel: C = 1 * C + A @ B adds a block of K to C */
static const real ONES[12] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
_Static_assert(MR <= 12, "ONES needs MR ones");

/* features [n0, n1) of rows [m0, m1), KC of K at a time: the block of
 * rows (RG x KC) is packed once into L2 and each panel of w (KC x NR) into
 * L1, where every micro-panel of the rows meets it. The sums build up in
 * ct, whose rows are LDC apart: out's rows may be a multiple of 4 KB apart,
 * and MR rows of C there would all fall in one set of L1. The epilogue
 * writes out from ct. */
static void rows_task(const workspace* ws, real* out, const real* x, int64_t x_row, const real* w,
                      const real* bias, int64_t N, int64_t K, int kind, int64_t n0, int64_t n1,
                      int64_t m0, int64_t m1)
{
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = min_i64(KC, K - k0);
        for (int64_t r = m0; r < m1; r += MR)
            pack_transposed(ws->xp + (r - m0) * kc, MR, x + k0, x_row, kc, r, min_i64(MR, m1 - r));
        for (int64_t n = n0; n < n1; n += NR) {
            pack_transposed(ws->wp, NR, w + k0, K, kc, n, min_i64(NR, n1 - n));
            for (int64_t r = m0; r < m1; r += MR)
                micro_kernel(ws->ct + (r - m0) * LDC + (n - n0), LDC, ws->xp + (r - m0) * kc, 1, MR,
                             ws->wp, NR, kc, min_i64(MR, m1 - r), k0 ? ONES : NULL);
        }
    }
    for (int64_t m = m0; m < m1; m++)
        KERNEL(activation_run)(out + m * N + n0, ws->ct + (m - m0) * LDC, bias ? bias + n0 : NULL, n1 - n0, kind);
}

static int rows_path(real* out, const real* x, int64_t x_row, const real* w, const real* bias,
                     int64_t M, int64_t N, int64_t K, int kind)
{
    const int64_t groups = (M + RG - 1) / RG, chunks = (N + FCHUNK - 1) / FCHUNK;
    const int64_t tasks = groups * chunks;
    const int threads = attnkit_plan_threads(tasks, RG * FCHUNK * K);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        workspace ws;
        const int ok = workspace_alloc(&ws) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!ok) continue;
            const int64_t g = t / chunks, c = t % chunks;
            rows_task(&ws, out, x, x_row, w, bias, N, K, kind, c * FCHUNK, min_i64(N, (c + 1) * FCHUNK),
                      g * RG, min_i64(M, (g + 1) * RG));
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
