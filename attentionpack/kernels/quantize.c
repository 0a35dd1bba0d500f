/* Group quantization of float32 rows at several bit widths in one pass (attentionpack/kernels/ops.py:
   `quantize_widths`), the same arithmetic as the torch reference attentionpack/parts/quant.py `quantize_widths`:
   per group of g consecutive elements (the row padded by repeating its last element) the minimum is rounded down
   to float16, then per width the scale (range / levels) rounded up to float16, and each code is
   round-half-even((x - min) / scale) clamped to [0, levels]; codes are packed as `pack` lays them out (common.h).
   Rows go to torch's OpenMP threads. */
#include <math.h>
#include "common.h"

/* The float16 next to h toward +inf (up) or -inf: torch.nextafter on float16. */
static inline _Float16 f16_next(_Float16 h, int up) {
    uint16_t u;
    memcpy(&u, &h, sizeof u);
    const uint16_t mag = u & 0x7fff;
    if (mag > 0x7c00) return h;                          /* NaN */
    if (mag == 0x7c00 && ((u >> 15) == 0) == up) return h;  /* already the infinity it moves toward */
    if (mag == 0) u = up ? 0x0001 : 0x8001;
    else if (((u >> 15) == 0) == up) u++;
    else u--;
    memcpy(&h, &u, sizeof h);
    return h;
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
   (rows, G); mins float16 (rows, G). *bad is set when a minimum or a scale is not finite (the caller raises). */
void ap_quantize(const float *restrict x, int64_t rows, int64_t L, int64_t g, int64_t G, const int64_t *bits,
                 int64_t nw, const int64_t *codes_at, const int64_t *scales_at, _Float16 *restrict mins,
                 int64_t *bad) {
    const int64_t n = G * g;
    int64_t flag = 0;
#pragma omp parallel if (rows * L >= 16 * MIN_PARALLEL) reduction(| : flag)
    {
        uint8_t *q = (uint8_t *)malloc(nw * (n + 8));  /* each width's codes of one row, padded to whole bytes */
        float *v = (float *)malloc(sizeof(float) * (g + 1));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const float *row = x + r * L;
            for (int64_t gi = 0; gi < G; gi++) {
                const float *src = row + gi * g;
                if ((gi + 1) * g > L) {  /* the last group overruns the row: repeat its last element */
                    for (int64_t e = 0; e < g; e++) v[e] = row[gi * g + e < L ? gi * g + e : L - 1];
                    src = v;
                }
                float lo = src[0], hi = src[0];
                int nan = 0;
                int64_t e = 0;
                if (g >= 16) {  /* 16 lanes at a time, then the lanes and the rest in order */
                    v16 l = *(const v16 *)src, h = l;
                    i16 odd = l != l;
                    for (e = 16; e + 16 <= g; e += 16) {
                        const v16 y = *(const v16 *)(src + e);
                        l = select16(y < l, y, l);
                        h = select16(y > h, y, h);
                        odd |= y != y;
                    }
                    for (int i = 0; i < 16; i++) {
                        lo = l[i] < lo ? l[i] : lo;
                        hi = h[i] > hi ? h[i] : hi;
                        nan |= odd[i] != 0;
                    }
                }
                for (; e < g; e++) {
                    const float y = src[e];
                    nan |= y != y;
                    lo = y < lo ? y : lo;
                    hi = y > hi ? y : hi;
                }
                _Float16 m16 = (_Float16)lo;
                if ((float)m16 > lo) m16 = f16_next(m16, 0);
                const float mf = (float)m16;
                if (nan || !isfinite(mf)) flag = 1;
                mins[r * G + gi] = m16;
                const float span = hi - mf;
                for (int64_t w = 0; w < nw; w++) {
                    const int levels = (1 << bits[w]) - 1;
                    const float want = span / (float)levels;
                    _Float16 s16 = (_Float16)want;
                    if ((float)s16 < want) s16 = f16_next(s16, 1);
                    const float sf = (float)s16;
                    if (!isfinite(sf)) flag = 1;
                    ((_Float16 *)scales_at[w])[r * G + gi] = s16;
                    const float div = sf > 0.f ? sf : 1.f;
                    uint8_t *qw = q + w * (n + 8) + gi * g;
                    int64_t e = 0;
                    if (g >= 16) {  /* 16 lanes: the same division and rounding (codes are at most levels plus
                                       round-off, far below round_even16's 2^22) */
                        const v16 vm = (v16){0} + mf, vd = (v16){0} + div, top = (v16){0} + (float)levels;
                        for (; e + 16 <= g; e += 16) {
                            v16 c = (*(const v16 *)(src + e) - vm) / vd;
                            c = round_even16(c);
                            c = select16(c < 0.f, (v16){0}, c);
                            c = select16(c > top, top, c);
                            const i16 ci = __builtin_convertvector(c, i16);
                            for (int i = 0; i < 16; i++) qw[e + i] = (uint8_t)ci[i];
                        }
                    }
                    for (; e < g; e++) {
                        float c = nearbyintf((src[e] - mf) / div);
                        c = c < 0.f ? 0.f : c > (float)levels ? (float)levels : c;
                        qw[e] = (uint8_t)c;
                    }
                }
            }
            for (int64_t w = 0; w < nw; w++) {  /* pack: plane k holds codes [k * nb, (k + 1) * nb) */
                const int b = (int)bits[w], per = 8 / b;
                const int64_t nb = (n + per - 1) / per;
                uint8_t *qw = q + w * (n + 8), *out = (uint8_t *)codes_at[w] + r * nb;
                memset(qw + n, 0, (size_t)(nb * per - n));
                if (per == 1) memcpy(out, qw, (size_t)nb);
                else if (per == 2) pack_planes(qw, nb, 2, 4, out);
                else pack_planes(qw, nb, 4, 2, out);
            }
        }
        free(q);
        free(v);
    }
    *bad = flag;
}
