/* The kernels for one element type T (bits) with suffix SFX; included by kernels.c once per type. */

#define VAL CAT(val, SFX)
#define LOAD8 CAT(load8, SFX)
#define STORE8 CAT(store8, SFX)
#define ROUND8 CAT(round8, SFX)

/* relu(2x2 max-pool): z (N, H, W, C) -> a (N, H/2, W/2, C), idx (N, H/2, W/2, C). */
void CAT(pool_relu_fwd, SFX)(const T *restrict z, T *restrict a, uint8_t *restrict idx,
                             int64_t N, int64_t H, int64_t W, int64_t C) {
    const int64_t Ho = H / 2, Wo = W / 2;
    for (int64_t n = 0; n < N; n++)
        for (int64_t y = 0; y < Ho; y++)
            for (int64_t x = 0; x < Wo; x++) {
                const T *z0 = z + ((n * H + 2 * y) * W + 2 * x) * C, *z1 = z0 + C;
                const T *z2 = z0 + W * C, *z3 = z2 + C;
                const int64_t o = ((n * Ho + y) * Wo + x) * C;
                for (int64_t c = 0; c < C; c++) {
                    T v = z0[c];
                    uint8_t j = 0;
                    if (VAL(z1[c]) > VAL(v)) { v = z1[c]; j = 1; }
                    if (VAL(z2[c]) > VAL(v)) { v = z2[c]; j = 2; }
                    if (VAL(z3[c]) > VAL(v)) { v = z3[c]; j = 3; }
                    const int pos = VAL(v) > 0.0f;
                    a[o + c] = pos ? v : 0;
                    idx[o + c] = pos ? j : 4;
                }
            }
}

/* Its backward: da (N, H/2, W/2, C) -> dz (N, H, W, C), every element written (no zero fill first);
   db (C,) float32 += the sum of dz over N, H, W: the bias gradient of the convolution before the pool
   (a separate pass in oneDNN's backward). */
void CAT(pool_relu_bwd, SFX)(const T *restrict da, const uint8_t *restrict idx, T *restrict dz,
                             float *restrict db, int64_t N, int64_t H, int64_t W, int64_t C) {
    const int64_t Ho = H / 2, Wo = W / 2;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t y = 0; y < Ho; y++)
            for (int64_t x = 0; x < Wo; x++) {
                T *d0 = dz + ((n * H + 2 * y) * W + 2 * x) * C, *d1 = d0 + C;
                T *d2 = d0 + W * C, *d3 = d2 + C;
                const int64_t o = ((n * Ho + y) * Wo + x) * C;
                for (int64_t c = 0; c < C; c++) {
                    const T v = da[o + c];
                    const uint8_t j = idx[o + c];
                    d0[c] = v & -(T)(j == 0);
                    d1[c] = v & -(T)(j == 1);
                    d2[c] = v & -(T)(j == 2);
                    d3[c] = v & -(T)(j == 3);
                    db[c] += VAL(v & -(T)(j < 4));
                }
            }
        /* odd sizes: the last row / column lies in no window (floor pooling) */
        if (H % 2) memset(dz + (n * H + H - 1) * W * C, 0, W * C * sizeof(T));
        if (W % 2)
            for (int64_t y = 0; y < H; y++) memset(dz + ((n * H + y) * W + W - 1) * C, 0, C * sizeof(T));
    }
}

/* conv1 + 2x2 max-pool + bias + ReLU, straight into the grouped layout conv2 reads: P (G, R, 4, 4, C)
   each pooled pixel's 4x4 input window (patches4_u8), w (G, 3, 3, C, C1) and b (G, C1) float32 (as
   the compute dtype holds them) -> a (R, G, C1) = relu(max over the 4 positions + b), idx (R, G, C1).
   The 4 conv outputs of a window are 36C vector FMAs with the kernel in registers; nothing of the
   4x larger pre-pool array is written (the matmul route writes and rereads it: 2-3x slower).
   The bias is added after the max, the same sum CNN5kBody makes before it. */
