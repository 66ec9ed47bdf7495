/*
 * gemm.c: a linear layer's products on attnkit's threads,
 *
 *   out (M, N) = f(x (M, K) @ w (N, K)^T + bias (N)) + residual (M, N)
 *   dx (M, K) = dy (M, N) @ w;  dw (N, K) += dy^T @ x;  dbias (N) += sum of dy's rows
 *
 * with f one of attnkit_bias_activation's kinds, applied (and the residual
 * added) as each task's last step while its rows are still in cache. The
 * contract is in attnkit.h; simd.h says which ISA and precision.
 *
 * w is read in place, in PyTorch's (out_features, in_features) layout or
 * stored transposed, and never cached or packed beyond a task: a weight
 * edited in place (lin.weight[:] = w, an optimiser's step) is what the next
 * call sees, with no copy to go stale.
 *
 * The paths, chosen by the shapes alone, so that no result depends on the
 * number of threads (each output element is summed by one thread, in one
 * order):
 *
 *  rows path (M > FEW_ROWS, w's rows along K): the micro-kernel (tiles.h)
 *    on tiles of out^T, w's rows broadcast in place and x's rows transposed
 *    per task, VLEN x VLEN blocks through the registers (below).
 *  few rows (decoding, a sentence of a few tokens): dot products along K,
 *    DR rows by DF features at a time in DR*DF vector accumulators, their
 *    lanes summed together through one transpose; w is read once, at
 *    memory speed, its rows prefetched ahead.
 *  the product (w stored transposed, and both products of the backward):
 *    C (+)= A @ B with A read at any strides, BLIS's loop order; few rows
 *    against a transposed w go through axpy tiles instead.
 */
#include <stdlib.h>

#include "attnkit.h"
#include "simd.h"
#include "tiles.h"

/* M at or below which the dot-product path runs; where the two paths
 * crossed, measured on one AVX-512 core (K, N = 384, 1152 and 1536, 384). */
enum { FEW_ROWS = 24 };
/* the few-rows path's register block, and the features a task takes */
enum { DR = 4, DF = 4, FEW_FEATURES = 64 };
_Static_assert((DR * DF) % VLEN == 0, "the lane sums go VLEN accumulators at a time");
/* how far ahead along a row of w the few-rows path asks for it, in reals */
enum { PREFETCH_AHEAD = 1024 / (int)sizeof(real) };
/* both paths sum K in blocks of KC (a multiple of every VLEN); the rows
 * path's panel of x, KC x NR, stays in L1 */
enum { KC = 256 };

/* A row's epilogue: out (n) = f(x (n) + bias (n)) + residual (n); bias and
 * residual may be NULL, out may be x. The residual (a transformer's skip
 * connection) is added while the row is in cache, not in a pass of its own. */
static void epilogue(real* out, const real* x, const real* bias, const real* residual, int64_t n, int kind)
{
    if (bias || kind != ATTNKIT_IDENTITY || x != out) KERNEL(activation_run)(out, x, bias, n, kind);
    if (residual)
        for (int64_t j = 0; j < n; j++) out[j] += residual[j];
}

/* The epilogue in place on features [n0, n1) of rows [m0, m1) of c (rows at
 * ldc; residual's rows at ldc too), when there is one to apply. */
static void finish_rows(real* c, int64_t ldc, const real* bias, const real* residual, int kind, int64_t m0,
                        int64_t m1, int64_t n0, int64_t n1)
{
    if (!bias && kind == ATTNKIT_IDENTITY && !residual) return;
    for (int64_t m = m0; m < m1; m++)
        epilogue(c + m * ldc + n0, c + m * ldc + n0, bias ? bias + n0 : NULL,
                 residual ? residual + m * ldc + n0 : NULL, n1 - n0, kind);
}

/* ---------------------------------------------------------------------------
 * The few-rows path
 */

/* out[m][n] = x[m] . w[n] for dr rows from m0 and df features from n0; rows
 * and features past dr, df repeat the last one and are not stored, so each
 * (dr, df) is one fully unrolled body. Each block of KC along K is summed on
 * its own and then added to the total, as the rows path sums: a long dot
 * product then rounds like one of KC terms plus one of K / KC. */
