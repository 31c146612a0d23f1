/* mHC's per-token stream arithmetic for the eager CPU paths (spec 1.2; mHC paper arXiv:2512.24880):
 *
 *     expand:        out_k = post_k y + sum_j comb[j, k] X_j        (the stream mix after a block)
 *     weighted sum:  x = sum_j w_j X_j                               (the block input, the final head)
 *     collapse:      the streams' gradient through the weighted sum and the mix's RMS factor at once
 *
 * and their gradients, for streams X [T, n, d], y [T, d], post / w [T, n], comb [T, n, n] (all
 * contiguous, tokens first). The PyTorch versions (hyper_connections._StreamMix and
 * _WeightedSum) are the reference. There each product is its own pass over the [T, n, d]
 * streams (16 MiB per site of a `small` step): the expand backward alone is three batched
 * matmuls, a [T, n, d] product and its sum, i.e. five passes plus two [T, n, d] temporaries. Here
 * one pass per direction reads each token's n x d block once (8 KiB at d = 512, held in L1 while
 * all of its products are formed) and writes each result once.
 *
 * Dot products over d (grad post, grad comb, grad w) accumulate in LANES independent partial
 * sums, which the compiler vectorises without reassociating anything, then add the lanes: the
 * order differs from PyTorch's, so results agree to rounding (the tests' tolerances).
 *
 * Tokens are split across the OpenMP threads PyTorch already runs (kernels.c is built with
 * -fopenmp where the compiler has it and loads into the same libgomp as torch); without OpenMP
 * the pragmas are ignored and one thread does the work.
 *
 * Instantiated for float32 and float64 by kernels.c (REAL and NAME come from there). Pointers
 * of gradients a caller does not need may be NULL. */

#define LANES 16

static inline REAL NAME(dot)(const REAL *restrict a, const REAL *restrict b, long d) {
    REAL acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= d; i += LANES)
        for (long l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    REAL s = 0;
    for (; i < d; i++) s += a[i] * b[i];
    for (long l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* o = sum_k c[k * cs] rows[k]: n rows of d mixed with n coefficients c[0], c[cs], ... (the first
 * product written, the others added, in order) */
static inline void NAME(mix_rows)(REAL *restrict o, const REAL *restrict rows, const REAL *restrict c, long cs,
                                  long n, long d) {
    for (long i = 0; i < d; i++) o[i] = c[0] * rows[i];
    for (long k = 1; k < n; k++) {
        const REAL ck = c[k * cs];
        const REAL *r = rows + k * d;
        for (long i = 0; i < d; i++) o[i] += ck * r[i];
    }
}

/* out[t, k, :] = sum_j comb[t, j, k] X[t, j, :] + post[t, k] y[t, :] */
void NAME(stream_mix)(const REAL *restrict y, const REAL *restrict x, const REAL *restrict post,
                      const REAL *restrict comb, REAL *restrict out, long T, long n, long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const REAL *yt = y + t * d, *xt = x + t * n * d, *pt = post + t * n, *ct = comb + t * n * n;
        for (long k = 0; k < n; k++) {
            REAL *o = out + (t * n + k) * d;
            const REAL p = pt[k];
            NAME(mix_rows)(o, xt, ct + k, n, n, d);     /* column k of comb */
            for (long i = 0; i < d; i++) o[i] += p * yt[i];
        }
    }
}

/* The gradients of sum(g * stream_mix(y, X, post, comb)):
 *   gy = sum_k post_k g_k,  gx_j = sum_k comb[j, k] g_k,  gpost_k = <g_k, y>,  gcomb[j, k] = <X_j, g_k> */
void NAME(stream_mix_backward)(const REAL *restrict y, const REAL *restrict x, const REAL *restrict post,
                               const REAL *restrict comb, const REAL *restrict g, REAL *restrict gy,
                               REAL *restrict gx, REAL *restrict gpost, REAL *restrict gcomb,
                               long T, long n, long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const REAL *yt = y + t * d, *xt = x + t * n * d, *pt = post + t * n, *ct = comb + t * n * n;
        const REAL *gt = g + t * n * d;
        if (gy)
            NAME(mix_rows)(gy + t * d, gt, pt, 1, n, d);
        if (gx)
            for (long j = 0; j < n; j++) NAME(mix_rows)(gx + (t * n + j) * d, gt, ct + j * n, 1, n, d);   /* row j */
        if (gpost)
            for (long k = 0; k < n; k++) gpost[t * n + k] = NAME(dot)(gt + k * d, yt, d);
        if (gcomb)
            for (long j = 0; j < n; j++)
                for (long k = 0; k < n; k++) gcomb[(t * n + j) * n + k] = NAME(dot)(xt + j * d, gt + k * d, d);
    }
}

/* out[t, :] = sum_j w[t, j] X[t, j, :] */
void NAME(weighted_sum)(const REAL *restrict w, const REAL *restrict x, REAL *restrict out, long T, long n,
                        long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) NAME(mix_rows)(out + t * d, x + t * n * d, w + t * n, 1, n, d);
}

/* The gradients of sum(g * weighted_sum(w, X)): gw_j = <X_j, g>, gx_j = w_j g */
void NAME(weighted_sum_backward)(const REAL *restrict w, const REAL *restrict x, const REAL *restrict g,
                                 REAL *restrict gw, REAL *restrict gx, long T, long n, long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const REAL *xt = x + t * n * d, *wt = w + t * n, *gt = g + t * d;
        for (long j = 0; j < n; j++) {
            if (gw) gw[t * n + j] = NAME(dot)(xt + j * d, gt, d);
            if (gx) {
                REAL *o = gx + (t * n + j) * d;
                const REAL c = wt[j];
                for (long i = 0; i < d; i++) o[i] = c * gt[i];
            }
        }
    }
}

/* The streams' gradient of a whole collapse (hyper_connections._Collapse): through the weighted
 * sum, w_j g, plus through the RMS factor of the mix, coef X_j (the mix's matmul part is added
 * by the caller's GEMM): gx[t, j, :] = w[t, j] g[t, :] + coef[t] X[t, j, :]. */
void NAME(collapse_backward)(const REAL *restrict w, const REAL *restrict x, const REAL *restrict g,
                             const REAL *restrict coef, REAL *restrict gx, long T, long n, long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const REAL *xt = x + t * n * d, *gt = g + t * d, c = coef[t];
        for (long j = 0; j < n; j++) {
            const REAL wj = w[t * n + j];
            const REAL *xj = xt + j * d;
            REAL *o = gx + (t * n + j) * d;
            for (long i = 0; i < d; i++) o[i] = wj * gt[i] + c * xj[i];
        }
    }
}

#undef LANES
