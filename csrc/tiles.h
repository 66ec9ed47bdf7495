/*
 * tiles.h: the register-blocked micro-kernel that every product in attnkit
 * goes through (attention.c, attention_backward.c, gemm.c), for the build's ISA and precision.
 * Include after simd.h.
 */
#ifndef ATTNKIT_TILES_H
#define ATTNKIT_TILES_H

/* Register blocking: MR x NR of C in MR*NV vector registers (12 of AVX2's
 * 16, 24 of AVX-512's 32), plus NV for B and one for A. */
#if defined(ATTNKIT_ISA_avx512)
enum { MR = 12, NV = 2 };
#elif defined(ATTNKIT_ISA_avx2)
enum { MR = 6, NV = 2 };
#else
enum { MR = 4, NV = 4 };

#endif
enum { NR = NV * VLEN };

/* The accumulate mode of the micro-kernels: alpha = ACCUMULATE gives
 * C += A @ B (fma(1, c, acc) is c + acc, rounded once). */
static const real ACCUMULATE[12] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
_Static_assert(MR <= 12, "ACCUMULATE needs MR ones");

/* C's first mr rows = acc, or alpha[i] * C + acc. acc is only ever indexed
 * by constants, so that it stays in registers: a partial tile (mr < MR) goes
 * through a buffer on the stack, whole, and its first mr rows on to C. */
AK_INLINE void store_tile(real* c, int64_t ldc, vreal acc[MR][NV], int64_t mr, const real* alpha)
{
    real tile[MR * NR] __attribute__((aligned(64)));
    real* dst = c;
    int64_t ld = ldc;
    if (mr < MR) {
        dst = tile;
        ld = NR;
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) {
            real* cp = dst + i * ld + j * VLEN;
            v_store(cp, alpha && mr == MR ? v_fma(v_set1(alpha[i]), v_load(cp), acc[i][j]) : acc[i][j]);
        }
    if (mr == MR) return;
    for (int64_t i = 0; i < mr; i++)
        for (int j = 0; j < NV; j++) {
            real* cp = c + i * ldc + j * VLEN;
            const vreal t = v_load(tile + i * NR + j * VLEN);
            v_store(cp, alpha ? v_fma(v_set1(alpha[i]), v_load(cp), t) : t);
        }
}

/* ---------------------------------------------------------------------------
 * The micro-kernel: attention's two products and the linear layer's GEMM.
 *
 * C (mr, NR) = A (mr, K) @ B (K, NR), or alpha[i] * C + A @ B when alpha is
 * not NULL (C += A @ B with alpha = ACCUMULATE). A's element (i, kk) is
 * a[i*a_row + kk*a_k], read one at a time and broadcast; B's row kk is
 * b + kk*ldb, NR wide; C's row i is c + i*ldc. Rows of A past mr repeat row
 * mr - 1 and are not stored, so every call runs the same unrolled code.
 */
AK_INLINE void micro_kernel(real* c, int64_t ldc, const real* a, int64_t a_row, int64_t a_k,
                            const real* b, int64_t ldb, int64_t K, int64_t mr, const real* alpha)
{
    vreal acc[MR][NV];
    const real* arow[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) {
        arow[i] = a + (i < mr ? i : mr - 1) * a_row;
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) acc[i][j] = v_set1(0);
    }
    for (int64_t kk = 0; kk < K; kk++) {
        vreal bv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) bv[j] = v_load(b + kk * ldb + j * VLEN);
        const int64_t ak = kk * a_k;
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            const vreal av = v_set1(arow[i][ak]);
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) acc[i][j] = v_fma(av, bv[j], acc[i][j]);
        }
    }
    store_tile(c, ldc, acc, mr, alpha);
}


/* The micro-kernel on a packed A: a (K, MR), row kk of it the MR elements
 * that are broadcast at step kk (BLIS's packed micro-panel: one stream). */
AK_INLINE void micro_kernel_packed(real* c, int64_t ldc, const real* a, const real* b, int64_t ldb,
                                   int64_t K, int64_t mr, const real* alpha)
{
    vreal acc[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) acc[i][j] = v_set1(0);
    for (int64_t kk = 0; kk < K; kk++) {
        vreal bv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) bv[j] = v_load(b + kk * ldb + j * VLEN);
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            const vreal av = v_set1(a[kk * MR + i]);
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) acc[i][j] = v_fma(av, bv[j], acc[i][j]);
        }
    }
    store_tile(c, ldc, acc, mr, alpha);
}


/* dst (K, NR) = K columns of rows [first, first + count) of src (rows at
 * src_row), transposed; columns past count are 0. A full panel goes
 * VLEN x VLEN blocks at a time through the registers (v_transpose). */
static inline void transpose_panel(real* dst, const real* src, int64_t src_row, int64_t K, int64_t first,
                            int64_t count)
{
    int64_t k0 = 0;
    if (count == NR) {
        for (; k0 + VLEN <= K; k0 += VLEN)
#pragma GCC unroll 4
            for (int h = 0; h < NV; h++) {
                vreal r[VLEN];
#pragma GCC unroll 16
                for (int t = 0; t < VLEN; t++) r[t] = v_load(src + (first + h * VLEN + t) * src_row + k0);
                v_transpose(r);
#pragma GCC unroll 16
                for (int t = 0; t < VLEN; t++) v_store(dst + (k0 + t) * NR + h * VLEN, r[t]);
            }
    }
    for (int64_t j = 0; j < NR; j++) {
        if (j < count) {
            const real* row = src + (first + j) * src_row;
            for (int64_t k = k0; k < K; k++) dst[k * NR + j] = row[k];
        } else {
            for (int64_t k = k0; k < K; k++) dst[k * NR + j] = 0;
        }
    }
}

/* A product's epilogue: out (n) = f(x (n) + bias (n)), f an ATTNKIT_* kind
 * of attnkit_bias_activation (activation.c); bias may be NULL, out may be x. */
void KERNEL(activation_run)(real* out, const real* x, const real* bias, int64_t n, int kind);

#endif
