/*
 * attention_backward.c: the gradient of fused attention (the contract is in
 * attnkit.h), FlashAttention-2's backward on the CPU. Compiled once per
 * (ISA, precision); simd.h says which.
 *
 * The forward saved out and lse; the weights are recomputed a tile at a time
 * and never stored whole. With Z the kept pattern of dropout (1 everywhere
 * without it) and ks = 1 / (1 - dropout_p):
 *
 *   D    = rowsum(dO * O)                             (B, H, L)   first pass
 *   per query block (m rows) and key tile (n keys):
 *     S    = Q K^T * scale, masked                      st  (n, m) keys down
 *     P    = exp(S - lse)                               st
 *     Pd   = P * Z * ks                                 pd  (n, m)
 *     dV  += Pd^T dO                                    dv rows (n, Ev)
 *     dPd  = dO V^T, dP = dPd * Z * ks                  ds  (n, m)
 *     dS   = P * (dP - D)                               ds
 *     dK  += dS^T Q    (times scale once, at the end)   dk rows (n, E)
 *     dQ  += dS K      (times scale once, at the end)   dq rows (m, E)
 *
 * D is dO . O because O = Pd V: sum_j P (dPd Z ks) = sum_j Pd (dO . v_j).
 *
 * Tasks are (b, key/value head hk, chunk of keys). A task owns its keys' rows
 * of dK and dV and adds to them over every query head of hk's group (GQA sums
 * there) and every query block, in that order. The rows of dQ are shared by
 * the chunks of keys: each chunk adds into its own copy, and the copies are
 * summed in chunk order at the end. There are several chunks only when
 * B * Hkv is too few tasks to share out (the split depends on the shapes, not
 * on the thread count). No atomics, and every sum in an order fixed by the
 * shapes: the gradients are bitwise identical at any thread count.
 *
 * Memory beyond the gradients: per thread a few blocks and tiles; per call D
 * (B*H*L), dQ's copies per chunk (capped at 64 MB) and padded copies of the
 * gradients whose rows the micro-kernel cannot write in place (E or Ev not a
 * multiple of NR). Never L x S.
 */
#include <stdlib.h>
#include <string.h>

#include "attnkit.h"
#include "simd.h"
#include "tiles.h"
#include "attention_tiles.h"

/* BLB query rows meet BSB keys at a time; both are multiples of every ISA's
 * MR and NR, so no product runs a partial register tile on a full block. The
 * three (BSB, BLB) tiles of scores and their gradients (81 KB in float32)
 * stay in L2. 64 x 72 measured the same within noise. */
enum { BLB = 96, BSB = 72 };
/* Fewer than TASK_TARGET (b, hk) pairs split their keys into chunks, so that
 * B = 1 with few heads still gives every thread work (PyTorch's CPU backward
 * has B*H tasks whatever they are). A split costs repacking each query block
 * per chunk and a pass summing dQ's copies: at B1 H8 L1024, 4 chunks took 8%
 * longer than 1. */
enum { TASK_TARGET = 8 };
#define CHUNK_COPIES_BYTES (64.0 * 1024 * 1024)

typedef struct {
    real* qt;  /* (BLB/NR panels) x (E, NR): the block's q^T, scaled; queries past m are 0 */
    real* qr;  /* (BLB, Ep): the block's q rows, zero-padded                              */
    real* dot; /* (BLB/NR panels) x (Ev, NR): the block's dO^T                             */
    real* dor; /* (BLB, Evp): the block's dO rows, zero-padded                            */
    real* kp;  /* (BSB, Ep): the key tile, zero-padded, when k's rows are not that already */
    real* st;  /* (BSB, BLB): S, then P                                                    */
    real* pd;  /* (BSB, BLB): P with dropout                                               */
    real* ds;  /* (BSB, BLB): dP, then dS                                                  */
    real* lse; /* (BLB): the block's lse; +inf for a row that saw no key (so P = 0)        */
    real* d;   /* (BLB): the block's D                                                     */
    void* block;
} workspace;

/* One 64-byte-aligned allocation cut into n arrays of sizes[i] reals, each
 * starting on a cache line: *parts[i] points at array i. Returns the block to
 * free, or NULL when it cannot be allocated. */
