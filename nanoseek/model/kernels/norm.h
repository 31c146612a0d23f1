/* RMSNorm for the eager CPU paths (model/norm.py; its PyTorch `_RMSNorm` is the reference), per
 * token row x of d elements, w the norm weight (REAL; NULL: the unweighted rms_normalize):
 *
 *     r = 1 / sqrt(mean(x^2) + eps),   y = x r w
 *
 * and the gradients of sum(g * y), with xhat = x r and gw = g w:
 *
 *     grad_x = r (gw - xhat mean(gw xhat)),   grad_w = sum over tokens of g xhat.
 *
 * In PyTorch the forward was five passes over the activations (the fp32 copy of bf16 input,
 * square, mean, the two products) and the backward about eight, with xhat saved in fp32 (twice
 * a bf16 input's size). Here each row is read once for its sum of squares and once more to
 * write y (the row, 2 KiB at d = 512, is still in L1), the backward reads x and g twice per row
 * and writes grad_x once; xhat is recomputed from x and the saved r, so the caller keeps x in
 * its own dtype and r ([T], one float a token).
 *
 * The sums over d accumulate in LANES independent partial sums, which the compiler vectorises
 * without reassociating anything, then add the lanes: the order differs from PyTorch's, so
 * results agree to rounding (the tests' tolerances). r's square root is taken in double (one a
 * row): as accurate as the arithmetic's type allows, where 1 / sqrtf would round twice.
 *
 * Tokens are split across the OpenMP threads, each token computed whole by one thread. grad_w
 * sums over tokens: each block of `block` tokens (the caller's constant, not the thread count)
 * adds its rows in order into its own row of `work` [ceil(T / block), d], then the rows are added
 * in block order, so grad_w's bits do not depend on the thread count either.
 *
 * Instantiated for float32, float64 and bfloat16 by kernels.c: x, y, g and grad_x are STORE_T
 * (bf16 widened on load, each result rounded to nearest even once, as `.to(bf16)` of the fp32
 * result), w, r, grad_w and the arithmetic REAL (float for bf16). Pointers of gradients the
 * caller does not need may be NULL. */

#define LANES 16

/* sum_i a_i^2 over one row (a_i = LOAD(x[i])) */
static inline REAL NAME(norm_sumsq)(const STORE_T *restrict x, long d) {
    REAL acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= d; i += LANES)
        for (long l = 0; l < LANES; l++) {
            const REAL v = LOAD(x[i + l]);
            acc[l] += v * v;
        }
    REAL s = 0;
    for (; i < d; i++) s += LOAD(x[i]) * LOAD(x[i]);
    for (long l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* sum_i gw_i xhat_i over one row: gw_i = g_i w_i (g_i without w), xhat_i = x_i r */
static inline REAL NAME(norm_dot)(const STORE_T *restrict x, const STORE_T *restrict g, const REAL *restrict w,
                                  REAL r, long d) {
    REAL acc[LANES] = {0};
    long i = 0;
    /* two loops, not `w ? w[i] : 1` in one: gcc left that one scalar in float (backward 3x slower) */
    if (w)
        for (; i + LANES <= d; i += LANES)
            for (long l = 0; l < LANES; l++) acc[l] += LOAD(g[i + l]) * w[i + l] * (LOAD(x[i + l]) * r);
    else
        for (; i + LANES <= d; i += LANES)
            for (long l = 0; l < LANES; l++) acc[l] += LOAD(g[i + l]) * (LOAD(x[i + l]) * r);
    REAL s = 0;
    for (; i < d; i++) s += LOAD(g[i]) * (w ? w[i] : 1) * (LOAD(x[i]) * r);
    for (long l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* y[t, :] = x[t, :] r[t] w, r[t] = 1 / sqrt(mean(x[t, :]^2) + eps), for T rows of d */
void NAME(rms_norm)(const STORE_T *restrict x, const REAL *restrict w, STORE_T *restrict y, REAL *restrict r,
                    long T, long d, REAL eps, long threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && T * d >= PARALLEL_MIN)
    for (long t = 0; t < T; t++) {
        const STORE_T *xt = x + t * d;
        STORE_T *yt = y + t * d;
        const REAL ms = NAME(norm_sumsq)(xt, d) / d + eps;
        const REAL rt = (REAL)(1 / sqrt((double)ms));
        r[t] = rt;
        /* (x r) w in this order, as the PyTorch formula's xhat * w (w == NULL: hoisted by the compiler) */
        for (long i = 0; i < d; i++) yt[i] = STORE(LOAD(xt[i]) * rt * (w ? w[i] : 1));
    }
}

/* The gradients of sum(g * rms_norm(x, w)) from x and the forward's r: grad_x [T, d] and
 * grad_w [d] (either may be NULL); work holds ceil(T / block) * d reals when grad_w is wanted. */
void NAME(rms_norm_backward)(const STORE_T *restrict x, const REAL *restrict r, const REAL *restrict w,
                             const STORE_T *restrict g, STORE_T *restrict gx, REAL *restrict gw, long T, long d,
                             REAL *restrict work, long block, long threads) {
    const long blocks = (T + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && T * d >= PARALLEL_MIN)
    for (long b = 0; b < blocks; b++) {
        REAL *part = gw ? work + b * d : NULL;
        if (part)
            for (long i = 0; i < d; i++) part[i] = 0;
        for (long t = b * block; t < T && t < (b + 1) * block; t++) {
            const STORE_T *xt = x + t * d, *gt = g + t * d;
            const REAL rt = r[t];
            if (gx) {
                const REAL c = NAME(norm_dot)(xt, gt, w, rt, d) / d;
                STORE_T *o = gx + t * d;
                for (long i = 0; i < d; i++) {
                    const REAL xhat = LOAD(xt[i]) * rt;
                    o[i] = STORE((LOAD(gt[i]) * (w ? w[i] : 1) - xhat * c) * rt);
                }
            }
            if (part)
                for (long i = 0; i < d; i++) part[i] += LOAD(gt[i]) * (LOAD(xt[i]) * rt);
        }
    }
    if (gw) {   /* the blocks' rows in order: ~T / block * d additions, one thread */
        for (long i = 0; i < d; i++) gw[i] = blocks ? work[i] : 0;
        for (long b = 1; b < blocks; b++)
            for (long i = 0; i < d; i++) gw[i] += work[b * d + i];
    }
}

#undef LANES
