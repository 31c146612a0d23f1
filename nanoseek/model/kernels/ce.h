/* One chunk of the LM head's cross-entropy for the eager CPU path (model/loss.py,
 * _LinearCrossEntropy; the log-softmax over the vocabulary stays in fp32 whatever the matmul's
 * dtype, as F.cross_entropy on fp32 logits). For each row r of logits x [rows, V]:
 *
 *     m      = max_i x[r, i]
 *     lse[r] = log(sum_i exp(x[r, i] - m)) + m                 (the log-normaliser)
 *     tgt[r] = x[r, label[r]]
 *     and, if asked, over x itself:
 *     x[r, i] = (exp(x[r, i] - m) / sum - [i == label[r]]) * w[r]   (d CE_r / d logits, w: 0 or 1)
 *
 * In PyTorch this was nine ops, each a pass over the chunk (a [512, 8192] chunk of the `small`
 * head is 16 MiB in fp32): the fp32 copy of bf16 logits, max, subtract, exp, sum, divide, the
 * one-hot scatter, the mask multiply and the cast back. Here each row is read once for its
 * maximum, once more to form its exponentials into a per-thread row buffer (32 KiB at an 8K
 * vocabulary: it stays in L1/L2) and their sum, and written once as its gradient. The
 * arithmetic is PyTorch's, step by step (the exponentials divided by the sum, the one-hot
 * subtracted, then the weight). The max and the sum are OpenMP simd reductions, which the
 * compiler vectorises (written as plain loops they stayed scalar: the max 7x slower); the sum's
 * order differs from PyTorch's, so results agree to rounding. A build without OpenMP ignores
 * the pragmas (same results, slower). The max skips NaNs, but a NaN logit still makes its row's
 * sum, lse and gradient NaN, as in PyTorch (and a +inf logit gives inf - inf = NaN, as there).
 *
 * Rows are split across up to `threads` OpenMP threads, thread i using the row buffer work + i * V
 * (the caller allocates threads * V reals).
 * Instantiated for float32, float64 and bfloat16 by kernels.c (STORE_T, LOAD, STORE, REAL, NAME
 * and EXP come from there: bf16 logits are widened, the gradient rounded once to nearest even).
 * The caller checks every label is in [0, V). */

void NAME(ce_rows)(STORE_T *restrict x, const int64_t *restrict label, const REAL *restrict weight,
                   REAL *restrict lse, REAL *restrict tgt, long rows, long v, int want_grad,
                   REAL *restrict work, long threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows > 1)
    for (long r = 0; r < rows; r++) {
        STORE_T *xr = x + r * v;
        REAL *e = work + (long)THREAD_NUM() * v;
        REAL m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (long i = 0; i < v; i++) {
            const REAL xi = LOAD(xr[i]);
            m = xi > m ? xi : m;
        }
        for (long i = 0; i < v; i++) e[i] = EXP(LOAD(xr[i]) - m);
        REAL z = 0;
#pragma omp simd reduction(+ : z)
        for (long i = 0; i < v; i++) z += e[i];
        const long lab = (long)label[r];
        lse[r] = log(z) + m;
        tgt[r] = LOAD(xr[lab]);
        if (want_grad) {
            const REAL w = weight[r];
            for (long i = 0; i < v; i++) xr[i] = STORE(e[i] / z * w);
            xr[lab] = STORE((e[lab] / z - 1) * w);
        }
    }
}