AK_INLINE void dot_block(real* out, int64_t N, const real* x, int64_t x_row, const real* w,
                         int64_t w_row, int64_t K, int64_t m0, int64_t n0, int dr, int df)
{
    vreal acc[DR][DF];
    const real* xr[DR];
    const real* wr[DF];
#pragma GCC unroll 4
    for (int i = 0; i < DR; i++) xr[i] = x + (m0 + (i < dr ? i : dr - 1)) * x_row;
#pragma GCC unroll 4
    for (int j = 0; j < DF; j++) wr[j] = w + (n0 + (j < df ? j : df - 1)) * w_row;
    vreal total[DR][DF];
#pragma GCC unroll 4
    for (int i = 0; i < DR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < DF; j++) total[i][j] = v_set1(0);
    for (int64_t k = 0; k < K;) {
        const int64_t k_end = min_i64(K, k + KC);
#pragma GCC unroll 4
        for (int i = 0; i < DR; i++)
#pragma GCC unroll 4
            for (int j = 0; j < DF; j++) acc[i][j] = v_set1(0);
        for (; k + VLEN <= k_end; k += VLEN) {
            vreal wv[DF];
#pragma GCC unroll 4
            for (int j = 0; j < DF; j++) {
                __builtin_prefetch(wr[j] + k + PREFETCH_AHEAD);
                wv[j] = v_load(wr[j] + k);
            }
#pragma GCC unroll 4
            for (int i = 0; i < DR; i++) {
                const vreal xv = v_load(xr[i] + k);
#pragma GCC unroll 4
                for (int j = 0; j < DF; j++) acc[i][j] = v_fma(xv, wv[j], acc[i][j]);
            }
        }
        if (k < k_end) { /* the last K % VLEN, zero-filled */
            vreal wv[DF];
#pragma GCC unroll 4
            for (int j = 0; j < DF; j++) wv[j] = v_load_part(wr[j] + k, k_end - k, 0);
#pragma GCC unroll 4
            for (int i = 0; i < DR; i++) {
                const vreal xv = v_load_part(xr[i] + k, k_end - k, 0);
#pragma GCC unroll 4
                for (int j = 0; j < DF; j++) acc[i][j] = v_fma(xv, wv[j], acc[i][j]);
            }
            k = k_end;
        }
#pragma GCC unroll 4
        for (int i = 0; i < DR; i++)
#pragma GCC unroll 4
            for (int j = 0; j < DF; j++) total[i][j] = v_add(total[i][j], acc[i][j]);
    }
    /* each accumulator's lanes summed, VLEN accumulators at a time: once
     * transposed, adding the rows (a tree) gives their VLEN sums in one
     * vector, a few shuffles each instead of a reduction each */
    real sums[DR * DF];
#pragma GCC unroll 16
    for (int g = 0; g < DR * DF; g += VLEN) {
        vreal r[VLEN];
#pragma GCC unroll 16
        for (int t = 0; t < VLEN; t++) r[t] = total[(g + t) / DF][(g + t) % DF];
        v_transpose(r);
#pragma GCC unroll 4
        for (int step = 1; step < VLEN; step *= 2)
#pragma GCC unroll 8
            for (int t = 0; t + step < VLEN; t += 2 * step) r[t] = v_add(r[t], r[t + step]);
        v_lanes(sums + g, r[0]);
    }
    for (int i = 0; i < dr; i++)
        for (int j = 0; j < df; j++) out[(m0 + i) * N + n0 + j] = sums[i * DF + j];
}

