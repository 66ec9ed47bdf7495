/*
 * dispatch.c: which compiled copy of each kernel runs, and on how many threads.
 *
 * Compiled for baseline x86-64 only: nothing here may use an instruction the
 * oldest supported CPU lacks, since this is what decides whether the newer
 * ones can be used at all.
 */
#include <omp.h>
#include <pthread.h>
#include <stdlib.h>

#include "attnkit.h"

/* What CMake tells about the build (defaults for a build without it). */
#ifndef ATTNKIT_COMPILER
#define ATTNKIT_COMPILER "unknown"
#define ATTNKIT_CFLAGS ""
#define ATTNKIT_CFLAGS_AVX2 ""
#define ATTNKIT_CFLAGS_AVX512 ""
#define ATTNKIT_SANITIZED 0
#endif
#ifndef ATTNKIT_EMULATED_AVX512
#define ATTNKIT_EMULATED_AVX512 0
#endif

/* ---------------------------------------------------------------------------
 * The kernel table, one row per instruction set.
 */
/* Every ISA's copies, declared from the list (kernels.def). */
#define REAL float
#define ATTNKIT_KERNEL(returns, name, params, args)                                          \
    returns attnkit_##name##_f32_scalar params;                                               \
    returns attnkit_##name##_f32_avx2 params;                                                 \
    returns attnkit_##name##_f32_avx512 params;
#include "kernels.def"
#undef ATTNKIT_KERNEL
#undef REAL
#define REAL double
#define ATTNKIT_KERNEL(returns, name, params, args)                                          \
    returns attnkit_##name##_f64_scalar params;                                               \
    returns attnkit_##name##_f64_avx2 params;                                                 \
    returns attnkit_##name##_f64_avx512 params;
#include "kernels.def"
#undef ATTNKIT_KERNEL
#undef REAL

/* One row of function pointers per ISA. */
typedef struct {
    const char* name;
#define REAL float
#define ATTNKIT_KERNEL(returns, name, params, args) returns(*name##_f32) params;
#include "kernels.def"
#undef ATTNKIT_KERNEL
#undef REAL
#define REAL double
#define ATTNKIT_KERNEL(returns, name, params, args) returns(*name##_f64) params;
#include "kernels.def"
#undef ATTNKIT_KERNEL
#undef REAL
} kernel_table;

#define ATTNKIT_KERNEL(returns, name, params, args) \
    .name##_f32 = ATTNKIT_COPY(name, f32, ISA), .name##_f64 = ATTNKIT_COPY(name, f64, ISA),
#define ATTNKIT_COPY_(name, bits, isa) attnkit_##name##_##bits##_##isa
#define ATTNKIT_COPY(name, bits, isa) ATTNKIT_COPY_(name, bits, isa)
static const kernel_table tables[ATTNKIT_ISA_COUNT] = {
#define ISA scalar
    {.name = "scalar",
#include "kernels.def"
    },
#undef ISA
#define ISA avx2
    {.name = "avx2",
#include "kernels.def"
    },
#undef ISA
#define ISA avx512
    {.name = "avx512",
#include "kernels.def"
    },
#undef ISA
};
#undef ATTNKIT_KERNEL
static const kernel_table* active = &tables[ATTNKIT_ISA_SCALAR];

const char* attnkit_isa_name(int isa)
{
    return isa >= 0 && isa < ATTNKIT_ISA_COUNT ? tables[isa].name : "unknown";
}

int attnkit_isa_supported(int isa)
{
    /* __builtin_cpu_supports checks the CPUID bits and that the OS saves the
     * wide registers (XCR0). The AVX2 and AVX-512 copies are compiled for the
     * x86-64-v3 and -v4 levels, so the whole level must be present. */
    __builtin_cpu_init();
    switch (isa) {
    case ATTNKIT_ISA_SCALAR: return 1;
    case ATTNKIT_ISA_AVX2: return __builtin_cpu_supports("x86-64-v3") != 0;
#if ATTNKIT_EMULATED_AVX512
    /* a test build: the AVX-512 copy runs on SIMDe's AVX2 emulation */
    case ATTNKIT_ISA_AVX512: return __builtin_cpu_supports("x86-64-v3") != 0;
#else
    case ATTNKIT_ISA_AVX512: return __builtin_cpu_supports("x86-64-v4") != 0;
#endif
    default: return 0;
    }
}

