/* Groupwise W4A8 GEMM for x86, bit-identical to torch's reference kernel
 * (aten/src/ATen/native/cpu/int4mm_kernel.cpp, ref_dyn_quant_matmul_4bit_groupwise_kernel), which is
 * what vLLM 0.32's Dynamic4bitLinearKernel runs on x86 for groupwise layers.
 *
 * Built and loaded by arm_int4/x86_w4a8_build.py:
 *   cc -O3 -march=native -ffp-contract=off -fPIC -shared [-fopenmp] x86_w4a8_gemm.c -o libx86w4a8.so
 * -ffp-contract=off: every float step below is one rounding, as in the reference (no fused multiply-add).
 * -fopenmp: the libgomp torch already loaded (same soname) runs the threads; torch.set_num_threads holds.
 *
 * The reference, per output row m and column n:
 *   acc = 0.0f
 *   for each group b (in order):  acc += (float)(sum over k in b of (q[m,k] - zp[m]) * w[n,k]) * scale[n,b]
 *   out = acc * recip[m], clamped to [-FLT_MAX, FLT_MAX]
 * with q int8 activations, w int4 weights in -8..7. The integer sums are exact whatever the order; the
 * float steps happen once per group, in group order, exactly as written.
 *
 * Here: sum (q - zp) * w = sum (q + 128) * w - (128 + zp) * wsum[n,b], with q + 128 an unsigned byte, so
 * one _mm256_maddubs_epi16 (u8 x s8, pairs summed to int16: |pair| <= 2 * 255 * 8 = 4080, never
 * saturating) and one _mm256_madd_epi16 by ones give int32 partial sums.
 *
 * Packed weight layout (wp), for 16-column blocks (N % 16 == 0) and 8-value steps along K (K % 8 == 0):
 *   wp[((nb * K/8 + o) * 2 + h) * 32 + c * 4 + j], h = 0..1 (columns 8h..8h+7 of the block), c = 0..7, j = 0..3:
 *   low nibble  = w[16 nb + 8 h + c, 8 o + j] + 8
 *   high nibble = w[16 nb + 8 h + c, 8 o + 4 + j] + 8
 * wsum[(nb * G + b) * 16 + i] = sum over the group of w[16 nb + i, k] (int16: |sum| <= 8 g, g <= 4096);
 * sc[(nb * G + b) * 16 + i] = the group's scale, bf16 bits (the reference's type; widened to fp32 exactly).
 */
#include <float.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float clampf(float v) {
    /* std::max(v, -FLT_MAX) then std::min(v, FLT_MAX): NaN stays NaN, +-inf become +-FLT_MAX */
    v = (v < -FLT_MAX) ? -FLT_MAX : v;
    v = (FLT_MAX < v) ? FLT_MAX : v;
    return v;
}

static inline float bf16_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline int nibble(const uint8_t *wp, int64_t K, int64_t n, int64_t k) {
    int64_t nb = n / 16, i = n % 16, h = i / 8, c = i % 8, o = k / 8, r = k % 8;
    uint8_t byte = wp[((nb * (K / 8) + o) * 2 + h) * 32 + c * 4 + (r & 3)];
    return (r < 4 ? (byte & 0x0F) : (byte >> 4)) - 8;
}

/* Plain C: the reference's loop order. Columns [n0, n1) of every row. */
static void gemm_plain(int64_t M, int64_t N, int64_t K, int64_t g, const int8_t *q, const int32_t *zp,
                       const float *recip, const uint8_t *wp, const int16_t *wsum, const uint16_t *sc, float *out,
                       int64_t n0, int64_t n1) {
    int64_t G = K / g;
    (void)wsum;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = n0; n < n1; ++n) {
            float acc = 0.0f;
            for (int64_t b = 0; b < G; ++b) {
                int32_t iacc = 0;
                for (int64_t k = b * g; k < (b + 1) * g; ++k)
                    iacc += ((int32_t)q[m * K + k] - zp[m]) * nibble(wp, K, n, k);
                float s = bf16_to_float(sc[((n / 16) * G + b) * 16 + n % 16]);
                float t = (float)iacc * s;
                acc = acc + t;
            }
            out[m * N + n] = clampf(acc * recip[m]);
        }
    }
}