/* features [n0, n1) of every row */
static void few_rows_task(real* out, const real* x, int64_t x_row, const real* w, int64_t w_row,
                          const real* bias, const real* residual, int64_t M, int64_t N, int64_t K, int kind,
                          int64_t n0, int64_t n1)
{
    for (int64_t n = n0; n < n1; n += DF) {
        const int df = (int)min_i64(DF, n1 - n);
        for (int64_t m = 0; m < M; m += DR) {
            const int dr = (int)min_i64(DR, M - m);
            /* constant (dr, df) in the common cases, so the body unrolls */
            if (dr == DR && df == DF) dot_block(out, N, x, x_row, w, w_row, K, m, n, DR, DF);
            else if (dr == 1 && df == DF) dot_block(out, N, x, x_row, w, w_row, K, m, n, 1, DF);
            else if (dr == 2 && df == DF) dot_block(out, N, x, x_row, w, w_row, K, m, n, 2, DF);
            else if (dr == 3 && df == DF) dot_block(out, N, x, x_row, w, w_row, K, m, n, 3, DF);
            else dot_block(out, N, x, x_row, w, w_row, K, m, n, dr, df);
        }
    }
    finish_rows(out, N, bias, residual, kind, 0, M, n0, n1);
}

static void few_rows(real* out, const real* x, int64_t x_row, const real* w, int64_t w_row,
                     const real* bias, const real* residual, int64_t M, int64_t N, int64_t K, int kind)
{
    const int64_t tasks = (N + FEW_FEATURES - 1) / FEW_FEATURES;
    const int threads = attnkit_plan_threads(tasks, FEW_FEATURES * M * K);
    if (threads <= 1) {
        few_rows_task(out, x, x_row, w, w_row, bias, residual, M, N, K, kind, 0, N);
        return;
    }
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++)
            few_rows_task(out, x, x_row, w, w_row, bias, residual, M, N, K, kind, t * FEW_FEATURES,
                          min_i64(N, (t + 1) * FEW_FEATURES));
        fp_controls_restore(own_fp);
    }
}

/* ---------------------------------------------------------------------------
 * The rows path: tiles of out^T, C (MR features, NR rows) = w (MR, K) @
 * xt (K, NR). The micro-kernel broadcasts w's elements from its rows in place
 * (nothing of w is packed: reading it costs what packing it would) and takes
 * xt, NR of the task's rows of x transposed, from the workspace.
 *
 * A task is a group of up to RG rows against a chunk of up to FCHUNK
 * features, KC of K at a time: it transposes its rows' KC columns into xt
 * (RG x KC, in L2), then walks w's rows MR at a time (MR x KC, in L1 while
 * every panel of the rows meets them). The sums build up in ct (features
 * down, rows across), each block of K added in order, so the order of every
 * sum is fixed by the shape; the epilogue turns ct's columns into out's rows.
 * Per task: RG*K reals transposed and RG*FCHUNK turned back, for
 * RG*FCHUNK*K multiply-adds.
 */
enum { FCHUNK = 40 * MR, RG = 12 * NR };

typedef struct {
    real* xt;  /* (RG/NR, KC, NR): KC columns of the task's rows, NR rows a panel   */
    real* ct;  /* (fc, ldt): the task's sums, out^T; ldt = rg and a cache line  */
    real* row; /* (VLEN, fc): VLEN rows of out before the epilogue                 */
    int64_t ldt;
    void* block;
} workspace;

/* Sized for the call, as attention's workspace is: rg rows (at most RG) by
 * fc features (at most FCHUNK), so a call of a few dozen rows does not
 * fault in a megabyte it never touches. */
static int workspace_alloc(workspace* ws, int64_t rg, int64_t fc)
{
    ws->ldt = rg + 64 / (int64_t)sizeof(real);
    const int64_t xt_bytes = round_up(rg * KC * (int64_t)sizeof(real), 64);
    const int64_t ct_bytes = round_up(fc * ws->ldt * (int64_t)sizeof(real), 64);
    const int64_t row_bytes = round_up(VLEN * fc * (int64_t)sizeof(real), 64);
    if (posix_memalign(&ws->block, 64, (size_t)(xt_bytes + ct_bytes + row_bytes)) != 0) return -1;
    ws->xt = (real*)ws->block;
    ws->ct = (real*)((char*)ws->block + xt_bytes);
    ws->row = (real*)((char*)ws->block + xt_bytes + ct_bytes);
    return 0;
}


