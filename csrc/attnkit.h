/*
 * attnkit.h: the C kernels behind attnkit, in one header.
 *
 * Shape legend (all sizes are int64_t, all strides count elements, not bytes)
 *   N   rows: every dimension before the reduced one, flattened
 *   C   the reduced dimension: softmax's axis, or a normalised row
 *   K   inner size: every dimension after the reduced one, flattened
 *   B batch, H heads, Hkv key/value heads, L query length, S key length,
 *   E head dim, Ev value dim (the attention kernels, later)
 *
 * Conventions
 *   - Outputs first, then what forward saves for backward (mean, rstd),
 *     then const inputs, then sizes, then options.
 *   - A kernel that cannot fail returns void. No kernel allocates, prints or
 *     exits; none holds the GIL (the Cython binding releases it).
 *   - Every kernel exists for float (_f32) and double (_f64). The entry points
 *     below forward to the instruction set chosen by attnkit_set_isa().
 *   - Rows are shared out among OpenMP threads; each row is computed whole by
 *     one thread, in a fixed order, so results are bitwise identical whatever
 *     the thread count and however the rows are dealt.
 */
#ifndef ATTNKIT_H
#define ATTNKIT_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------
 * Softmax and log-softmax along C of an (N, C, K) array.
 *
 *   element (n, c, k) of x lives at x[n*x_strides.n + c*x_strides.c + k]
 *   (the same for out); the inner stride is always 1, and when K == 1 the
 *   C stride is 1 too, so every row the kernel reads is contiguous.
 *   where, if not NULL, is a bool mask broadcast to (N, C, K) by its strides
 *   (0 for a broadcast dimension): where[n*ws.n + c*ws.c + k*ws.k]. Elements
 *   with where == 0 are left out, as if they were -inf.
 *
 *   softmax:      out = exp(x - max) / sum(exp(x - max))
 *   log_softmax:  out = (x - max) - log(sum(exp(x - max)))
 *   A slice with nothing left in it (all -inf, or all masked out) gives 0
 *   (softmax) or -inf (log_softmax); a NaN in a slice makes that slice NaN.
 *   out may be x itself (same pointer, same strides).
 * ------------------------------------------------------------------------- */
typedef struct {
    int64_t n, c, k;
} attnkit_strides;

typedef struct {
    int64_t N, C, K;
    attnkit_strides out_strides; /* .k must be 1                      */
    attnkit_strides x_strides;   /* .k must be 1                      */
    attnkit_strides where_strides;
    int log;                     /* 0: softmax, 1: log_softmax        */
} attnkit_softmax_args;

/* Backward of softmax and log-softmax along C, from the forward's output y:
 *
 *   softmax:      dx = y * (dy - sum(dy * y))
 *   log_softmax:  dx = dy - exp(y) * sum(dy)
 *
 *   dx, dy, y (N, C, K), element (n, c, k) at n*strides.n + c*strides.c + k,
 *   the inner stride always 1 (and the C stride 1 when K == 1); where as in
 *   the forward. The sums run over the kept elements of each slice, carried
 *   in double. Masked-out elements get dx = 0 whatever dy and y hold, and so
 *   does every element of a slice with nothing kept (all masked; for
 *   log_softmax also a slice whose y is all -inf, the forward's empty slice),
 *   never NaN. Otherwise NaNs follow the formulas (a NaN in a kept dy
 *   makes its slice's dx NaN). dx may be dy or y itself (same pointer, same
 *   strides): pass 2 reads each element before writing it.
 */
typedef struct {
    int64_t N, C, K;
    attnkit_strides dx_strides;  /* .k must be 1                      */
    attnkit_strides dy_strides;  /* .k must be 1                      */
    attnkit_strides y_strides;   /* .k must be 1                      */
    attnkit_strides where_strides;
    int log;                     /* 0: softmax, 1: log_softmax        */
} attnkit_softmax_backward_args;