static inline __attribute__((always_inline)) void CAT(conv1_fwd_model, SFX)(
        const T *restrict P, const float *restrict w, const float *restrict b, T *restrict a,
        uint8_t *restrict idx, int64_t G, int64_t R, int64_t g, const int64_t C) {
    vf8 wv[9 * C], bias;
    for (int64_t t = 0; t < 9 * C; t++) memcpy(&wv[t], w + (g * 9 * C + t) * C1, sizeof(vf8));
    memcpy(&bias, b + g * C1, sizeof bias);
    float pf[16 * C];
    for (int64_t r = 0; r < R; r++) {
        const T *p = P + (g * R + r) * 16 * C;
        for (int64_t i = 0; i < 16 * C; i++) pf[i] = VAL(p[i]);
        vf8 m = {0};
        vi8 j = {0};
        for (int q = 0; q < 4; q++) {
            const int py = q >> 1, px = q & 1;
            vf8 z = {0};
            for (int dy = 0; dy < 3; dy++)
                for (int dx = 0; dx < 3; dx++)
                    for (int64_t c = 0; c < C; c++)
                        z += wv[(dy * 3 + dx) * C + c] * pf[((py + dy) * 4 + px + dx) * C + c];
            if (q == 0) {
                m = z;
            } else {
                const vi8 gt = z > m; /* strictly greater: the first maximum wins (max_pool2d's rule) */
                m = (vf8)select8(gt, (vi8)z, (vi8)m);
                j = select8(gt, (vi8){q, q, q, q, q, q, q, q}, j);
            }
        }
        const vf8 v = ROUND8(m + bias);
        const vi8 pos = v > 0.0f;
        const int64_t n = r * G + g;
        STORE8(a + n * C1, (vf8)((vi8)v & pos));
        const vu8x8 i8 = __builtin_convertvector(select8(pos, j, (vi8){4, 4, 4, 4, 4, 4, 4, 4}), vu8x8);
        memcpy(idx + n * C1, &i8, sizeof i8);
    }
}

void CAT(conv1_fwd, SFX)(const T *restrict P, const float *restrict w, const float *restrict b, T *restrict a,
                         uint8_t *restrict idx, int64_t G, int64_t R, int64_t C) {
    for (int64_t g = 0; g < G; g++) {
        if (C == 1) /* a constant: the kernel's 9 vectors live in registers */
            CAT(conv1_fwd_model, SFX)(P, w, b, a, idx, G, R, g, 1);
        else
            CAT(conv1_fwd_model, SFX)(P, w, b, a, idx, G, R, g, C);
    }
}

/* Its backward, through conv1 to its weights: da (R, G, C1) the gradient of conv1_fwd's output,
   idx its positions, P (G, R, 4, 4, C) conv1's input windows -> dw (G, 3, 3, C, C1) and db (G, C1),
   float32, overwritten. Only the maximum of each window gets a gradient, so rather than scattering
   into a 4x larger, 3/4-zero (G, R, 4*C1) array and multiplying it by P (the matmul route), each
   pooled pixel adds its 4 masked gradients times the 3x3 input taps they saw: 36C vector FMAs
   with the 9C accumulators in registers, one pass over da, idx and P. */
