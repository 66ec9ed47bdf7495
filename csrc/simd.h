/*
 * simd.h: the small vector vocabulary every kernel is written in.
 *
 * A kernel source (softmax.c, norm.c) is compiled six times: for
 *   ATTNKIT_REAL_BITS = 32 or 64   -> `real` is float or double
 *   ATTNKIT_ISA_scalar / _avx2 / _avx512
 * and this header gives, for that build:
 *   real, vreal (VLEN reals), vmask (VLEN booleans), and v_* operations.
 * KERNEL(name) names the build's copy of a function, e.g. softmax_f32_avx2.
 *
 * Semantics shared by every ISA (the kernels rely on them):
 *   v_max(a, b) = a > b ? a : b, v_min(a, b) = a < b ? a : b  (x86's maxps:
 *   a NaN in either operand gives b)
 *   v_exp_nonpositive (x <= 0) is accurate to about 1 ulp, right down into
 *   the subnormals, exactly 0 for -inf, and NaN for NaN
 *   v_reduce_add adds the lanes in double
 *   v_stream stores to a VLEN-aligned address past the caches (a non-temporal
 *   store: no read-for-ownership of a line that will be overwritten anyway);
 *   v_stream_fence orders such stores before anything that follows
 *   vacc accumulates a sum more accurately than one running real would:
 *   vacc_add(acc, v) adds v's lanes, vacc_add_square(acc, v) their squares,
 *   vacc_sum(acc) gives the total as a double (see below for how)
 */
#ifndef ATTNKIT_SIMD_H
#define ATTNKIT_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attnkit.h"

#if !defined(ATTNKIT_REAL_BITS)
#error "compile with -DATTNKIT_REAL_BITS=32 or 64"
#endif

#define AK_INLINE static inline __attribute__((always_inline))

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

/* A team computes under its caller's floating-point controls. OpenMP's
 * threads keep their own MXCSR (rounding mode, flush-to-zero,
 * denormals-are-zero, exception masks), set when the pool was made; a caller
 * that changed its own since would otherwise get results that depend on how
 * many threads ran. Each thread of a team adopts the caller's controls at the
 * start of the region and puts its own back at the end; the sticky exception
 * flags (the low six bits) are left to each thread.
 *   const unsigned fp = fp_controls();             (in the caller)
 *   #pragma omp parallel ...
 *   { const unsigned own = fp_controls_adopt(fp);  ...work...  fp_controls_restore(own); }
 */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
enum { FP_CONTROL_BITS = 0xffc0 };
static inline unsigned fp_controls(void) { return _mm_getcsr() & FP_CONTROL_BITS; }
static inline unsigned fp_controls_adopt(unsigned caller)
{
    const unsigned csr = _mm_getcsr();
    if ((csr & FP_CONTROL_BITS) != caller) _mm_setcsr((csr & ~FP_CONTROL_BITS) | caller);
    return csr & FP_CONTROL_BITS;
}
static inline void fp_controls_restore(unsigned own)
{
    const unsigned csr = _mm_getcsr();
    if ((csr & FP_CONTROL_BITS) != own) _mm_setcsr((csr & ~FP_CONTROL_BITS) | own);
}
#else
static inline unsigned fp_controls(void) { return 0; }
static inline unsigned fp_controls_adopt(unsigned caller) { return caller; }
static inline void fp_controls_restore(unsigned own) { (void)own; }
#endif

#if ATTNKIT_REAL_BITS == 32
typedef float real;
typedef int32_t real_bits; /* an integer as wide as real */
#define REAL_NAME f32
#else
typedef double real;
typedef int64_t real_bits;
#define REAL_NAME f64
#endif

#if defined(ATTNKIT_ISA_avx512)
#define ISA_NAME avx512
#elif defined(ATTNKIT_ISA_avx2)
#define ISA_NAME avx2
#elif defined(ATTNKIT_ISA_scalar)
#define ISA_NAME scalar
#else
#error "compile with -DATTNKIT_ISA_scalar, _avx2 or _avx512"
#endif