/* ---------------------------------------------------------------------------
 * Layer norm over rows: x (N, C), rows at x_row_stride, each row contiguous.
 *
 *   mean = sum(x) / C                       (N)  may be NULL
 *   rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)  (N)  may be NULL
 *   out  = (x - mean) * rstd * weight + bias (N, C) rows at out_row_stride
 *   weight (C) and bias (C) may each be NULL (meaning 1 and 0).
 *   The variance is the biased one, as PyTorch's. Sums are carried in double
 *   and the mean is refined by a second pass, so a row like 1e4 + small noise
 *   loses nothing to cancellation.
 * ------------------------------------------------------------------------- */

/* ---------------------------------------------------------------------------
 * RMS norm over rows: x (N, C) as for layer norm.
 *
 *   rrms = 1 / sqrt(sum(x^2) / C + eps)   (N)  may be NULL
 *   out  = x * rrms * weight              (N, C); weight (C) may be NULL
 * ------------------------------------------------------------------------- */

/* ---------------------------------------------------------------------------
 * Backward of layer norm and RMS norm, from the statistics the forwards save:
 *
 *   layer norm: xhat = (x - mean) * rstd,  g = dy * weight   (per row)
 *     dx       = rstd * (g - mean(g) - xhat * mean(g * xhat))  (N, C) written
 *     dweight += sum over rows of dy * xhat                    (C)   accumulated
 *     dbias   += sum over rows of dy                           (C)   accumulated
 *   RMS norm:   xhat = x * rrms
 *     dx       = rrms * (g - xhat * mean(g * xhat)),  dweight as above
 *
 *   dy, x, dx (N, C): rows at their row strides, each row contiguous;
 *   mean, rstd, rrms (N) contiguous, as the forwards write them; weight (C)
 *   or NULL (meaning 1); dweight, dbias (C) or NULL (not computed). xhat is
 *   computed from x - mean (never x*rstd - mean*rstd), and the row means in
 *   double, so a row 1e4 + noise keeps its precision, as in the forward.
 *   dweight and dbias are sums over rows in an order fixed by N alone
 *   (ROW_BLOCKS below, in simd.h): bitwise the same at any thread count.
 *   dx may not overlap the inputs. Returns 0, or -1 when the workspace for
 *   dweight/dbias (a few doubles per column and block) cannot be allocated.
 * ------------------------------------------------------------------------- */

/* ---------------------------------------------------------------------------
 * Scaled dot-product attention, fused in the FlashAttention manner: the
 * (L, S) score matrix is never stored whole; query blocks meet key/value
 * tiles and an online softmax keeps each row's running max and sum.
 *
 *   for every batch b < B and head h < H, with key/value head hk = h / (H / Hkv):
 *     scores  = q[b,h] @ k[b,hk]^T * scale                         (L, S)
 *     scores += mask (additive), or -inf where a bool mask is 0,
 *               and -inf where causal (key j hidden from query i when
 *               j > i + causal_offset: 0 is PyTorch's top-left alignment,
 *               S - L the bottom-right one of cached decoding)
 *     p       = softmax(scores) over S; a row with nothing to attend to is 0
 *     out[b,h]     = dropout(p) @ v[b,hk]                          (L, Ev)
 *     lse[b,h]     = log(sum(exp(scores))) over S, -inf for an empty row (L)
 *     weights[b,h] = dropout(p)                                    (L, S)
 *   dropout keeps element (b,h,i,j) when its hash (attnkit_dropout_keep)
 *   clears p, and scales kept elements by 1/(1-p); lse ignores dropout.
 *
 * Layouts (strides in elements; the last axis of q, k, v is contiguous):
 *   q       (b,h,i,e)  at q + q_batch[b] + h*q_head + i*q_row + e
 *   k       (b,hk,j,e) at k + k_batch[b] + hk*k_head + j*k_row + e
 *   v       (b,hk,j,e) at v + v_batch[b] + hk*v_head + j*v_row + e
 *   out     (B, H, L, Ev) contiguous
 *   lse     (B, H, L) contiguous, or NULL
 *   weights (B, H, L, S) contiguous, or NULL (computed only when asked for)
 *   mask    (b,h,i,j)  at mask + mask_batch[b] + h*mask_head + i*mask_row
 *                      + j*mask_col (mask_col 0 or 1; 0 broadcasts along S);
 *                      uint8_t (bool) or real (additive); NULL with kind 0
 * q_batch etc. are (B) arrays of offsets, so batch dimensions of any shape
 * broadcast without copies.
 * E >= 1 (E = 0 makes every score 0: pass one zero column instead). With
 * Ev = 0, or no rows (B*H*L = 0), the kernel returns at once and writes
 * nothing, so lse and weights are not filled: to get them for Ev = 0, pass
 * one zero column of values. The binding keeps to both rules.
 * ------------------------------------------------------------------------- */
