/*
 * attention.c: fused scaled dot-product attention (the contract is in
 * attnkit.h). Compiled once per (ISA, precision); simd.h says which.
 *
 * The work is a set of tasks, one per (batch, head, block of BL query rows,
 * and for short queries over long keys, chunk of keys). A task walks the keys
 * BS at a time:
 *
 *   q    (BL, E)        the query block, scaled once            workspace
 *   kp   (BS, E)        the key tile, packed when k's rows are apart  workspace
 *   vp   (BS, Ev)       the value tile, packed likewise          workspace
 *   s    (BL, BS)       scores = q @ kt, then masked, then p     workspace
 *   o    (BL, Ev)       sum of p @ v, rescaled as the max moves  workspace
 *   m, l (BL)           running max and sum of exp(s - m) per row
 *
 *   per tile:  m_new = max(m, rowmax(s));  p = exp(s - m_new)
 *              alpha = exp(m - m_new);     l = alpha*l + rowsum(p)
 *              o = alpha*o + p @ v
 *   at the end: out = o / l,  lse = m + log(l)
 *
 * so memory beyond the inputs and outputs is O(threads x tile), whatever L
 * and S. Both products go through one register-blocked micro-kernel (MR rows
 * by NR columns of C kept in registers; A read an element at a time, B a
 * packed panel NR wide), as in BLIS. Tiles wholly in the causal future or
 * wholly masked out are skipped. A row that never sees a key keeps m = -inf;
 * it is computed with m taken as 0, so every p is 0, and gives out = 0 and
 * lse = -inf instead of 0/0.
 */
#include <stdlib.h>
#include <string.h>

#include "attnkit.h"
#include "simd.h"
#include "tiles.h"
#include "attention_tiles.h"

/* Cache blocking: BL query rows (a multiple of MR and NR) meet BS keys (a
 * multiple of MR) at a time. A tile's scores (BS x BL) stay in L1; each key
 * and value is fetched from L2/L3 once per BL queries. Measured on a Zen 3
 * core (B1 H8 L=S=1024 E64 float32): BL 48 / BS 120: 29.7 ms; 96 / 120:
 * 29.1 ms; 96 / 60: 28.5 ms; 144 / 120: 29.2 ms. */
enum { BL = 96, BS = 60 };
/* A block of at most SMALL_ROWS query rows (decoding, or the last rows of L)
 * takes the row path: dot products along E, no register blocking over rows
 * it does not have. */
enum { SMALL_ROWS = 4 };
/* Short queries (L <= BL) over more than SPLIT_KEYS keys split the keys into
 * chunks of SPLIT_KEYS, merged by their log-sum-exp at the end, so that
 * decoding one token uses every thread. The split depends on the shape only,
 * never on the thread count, so results do not either. */
enum { SPLIT_KEYS = 20 * BS };


/* ---------------------------------------------------------------------------
 * Workspace: one per thread, allocated once per call.
 */
/* rows = min(BL, L rounded up to NR) and keys = min(BS, S rounded up to MR):
 * what one block and one tile of this call can hold. */
typedef struct {
    real* q;          /* (rows/NR panels) x (E, NR): q^T, scaled; the row path: (E) */
    real* st;         /* (keys, BL): scores, keys down, queries across; row path: (keys) */
    real* kp;         /* (keys, E): the key tile, when k's rows are not adjacent */
    real* vp;         /* (keys, Ev_pad): the value tile, when v's rows are not
                         adjacent or Ev % NR != 0 (zero-padded) */
    real* o;          /* (rows, Ev_pad) */
    real* m;          /* (rows) running max, -inf while nothing seen  */
    real* alpha;      /* (rows) this tile's rescale of o and l         */
    double* l;        /* (rows) running sum                            */
    uint8_t* skipped; /* (tiles) the row path: tiles no query of the task sees */
    void* block;
} workspace;

static int64_t padded_ev(const attnkit_attention_args* a) { return round_up(a->Ev, NR); }

/* Sized for the call: a small problem gets a small block (a few KB, from the
 * heap, not a fresh mapping). */
