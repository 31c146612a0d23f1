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
 * Instantiated for float32 and float64 by kernels.c (REAL and NAME come from there), and for
 * bfloat16 streams with float arithmetic (STREAM_BF16; the residual streams under bf16 autocast,
 * as the reference stores them in its bf16 model dtype): there the tensors of the streams' size
 * -- X, y, the block input and the gradients of these -- are STORE_T (bf16: widened on load,
 * each result rounded to nearest even once, as `.to(bf16)` of the fp32 result), while the
 * per-token weights (w, post, comb, coef, the mix and its gradient), fn and the gradients of
 * those are REAL. Rounding once means a row of results is formed in a REAL buffer first (ROWBUF),
 * then narrowed; for float32 / float64 the buffer is the output itself. Pointers of gradients a
 * caller does not need may be NULL. */

#define LANES 16

#if STREAM_BF16
#define ROWBUF(d) (d)                       /* a row's REAL results before they are narrowed */
#define ROW_TARGET(dst, buf) (buf)
#define ROW_STORE(dst, buf, d) NAME(narrow)((dst), (buf), (d))
#else
#define ROWBUF(d) 1
#define ROW_TARGET(dst, buf) ((void)(buf), (dst))
#define ROW_STORE(dst, buf, d) ((void)0)
#endif

/* dst[i] = STORE(src[i]) for d values (bf16 streams: round to nearest even) */
static inline void NAME(narrow)(STORE_T *restrict dst, const REAL *restrict src, long d) {
    for (long i = 0; i < d; i++) dst[i] = STORE(src[i]);
}

static inline REAL NAME(dot)(const STORE_T *restrict a, const STORE_T *restrict b, long d) {
    REAL acc[LANES] = {0};
    long i = 0;
    for (; i + LANES <= d; i += LANES)
        for (long l = 0; l < LANES; l++) acc[l] += LOAD(a[i + l]) * LOAD(b[i + l]);
    REAL s = 0;
    for (; i < d; i++) s += LOAD(a[i]) * LOAD(b[i]);
    for (long l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* the same over REAL rows (the widened rows of the mix kernels below) */
static inline REAL NAME(rdot)(const REAL *restrict a, const REAL *restrict b, long d) {
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
static inline void NAME(mix_rows)(REAL *restrict o, const STORE_T *restrict rows, const REAL *restrict c, long cs,
                                  long n, long d) {
    for (long i = 0; i < d; i++) o[i] = c[0] * LOAD(rows[i]);
    for (long k = 1; k < n; k++) {
        const REAL ck = c[k * cs];
        const STORE_T *r = rows + k * d;
        for (long i = 0; i < d; i++) o[i] += ck * LOAD(r[i]);
    }
}

/* out[t, k, :] = sum_j comb[t, j, k] X[t, j, :] + post[t, k] y[t, :] */
void NAME(stream_mix)(const STORE_T *restrict y, const STORE_T *restrict x, const REAL *restrict post,
                      const REAL *restrict comb, STORE_T *restrict out, long T, long n, long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const STORE_T *yt = y + t * d, *xt = x + t * n * d;
        const REAL *pt = post + t * n, *ct = comb + t * n * n;
        REAL buf[ROWBUF(d)];
        for (long k = 0; k < n; k++) {
            REAL *o = ROW_TARGET(out + (t * n + k) * d, buf);
            const REAL p = pt[k];
            NAME(mix_rows)(o, xt, ct + k, n, n, d);     /* column k of comb */
            for (long i = 0; i < d; i++) o[i] += p * LOAD(yt[i]);
            ROW_STORE(out + (t * n + k) * d, o, d);
        }
    }
}

/* The gradients of sum(g * stream_mix(y, X, post, comb)):
 *   gy = sum_k post_k g_k,  gx_j = sum_k comb[j, k] g_k,  gpost_k = <g_k, y>,  gcomb[j, k] = <X_j, g_k> */
void NAME(stream_mix_backward)(const STORE_T *restrict y, const STORE_T *restrict x, const REAL *restrict post,
                               const REAL *restrict comb, const STORE_T *restrict g, STORE_T *restrict gy,
                               STORE_T *restrict gx, REAL *restrict gpost, REAL *restrict gcomb,
                               long T, long n, long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const STORE_T *yt = y + t * d, *xt = x + t * n * d, *gt = g + t * n * d;
        const REAL *pt = post + t * n, *ct = comb + t * n * n;
        REAL buf[ROWBUF(d)];
        if (gy) {
            REAL *o = ROW_TARGET(gy + t * d, buf);
            NAME(mix_rows)(o, gt, pt, 1, n, d);
            ROW_STORE(gy + t * d, o, d);
        }
        if (gx)
            for (long j = 0; j < n; j++) {   /* row j */
                REAL *o = ROW_TARGET(gx + (t * n + j) * d, buf);
                NAME(mix_rows)(o, gt, ct + j * n, 1, n, d);
                ROW_STORE(gx + (t * n + j) * d, o, d);
            }
        if (gpost)
            for (long k = 0; k < n; k++) gpost[t * n + k] = NAME(dot)(gt + k * d, yt, d);
        if (gcomb)
            for (long j = 0; j < n; j++)
                for (long k = 0; k < n; k++) gcomb[(t * n + j) * n + k] = NAME(dot)(xt + j * d, gt + k * d, d);
    }
}

/* out[t, :] = sum_j w[t, j] X[t, j, :] */
void NAME(weighted_sum)(const REAL *restrict w, const STORE_T *restrict x, STORE_T *restrict out, long T, long n,
                        long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        REAL buf[ROWBUF(d)];
        REAL *o = ROW_TARGET(out + t * d, buf);
        NAME(mix_rows)(o, x + t * n * d, w + t * n, 1, n, d);
        ROW_STORE(out + t * d, o, d);
    }
}