#define AK_PASTE4_(a, b, c, d) a##b##_##c##_##d
#define AK_PASTE4(a, b, c, d) AK_PASTE4_(a, b, c, d)
#define KERNEL(name) AK_PASTE4(attnkit_, name, REAL_NAME, ISA_NAME)

/* This build's copy of every kernel in the list, declared so that the
 * compiler checks each definition against kernels.def. */
#if ATTNKIT_REAL_BITS == 32
#define REAL float
#else
#define REAL double
#endif
#define ATTNKIT_KERNEL(returns, name, params, args) returns KERNEL(name) params;
#include "kernels.def"
#undef ATTNKIT_KERNEL
#undef REAL

/* ======================================================================== */
#if defined(ATTNKIT_ISA_scalar)
/* One lane. Written so that a compiler for plain x86-64 (SSE2, no FMA) makes
 * straight scalar code of it. */
enum { VLEN = 1 };
typedef real vreal;
typedef int vmask;

AK_INLINE vreal v_load(const real* p) { return *p; }
AK_INLINE void v_store(real* p, vreal v) { *p = v; }
AK_INLINE void v_stream(real* p, vreal v) { *p = v; }
AK_INLINE void v_stream_fence(void) {}
AK_INLINE vreal v_set1(real a) { return a; }
AK_INLINE vreal v_add(vreal a, vreal b) { return a + b; }
AK_INLINE vreal v_sub(vreal a, vreal b) { return a - b; }
AK_INLINE vreal v_mul(vreal a, vreal b) { return a * b; }
AK_INLINE vreal v_fma(vreal a, vreal b, vreal c) { return a * b + c; } /* no FMA unit here */
AK_INLINE vreal v_max(vreal a, vreal b) { return a > b ? a : b; }
AK_INLINE vreal v_min(vreal a, vreal b) { return a < b ? a : b; }
AK_INLINE vreal v_abs(vreal a) { return a < 0 ? -a : a; }
AK_INLINE vreal v_select(vmask m, vreal a, vreal b) { return m ? a : b; }
AK_INLINE vmask v_is_equal(vreal a, vreal b) { return a == b; }
AK_INLINE vmask v_is_less(vreal a, vreal b) { return a < b; }
AK_INLINE vreal v_div(vreal a, vreal b) { return a / b; }
AK_INLINE double v_reduce_add(vreal v) { return (double)v; }
AK_INLINE real v_reduce_max(vreal v) { return v; }
AK_INLINE void v_lanes(real* dst, vreal v) { *dst = v; }
/* r[i] lane j <-> r[j] lane i: a VLEN x VLEN block transposed in registers */
AK_INLINE void v_transpose(vreal r[VLEN]) { (void)r; }
/* Never called with VLEN == 1 (0 < n < VLEN is empty), defined for symmetry. */
AK_INLINE vreal v_load_part(const real* p, int64_t n, real fill) { return n > 0 ? *p : fill; }
AK_INLINE void v_store_part(real* p, vreal v, int64_t n) { if (n > 0) *p = v; }
AK_INLINE vmask v_where(const uint8_t* w, int64_t step, int64_t n) { (void)step; return n > 0 && *w != 0; }

