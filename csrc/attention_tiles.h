/*
 * attention_tiles.h: what attention's forward (attention.c) and backward
 * (attention_backward.c) share about a block of query rows meeting a tile of
 * keys: whether any query sees the tile (causal limit, mask), the mask and
 * the causal limit applied to the scores, dropout replayed from its hash, and
 * passes over rows shared among threads.
 * Include after simd.h and tiles.h.
 */
#ifndef ATTNKIT_ATTENTION_TILES_H
#define ATTNKIT_ATTENTION_TILES_H

/* rows [i0, i0 + rows) of head bh = b*H + h */
typedef struct {
    const uint8_t* mask; /* the head's mask from row i0 (bool or real), or NULL */
    int64_t i0, rows;
    uint32_t dropout_bh; /* b*H + h: the dropout hash's stream */
} query_block;

/* whether any query of the task sees any key of [j0, j0 + n) */
static inline int tile_visible(const attnkit_attention_args* a, const query_block* t, int64_t j0, int64_t n)
{
    if (a->causal && j0 > t->i0 + t->rows - 1 + a->causal_offset) return 0;
    if (a->mask_kind == ATTNKIT_MASK_NONE) return 1;
    const int64_t cols = a->mask_col ? n : 1; /* a mask constant along S: one look */
    /* a mask the same for every query: one look, at the last row, which sees
     * the most keys when causal */
    const int64_t first_row = a->mask_row ? 0 : t->rows - 1;
    for (int64_t i = first_row; i < t->rows; i++) {
        if (a->causal && t->i0 + i + a->causal_offset < j0) continue; /* this row sees none */
        if (a->mask_kind == ATTNKIT_MASK_BOOL) {
            const uint8_t* mrow = t->mask + i * a->mask_row + j0 * a->mask_col;
            for (int64_t j = 0; j < cols; j++)
                if (mrow[j * a->mask_col]) return 1;
        } else {
            const real* mrow = (const real*)t->mask + i * a->mask_row + j0 * a->mask_col;
            for (int64_t j = 0; j < cols; j++)
                if (mrow[j * a->mask_col] != -INFINITY) return 1;
        }
    }
    return 0;
}

/* the mask and the causal limit, applied to score (i, j) for local query i
 * and key j0 + j; `score` is where that score lives (strides by the path) */
static inline void mask_scores(real* st, int64_t key_step, int64_t query_step,
                               const attnkit_attention_args* a, const query_block* t, int64_t i_begin, int64_t i_end, int64_t j0, int64_t n)
{
    for (int64_t j = 0; j < n; j++) {
        real* col = st + j * key_step;
        int64_t first = i_begin;
        if (a->causal) { /* query i sees key j0 + j when j0 + j <= i0 + i + offset */
            const int64_t first_seeing = j0 + j - a->causal_offset - t->i0;
            for (; first < i_end && first < first_seeing; first++) col[first * query_step] = -INFINITY;
        }
        if (a->mask_kind == ATTNKIT_MASK_BOOL) {
            const uint8_t* m = t->mask + (j0 + j) * a->mask_col;
            if (a->mask_row == 0) { /* a key padding mask: one look per key */
                if (!m[0])
                    for (int64_t i = first; i < i_end; i++) col[i * query_step] = -INFINITY;
                continue;
            }
            for (int64_t i = first; i < i_end; i++)
                if (!m[i * a->mask_row]) col[i * query_step] = -INFINITY;
        } else if (a->mask_kind == ATTNKIT_MASK_ADD) {
            const real* m = (const real*)t->mask + (j0 + j) * a->mask_col;
            if (a->mask_row == 0) { /* the same bias for every query */
                const real bias = m[0];
                if (bias != 0)
                    for (int64_t i = first; i < i_end; i++) col[i * query_step] += bias;
                continue;
            }
            for (int64_t i = first; i < i_end; i++) col[i * query_step] += m[i * a->mask_row];
        }
    }
}

/* dropout of p (i, j) for local query i, key j0 + j, as for mask_scores */
static inline void drop_scores(real* st, int64_t key_step, int64_t query_step,
                               const attnkit_attention_args* a, const query_block* t, int64_t i_begin, int64_t i_end, int64_t j0, int64_t n)
{
    const uint32_t threshold = (uint32_t)ceil(a->dropout_p * 16777216.0);
    const real keep_scale = a->dropout_p < 1 ? (real)(1.0 / (1.0 - a->dropout_p)) : 0;
    for (int64_t i = i_begin; i < i_end; i++) {
        const uint32_t key = attnkit_dropout_row_key(a->dropout_seed, t->dropout_bh, (uint32_t)(t->i0 + i));
        for (int64_t j = 0; j < n; j++) {
            real* p = st + j * key_step + i * query_step;
            *p = attnkit_dropout_keep(key, (uint32_t)(j0 + j), threshold) ? *p * keep_scale : 0;
        }
    }
}

/* fn(ctx, begin, end) over rows [0, rows), shared out among threads in
 * chunks; each row is computed whole by one thread, so who takes a chunk
 * does not change the result */
static inline void over_rows(const void* ctx, int64_t rows, int64_t work_per_row,
                             void (*fn)(const void*, int64_t, int64_t))
{
    const int threads = attnkit_plan_threads(rows, work_per_row);
    if (threads <= 1) {
        fn(ctx, 0, rows);
        return;
    }
    const int64_t chunk = attnkit_chunk_size(rows, threads);
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < (rows + chunk - 1) / chunk; r++) fn(ctx, r * chunk, min_i64(rows, (r + 1) * chunk));
        fp_controls_restore(own_fp);
    }
}

#endif