static inline __attribute__((always_inline)) void CAT(conv1_bwd_model, SFX)(
        const T *restrict da, const uint8_t *restrict idx, const T *restrict P, float *restrict dw,
        float *restrict db, int64_t G, int64_t R, int64_t g, const int64_t C) {
    vf8 acc[9 * C], accb = {0};
    float pf[16 * C];
    for (int64_t t = 0; t < 9 * C; t++) acc[t] = (vf8){0};
    for (int64_t r = 0; r < R; r++) {
        const int64_t n = r * G + g;
        vu8x8 i8;
        memcpy(&i8, idx + n * C1, sizeof i8);
        const vi8 j = __builtin_convertvector(i8, vi8);
        const vi8 v = (vi8)LOAD8(da + n * C1);
        const T *p = P + (g * R + r) * 16 * C;
        for (int64_t i = 0; i < 16 * C; i++) pf[i] = VAL(p[i]);
        for (int q = 0; q < 4; q++) {
            const vf8 vq = (vf8)(v & (j == q));
            const int py = q >> 1, px = q & 1;
            for (int dy = 0; dy < 3; dy++)
                for (int dx = 0; dx < 3; dx++)
                    for (int64_t c = 0; c < C; c++)
                        acc[(dy * 3 + dx) * C + c] += vq * pf[((py + dy) * 4 + px + dx) * C + c];
        }
        accb += (vf8)(v & (j < 4));
    }
    for (int64_t t = 0; t < 9 * C; t++) memcpy(dw + (g * 9 * C + t) * C1, &acc[t], sizeof(vf8));
    memcpy(db + g * C1, &accb, sizeof(vf8));
}

void CAT(conv1_bwd, SFX)(const T *restrict da, const uint8_t *restrict idx, const T *restrict P,
                         float *restrict dw, float *restrict db, int64_t G, int64_t R, int64_t C) {
    for (int64_t g = 0; g < G; g++) {
        if (C == 1) /* a constant: the 9 accumulators live in registers */
            CAT(conv1_bwd_model, SFX)(da, idx, P, dw, db, G, R, g, 1);
        else
            CAT(conv1_bwd_model, SFX)(da, idx, P, dw, db, G, R, g, C);
    }
}

/* conv1's input windows, straight from the uint8 training pool: images (N, H, W, C), rows (M,) the
   images of this batch, lut (256, C) each byte's normalised value per channel (in T) -> p (M, H/2,
   W/2, 4, 4, C), the 4x4 window (zero padding 1) of each pooled pixel. One pass replaces a gather,
   a float conversion, three normalising ops, a pad and a window copy. Each window row is a run of
   4C numbers of a zero-padded, normalised copy of an image row. */
void CAT(patches4_u8, SFX)(const uint8_t *restrict images, const int64_t *restrict rows, const T *restrict lut,
                           T *restrict p, int64_t M, int64_t H, int64_t W, int64_t C) {
    const int64_t Ho = H / 2, Wo = W / 2, L = (W + 2) * C;
    T buf[4][L];
    for (int64_t m = 0; m < M; m++) {
        const uint8_t *img = images + rows[m] * H * W * C;
        for (int64_t y = 0; y < Ho; y++) {
            for (int64_t dy = 0; dy < 4; dy++) {
                const int64_t iy = 2 * y - 1 + dy;
                T *r = buf[dy];
                for (int64_t i = 0; i < C; i++) r[i] = r[L - C + i] = 0;
                if (iy < 0 || iy >= H) {
                    for (int64_t i = C; i < L - C; i++) r[i] = 0;
                    continue;
                }
                const uint8_t *src = img + iy * W * C;
                if (C == 1)
                    for (int64_t x = 0; x < W; x++) r[1 + x] = lut[src[x]];
                else
                    for (int64_t x = 0; x < W; x++)
                        for (int64_t c = 0; c < C; c++) r[(1 + x) * C + c] = lut[src[x * C + c] * C + c];
            }
            T *out = p + (m * Ho + y) * Wo * 16 * C;
            if (C == 1) /* a constant length: one 4-element move per window row */
                for (int64_t x0 = 0; x0 < Wo; x0++)
                    for (int64_t dy = 0; dy < 4; dy++) memcpy(out + x0 * 16 + dy * 4, buf[dy] + 2 * x0, 4 * sizeof(T));
            else
                for (int64_t x0 = 0; x0 < Wo; x0++)
                    for (int64_t dy = 0; dy < 4; dy++)
                        memcpy(out + (x0 * 4 + dy) * 4 * C, buf[dy] + 2 * x0 * C, 4 * C * sizeof(T));
        }
    }
}

#undef VAL
#undef LOAD8
#undef STORE8
#undef ROUND8