/* rows (VLEN, ld_rows) = the columns [m, m + VLEN) of ct (fc, ldt): VLEN of
 * the task's rows of out, turned back from ct's layout, VLEN x VLEN blocks
 * at a time through the registers */
static void turn_back(real* rows, int64_t ld_rows, const real* ct, int64_t ldt, int64_t m, int64_t fc)
{
    int64_t i = 0;
    for (; i + VLEN <= fc; i += VLEN) {
        vreal r[VLEN];
#pragma GCC unroll 16
        for (int t = 0; t < VLEN; t++) r[t] = v_load(ct + (i + t) * ldt + m);
        v_transpose(r);
#pragma GCC unroll 16
        for (int t = 0; t < VLEN; t++) v_store(rows + t * ld_rows + i, r[t]);
    }
    for (; i < fc; i++)
        for (int t = 0; t < VLEN; t++) rows[t * ld_rows + i] = ct[i * ldt + m + t];
}

/* features [n0, n1) of rows [m0, m1) */
static void rows_task(const workspace* ws, real* out, const real* x, int64_t x_row, const real* w,
                      int64_t w_row, const real* bias, const real* residual, int64_t N, int64_t K, int kind, int64_t n0, int64_t n1,
                      int64_t m0, int64_t m1)
{
    const int64_t panels = (m1 - m0 + NR - 1) / NR;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = min_i64(KC, K - k0);
        for (int64_t p = 0; p < panels; p++)
            transpose_panel(ws->xt + p * kc * NR, x + k0, x_row, kc, m0 + p * NR,
                            min_i64(NR, m1 - m0 - p * NR));
        for (int64_t n = n0; n < n1; n += MR)
            for (int64_t p = 0; p < panels; p++)
                micro_kernel(ws->ct + (n - n0) * ws->ldt + p * NR, ws->ldt, w + n * w_row + k0, w_row, 1,
                             ws->xt + p * kc * NR, NR, kc, min_i64(MR, n1 - n), k0 ? ACCUMULATE : NULL);
    }
    const int64_t fc = n1 - n0;
    int64_t m = m0;
    for (; m + VLEN <= m1; m += VLEN) {
        turn_back(ws->row, fc, ws->ct, ws->ldt, m - m0, fc);
        for (int t = 0; t < VLEN; t++)
            epilogue(out + (m + t) * N + n0, ws->row + t * fc, bias ? bias + n0 : NULL,
                     residual ? residual + (m + t) * N + n0 : NULL, fc, kind);
    }
    for (; m < m1; m++) {
        const real* column = ws->ct + (m - m0);
        for (int64_t i = 0; i < fc; i++) ws->row[i] = column[i * ws->ldt];
        epilogue(out + m * N + n0, ws->row, bias ? bias + n0 : NULL, residual ? residual + m * N + n0 : NULL,
                 fc, kind);
    }
}

static int rows_path(real* out, const real* x, int64_t x_row, const real* w, int64_t w_row, const real* bias,
                     const real* residual,
                     int64_t M, int64_t N, int64_t K, int kind)
{
    const int64_t groups = (M + RG - 1) / RG, chunks = (N + FCHUNK - 1) / FCHUNK;
    const int64_t tasks = groups * chunks;
    const int threads = attnkit_plan_threads(tasks, RG * FCHUNK * K);
    int failed = 0;
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
        workspace ws;
        const int ok = workspace_alloc(&ws, min_i64(RG, round_up(M, NR)), min_i64(FCHUNK, round_up(N, MR))) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!ok) continue;
            const int64_t g = t / chunks, c = t % chunks;
            rows_task(&ws, out, x, x_row, w, w_row, bias, residual, N, K, kind, c * FCHUNK, min_i64(N, (c + 1) * FCHUNK),
                      g * RG, min_i64(M, (g + 1) * RG));
        }
        if (ok) free(ws.block);
        fp_controls_restore(own_fp);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------
 * The product: C (M, N) = A (M, K) @ B (K, N), or C += A @ B, then
 * C's rows = f(C's rows + bias) + residual when there is an epilogue.
 * A's element (m, k) is a[m*a_row + k*a_k], any strides (x, dy, or dy^T
 * read in place); B's row k is b + k*ldb, contiguous; C's row m is
 * c + m*ldc. The linear layer with its weight stored transposed (w^T is
 * B) and both products of its backward are this.
 *
 * BLIS's loop order: for each block of K, a task (rows [m0, m1) x
 * features [n0, n1)) packs its rows of A into MR-wide micro-panels and
 * copies B's KC x NR micro-panels into its workspace (contiguous, so that a
 * panel stays in L1: B's rows read in place, 2^k bytes apart, would all
 * fall into a few cache sets), then runs the packed micro-kernel down its
 * rows for each panel. C is written where it lies; each block of K is added
 * in order, so the order of every sum is fixed by the shape. A task of a
 * single tile of rows reads A and B in place: it meets each panel once,
 * and a copy would cost as much.
 * ------------------------------------------------------------------------- */
