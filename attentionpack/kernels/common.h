#pragma once
/* Helpers shared by the CPU kernels (part_ops.c, decode.c); see attentionpack/kernels/__init__.py.

   Codes are packed as attentionpack.codecs.quant.pack lays them out: a row of n codes (padded to per * nb,
   per = 8 / bits) is cut into `per` planes of nb consecutive codes; byte i of the row holds code k * nb + i in
   bits [k * bits, (k + 1) * bits). Scales and minimums are the stored float16 (_Float16).
   Built with OpenMP when the compiler has it: the process then shares torch's
   libgomp (same soname), so the kernels split their tokens over torch's threads (torch.set_num_threads) instead
   of competing with them; small calls stay on one thread. */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
static int omp_in_parallel(void) { return 0; }
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };  /* dtypes of the float arrays the kernels read (kernels/__init__.py: FLOAT_CODES) */

/* n floats at element `at` of the dt-typed array at address `base`: the array itself for float32, else the
   elements converted into buf (bfloat16 is the top half of a float32; float16 through _Float16). */
static inline const float *floats_at(int64_t base, int dt, int64_t at, int64_t n, float *restrict buf) {
    if (dt == DT_F32) return (const float *)base + at;
    if (dt == DT_F16) {  /* vcvtph2ps where the target has it (gcc's generic vector conversion goes lane by lane) */
        const _Float16 *restrict src = (const _Float16 *)base + at;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(buf + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
        for (; i < n; i++) buf[i] = (float)src[i];
    } else {
        const uint16_t *restrict src = (const uint16_t *)base + at;
        for (int64_t i = 0; i < n; i++) {
            const union { uint32_t u; float f; } c = {.u = (uint32_t)src[i] << 16};
            buf[i] = c.f;
        }
    }
    return buf;
}

/* Per-thread scratch memory, one buffer per call site (`slot`), so that nested users never share one: grown when a
   call needs more, kept for the thread's next call instead of a malloc and free per work item (at 4k tokens those
   were ~8% of a decoding step's attention). Contents are not preserved between calls. */
enum { SCR_ITEM, SCR_KEYS, SCR_TILE, SCR_COEF, SCR_VALS, SCR_BUF, SCR_ACC, SCR_MACC, SCR_XS, SCR_SLOTS };
static __thread void *scratch_at[SCR_SLOTS];
static __thread size_t scratch_cap[SCR_SLOTS];
static inline void *scratch(int slot, size_t bytes) {
    if (bytes > scratch_cap[slot]) {
        free(scratch_at[slot]);
        scratch_cap[slot] = bytes + bytes / 4 + 256;
        scratch_at[slot] = malloc(scratch_cap[slot]);
    }
    return scratch_at[slot];
}

#define MIN_PARALLEL 1024  /* tokens x rows below which a call stays on one thread */

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64), aligned(4)));

/* The sum of a vector's 16 lanes, as a tree (the scalar loop's 16 dependent adds take longer). */
static inline float hsum16(v16 v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float h[8];
    for (int i = 0; i < 8; i++) h[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; i++) h[i] += h[i + 4];
    return (h[0] + h[2]) + (h[1] + h[3]);
#endif
}

static inline v16 select16(i16 mask, v16 yes, v16 no) {  /* lanes of `yes` where mask is set, else of `no` */
    return (v16)(((i16)yes & mask) | ((i16)no & ~mask));
}

/* Each lane rounded to the nearest integer, ties to even, for |x| < 2^22: adding and taking away 1.5 * 2^23 leaves
   no fraction bits (the compiler keeps both operations: no -ffast-math). */
static inline v16 round_even16(v16 x) {
    return (x + 12582912.f) - 12582912.f;
}

/* ---- Register-blocked paths (the common case: groups and planes in whole 16-lane vectors) ----
   The codes are converted to floats in registers and used at once; nothing is written to a float tile. */

/* Codes are used centred, code - MID(bits) in [-MID, MID], with each group's minimum moved to its midpoint
   (min + MID * scale): the two sums a score or a value splits into are then as small as the dequantized terms,
   and so are their rounding errors (uncentred, they cancel each other by up to 2x the result). */
#define MID(bits) (0.5f * (float)((1 << (bits)) - 1))

