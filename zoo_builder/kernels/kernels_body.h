/* The kernels for one element type T (bits) with suffix SFX; included by kernels.c once per type. */

#define VAL CAT(val, SFX)
#define LOAD8 CAT(load8, SFX)
#define FROM_F32 CAT(from_f32, SFX)
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

/* conv1 + 2x2 max-pool + bias + ReLU for the pooled pixels of one image (its zero-padded float copy
   buf, row stride Wp), written into the grouped layout conv2 reads: a, idx (R, G, C1) with
   R = (B, H/2, W/2). A window's 4 conv outputs are 36C vector FMAs with the kernel in registers;
   nothing of the 4x larger pre-pool array is ever stored. */
static inline __attribute__((always_inline)) void CAT(conv1_fwd_image, SFX)(
        const float *restrict buf, int64_t Wp, const vf8 *restrict wv, vf8 bias, T *restrict a,
        uint8_t *restrict idx, int64_t G, int64_t Ho, int64_t Wo, int64_t b, int64_t g, const int64_t C) {
    for (int64_t py = 0; py < Ho; py++)
        for (int64_t px = 0; px < Wo; px++) {
            const float *base = buf + (2 * py * Wp + 2 * px) * C;
            vf8 m = {0};
            vi8 j = {0};
            for (int q = 0; q < 4; q++) {
                const int qy = q >> 1, qx = q & 1;
                vf8 z = {0};
                for (int dy = 0; dy < 3; dy++)
                    for (int dx = 0; dx < 3; dx++)
                        for (int64_t c = 0; c < C; c++)
                            z += wv[(dy * 3 + dx) * C + c] * base[((qy + dy) * Wp + qx + dx) * C + c];
                if (q == 0) {
                    m = z;
                } else {
                    const vi8 gt = z > m; /* strictly greater: the first maximum wins (max_pool2d's rule) */
                    m = (vf8)select8(gt, (vi8)z, (vi8)m);
                    j = select8(gt, (vi8){q, q, q, q, q, q, q, q}, j);
                }
            }
            const vf8 v = ROUND8(m + bias); /* the bias after the max: the same sum CNN5kBody makes before it */
            const vi8 pos = v > 0.0f;
            const int64_t n = ((b * Ho + py) * Wo + px) * G + g;
            STORE8(a + n * C1, (vf8)((vi8)v & pos));
            const vu8x8 i8 = __builtin_convertvector(select8(pos, j, (vi8){4, 4, 4, 4, 4, 4, 4, 4}), vu8x8);
            memcpy(idx + n * C1, &i8, sizeof i8);
        }
}

/* conv1's forward for G models x B images: image rows[g*B + b] of the uint8 pool u8 (through lut) or
   of the float32 images f32 (see load_image); w (G, 3, 3, C, C1), b (G, C1) float32 as the compute
   dtype holds them -> a (R, G, C1) = relu(max over each 2x2 window + b) in T, idx (R, G, C1). */
void CAT(conv1_fwd, SFX)(const uint8_t *u8, const float *f32, const int64_t *restrict rows, const float *lut,
                         const float *restrict w, const float *restrict b, T *restrict a, uint8_t *restrict idx,
                         int64_t G, int64_t B, int64_t H, int64_t W, int64_t C) {
    const int64_t Wp = W + 2;
    float buf[(H + 2) * Wp * C];
    vf8 wv[9 * C], bias;
    for (int64_t g = 0; g < G; g++) {
        for (int64_t t = 0; t < 9 * C; t++) memcpy(&wv[t], w + (g * 9 * C + t) * C1, sizeof(vf8));
        memcpy(&bias, b + g * C1, sizeof bias);
        for (int64_t bb = 0; bb < B; bb++) {
            load_image(u8, f32, rows[g * B + bb], lut, buf, H, W, C);
            if (C == 1) /* a constant: the kernel's 9 vectors live in registers */
                CAT(conv1_fwd_image, SFX)(buf, Wp, wv, bias, a, idx, G, H / 2, W / 2, bb, g, 1);
            else
                CAT(conv1_fwd_image, SFX)(buf, Wp, wv, bias, a, idx, G, H / 2, W / 2, bb, g, C);
        }
    }
}

/* Its backward, through conv1 to its weights, from the gradient da (R, G, C1) of conv1_fwd's output:
   only the maximum of each window gets a gradient, so rather than scattering into a 4x larger,
   3/4-zero array and multiplying it by the windows (the matmul route), each pooled pixel adds its 4
   masked gradients times the 3x3 input taps they saw: 36C vector FMAs into 9C accumulators. */
static inline __attribute__((always_inline)) void CAT(conv1_bwd_image, SFX)(
        const float *restrict buf, int64_t Wp, const T *restrict da, const uint8_t *restrict idx,
        vf8 *restrict acc, vf8 *restrict accb, int64_t G, int64_t Ho, int64_t Wo, int64_t b, int64_t g,
        const int64_t C) {
    for (int64_t py = 0; py < Ho; py++)
        for (int64_t px = 0; px < Wo; px++) {
            const int64_t n = ((b * Ho + py) * Wo + px) * G + g;
            vu8x8 i8;
            memcpy(&i8, idx + n * C1, sizeof i8);
            const vi8 j = __builtin_convertvector(i8, vi8);
            const vi8 v = (vi8)LOAD8(da + n * C1);
            const float *base = buf + (2 * py * Wp + 2 * px) * C;
            for (int q = 0; q < 4; q++) {
                const vf8 vq = (vf8)(v & (j == q));
                const int qy = q >> 1, qx = q & 1;
                for (int dy = 0; dy < 3; dy++)
                    for (int dx = 0; dx < 3; dx++)
                        for (int64_t c = 0; c < C; c++)
                            acc[(dy * 3 + dx) * C + c] += vq * base[((qy + dy) * Wp + qx + dx) * C + c];
            }
            *accb += (vf8)(v & (j < 4));
        }
}