enum { PG = 8 * MR, PCHUNK = 4 * NR };

typedef struct {
    real* panels; /* (PCHUNK/NR, KC, NR): B's micro-panels for one block of K */
    real* tail;   /* (PG, NR): C's last, partial panel of features            */
    real* a;      /* (PG/MR, KC, MR): A's rows for one block of K, MR a panel  */
    void* block;
} product_workspace;

static int product_workspace_alloc(product_workspace* ws, int64_t chunk)
{
    const int64_t panel_bytes = chunk * KC * (int64_t)sizeof(real);
    const int64_t tail_bytes = (int64_t)PG * NR * (int64_t)sizeof(real);
    const int64_t a_bytes = (int64_t)PG * KC * (int64_t)sizeof(real);
    if (posix_memalign(&ws->block, 64, (size_t)(panel_bytes + tail_bytes + a_bytes)) != 0) return -1;
    ws->panels = (real*)ws->block;
    ws->tail = (real*)((char*)ws->block + panel_bytes);
    ws->a = (real*)((char*)ws->block + panel_bytes + tail_bytes);
    return 0;
}

/* dst (kc, NR) = kc rows of b, width <= NR columns, zero-filled past width */
static void pack_panel(real* dst, const real* b, int64_t ldb, int64_t kc, int64_t width)
{
    for (int64_t k = 0; k < kc; k++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) {
            const int64_t left = width - j * VLEN;
            v_store(dst + k * NR + j * VLEN, left >= VLEN ? v_load(b + k * ldb + j * VLEN)
                                             : v_load_part(b + k * ldb + j * VLEN, left > 0 ? left : 0, 0));
        }
}

/* dst (rows, width) of a row stride ld_dst = src (rows, width) of ld_src */
static void copy_block(real* dst, int64_t ld_dst, const real* src, int64_t ld_src, int64_t rows, int64_t width)
{
    for (int64_t m = 0; m < rows; m++)
        for (int64_t j = 0; j < width; j++) dst[m * ld_dst + j] = src[m * ld_src + j];
}