#if defined(__AVX512F__)
/* Centred value of each 4-bit index: for 4-bit codes code - MID(4); for 2-bit codes (index & 3) - MID(2), the index's
   upper two bits belonging to the next plane. */
static inline __m512 centred_table(int bits) {
    return bits == 4 ? _mm512_setr_ps(-7.5f, -6.5f, -5.5f, -4.5f, -3.5f, -2.5f, -1.5f, -0.5f, 0.5f, 1.5f, 2.5f, 3.5f,
                                      4.5f, 5.5f, 6.5f, 7.5f)
                     : _mm512_setr_ps(-1.5f, -0.5f, 0.5f, 1.5f, -1.5f, -0.5f, 0.5f, 1.5f, -1.5f, -0.5f, 0.5f, 1.5f,
                                      -1.5f, -0.5f, 0.5f, 1.5f);
}
#endif

/* 16 codes at byte `at` of a packed row, plane shift `shift`, as centred floats. Intrinsics where the target has
   them: gcc's generic vector conversion from bytes to floats goes one lane at a time. */
static inline __attribute__((always_inline)) v16 codes16(const uint8_t *restrict at, int shift, int bits) {
#if defined(__AVX512F__)
    if (bits == 4 || bits == 2) {  /* a table lookup on the low 4 bits replaces the mask, conversion and centring */
        const __m512i i = _mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)at)),
                                           _mm_cvtsi32_si128(shift));
        return (v16)_mm512_permutexvar_ps(i, centred_table(bits));
    }
    const __m512i w = _mm512_and_si512(_mm512_srl_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)at)),
                                                        _mm_cvtsi32_si128(shift)),
                                       _mm512_set1_epi32((1 << bits) - 1));
    return (v16)_mm512_cvtepi32_ps(w) - MID(bits);
#elif defined(__AVX2__)
    const __m128i raw = _mm_loadu_si128((const __m128i *)at), cnt = _mm_cvtsi32_si128(shift);
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    const v8 lo = (v8)_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(_mm256_cvtepu8_epi32(raw), cnt), mask));
    const v8 hi = (v8)_mm256_cvtepi32_ps(
        _mm256_and_si256(_mm256_srl_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(raw, 8)), cnt), mask));
    v16 out;
    for (int i = 0; i < 8; i++) { out[i] = lo[i]; out[8 + i] = hi[i]; }
    return out - MID(bits);
#else
    v16 out;
    for (int i = 0; i < 16; i++) out[i] = (float)((at[i] >> shift) & ((1 << bits) - 1));
    return out - MID(bits);
#endif
}

/* The 16 codes at byte `at` of planes 0 and 1 (shifts 0 and bits) from one load. */
static inline __attribute__((always_inline)) void codes16_pair(const uint8_t *restrict at, int bits, v16 *lo,
                                                               v16 *hi) {
#if defined(__AVX512F__)
    if (bits == 4) {
        const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)at));
        *lo = (v16)_mm512_permutexvar_ps(z, centred_table(4));
        *hi = (v16)_mm512_permutexvar_ps(_mm512_srli_epi32(z, 4), centred_table(4));
        return;
    }
#endif
    *lo = codes16(at, 0, bits);
    *hi = codes16(at, bits, bits);
}

