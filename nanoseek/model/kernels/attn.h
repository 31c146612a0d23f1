/* The sink softmax of the folded bf16 attention (model/attention.py, _BmmSinkAttention), between
 * its batched products, for bfloat16 scores with float arithmetic. Forward, over raw scores
 * s = q k^T of `groups` x `rows` rows of `keys` entries each (rows query-major, head-minor: row r
 * is query r / heads of its group, head r % heads):
 *
 *     z_j    = s_j * scale + mask[group, r / heads, j]        (mask: additive, -inf hides a key)
 *     m      = max(sink[r % heads], max_j z_j)
 *     d      = sum_j exp(z_j - m) + exp(sink - m)            (the sink: one more logit, value 0)
 *     s_j   <- exp(z_j - m) / d      (in place: the probabilities, rounded once to bf16)
 *     lse[r] = m + log(d)
 *
 * Backward, over dp = g v^T (in place) with p the forward's probabilities and delta[r] = g . out:
 *
 *     dp_j  <- p_j * (dp_j - delta[r]) * scale                 (d loss / d s_j)
 *
 * In PyTorch either was ~6 passes over [groups, rows, keys] (scale, mask add, max, exp, sum,
 * divide; multiply, subtract, multiply) with fp32 temporaries; here each row is read twice and
 * written once (the exponentials go through a per-thread row buffer of `keys` floats). A hidden
 * key's exponential is exactly 0 (exp_f32 would give ~1e-38 for -inf), as in the flash kernel;
 * a NaN score makes its row NaN, as there (the max skips it, the exponential does not).
 * Rows are split across up to `threads` OpenMP threads, each row computed whole by one thread,
 * so results do not depend on the thread count. */

void attn_softmax_bf16(uint16_t *restrict s, const uint16_t *restrict mask, const float *restrict sink,
                       float *restrict lse, long groups, long rows, long heads, long keys, float scale,
                       float *restrict work, long threads) {
    const long total = groups * rows;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && total > 1)
    for (long t = 0; t < total; t++) {
        const long gi = t / rows, r = t % rows;
        uint16_t *sr = s + t * keys;
        const uint16_t *mr = mask + (gi * (rows / heads) + r / heads) * keys;
        float *e = work + (long)THREAD_NUM() * keys;
        const float sk = sink[r % heads];
        float m = sk;
#pragma omp simd reduction(max : m)
        for (long j = 0; j < keys; j++) {
            const float z = bf16_to_f32(sr[j]) * scale + bf16_to_f32(mr[j]);
            e[j] = z;
            m = z > m ? z : m;
        }
        float d = 0.0f;
#pragma omp simd reduction(+ : d)
        for (long j = 0; j < keys; j++) {
            const float x = e[j] == -INFINITY ? 0.0f : exp_f32(e[j] - m);   /* (a NaN stays NaN) */
            e[j] = x;
            d += x;
        }
        d += exp_f32(sk - m);
        const float inv = 1.0f / d;
        for (long j = 0; j < keys; j++) sr[j] = f32_to_bf16(e[j] * inv);
        lse[t] = m + logf(d);
    }
}

void attn_softmax_backward_bf16(uint16_t *restrict dp, const uint16_t *restrict p, const float *restrict delta,
                                long n_rows, long keys, float scale, long threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n_rows > 1)
    for (long t = 0; t < n_rows; t++) {
        uint16_t *dr = dp + t * keys;
        const uint16_t *pr = p + t * keys;
        const float dt = delta[t];
#pragma omp simd
        for (long j = 0; j < keys; j++)
            dr[j] = f32_to_bf16(bf16_to_f32(pr[j]) * (bf16_to_f32(dr[j]) - dt) * scale);
    }
}
