/*
 * avx512_emulation.h: test builds only (CMake option ATTNKIT_EMULATE_AVX512).
 *
 * The AVX-512 copy of the kernels cannot run on a CPU without AVX-512, so a
 * test build compiles that same copy against SIMDe, which implements the
 * intrinsics portably (here on top of AVX2). This checks the AVX-512 path's
 * logic (lane counts, tail masks, where-masks, reductions) on any machine; it
 * does not check the compiler's AVX-512 code generation.
 *
 * SIMDe (0.7.4 in Debian 12, 0.8.2 in the simde-py wheel) lacks a few of the
 * intrinsics simd.h uses, and its masked loads and stores read and write the
 * whole 64 bytes (zeros into masked-off lanes), past the end of a row: a
 * real AVX-512 masked store touches only its lanes. Those are defined below,
 * lane by lane, as Intel's reference describes them, and used instead.
 */
#ifndef ATTNKIT_AVX512_EMULATION_H
#define ATTNKIT_AVX512_EMULATION_H

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <stdint.h>

static inline double ak_emu_reduce_add_pd(simde__m512d v)
{
    double lane[8];
    simde_mm512_storeu_pd(lane, v);
    return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

static inline simde__m512d ak_emu_cvtps_pd(simde__m256 v)
{
    float in[8];
    double out[8];
    simde_mm256_storeu_ps(in, v);
    for (int k = 0; k < 8; k++) out[k] = in[k];
    return simde_mm512_loadu_pd(out);
}

static inline uint16_t ak_emu_test_epi8_mask(simde__m128i a, simde__m128i b)
{
    uint8_t x[16], y[16];
    uint16_t mask = 0;
    simde_mm_storeu_si128((simde__m128i*)x, a);
    simde_mm_storeu_si128((simde__m128i*)y, b);
    for (int k = 0; k < 16; k++)
        if (x[k] & y[k]) mask |= (uint16_t)(1u << k);
    return mask;
}

static inline simde__m512 ak_emu_mask_loadu_ps(simde__m512 src, uint16_t k, const void* p)
{
    float lane[16];
    simde_mm512_storeu_ps(lane, src);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) lane[i] = ((const float*)p)[i];
    return simde_mm512_loadu_ps(lane);
}

static inline simde__m512d ak_emu_mask_loadu_pd(simde__m512d src, uint8_t k, const void* p)
{
    double lane[8];
    simde_mm512_storeu_pd(lane, src);
    for (int i = 0; i < 8; i++)
        if (k >> i & 1) lane[i] = ((const double*)p)[i];
    return simde_mm512_loadu_pd(lane);
}

static inline void ak_emu_mask_storeu_ps(void* p, uint16_t k, simde__m512 v)
{
    float lane[16];
    simde_mm512_storeu_ps(lane, v);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) ((float*)p)[i] = lane[i];
}

static inline void ak_emu_mask_storeu_pd(void* p, uint8_t k, simde__m512d v)
{
    double lane[8];
    simde_mm512_storeu_pd(lane, v);
    for (int i = 0; i < 8; i++)
        if (k >> i & 1) ((double*)p)[i] = lane[i];
}

/* A streaming store faults on an address not aligned to 64 bytes; so does
 * this one, so that a misaligned stream in the kernels shows up here too. */
static inline void ak_emu_stream_ps(void* p, simde__m512 v)
{
    if ((uintptr_t)p % 64 != 0) __builtin_trap();
    simde_mm512_storeu_ps(p, v);
}

static inline void ak_emu_stream_pd(void* p, simde__m512d v)
{
    if ((uintptr_t)p % 64 != 0) __builtin_trap();
    simde_mm512_storeu_pd(p, v);
}

#undef _mm512_stream_ps
#define _mm512_stream_ps ak_emu_stream_ps
#undef _mm512_stream_pd
#define _mm512_stream_pd ak_emu_stream_pd
#undef _mm512_reduce_add_pd
#define _mm512_reduce_add_pd ak_emu_reduce_add_pd
#undef _mm512_cvtps_pd
#define _mm512_cvtps_pd ak_emu_cvtps_pd
#undef _mm_test_epi8_mask
#define _mm_test_epi8_mask ak_emu_test_epi8_mask
#undef _mm512_mask_loadu_ps
#define _mm512_mask_loadu_ps ak_emu_mask_loadu_ps
#undef _mm512_mask_loadu_pd
#define _mm512_mask_loadu_pd ak_emu_mask_loadu_pd
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps ak_emu_mask_storeu_ps
#undef _mm512_mask_storeu_pd
#define _mm512_mask_storeu_pd ak_emu_mask_storeu_pd

#endif /* ATTNKIT_AVX512_EMULATION_H */
