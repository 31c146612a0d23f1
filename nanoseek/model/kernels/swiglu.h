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
 * Split across the OpenMP threads from PARALLEL_MIN elements on (kernels.c).
 *
 * Instantiated for float32, float64 and bfloat16 by kernels.c: STORE_T is the tensors' element
 * type, REAL the arithmetic's (float for bf16: inputs widened, each result rounded to nearest
 * even once, where PyTorch's bf16 ops round after every op), LOAD / STORE convert between them;
 * REAL, NAME and EXP come from there too. The conditions are combined with & and |, not && and
 * ||, so the loops have no branches and vectorise. */

/* y[i] = silu(min(g[i], L)) * clamp(u[i], -L, L) for n elements (clamped = 0: no clamps). */
void NAME(swiglu)(const STORE_T *restrict g, const STORE_T *restrict u, STORE_T *restrict y, long n, REAL limit,
                  int clamped) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        const REAL gi = LOAD(g[i]), ui = LOAD(u[i]);
        const REAL gc = clamped & (gi > limit) ? limit : gi;
        const REAL uc = clamped & (ui > limit) ? limit : (clamped & (ui < -limit) ? -limit : ui);
        y[i] = STORE(gc / (1 + EXP(-gc)) * uc);
    }
}

/* dg, du: the gradient of sum(dy * y) with respect to g and u. */
void NAME(swiglu_backward)(const STORE_T *restrict g, const STORE_T *restrict u, const STORE_T *restrict dy,
                           STORE_T *restrict dg, STORE_T *restrict du, long n, REAL limit, int clamped) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        const REAL gi = LOAD(g[i]), ui = LOAD(u[i]), dyi = LOAD(dy[i]);
        const REAL gc = clamped & (gi > limit) ? limit : gi;
        const REAL uc = clamped & (ui > limit) ? limit : (clamped & (ui < -limit) ? -limit : ui);
        const REAL s = 1 / (1 + EXP(-gc));
        const REAL dsilu = s * (1 + gc * (1 - s));         /* d/dx x sigmoid(x) */
        dg[i] = STORE(((!clamped) | (gi <= limit)) ? dyi * uc * dsilu : 0);
        du[i] = STORE(((!clamped) | ((ui >= -limit) & (ui <= limit))) ? dyi * (gc * s) : 0);
    }
}
