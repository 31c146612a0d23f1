/* nanoseek's C kernels for the eager CPU paths, one translation unit: each kernel body
 * (sinkhorn.h, swiglu.h, mhc.h, ce.h, norm.h, attn.h; what they compute and why, at their top) is instantiated
 * for float32 (suffix _f32) and float64 (_f64, what the tests' gradcheck runs), some also for
 * bfloat16 tensors with float arithmetic (_bf16, below). Built with
 * cc -O3 -march=native -fno-trapping-math -fopenmp -shared (OpenMP where the compiler has it)
 * and loaded with ctypes by nanoseek/model/cpu_kernels.py. */

#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define THREAD_NUM() omp_get_thread_num()
#define NUM_THREADS() omp_get_num_threads()
#else
#define THREAD_NUM() 0
#define NUM_THREADS() 1
#endif

#include "vec_math.h"
#include "attn.h"   /* bf16 scores only (the folded attention under autocast): no instantiation */

#define TB 16                 /* Sinkhorn: tokens per block, the lanes of its inner loops */
#define PARALLEL_MIN 32768    /* elementwise kernels: fewer elements run on one thread */

#define STORE_T REAL      /* the element type of the tensors (swiglu.h, mhc.h, ...), here the arithmetic's */
#define LOAD(x) (x)
#define STORE(x) (x)
#define STREAM_BF16 0     /* mhc.h: bf16 streams (vector loads widen, stores narrow) */

#define REAL float
#define NAME(f) f##_f32
#define EXP exp_f32
#include "sinkhorn.h"
#include "swiglu.h"
#include "mhc.h"
#include "ce.h"
#include "norm.h"
#undef REAL
#undef NAME
#undef EXP

#define REAL double
#define NAME(f) f##_f64
#define EXP exp_f64
#include "sinkhorn.h"
#include "swiglu.h"
#include "mhc.h"
#include "ce.h"
#include "norm.h"
#undef REAL
#undef NAME
#undef EXP
#undef STORE_T
#undef LOAD
#undef STORE

#undef STREAM_BF16

/* bfloat16 tensors (autocast's expert activations, head logits and normed activations, the mHC
 * residual streams), float arithmetic: SwiGLU, the cross-entropy rows, RMSNorm and the mHC
 * stream kernels only (no Sinkhorn: its logits are fp32) */
#define STORE_T uint16_t
#define LOAD(x) bf16_to_f32(x)
#define STORE(x) f32_to_bf16(x)
#define STREAM_BF16 1
#define REAL float
#define NAME(f) f##_bf16
#define EXP exp_f32
#include "swiglu.h"
#include "ce.h"
#include "norm.h"
#include "mhc.h"

/* the block size, for the caller's Sinkhorn workspace: (3 n*n + (2 iters - 1) n) * TB reals a thread */
long sinkhorn_tokens_per_block(void) { return TB; }

/* the mix kernels' rows widened per thread for bf16 streams (mhc.h rows()): WIDE_ROWS * K floats */
long mhc_wide_rows(void) { return WIDE_ROWS; }