static void* alloc_parts(real** parts[], const int64_t sizes[], int n)
{
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += round_up(sizes[i] * (int64_t)sizeof(real), 64);
    char* p = NULL;
    if (posix_memalign((void**)&p, 64, (size_t)(total > 0 ? total : 64)) != 0) return NULL;
    void* block = p;
    for (int i = 0; i < n; i++) {
        *parts[i] = (real*)p;
        p += round_up(sizes[i] * (int64_t)sizeof(real), 64);
    }
    return block;
}

static int workspace_alloc(workspace* w, int64_t E, int64_t Ev)
{
    const int64_t Ep = round_up(E, NR), Evp = round_up(Ev, NR);
    const int64_t sizes[10] = {BLB * E, BLB * Ep, BLB * Ev, BLB * Evp, BSB * Ep,
                               BSB * BLB, BSB * BLB, BSB * BLB, BLB, BLB};
    real** parts[10] = {&w->qt, &w->qr, &w->dot, &w->dor, &w->kp, &w->st, &w->pd, &w->ds, &w->lse, &w->d};
    w->block = alloc_parts(parts, sizes, 10);
    return w->block ? 0 : -1;
}

typedef struct {
    real* dq;         /* (B, H, L, E) */
    real* dk;         /* (B, Hkv, S, E) */
    real* dv;         /* (B, Hkv, S, Ev) */
    const real* dout; /* (B, H, L, Ev) */
    const real* out;  /* (B, H, L, Ev) */
    const real* lse;  /* (B, H, L) */
    const real* q;
    const real* k;
    const real* v;
    const void* mask;
    const attnkit_attention_args* a;
    int64_t Ep, Evp, chunks, tiles;
    real* D;          /* (B, H, L) */
    real* dq_acc;     /* (B, H, chunks, L, Ep), or dq itself: ldq = Ep */
    real* dk_acc;     /* (B, Hkv, S, Ep), or dk itself */
    real* dv_acc;     /* (B, Hkv, S, Evp), or dv itself */
} job;

/* rows [begin, end) of D = rowsum(dO * O), summed in double */
static void d_rows(const void* ctx, int64_t begin, int64_t end)
{
    const job* jb = ctx;
    const int64_t Ev = jb->a->Ev;
    for (int64_t r = begin; r < end; r++) {
        const real* g = jb->dout + r * Ev;
        const real* o = jb->out + r * Ev;
        double sum = 0.0;
        for (int64_t e = 0; e < Ev; e++) sum += (double)g[e] * o[e];
        jb->D[r] = (real)sum;
    }
}

/* The block's operands, packed once for every key tile it meets. */
static void pack_block(workspace* w, const job* jb, const real* q, int64_t q_row, const real* dout,
                       const real* lse, const real* D, int64_t m)
{
    const attnkit_attention_args* a = jb->a;
    const int64_t E = a->E, Ev = a->Ev, Ep = jb->Ep, Evp = jb->Evp;
    const int64_t panels = (m + NR - 1) / NR;
    const real scale = (real)a->scale;
    const vreal vscale = v_set1(scale);
    for (int64_t p = 0; p < panels; p++) {
        const int64_t count = min_i64(NR, m - p * NR);
        real* qt = w->qt + p * E * NR;
        transpose_panel(qt, q, q_row, E, p * NR, count);
        for (int64_t e = 0; e < E * NR; e += VLEN) v_store(qt + e, v_mul(v_load(qt + e), vscale));
        transpose_panel(w->dot + p * Ev * NR, dout, Ev, Ev, p * NR, count);
    }
    for (int64_t i = 0; i < m; i++) {
        memcpy(w->qr + i * Ep, q + i * q_row, (size_t)E * sizeof(real));
        memset(w->qr + i * Ep + E, 0, (size_t)(Ep - E) * sizeof(real));
        memcpy(w->dor + i * Evp, dout + i * Ev, (size_t)Ev * sizeof(real));
        memset(w->dor + i * Evp + Ev, 0, (size_t)(Evp - Ev) * sizeof(real));
    }
    for (int64_t i = 0; i < BLB; i++) {
        w->lse[i] = i < m ? (lse[i] == -INFINITY ? INFINITY : lse[i]) : INFINITY;
        w->d[i] = i < m ? D[i] : 0;
    }
}

/* One query block (m rows, packed in w) against keys [j0, j0 + n):
 * adds to dk, dv (rows j0.. at ldk, ldv) and dq (the block's rows at ldq). */