/* The gradients of sum(g * weighted_sum(w, X)): gw_j = <X_j, g>, gx_j = w_j g */
void NAME(weighted_sum_backward)(const REAL *restrict w, const STORE_T *restrict x, const STORE_T *restrict g,
                                 REAL *restrict gw, STORE_T *restrict gx, long T, long n, long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const STORE_T *xt = x + t * n * d, *gt = g + t * d;
        const REAL *wt = w + t * n;
        for (long j = 0; j < n; j++) {
            if (gw) gw[t * n + j] = NAME(dot)(xt + j * d, gt, d);
            if (gx) {
                STORE_T *o = gx + (t * n + j) * d;
                const REAL c = wt[j];
                for (long i = 0; i < d; i++) o[i] = STORE(c * LOAD(gt[i]));
            }
        }
    }
}

/* The streams' gradient of a whole collapse (hyper_connections._Collapse): through the weighted
 * sum, w_j g, plus through the RMS factor of the mix, coef X_j (the mix's matmul part is added
 * by the caller's GEMM): gx[t, j, :] = w[t, j] g[t, :] + coef[t] X[t, j, :]. */
void NAME(collapse_backward)(const REAL *restrict w, const STORE_T *restrict x, const STORE_T *restrict g,
                             const REAL *restrict coef, STORE_T *restrict gx, long T, long n, long d) {
#pragma omp parallel for schedule(static)
    for (long t = 0; t < T; t++) {
        const STORE_T *xt = x + t * n * d, *gt = g + t * d;
        const REAL c = coef[t];
        for (long j = 0; j < n; j++) {
            const REAL wj = w[t * n + j];
            const STORE_T *xj = xt + j * d;
            STORE_T *o = gx + (t * n + j) * d;
            for (long i = 0; i < d; i++) o[i] = STORE(wj * LOAD(gt[i]) + c * LOAD(xj[i]));
        }
    }
}

/* ---- The mix's products (hyper_connections._Collapse), over the flat streams X [T, K = n d] ----
 *
 *     forward:   raw[t, m] = sum_k X[t, k] fn[m, k],   ss[t] = sum_k X[t, k]^2
 *     backward:  gx[t, k]  = w[t, j] g[t, i] + coef[t] X[t, k] + sum_m gr[t, m] fn[m, k] (+ extra[t, k]),  k = j d + i
 *                dfn[m, k] = sum_t gr[t, m] X[t, k]
 *
 * with M = 2n + n*n = 24 mix outputs a site (n for a hyper head). MKL runs these products with
 * their narrow side (24) at ~45% of the fp32 peak, and the backward was four passes over the
 * streams (collapse_backward's, the GEMM adding gr fn into it, the GEMM reading X for dfn, and
 * autograd adding the expand's streams gradient, `extra`). Here the forward is one pass that
 * also forms the sum of squares, and the backward one pass that forms gx and, while a block of
 * tokens' X is still in L2, their share of dfn.
 *
 * Register blocking with GCC/Clang vector types (VL reals a 32-byte vector; no intrinsics, so
 * any target with the vector extension builds it): the forward keeps 8 tokens x MV vectors of
 * outputs in registers and broadcasts one X value at a time against one row of fn^T (the
 * caller passes fn transposed and zero-padded to MV * VL columns); the backward's gx keeps
 * 4 tokens x 4 vectors along k, its dfn 6 (or 4, or 1) outputs x 4 vectors along k. Sums over
 * k run in blocks of KSPAN terms added into a running total (rounding as a blocked GEMM's).
 * gx is computed whole per token (any thread count gives the same bits); dfn adds per-thread
 * partial sums over each thread's tokens (workspace [threads, M, K]), so its rounding depends
 * on the thread count, as a GEMM's does. */