/* sum_i a[i] * b[i], 8 lanes at a time (exact keys' scores in decode.c; a group's midpoints in scores_span_reg). */
static inline float dot(const float *restrict a, const float *restrict b, int64_t n) {
    v8 acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc += *(const v8 *)(a + i) * *(const v8 *)(b + i);
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Every row's codes of tokens [t0, t0 + len) (R rows quantized along tokens, nb bytes apart) lie in its own page,
   beyond what the hardware prefetchers follow: ask for all their cache lines first, so the misses overlap. */
static inline void prefetch_span(const uint8_t *codes, int64_t R, int64_t nb, int bits, int64_t t0, int64_t len) {
    for (int k = 0; k < 8 / bits; k++) {
        const int64_t lo = t0 > k * nb ? t0 - k * nb : 0, hi = t0 + len < (k + 1) * nb ? t0 + len - k * nb : nb;
        for (int64_t j = 0; j < R && lo < hi; j++)
            for (int64_t at = lo; at < hi; at += 64) __builtin_prefetch(codes + j * nb + at);
    }
}

#define RR_MAX 8  /* query rows summed at once in scores_rows */

/* Scores of `rows` query rows for tokens [t, t + n), n <= 16 * NV, of R rows quantized along tokens, all in one
   group: o[r * os + i] = cm[r] + sum_j xs[r * R + j] * (code[j, t + i] - MID), where xs already holds this
   group's scales and cm its (centred) minimums. When the tokens lie in one plane, each row of codes is NV vector
   loads from one stretch of memory (the rows are pages apart: the longer the stretch, the fewer pages per
   token). */
static inline __attribute__((always_inline)) void scores_rows(
        const uint8_t *restrict codes, const float *restrict xs, const float *restrict cm, const int rows,
        const int NV, int64_t R, int64_t nb, const int bits, int64_t t, int64_t n, float *restrict o, int64_t os) {
    v16 acc[RR_MAX][4];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (v16){0} + cm[r];
    const int64_t k = t / nb;
    /* the vector path whenever the block's 16 * NV code slots lie in one plane, also for a block of fewer tokens
       (a row's last): the slots past them hold the quantizer's padding, whose scores are not stored */
    if (t + 16 * NV <= (k + 1) * nb) {
        const uint8_t *at = codes + (t - k * nb);
        const int shift = (int)k * bits;
        for (int64_t j = 0; j < R; j++) {
            v16 c[4];
            for (int v = 0; v < NV; v++) c[v] = codes16(at + j * nb + 16 * v, shift, bits);
            for (int r = 0; r < rows; r++) {
                const float x = xs[r * R + j];
                for (int v = 0; v < NV; v++) acc[r][v] += x * c[v];
            }
        }
    } else {  /* across a plane boundary, or the last tokens of the row */
        const int mask = (1 << bits) - 1;
        for (int64_t j = 0; j < R; j++) {
            float tmp[64] __attribute__((aligned(64))) = {0};
            for (int64_t i = 0; i < n; i++) {
                const int64_t tt = t + i, kk = tt / nb;
                tmp[i] = (float)((codes[j * nb + tt - kk * nb] >> (kk * bits)) & mask) - MID(bits);
            }
            for (int r = 0; r < rows; r++) {
                const float x = xs[r * R + j];
                for (int v = 0; v < NV; v++) acc[r][v] += x * *(const v16 *)(tmp + 16 * v);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < NV; v++) {
            const int64_t m = n - 16 * v;
            if (m >= 16) {
                *(v16 *)(o + r * os + 16 * v) = acc[r][v];
            } else if (m > 0) {
                float tmp[16] __attribute__((aligned(64)));
                *(v16 *)tmp = acc[r][v];
                for (int64_t i = 0; i < m; i++) o[r * os + 16 * v + i] = tmp[i];
            }
        }
}

/* scores_span for groups of whole 32-token stretches (group % 32 == 0): per group, each query row times the group's
   scales (xs) and midpoints (cm), then 64 tokens x up to 4 rows (32 x up to RR_MAX) at a time straight from the
   codes. Groups of 16 take scores_span's tile: there the scaled queries cost more than the tile saves. */
static inline __attribute__((always_inline)) void scores_span_reg(
        const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
        const float *restrict x, int64_t M, int64_t R, int64_t nb, int64_t G, int64_t group, const int bits,
        int64_t t0, int64_t len, float *restrict o, int64_t os) {
    prefetch_span(codes, R, nb, bits, t0, len);
    const int64_t chunks = (M + RR_MAX - 1) / RR_MAX;
    float *xs = (float *)scratch(SCR_XS, sizeof(float) * (M * R + M + 2 * R));
    float *cm = xs + M * R, *sc = cm + M, *mid = sc + R;
    for (int64_t g0 = t0; g0 < t0 + len; g0 += group) {  /* t0 is a multiple of group */
        const int64_t g = g0 / group, end = g0 + group < t0 + len ? g0 + group : t0 + len;
        for (int64_t j = 0; j < R; j++) {  /* the group's scales and midpoints, once for every query row */
            sc[j] = (float)scales[j * G + g];
            mid[j] = (float)mins[j * G + g] + MID(bits) * sc[j];
        }
        for (int64_t m = 0; m < M; m++) {
            for (int64_t j = 0; j < R; j++) xs[m * R + j] = x[m * R + j] * sc[j];
            cm[m] = dot(x + m * R, mid, R);
        }
        for (int64_t ch = 0, m0 = 0; ch < chunks; ch++) {  /* rows split evenly: 9 -> 5 + 4, not 8 + 1 */
            const int64_t m1 = M * (ch + 1) / chunks, rows = m1 - m0;
            /* 4 vectors of 16 tokens x up to 4 rows, or 2 x up to 8 (<= 16 sums); 2 for groups of 32 tokens;
               fewer where a plane is shorter (a 64-token decode chunk's 4-bit plane holds 32 tokens), so that a
               block never straddles two planes (that takes the scalar path) */
            int nv = rows <= 4 && group % 64 == 0 ? 4 : 2;
            while (nv > 1 && nb % (16 * nv) != 0) nv /= 2;
            for (int64_t t = g0; t < end; t += 16 * nv) {
                const int64_t n = end - t < 16 * nv ? end - t : 16 * nv;
                float *dst = o + m0 * os + t - t0;
#define ROWS_UP_TO_8(NV) do { switch (rows) { \
        case 1: ROWS(1, NV); break; case 2: ROWS(2, NV); break; case 3: ROWS(3, NV); break; \
        case 4: ROWS(4, NV); break; case 5: ROWS(5, NV); break; case 6: ROWS(6, NV); break; \
        case 7: ROWS(7, NV); break; default: ROWS(8, NV); break; } } while (0)
#define ROWS(K, NV) scores_rows(codes, xs + m0 * R, cm + m0, K, NV, R, nb, bits, t, n, dst, os)
                if (nv == 4) {
                    switch (rows) {
                        case 1: ROWS(1, 4); break;
                        case 2: ROWS(2, 4); break;
                        case 3: ROWS(3, 4); break;
                        default: ROWS(4, 4); break;
                    }
                } else if (nv == 2) {
                    ROWS_UP_TO_8(2);
                } else {
                    ROWS_UP_TO_8(1);
                }
#undef ROWS
#undef ROWS_UP_TO_8
            }
            m0 = m1;
        }
    }
}

#define MR_MAX 4  /* weight rows per pass of mix_reg (x 4 vectors of 16 channels: 16 sums in registers) */

/* Values quantized per token, for rows of W channels cut in blocks of 64 (nb and group multiples of 16, group
   dividing 64 or a multiple of it): per block and up to MR_MAX weight rows, the 4 x rows sums stay in registers
   while the tokens stream by; each token's scale is folded into its weight. Same contract as mix_core; inlined
   with bits, rows and group as constants. */
static inline __attribute__((always_inline)) void mix_reg(
        const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
        const float *restrict p, float *restrict out, int64_t N, int64_t M, int64_t T, int64_t nb, int64_t G,
        const int64_t group, int64_t L, const int bits, int64_t ps, int64_t t_lo, int64_t t_hi, const int rows) {
    const int64_t W = G * group;
    enum { GPB_MAX = 4 };
    const int gpb = group >= 64 ? 1 : (int)(64 / group);  /* groups per block of 64 channels */
    for (int64_t n = 0; n < N; n++)
        for (int64_t cb = 0; cb < W; cb += 64) {
            const int64_t k0 = cb / nb, k1 = (cb + 16) / nb, k2 = (cb + 32) / nb, k3 = (cb + 48) / nb;
            const int sh0 = (int)k0 * bits, sh1 = (int)k1 * bits, sh2 = (int)k2 * bits, sh3 = (int)k3 * bits;
            const int64_t o0 = cb - k0 * nb, o1 = cb + 16 - k1 * nb, o2 = cb + 32 - k2 * nb, o3 = cb + 48 - k3 * nb;
            const int64_t g0 = cb / group;
            const int paired = o0 == o2 && o1 == o3 && sh0 == 0 && sh1 == 0 && sh2 == bits && sh3 == bits;
            for (int64_t m0 = 0; m0 < M; m0 += rows) {
                const int64_t rr = M - m0 < rows ? M - m0 : rows;
                v16 a0[MR_MAX], a1[MR_MAX], a2[MR_MAX], a3[MR_MAX];
                float macc[MR_MAX][GPB_MAX];
                float pr[MR_MAX];
                for (int r = 0; r < rows; r++) {
                    a0[r] = a1[r] = a2[r] = a3[r] = (v16){0};
                    for (int q = 0; q < GPB_MAX; q++) macc[r][q] = 0.f;
                }
                const float *pn = p + (n * M + m0) * ps;
                for (int64_t t = t_lo; t < t_hi; t++) {
                    const uint8_t *row = codes + (n * T + t) * nb;
                    const _Float16 *s = scales + (n * T + t) * G + g0, *mn = mins + (n * T + t) * G + g0;
                    __builtin_prefetch(row + 32 * nb);  /* 32 tokens ahead */
                    __builtin_prefetch(s + 32 * G);
                    __builtin_prefetch(mn + 32 * G);
                    v16 c0, c1, c2, c3;
                    if (paired) {  /* 64 channels of two planes: each 16-byte load gives two vectors */
                        codes16_pair(row + o0, bits, &c0, &c2);
                        codes16_pair(row + o1, bits, &c1, &c3);
                    } else {
                        c0 = codes16(row + o0, sh0, bits), c1 = codes16(row + o1, sh1, bits);
                        c2 = codes16(row + o2, sh2, bits), c3 = codes16(row + o3, sh3, bits);
                    }
                    float sq[GPB_MAX], mq[GPB_MAX];
                    for (int q = 0; q < gpb; q++) {
                        sq[q] = (float)s[q];
                        mq[q] = (float)mn[q] + MID(bits) * sq[q];
                    }
                    for (int r = 0; r < rows; r++) pr[r] = r < rr ? pn[r * ps + t] : 0.f;
                    for (int r = 0; r < rows; r++) {
                        /* vector v's group within the block: v * 16 / group (0 for groups of 64 or more) */
                        const float w0 = pr[r] * sq[0], w1 = pr[r] * sq[group >= 32 ? 0 : 1],
                                    w2 = pr[r] * sq[group >= 64 ? 0 : group == 32 ? 1 : 2],
                                    w3 = pr[r] * sq[group >= 64 ? 0 : group == 32 ? 1 : 3];
                        a0[r] += w0 * c0; a1[r] += w1 * c1; a2[r] += w2 * c2; a3[r] += w3 * c3;
                        for (int q = 0; q < gpb; q++) macc[r][q] += pr[r] * mq[q];
                    }
                }
                for (int64_t r = 0; r < rr; r++) {
                    float *dst = out + (n * M + m0 + r) * L;
                    const v16 sums[4] = {a0[r], a1[r], a2[r], a3[r]};
                    for (int v = 0; v < 4; v++) {
                        const int64_t c = cb + 16 * v;
                        const v16 sum = sums[v] + macc[r][group >= 64 ? 0 : v * 16 / group];
                        if (c + 16 <= L) {
                            *(v16 *)(dst + c) = sum;
                        } else {
                            for (int64_t i = 0; c + i < L && i < 16; i++) dst[c + i] = sum[i];
                        }
                    }
                }
            }
        }
}


/* One packed row of codes -> floats: plane k (codes k * nb ... ) from bits [k * bits, (k + 1) * bits) of each byte. */
static inline __attribute__((always_inline)) void unpack_row(const uint8_t *restrict row, int64_t nb, int bits,
                                                            float *restrict buf) {
    const int per = 8 / bits;
    const int mask = (1 << bits) - 1;
    for (int k = 0; k < per; k++) {
        float *dst = buf + k * nb;
        const int shift = k * bits;
        for (int64_t i = 0; i < nb; i++) dst[i] = (float)((row[i] >> shift) & mask);
    }
}

/* Values quantized per token (groups along each token's channels), weighted sum over tokens:
   codes (N, T, nb), scales/mins (N, T, G), p (N, M, T) with rows ps floats apart -> out (N, M, L), L <= G * group:
   out[n, m, c] = sum_t p[n, m, t] * (scales[n, t, c / group] * code[n, t, c] + mins[n, t, c / group]).
   Tokens go TU at a time (each token's scale folded into its weight), so every load and store of the
   accumulator row carries TU multiply-adds; `mix_core` is inlined with W, group and bits as constants for the
   common head dims so that the loops over channels are unrolled. */
#define TU 4
static inline __attribute__((always_inline)) void mix_core(
        const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
        const float *restrict p, float *restrict out, int64_t N, int64_t M, int64_t T, int64_t nb, int64_t G,
        int64_t group, int64_t L, int bits, int64_t ps, int64_t t_lo, int64_t t_hi, float *restrict buf,
        float *restrict acc, float *restrict macc) {
    const int64_t W = G * group;
    const int64_t S = (8 / bits) * nb;  /* stride of one unpacked token in buf (>= W) */
    for (int64_t n = 0; n < N; n++) {
        memset(acc, 0, sizeof(float) * M * W);
        memset(macc, 0, sizeof(float) * M * G);
        const float *pn = p + n * M * ps;
        int64_t t = t_lo;
        for (; t + TU <= t_hi; t += TU) {
            for (int u = 0; u < TU; u++) unpack_row(codes + (n * T + t + u) * nb, nb, bits, buf + u * S);
            const _Float16 *s = scales + (n * T + t) * G, *mn = mins + (n * T + t) * G;  /* TU rows of G */
            for (int64_t m = 0; m < M; m++) {
                const float *pm = pn + m * ps + t;
                float *restrict am = acc + m * W;
                for (int64_t g = 0; g < G; g++) {
                    const float w0 = pm[0] * s[g], w1 = pm[1] * s[G + g], w2 = pm[2] * s[2 * G + g],
                                w3 = pm[3] * s[3 * G + g];
                    const float *b0 = buf + g * group, *b1 = b0 + S, *b2 = b1 + S, *b3 = b2 + S;
                    for (int64_t c = 0; c < group; c++)
                        am[g * group + c] += w0 * b0[c] + w1 * b1[c] + w2 * b2[c] + w3 * b3[c];
                    macc[m * G + g] += pm[0] * mn[g] + pm[1] * mn[G + g] + pm[2] * mn[2 * G + g] + pm[3] * mn[3 * G + g];
                }
            }
        }
        for (; t < t_hi; t++) {
            const _Float16 *s = scales + (n * T + t) * G, *mn = mins + (n * T + t) * G;
            unpack_row(codes + (n * T + t) * nb, nb, bits, buf);
            for (int64_t m = 0; m < M; m++) {
                const float w = pn[m * ps + t];
                float *restrict am = acc + m * W;
                for (int64_t g = 0; g < G; g++) {
                    const float ws = w * s[g];
                    for (int64_t c = 0; c < group; c++) am[g * group + c] += ws * buf[g * group + c];
                    macc[m * G + g] += w * mn[g];
                }
            }
        }
        for (int64_t m = 0; m < M; m++)
            for (int64_t c = 0; c < L; c++)
                out[(n * M + m) * L + c] = acc[m * W + c] + macc[m * G + c / group];
    }
}

/* One thread's share: tokens [t_lo, t_hi) of every row into `dst` (N, M, L). */
static void mix_range(const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
                      const float *restrict p, float *restrict dst, int64_t N, int64_t M, int64_t T, int64_t nb,
                      int64_t G, int64_t group, int64_t L, int bits, int64_t ps, int64_t t_lo, int64_t t_hi) {
    const int64_t W = G * group;
    float *out = dst;
    /* where it measured faster than mix_core: 4 bits, groups of 64+ channels, or of 32 for a decoding step's rows */
    if (bits == 4 && W % 64 == 0 && nb % 16 == 0 && (group % 64 == 0 || (group == 32 && M <= 16))) {
#define REG(BITS, ROWS, GR) mix_reg(codes, scales, mins, p, out, N, M, T, nb, G, GR, L, BITS, ps, t_lo, t_hi, ROWS)
#define REGS(BITS, GR) do { if (M == 1) REG(BITS, 1, GR); else if (M == 2) REG(BITS, 2, GR); \
                            else if (M == 3) REG(BITS, 3, GR); else REG(BITS, 4, GR); } while (0)
        if (group == 64) REGS(4, 64);
        else if (group == 32) REGS(4, 32);
        else if (group == 128) REGS(4, 128);
        else REGS(4, group);
#undef REGS
#undef REG
        return;
    }
    float *buf = (float *)scratch(SCR_BUF, sizeof(float) * TU * (8 * nb > W ? 8 * nb : W));
    float *acc = (float *)scratch(SCR_ACC, sizeof(float) * M * W);
    float *macc = (float *)scratch(SCR_MACC, sizeof(float) * M * G);
#define MIX(NB, GG, GR, BITS) \
    mix_core(codes, scales, mins, p, out, N, M, T, NB, GG, GR, L, BITS, ps, t_lo, t_hi, buf, acc, macc)
    if (bits == 4 && W == 64 && group == 32 && nb == 32) MIX(32, 2, 32, 4);
    else if (bits == 4 && W == 64 && group == 64 && nb == 32) MIX(32, 1, 64, 4);
    else if (bits == 4 && W == 128 && group == 32 && nb == 64) MIX(64, 4, 32, 4);
    else if (bits == 4 && W == 128 && group == 64 && nb == 64) MIX(64, 2, 64, 4);
    else if (bits == 8 && W == 64 && group == 32 && nb == 64) MIX(64, 2, 32, 8);
    else if (bits == 8 && W == 128 && group == 32 && nb == 128) MIX(128, 4, 32, 8);
    else if (bits == 2 && W == 64 && group == 32 && nb == 16) MIX(16, 2, 32, 2);
    else if (bits == 2 && W == 128 && group == 32 && nb == 32) MIX(32, 4, 32, 2);
    else if (bits == 4 && W == 256 && group == 32 && nb == 128) MIX(128, 8, 32, 4);  /* Gemma 3's 256-wide head */
    else if (bits == 8 && W == 256 && group == 32 && nb == 256) MIX(256, 8, 32, 8);
    else if (bits == 2 && W == 256 && group == 32 && nb == 64) MIX(64, 8, 32, 2);
    /* the budget's wide groups (budget/candidates.py WIDE_GROUP): one group per 64-wide head, two per 256-wide */
    else if (bits == 2 && W == 64 && group == 64 && nb == 16) MIX(16, 1, 64, 2);
    else if (bits == 8 && W == 64 && group == 64 && nb == 64) MIX(64, 1, 64, 8);
    else if (bits == 4 && W == 256 && group == 128 && nb == 128) MIX(128, 2, 128, 4);
    else if (bits == 2 && W == 256 && group == 128 && nb == 64) MIX(64, 2, 128, 2);
    else if (bits == 8 && W == 256 && group == 128 && nb == 256) MIX(256, 2, 128, 8);
    else MIX(nb, G, group, bits);
#undef MIX
}

