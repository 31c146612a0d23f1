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
 * holds them). `work` holds (3 n*n + (2 iters - 1) n) * TB reals. The backward recomputes the
 * forward from the logits (it is cheaper than saving 2 iters - 1 normalisers per token) and then
 * replays the steps in reverse: for M' = M / s,  dM = (dM' - sum(dM' * M')) / s  along the
 * normalised dimension, and M = M' * s; then the softmax backward p * (g - sum(g * p)).
 * Sums accumulate in the PyTorch reference's order (from the first element, then + eps); each
 * normalisation multiplies by one reciprocal per row or column instead of dividing every
 * element (a division per element was most of the kernel's time), which moves results by an
 * ulp or so: the tests compare with the reference at fp32 / fp64 rounding tolerances.
 *
 * Built by nanoseek/model/cpu_kernels.py (cc -O3 -march=native -shared) and called through
 * ctypes; float32 and float64 entry points, n <= 8 and iters <= 64 (checked by the caller). */

#include <string.h>

#include "vec_math.h"

#define TB 16

#define REAL float
#define NAME(f) f##_f32
#define EXP exp_f32
#include "sinkhorn_body.h"
#undef REAL
#undef NAME
#undef EXP

#define REAL double
#define NAME(f) f##_f64
#define EXP exp_f64
#include "sinkhorn_body.h"

/* the block size, for the caller's workspace: (3 n*n + (2 iters - 1) n) * TB reals */
long sinkhorn_tokens_per_block(void) { return TB; }