AK_INLINE vreal v_shl_bits(vreal v, int k) {
    /* the bits of v shifted left by k, as a real */
    real_bits bits;
    memcpy(&bits, &v, sizeof bits);
    bits = (real_bits)((uint64_t)bits << k);
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* ======================================================================== */
#elif defined(ATTNKIT_ISA_avx2)
#include <immintrin.h>
#if ATTNKIT_REAL_BITS == 32
enum { VLEN = 8 };
typedef __m256 vreal;
typedef __m256 vmask; /* all-ones or all-zeros lanes */
AK_INLINE vreal v_load(const real* p) { return _mm256_loadu_ps(p); }
AK_INLINE void v_store(real* p, vreal v) { _mm256_storeu_ps(p, v); }
AK_INLINE void v_stream(real* p, vreal v) { _mm256_stream_ps(p, v); }
AK_INLINE vreal v_set1(real a) { return _mm256_set1_ps(a); }
AK_INLINE vreal v_add(vreal a, vreal b) { return _mm256_add_ps(a, b); }
AK_INLINE vreal v_sub(vreal a, vreal b) { return _mm256_sub_ps(a, b); }
AK_INLINE vreal v_mul(vreal a, vreal b) { return _mm256_mul_ps(a, b); }
AK_INLINE vreal v_fma(vreal a, vreal b, vreal c) { return _mm256_fmadd_ps(a, b, c); }
AK_INLINE vreal v_max(vreal a, vreal b) { return _mm256_max_ps(a, b); }
AK_INLINE vreal v_min(vreal a, vreal b) { return _mm256_min_ps(a, b); }
AK_INLINE vreal v_abs(vreal a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
AK_INLINE vreal v_select(vmask m, vreal a, vreal b) { return _mm256_blendv_ps(b, a, m); }
AK_INLINE vmask v_is_equal(vreal a, vreal b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
AK_INLINE vmask v_is_less(vreal a, vreal b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
AK_INLINE vreal v_div(vreal a, vreal b) { return _mm256_div_ps(a, b); }
AK_INLINE double v_reduce_add(vreal v) {
    __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                              _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
AK_INLINE real v_reduce_max(vreal v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
AK_INLINE void v_lanes(real* dst, vreal v) { _mm256_storeu_ps(dst, v); }
AK_INLINE void v_transpose(vreal r[VLEN]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
AK_INLINE __m256i lanes_below_(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
AK_INLINE vreal v_load_part(const real* p, int64_t n, real fill) {
    __m256i m = lanes_below_(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
AK_INLINE void v_store_part(real* p, vreal v, int64_t n) { _mm256_maskstore_ps(p, lanes_below_(n), v); }
AK_INLINE vreal v_shl_bits(vreal v, int k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(v), k));
}
AK_INLINE __m256i where_bytes_to_lanes_(__m128i bytes) { return _mm256_cvtepu8_epi32(bytes); }
#else /* double */
enum { VLEN = 4 };
typedef __m256d vreal;
typedef __m256d vmask;
AK_INLINE vreal v_load(const real* p) { return _mm256_loadu_pd(p); }
AK_INLINE void v_store(real* p, vreal v) { _mm256_storeu_pd(p, v); }
AK_INLINE void v_stream(real* p, vreal v) { _mm256_stream_pd(p, v); }
AK_INLINE vreal v_set1(real a) { return _mm256_set1_pd(a); }
AK_INLINE vreal v_add(vreal a, vreal b) { return _mm256_add_pd(a, b); }
AK_INLINE vreal v_sub(vreal a, vreal b) { return _mm256_sub_pd(a, b); }
AK_INLINE vreal v_mul(vreal a, vreal b) { return _mm256_mul_pd(a, b); }
AK_INLINE vreal v_fma(vreal a, vreal b, vreal c) { return _mm256_fmadd_pd(a, b, c); }
AK_INLINE vreal v_max(vreal a, vreal b) { return _mm256_max_pd(a, b); }
AK_INLINE vreal v_min(vreal a, vreal b) { return _mm256_min_pd(a, b); }
AK_INLINE vreal v_abs(vreal a) { return _mm256_andnot_pd(_mm256_set1_pd(-0.0), a); }
AK_INLINE vreal v_select(vmask m, vreal a, vreal b) { return _mm256_blendv_pd(b, a, m); }
AK_INLINE vmask v_is_equal(vreal a, vreal b) { return _mm256_cmp_pd(a, b, _CMP_EQ_OQ); }
AK_INLINE vmask v_is_less(vreal a, vreal b) { return _mm256_cmp_pd(a, b, _CMP_LT_OQ); }
AK_INLINE vreal v_div(vreal a, vreal b) { return _mm256_div_pd(a, b); }
AK_INLINE double v_reduce_add(vreal v) {
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
}
AK_INLINE real v_reduce_max(vreal v) {
    __m128d m = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    m = _mm_max_sd(m, _mm_unpackhi_pd(m, m));
    return _mm_cvtsd_f64(m);
}
AK_INLINE void v_lanes(real* dst, vreal v) { _mm256_storeu_pd(dst, v); }
AK_INLINE void v_transpose(vreal r[VLEN]) {
    const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
    const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
    r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
    r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
    r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}
AK_INLINE __m256i lanes_below_(int64_t n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
AK_INLINE vreal v_load_part(const real* p, int64_t n, real fill) {
    __m256i m = lanes_below_(n);
    return _mm256_blendv_pd(_mm256_set1_pd(fill), _mm256_maskload_pd(p, m), _mm256_castsi256_pd(m));
}
AK_INLINE void v_store_part(real* p, vreal v, int64_t n) { _mm256_maskstore_pd(p, lanes_below_(n), v); }
AK_INLINE vreal v_shl_bits(vreal v, int k) {
    return _mm256_castsi256_pd(_mm256_slli_epi64(_mm256_castpd_si256(v), k));
}
AK_INLINE __m256i where_bytes_to_lanes_(__m128i bytes) { return _mm256_cvtepu8_epi64(bytes); }
#endif
AK_INLINE vmask v_where(const uint8_t* w, int64_t step, int64_t n) {
    /* Lane k is set when w[k*step] != 0, for k < n; lanes >= n are clear. */
    __m128i bytes;
    if (step == 1 && n == VLEN) {
#if ATTNKIT_REAL_BITS == 32
        bytes = _mm_loadl_epi64((const __m128i*)w);
#else
        int32_t four;
        memcpy(&four, w, 4);
        bytes = _mm_cvtsi32_si128(four);
#endif
    } else {
        uint8_t gathered[16] = {0};
        for (int64_t k = 0; k < n; k++) gathered[k] = w[k * step];
        bytes = _mm_loadu_si128((const __m128i*)gathered);
    }
    __m256i lanes = where_bytes_to_lanes_(bytes);
#if ATTNKIT_REAL_BITS == 32
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, _mm256_setzero_si256()));
#else
    return _mm256_castsi256_pd(_mm256_cmpgt_epi64(lanes, _mm256_setzero_si256()));
#endif
}

/* ======================================================================== */
#elif defined(ATTNKIT_ISA_avx512)
#if defined(ATTNKIT_EMULATE_AVX512)
#include "avx512_emulation.h" /* test builds on CPUs without AVX-512 */
#else
#include <immintrin.h>
#endif
#if ATTNKIT_REAL_BITS == 32
enum { VLEN = 16 };
typedef __m512 vreal;
typedef __mmask16 vmask;
AK_INLINE vreal v_load(const real* p) { return _mm512_loadu_ps(p); }
AK_INLINE void v_store(real* p, vreal v) { _mm512_storeu_ps(p, v); }
AK_INLINE void v_stream(real* p, vreal v) { _mm512_stream_ps(p, v); }
AK_INLINE vreal v_set1(real a) { return _mm512_set1_ps(a); }
AK_INLINE vreal v_add(vreal a, vreal b) { return _mm512_add_ps(a, b); }
AK_INLINE vreal v_sub(vreal a, vreal b) { return _mm512_sub_ps(a, b); }
AK_INLINE vreal v_mul(vreal a, vreal b) { return _mm512_mul_ps(a, b); }
AK_INLINE vreal v_fma(vreal a, vreal b, vreal c) { return _mm512_fmadd_ps(a, b, c); }
AK_INLINE vreal v_max(vreal a, vreal b) { return _mm512_max_ps(a, b); }
AK_INLINE vreal v_min(vreal a, vreal b) { return _mm512_min_ps(a, b); }
AK_INLINE vreal v_abs(vreal a) { return _mm512_abs_ps(a); }
AK_INLINE vreal v_select(vmask m, vreal a, vreal b) { return _mm512_mask_blend_ps(m, b, a); }
AK_INLINE vmask v_is_equal(vreal a, vreal b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
AK_INLINE vmask v_is_less(vreal a, vreal b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
AK_INLINE vreal v_div(vreal a, vreal b) { return _mm512_div_ps(a, b); }
AK_INLINE double v_reduce_add(vreal v) {
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}
AK_INLINE real v_reduce_max(vreal v) {
    __m256 m8 = _mm256_max_ps(_mm512_castps512_ps256(v),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
AK_INLINE void v_lanes(real* dst, vreal v) { _mm512_storeu_ps(dst, v); }
/* block-swap transpose: at each scale b, rows i and i + b exchange their
 * off-diagonal b-lane blocks (lane l of a permutex2var index: bit 4 picks
 * the second operand) */
AK_INLINE void v_transpose(vreal r[VLEN]) {
#pragma GCC unroll 4
    for (int b = 8; b >= 1; b /= 2) {
        int32_t lo[16], hi[16];
#pragma GCC unroll 16
        for (int l = 0; l < 16; l++) {
            lo[l] = (l & b) ? 16 + l - b : l;
            hi[l] = (l & b) ? 16 + l : l + b;
        }
        const __m512i ilo = _mm512_loadu_si512(lo), ihi = _mm512_loadu_si512(hi);
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i & b) continue;
            const __m512 a = r[i], c = r[i + b];
            r[i] = _mm512_permutex2var_ps(a, ilo, c);
            r[i + b] = _mm512_permutex2var_ps(a, ihi, c);
        }
    }
}
AK_INLINE vmask lanes_below_(int64_t n) { return (vmask)((1u << n) - 1u); }
AK_INLINE vreal v_load_part(const real* p, int64_t n, real fill) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), lanes_below_(n), p);
}
AK_INLINE void v_store_part(real* p, vreal v, int64_t n) { _mm512_mask_storeu_ps(p, lanes_below_(n), v); }
AK_INLINE vreal v_shl_bits(vreal v, int k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(v), (unsigned)k));
}
#else /* double */
enum { VLEN = 8 };
typedef __m512d vreal;
typedef __mmask8 vmask;
AK_INLINE vreal v_load(const real* p) { return _mm512_loadu_pd(p); }
AK_INLINE void v_store(real* p, vreal v) { _mm512_storeu_pd(p, v); }
AK_INLINE void v_stream(real* p, vreal v) { _mm512_stream_pd(p, v); }
AK_INLINE vreal v_set1(real a) { return _mm512_set1_pd(a); }
AK_INLINE vreal v_add(vreal a, vreal b) { return _mm512_add_pd(a, b); }
AK_INLINE vreal v_sub(vreal a, vreal b) { return _mm512_sub_pd(a, b); }
AK_INLINE vreal v_mul(vreal a, vreal b) { return _mm512_mul_pd(a, b); }
AK_INLINE vreal v_fma(vreal a, vreal b, vreal c) { return _mm512_fmadd_pd(a, b, c); }
AK_INLINE vreal v_max(vreal a, vreal b) { return _mm512_max_pd(a, b); }
AK_INLINE vreal v_min(vreal a, vreal b) { return _mm512_min_pd(a, b); }
AK_INLINE vreal v_abs(vreal a) { return _mm512_abs_pd(a); }
AK_INLINE vreal v_select(vmask m, vreal a, vreal b) { return _mm512_mask_blend_pd(m, b, a); }
AK_INLINE vmask v_is_equal(vreal a, vreal b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
AK_INLINE vmask v_is_less(vreal a, vreal b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
AK_INLINE vreal v_div(vreal a, vreal b) { return _mm512_div_pd(a, b); }
AK_INLINE double v_reduce_add(vreal v) { return _mm512_reduce_add_pd(v); }
AK_INLINE real v_reduce_max(vreal v) {
    __m256d m4 = _mm256_max_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    __m128d m = _mm_max_pd(_mm256_castpd256_pd128(m4), _mm256_extractf128_pd(m4, 1));
    m = _mm_max_sd(m, _mm_unpackhi_pd(m, m));
    return _mm_cvtsd_f64(m);
}
AK_INLINE void v_lanes(real* dst, vreal v) { _mm512_storeu_pd(dst, v); }
AK_INLINE void v_transpose(vreal r[VLEN]) { /* as the float one, 8 lanes */
#pragma GCC unroll 3
    for (int b = 4; b >= 1; b /= 2) {
        int64_t lo[8], hi[8];
#pragma GCC unroll 8
        for (int l = 0; l < 8; l++) {
            lo[l] = (l & b) ? 8 + l - b : l;
            hi[l] = (l & b) ? 8 + l : l + b;
        }
        const __m512i ilo = _mm512_loadu_si512(lo), ihi = _mm512_loadu_si512(hi);
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            if (i & b) continue;
            const __m512d a = r[i], c = r[i + b];
            r[i] = _mm512_permutex2var_pd(a, ilo, c);
            r[i + b] = _mm512_permutex2var_pd(a, ihi, c);
        }
    }
}
AK_INLINE vmask lanes_below_(int64_t n) { return (vmask)((1u << n) - 1u); }
AK_INLINE vreal v_load_part(const real* p, int64_t n, real fill) {
    return _mm512_mask_loadu_pd(_mm512_set1_pd(fill), lanes_below_(n), p);
}
AK_INLINE void v_store_part(real* p, vreal v, int64_t n) { _mm512_mask_storeu_pd(p, lanes_below_(n), v); }
AK_INLINE vreal v_shl_bits(vreal v, int k) {
    return _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_castpd_si512(v), (unsigned)k));
}
#endif
AK_INLINE vmask v_where(const uint8_t* w, int64_t step, int64_t n) {
    /* Lane k is set when w[k*step] != 0, for k < n; lanes >= n are clear. */
    __m128i bytes;
    if (step == 1 && n == VLEN) {
#if ATTNKIT_REAL_BITS == 32
        bytes = _mm_loadu_si128((const __m128i*)w);
#else
        bytes = _mm_loadl_epi64((const __m128i*)w);
#endif
    } else {
        uint8_t gathered[16] = {0};
        for (int64_t k = 0; k < n; k++) gathered[k] = w[k * step];
        bytes = _mm_loadu_si128((const __m128i*)gathered);
    }
    return (vmask)_mm_test_epi8_mask(bytes, bytes);
}
#endif /* ISA */

#if !defined(ATTNKIT_ISA_scalar)
AK_INLINE void v_stream_fence(void) { _mm_sfence(); }
#endif

#if ATTNKIT_REAL_BITS == 32
/* For float data: sums in float lanes, each lane taking at most VACC_TERMS
 * terms before its partial sum moves into a double. A lane's rounding error
 * is then a few ulps of its few terms, so a lone large term among many small
 * ones (a 2 among 559 zeros' deviations) costs at most a few ulps of the
 * total, not the small terms' bits; and the double total does not drift. */
#ifndef VACC_TERMS
#define VACC_TERMS 8
#endif
typedef struct {
    vreal lanes;
    double total;
    int terms;
} vacc;
AK_INLINE vacc vacc_zero(void) {
    const vacc a = {v_set1(0), 0.0, 0};
    return a;
}
AK_INLINE vacc vacc_flush_(vacc a) {
    if (++a.terms == VACC_TERMS) {
        a.total += v_reduce_add(a.lanes);
        a.lanes = v_set1(0);
        a.terms = 0;
    }
    return a;
}
AK_INLINE vacc vacc_add(vacc a, vreal v) {
    a.lanes = v_add(a.lanes, v);
    return vacc_flush_(a);
}
AK_INLINE vacc vacc_add_square(vacc a, vreal v) {
    a.lanes = v_fma(v, v, a.lanes);
    return vacc_flush_(a);
}
AK_INLINE double vacc_sum(vacc a) { return a.total + v_reduce_add(a.lanes); }
#else
/* For double data a double accumulator is no wider than the data, so the
 * sums are compensated instead (Knuth's TwoSum, and for squares the product's
 * own rounding error from an fma where there is one): the error of a sum of
 * any length stays a few ulps, like NumPy's pairwise summation, where a plain
 * running sum of 10^5 terms drifts by tens. */
typedef struct {
    vreal sum, err;
} vacc;
AK_INLINE vacc vacc_zero(void) {
    const vacc a = {v_set1(0), v_set1(0)};
    return a;
}
AK_INLINE vacc vacc_two_sum_(vacc a, vreal b) {
    const vreal s = v_add(a.sum, b), bb = v_sub(s, a.sum);
    a.err = v_add(a.err, v_add(v_sub(a.sum, v_sub(s, bb)), v_sub(b, bb)));
    a.sum = s;
    return a;
}
AK_INLINE vacc vacc_add(vacc a, vreal v) { return vacc_two_sum_(a, v); }
AK_INLINE vacc vacc_add_square(vacc a, vreal v) {
    const vreal p = v_mul(v, v);
    a = vacc_two_sum_(a, p);
#if !defined(ATTNKIT_ISA_scalar) /* the exact error of v*v, with a fused multiply-add */
    a.err = v_add(a.err, v_fma(v, v, v_sub(v_set1(0), p)));
#endif
    return a;
}
AK_INLINE double vacc_sum(vacc a) { return v_reduce_add(a.sum) + v_reduce_add(a.err); }
#endif

/* A double total of many blocks' sums, compensated (Knuth's TwoSum): the
 * backwards add one block sum per few dozen elements, and for double data a
 * plain running total over 10^5 elements would drift past NumPy's pairwise
 * sum. Costs a few operations a block. */
typedef struct {
    double sum, err;
} dsum;
AK_INLINE void dsum_add(dsum* a, double v) {
    const double s = a->sum + v, bb = s - a->sum;
    a->err += (a->sum - (s - bb)) + (v - bb);
    a->sum = s;
}
AK_INLINE double dsum_value(dsum a) { return a.sum + a.err; }

/* An output larger than this will not stay in the caches (32 MB of L3 here,
 * shared by every core), so kernels write it with streaming stores, which
 * skip reading each line in before overwriting it. */
#ifndef STREAM_MIN_BYTES
#define STREAM_MIN_BYTES ((int64_t)16 << 20)
#endif

/* How many elements from p to the first address v_stream may write (p must
 * be aligned to sizeof(real), as NumPy's aligned arrays are). */
AK_INLINE int64_t stream_head(const real* p) {
    const uintptr_t align = VLEN * sizeof(real);
    return (int64_t)(((align - (uintptr_t)p % align) % align) / sizeof(real));
}

/* ======================================================================== */
/* exp(x) for x <= 0, written once for every ISA. Softmax only ever needs the
 * exponential of a score minus the running max, so the domain is (-inf, 0]
 * (and NaN); results are right for x up to +40 too.
 *
 *   exp(x) = 2^n * exp(r),  n = round(x / ln2),  r = x - n*ln2 in [-ln2/2, ln2/2]
 *
 * - n comes from one fma: t = x*log2(e) + M, where M = 1.5*2^mantissa_bits + B,
 *   rounds x*log2(e) to an integer in t's last bits (ties to even), so
 *   n = t - M, and t's bits shifted up into the exponent field are the bits
 *   of 2^(n + K) (B = bias + K).
 * - ln2 is split into a head with trailing zero bits (n * LN2_HI is exact)
 *   and a tail (Cody and Waite), so r carries no error from the reduction.
 * - exp(r) is a polynomial, near-minimax on [-ln2/2, ln2/2] (fitted at
 *   Chebyshev nodes in 50-digit arithmetic): relative error 1e-8 for float
 *   (degree 6) and 2e-19 for double (degree 12), far below half an ulp.
 *   Measured against double exp, the float result is within 1.4 ulp.
 * - The polynomial's coefficients are all multiplied by 2^-K (exactly: a
 *   power of two), so p * 2^(n+K) multiplies two normal numbers and rounds
 *   once: results down in the subnormal range come out right, and any x
 *   below EXP_LO, -inf included, gives exactly 0. K = 64 (float), 512 (double).
 */
#if ATTNKIT_REAL_BITS == 32
#define EXP_LO (-104.0f)        /* exp(x) rounds to 0 below this            */
#define EXP_SHIFT 12583103.0f   /* 1.5 * 2^23 + (127 + 64)                 */
#define EXP_BITS 23
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f     /* low 15 bits of the mantissa are 0        */
#define LN2_LO (-2.12194440054690583e-4f)
#define K_ 0x1p-64f
AK_INLINE vreal v_exp_poly_(vreal r) { /* 2^-64 * exp(r) */
    vreal p = v_set1(K_ * 0.001392617611993557888f);
    p = v_fma(p, r, v_set1(K_ * 0.008363173074513710903f));
    p = v_fma(p, r, v_set1(K_ * 0.04166655466205053398f));
    p = v_fma(p, r, v_set1(K_ * 0.1666657702559798819f));
    p = v_fma(p, r, v_set1(K_ * 0.5f));
    p = v_fma(p, r, v_set1(K_));
    return v_fma(p, r, v_set1(K_));
}
#undef K_
#else
#define EXP_LO (-746.0)
#define EXP_SHIFT 6755399441057279.0 /* 1.5 * 2^52 + (1023 + 512)          */
#define EXP_BITS 52
#define LOG2E 1.44269504088896338700
#define LN2_HI 6.93147180369123816490e-01 /* low 21 bits of the mantissa are 0 */
#define LN2_LO 1.90821492927058770002e-10
#define K_ 0x1p-512
AK_INLINE vreal v_exp_poly_(vreal r) { /* 2^-512 * exp(r) */
    vreal p = v_set1(K_ * 2.091467937658393509979e-9);
    p = v_fma(p, r, v_set1(K_ * 2.510520637395701111604e-8));
    p = v_fma(p, r, v_set1(K_ * 2.755727366134863621870e-7));
    p = v_fma(p, r, v_set1(K_ * 2.755725542574643428182e-6));
    p = v_fma(p, r, v_set1(K_ * 2.480158732553336381896e-5));
    p = v_fma(p, r, v_set1(K_ * 1.984126987480049198076e-4));
    p = v_fma(p, r, v_set1(K_ * 1.388888888888375241661e-3));
    p = v_fma(p, r, v_set1(K_ * 8.333333333326140883979e-3));
    p = v_fma(p, r, v_set1(K_ * 4.166666666666666975154e-2));
    p = v_fma(p, r, v_set1(K_ * 1.666666666666667098633e-1));
    p = v_fma(p, r, v_set1(K_ * 0.5));
    p = v_fma(p, r, v_set1(K_));
    return v_fma(p, r, v_set1(K_));
}
#undef K_
#endif

AK_INLINE vreal v_exp_nonpositive(vreal x) {
    x = v_max(v_set1(EXP_LO), x); /* constant first: a NaN x passes through */
    const vreal t = v_fma(x, v_set1(LOG2E), v_set1(EXP_SHIFT));
    const vreal n = v_sub(t, v_set1(EXP_SHIFT));
    vreal r = v_fma(n, v_set1(-LN2_HI), x);
    r = v_fma(n, v_set1(-LN2_LO), r);
    return v_mul(v_exp_poly_(r), v_shl_bits(t, EXP_BITS));
}

/* Ask for the cache lines of base[i .. i + count) ahead of use (nothing if
 * base is NULL): the kernels fetch the next row while they compute on this
 * one, so memory and arithmetic overlap instead of taking turns. */
AK_INLINE void prefetch_read(const real* base, int64_t i, int64_t count) {
    if (base)
        for (int64_t off = 0; off < count; off += 64 / (int64_t)sizeof(real))
            __builtin_prefetch(base + i + off, 0, 3);
}
AK_INLINE void prefetch_write(real* base, int64_t i, int64_t count) {
    if (base)
        for (int64_t off = 0; off < count; off += 64 / (int64_t)sizeof(real))
            __builtin_prefetch(base + i + off, 1, 3);
}

#endif /* ATTNKIT_SIMD_H */
