/* The clamped SwiGLU of V4's experts (spec 1.6; model/moe.py `swiglu` is the PyTorch reference):
 *
 *     y = silu(min(g, L)) * clamp(u, -L, L),   silu(x) = x * sigmoid(x)
 *
 * and its gradient. In PyTorch the forward is 4 elementwise ops and the backward ~10 (two
 * clamp masks, `where`, silu's backward, the products), each a pass over a [tokens, inter]
 * tensor that is small per expert (a few hundred rows): one call each way does the same in one
 * pass. The clamps pass the gradient where the input is inside [-L, L] (L included, as
 * torch.clamp does; NaN passes none); clamped = 0: no clamps (moe.swiglu's L <= 0).
 *
 * Built and called by nanoseek/model/cpu_kernels.py, float32 and float64 entry points. */

#include "vec_math.h"

#define REAL float
#define NAME(f) f##_f32
#define EXP exp_f32
#include "swiglu_body.h"
#undef REAL
#undef NAME
#undef EXP

#define REAL double
#define NAME(f) f##_f64
#define EXP exp_f64
#include "swiglu_body.h"