#ifndef NANOSEEK_MIX_COMMON
#define NANOSEEK_MIX_COMMON
#define MIX_TOK 8        /* forward: tokens per register block */
#define MIX_MAXV 8       /* forward: at most this many output vectors (M <= 8 VL) */
#define KSPAN 256        /* terms per partial sum before it joins the running total */
#define GX_TOK 4         /* backward: tokens per register block of gx */
#define GX_VEC 4         /* backward: vectors along k per block */
#define DFN_TBLK 32      /* backward: tokens whose X stays in L2 between the gx and dfn passes */
#define WIDE_ROWS (DFN_TBLK > MIX_TOK ? DFN_TBLK : MIX_TOK)   /* rows(): a thread's widened rows */
#define AINLINE static inline __attribute__((always_inline))
#endif

typedef REAL NAME(vec) __attribute__((vector_size(32)));
typedef REAL NAME(uvec) __attribute__((vector_size(32), aligned(sizeof(REAL)), may_alias));
#define VL ((long)(32 / sizeof(REAL)))
#define VLOAD(p) (*(const NAME(uvec) *)(p))
#define VSTORE(p, v) (*(NAME(uvec) *)(p) = (v))

/* SVLOAD / SVSTORE: VL stream elements as one REAL vector (bf16: 8 halves widened by a shift;
 * narrowed with f32_to_bf16's rounding, lane by lane) */
#if STREAM_BF16
typedef uint16_t NAME(hvec) __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t NAME(wvec) __attribute__((vector_size(32)));
AINLINE NAME(vec) NAME(svload)(const uint16_t *p) {
    return (NAME(vec))(__builtin_convertvector(*(const NAME(hvec) *)p, NAME(wvec)) << 16);
}
AINLINE void NAME(svstore)(uint16_t *p, NAME(vec) v) {
    const NAME(wvec) u = (NAME(wvec))v, nan = (NAME(wvec))(v != v);
    const NAME(wvec) r = ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16 & ~nan) | (((u >> 16) | 0x40u) & nan);
    *(NAME(hvec) *)p = __builtin_convertvector(r, NAME(hvec));
}
#define SVLOAD(p) NAME(svload)(p)
#define SVSTORE(p, v) NAME(svstore)((p), (v))
#else
#define SVLOAD(p) VLOAD(p)
#define SVSTORE(p, v) VSTORE((p), (v))
#endif

/* The rows of tokens t0 .. t0 + R - 1 of X as REAL: X's own (float32 / float64), or for bf16
 * streams widened once into `wide` (this thread's [WIDE_ROWS, K] workspace), so that the register
 * blocks below read REAL rows from L1/L2 instead of converting every element each time they
 * read it (mix_rms's scalar broadcasts, dfn's block re-read once per group of outputs). */
static inline const REAL *NAME(rows)(const STORE_T *restrict x, REAL *restrict wide, long t0, long R, long K) {
#if STREAM_BF16
    const STORE_T *src = x + t0 * K;
    for (long i = 0; i < R * K; i++) wide[i] = LOAD(src[i]);
    return wide;
#else
    (void)wide, (void)R;
    return x + t0 * K;
#endif
}

/* raw and ss of the tokens t0 .. t0 + R - 1 (R <= MIX_TOK; x: their rows, from rows(); the block's
 * other rows repeat the last token and are not stored). MV is a literal at the fast call sites: the block then lives
 * in registers. */
