/* Fused CPU kernels for batched cnn-5k training (zoo_builder/kernels/library.py builds and loads them).

   Everything around the convolutions of a tiny CNN is memory traffic: max-pool with indices, its
   scatter backward into a zero-filled tensor, ReLU masks, layout permutes, window gathers. As
   separate torch ops these cost more than the convolutions themselves (cnn-5k, 12 models x 32
   images, one core: ~14 of ~26 ms per step). Each kernel here does one such chain in one pass.

   Every kernel exists for float32 and bfloat16: kernels_body.h is included once per type, and works
   on raw bits (uint32_t, uint16_t). A max-pool output is one of its inputs and a gradient is either
   copied or zero, so values move bit for bit and are only converted to compare or add. Integer masks
   (v & -(T)cond) rather than selects are what lets gcc vectorise the backward kernels (8x faster).

   idx holds, per pooled output, the window position 0..3 of the first maximum (max_pool2d's tie
   rule: scan order (0,0) (0,1) (1,0) (1,1)), or 4 where relu(max) == 0, which gets no gradient.

   The kernels, in the order a training step calls them:
     conv1_fwd       conv1 + pool + bias + ReLU, read from the uint8 images (load_image, below)
     pool_relu_fwd   after conv2 and conv3 (oneDNN)
     head            linear head + cross-entropy, forward and backward
     pool_relu_bwd   with the preceding convolution's bias gradient
     conv_dgrad_f32  conv2's input gradient in float32 (below)
     conv1_bwd       conv1's weight and bias gradients */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define C1 8 /* conv1 width of cnn-5k (CNN5kBody.widths[0]); ctypes_ops.py checks it */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

static inline float val_f32(uint32_t b) { union { uint32_t u; float f; } x; x.u = b; return x.f; }
static inline float val_bf16(uint16_t b) { union { uint32_t u; float f; } x; x.u = (uint32_t)b << 16; return x.f; }
static inline uint32_t from_f32_f32(float f) { union { uint32_t u; float f; } x; x.f = f; return x.u; }
static inline uint16_t from_f32_bf16(float f) { /* round to nearest even, as torch does */
    union { uint32_t u; float f; } x; x.f = f;
    return (uint16_t)((x.u + 0x7fffu + ((x.u >> 16) & 1u)) >> 16);
}
/* conv1's pool kernels work on its C1 = 8 channels as one vector (GCC/clang vector extensions:
   portable C that compiles to AVX2/AVX-512 or NEON; plain loops over 8 did not vectorise). */
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint32_t vu32x8 __attribute__((vector_size(32)));
typedef uint16_t vu16x8 __attribute__((vector_size(16)));
typedef uint8_t vu8x8 __attribute__((vector_size(8)));

