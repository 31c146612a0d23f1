/* mHC's Sinkhorn projection for the eager CPU paths (spec 1.2; mHC paper arXiv:2512.24880):
 *
 *     M_0 = softmax(logits) + eps                (softmax over each row)
 *     M_k = M_{k-1} / (column sums + eps)        k = 1, 3, 5, ...   (the first step: columns)
 *     M_k = M_{k-1} / (row sums + eps)           k = 2, 4, ...
 *
 * 2 * iters - 1 normalisations of one n x n matrix per token, and the gradient of the result
 * with respect to the logits. The PyTorch version (hyper_connections.sinkhorn / _Sinkhorn) is
 * the reference; it dispatches ~120 tiny ops forward and ~200 backward per mHC site, which on a
 * CPU cost more than their arithmetic. Here one call does it all: the tokens of a block of TB
 * are transposed into [n*n][TB] arrays (every inner loop runs over TB lanes, which the compiler
 * vectorises) and stay in L1 through all the steps.
 *
 * Layout: logits, out, grad and dlogits are contiguous [T, n, n] (tokens first, as the model
 * holds them). `work` holds (3 n*n + (2 iters - 1) n) * TB reals per thread. The backward recomputes the
 * forward from the logits (it is cheaper than saving 2 iters - 1 normalisers per token) and then
 * replays the steps in reverse: for M' = M / s,  dM = (dM' - sum(dM' * M')) / s  along the
 * normalised dimension, and M = M' * s; then the softmax backward p * (g - sum(g * p)).
 * Sums accumulate in the PyTorch reference's order (from the first element, then + eps); each
 * normalisation multiplies by one reciprocal per row or column instead of dividing every
 * element (a division per element was most of the kernel's time), which moves results by an
 * ulp or so: the tests compare with the reference at fp32 / fp64 rounding tolerances.
 *
 * Instantiated for float32 and float64 by kernels.c; n <= 8 and iters <= 64 (checked by the
 * caller, nanoseek/model/cpu_kernels.py); REAL, NAME, EXP and TB come from there.
 *
 * Work arrays are [rows][TB]: row(a, e) is element e of array a for the TB tokens of a block.
 * Every inner loop runs over the TB lanes of one row and local arrays (no two rows in one
 * loop: the compiler cannot prove rows of one buffer apart), so it vectorises. */

#define ROW(arr, e) ((arr) + (e) * TB)