int attnkit_get_isa(void) { return (int)(active - tables); }

int attnkit_set_isa(int isa)
{
    if (!attnkit_isa_supported(isa)) return -1;
    active = &tables[isa];
    return 0;
}

/* The entry points of attnkit.h: each forwards to the active ISA's copy. */
#define RETURN_void
#define RETURN_int return
#define REAL float
#define ATTNKIT_KERNEL(returns, name, params, args) \
    returns attnkit_##name##_f32 params { RETURN_##returns active->name##_f32 args; }
#include "kernels.def"
#undef ATTNKIT_KERNEL
#undef REAL
#define REAL double
#define ATTNKIT_KERNEL(returns, name, params, args) \
    returns attnkit_##name##_f64 params { RETURN_##returns active->name##_f64 args; }
#include "kernels.def"
#undef ATTNKIT_KERNEL
#undef REAL

/* ---------------------------------------------------------------------------
 * Threads.
 *
 * GNU libgomp is not fork-safe: a child forked after the parent ran a
 * parallel region hangs in its first one (the team's threads did not survive
 * the fork). So a child of a parent that ever started a team runs every
 * kernel on its one thread, and never enters an OpenMP construct.
 */
static int num_threads = 1;
static volatile int team_started = 0;
static volatile int forked_after_team = 0;

/* Work below this many element-operations per thread (one element of one
 * pass of a norm, about 0.15 ns here) costs less than waking a thread does:
 * a few microseconds. */
enum { MIN_WORK_PER_THREAD = 1 << 15 };

static void on_fork_in_child(void)
{
    if (team_started) forked_after_team = 1;
}

/* The count is attnkit's own (so that it holds in every Python thread) and
 * is also set as OpenMP's for the calling thread, where threadpoolctl reads
 * and limits it: a kernel uses the smaller of the two. */
void attnkit_set_num_threads(int n)
{
    num_threads = n < 1 ? 1 : n;
    if (!forked_after_team) omp_set_num_threads(num_threads);
}
int attnkit_get_num_threads(void)
{
    if (forked_after_team) return num_threads;
    const int omp = omp_get_max_threads();
    return omp < num_threads ? omp : num_threads;
}
int attnkit_in_forked_child(void) { return forked_after_team; }

int attnkit_plan_threads(int64_t tasks, int64_t work_per_task)
{
    if (forked_after_team || num_threads <= 1 || tasks <= 1) return 1;
    int64_t want = attnkit_get_num_threads();
    if (work_per_task < 1) work_per_task = 1;
    const int64_t by_work = tasks > INT64_MAX / work_per_task
                                ? want
                                : tasks * work_per_task / MIN_WORK_PER_THREAD;
    if (by_work < want) want = by_work;
    if (tasks < want) want = tasks;
    if (want <= 1) return 1;
    team_started = 1;
    return (int)want;
}

int64_t attnkit_chunk_size(int64_t tasks, int threads)
{
    /* about eight chunks a thread: enough to even out a slow thread, few
     * enough that handing them out costs nothing */
    const int64_t chunk = tasks / (8 * (int64_t)threads);
    return chunk < 1 ? 1 : chunk;
}

/* ---------------------------------------------------------------------------
 * Start-up.
 */
void attnkit_init(void)
{
    static int done = 0;
    if (done) return;
    done = 1;
    for (int isa = ATTNKIT_ISA_COUNT - 1; isa >= 0; isa--) {
        if (attnkit_isa_supported(isa)) {
            active = &tables[isa];
            break;
        }
    }
    num_threads = omp_get_max_threads(); /* honours OMP_NUM_THREADS */
    pthread_atfork(NULL, NULL, on_fork_in_child);
}

/* ---------------------------------------------------------------------------
 * The build, as show_config() reports it.
 */

const char* attnkit_build_compiler(void) { return ATTNKIT_COMPILER; }

const char* attnkit_build_flags(int isa)
{
    switch (isa) {
    case -1: return ATTNKIT_CFLAGS;
    case ATTNKIT_ISA_AVX2: return ATTNKIT_CFLAGS_AVX2;
    case ATTNKIT_ISA_AVX512: return ATTNKIT_CFLAGS_AVX512;
    default: return "";
    }
}

int attnkit_build_sanitized(void) { return ATTNKIT_SANITIZED; }
int attnkit_build_emulated_avx512(void) { return ATTNKIT_EMULATED_AVX512; }