/* dw (G, 3, 3, C, C1) and db (G, C1), float32, overwritten; the images as for conv1_fwd. */
void CAT(conv1_bwd, SFX)(const uint8_t *u8, const float *f32, const int64_t *restrict rows, const float *lut,
                         const T *restrict da, const uint8_t *restrict idx, float *restrict dw, float *restrict db,
                         int64_t G, int64_t B, int64_t H, int64_t W, int64_t C) {
    const int64_t Wp = W + 2;
    float buf[(H + 2) * Wp * C];
    vf8 acc[9 * C];
    for (int64_t g = 0; g < G; g++) {
        vf8 accb = {0};
        for (int64_t t = 0; t < 9 * C; t++) acc[t] = (vf8){0};
        for (int64_t bb = 0; bb < B; bb++) {
            load_image(u8, f32, rows[g * B + bb], lut, buf, H, W, C);
            if (C == 1)
                CAT(conv1_bwd_image, SFX)(buf, Wp, da, idx, acc, &accb, G, H / 2, W / 2, bb, g, 1);
            else
                CAT(conv1_bwd_image, SFX)(buf, Wp, da, idx, acc, &accb, G, H / 2, W / 2, bb, g, C);
        }
        for (int64_t t = 0; t < 9 * C; t++) memcpy(dw + (g * 9 * C + t) * C1, &acc[t], sizeof(vf8));
        memcpy(db + g * C1, &accb, sizeof(vf8));
    }
}

/* The linear head and its mean cross-entropy for each model, forward and backward in one pass,
   reading the pooled conv3 output where it lies: a3 (B, HW, G, C3) in T (TargetNet's feature order is
   (C3, HW)), wh (G, D, K) and bh (G, K) float32 with D = C3*HW, y (G, B) class positions, kmask (G, K)
   1 for the model's classes -> loss (G,), gwh (G, D, K), gbh (G, K) float32 and da3 (B, HW, G, C3) in T.
   D must be a multiple of 8 (cnn-5k: C3 = 16).
   As torch ops this is a dozen small calls plus two layout copies; here each sample's logits, softmax
   and gradients are 3K vector dot products over D. */
void CAT(head, SFX)(const T *restrict a3, const float *restrict wh, const float *restrict bh,
                    const int64_t *restrict y, const uint8_t *restrict kmask, float *restrict loss,
                    float *restrict gwh, float *restrict gbh, T *restrict da3,
                    int64_t G, int64_t B, int64_t HW, int64_t C3, int64_t K) {
    const int64_t D = C3 * HW;
    float whT[K][D], gT[K][D], f[D], df[D], logit[K], dl[K];
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *km = kmask + g * K;
        for (int64_t d = 0; d < D; d++)
            for (int64_t k = 0; k < K; k++) whT[k][d] = wh[(g * D + d) * K + k];
        memset(gT, 0, sizeof gT);
        float gb[K], total = 0.0f;
        memset(gb, 0, sizeof gb);
        for (int64_t b = 0; b < B; b++) {
            for (int64_t hw = 0; hw < HW; hw++)
                for (int64_t c = 0; c < C3; c++) f[c * HW + hw] = VAL(a3[((b * HW + hw) * G + g) * C3 + c]);
            float m = -INFINITY;
            for (int64_t k = 0; k < K; k++) {
                if (!km[k]) continue;
                vf8 acc = {0}, fv, wv; /* 8 partial sums: an in-order float sum would not vectorise */
                for (int64_t d = 0; d < D; d += 8) {
                    memcpy(&fv, f + d, sizeof fv);
                    memcpy(&wv, whT[k] + d, sizeof wv);
                    acc += fv * wv;
                }
                float z = bh[g * K + k];
                for (int i = 0; i < 8; i++) z += acc[i];
                logit[k] = z;
                m = z > m ? z : m;
            }
            float sum = 0.0f;
            for (int64_t k = 0; k < K; k++)
                if (km[k]) sum += expf(logit[k] - m);
            const float lse = m + logf(sum);
            const int64_t t = y[g * B + b];
            total += lse - logit[t];
            for (int64_t k = 0; k < K; k++) dl[k] = km[k] ? (expf(logit[k] - lse) - (k == t)) / (float)B : 0.0f;
            for (int64_t d = 0; d < D; d++) df[d] = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                if (!km[k]) continue;
                gb[k] += dl[k];
                for (int64_t d = 0; d < D; d++) {
                    gT[k][d] += dl[k] * f[d];
                    df[d] += dl[k] * whT[k][d];
                }
            }
            for (int64_t hw = 0; hw < HW; hw++)
                for (int64_t c = 0; c < C3; c++) da3[((b * HW + hw) * G + g) * C3 + c] = FROM_F32(df[c * HW + hw]);
        }
        loss[g] = total / (float)B;
        for (int64_t d = 0; d < D; d++)
            for (int64_t k = 0; k < K; k++) gwh[(g * D + d) * K + k] = gT[k][d];
        memcpy(gbh + g * K, gb, sizeof gb);
    }
}

#undef VAL
#undef LOAD8
#undef FROM_F32
#undef STORE8
#undef ROUND8