static int workspace_alloc(workspace* w, const attnkit_attention_args* a)
{
    const int64_t E = a->E, Evp = padded_ev(a), tiles = (a->S + BS - 1) / BS;
    const int64_t rows = min_i64(BL, round_up(a->L, NR)), keys = min_i64(BS, round_up(a->S, MR));
    const int64_t sizes[9] = {
        rows * E * (int64_t)sizeof(real),  keys * BL * (int64_t)sizeof(real),
        keys * E * (int64_t)sizeof(real),  keys * Evp * (int64_t)sizeof(real),
        rows * Evp * (int64_t)sizeof(real), rows * (int64_t)sizeof(real),
        rows * (int64_t)sizeof(real),       rows * (int64_t)sizeof(double),
        tiles + 1,
    };
    int64_t total = 0;
    for (int i = 0; i < 9; i++) total += round_up(sizes[i], 64);
    char* p = NULL;
    if (posix_memalign((void**)&p, 64, (size_t)total) != 0) return -1;
    w->block = p;
    real** reals[7] = {&w->q, &w->st, &w->kp, &w->vp, &w->o, &w->m, &w->alpha};
    for (int i = 0; i < 7; i++) {
        *reals[i] = (real*)p;
        p += round_up(sizes[i], 64);
    }
    w->l = (double*)p;
    p += round_up(sizes[7], 64);
    w->skipped = (uint8_t*)p;
    return 0;
}

/* ---------------------------------------------------------------------------
 * One task: rows [i0, i0 + rows) of head (b, h), keys [j_begin, j_end).
 */
typedef struct {
    real* out;     /* (rows, Ev), or a split chunk's unnormalised o   */
    real* lse;     /* (rows) or NULL                                  */
    real* weights; /* (rows, S) at stride S, or NULL: raw scores here  */
    real* stat_m;  /* (rows): each row's m and l, for the weights      */
    double* stat_l;
    real* part_m;  /* a split chunk's m (rows), or NULL               */
    double* part_l; /* and its l (rows)                               */
    const real* q; /* (rows, E) at q_row */
    const real* k; /* the head's keys, (S, E) at k_row */
    const real* v; /* the head's values, (S, Ev) at v_row */
    query_block blk; /* the rows, their mask and their dropout stream */
    int64_t j_begin, j_end;
} task;

/* The task's keys in tiles of equal size (a multiple of MR, at most BS):
 * 128 keys as 2 x 64, not 120 + 8. */
static int64_t tile_size(const task* t)
{
    const int64_t span = t->j_end - t->j_begin, tiles = (span + BS - 1) / BS;
    return tiles == 0 ? BS : round_up((span + tiles - 1) / tiles, MR);
}

/* a row of weights from the raw scores the tiles stored there (-inf for
 * tiles skipped): exp((s - m) - log(l)), then dropout; row bh, i of the
 * problem. m and log(l) apart, not their sum lse: s - m is exact for the
 * scores that matter, while lse rounded to a float near 1e4 is off by 1e-3. */
static void finish_weights_row(real* wrow, const attnkit_attention_args* a, uint32_t bh, int64_t i,
                               real m, double l)
{
    const int64_t S = a->S;
    if (l != l) { /* a NaN score made the row NaN */
        for (int64_t j = 0; j < S; j++) wrow[j] = NAN;
        return;
    }
    if (!(l > 0)) { /* nothing to attend to */
        memset(wrow, 0, (size_t)S * sizeof(real));
        return;
    }
    const vreal vm = v_set1(m), vlog = v_set1((real)log(l));
    int64_t j = 0;
    for (; j + VLEN <= S; j += VLEN)
        v_store(wrow + j, v_exp_nonpositive(v_sub(v_sub(v_load(wrow + j), vm), vlog)));
    if (j < S)
        v_store_part(wrow + j,
                     v_exp_nonpositive(v_sub(v_sub(v_load_part(wrow + j, S - j, -INFINITY), vm), vlog)),
                     S - j);
    if (a->dropout_p > 0) {
        const query_block row = {NULL, i, 1, bh};
        drop_scores(wrow, 1, 0, a, &row, 0, 1, 0, S);
    }
}

