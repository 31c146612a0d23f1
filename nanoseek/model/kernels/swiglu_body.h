/* The SwiGLU kernel for one real type (REAL, NAME, EXP defined by swiglu.c; see there). */

/* y[i] = silu(min(g[i], L)) * clamp(u[i], -L, L) for n elements (clamped = 0: no clamps). */
void NAME(swiglu)(const REAL *restrict g, const REAL *restrict u, REAL *restrict y, long n, REAL limit,
                  int clamped) {
    for (long i = 0; i < n; i++) {
        const REAL gc = clamped && g[i] > limit ? limit : g[i];
        const REAL uc = clamped && u[i] > limit ? limit : (clamped && u[i] < -limit ? -limit : u[i]);
        y[i] = gc / (1 + EXP(-gc)) * uc;
    }
}

/* dg, du: the gradient of sum(dy * y) with respect to g and u. */
void NAME(swiglu_backward)(const REAL *restrict g, const REAL *restrict u, const REAL *restrict dy,
                           REAL *restrict dg, REAL *restrict du, long n, REAL limit, int clamped) {
    for (long i = 0; i < n; i++) {
        const REAL gc = clamped && g[i] > limit ? limit : g[i];
        const REAL uc = clamped && u[i] > limit ? limit : (clamped && u[i] < -limit ? -limit : u[i]);
        const REAL s = 1 / (1 + EXP(-gc));
        const REAL dsilu = s * (1 + gc * (1 - s));         /* d/dx x sigmoid(x) */
        dg[i] = !clamped || g[i] <= limit ? dy[i] * uc * dsilu : 0;
        du[i] = !clamped || (u[i] >= -limit && u[i] <= limit) ? dy[i] * (gc * s) : 0;
    }
}