enum { ATTNKIT_MASK_NONE = 0, ATTNKIT_MASK_BOOL = 1, ATTNKIT_MASK_ADD = 2 };

typedef struct {
    int64_t B, H, Hkv, L, S, E, Ev;
    const int64_t* q_batch;    /* (B) */
    const int64_t* k_batch;    /* (B) */
    const int64_t* v_batch;    /* (B) */
    const int64_t* mask_batch; /* (B), or NULL without a mask */
    int64_t q_head, q_row, k_head, k_row, v_head, v_row;
    int mask_kind;
    int64_t mask_head, mask_row, mask_col;
    double scale;
    int causal;
    int64_t causal_offset;
    double dropout_p;          /* in [0, 1]                              */
    uint32_t dropout_seed;
    void* weights_mean;        /* (B, L, S) real, or NULL: see below     */
} attnkit_attention_args;

/* weights_mean, when not NULL, receives the weights averaged over the H
 * heads (B, L, S), dropout included (what MultiheadAttention returns); then
 * `weights` (B, H, L, S) must be given too and is used as scratch.
 * Returns 0, or -1 when its workspace (a few hundred KB a thread) cannot be
 * allocated. */

/* The gradient of attention (FlashAttention-2's backward): given dout, the
 * gradient of out, and what the forward saved (out, lse), with the same q,
 * k, v, mask and args (dropout_seed included: the forward's dropped weights
 * are dropped again), writes
 *   dq (B, H, L, E), dk (B, Hkv, S, E), dv (B, Hkv, S, Ev), all contiguous;
 *   dk and dv sum over the query heads that share a key/value head (GQA).
 * dout and out (B, H, L, Ev) and lse (B, H, L) contiguous; q, k, v, mask laid
 * out as for the forward; args->weights_mean is not read. A row that saw no
 * key (lse = -inf) contributes nothing. Bitwise the same at any thread count.
 * Returns 0, or -1 when its memory cannot be allocated: a few hundred KB a
 * thread, D (B*H*L) and, for shapes that need them, padded gradient copies. */

/* Dropout's keep decision for element (bh = b*H + h, i, j): 1 to keep.
 * A counter-based hash of (seed, bh, i, j), so the same seed drops the same
 * elements whatever the tiling or the thread count; the NumPy reference
 * computes the same hash. */
static inline uint32_t attnkit_mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}
static inline uint32_t attnkit_dropout_row_key(uint32_t seed, uint32_t bh, uint32_t i)
{
    return attnkit_mix32(attnkit_mix32(attnkit_mix32(seed) ^ bh) ^ i);
}
/* keep when the top 24 bits of the hash, as a fraction, are >= p:
 * threshold = ceil(p * 2^24) */
static inline int attnkit_dropout_keep(uint32_t row_key, uint32_t j, uint32_t threshold)
{
    return (attnkit_mix32(row_key ^ j) >> 8) >= threshold;
}