AINLINE void NAME(mix_block)(const REAL *restrict x, const REAL *restrict fnT, REAL *restrict raw,
                             REAL *restrict ss, long t0, long R, long K, long M, const long MV) {
    const long mp = MV * VL;
    const REAL *row[MIX_TOK];
    NAME(vec) acc[MIX_TOK][MIX_MAXV], tot[MIX_TOK][MIX_MAXV];
    for (long r = 0; r < MIX_TOK; r++) {
        row[r] = x + (r < R ? r : R - 1) * K;
        for (long v = 0; v < MV; v++) tot[r][v] = (NAME(vec)){0};
    }
    for (long k0 = 0; k0 < K; k0 += KSPAN) {
        const long k1 = k0 + KSPAN < K ? k0 + KSPAN : K;
        for (long r = 0; r < MIX_TOK; r++)
            for (long v = 0; v < MV; v++) acc[r][v] = (NAME(vec)){0};
        for (long k = k0; k < k1; k++) {
            NAME(vec) f[MIX_MAXV];
            for (long v = 0; v < MV; v++) f[v] = VLOAD(fnT + k * mp + v * VL);
            for (long r = 0; r < MIX_TOK; r++) {
                const REAL a = row[r][k];
                for (long v = 0; v < MV; v++) acc[r][v] += a * f[v];
            }
        }
        for (long r = 0; r < MIX_TOK; r++)
            for (long v = 0; v < MV; v++) tot[r][v] += acc[r][v];
    }
    for (long r = 0; r < R; r++) {
        for (long m = 0; m < M; m++) raw[(t0 + r) * M + m] = tot[r][m / VL][m % VL];
        ss[t0 + r] = NAME(rdot)(row[r], row[r], K);
    }
}

/* wide: bf16 streams, threads * WIDE_ROWS * K REALs (rows()); NULL for float32 / float64 */
void NAME(mix_rms)(const STORE_T *restrict x, const REAL *restrict fnT, REAL *restrict raw, REAL *restrict ss,
                   long T, long K, long M, long threads, REAL *restrict wide) {
    const long mv = (M + VL - 1) / VL;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        REAL *mine = wide ? wide + (long)THREAD_NUM() * WIDE_ROWS * K : NULL;
#pragma omp for schedule(static)
        for (long t0 = 0; t0 < T; t0 += MIX_TOK) {
            const long R = T - t0 < MIX_TOK ? T - t0 : MIX_TOK;
            const REAL *rows = NAME(rows)(x, mine, t0, R, K);
            switch (mv) {   /* literal MV: the specialised, register-resident blocks */
            case 1: NAME(mix_block)(rows, fnT, raw, ss, t0, R, K, M, 1); break;
            case 2: NAME(mix_block)(rows, fnT, raw, ss, t0, R, K, M, 2); break;
            case 3: NAME(mix_block)(rows, fnT, raw, ss, t0, R, K, M, 3); break;
            default: NAME(mix_block)(rows, fnT, raw, ss, t0, R, K, M, mv); break;
            }
        }
    }
}

/* gx of the tokens t0 .. t0 + R - 1 (R <= GX_TOK; as mix_block, extra rows repeat the last; x: the
 * rows from token x0 on, from rows()) */
AINLINE void NAME(mix_grad_rows)(const REAL *restrict w, const REAL *restrict x, long x0, const STORE_T *restrict g,
                                 const REAL *restrict coef, const REAL *restrict gr, const REAL *restrict fn,
                                 const STORE_T *restrict extra, STORE_T *restrict gx, long t0, long R, long n,
                                 long d, long M) {
    const long K = n * d, span = GX_VEC * VL;
    long t[GX_TOK];
    for (long r = 0; r < GX_TOK; r++) t[r] = t0 + (r < R ? r : R - 1);
    for (long j = 0; j < n; j++) {
        long i = 0;
        for (; i + span <= d; i += span) {
            const long k = j * d + i;
            NAME(vec) s[GX_TOK][GX_VEC];
            for (long r = 0; r < GX_TOK; r++)
                for (long q = 0; q < GX_VEC; q++) s[r][q] = coef[t[r]] * VLOAD(x + (t[r] - x0) * K + k + q * VL);
            for (long m = 0; m < M; m++) {
                NAME(vec) f[GX_VEC];
                for (long q = 0; q < GX_VEC; q++) f[q] = VLOAD(fn + m * K + k + q * VL);
                for (long r = 0; r < GX_TOK; r++) {
                    const REAL c = gr[t[r] * M + m];
                    for (long q = 0; q < GX_VEC; q++) s[r][q] += c * f[q];
                }
            }
            for (long r = 0; r < R; r++) {
                const REAL wj = w[t[r] * n + j];
                for (long q = 0; q < GX_VEC; q++) {
                    NAME(vec) v = s[r][q] + wj * SVLOAD(g + t[r] * d + i + q * VL);
                    if (extra) v += SVLOAD(extra + t[r] * K + k + q * VL);
                    SVSTORE(gx + t[r] * K + k + q * VL, v);
                }
            }
        }
        for (; i < d; i++)   /* d not a multiple of the span: the rest element by element */
            for (long r = 0; r < R; r++) {
                const long k = j * d + i;
                REAL s = coef[t[r]] * x[(t[r] - x0) * K + k];
                for (long m = 0; m < M; m++) s += gr[t[r] * M + m] * fn[m * K + k];
                s += w[t[r] * n + j] * LOAD(g[t[r] * d + i]);
                gx[t[r] * K + k] = STORE(extra ? s + LOAD(extra[t[r] * K + k]) : s);
            }
    }
}