static void product_task(const product_workspace* ws, real* c, int64_t ldc, const real* a, int64_t a_row,
                         int64_t a_k, const real* b, int64_t ldb, int64_t K, int accumulate,
                         const real* bias, const real* residual, int kind, int64_t m0, int64_t m1, int64_t n0,
                         int64_t n1)
{
    const int64_t rows = m1 - m0, panels = (n1 - n0 + NR - 1) / NR;
    const int64_t tail = (n1 - n0) % NR; /* the last panel's width, when it is partial */
    const int in_place = rows <= MR;
    real* c_tail = c + m0 * ldc + n0 + (panels - 1) * NR;
    if (tail && accumulate) {
        for (int64_t m = 0; m < rows; m++)
            for (int64_t j = 0; j < NR; j++) ws->tail[m * NR + j] = j < tail ? c_tail[m * ldc + j] : 0;
    }
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = min_i64(KC, K - k0);
        const real* alpha = k0 > 0 || accumulate ? ACCUMULATE : NULL;
        if (!in_place)
            for (int64_t m = 0; m < rows; m += MR) {
                const int64_t mr = min_i64(MR, rows - m);
                real* dst = ws->a + m * kc;
                if (a_row == 1 && mr == MR) {
                    /* A stored transposed (dy^T, for dw): each k's MR values are
                     * side by side, so copy them a k at a time, not gather a row
                     * at a time down a column */
                    const real* src = a + m0 + m + k0 * a_k;
                    for (int64_t kk = 0; kk < kc; kk++)
                        for (int64_t i = 0; i < MR; i++) dst[kk * MR + i] = src[kk * a_k + i];
                    continue;
                }
                for (int64_t i = 0; i < MR; i++) {
                    const real* src = a + (m0 + m + (i < mr ? i : mr - 1)) * a_row + k0 * a_k;
                    for (int64_t kk = 0; kk < kc; kk++) dst[kk * MR + i] = src[kk * a_k];
                }
            }
        for (int64_t p = 0; p < panels; p++) {
            const int partial = tail && p == panels - 1;
            const real* bp = b + k0 * ldb + n0 + p * NR;
            int64_t ldbp = ldb;
            if (partial || !in_place) {
                pack_panel(ws->panels + p * KC * NR, bp, ldb, kc, partial ? tail : NR);
                bp = ws->panels + p * KC * NR;
                ldbp = NR;
            }
            real* cp = partial ? ws->tail : c + m0 * ldc + n0 + p * NR;
            const int64_t ldcp = partial ? NR : ldc;
            if (in_place)
                micro_kernel(cp, ldcp, a + m0 * a_row + k0 * a_k, a_row, a_k, bp, ldbp, kc, rows, alpha);
            else
                for (int64_t m = 0; m < rows; m += MR)
                    micro_kernel_packed(cp + m * ldcp, ldcp, ws->a + m * kc, bp, ldbp, kc, min_i64(MR, rows - m),
                                        alpha);
        }
    }
    if (tail) copy_block(c_tail, ldc, ws->tail, NR, rows, tail);
    finish_rows(c, ldc, bias, residual, kind, m0, m1, n0, n1);
}

static int product(real* c, int64_t ldc, const real* a, int64_t a_row, int64_t a_k, const real* b,
                   int64_t ldb, int64_t M, int64_t N, int64_t K, int accumulate, const real* bias,
                   const real* residual, int kind)
{
    if (M == 0 || N == 0) return 0;
    if (K == 0) { /* an empty sum */
        if (!accumulate)
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = 0; n < N; n++) c[m * ldc + n] = 0;
        finish_rows(c, ldc, bias, residual, kind, 0, M, 0, N);
        return 0;
    }
    /* A task packs its rows of A once for all its features: the more
     * features, the less packing per multiply-add; fewer features only when
     * there are too few groups of rows to share out. Fixed by the shape. */
    const int64_t groups = (M + PG - 1) / PG;
    const int64_t split = groups >= 8 ? 1 : (8 + groups - 1) / groups;
    const int64_t chunk = min_i64(round_up(N, NR), max_i64(PCHUNK, round_up((N + split - 1) / split, NR)));
    const int64_t chunks = (N + chunk - 1) / chunk;
    const int64_t tasks = groups * chunks;
    const int threads = attnkit_plan_threads(tasks, min_i64(PG, M) * chunk * K);
    int failed = 0;
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
        product_workspace ws;
        const int ok = product_workspace_alloc(&ws, chunk) == 0;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!ok) continue;
            const int64_t g = t / chunks, ch = t % chunks;
            product_task(&ws, c, ldc, a, a_row, a_k, b, ldb, K, accumulate, bias, residual, kind, g * PG,
                         min_i64(M, (g + 1) * PG), ch * chunk, min_i64(N, (ch + 1) * chunk));
        }
        if (ok) free(ws.block);
        fp_controls_restore(own_fp);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------
 * A few rows against a weight stored transposed (decoding; a sentence of a
 * few tokens): out (rows, W*VLEN) tiles = x (rows, K) @ w^T (K, W*VLEN),
 * x's elements broadcast, w^T's rows read in place, once, straight
 * through: no horizontal sums, no copies, the tile in registers over all of
 * K. TR rows by TW vectors of accumulators, as many as the registers hold.
 */