/* a skipped tile's raw weights: -inf, so that they come out 0 */
static void skip_weights(const attnkit_attention_args* a, const task* t, int64_t j0, int64_t n)
{
    if (!t->weights) return;
    for (int64_t i = 0; i < t->blk.rows; i++)
        for (int64_t j = 0; j < n; j++) t->weights[i * a->S + j0 + j] = -INFINITY;
}

/* out = o / l, lse = m + log(l): the task's rows, once every tile is in */
static void finish_rows(workspace* w, const attnkit_attention_args* a, const task* t)
{
    const int64_t Ev = a->Ev, Evp = padded_ev(a);
    for (int64_t i = 0; i < t->blk.rows; i++) {
        const double l = w->l[i];
        const real m_use = w->m[i] == -INFINITY ? 0 : w->m[i];
        const real* o = w->o + i * Evp;
        if (t->part_m) { /* a chunk of a split task: its state, merged later (weights too) */
            t->part_m[i] = m_use;
            t->part_l[i] = l;
            memcpy(t->out + i * Ev, o, (size_t)Ev * sizeof(real));
            continue;
        }
        const vreal inv = v_set1((real)(l > 0 ? 1.0 / l : (l == 0 ? 0.0 : NAN)));
        real* dst = t->out + i * Ev;
        int64_t e = 0;
        for (; e + VLEN <= Ev; e += VLEN) v_store(dst + e, v_mul(v_load(o + e), inv));
        if (e < Ev) v_store_part(dst + e, v_mul(v_load_part(o + e, Ev - e, 0), inv), Ev - e);
        const real lse = l > 0 ? (real)(m_use + log(l)) : (l == 0 ? -INFINITY : NAN);
        if (t->lse) t->lse[i] = lse;
        if (t->weights) { /* normalised once every task is done: finish_weights */
            t->stat_m[i] = m_use;
            t->stat_l[i] = l;
        }
    }
}

static void start_rows(workspace* w, const attnkit_attention_args* a, int64_t rows)
{
    /* every lane the vector loops touch, the padding rows' too */
    for (int64_t i = 0; i < round_up(rows, VLEN); i++) {
        w->m[i] = -INFINITY;
        w->l[i] = 0.0;
    }
    memset(w->o, 0, (size_t)(rows * padded_ev(a)) * sizeof(real));
}

/* ---------------------------------------------------------------------------
 * The block path: the products are (BS, BL) and (BL, Ev) GEMMs.
 *   st = k_tile @ q^T     keys down, queries across: k is read in place
 *   o  = alpha o + st^T @ v_tile
 */