static inline vf8 load8_f32(const uint32_t *p) { vf8 v; memcpy(&v, p, sizeof v); return v; }
static inline vf8 load8_bf16(const uint16_t *p) {
    vu16x8 h; memcpy(&h, p, sizeof h);
    return (vf8)(__builtin_convertvector(h, vu32x8) << 16);
}
static inline vf8 round8_f32(vf8 v) { return v; }
static inline vf8 round8_bf16(vf8 v) { /* to the nearest bfloat16, as a float */
    vu32x8 u = (vu32x8)v;
    return (vf8)(((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) << 16);
}
static inline void store8_f32(uint32_t *p, vf8 v) { memcpy(p, &v, sizeof v); }
static inline void store8_bf16(uint16_t *p, vf8 v) {  /* v already rounded */
    vu16x8 h = __builtin_convertvector((vu32x8)v >> 16, vu16x8);
    memcpy(p, &h, sizeof h);
}
static inline vi8 select8(vi8 mask, vi8 a, vi8 b) { return (a & mask) | (b & ~mask); }

/* conv1's input: image m as a zero-padded float32 buffer (H+2, W+2, C), read from the uint8 pool u8
   through lut (256, C), each byte's normalised value per channel (as the compute dtype holds it), or
   copied from normalised float32 images f32 (already rounded to the compute dtype). A window of a
   pooled pixel is then 4 rows of 4C consecutive numbers, with no bounds checks. */
static void load_image(const uint8_t *u8, const float *f32, int64_t m, const float *lut, float *restrict buf,
                       int64_t H, int64_t W, int64_t C) {
    const int64_t Wp = W + 2;
    memset(buf, 0, (H + 2) * Wp * C * sizeof(float));
    for (int64_t y = 0; y < H; y++) {
        float *row = buf + ((y + 1) * Wp + 1) * C;
        if (u8) {
            const uint8_t *src = u8 + (m * H + y) * W * C;
            if (C == 1)
                for (int64_t x = 0; x < W; x++) row[x] = lut[src[x]];
            else
                for (int64_t i = 0; i < W * C; i++) row[i] = lut[src[i] * C + i % C];
        } else {
            memcpy(row, f32 + (m * H + y) * W * C, W * C * sizeof(float));
        }
    }
}

#define T uint32_t
#define SFX f32
#include "kernels_body.h"
#undef T
#undef SFX

#define T uint16_t
#define SFX bf16
#include "kernels_body.h"
#undef T
#undef SFX

/* A 3x3 convolution's input gradient (padding 1) in float32, for C1 = 8 input channels per model:
   dz (B, H, W, G*Co) -> da (B, H, W, G*C1), w (G, 3, 3, C1, Co) the stacked kernels,
   da[y, x] = sum over (dy, dx, co) of dz[y+1-dy, x+1-dx, co] * w[dy, dx, :, co].
   Why not oneDNN: its float32 kernels vectorise over output channels, and 8 per group half-fill an
   AVX-512 vector (42 GFLOP/s on one core where its forward reaches 90). Here the 8 channels are one
   vector and XB neighbouring pixels share each weight load (register blocking), over a zero-padded
   copy of one model's image so that the inner loops have no bounds checks. (bfloat16 stays with
   oneDNN, which is fast there.) */
static inline __attribute__((always_inline)) void conv_dgrad_block(
        const float *restrict pad, const vf8 *restrict wv, float *restrict out, int64_t Wp, int64_t Co,
        int64_t ostride, const int XB) {
    vf8 acc[XB];
    for (int i = 0; i < XB; i++) acc[i] = (vf8){0};
    for (int dy = 0; dy < 3; dy++)
        for (int dx = 0; dx < 3; dx++) {
            const float *src = pad + ((2 - dy) * Wp + (2 - dx)) * Co;
            const vf8 *wt = wv + (dy * 3 + dx) * Co;
            for (int64_t co = 0; co < Co; co++)
                for (int i = 0; i < XB; i++) acc[i] += wt[co] * src[i * Co + co];
        }
    for (int i = 0; i < XB; i++) memcpy(out + i * ostride, &acc[i], sizeof(vf8));
}

void conv_dgrad_f32(const float *restrict dz, const float *restrict w, float *restrict da,
                    int64_t B, int64_t H, int64_t W, int64_t G, int64_t Co) {
    const int64_t Wp = W + 2, ostride = G * C1;
    const int XB = W % 8 == 0 ? 8 : W % 7 == 0 ? 7 : W % 4 == 0 ? 4 : 1;
    vf8 wv[9 * Co];
    float pad[(H + 2) * Wp * Co];
    memset(pad, 0, sizeof pad);
    for (int64_t g = 0; g < G; g++) {
        for (int64_t t = 0; t < 9; t++) /* (ci, co) -> a vector over ci for each co */
            for (int64_t co = 0; co < Co; co++)
                for (int k = 0; k < C1; k++) wv[t * Co + co][k] = w[((g * 9 + t) * C1 + k) * Co + co];
        for (int64_t b = 0; b < B; b++) {
            for (int64_t y = 0; y < H; y++)
                for (int64_t x = 0; x < W; x++)
                    memcpy(pad + ((y + 1) * Wp + x + 1) * Co, dz + ((b * H + y) * W + x) * G * Co + g * Co,
                           Co * sizeof(float));
            for (int64_t y = 0; y < H; y++)
                for (int64_t x = 0; x < W; x += XB) {
                    float *out = da + ((b * H + y) * W + x) * ostride + g * C1;
                    const float *src = pad + (y * Wp + x) * Co;
                    switch (XB) { /* a constant block per case: the accumulators stay in registers */
                    case 8: conv_dgrad_block(src, wv, out, Wp, Co, ostride, 8); break;
                    case 7: conv_dgrad_block(src, wv, out, Wp, Co, ostride, 7); break;
                    case 4: conv_dgrad_block(src, wv, out, Wp, Co, ostride, 4); break;
                    default: conv_dgrad_block(src, wv, out, Wp, Co, ostride, 1);
                    }
                }
        }
    }
}