/* ---------------------------------------------------------------------------
 * Bias and activation, the tail of a linear layer, in one pass over memory:
 *   out (rows, cols) = f(x (rows, cols) + bias (cols))
 * all contiguous; out may be x; bias may be NULL (no add). f is one of
 *   ATTNKIT_GELU_ERF   x * Phi(x), the exact GELU
 *   ATTNKIT_GELU_TANH  the tanh approximation of GELU
 *   ATTNKIT_SILU       x * sigmoid(x)
 *   ATTNKIT_IDENTITY   x (the bias add alone)
 *   ATTNKIT_RELU       max(x, 0); NaN stays NaN
 * ------------------------------------------------------------------------- */
enum { ATTNKIT_GELU_ERF = 0, ATTNKIT_GELU_TANH = 1, ATTNKIT_SILU = 2, ATTNKIT_IDENTITY = 3, ATTNKIT_RELU = 4 };

/* Its backward:
 *   dx (rows, cols)  = dy (rows, cols) * f'(x + bias)     written
 *   dbias (cols)    += sum over rows of dx                 accumulated
 * all contiguous; bias and dbias may each be NULL; dx may be dy. f' of
 *   ATTNKIT_GELU_ERF   Phi(x) + x phi(x), phi the standard normal density
 *   ATTNKIT_GELU_TANH  0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) u'(x),
 *                      u = sqrt(2/pi) (x + 0.044715 x^3)
 *   ATTNKIT_SILU       s (1 + x (1 - s)),  s = sigmoid(x)
 *   ATTNKIT_IDENTITY   1
 *   ATTNKIT_RELU       1 for x > 0, 0 for x <= 0 (PyTorch's: 0 at x == 0)
 * A NaN x gives a NaN dx for every kind but the identity (whose f' is 1
 * whatever x is). dbias sums rows in an order fixed
 * by rows alone, so it is bitwise the same at any thread count. Returns 0,
 * or -1 when dbias's workspace cannot be allocated.
 */

/* Dropout of n contiguous elements, out = x * (1 / (1 - p)) where element i
 * is kept, 0 where it is dropped (a dropped NaN too); out may be x. Element i
 * is kept by attention's hash (attnkit_dropout_keep above) with bh = 0, row
 * i / ATTNKIT_DROPOUT_ROW and column i % ATTNKIT_DROPOUT_ROW: a function of
 * (seed, i) alone, so dropout's backward is this same call on the gradient
 * with the same seed, and nothing is stored between them. */
enum { ATTNKIT_DROPOUT_ROW = 4096 };

/* ---------------------------------------------------------------------------
 * A linear layer, torch.nn.functional.linear with its tail fused, and its
 * backward (llm.c's matmul_forward / matmul_backward):
 *   out (M, N) = f(x (M, K) @ w (N, K)^T + bias (N)) + residual (M, N)
 *   dx (M, K) = dy (M, N) @ w;  dw (N, K) += dy^T @ x;  dbias (N) += sum of dy's rows
 * x's rows at x_row (each contiguous); out, residual, dx and dy contiguous;
 * bias, dbias (N) and residual or NULL (residual may not overlap out); f an ATTNKIT_* kind as above. w's element (n, k) is
 * w[n*w_n + k*w_k] with w_k == 1 (PyTorch's layout, rows w_n >= K apart) or
 * else w_n == 1 (stored transposed, as attnkit.nn keeps a Linear's weight:
 * w^T's rows w_k >= N apart); dw's layout likewise by dw_n, dw_k. Weights
 * are read in place, never cached, so an edit in place is what the next call
 * sees. Backward computes what is not NULL of dx, dw, dbias; dw and dbias
 * accumulate, as gradients do over micro-batches. Each element is summed by
 * one thread in an order fixed by the shapes, so results do not depend on
 * the thread count. Return 0, or -1 when a thread's workspace cannot be
 * allocated.
 * ------------------------------------------------------------------------- */

