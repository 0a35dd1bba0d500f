/* Group quantization of float32 rows at several bit widths in one pass (attentionpack/kernels/ops.py:
   `quantize_widths`), the same arithmetic as the torch reference attentionpack/parts/quant.py `quantize_widths`:
   per group of g consecutive elements (the row padded by repeating its last element) the minimum is rounded down
   to float16, then per width the scale (range / levels) rounded up to float16, and each code is
   round-half-even((x - min) / scale) clamped to [0, levels]; codes are packed as `pack` lays them out (common.h).
   Rows go to torch's OpenMP threads. */
#include <math.h>
#include "common.h"

typedef uint8_t u8x16 __attribute__((vector_size(16), aligned(1)));  /* 16 codes, stored unaligned */

/* Whether any lane of a comparison's mask is set. */
static inline int any16(i16 mask) {
#if defined(__AVX512F__)
    return _mm512_test_epi32_mask((__m512i)mask, (__m512i)mask) != 0;
#else
    i16 m = mask;
    int32_t any = 0;
    for (int i = 0; i < 16; i++) any |= m[i];
    return any != 0;
#endif
}

/* The largest (largest = 1) or the smallest of a vector's 16 lanes, as a tree (NaN lanes are flagged apart by the
   caller). */
static inline float hextreme16(v16 v, const int largest) {
#if defined(__AVX512F__)
    return largest ? _mm512_reduce_max_ps((__m512)v) : _mm512_reduce_min_ps((__m512)v);
#else
    for (int w = 8; w > 0; w /= 2)
        for (int i = 0; i < w; i++) v[i] = (largest ? v[i + w] > v[i] : v[i + w] < v[i]) ? v[i + w] : v[i];
    return v[0];
#endif
}

/* The float16 next to h toward +inf (up) or -inf when `move`, else h: torch.nextafter on float16, without branches
   (whether a rounding moves is data-dependent: as a branch it was mispredicted about every other group). */
static inline _Float16 f16_next_if(_Float16 h, int up, int move) {
    uint16_t u;
    memcpy(&u, &h, sizeof u);
    const uint16_t mag = u & 0x7fff;
    const int away = ((u >> 15) == 0) == up;          /* moving away from zero */
    uint16_t n = away ? (mag < 0x7c00 ? u + 1 : u)    /* an infinity stays */
                      : (mag == 0 ? (up ? 0x0001 : 0x8001) : u - 1);
    n = mag > 0x7c00 ? u : n;                          /* NaN */
    u = move ? n : u;
    memcpy(&h, &u, sizeof h);
    return h;
}

/* out[i] = x[i] rounded to float16 toward +inf (up) or -inf: torch's rounding to nearest followed by a step to the
   other neighbour where that landed on the wrong side. x86's conversion takes the direction itself (F16C,
   AVX-512), many values per instruction. */
static void f16_directed(const float *restrict x, int64_t n, int up, _Float16 *restrict out) {
    int64_t i = 0;
    /* W values a step; the rounding mode is an immediate operand, hence one loop per direction */
#define DIRECTED(W, LOAD, CVT, STORE, T, MODE) \
    for (; i + W <= n; i += W) STORE((T *)(out + i), CVT(LOAD(x + i), MODE | _MM_FROUND_NO_EXC))
#if defined(__AVX512F__)
    if (up) DIRECTED(16, _mm512_loadu_ps, _mm512_cvtps_ph, _mm256_storeu_si256, __m256i, _MM_FROUND_TO_POS_INF);
    else DIRECTED(16, _mm512_loadu_ps, _mm512_cvtps_ph, _mm256_storeu_si256, __m256i, _MM_FROUND_TO_NEG_INF);
#elif defined(__F16C__)
    if (up) DIRECTED(8, _mm256_loadu_ps, _mm256_cvtps_ph, _mm_storeu_si128, __m128i, _MM_FROUND_TO_POS_INF);
    else DIRECTED(8, _mm256_loadu_ps, _mm256_cvtps_ph, _mm_storeu_si128, __m128i, _MM_FROUND_TO_NEG_INF);
#endif
#undef DIRECTED
    for (; i < n; i++) {
        const _Float16 h = (_Float16)x[i];
        out[i] = f16_next_if(h, up, up ? (float)h < x[i] : (float)h > x[i]);
    }
}