#define SUB 256  /* tokens per dequantized tile of rows quantized along tokens */
#define TILE_BYTES 131072  /* the most a tile takes, when that leaves 32 tokens or more */

/* Tokens [t0, t0 + len) of one row quantized along tokens, as floats: codes -> rb -> db = code * scale + min. */
static inline __attribute__((always_inline)) void dequant_tokens(
        const uint8_t *restrict row, const _Float16 *restrict scales, const _Float16 *restrict mins, int64_t t0,
        int64_t len, int64_t nb, int64_t group, int bits, int mask, float *restrict rb, float *restrict db) {
    for (int64_t i = 0; i < len;) {  /* token t sits in plane t / nb, byte t % nb */
        const int64_t t = t0 + i, k = t / nb;
        const int64_t end = (k + 1) * nb - t0 < len ? (k + 1) * nb - t0 : len;
        const uint8_t *src = row + (t - k * nb) - i;
        const int shift = (int)k * bits;
        for (; i + 16 <= end; i += 16)  /* 16 codes a load (`codes16`, centred; the centre added back is exact) */
            *(v16 *)(rb + i) = codes16(src + i, shift, bits) + MID(bits);
        for (; i < end; i++) rb[i] = (float)((src[i] >> shift) & mask);
    }
    const _Float16 *s = scales + t0 / group, *mn = mins + t0 / group;
    const int64_t full = len / group;
    for (int64_t g = 0; g < full; g++)
        for (int64_t c = 0; c < group; c++) db[g * group + c] = rb[g * group + c] * s[g] + mn[g];
    for (int64_t i = full * group; i < len; i++) db[i] = rb[i] * s[full] + mn[full];
}

