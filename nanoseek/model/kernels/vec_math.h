/* Vectorisable math for the kernels (included by each kernel file). */

#ifndef NANOSEEK_VEC_MATH_H
#define NANOSEEK_VEC_MATH_H

#include <math.h>
#include <stdint.h>

/* exp for float lanes, vectorisable (libm's expf is a call per element): Cody-Waite range
 * reduction x = k ln2 + r, |r| <= ln2 / 2, and the Cephes degree-6 polynomial for e^r, then
 * 2^k through the exponent bits. Relative error ~1 ulp, as libm's. The argument is clamped to
 * [-87.3, 88.4]: the result is never 0, a denormal or inf but ~1e-38 / ~2e38 there, which is
 * harmless where it is used (a softmax sum >= 1, a sigmoid's 1 + e^-x). NaN stays NaN. */
static inline float exp_f32(float x) {
    float xc = x == x ? x : 0.0f;     /* NaN: computed as 0 (no NaN -> int conversion), see the end */
    xc = xc < -87.3365447504019f ? -87.3365447504019f : xc;
    xc = xc > 88.3762626647950f ? 88.3762626647950f : xc;
    /* k = floor(x log2(e) + 1/2) by truncation, shifted to positive (truncation is then floor;
     * written without a compare-and-correct, which gcc would not vectorise) */
    const int ki = (int)(xc * 1.44269504088896341f + 256.5f) - 256;
    const float k = (float)ki;
    const float r = xc - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int i; float f; } scale = { .i = (ki + 127) << 23 };
    return x == x ? p * scale.f : x;   /* NaN in, NaN out */
}

static inline double exp_f64(double x) { return exp(x); }

/* bfloat16 is the upper half of a float32: widening is a shift; narrowing rounds to nearest
 * even (as PyTorch does) and keeps NaN a (quiet) NaN. Written branch-free so loops vectorise. */
static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { .u = (uint32_t)h << 16 };
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = { .f = f };
    const uint32_t rounded = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16;
    return (uint16_t)(f != f ? (v.u >> 16) | 0x40u : rounded);
}

#endif