static void run_block(workspace* w, const attnkit_attention_args* a, const task* t)
{
    const int64_t E = a->E, Ev = a->Ev, Evp = padded_ev(a), rows = t->blk.rows;
    const int64_t panels = (rows + NR - 1) / NR, cols = round_up(rows, VLEN);
    const real scale = (real)a->scale;
    /* q^T, scaled, in panels of NR queries; queries past rows are 0 */
    for (int64_t p = 0; p < panels; p++) {
        real* dst = w->q + p * E * NR;
        for (int64_t c = 0; c < NR; c++) {
            const int64_t i = p * NR + c;
            const real* qrow = t->q + i * a->q_row;
            for (int64_t e = 0; e < E; e++) dst[e * NR + c] = i < rows ? qrow[e] * scale : 0;
        }
    }
    start_rows(w, a, rows);

    const int64_t tile = tile_size(t);
    for (int64_t j0 = t->j_begin; j0 < t->j_end; j0 += tile) {
        int64_t n = min_i64(tile, t->j_end - j0);
        if (!tile_visible(a, &t->blk, j0, n)) {
            skip_weights(a, t, j0, n);
            continue;
        }
        if (a->causal) { /* a tile across the diagonal: cut at the block's last visible key */
            const int64_t seen = min_i64(n, t->blk.i0 + rows + a->causal_offset - j0);
            skip_weights(a, t, j0 + seen, n - seen);
            n = seen;
        }

        /* Rows of k and v far apart (heads side by side in a (N, L, H*E)
         * projection) are copied next to each other first: read in place,
         * each row is a few cache lines at a stride that maps them, and
         * the value rows, onto the same few L1 sets, which evict each other. */
        const real* kt = t->k + j0 * a->k_row;
        int64_t k_row = a->k_row;
        if (k_row != E) {
            for (int64_t j = 0; j < n; j++) memcpy(w->kp + j * E, kt + j * k_row, (size_t)E * sizeof(real));
            kt = w->kp;
            k_row = E;
        }
        const real* vt = t->v + j0 * a->v_row;
        int64_t v_row = a->v_row;
        if (v_row != Ev || Ev != Evp) { /* also ragged last columns: zero-padded to Evp */
            for (int64_t j = 0; j < n; j++) {
                memcpy(w->vp + j * Evp, vt + j * v_row, (size_t)Ev * sizeof(real));
                memset(w->vp + j * Evp + Ev, 0, (size_t)(Evp - Ev) * sizeof(real));
            }
            vt = w->vp;
            v_row = Evp;
        }

        /* st = k_tile @ q^T, MR keys against every query panel while those
         * keys are in L1 */
        for (int64_t j = 0; j < n; j += MR)
            for (int64_t p = 0; p < panels; p++)
                micro_kernel(w->st + j * BL + p * NR, BL, kt + j * k_row, k_row, 1,
                             w->q + p * E * NR, NR, E, min_i64(MR, n - j), NULL);
        if (a->causal || a->mask_kind != ATTNKIT_MASK_NONE) mask_scores(w->st, BL, 1, a, &t->blk, 0, rows, j0, n);
        if (t->weights)
            for (int64_t i = 0; i < rows; i++)
                for (int64_t j = 0; j < n; j++) t->weights[i * a->S + j0 + j] = w->st[j * BL + i];

        /* the online softmax, VLEN queries at a time */
        for (int64_t c = 0; c < cols; c += VLEN) {
            vreal tile_max = v_set1(-INFINITY);
            for (int64_t j = 0; j < n; j++) tile_max = v_max(tile_max, v_load(w->st + j * BL + c));
            const vreal m_old = v_load(w->m + c);
            const vreal m_new = v_max(tile_max, m_old); /* a NaN max keeps m_old */
            const vreal m_use = v_select(v_is_equal(m_new, v_set1(-INFINITY)), v_set1(0), m_new);
            vreal sum = v_set1(0);
            for (int64_t j = 0; j < n; j++) {
                const vreal p = v_exp_nonpositive(v_sub(v_load(w->st + j * BL + c), m_use));
                v_store(w->st + j * BL + c, p);
                sum = v_add(sum, p);
            }
            const vreal alpha = v_exp_nonpositive(v_sub(m_old, m_use)); /* 0 while m_old = -inf */
            v_store(w->m + c, m_new);
            v_store(w->alpha + c, alpha);
            real sums[VLEN], alphas[VLEN];
            v_lanes(sums, sum);
            v_lanes(alphas, alpha);
            for (int k = 0; k < VLEN; k++) w->l[c + k] = w->l[c + k] * alphas[k] + sums[k];
        }
        if (a->dropout_p > 0) drop_scores(w->st, BL, 1, a, &t->blk, 0, rows, j0, n);

        /* o = alpha o + st^T @ v_tile, NR columns of v at a time */
        for (int64_t p = 0; p * NR < Evp; p++)
            for (int64_t i = 0; i < rows; i += MR)
                micro_kernel(w->o + i * Evp + p * NR, Evp, w->st + i, 1, BL, vt + p * NR, v_row, n,
                             min_i64(MR, rows - i), w->alpha + i);
    }
    finish_rows(w, a, t);
}

/* ---------------------------------------------------------------------------
 * The row path, for blocks of a few queries: one query at a time, scores as
 * dot products along E, o updated along Ev. Decoding (L = 1) reads each key
 * and value once, at memory speed.
 */
