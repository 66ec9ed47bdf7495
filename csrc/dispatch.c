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
#define DECLARE_KERNELS(isa)                                                                    \
    void attnkit_softmax_f32_##isa(float*, const float*, const uint8_t*,                       \
                                   const attnkit_softmax_args*);                               \
    void attnkit_softmax_f64_##isa(double*, const double*, const uint8_t*,                     \
                                   const attnkit_softmax_args*);                               \
    void attnkit_layer_norm_f32_##isa(float*, float*, float*, const float*, const float*,      \
                                      const float*, int64_t, int64_t, int64_t, int64_t, double); \
    void attnkit_layer_norm_f64_##isa(double*, double*, double*, const double*, const double*, \
                                      const double*, int64_t, int64_t, int64_t, int64_t,       \
                                      double);                                                 \
    void attnkit_rms_norm_f32_##isa(float*, float*, const float*, const float*, int64_t,       \
                                    int64_t, int64_t, int64_t, double);                        \
    void attnkit_rms_norm_f64_##isa(double*, double*, const double*, const double*, int64_t,   \
                                    int64_t, int64_t, int64_t, double);                        \
    int attnkit_attention_f32_##isa(float*, float*, float*, const float*, const float*,        \
                                    const float*, const void*, const attnkit_attention_args*); \
    int attnkit_attention_f64_##isa(double*, double*, double*, const double*, const double*,   \
                                    const double*, const void*, const attnkit_attention_args*); \
    void attnkit_bias_activation_f32_##isa(float*, const float*, const float*, int64_t,        \
                                           int64_t, int);                                      \
    void attnkit_bias_activation_f64_##isa(double*, const double*, const double*, int64_t,     \
                                           int64_t, int);                                      \
    int attnkit_linear_f32_##isa(float*, const float*, const float*, const float*,             \
                                 const float*, int64_t, int64_t, int64_t, int64_t, int64_t,    \
                                 int64_t, int);                                                \
    int attnkit_linear_f64_##isa(double*, const double*, const double*, const double*,         \
                                 const double*, int64_t, int64_t, int64_t, int64_t, int64_t,   \
                                 int64_t, int);                                                \
    int attnkit_linear_backward_f32_##isa(float*, float*, float*, const float*, const float*,  \
                                          const float*, int64_t, int64_t, int64_t, int64_t,    \
                                          int64_t, int64_t, int64_t, int64_t);                 \
    int attnkit_linear_backward_f64_##isa(double*, double*, double*, const double*,            \
                                          const double*, const double*, int64_t, int64_t,      \
                                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
DECLARE_KERNELS(scalar)
DECLARE_KERNELS(avx2)
DECLARE_KERNELS(avx512)

typedef struct {
    const char* name;
    void (*softmax_f32)(float*, const float*, const uint8_t*, const attnkit_softmax_args*);
    void (*softmax_f64)(double*, const double*, const uint8_t*, const attnkit_softmax_args*);
    void (*layer_norm_f32)(float*, float*, float*, const float*, const float*, const float*,
                           int64_t, int64_t, int64_t, int64_t, double);
    void (*layer_norm_f64)(double*, double*, double*, const double*, const double*,
                           const double*, int64_t, int64_t, int64_t, int64_t, double);
    void (*rms_norm_f32)(float*, float*, const float*, const float*, int64_t, int64_t, int64_t,
                         int64_t, double);
    void (*rms_norm_f64)(double*, double*, const double*, const double*, int64_t, int64_t,
                         int64_t, int64_t, double);
    int (*attention_f32)(float*, float*, float*, const float*, const float*, const float*,
                         const void*, const attnkit_attention_args*);
    int (*attention_f64)(double*, double*, double*, const double*, const double*, const double*,
                         const void*, const attnkit_attention_args*);
    void (*bias_activation_f32)(float*, const float*, const float*, int64_t, int64_t, int);
    void (*bias_activation_f64)(double*, const double*, const double*, int64_t, int64_t, int);
    int (*linear_f32)(float*, const float*, const float*, const float*, const float*, int64_t,
                      int64_t, int64_t, int64_t, int64_t, int64_t, int);
    int (*linear_f64)(double*, const double*, const double*, const double*, const double*, int64_t,
                      int64_t, int64_t, int64_t, int64_t, int64_t, int);
    int (*linear_backward_f32)(float*, float*, float*, const float*, const float*, const float*,
                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);
    int (*linear_backward_f64)(double*, double*, double*, const double*, const double*,
                               const double*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                               int64_t, int64_t);
} kernel_table;