/* ---------------------------------------------------------------------------
 * Adam's and AdamW's update of one parameter, in place, as torch.optim's
 * single-tensor implementation computes it, operation for operation (each
 * scalar rounded to REAL first, as PyTorch's CPU kernels take it):
 *   decoupled weight decay (AdamW): p = p * (1 - lr wd)
 *   L2 weight decay (Adam):         g = p * wd + g
 *   m = lerp(m, g, 1 - beta1)       (m + (g - m) w, or g - (g - m)(1 - w) when w >= 0.5)
 *   v = v * beta2 + (g * (1 - beta2)) * g
 *   amsgrad: vmax = max(vmax, v), used in place of v
 *   p = p + (m * -step_size) / (sqrt(v) / bias_correction2_sqrt + eps)
 * param, exp_avg (m), exp_avg_sq (v), grad and max_exp_avg_sq (vmax, or NULL
 * without amsgrad) are n contiguous elements; grad is not changed. Every
 * element on its own, so the result is the same at any thread count.
 * ------------------------------------------------------------------------- */
typedef struct {
    double lr, beta1, beta2, eps, weight_decay;
    double step_size;             /* lr / (1 - beta1^step)                           */
    double bias_correction2_sqrt; /* sqrt(1 - beta2^step)                            */
    int decoupled;                /* 1: AdamW's weight decay; 0: Adam's L2 term     */
} attnkit_adam_args;

/* ---------------------------------------------------------------------------
 * The entry points, declared from the one list of kernels (kernels.def):
 * attnkit_<name>_f32 with REAL = float and attnkit_<name>_f64 with double.
 * ------------------------------------------------------------------------- */
#define REAL float
#define ATTNKIT_KERNEL(returns, name, params, args) returns attnkit_##name##_f32 params;
#include "kernels.def"
#undef ATTNKIT_KERNEL
#undef REAL
#define REAL double
#define ATTNKIT_KERNEL(returns, name, params, args) returns attnkit_##name##_f64 params;
#include "kernels.def"
#undef ATTNKIT_KERNEL
#undef REAL

/* ---------------------------------------------------------------------------
 * Instruction sets. Each kernel is built three times from one source; the
 * entry points above call the build picked here. attnkit_init() picks the
 * best one the CPU and the OS support.
 * ------------------------------------------------------------------------- */
enum { ATTNKIT_ISA_SCALAR = 0, ATTNKIT_ISA_AVX2 = 1, ATTNKIT_ISA_AVX512 = 2, ATTNKIT_ISA_COUNT = 3 };

void attnkit_init(void);                   /* idempotent; call once at import   */
const char* attnkit_isa_name(int isa);     /* "scalar", "avx2", "avx512"        */
int attnkit_isa_supported(int isa);        /* 1 if this CPU and OS can run it   */
int attnkit_get_isa(void);
int attnkit_set_isa(int isa);              /* 0 ok; -1 unsupported or unknown   */

/* Threads: the count every kernel may use (default: OpenMP's, which honours
 * OMP_NUM_THREADS). A child process forked after the parent ran threads runs
 * every kernel on its one thread (see dispatch.c). */
void attnkit_set_num_threads(int n);       /* n >= 1                            */
int attnkit_get_num_threads(void);
int attnkit_in_forked_child(void);

/* How many threads a kernel of `tasks` independent tasks, each costing about
 * `work_per_task` element-operations, should use: 1 for small work, so that a
 * small call never pays for waking a team. */
int attnkit_plan_threads(int64_t tasks, int64_t work_per_task);
/* How many tasks a thread takes at a time, when `threads` share `tasks`. */
int64_t attnkit_chunk_size(int64_t tasks, int threads);

/* The build: compiler, flags. */
const char* attnkit_build_compiler(void);
const char* attnkit_build_flags(int isa);
int attnkit_build_sanitized(void);
int attnkit_build_emulated_avx512(void); /* test build: AVX-512 path through SIMDe */

#ifdef __cplusplus
}
#endif
#endif /* ATTNKIT_H */
