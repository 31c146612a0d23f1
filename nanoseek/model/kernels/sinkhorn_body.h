/* The Sinkhorn kernel for one real type (REAL, NAME, EXP defined by sinkhorn.c; see there).
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
 * when grad is not NULL. */
void NAME(sinkhorn)(const REAL *x, REAL *out, const REAL *grad, REAL *dx, long T, long n,
                    long iters, REAL eps, REAL *work) {
    const long nn = n * n;
    for (long t0 = 0; t0 < T; t0 += TB) {
        const long tb = T - t0 < TB ? T - t0 : TB;
        NAME(sinkhorn_block)(x + t0 * nn, out ? out + t0 * nn : 0, grad ? grad + t0 * nn : 0,
                             dx ? dx + t0 * nn : 0, tb, n, iters, eps, work);
    }
}

#undef ROW