#define KERNEL_ROW(isa)                                                                        \
    {#isa,                                                                                     \
     attnkit_softmax_f32_##isa,                                                                \
     attnkit_softmax_f64_##isa,                                                                \
     attnkit_layer_norm_f32_##isa,                                                             \
     attnkit_layer_norm_f64_##isa,                                                             \
     attnkit_rms_norm_f32_##isa,                                                               \
     attnkit_rms_norm_f64_##isa,                                                               \
     attnkit_attention_f32_##isa,                                                              \
     attnkit_attention_f64_##isa,                                                              \
     attnkit_bias_activation_f32_##isa,                                                        \
     attnkit_bias_activation_f64_##isa,                                                        \
     attnkit_linear_f32_##isa,                                                                 \
     attnkit_linear_f64_##isa,                                                                 \
     attnkit_linear_backward_f32_##isa,                                                        \
     attnkit_linear_backward_f64_##isa}

static const kernel_table tables[ATTNKIT_ISA_COUNT] = {
    KERNEL_ROW(scalar),
    KERNEL_ROW(avx2),
    KERNEL_ROW(avx512),
};
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

/* The entry points of attnkit.h. */
void attnkit_softmax_f32(float* out, const float* x, const uint8_t* where,
                         const attnkit_softmax_args* args)
{
    active->softmax_f32(out, x, where, args);
}
void attnkit_softmax_f64(double* out, const double* x, const uint8_t* where,
                         const attnkit_softmax_args* args)
{
    active->softmax_f64(out, x, where, args);
}
void attnkit_layer_norm_f32(float* out, float* mean, float* rstd, const float* x,
                            const float* weight, const float* bias, int64_t N, int64_t C,
                            int64_t out_row_stride, int64_t x_row_stride, double eps)
{
    active->layer_norm_f32(out, mean, rstd, x, weight, bias, N, C, out_row_stride, x_row_stride, eps);
}
void attnkit_layer_norm_f64(double* out, double* mean, double* rstd, const double* x,
                            const double* weight, const double* bias, int64_t N, int64_t C,
                            int64_t out_row_stride, int64_t x_row_stride, double eps)
{
    active->layer_norm_f64(out, mean, rstd, x, weight, bias, N, C, out_row_stride, x_row_stride, eps);
}
void attnkit_rms_norm_f32(float* out, float* rrms, const float* x, const float* weight, int64_t N,
                          int64_t C, int64_t out_row_stride, int64_t x_row_stride, double eps)
{
    active->rms_norm_f32(out, rrms, x, weight, N, C, out_row_stride, x_row_stride, eps);
}
void attnkit_rms_norm_f64(double* out, double* rrms, const double* x, const double* weight,
                          int64_t N, int64_t C, int64_t out_row_stride, int64_t x_row_stride,
                          double eps)
{
    active->rms_norm_f64(out, rrms, x, weight, N, C, out_row_stride, x_row_stride, eps);
}

int attnkit_attention_f32(float* out, float* lse, float* weights, const float* q,
                          const float* k, const float* v, const void* mask,
                          const attnkit_attention_args* args)
{
    return active->attention_f32(out, lse, weights, q, k, v, mask, args);
}
int attnkit_attention_f64(double* out, double* lse, double* weights, const double* q,
                          const double* k, const double* v, const void* mask,
                          const attnkit_attention_args* args)
{
    return active->attention_f64(out, lse, weights, q, k, v, mask, args);
}

void attnkit_bias_activation_f32(float* out, const float* x, const float* bias, int64_t rows, int64_t cols,
                                 int kind)
{
    active->bias_activation_f32(out, x, bias, rows, cols, kind);
}
void attnkit_bias_activation_f64(double* out, const double* x, const double* bias, int64_t rows,
                                 int64_t cols, int kind)
{
    active->bias_activation_f64(out, x, bias, rows, cols, kind);
}

int attnkit_linear_f32(float* out, const float* x, const float* w, const float* bias,
                       const float* residual, int64_t M, int64_t N, int64_t K, int64_t x_row,
                       int64_t w_n, int64_t w_k, int kind)
{
    return active->linear_f32(out, x, w, bias, residual, M, N, K, x_row, w_n, w_k, kind);
}
int attnkit_linear_f64(double* out, const double* x, const double* w, const double* bias,
                       const double* residual, int64_t M, int64_t N, int64_t K, int64_t x_row,
                       int64_t w_n, int64_t w_k, int kind)
{
    return active->linear_f64(out, x, w, bias, residual, M, N, K, x_row, w_n, w_k, kind);
}
int attnkit_linear_backward_f32(float* dx, float* dw, float* dbias, const float* dy, const float* x,
                                const float* w, int64_t M, int64_t N, int64_t K, int64_t x_row,
                                int64_t w_n, int64_t w_k, int64_t dw_n, int64_t dw_k)
{
    return active->linear_backward_f32(dx, dw, dbias, dy, x, w, M, N, K, x_row, w_n, w_k, dw_n, dw_k);
}
int attnkit_linear_backward_f64(double* dx, double* dw, double* dbias, const double* dy,
                                const double* x, const double* w, int64_t M, int64_t N, int64_t K,
                                int64_t x_row, int64_t w_n, int64_t w_k, int64_t dw_n, int64_t dw_k)
{
    return active->linear_backward_f64(dx, dw, dbias, dy, x, w, M, N, K, x_row, w_n, w_k, dw_n, dw_k);
}

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