/* out rows m0.. (up to 4, `rows` of them real) x tokens [i, i + 32) of a tile: dt (R, S) floats, xm (M, R).
   Two 16-lane vectors per row: 8 independent sums keep both FMA units busy on AVX-512 (pairs of 8 lanes
   elsewhere). */
static inline __attribute__((always_inline)) void tile_32x4(
        const float *restrict dt, int64_t S, const float *restrict x, int64_t R, int64_t m0, int64_t rows,
        int64_t i, float *restrict o, int64_t T, int64_t cnt) {
    const float *x0 = x + m0 * R, *x1 = x0 + (rows > 1 ? R : 0), *x2 = x0 + (rows > 2 ? 2 * R : 0),
                *x3 = x0 + (rows > 3 ? 3 * R : 0);
    v16 a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
    for (int64_t j = 0; j < R; j++) {
        const v16 d0 = *(const v16 *)(dt + j * S + i), d1 = *(const v16 *)(dt + j * S + i + 16);
        const float b0 = x0[j], b1 = x1[j], b2 = x2[j], b3 = x3[j];
        a00 += b0 * d0; a01 += b0 * d1;
        a10 += b1 * d0; a11 += b1 * d1;
        a20 += b2 * d0; a21 += b2 * d1;
        a30 += b3 * d0; a31 += b3 * d1;
    }
    const v16 acc[4][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    const int64_t n = cnt - i < 32 ? cnt - i : 32;
    for (int64_t r = 0; r < rows; r++) {
        float *dst = o + (m0 + r) * T + i;
        if (n == 32) {
            *(v16 *)dst = acc[r][0];
            *(v16 *)(dst + 16) = acc[r][1];
        } else {
            float tmp[32];
            *(v16 *)tmp = acc[r][0];
            *(v16 *)(tmp + 16) = acc[r][1];
            for (int64_t k = 0; k < n; k++) dst[k] = tmp[k];
        }
    }
}

/* Scores of query rows x (M, R) against tokens [t0, t0 + len) of R rows quantized along tokens (row j's codes
   at codes + j * nb, its scales at scales + j * G; t0 a multiple of group) -> o[m * os + t - t0]. SUB tokens
   (whole groups) at a time: the R rows are dequantized into a small (R, SUB) tile, then 32 tokens x 4 query rows
   of the output are summed over R in registers. */
static inline __attribute__((always_inline)) void scores_span(
        const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
        const float *restrict x, int64_t M, int64_t R, int64_t nb, int64_t G, int64_t group, int bits, int64_t t0,
        int64_t len, float *restrict o, int64_t os) {
    /* the tile converts each code once for every query row; the registers, once per 4-8 rows: for many rows
       (the budget's judge) in groups of 32 the tile is faster, and for groups of 16 always (measured) */
    if (group % 64 == 0 || (group % 32 == 0 && M <= 16)) {
        scores_span_reg(codes, scales, mins, x, M, R, nb, G, group, bits, t0, len, o, os);
        return;
    }
    const int mask = (1 << bits) - 1;
    prefetch_span(codes, R, nb, bits, t0, len);
    /* whole groups (scales index by t / group); long enough that each row's unpacking loop runs long, short enough
       that the tile stays in the L2 cache */
    const int64_t span = R * SUB * 4 > TILE_BYTES && TILE_BYTES / (4 * R) >= 32 ? TILE_BYTES / (4 * R) / 32 * 32 : SUB;
    const int64_t sub = group < span ? (span / group) * group : group;
    const int64_t S = (sub + 31) / 32 * 32;  /* row stride of the tile: whole 32-token steps (the pad is not stored) */
    float *tile = (float *)scratch(SCR_TILE, sizeof(float) * (R * S + sub));
    float *rb = tile + R * S;
    for (int64_t s0 = t0; s0 < t0 + len; s0 += sub) {
        const int64_t cnt = s0 + sub < t0 + len ? sub : t0 + len - s0;
        for (int64_t j = 0; j < R; j++)
            dequant_tokens(codes + j * nb, scales + j * G, mins + j * G, s0, cnt, nb, group, bits, mask, rb,
                           tile + j * S);
        for (int64_t i = 0; i < cnt; i += 32)
            for (int64_t m0 = 0; m0 < M; m0 += 4)
                tile_32x4(tile, S, x, R, m0, M - m0 < 4 ? M - m0 : 4, i, o + s0 - t0, os, cnt);
    }
}