/* out[i] = the codes q[k * nb + i] of the PER planes, plane k in bits [k * B, (k + 1) * B) (`pack`). */
static inline __attribute__((always_inline)) void pack_planes(const uint8_t *restrict q, int64_t nb, const int PER,
                                                              const int B, uint8_t *restrict out) {
    for (int64_t i = 0; i < nb; i++) {
        uint8_t byte = 0;
        for (int k = 0; k < PER; k++) byte |= (uint8_t)(q[k * nb + i] << (k * B));
        out[i] = byte;
    }
}

/* x (rows, L) contiguous; groups of g elements, G of them per row (G * g >= L). For width w (bits[w]):
   codes_at[w] -> uint8 (rows, nb_w) with nb_w = ceil(G * g / per) bytes, per = 8 / bits; scales_at[w] -> float16
   (rows, G); mins float16 (rows, G). *bad is set when a minimum or a scale is not finite (the caller raises).
   Rows go in blocks of at least 64 groups: each group's range first, then the minimums and every width's scales
   converted for the whole block at once, then the codes (a group's conversions, one group at a time between its
   codes, had been most of the time: for values, quantized per token, a row is 2 groups). */
void ap_quantize(const float *restrict x, int64_t rows, int64_t L, int64_t g, int64_t G, const int64_t *bits,
                 int64_t nw, const int64_t *codes_at, const int64_t *scales_at, _Float16 *restrict mins,
                 int64_t *bad) {
    const int64_t n = G * g, RB = G >= 64 ? 1 : (64 + G - 1) / G, blocks = (rows + RB - 1) / RB;
    const int padded = n > L;  /* the last group overruns each row: it repeats the row's last element */
    int64_t flag = 0;
#pragma omp parallel if (rows * L >= 16 * MIN_PARALLEL) reduction(| : flag)
    {
        uint8_t *q = (uint8_t *)malloc(n + 8);  /* one width's codes of one row, padded to whole bytes */
        float *v = (float *)malloc(sizeof(float) * RB * (g + 1));  /* the block's padded last groups */
        float *st = (float *)malloc(sizeof(float) * 4 * RB * G);
#pragma omp for schedule(static)
        for (int64_t bk = 0; bk < blocks; bk++) {
            const int64_t r0 = bk * RB, nr = rows - r0 < RB ? rows - r0 : RB, ng = nr * G;
            float *restrict lo = st, *restrict sp = st + RB * G, *restrict dv = st + 2 * RB * G,
                            *restrict inv = st + 3 * RB * G;  /* per group of the block */
            for (int64_t rr = 0; padded && rr < nr; rr++) {
                const float *row = x + (r0 + rr) * L;
                for (int64_t e = 0; e < g; e++) v[rr * (g + 1) + e] = row[(G - 1) * g + e < L ? (G - 1) * g + e : L - 1];
            }
#define GROUP_AT(rr, gi) (padded && (gi) == G - 1 ? v + (rr) * (g + 1) : x + (r0 + (rr)) * L + (gi) * g)
            for (int64_t i = 0; i < ng; i++) {  /* pass 1: each group's range */
                const float *src = GROUP_AT(i / G, i % G);
                float a = src[0], b = src[0];
                int nan = 0;
                int64_t e = 0;
                if (g >= 16) {  /* 16 lanes at a time, then the lanes (trees) and the rest in order */
                    v16 l = *(const v16 *)src, h = l;
                    i16 odd = l != l;
                    for (e = 16; e + 16 <= g; e += 16) {
                        const v16 y = *(const v16 *)(src + e);
                        l = select16(y < l, y, l);
                        h = select16(y > h, y, h);
                        odd |= y != y;
                    }
                    a = hextreme16(l, 0);
                    b = hextreme16(h, 1);
                    nan = any16(odd);
                }
                for (; e < g; e++) {
                    const float y = src[e];
                    nan |= y != y;
                    a = y < a ? y : a;
                    b = y > b ? y : b;
                }
                flag |= nan;
                lo[i] = a;
                sp[i] = b;
            }
            _Float16 *restrict m16 = mins + r0 * G;
            f16_directed(lo, ng, 0, m16);  /* the minimums, rounded down */
            for (int64_t i = 0; i < ng; i++) {
                lo[i] = (float)m16[i];
                flag |= !isfinite(lo[i]);
                sp[i] -= lo[i];  /* the span */
            }
            for (int64_t w = 0; w < nw; w++) {
                const int b = (int)bits[w], per = 8 / b, levels = (1 << b) - 1;
                const int64_t nb = (n + per - 1) / per;
                _Float16 *restrict sw = (_Float16 *)scales_at[w] + r0 * G;
                for (int64_t i = 0; i < ng; i++) dv[i] = sp[i] / (float)levels;  /* pass 2: the scales */
                f16_directed(dv, ng, 1, sw);  /* rounded up */
                for (int64_t i = 0; i < ng; i++) {
                    const float sf = (float)sw[i];
                    flag |= !isfinite(sf);
                    dv[i] = sf > 0.f ? sf : 1.f;
                    inv[i] = 1.f / dv[i];
                }
                for (int64_t rr = 0; rr < nr; rr++) {  /* pass 3: each row's codes, then packed */
                    for (int64_t gi = 0; gi < G; gi++) {
                        const float *src = GROUP_AT(rr, gi);
                        const float mf = lo[rr * G + gi], div = dv[rr * G + gi];
                        uint8_t *qw = q + gi * g;
                        int64_t e = 0;
                        if (g >= 16) {  /* 16 lanes, the same codes: (x - min) times 1 / scale is within 3 ulp of
                                           the quotient (codes <= levels + round-off, ulp <= 2^-16), so it rounds
                                           alike unless a lane lies within 2^-14 of a half, where the vector is
                                           divided instead (rare: a division per 16 codes was most of this loop) */
                            const v16 vm = (v16){0} + mf, vd = (v16){0} + div, vr = (v16){0} + inv[rr * G + gi];
                            const v16 top = (v16){0} + (float)levels, near = (v16){0} + (0.5f - 0x1p-14f);
                            for (; e + 16 <= g; e += 16) {
                                const v16 t = *(const v16 *)(src + e) - vm;
                                const v16 p = t * vr;
                                v16 c = round_even16(p);
                                const v16 off = p - c;
                                if (any16((off > near) | (off < -near))) c = round_even16(t / vd);
                                c = select16(c < 0.f, (v16){0}, c);
                                c = select16(c > top, top, c);
                                *(u8x16 *)(qw + e) = __builtin_convertvector(__builtin_convertvector(c, i16), u8x16);
                            }
                        }
                        for (; e < g; e++) {
                            float c = nearbyintf((src[e] - mf) / div);
                            c = c < 0.f ? 0.f : c > (float)levels ? (float)levels : c;
                            qw[e] = (uint8_t)c;
                        }
                    }
                    uint8_t *out = (uint8_t *)codes_at[w] + (r0 + rr) * nb;  /* plane k: codes [k * nb, (k + 1) * nb) */
                    memset(q + n, 0, (size_t)(nb * per - n));
                    if (per == 1) memcpy(out, q, (size_t)nb);
                    else if (per == 2) pack_planes(q, nb, 2, 4, out);
                    else pack_planes(q, nb, 4, 2, out);
                }
            }
#undef GROUP_AT
        }
        free(q);
        free(v);
        free(st);
    }
    *bad = flag;
}