/* part[m, k] += sum over tokens t0 .. t1 - 1 of gr[t, m] X[t, k], MB outputs at a time (x: the rows
 * from t0 on, from rows()) */
AINLINE void NAME(mix_dfn_rows)(const REAL *restrict x, const REAL *restrict gr, REAL *restrict part,
                                long t0, long t1, long K, long M, const long MB) {
    const long span = GX_VEC * VL;
    for (long m0 = 0; m0 < M; m0 += MB) {
        long k = 0;
        for (; k + span <= K; k += span) {
            NAME(vec) a[6][GX_VEC];
            for (long c = 0; c < MB; c++)
                for (long q = 0; q < GX_VEC; q++) a[c][q] = VLOAD(part + (m0 + c) * K + k + q * VL);
            for (long t = t0; t < t1; t++) {
                NAME(vec) xv[GX_VEC];
                for (long q = 0; q < GX_VEC; q++) xv[q] = VLOAD(x + (t - t0) * K + k + q * VL);
                for (long c = 0; c < MB; c++) {
                    const REAL gm = gr[t * M + m0 + c];
                    for (long q = 0; q < GX_VEC; q++) a[c][q] += gm * xv[q];
                }
            }
            for (long c = 0; c < MB; c++)
                for (long q = 0; q < GX_VEC; q++) VSTORE(part + (m0 + c) * K + k + q * VL, a[c][q]);
        }
        for (; k < K; k++)
            for (long c = 0; c < MB; c++) {
                REAL s = part[(m0 + c) * K + k];
                for (long t = t0; t < t1; t++) s += gr[t * M + m0 + c] * x[(t - t0) * K + k];
                part[(m0 + c) * K + k] = s;
            }
    }
}

/* gx (if not NULL) and dfn (if not NULL; work: threads * M * K reals) as in the section's top */
void NAME(collapse_mix_backward)(const REAL *restrict w, const STORE_T *restrict x, const STORE_T *restrict g,
                                 const REAL *restrict coef, const REAL *restrict gr, const REAL *restrict fn,
                                 const STORE_T *restrict extra, STORE_T *restrict gx, REAL *restrict dfn,
                                 REAL *restrict work, long T, long n, long d, long M, long threads,
                                 REAL *restrict wide) {
    const long K = n * d, blocks = (T + DFN_TBLK - 1) / DFN_TBLK;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        REAL *part = dfn ? work + (long)THREAD_NUM() * M * K : NULL;
        REAL *mine = wide ? wide + (long)THREAD_NUM() * WIDE_ROWS * K : NULL;
        if (part) memset(part, 0, sizeof(REAL) * M * K);
#pragma omp for schedule(static)
        for (long b = 0; b < blocks; b++) {
            const long t0 = b * DFN_TBLK, t1 = t0 + DFN_TBLK < T ? t0 + DFN_TBLK : T;
            const REAL *rows = NAME(rows)(x, mine, t0, t1 - t0, K);
            if (gx)
                for (long q = t0; q < t1; q += GX_TOK)
                    NAME(mix_grad_rows)(w, rows, t0, g, coef, gr, fn, extra, gx, q,
                                        t1 - q < GX_TOK ? t1 - q : GX_TOK, n, d, M);
            if (part) {
                if (M % 6 == 0) NAME(mix_dfn_rows)(rows, gr, part, t0, t1, K, M, 6);
                else if (M % 4 == 0) NAME(mix_dfn_rows)(rows, gr, part, t0, t1, K, M, 4);
                else NAME(mix_dfn_rows)(rows, gr, part, t0, t1, K, M, 1);
            }
        }   /* (the implicit barrier: every partial is complete) */
        if (dfn) {
            const long parts = NUM_THREADS();
#pragma omp for schedule(static)
            for (long e = 0; e < M * K; e++) {
                REAL s = 0;
                for (long p = 0; p < parts; p++) s += work[p * M * K + e];
                dfn[e] = s;
            }
        }
    }
}

#undef VL
#undef VLOAD
#undef VSTORE
#undef SVLOAD
#undef SVSTORE
#undef ROWBUF
#undef ROW_TARGET
#undef ROW_STORE

#undef LANES