#if defined(ATTNKIT_ISA_avx512)
enum { TR = 8, TW = 3 };
#elif defined(ATTNKIT_ISA_avx2)
enum { TR = 6, TW = 2 };
#else
enum { TR = 4, TW = 4 };
#endif
enum { TWIDTH = TW * VLEN, T_PANELS = 4 }; /* a task: T_PANELS panels of TWIDTH features */
_Static_assert(TR <= 8, "axpy_rows has cases for up to 8 rows");

/* one block of K, [k0, k1), added to out unless it is the first */
AK_INLINE void axpy_block(real* out, int64_t ldo, const real* x, int64_t x_row, const real* wt, int64_t ldw,
                          int64_t k0, int64_t k1, int64_t width, const int R, const int masked)
{
    vreal acc[TR][TW];
#pragma GCC unroll 8
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int j = 0; j < TW; j++) acc[i][j] = v_set1(0);
    for (int64_t k = k0; k < k1; k++) {
        vreal bv[TW];
#pragma GCC unroll 4
        for (int j = 0; j < TW; j++)
            bv[j] = masked ? v_load_part(wt + k * ldw + j * VLEN, min_i64(VLEN, max_i64(0, width - j * VLEN)), 0)
                           : v_load(wt + k * ldw + j * VLEN);
#pragma GCC unroll 8
        for (int i = 0; i < R; i++) {
            const vreal av = v_set1(x[i * x_row + k]);
#pragma GCC unroll 4
            for (int j = 0; j < TW; j++) acc[i][j] = v_fma(av, bv[j], acc[i][j]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; i++)
#pragma GCC unroll 4
        for (int j = 0; j < TW; j++) {
            real* o = out + i * ldo + j * VLEN;
            const int64_t lanes = min_i64(VLEN, max_i64(0, width - j * VLEN));
            if (k0 > 0) acc[i][j] = v_add(masked ? v_load_part(o, lanes, 0) : v_load(o), acc[i][j]);
            if (masked) v_store_part(o, acc[i][j], lanes);
            else v_store(o, acc[i][j]);
        }
}

/* R rows (a constant) from x by width <= TWIDTH features from wt; masked
 * (a constant) when width < TWIDTH. K is summed in blocks of KC, as the
 * other paths sum it. */
AK_INLINE void axpy_tile(real* out, int64_t ldo, const real* x, int64_t x_row, const real* wt, int64_t ldw,
                         int64_t K, int64_t width, const int R, const int masked)
{
    for (int64_t k0 = 0; k0 < K; k0 += KC)
        axpy_block(out, ldo, x, x_row, wt, ldw, k0, min_i64(K, k0 + KC), width, R, masked);
}

#define AXPY_TILE_CASE(r)                                                                       \
    case r:                                                                                     \
        if (width == TWIDTH) axpy_tile(out, ldo, x, x_row, wt, ldw, K, width, r, 0);            \
        else axpy_tile(out, ldo, x, x_row, wt, ldw, K, width, r, 1);                            \
        break;

static void axpy_rows(real* out, int64_t ldo, const real* x, int64_t x_row, const real* wt, int64_t ldw,
                      int64_t K, int64_t width, int rows)
{
    switch (rows) {
        AXPY_TILE_CASE(1)
        AXPY_TILE_CASE(2)
        AXPY_TILE_CASE(3)
        AXPY_TILE_CASE(4)
#if defined(ATTNKIT_ISA_avx512) || defined(ATTNKIT_ISA_avx2) /* TR is 8 or 6 */
        AXPY_TILE_CASE(5)
        AXPY_TILE_CASE(6)
#endif
#if defined(ATTNKIT_ISA_avx512)
        AXPY_TILE_CASE(7)
        AXPY_TILE_CASE(8)
#endif
    }
}

static void few_rows_transposed(real* out, const real* x, int64_t x_row, const real* wt, int64_t ldw,
                                const real* bias, const real* residual, int64_t M, int64_t N, int64_t K,
                                int kind)
{
    const int64_t chunk = T_PANELS * TWIDTH, tasks = (N + chunk - 1) / chunk;
    const int threads = attnkit_plan_threads(tasks, chunk * M * K);
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t n0 = t * chunk, n1 = min_i64(N, n0 + chunk);
            for (int64_t n = n0; n < n1; n += TWIDTH)
                for (int64_t m = 0; m < M; m += TR)
                    axpy_rows(out + m * N + n, N, x + m * x_row, x_row, wt + n, ldw, K, min_i64(TWIDTH, n1 - n),
                              (int)min_i64(TR, M - m));
            finish_rows(out, N, bias, residual, kind, 0, M, n0, n1);
        }
        fp_controls_restore(own_fp);
    }
}