AK_INLINE real dot(const real* x, const real* y, int64_t E)
{
    vreal s0 = v_set1(0), s1 = s0;
    int64_t e = 0;
    for (; e + 2 * VLEN <= E; e += 2 * VLEN) {
        s0 = v_fma(v_load(x + e), v_load(y + e), s0);
        s1 = v_fma(v_load(x + e + VLEN), v_load(y + e + VLEN), s1);
    }
    if (e + VLEN <= E) {
        s0 = v_fma(v_load(x + e), v_load(y + e), s0);
        e += VLEN;
    }
    double tail = 0.0;
    for (; e < E; e++) tail += (double)x[e] * y[e];
    return (real)(v_reduce_add(v_add(s0, s1)) + tail);
}

static void run_rows(workspace* w, const attnkit_attention_args* a, const task* t)
{
    const int64_t E = a->E, Ev = a->Ev, Evp = padded_ev(a);
    const real scale = (real)a->scale;
    real* s = w->st;
    start_rows(w, a, t->blk.rows);
    const int64_t tile = tile_size(t);
    for (int64_t j0 = t->j_begin; j0 < t->j_end; j0 += tile) {
        const int64_t n = min_i64(tile, t->j_end - j0), index = (j0 - t->j_begin) / tile;
        w->skipped[index] = !tile_visible(a, &t->blk, j0, n);
        if (w->skipped[index]) skip_weights(a, t, j0, n);
    }

    for (int64_t i = 0; i < t->blk.rows; i++) {
        const real* qrow = t->q + i * a->q_row;
        for (int64_t e = 0; e < E; e++) w->q[e] = qrow[e] * scale;
        real* o = w->o + i * Evp;
        for (int64_t j0 = t->j_begin; j0 < t->j_end; j0 += tile) {
            const int64_t n = min_i64(tile, t->j_end - j0);
            if (w->skipped[(j0 - t->j_begin) / tile]) continue;
            for (int64_t j = 0; j < n; j++) s[j] = dot(w->q, t->k + (j0 + j) * a->k_row, E);
            if (a->causal || a->mask_kind != ATTNKIT_MASK_NONE) mask_scores(s, 1, 0, a, &t->blk, i, i + 1, j0, n);
            if (t->weights) memcpy(t->weights + i * a->S + j0, s, (size_t)n * sizeof(real));

            vreal mx = v_set1(-INFINITY);
            int64_t j = 0;
            for (; j + VLEN <= n; j += VLEN) mx = v_max(mx, v_load(s + j));
            if (j < n) mx = v_max(mx, v_load_part(s + j, n - j, -INFINITY));
            const real m_old = w->m[i], tile_max = v_reduce_max(mx);
            const real m_new = tile_max > m_old ? tile_max : m_old; /* a NaN max keeps m_old */
            const real m_use = m_new == -INFINITY ? 0 : m_new;
            const vreal vm = v_set1(m_use);
            vreal sum = v_set1(0);
            for (j = 0; j + VLEN <= n; j += VLEN) {
                const vreal p = v_exp_nonpositive(v_sub(v_load(s + j), vm));
                v_store(s + j, p);
                sum = v_add(sum, p);
            }
            if (j < n) {
                const vreal p = v_exp_nonpositive(v_sub(v_load_part(s + j, n - j, -INFINITY), vm));
                v_store_part(s + j, p, n - j);
                sum = v_add(sum, p);
            }
            const real alpha = m_old == -INFINITY ? 0 : (real)exp((double)m_old - (double)m_use);
            w->m[i] = m_new;
            w->l[i] = w->l[i] * alpha + v_reduce_add(sum);
            if (a->dropout_p > 0) drop_scores(s, 1, 0, a, &t->blk, i, i + 1, j0, n);

            /* o = alpha o + sum_j p_j v_j */
            const vreal va = v_set1(alpha);
            for (int64_t e = 0; e < Evp; e += VLEN) v_store(o + e, v_mul(v_load(o + e), va));
            for (j = 0; j < n; j++) {
                const real* vrow = t->v + (j0 + j) * a->v_row;
                const vreal p = v_set1(s[j]);
                int64_t e = 0;
                for (; e + VLEN <= Ev; e += VLEN) v_store(o + e, v_fma(p, v_load(vrow + e), v_load(o + e)));
                if (e < Ev) v_store(o + e, v_fma(p, v_load_part(vrow + e, Ev - e, 0), v_load(o + e)));
            }
        }
    }
    finish_rows(w, a, t);
}