#if defined(__AVX2__)
/* R rows (1..4) x one 16-column block, all groups. */
static inline void tile_avx2(int R, int64_t N, int64_t K, int64_t g, const int8_t *q, const int32_t *zp,
                             const float *recip, const uint8_t *wpb, const int16_t *wsb, const uint16_t *scb,
                             float *out) {
    const int64_t G = K / g, steps = g / 8;
    const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi32((int32_t)0x80808080u);
    __m256 facc[4][2];
    __m256i off[4];
    for (int r = 0; r < 4; ++r) {
        facc[r][0] = facc[r][1] = _mm256_setzero_ps();
        off[r] = _mm256_set1_epi32(r < R ? 128 + zp[r] : 0);
    }
    for (int64_t b = 0; b < G; ++b) {
        __m256i iacc[4][2];
        for (int r = 0; r < 4; ++r) iacc[r][0] = iacc[r][1] = _mm256_setzero_si256();
        const uint8_t *w = wpb + b * steps * 64;
        const int8_t *qb = q + b * g;
        for (int64_t o = 0; o < steps; ++o) {
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + o * 64));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(w + o * 64 + 32));
            __m256i lo0 = _mm256_sub_epi8(_mm256_and_si256(v0, low), eight);
            __m256i hi0 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low), eight);
            __m256i lo1 = _mm256_sub_epi8(_mm256_and_si256(v1, low), eight);
            __m256i hi1 = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low), eight);
            for (int r = 0; r < 4; ++r) {
                if (r >= R) break;
                int32_t a0, a1;
                memcpy(&a0, qb + r * K + o * 8, 4);
                memcpy(&a1, qb + r * K + o * 8 + 4, 4);
                __m256i x0 = _mm256_xor_si256(_mm256_set1_epi32(a0), flip); /* q + 128 as u8 */
                __m256i x1 = _mm256_xor_si256(_mm256_set1_epi32(a1), flip);
                __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(x0, lo0), _mm256_maddubs_epi16(x1, hi0));
                __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(x0, lo1), _mm256_maddubs_epi16(x1, hi1));
                /* two pairs summed: |.| <= 4 * 255 * 8 = 8160, still exact in int16 */
                iacc[r][0] = _mm256_add_epi32(iacc[r][0], _mm256_madd_epi16(p0, ones));
                iacc[r][1] = _mm256_add_epi32(iacc[r][1], _mm256_madd_epi16(p1, ones));
            }
        }
        const __m256i ws0 = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(wsb + b * 16)));
        const __m256i ws1 = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(wsb + b * 16 + 8)));
        /* bf16 -> fp32: the bits shifted up, exact */
        const __m256 s0 = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(scb + b * 16))), 16));
        const __m256 s1 = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(scb + b * 16 + 8))), 16));
        for (int r = 0; r < 4; ++r) {
            if (r >= R) break;
            __m256i i0 = _mm256_sub_epi32(iacc[r][0], _mm256_mullo_epi32(off[r], ws0));
            __m256i i1 = _mm256_sub_epi32(iacc[r][1], _mm256_mullo_epi32(off[r], ws1));
            facc[r][0] = _mm256_add_ps(facc[r][0], _mm256_mul_ps(_mm256_cvtepi32_ps(i0), s0));
            facc[r][1] = _mm256_add_ps(facc[r][1], _mm256_mul_ps(_mm256_cvtepi32_ps(i1), s1));
        }
    }
    const __m256 hi = _mm256_set1_ps(FLT_MAX), lo = _mm256_set1_ps(-FLT_MAX);
    for (int r = 0; r < 4; ++r) {
        if (r >= R) break;
        __m256 rc = _mm256_set1_ps(recip[r]);
        for (int h = 0; h < 2; ++h) {
            __m256 v = _mm256_mul_ps(facc[r][h], rc);
            /* max(v, lo) / min(v, hi) with the reference's NaN behaviour: NaN is the result when v is NaN */
            v = _mm256_blendv_ps(v, lo, _mm256_cmp_ps(v, lo, _CMP_LT_OQ));
            v = _mm256_blendv_ps(v, hi, _mm256_cmp_ps(hi, v, _CMP_LT_OQ));
            _mm256_storeu_ps(out + r * N + h * 8, v);
        }
    }
}

static void gemm_avx2(int64_t M, int64_t N, int64_t K, int64_t g, const int8_t *q, const int32_t *zp,
                      const float *recip, const uint8_t *wp, const int16_t *wsum, const uint16_t *sc, float *out,
                      int64_t n0, int64_t n1) {
    const int64_t G = K / g;
    for (int64_t nb = n0 / 16; nb < n1 / 16; ++nb) {
        const uint8_t *wpb = wp + nb * (K / 8) * 64;
        const int16_t *wsb = wsum + nb * G * 16;
        const uint16_t *scb = sc + nb * G * 16;
        for (int64_t m = 0; m < M; m += 4) {
            int R = (int)(M - m < 4 ? M - m : 4);
            tile_avx2(R, N, K, g, q + m * K, zp + m, recip + m, wpb, wsb, scb, out + m * N + nb * 16);
        }
    }
}
#endif

/* 1 when the SIMD path is compiled in (AVX2), 0 for plain C only. */
int x86_w4a8_simd(void) {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* out[M, N] fp32 = the reference's result before bias; q int8 [M, K]; zp int32 [M]; recip fp32 [M].
 * simd = 0 forces the plain C loops. Needs N % 16 == 0, K % g == 0, g % 8 == 0, g <= 4096. Threads split the
 * 16-column blocks. */
void x86_w4a8_gemm(int64_t M, int64_t N, int64_t K, int64_t g, const int8_t *q, const int32_t *zp,
                   const float *recip, const uint8_t *wp, const int16_t *wsum, const uint16_t *sc, float *out,
                   int simd) {
    const int64_t NB = N / 16;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (NB > 1 && M * N * K > (1 << 16))
#endif
    for (int64_t nb = 0; nb < NB; ++nb) {
#if defined(__AVX2__)
        if (simd) {
            gemm_avx2(M, N, K, g, q, zp, recip, wp, wsum, sc, out, nb * 16, nb * 16 + 16);
            continue;
        }
#endif
        (void)simd;
        gemm_plain(M, N, K, g, q, zp, recip, wp, wsum, sc, out, nb * 16, nb * 16 + 16);
    }
}