static void block_meets_tile(workspace* w, const job* jb, const query_block* blk, const real* k,
                             const real* v, real* dq, real* dk, real* dv, int64_t j0, int64_t n)
{
    const attnkit_attention_args* a = jb->a;
    const int64_t E = a->E, Ev = a->Ev, Ep = jb->Ep, Evp = jb->Evp, m = blk->rows;
    const int64_t panels = (m + NR - 1) / NR, cols = round_up(m, VLEN);
    /* keys past the block's last query's causal limit take no part: a tile
     * across the diagonal is cut there rather than computed whole */
    if (a->causal) n = min_i64(n, blk->i0 + m + a->causal_offset - j0);

    /* the key tile, zero-padded to Ep columns, unless k's rows are that already */
    const real* kt = k + j0 * a->k_row;
    int64_t k_row = a->k_row;
    if (k_row != Ep || E != Ep) {
        for (int64_t j = 0; j < n; j++) {
            memcpy(w->kp + j * Ep, kt + j * a->k_row, (size_t)E * sizeof(real));
            memset(w->kp + j * Ep + E, 0, (size_t)(Ep - E) * sizeof(real));
        }
        kt = w->kp;
        k_row = Ep;
    }
    const real* vt = v + j0 * a->v_row;

    /* S^T = k_tile @ (q scale)^T, masked */
    for (int64_t j = 0; j < n; j += MR)
        for (int64_t p = 0; p < panels; p++)
            micro_kernel(w->st + j * BLB + p * NR, BLB, kt + j * k_row, k_row, 1, w->qt + p * E * NR, NR, E,
                         min_i64(MR, n - j), NULL);
    if (a->causal || a->mask_kind != ATTNKIT_MASK_NONE) mask_scores(w->st, BLB, 1, a, blk, 0, m, j0, n);

    /* P = exp(S - lse); S - lse <= 0 but for rounding (min keeps a NaN) */
    const vreal zero = v_set1(0);
    for (int64_t c = 0; c < cols; c += VLEN) {
        const vreal lse = v_load(w->lse + c);
        for (int64_t j = 0; j < n; j++) {
            real* s = w->st + j * BLB + c;
            v_store(s, v_exp_nonpositive(v_min(zero, v_sub(v_load(s), lse))));
        }
    }
    const real* pd = w->st;
    if (a->dropout_p > 0) {
        for (int64_t j = 0; j < n; j++) memcpy(w->pd + j * BLB, w->st + j * BLB, (size_t)cols * sizeof(real));
        drop_scores(w->pd, BLB, 1, a, blk, 0, m, j0, n);
        pd = w->pd;
    }

    /* dV += Pd^T dO */
    for (int64_t p = 0; p * NR < Evp; p++)
        for (int64_t j = 0; j < n; j += MR)
            micro_kernel(dv + j * Evp + p * NR, Evp, pd + j * BLB, BLB, 1, w->dor + p * NR, Evp, m,
                         min_i64(MR, n - j), ACCUMULATE);

    /* dP^T = v_tile @ dO^T, then dropout's pattern */
    for (int64_t j = 0; j < n; j += MR)
        for (int64_t p = 0; p < panels; p++)
            micro_kernel(w->ds + j * BLB + p * NR, BLB, vt + j * a->v_row, a->v_row, 1, w->dot + p * Ev * NR, NR,
                         Ev, min_i64(MR, n - j), NULL);
    if (a->dropout_p > 0) drop_scores(w->ds, BLB, 1, a, blk, 0, m, j0, n);

    /* dS = P * (dP - D) */
    for (int64_t c = 0; c < cols; c += VLEN) {
        const vreal d = v_load(w->d + c);
        for (int64_t j = 0; j < n; j++) {
            real* g = w->ds + j * BLB + c;
            v_store(g, v_mul(v_load(w->st + j * BLB + c), v_sub(v_load(g), d)));
        }
    }

    /* dK += dS^T q (scaled at the end) */
    for (int64_t p = 0; p * NR < Ep; p++)
        for (int64_t j = 0; j < n; j += MR)
            micro_kernel(dk + j * Ep + p * NR, Ep, w->ds + j * BLB, BLB, 1, w->qr + p * NR, Ep, m,
                         min_i64(MR, n - j), ACCUMULATE);

    /* dQ += dS k_tile (scaled at the end); dS's element (i, j) is ds[j*BLB + i] */
    for (int64_t p = 0; p * NR < Ep; p++)
        for (int64_t i = 0; i < m; i += MR)
            micro_kernel(dq + i * Ep + p * NR, Ep, w->ds + i, 1, BLB, kt + p * NR, k_row, n, min_i64(MR, m - i),
                         ACCUMULATE);
}

