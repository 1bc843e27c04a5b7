/* Fused CPU kernels for batched cnn-5k training (zoo_builder/kernels.py builds and loads them).

   Everything around the convolutions of a tiny CNN is memory traffic: max-pool with indices, its
   scatter backward into a zero-filled tensor, ReLU masks, layout permutes, window gathers. As
   separate torch ops these cost more than the convolutions themselves (cnn-5k, 12 models x 32
   images, one core: ~14 of ~26 ms per step). Each kernel here does one such chain in one pass.

   Every kernel exists for float32 and bfloat16: kernels_body.h is included once per type, and works
   on raw bits (uint32_t, uint16_t). A max-pool output is one of its inputs and a gradient is either
   copied or zero, so values move bit for bit and are only converted to compare or add. Integer masks
   (v & -(T)cond) rather than selects are what lets gcc vectorise the backward kernels (8x faster).

   idx holds, per pooled output, the window position 0..3 of the first maximum (max_pool2d's tie
   rule: scan order (0,0) (0,1) (1,0) (1,1)), or 4 where relu(max) == 0, which gets no gradient. */

#include <stdint.h>
#include <string.h>

#define C1 8 /* conv1 width of cnn-5k (CNN5kBody.widths[0]); kernels.py checks it */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

static inline float val_f32(uint32_t b) { union { uint32_t u; float f; } x; x.u = b; return x.f; }
static inline float val_bf16(uint16_t b) { union { uint32_t u; float f; } x; x.u = (uint32_t)b << 16; return x.f; }
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