int KERNEL(linear)(real* out, const real* x, const real* w, const real* bias, const real* residual,
                   int64_t M, int64_t N, int64_t K, int64_t x_row, int64_t w_n, int64_t w_k, int kind)
{
    if (w_k != 1) { /* w stored transposed: w^T (K, N) is the product's B */
        if (M <= FEW_ROWS && K > 0 && N > 0) {
            few_rows_transposed(out, x, x_row, w, w_k, bias, residual, M, N, K, kind);
            return 0;
        }
        return product(out, N, x, x_row, 1, w, w_k, M, N, K, 0, bias, residual, kind);
    }
    if (M == 0 || N == 0) return 0;
    if (K == 0) return product(out, N, x, x_row, 1, w, N, M, N, 0, 0, bias, residual, kind);
    if (M <= FEW_ROWS) {
        few_rows(out, x, x_row, w, w_n, bias, residual, M, N, K, kind);
        return 0;
    }
    return rows_path(out, x, x_row, w, w_n, bias, residual, M, N, K, kind);
}

int KERNEL(linear_backward)(real* dx, real* dw, real* dbias, const real* dy, const real* x, const real* w,
                            int64_t M, int64_t N, int64_t K, int64_t x_row, int64_t w_n, int64_t w_k,
                            int64_t dw_n, int64_t dw_k)
{
    if (dx) {
        /* dx (M, K) = dy (M, N) @ w (N, K): w's rows are B when they lie along
         * K; stored transposed, w^T is a weight in PyTorch's layout */
        const int status = w_k == 1 ? product(dx, K, dy, N, 1, w, w_n, M, K, N, 0, NULL, NULL, ATTNKIT_IDENTITY)
                                    : KERNEL(linear)(dx, dy, w, NULL, NULL, M, K, N, N, w_k, 1, ATTNKIT_IDENTITY);
        if (status) return status;
    }
    if (dw) {
        /* dw (N, K) += dy^T @ x, or, stored transposed, dw^T (K, N) += x^T @ dy */
        const int status = dw_k == 1 ? product(dw, dw_n, dy, 1, N, x, x_row, N, K, M, 1, NULL, NULL, ATTNKIT_IDENTITY)
                                     : product(dw, dw_k, x, 1, x_row, dy, N, K, N, M, 1, NULL, NULL, ATTNKIT_IDENTITY);
        if (status) return status;
    }
    if (dbias) { /* dbias (N) += the sum of dy's rows, in row order */
        const int64_t chunks = (N + FEW_FEATURES - 1) / FEW_FEATURES;
        const int threads = attnkit_plan_threads(chunks, FEW_FEATURES * M);
        const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(static)
            for (int64_t t = 0; t < chunks; t++) {
                const int64_t n0 = t * FEW_FEATURES, n1 = min_i64(N, n0 + FEW_FEATURES);
                for (int64_t m = 0; m < M; m++)
                    for (int64_t n = n0; n < n1; n++) dbias[n] += dy[m * N + n];
            }
            fp_controls_restore(own_fp);
        }
    }
    return 0;
}

