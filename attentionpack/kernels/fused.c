/* Fused CPU kernels for attention over quantized cache pieces (see attentionpack/kernels/__init__.py).

   Codes are packed as attentionpack.codecs.quant.pack lays them out: a row of n codes (padded to per * nb,
   per = 8 / bits) is cut into `per` planes of nb consecutive codes; byte i of the row holds code k * nb + i in
   bits [k * bits, (k + 1) * bits). Scales and minimums are the stored float16 (_Float16).
   All tensors are contiguous. Single-threaded: a call is small (one layer, one piece) and torch's own threads
   stay free for the rest of the step. */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

static void unpack_row(const uint8_t *restrict row, int64_t nb, int bits, float *restrict buf) {
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
   The per-token work is a few short loops over the W = G * group columns; `mix_core` is inlined with W, group
   and bits as constants for the common head dims so that those loops are unrolled. */
static inline __attribute__((always_inline)) void mix_core(
        const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
        const float *restrict p, float *restrict out, int64_t N, int64_t M, int64_t T, int64_t nb, int64_t G,
        int64_t group, int64_t L, int bits, int64_t ps, float *restrict buf, float *restrict acc, float *restrict macc) {
    const int64_t W = G * group;
    const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int64_t n = 0; n < N; n++) {
        memset(acc, 0, sizeof(float) * M * W);
        memset(macc, 0, sizeof(float) * M * G);
        const float *pn = p + n * M * ps;
        for (int64_t t = 0; t < T; t++) {
            const uint8_t *row = codes + (n * T + t) * nb;
            const _Float16 *s = scales + (n * T + t) * G, *mn = mins + (n * T + t) * G;
            for (int k = 0; k < per; k++)
                for (int64_t i = 0; i < nb; i++) buf[k * nb + i] = (float)((row[i] >> (k * bits)) & mask);
            for (int64_t m = 0; m < M; m++) {
                const float w = pn[m * ps + t];
                float *restrict am = acc + m * W;
                for (int64_t g = 0; g < G; g++) {  /* the token's scale folded into its weight */
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

void ap_mix_rows(const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
                 const float *restrict p, float *restrict out, int64_t N, int64_t M, int64_t T, int64_t nb,
                 int64_t G, int64_t group, int64_t L, int bits, int64_t ps) {
    const int64_t W = G * group;
    float *buf = (float *)malloc(sizeof(float) * (8 * nb > W ? 8 * nb : W));
    float *acc = (float *)malloc(sizeof(float) * M * W);
    float *macc = (float *)malloc(sizeof(float) * M * G);
#define MIX(NB, GG, GR, BITS) mix_core(codes, scales, mins, p, out, N, M, T, NB, GG, GR, L, BITS, ps, buf, acc, macc)
    if (bits == 4 && W == 64 && group == 32 && nb == 32) MIX(32, 2, 32, 4);
    else if (bits == 4 && W == 64 && group == 64 && nb == 32) MIX(32, 1, 64, 4);
    else if (bits == 4 && W == 128 && group == 32 && nb == 64) MIX(64, 4, 32, 4);
    else if (bits == 4 && W == 128 && group == 64 && nb == 64) MIX(64, 2, 64, 4);
    else if (bits == 8 && W == 64 && group == 32 && nb == 64) MIX(64, 2, 32, 8);
    else if (bits == 8 && W == 128 && group == 32 && nb == 128) MIX(128, 4, 32, 8);
    else if (bits == 2 && W == 64 && group == 32 && nb == 16) MIX(16, 2, 32, 2);
    else if (bits == 2 && W == 128 && group == 32 && nb == 32) MIX(32, 4, 32, 2);
    else MIX(nb, G, group, bits);
#undef MIX
    free(buf); free(acc); free(macc);
}

/* Rows quantized along tokens (per-channel keys, low-rank coefficients: groups of `group` tokens per row),
   scored against query rows: codes (N, R, nb) holding T tokens per row, scales/mins (N, R, G), x (N, M, R)
   -> out (N, M, T):  out[n, m, t] = sum_j x[n, m, j] * (scales[n, j, t / group] * code[n, j, t] + mins[...]).
   Tokens go in blocks of whole groups: each row's block is dequantized once into a small buffer, then added to the
   M output rows of the block, which stay in the L1 cache across all R rows. */
#define BLOCK 512
static inline __attribute__((always_inline)) void scores_core(
        const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
        const float *restrict x, float *restrict out, int64_t N, int64_t M, int64_t R, int64_t T,
        int64_t nb, int64_t G, int64_t group, int bits) {
    const int mask = (1 << bits) - 1;
    float raw[BLOCK + 256], buf[BLOCK + 256];
    const int64_t block = group <= BLOCK ? (BLOCK / group) * group : group;
    float *big = block > BLOCK ? (float *)malloc(sizeof(float) * 2 * block) : 0;
    float *restrict rb = big ? big : raw, *restrict db = big ? big + block : buf;
    for (int64_t n = 0; n < N; n++) {
        float *restrict o = out + n * M * T;
        memset(o, 0, sizeof(float) * M * T);
        for (int64_t t0 = 0; t0 < T; t0 += block) {
            const int64_t len = t0 + block < T ? block : T - t0;
            for (int64_t j = 0; j < R; j++) {
                const uint8_t *row = codes + (n * R + j) * nb;
                for (int64_t i = 0; i < len;) {  /* token t sits in plane t / nb, byte t % nb */
                    const int64_t t = t0 + i, k = t / nb;
                    const int64_t end = (k + 1) * nb - t0 < len ? (k + 1) * nb - t0 : len;
                    const uint8_t *src = row + (t - k * nb) - i;
                    const int shift = (int)k * bits;
                    for (; i < end; i++) rb[i] = (float)((src[i] >> shift) & mask);
                }
                const _Float16 *s = scales + (n * R + j) * G + t0 / group, *mn = mins + (n * R + j) * G + t0 / group;
                const int64_t full = len / group;
                for (int64_t g = 0; g < full; g++)
                    for (int64_t c = 0; c < group; c++) db[g * group + c] = rb[g * group + c] * s[g] + mn[g];
                for (int64_t i = full * group; i < len; i++) db[i] = rb[i] * s[full] + mn[full];
                for (int64_t m = 0; m < M; m++) {
                    const float a = x[(n * M + m) * R + j];
                    float *restrict om = o + m * T + t0;
                    for (int64_t i = 0; i < len; i++) om[i] += a * db[i];
                }
            }
        }
    }
    free(big);
}

void ap_scores_cols(const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
                    const float *restrict x, float *restrict out, int64_t N, int64_t M, int64_t R, int64_t T,
                    int64_t nb, int64_t G, int64_t group, int bits) {
    if (bits == 8 && group == 32) scores_core(codes, scales, mins, x, out, N, M, R, T, nb, G, 32, 8);
    else if (bits == 4 && group == 32) scores_core(codes, scales, mins, x, out, N, M, R, T, nb, G, 32, 4);
    else scores_core(codes, scales, mins, x, out, N, M, R, T, nb, G, group, bits);
}