/* rows (n, cols) at ld_from, times f, into rows at ld_to (may be the same memory) */
static void scale_rows(real* to, int64_t ld_to, const real* from, int64_t ld_from, int64_t n, int64_t cols,
                       real f)
{
    for (int64_t r = 0; r < n; r++)
        for (int64_t e = 0; e < cols; e++) to[r * ld_to + e] = from[r * ld_from + e] * f;
}

/* Task (b, hk, chunk c): keys [tile c*tiles/chunks, ...) of head hk. */
static void run_task(workspace* w, const job* jb, int64_t index)
{
    const attnkit_attention_args* a = jb->a;
    const int64_t chunks = jb->chunks, c = index % chunks, bhk = index / chunks;
    const int64_t b = bhk / a->Hkv, hk = bhk % a->Hkv, group = a->H / a->Hkv;
    const int64_t L = a->L, S = a->S, E = a->E, Ev = a->Ev, Ep = jb->Ep, Evp = jb->Evp;
    const int64_t t0 = c * jb->tiles / chunks, t1 = (c + 1) * jb->tiles / chunks;
    const int64_t key_begin = t0 * BSB, key_end = min_i64(S, t1 * BSB);
    const real* k = jb->k + a->k_batch[b] + hk * a->k_head;
    const real* v = jb->v + a->v_batch[b] + hk * a->v_head;
    real* dk = jb->dk_acc + (bhk * S + key_begin) * Ep;
    real* dv = jb->dv_acc + (bhk * S + key_begin) * Evp;
    memset(dk, 0, (size_t)((key_end - key_begin) * Ep) * sizeof(real));
    memset(dv, 0, (size_t)((key_end - key_begin) * Evp) * sizeof(real));

    for (int64_t h = hk * group; h < (hk + 1) * group; h++) {
        const int64_t bh = b * a->H + h;
        real* dq = jb->dq_acc + ((bh * chunks + c) * L) * Ep;
        memset(dq, 0, (size_t)(L * Ep) * sizeof(real));
        for (int64_t i0 = 0; i0 < L; i0 += BLB) {
            query_block blk = {NULL, i0, min_i64(BLB, L - i0), (uint32_t)bh};
            if (a->mask_kind != ATTNKIT_MASK_NONE) {
                const int64_t off = a->mask_batch[b] + h * a->mask_head + i0 * a->mask_row;
                blk.mask = a->mask_kind == ATTNKIT_MASK_BOOL ? (const uint8_t*)jb->mask + off
                                                             : (const uint8_t*)((const real*)jb->mask + off);
            }
            /* the keys this block sees at all: skip the pack when none */
            int any = 0;
            for (int64_t j0 = key_begin; j0 < key_end && !any; j0 += BSB)
                any = tile_visible(a, &blk, j0, min_i64(BSB, key_end - j0));
            if (!any) continue;
            const real* q = jb->q + a->q_batch[b] + h * a->q_head + i0 * a->q_row;
            pack_block(w, jb, q, a->q_row, jb->dout + (bh * L + i0) * Ev, jb->lse + bh * L + i0,
                       jb->D + bh * L + i0, blk.rows);
            for (int64_t j0 = key_begin; j0 < key_end; j0 += BSB) {
                const int64_t n = min_i64(BSB, key_end - j0);
                if (!tile_visible(a, &blk, j0, n)) continue;
                block_meets_tile(w, jb, &blk, k, v, dq + i0 * Ep, dk + (j0 - key_begin) * Ep,
                                 dv + (j0 - key_begin) * Evp, j0, n);
            }
        }
        if (chunks == 1) /* dq = scale * the sum, from the padded rows or in place */
            scale_rows(jb->dq + bh * L * E, E, dq, Ep, L, E, (real)a->scale);
    }
    const int64_t n = key_end - key_begin;
    scale_rows(jb->dk + (bhk * S + key_begin) * E, E, dk, Ep, n, E, (real)a->scale);
    if (jb->dv_acc != jb->dv) scale_rows(jb->dv + (bhk * S + key_begin) * Ev, Ev, dv, Evp, n, Ev, 1);
}