/* One block of tb <= TB tokens. Lanes past tb are padded (logits 0, gradient 0) and dropped. */
static void NAME(sinkhorn_block)(const REAL *restrict x, REAL *restrict out, const REAL *restrict grad,
                                 REAL *restrict dx, long tb, long n, long iters, REAL eps, REAL *work) {
    const long nn = n * n, steps = 2 * iters - 1;
    REAL *p = work;                       /* softmax            [nn][TB] */
    REAL *m = p + nn * TB;                /* matrix normalised  [nn][TB] */
    REAL *g = m + nn * TB;                /* gradient           [nn][TB] */
    REAL *s = g + nn * TB;                /* normalisers        [steps * n][TB] */

    for (long e = 0; e < nn; e++)
        for (long t = 0; t < TB; t++) ROW(p, e)[t] = t < tb ? x[t * nn + e] : 0;
    for (long i = 0; i < n; i++) {        /* softmax over row i */
        REAL mx[TB], z[TB];
        memcpy(mx, ROW(p, i * n), sizeof mx);
        for (long t = 0; t < TB; t++) z[t] = 0;
        for (long j = 1; j < n; j++) {
            const REAL *pj = ROW(p, i * n + j);
            for (long t = 0; t < TB; t++) mx[t] = pj[t] > mx[t] ? pj[t] : mx[t];
        }
        for (long j = 0; j < n; j++) {
            REAL *pj = ROW(p, i * n + j);
            for (long t = 0; t < TB; t++) pj[t] = EXP(pj[t] - mx[t]);
            for (long t = 0; t < TB; t++) z[t] += pj[t];
        }
        for (long t = 0; t < TB; t++) z[t] = 1 / z[t];
        for (long j = 0; j < n; j++) {
            REAL *pj = ROW(p, i * n + j);
            for (long t = 0; t < TB; t++) pj[t] *= z[t];
        }
        for (long j = 0; j < n; j++) {
            const REAL *pj = ROW(p, i * n + j);
            REAL *mj = ROW(m, i * n + j);
            for (long t = 0; t < TB; t++) mj[t] = pj[t] + eps;
        }
    }
    /* step k normalises columns (k even: elements (b, a) of column a) or rows (k odd: (a, b)) */
    for (long k = 0; k < steps; k++) {
        const long ra = k % 2 ? n : 1, rb = k % 2 ? 1 : n;   /* element (a, b) is a*ra + b*rb */
        for (long a = 0; a < n; a++) {
            REAL sum[TB];
            const REAL *m0 = ROW(m, a * ra);
            for (long t = 0; t < TB; t++) sum[t] = m0[t];
            for (long b = 1; b < n; b++) {
                const REAL *mb = ROW(m, a * ra + b * rb);
                for (long t = 0; t < TB; t++) sum[t] += mb[t];
            }
            REAL inv[TB];
            for (long t = 0; t < TB; t++) sum[t] += eps;
            for (long t = 0; t < TB; t++) inv[t] = 1 / sum[t];
            for (long b = 0; b < n; b++) {
                REAL *mb = ROW(m, a * ra + b * rb);
                for (long t = 0; t < TB; t++) mb[t] *= inv[t];
            }
            memcpy(ROW(s, k * n + a), sum, sizeof sum);
        }
    }
    if (out)
        for (long e = 0; e < nn; e++)
            for (long t = 0; t < tb; t++) out[t * nn + e] = ROW(m, e)[t];
    if (!grad)
        return;

    for (long e = 0; e < nn; e++)
        for (long t = 0; t < TB; t++) ROW(g, e)[t] = t < tb ? grad[t * nn + e] : 0;
    for (long k = steps - 1; k >= 0; k--) {
        const long ra = k % 2 ? n : 1, rb = k % 2 ? 1 : n;
        for (long a = 0; a < n; a++) {
            REAL sum[TB], inv[TB], d[TB];
            memcpy(sum, ROW(s, k * n + a), sizeof sum);
            for (long t = 0; t < TB; t++) inv[t] = 1 / sum[t];
            for (long t = 0; t < TB; t++) d[t] = 0;
            for (long b = 0; b < n; b++) {
                const REAL *gb = ROW(g, a * ra + b * rb), *mb = ROW(m, a * ra + b * rb);
                for (long t = 0; t < TB; t++) d[t] += gb[t] * mb[t];
            }
            for (long b = 0; b < n; b++) {
                REAL *gb = ROW(g, a * ra + b * rb), *mb = ROW(m, a * ra + b * rb);
                for (long t = 0; t < TB; t++) gb[t] = (gb[t] - d[t]) * inv[t];
                for (long t = 0; t < TB; t++) mb[t] *= sum[t];   /* this step's input: M' * s = M */
            }
        }
    }
    for (long i = 0; i < n; i++) {        /* softmax backward (the + eps has gradient 1) */
        REAL d[TB];
        for (long t = 0; t < TB; t++) d[t] = 0;
        for (long j = 0; j < n; j++) {
            const REAL *gj = ROW(g, i * n + j), *pj = ROW(p, i * n + j);
            for (long t = 0; t < TB; t++) d[t] += gj[t] * pj[t];
        }
        for (long j = 0; j < n; j++) {
            REAL *gj = ROW(g, i * n + j);
            const REAL *pj = ROW(p, i * n + j);
            REAL v[TB];
            for (long t = 0; t < TB; t++) v[t] = pj[t] * (gj[t] - d[t]);
            memcpy(gj, v, sizeof v);
        }
    }
    for (long e = 0; e < nn; e++)
        for (long t = 0; t < tb; t++) dx[t * nn + e] = ROW(g, e)[t];
}

/* Every block of T tokens: out = Sinkhorn(x) when out is not NULL; dx = d(sum(grad * out))/dx
 * when grad is not NULL. The blocks are split across up to `threads` OpenMP threads, thread i
 * using work + i * work_size (the caller allocates threads * work_size reals); inputs of a few
 * blocks stay on one thread (a parallel region costs more than they do). */
void NAME(sinkhorn)(const REAL *x, REAL *out, const REAL *grad, REAL *dx, long T, long n,
                    long iters, REAL eps, REAL *work, long work_size, long threads) {
    const long nn = n * n, blocks = (T + TB - 1) / TB;
#pragma omp parallel num_threads(threads) if (threads > 1 && blocks >= 8)
    {
        REAL *w = work + THREAD_NUM() * work_size;
#pragma omp for schedule(static)
        for (long b = 0; b < blocks; b++) {
            const long t0 = b * TB, tb = T - t0 < TB ? T - t0 : TB;
            NAME(sinkhorn_block)(x + t0 * nn, out ? out + t0 * nn : 0, grad ? grad + t0 * nn : 0,
                                 dx ? dx + t0 * nn : 0, tb, n, iters, eps, w);
        }
    }
}

#undef ROW