static void run_task(workspace* w, const attnkit_attention_args* a, const task* t)
{
    if (t->blk.rows <= SMALL_ROWS) run_rows(w, a, t);
    else run_block(w, a, t);
}

/* ---------------------------------------------------------------------------
 * The split of short queries over long keys, and its merge.
 */
static int64_t key_chunks(const attnkit_attention_args* a)
{
    if (a->L > BL || a->S <= SPLIT_KEYS) return 1;
    return (a->S + SPLIT_KEYS - 1) / SPLIT_KEYS;
}

typedef struct {
    real* o;   /* (B, H, chunks, L, Ev) unnormalised */
    real* m;   /* (B, H, chunks, L) */
    double* l; /* (B, H, chunks, L) */
} partials;

/* row (b, h, i): out = sum_c exp(m_c - M) o_c / sum_c exp(m_c - M) l_c;
 * gives back M (0 when no chunk saw a key) and that l */
static void merge_row(real* out, real* m_out, double* l_out, const partials* p,
                      const attnkit_attention_args* a, int64_t bh, int64_t i, int64_t chunks)
{
    const int64_t L = a->L, Ev = a->Ev;
    real M = -INFINITY;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t r = (bh * chunks + c) * L + i;
        if (p->l[r] > 0 && p->m[r] > M) M = p->m[r];
    }
    double l = 0.0;
    for (int64_t e = 0; e < Ev; e++) out[e] = 0;
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t r = (bh * chunks + c) * L + i;
        if (!(p->l[r] > 0)) {
            if (p->l[r] != p->l[r]) l = NAN; /* a NaN chunk makes the row NaN */
            continue;
        }
        const double f = exp((double)p->m[r] - (double)M);
        l += f * p->l[r];
        const real* o = p->o + r * Ev;
        for (int64_t e = 0; e < Ev; e++) out[e] += (real)f * o[e];
    }
    const real inv = (real)(l > 0 ? 1.0 / l : (l == 0 ? 0.0 : NAN));
    for (int64_t e = 0; e < Ev; e++) out[e] *= inv;
    *m_out = M == -INFINITY ? 0 : M;
    *l_out = l;
}

/* ---------------------------------------------------------------------------
 * The entry point.
 */
typedef struct {
    real* out;
    real* lse;
    real* weights;
    const real* q;
    const real* k;
    const real* v;
    const void* mask;
    const attnkit_attention_args* a;
    int64_t blocks, chunks;
    partials part;
    real* stat_m;   /* (B, H, L) when weights are asked for */
    double* stat_l;
} job;

