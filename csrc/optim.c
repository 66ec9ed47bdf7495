/*
 * optim.c: the optimisers' per-element updates (the contract is in
 * attnkit.h). One pass over a parameter and its state where NumPy would make
 * about ten, each scalar and each operation as torch.optim's single-tensor
 * Adam has them, so the trajectory is PyTorch's to the rounding of each step.
 *
 *   n                 elements of the parameter
 *   param (n)         updated in place
 *   exp_avg (n)       m, Adam's first moment, updated
 *   exp_avg_sq (n)    v, the second moment, updated
 *   max_exp_avg_sq (n) amsgrad's running maximum of v, or NULL
 *   grad (n)          read
 */
#include <math.h>

#include "attnkit.h"
#include "simd.h"
#include "tiles.h"

enum { CHUNK = 16384 }; /* elements a thread takes at a time */

static void adam_range(real* param, real* m, real* v, real* vmax, const real* grad,
                       const attnkit_adam_args* a, int64_t begin, int64_t end)
{
    const real decay = (real)(1.0 - a->lr * a->weight_decay);     /* AdamW: p * (1 - lr wd) */
    const real l2 = (real)a->weight_decay;                         /* Adam: g + p wd        */
    const int weight_decay = a->weight_decay != 0.0;
    const real w = (real)(1.0 - a->beta1);                         /* lerp's weight          */
    const real one_minus_w = (real)1 - w;
    const int lerp_from_start = fabs((double)w) < 0.5;           /* torch.lerp's two forms */
    const real beta2 = (real)a->beta2, one_minus_beta2 = (real)(1.0 - a->beta2);
    const real bc2_sqrt = (real)a->bias_correction2_sqrt, eps = (real)a->eps;
    const real neg_step = (real)(-a->step_size);
    for (int64_t i = begin; i < end; i++) {
        real p = param[i], g = grad[i];
        if (weight_decay) {
            if (a->decoupled)
                p = p * decay;
            else
                g = p * l2 + g;
        }
        const real diff = g - m[i];
        const real mi = lerp_from_start ? m[i] + diff * w : g - diff * one_minus_w;
        real vi = v[i] * beta2 + (g * one_minus_beta2) * g;
        m[i] = mi;
        v[i] = vi;
        if (vmax) {                                   /* np.maximum's: a NaN on either side wins */
            const real old = vmax[i];
            vi = (old != old || old >= vi) ? old : vi;
            vmax[i] = vi;
        }
        const real root = (real)sqrt(vi);        /* correctly rounded in float too */
        const real denom = root / bc2_sqrt + eps;
        param[i] = p + (mi * neg_step) / denom;
    }
}

void KERNEL(adam_step)(real* param, real* exp_avg, real* exp_avg_sq, real* max_exp_avg_sq,
                       const real* grad, int64_t n, const attnkit_adam_args* args)
{
    if (n <= 0) return;
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
    const int threads = attnkit_plan_threads(chunks, 4 * CHUNK);
    if (threads <= 1) {
        adam_range(param, exp_avg, exp_avg_sq, max_exp_avg_sq, grad, args, 0, n);
        return;
    }
    const unsigned fp = fp_controls();
#pragma omp parallel num_threads(threads)
    {
        const unsigned own_fp = fp_controls_adopt(fp);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; c++)
            adam_range(param, exp_avg, exp_avg_sq, max_exp_avg_sq, grad, args, c * CHUNK,
                       min_i64(n, (c + 1) * CHUNK));
        fp_controls_restore(own_fp);
    }
}
