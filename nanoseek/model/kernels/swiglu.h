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
 * Instantiated for float32 and float64 by kernels.c (REAL, NAME, EXP come from there). */

/* y[i] = silu(min(g[i], L)) * clamp(u[i], -L, L) for n elements (clamped = 0: no clamps). */
void NAME(swiglu)(const REAL *restrict g, const REAL *restrict u, REAL *restrict y, long n, REAL limit,
                  int clamped) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        const REAL gc = clamped && g[i] > limit ? limit : g[i];
        const REAL uc = clamped && u[i] > limit ? limit : (clamped && u[i] < -limit ? -limit : u[i]);
        y[i] = gc / (1 + EXP(-gc)) * uc;
    }
}

/* dg, du: the gradient of sum(dy * y) with respect to g and u. */
void NAME(swiglu_backward)(const REAL *restrict g, const REAL *restrict u, const REAL *restrict dy,
                           REAL *restrict dg, REAL *restrict du, long n, REAL limit, int clamped) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (long i = 0; i < n; i++) {
        const REAL gc = clamped && g[i] > limit ? limit : g[i];
        const REAL uc = clamped && u[i] > limit ? limit : (clamped && u[i] < -limit ? -limit : u[i]);
        const REAL s = 1 / (1 + EXP(-gc));
        const REAL dsilu = s * (1 + gc * (1 - s));         /* d/dx x sigmoid(x) */
        dg[i] = !clamped || g[i] <= limit ? dy[i] * uc * dsilu : 0;
        du[i] = !clamped || (u[i] >= -limit && u[i] <= limit) ? dy[i] * (gc * s) : 0;
    }
}
