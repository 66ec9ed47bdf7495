/*
 * colsum.h: sums over the rows of an (N, C) array, column by column
 * (dweight, dbias), in an order fixed by the shape alone.
 *
 * The N rows are cut into colsum_blocks(N, C) blocks of consecutive rows, a
 * count that depends on nothing but N and C. One thread sums a block, its
 * rows in order, into `real` partial sums (part) that move into double ones
 * (total) every COLSUM_FLUSH_ROWS rows; colsum_finish then adds the blocks'
 * totals in block order. So a result never depends on the thread count or
 * on which thread took which block (no atomics, no per-thread buffers), and
 * a sum over many rows is blocked three levels deep (16 rows in `real`, a
 * block in double, blocks in double), never one long running sum.
 *
 * Included by the kernel sources after simd.h (it uses `real`).
 */
#ifndef ATTNKIT_COLSUM_H
#define ATTNKIT_COLSUM_H

#include <stdlib.h>

enum { COLSUM_MIN_ROWS = 16, COLSUM_FLUSH_ROWS = 16, COLSUM_MAX_BLOCKS = 32 };

/* Blocks for N rows of C columns: enough to share among threads, few enough
 * that every block's partial sums (12 bytes a column and sum) stay near 4 MB. */
static inline int64_t colsum_blocks(int64_t N, int64_t C)
{
    const int64_t by_rows = (N + COLSUM_MIN_ROWS - 1) / COLSUM_MIN_ROWS;
    const int64_t by_size = ((int64_t)4 << 20) / (12 * max_i64(C, 1));
    return max_i64(1, min_i64(by_rows, min_i64(COLSUM_MAX_BLOCKS, by_size)));
}

/* Rows [colsum_first_row(b), colsum_first_row(b + 1)) form block b. */
static inline int64_t colsum_first_row(int64_t N, int64_t blocks, int64_t b)
{
    return N / blocks * b + min_i64(b, N % blocks);
}

typedef struct {
    int64_t blocks, sums, C; /* sums: how many column sums (dweight, dbias: 2) */
    double* total;           /* (blocks, sums, C) */
    real* part;              /* (blocks, sums, C) */
} colsum;

/* 0, or -1 when the workspace cannot be allocated. Zeroed. */
static inline int colsum_alloc(colsum* w, int64_t N, int64_t C, int64_t sums)
{
    w->blocks = colsum_blocks(N, C);
    w->sums = sums;
    w->C = C;
    const size_t n = (size_t)(w->blocks * sums * C);
    w->total = (double*)calloc(n ? n : 1, sizeof(double));
    w->part = (real*)calloc(n ? n : 1, sizeof(real));
    if (!w->total || !w->part) {
        free(w->total);
        free(w->part);
        return -1;
    }
    return 0;
}

/* Block b's partial sum number s (C reals). */
static inline real* colsum_part(const colsum* w, int64_t b, int64_t s)
{
    return w->part + (b * w->sums + s) * w->C;
}

/* Move block b's partial sums into its totals. */
static inline void colsum_flush(const colsum* w, int64_t b)
{
    real* p = w->part + b * w->sums * w->C;
    double* t = w->total + b * w->sums * w->C;
    for (int64_t i = 0; i < w->sums * w->C; i++) {
        t[i] += p[i];
        p[i] = 0;
    }
}

/* out[s][c] += the sum over blocks, in block order; out[s] may be NULL. Frees. */
static inline void colsum_finish(colsum* w, real* const* out)
{
    for (int64_t s = 0; s < w->sums; s++) {
        if (!out[s]) continue;
        for (int64_t c = 0; c < w->C; c++) {
            double sum = 0.0;
            for (int64_t b = 0; b < w->blocks; b++) sum += w->total[(b * w->sums + s) * w->C + c];
            out[s][c] = (real)((double)out[s][c] + sum);
        }
    }
    free(w->total);
    free(w->part);
}

#endif /* ATTNKIT_COLSUM_H */