/* dq rows [begin, end) of (B*H*L) = scale * the sum of the chunks' copies, in chunk order */
static void sum_chunks(const void* ctx, int64_t begin, int64_t end)
{
    const job* jb = ctx;
    const attnkit_attention_args* a = jb->a;
    const int64_t L = a->L, E = a->E, Ep = jb->Ep, chunks = jb->chunks;
    const real scale = (real)a->scale;
    for (int64_t r = begin; r < end; r++) {
        const int64_t bh = r / L, i = r % L;
        real* dst = jb->dq + r * E;
        for (int64_t e = 0; e < E; e++) {
            real sum = 0;
            for (int64_t c = 0; c < chunks; c++) sum += jb->dq_acc[((bh * chunks + c) * L + i) * Ep + e];
            dst[e] = sum * scale;
        }
    }
}

/* The split of keys into chunks: from the shapes alone. */
static int64_t key_chunks(const attnkit_attention_args* a, int64_t tiles, int64_t Ep)
{
    const int64_t heads = a->B * a->Hkv;
    if (heads >= TASK_TARGET) return 1;
    int64_t chunks = min_i64((TASK_TARGET + heads - 1) / heads, tiles);
    const double copy_bytes = (double)(a->B * a->H) * (double)a->L * (double)Ep * (double)sizeof(real);
    while (chunks > 1 && chunks * copy_bytes > CHUNK_COPIES_BYTES) chunks--;
    return chunks < 1 ? 1 : chunks;
}

int KERNEL(attention_backward)(real* dq, real* dk, real* dv, const real* dout, const real* out,
                               const real* lse, const real* q, const real* k, const real* v, const void* mask,
                               const attnkit_attention_args* a)
{
    const int64_t B = a->B, H = a->H, Hkv = a->Hkv, L = a->L, S = a->S, E = a->E, Ev = a->Ev;
    if (B == 0 || Hkv == 0) return 0;
    if (H == 0 || L == 0 || S == 0 || Ev == 0) { /* no weight reaches any gradient */
        memset(dq, 0, (size_t)(B * H * L * E) * sizeof(real));
        memset(dk, 0, (size_t)(B * Hkv * S * E) * sizeof(real));
        memset(dv, 0, (size_t)(B * Hkv * S * Ev) * sizeof(real));
        return 0;
    }
    const int64_t Ep = round_up(E, NR), Evp = round_up(Ev, NR), tiles = (S + BSB - 1) / BSB;
    job jb = {dq, dk, dv, dout, out, lse, q, k, v, mask, a, Ep, Evp, key_chunks(a, tiles, Ep), tiles,
              NULL, NULL, NULL, NULL};
    /* one block for D and every padded copy the shapes need */
    const int own_dq = jb.chunks > 1 || Ep != E;
    const int64_t sizes[4] = {B * H * L, own_dq ? B * H * jb.chunks * L * Ep : 0, Ep != E ? B * Hkv * S * Ep : 0,
                              Evp != Ev ? B * Hkv * S * Evp : 0};
    real* padded[3];
    real** parts[4] = {&jb.D, &padded[0], &padded[1], &padded[2]};
    void* block = alloc_parts(parts, sizes, 4);
    if (!block) return -1;
    jb.dq_acc = own_dq ? padded[0] : dq;
    jb.dk_acc = Ep != E ? padded[1] : dk;
    jb.dv_acc = Evp != Ev ? padded[2] : dv;

    const int64_t rows = B * H * L;
    over_rows(&jb, rows, Ev, d_rows);

    const int64_t tasks = B * Hkv * jb.chunks;
    const int64_t work = (H / Hkv) * L * ((S + jb.chunks - 1) / jb.chunks) * (2 * E + 3 * Ev);
    const int threads = attnkit_plan_threads(tasks, work);
    int failed = 0;
    if (threads <= 1) {
        workspace w;
        if (workspace_alloc(&w, E, Ev) != 0) {
            failed = 1;
        } else {
            for (int64_t t = 0; t < tasks; t++) run_task(&w, &jb, t);
            free(w.block);
        }
    } else {
        const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
        {
            const unsigned own_fp = fp_controls_adopt(fp);
            workspace w;
            const int ok = workspace_alloc(&w, E, Ev) == 0;
            if (!ok) {
#pragma omp atomic write
                failed = 1;
            }
            /* each task is computed whole by one thread: who takes it does not matter */
#pragma omp for schedule(dynamic, 1)
            for (int64_t t = 0; t < tasks; t++)
                if (ok) run_task(&w, &jb, t);
            if (ok) free(w.block);
            fp_controls_restore(own_fp);
        }
    }
    if (!failed && jb.chunks > 1) over_rows(&jb, rows, E * jb.chunks, sum_chunks);
    free(block);
    return failed ? -1 : 0;
}