static void make_task(task* t, const job* jb, int64_t index)
{
    const attnkit_attention_args* a = jb->a;
    const int64_t c = index % jb->chunks, qb = index / jb->chunks % jb->blocks;
    const int64_t bh = index / jb->chunks / jb->blocks, b = bh / a->H, h = bh % a->H;
    const int64_t hk = h / (a->H / a->Hkv);
    t->blk.i0 = qb * BL;
    t->blk.rows = min_i64(BL, a->L - t->blk.i0);
    t->j_begin = c * SPLIT_KEYS;
    t->j_end = jb->chunks == 1 ? a->S : min_i64(a->S, (c + 1) * SPLIT_KEYS);
    t->q = jb->q + a->q_batch[b] + h * a->q_head + t->blk.i0 * a->q_row;
    t->k = jb->k + a->k_batch[b] + hk * a->k_head;
    t->v = jb->v + a->v_batch[b] + hk * a->v_head;
    t->blk.mask = NULL;
    if (a->mask_kind != ATTNKIT_MASK_NONE) {
        const int64_t off = a->mask_batch[b] + h * a->mask_head + t->blk.i0 * a->mask_row;
        t->blk.mask = a->mask_kind == ATTNKIT_MASK_BOOL ? (const uint8_t*)jb->mask + off
                                                    : (const uint8_t*)((const real*)jb->mask + off);
    }
    t->blk.dropout_bh = (uint32_t)bh;
    if (jb->chunks == 1) {
        t->out = jb->out + (bh * a->L + t->blk.i0) * a->Ev;
        t->lse = jb->lse ? jb->lse + bh * a->L + t->blk.i0 : NULL;
        t->weights = jb->weights ? jb->weights + (bh * a->L + t->blk.i0) * a->S : NULL;
        t->stat_m = jb->stat_m ? jb->stat_m + bh * a->L + t->blk.i0 : NULL;
        t->stat_l = jb->stat_l ? jb->stat_l + bh * a->L + t->blk.i0 : NULL;
        t->part_m = NULL;
        t->part_l = NULL;
    } else {
        const int64_t r = (bh * jb->chunks + c) * a->L + t->blk.i0;
        t->out = jb->part.o + r * a->Ev;
        t->lse = NULL;
        t->weights = jb->weights ? jb->weights + (bh * a->L + t->blk.i0) * a->S : NULL;
        t->stat_m = NULL; /* the merge keeps the row's statistics */
        t->stat_l = NULL;
        t->part_m = jb->part.m + r;
        t->part_l = jb->part.l + r;
    }
}

/* Rows [begin, end) of the weights: each (b, h, i) row normalised, or with
 * weights_mean each (b, i) row the mean of its heads' normalised rows. */
static void finish_weights_rows(const void* ctx, int64_t begin, int64_t end)
{
    const job* jb = ctx;
    const attnkit_attention_args* a = jb->a;
    const int64_t L = a->L, S = a->S, H = a->H;
    if (!a->weights_mean) {
        for (int64_t r = begin; r < end; r++)
            finish_weights_row(jb->weights + r * S, a, (uint32_t)(r / L), r % L, jb->stat_m[r], jb->stat_l[r]);
        return;
    }
    const vreal inv_heads = v_set1((real)(1.0 / (double)H));
    for (int64_t r = begin; r < end; r++) { /* r = b*L + i */
        const int64_t b = r / L, i = r % L;
        real* mean = (real*)a->weights_mean + r * S;
        memset(mean, 0, (size_t)S * sizeof(real));
        for (int64_t h = 0; h < H; h++) {
            const int64_t row = (b * H + h) * L + i;
            real* w = jb->weights + row * S;
            const real m = jb->stat_m[row];
            const double l = jb->stat_l[row];
            if (a->dropout_p == 0 && l > 0) {
                /* mean += exp(w - m - log l) / H straight from the raw scores:
                 * the per-head rows are scratch here, and not writing them
                 * back saves a third of this pass's memory traffic (32 MB at
                 * H8 L=S=1024) */
                const vreal vm = v_set1(m), vlog = v_set1((real)log(l));
                int64_t j = 0;
                for (; j + VLEN <= S; j += VLEN) {
                    const vreal p = v_exp_nonpositive(v_sub(v_sub(v_load(w + j), vm), vlog));
                    v_store(mean + j, v_fma(p, inv_heads, v_load(mean + j)));
                }
                if (j < S) {
                    const vreal p = v_exp_nonpositive(v_sub(v_sub(v_load_part(w + j, S - j, -INFINITY), vm), vlog));
                    v_store_part(mean + j, v_fma(p, inv_heads, v_load_part(mean + j, S - j, 0)), S - j);
                }
                continue;
            }
            finish_weights_row(w, a, (uint32_t)(b * H + h), i, m, l);
            int64_t j = 0;
            for (; j + VLEN <= S; j += VLEN) v_store(mean + j, v_fma(v_load(w + j), inv_heads, v_load(mean + j)));
            if (j < S)
                v_store_part(mean + j, v_fma(v_load_part(w + j, S - j, 0), inv_heads, v_load_part(mean + j, S - j, 0)),
                             S - j);
        }
    }
}

static void finish_weights(const job* jb)
{
    const attnkit_attention_args* a = jb->a;
    const int64_t rows = a->B * a->L * (a->weights_mean ? 1 : a->H);
    const int64_t per_row = a->S * (a->weights_mean ? a->H : 1) * 4;
    over_rows(jb, rows, per_row, finish_weights_rows);
}

static void run_tasks(const job* jb, workspace* w, int64_t begin, int64_t end)
{
    task t;
    for (int64_t index = begin; index < end; index++) {
        make_task(&t, jb, index);
        run_task(w, jb->a, &t);
    }
}

int KERNEL(attention)(real* out, real* lse, real* weights, const real* q, const real* k,
                      const real* v, const void* mask, const attnkit_attention_args* a)
{
    if (a->B == 0 || a->H == 0 || a->L == 0 || a->Ev == 0) return 0;
    job jb = {out, lse, weights, q, k, v, mask, a, (a->L + BL - 1) / BL, key_chunks(a),
              {NULL, NULL, NULL}, NULL, NULL};
    const int64_t BH = a->B * a->H;
    if (a->S == 0) { /* no keys: every row has nothing to attend to */
        memset(out, 0, (size_t)(BH * a->L * a->Ev) * sizeof(real));
        if (lse)
            for (int64_t r = 0; r < BH * a->L; r++) lse[r] = -INFINITY;
        return 0;
    }
    void* stat_block = NULL;
    if (weights) {
        stat_block = malloc((size_t)(BH * a->L) * (sizeof(double) + sizeof(real)));
        if (!stat_block) return -1;
        jb.stat_l = (double*)stat_block;
        jb.stat_m = (real*)(jb.stat_l + BH * a->L);
    }
    void* part_block = NULL;
    if (jb.chunks > 1) {
        const int64_t rows = BH * jb.chunks * a->L;
        part_block = malloc((size_t)rows * ((size_t)a->Ev * sizeof(real) + sizeof(real) + sizeof(double)));
        if (!part_block) {
            free(stat_block);
            return -1;
        }
        jb.part.l = (double*)part_block;
        jb.part.m = (real*)(jb.part.l + rows);
        jb.part.o = jb.part.m + rows;
    }
    const int64_t tasks = BH * jb.blocks * jb.chunks;
    const int64_t work = BL * min_i64(a->S, SPLIT_KEYS) * (a->E + a->Ev);
    const int threads = attnkit_plan_threads(tasks, work);
    int failed = 0;
    if (threads <= 1) {
        workspace w;
        if (workspace_alloc(&w, a) != 0) {
            failed = 1;
        } else {
            run_tasks(&jb, &w, 0, tasks);
            free(w.block);
        }
    } else {
        const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
        {
            const unsigned own_fp = fp_controls_adopt(fp);
            workspace w;
            const int ok = workspace_alloc(&w, a) == 0;
            if (!ok) {
#pragma omp atomic write
                failed = 1;
            }
            /* Tasks go to whichever thread is free; each is computed whole by
             * one thread, so the result does not depend on who took it. */
#pragma omp for schedule(dynamic, 1)
            for (int64_t index = 0; index < tasks; index++)
                if (ok) run_tasks(&jb, &w, index, index + 1);
            if (ok) free(w.block);
            fp_controls_restore(own_fp);
        }
    }
    if (!failed && jb.chunks > 1) {
        for (int64_t bh = 0; bh < BH; bh++)
            for (int64_t i = 0; i < a->L; i++) {
                real m;
                double l;
                merge_row(out + (bh * a->L + i) * a->Ev, &m, &l, &jb.part, a, bh, i, jb.chunks);
                if (lse) lse[bh * a->L + i] = l > 0 ? (real)(m + log(l)) : (l == 0 ? -INFINITY : NAN);
                if (weights) {
                    jb.stat_m[bh * a->L + i] = m;
                    jb.stat_l[bh * a->L + i] = l;
                }
            }
    }
    if (!failed && weights) finish_weights(&jb);
    free(part_block);
    free(stat_block);
    return failed ? -1 : 0;
}
