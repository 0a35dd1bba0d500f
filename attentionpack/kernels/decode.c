/* One decoding step of attention over a whole packed layer in one call (the table comes from attentionpack/kernels/plan.py).

   The layer is a list of pieces (sink, compressed spans and chunks, the exact tail), each with its keys and values
   in their stored form. The work is cut into items (sample b, piece, block of tokens): an item scores its tokens
   for every query row of every KV head, takes the softmax of its block against its own running maximum, and
   mixes its values with those weights; the items are shared among torch's OpenMP threads and their partial
   results (max, sum, weighted values) are merged at the end, flash-decoding style. Nothing is concatenated, no
   float copy of any piece is made, and there is one call per layer instead of a dozen small torch operations.

   Shapes: B samples, H KV heads, M query rows per KV head (grouped-query heads x query tokens), d head dim,
   T tokens of a piece, R rows of a factor basis (its rank). */
#include <math.h>
#include "common.h"

enum { KEYS_EXACT = 0, KEYS_PER_CHANNEL = 1, KEYS_FACTORS = 2 };
enum { VALUES_EXACT = 0, VALUES_PER_TOKEN = 1, VALUES_FACTORS = 2 };

/* A piece, as Python fills it (all fields int64, pointers as addresses; see plan.py for the field order). */
typedef struct {
    int64_t keys, values;  /* kinds above */
    int64_t T, col0;       /* tokens per sample; mask column of token 0 */
    int64_t k, k_sb, k_sh;  /* exact keys: rows of d floats at k + b * k_sb + h * k_sh + t * d */
    /* quantized keys: per channel, codes (B, H, d, nb) / scales, mins (B, H, d, G); factors (keys after RoPE =
       coefficients (B, T, R) x basis (B, R, H * d)), codes of the coefficients along T (B, R, nb) / (B, R, G) */
    int64_t kc, ks, km, k_nb, k_G, k_group, k_bits, k_R;
    int64_t basis;  /* factors: basis (B, R, H * d) */
    int64_t k_dt;   /* dtype of the floats read (exact rows or the basis): DT_F32, DT_F16 or DT_BF16 */
    int64_t v, v_sb, v_sh;  /* exact values, laid out like exact keys */
    /* per-token values: codes (B, H, T, nb), scales (B, H, T, G); factors: coefficients (B, T, R) along T,
       codes (B, R, nb) / (B, R, G), and basis (B, R, H * d) */
    int64_t vc, vs, vm, v_nb, v_G, v_group, v_bits;
    int64_t v_R, v_basis, v_dt;
    /* per-head pieces: hmap (H,) int64, the piece's own head of each KV head or -1 (0: the piece holds every
       head); Hp heads held; slots (B, Hp, T) _Float16 log multiplicity added to each slot's logit (0: none), the
       cache mask is then not read (slot tokens precede the query) */
    int64_t hmap, Hp, slots;
} piece_t;

/* The piece's own head of KV head h (-1: the piece does not hold it). */
static inline int64_t own_head(const piece_t *pc, int64_t h) {
    return pc->hmap ? ((const int64_t *)pc->hmap)[h] : h;
}

#define DBLK 512  /* tokens per work item (rounded to whole key groups); 512 against 256: DecodePlan.run 0.91x at 8k,
                     0.95x at 45 x 4k, 0.97x at 2k (experiments/ab_kernels.py, SmolLM2 budget=0.125) */

/* Largest of x[0 .. n), 16 lanes at a time. */
static inline float row_max(const float *restrict x, int64_t n) {
    v16 m;
    for (int i = 0; i < 16; i++) m[i] = -INFINITY;
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) {
        const v16 v = *(const v16 *)(x + t);
        m = select16(v > m, v, m);
    }
    float top = -INFINITY;
    for (int i = 0; i < 16; i++) top = m[i] > top ? m[i] : top;
    for (; t < n; t++) top = x[t] > top ? x[t] : top;
    return top;
}

/* x[t] = exp(x[t] - top) for t < n, returning their sum; top is finite and >= every x[t]. 16 lanes at a time:
   exp(y) = 2^k exp(r), k = round(y / ln 2), r = y - k ln 2 (ln 2 split in two for exactness), exp(r) by the
   Cephes degree-7 polynomial (relative error about 1e-7, as expf); y < -87.3 (an exp below the smallest normal
   float, a masked token) gives 0. */
static inline float exp_shifted(float *restrict x, int64_t n, float top) {
    v16 acc = {0};
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) {
        const v16 y = *(const v16 *)(x + t) - top;
        const i16 live = y > -87.3f;
        const v16 yc = select16(live, y, (v16){0} - 87.3f);
        const v16 kf = round_even16(yc * 1.44269504f);
        const v16 r = (yc - kf * 0.693359375f) - kf * -2.12194440e-4f;
        v16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.f;
        const i16 pow2 = (__builtin_convertvector(kf, i16) + 127) << 23;  /* 2^k as float bits */
        const v16 e = select16(live, p * (v16)pow2, (v16){0});
        *(v16 *)(x + t) = e;
        acc += e;
    }
    float sum = hsum16(acc);
    for (; t < n; t++) { x[t] = expf(x[t] - top); sum += x[t]; }
    return sum;
}

static inline int64_t item_tokens(const piece_t *pc) {  /* whole groups of every operand quantized along T */
    int64_t g = pc->keys == KEYS_EXACT ? 1 : pc->k_group;
    if (pc->values == VALUES_FACTORS) {
        int64_t a = g, b = pc->v_group;
        while (b) { const int64_t r = a % b; a = b; b = r; }
        g = g / a * pc->v_group;  /* least common multiple */
    }
    return g <= DBLK ? (DBLK / g) * g : g;
}

/* Row j of a basis (B, R, D) of sample b as floats. */
static inline const float *basis_row(int64_t basis, int64_t dt, int64_t b, int64_t R, int64_t j, int64_t D,
                                     float *buf) {
    return floats_at(basis, (int)dt, (b * R + j) * D, D, buf);
}

/* Scores of rows (H * M, stride os) for tokens [t0, t0 + cnt) of piece pc in sample b. qs (H * M, d) scaled
   queries, qt (H * M, R) the same queries in the piece's basis (factors only). */
static void item_scores(const piece_t *pc, int64_t b, int64_t H, int64_t M, int64_t d, const float *qs,
                        const float *qt, int64_t t0, int64_t cnt, float *s, int64_t os) {
    const int64_t Hp = pc->Hp;
    if (pc->keys == KEYS_EXACT) {
        float *buf = pc->k_dt == DT_F32 ? NULL : (float *)scratch(SCR_KEYS, sizeof(float) * cnt * d);
        for (int64_t h = 0; h < H; h++) {
            const int64_t lh = own_head(pc, h);
            if (lh < 0) continue;
            const float *kb = floats_at(pc->k, (int)pc->k_dt, b * pc->k_sb + lh * pc->k_sh + t0 * d, cnt * d, buf);
            for (int64_t m = 0; m < M; m++) {
                const float *x = qs + (h * M + m) * d;
                float *o = s + (h * M + m) * os;
                for (int64_t t = 0; t < cnt; t++) o[t] = dot(x, kb + t * d, d);
            }
        }
        return;
    }
    const uint8_t *codes = (const uint8_t *)pc->kc;
    const _Float16 *sc = (const _Float16 *)pc->ks, *mn = (const _Float16 *)pc->km;
    const int64_t nb = pc->k_nb, G = pc->k_G, group = pc->k_group, R = pc->k_R;
    const int bits = (int)pc->k_bits;
#define SPAN(X, ROWS, OUT, GR, BITS) scores_span(codes + n * R * nb, sc + n * R * G, mn + n * R * G, X, ROWS, R, nb, \
                                                 G, GR, BITS, t0, cnt, OUT, os)
#define SPANS(X, ROWS, OUT) do { \
        if (bits == 4 && group == 32) SPAN(X, ROWS, OUT, 32, 4); \
        else if (bits == 8 && group == 32) SPAN(X, ROWS, OUT, 32, 8); \
        else if (bits == 2 && group == 32) SPAN(X, ROWS, OUT, 32, 2); \
        else if (bits == 4 && group == 128) SPAN(X, ROWS, OUT, 128, 4); \
        else if (bits == 2 && group == 128) SPAN(X, ROWS, OUT, 128, 2); \
        else SPAN(X, ROWS, OUT, group, bits); } while (0)
    if (pc->keys == KEYS_FACTORS) {  /* coefficients shared by all heads: one tile for the H * M rows */
        const int64_t n = b;
        SPANS(qt, H * M, s);
    } else {
        for (int64_t h = 0; h < H; h++) {
            const int64_t lh = own_head(pc, h);
            if (lh < 0) continue;
            const int64_t n = b * Hp + lh;
            SPANS(qs + h * M * d, M, s + h * M * os);
        }
    }
#undef SPANS
#undef SPAN
}

/* am (M, d) = p (M rows, stride os) x rows v (cnt, d). Per 16 channels, up to 4 weight rows at once: the sums
   stay in registers while the tokens stream by (one load of each value row per 4 weight rows). */
static void mix_exact(const float *restrict v, const float *restrict p, int64_t os, float *restrict am, int64_t M,
                      int64_t cnt, int64_t d) {
    const int64_t d16 = d / 16 * 16;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t rows = M - m0 < 4 ? M - m0 : 4;
        const float *p0 = p + m0 * os, *p1 = p0 + (rows > 1 ? os : 0), *p2 = p0 + (rows > 2 ? 2 * os : 0),
                    *p3 = p0 + (rows > 3 ? 3 * os : 0);
        for (int64_t c = 0; c < d16; c += 16) {
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t t = 0; t < cnt; t++) {
                const v16 x = *(const v16 *)(v + t * d + c);
                a0 += p0[t] * x; a1 += p1[t] * x; a2 += p2[t] * x; a3 += p3[t] * x;
            }
            const v16 acc[4] = {a0, a1, a2, a3};
            for (int64_t r = 0; r < rows; r++) *(v16 *)(am + (m0 + r) * d + c) = acc[r];
        }
        for (int64_t r = 0; r < rows; r++)  /* channels past the last 16 */
            for (int64_t c = d16; c < d; c++) {
                float sum = 0.f;
                for (int64_t t = 0; t < cnt; t++) sum += p[(m0 + r) * os + t] * v[t * d + c];
                am[(m0 + r) * d + c] = sum;
            }
    }
}

/* w (HM, R) = p (HM rows, stride os) x the R rows of tile (R, n) over their n tokens: 3 weight rows x 4 tile rows
   at a time, so each load feeds several multiply-adds and the 12 sums stay in registers. */
static void weights_x_rows(const float *restrict p, int64_t os, int64_t HM, const float *restrict tile, int64_t n,
                           int64_t R, float *restrict w) {
    const int64_t n16 = n / 16 * 16;
    for (int64_t r0 = 0; r0 < HM; r0 += 3) {
        const int64_t nr = HM - r0 < 3 ? HM - r0 : 3;
        const float *p0 = p + r0 * os, *p1 = p0 + (nr > 1 ? os : 0), *p2 = p0 + (nr > 2 ? 2 * os : 0);
        for (int64_t j0 = 0; j0 < R; j0 += 4) {
            const int64_t nj = R - j0 < 4 ? R - j0 : 4;
            const float *c0 = tile + j0 * n, *c1 = c0 + (nj > 1 ? n : 0), *c2 = c0 + (nj > 2 ? 2 * n : 0),
                        *c3 = c0 + (nj > 3 ? 3 * n : 0);
            v16 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0}, a20 = {0},
                a21 = {0}, a22 = {0}, a23 = {0};
            for (int64_t t = 0; t < n16; t += 16) {
                const v16 x0 = *(const v16 *)(p0 + t), x1 = *(const v16 *)(p1 + t), x2 = *(const v16 *)(p2 + t);
                const v16 y0 = *(const v16 *)(c0 + t), y1 = *(const v16 *)(c1 + t), y2 = *(const v16 *)(c2 + t),
                          y3 = *(const v16 *)(c3 + t);
                a00 += x0 * y0; a01 += x0 * y1; a02 += x0 * y2; a03 += x0 * y3;
                a10 += x1 * y0; a11 += x1 * y1; a12 += x1 * y2; a13 += x1 * y3;
                a20 += x2 * y0; a21 += x2 * y1; a22 += x2 * y2; a23 += x2 * y3;
            }
            const v16 acc[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
            const float *pr[3] = {p0, p1, p2}, *cj[4] = {c0, c1, c2, c3};
            for (int64_t r = 0; r < nr; r++)
                for (int64_t j = 0; j < nj; j++) {
                    float s = hsum16(acc[r][j]);
                    for (int64_t t = n16; t < n; t++) s += pr[r][t] * cj[j][t];
                    w[(r0 + r) * R + j0 + j] = s;
                }
        }
    }
}

/* acc (H * M, d) = unnormalized weights p (H * M rows, stride os) times the values of tokens [t0, t0 + cnt). For
   factor values acc is (H * M, R) instead: the weights times the coefficients, in the basis' coordinates (the
   merge in ap_decode sums them over the piece's items and applies the basis once). */
static void item_values(const piece_t *pc, int64_t b, int64_t H, int64_t M, int64_t d, const float *p, int64_t os,
                        int64_t t0, int64_t cnt, float *acc) {
    if (pc->values == VALUES_FACTORS) {
        const int64_t R = pc->v_R, HM = H * M, nb = pc->v_nb, G = pc->v_G;
        float *tile = (float *)scratch(SCR_COEF, sizeof(float) * (R * cnt + cnt));  /* (R, cnt) coefficients */
        float *rb = tile + R * cnt;
        prefetch_span((const uint8_t *)pc->vc + b * R * nb, R, nb, (int)pc->v_bits, t0, cnt);
        for (int64_t j = 0; j < R; j++) {
            const int64_t at = b * R + j;
            dequant_tokens((const uint8_t *)pc->vc + at * nb, (const _Float16 *)pc->vs + at * G,
                           (const _Float16 *)pc->vm + at * G, t0, cnt, nb, pc->v_group, (int)pc->v_bits,
                           (1 << pc->v_bits) - 1, rb, tile + j * cnt);
        }
        weights_x_rows(p, os, HM, tile, cnt, R, acc);
        return;
    }
    float *buf = pc->values == VALUES_EXACT && pc->v_dt != DT_F32
                     ? (float *)scratch(SCR_VALS, sizeof(float) * cnt * d)
                     : NULL;
    for (int64_t h = 0; h < H; h++) {
        const float *ph = p + h * M * os;
        float *ah = acc + h * M * d;
        const int64_t lh = own_head(pc, h);
        if (lh < 0) {  /* not held: no weight (the item's maximum for these rows is -inf) */
            memset(ah, 0, sizeof(float) * M * d);
            continue;
        }
        if (pc->values == VALUES_EXACT) {
            const float *vb = floats_at(pc->v, (int)pc->v_dt, b * pc->v_sb + lh * pc->v_sh + t0 * d, cnt * d, buf);
            mix_exact(vb, ph, os, ah, M, cnt, d);
        } else {
            const int64_t row = (b * pc->Hp + lh) * pc->T + t0;  /* first token's row in (B, Hp, T) */
            mix_range((const uint8_t *)pc->vc + row * pc->v_nb, (const _Float16 *)pc->vs + row * pc->v_G,
                      (const _Float16 *)pc->vm + row * pc->v_G, ph, ah, 1, M, cnt, pc->v_nb, pc->v_G, pc->v_group,
                      d, (int)pc->v_bits, os, 0, cnt);
        }
    }
}

/* One work item: res = [max (HM), sum (HM), acc (HM, d), or (HM, R) for factor values] of its block. */
static void decode_item(const piece_t *pc, int64_t b, int64_t t0, int64_t H, int64_t M, int64_t d, const float *qs,
                        const float *qt, const uint8_t *mask, int64_t mask_sb, float softcap, float *res) {
    const int64_t HM = H * M, blk = item_tokens(pc);
    const int64_t cnt = t0 + blk < pc->T ? blk : pc->T - t0;
    float *s = (float *)scratch(SCR_ITEM, sizeof(float) * HM * blk);
    item_scores(pc, b, H, M, d, qs, qt, t0, cnt, s, blk);
    const uint8_t *mk = mask && !pc->slots ? mask + b * mask_sb + pc->col0 + t0 : NULL;
    float *mx = res, *sm = res + HM;
    for (int64_t r = 0; r < HM; r++) {
        float *sr = s + r * blk;
        const int64_t lh = own_head(pc, r / M);
        if (lh < 0) {  /* a head the piece does not hold: no token */
            for (int64_t t = 0; t < cnt; t++) sr[t] = -INFINITY;
        } else {
            if (softcap > 0.f)
                for (int64_t t = 0; t < cnt; t++) sr[t] = softcap * tanhf(sr[t] / softcap);
            if (pc->slots) {
                const _Float16 *ls = (const _Float16 *)pc->slots + (b * pc->Hp + lh) * pc->T + t0;
                for (int64_t t = 0; t < cnt; t++) sr[t] += (float)ls[t];
            }
        }
        if (mk)
            for (int64_t t = 0; t < cnt; t++) if (!mk[t]) sr[t] = -INFINITY;
        const float top = row_max(sr, cnt);
        float sum = 0.f;
        if (top == -INFINITY)  /* every token of the block masked for this row */
            memset(sr, 0, sizeof(float) * cnt);
        else
            sum = exp_shifted(sr, cnt, top);
        mx[r] = top;
        sm[r] = sum;
    }
    item_values(pc, b, H, M, d, s, blk, t0, cnt, res + 2 * HM);
}

/* query (B, H, M, d) rotated, not scaled; mask NULL or (B, columns) uint8 with rows mask_sb apart (1 = attend);
   softcap <= 0 for none -> out (B, H, M, d). */
void ap_decode(const int64_t *desc, int64_t P, const float *restrict query, const uint8_t *mask, int64_t mask_sb,
               float scale, float softcap, float *restrict out, int64_t B, int64_t H, int64_t M, int64_t d) {
    const piece_t *pieces = (const piece_t *)desc;
    int64_t rmax = 0, dmax = 0;  /* the largest rank and basis row of the factor values */
    for (int64_t p = 0; p < P; p++)
        if (pieces[p].values == VALUES_FACTORS) {
            rmax = pieces[p].v_R > rmax ? pieces[p].v_R : rmax;
            dmax = pieces[p].Hp * d > dmax ? pieces[p].Hp * d : dmax;
        }
    /* an item's weighted values per row: d floats, or R for factor values (see item_values) */
    const int64_t HM = H * M, stride = HM * ((rmax > d ? rmax : d) + 2);
    float *qs = (float *)malloc(sizeof(float) * B * HM * d);
    for (int64_t i = 0; i < B * HM * d; i++) qs[i] = query[i] * scale;

    /* queries in each factor basis: qt[b][p] (HM, R) */
    int64_t *qt_at = (int64_t *)malloc(sizeof(int64_t) * (P + 1)), per_sample = 0, tokens = 0;
    for (int64_t p = 0; p < P; p++) {
        qt_at[p] = per_sample;
        if (pieces[p].keys == KEYS_FACTORS) per_sample += HM * pieces[p].k_R;
        tokens += pieces[p].T;
    }
    float *qt = (float *)malloc(sizeof(float) * (B * per_sample + 1));
    const int parallel = B * tokens >= MIN_PARALLEL && !omp_in_parallel();  /* ap_decode_rows: one thread a row */
#pragma omp parallel for schedule(static) if (parallel && per_sample > 0)  /* no factor keys: no fork */
    for (int64_t i = 0; i < B * P; i++) {
        const int64_t b = i / P, p = i % P;
        const piece_t *pc = pieces + p;
        if (pc->keys != KEYS_FACTORS) continue;
        const int64_t R = pc->k_R, D = pc->Hp * d;
        float *dst = qt + b * per_sample + qt_at[p];
        float *buf = (float *)malloc(sizeof(float) * D);
        for (int64_t j = 0; j < R; j++) {
            const float *row = basis_row(pc->basis, pc->k_dt, b, R, j, D, buf);
            for (int64_t h = 0; h < H; h++) {
                const int64_t lh = own_head(pc, h);
                for (int64_t m = 0; m < M; m++)
                    dst[(h * M + m) * R + j] = lh < 0 ? 0.f : dot(qs + ((b * H + h) * M + m) * d, row + lh * d, d);
            }
        }
        free(buf);
    }

    /* work items (b, piece, first token), grouped by sample */
    int64_t items = 0;
    for (int64_t p = 0; p < P; p++) {
        const int64_t blk = item_tokens(pieces + p);
        items += (pieces[p].T + blk - 1) / blk;
    }
    const int64_t per_b = items;
    items *= B;
    int64_t *item_p = (int64_t *)malloc(sizeof(int64_t) * (items + 1));
    int64_t *item_t = (int64_t *)malloc(sizeof(int64_t) * (items + 1));
    for (int64_t b = 0, i = 0; b < B; b++)
        for (int64_t p = 0; p < P; p++)
            for (int64_t t = 0, blk = item_tokens(pieces + p); t < pieces[p].T; t += blk, i++) {
                item_p[i] = p;
                item_t[i] = t;
            }
    float *res = (float *)malloc(sizeof(float) * (items * stride + 1));
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
    for (int64_t i = 0; i < items; i++) {
        const int64_t b = i / per_b, p = item_p[i];
        decode_item(pieces + p, b, item_t[i], H, M, d, qs + b * HM * d, qt + b * per_sample + qt_at[p], mask,
                    mask_sb, softcap, res + i * stride);
    }

    /* merge the items of each sample: rescale to the common maximum; factor values summed per piece in the basis'
       coordinates, then the basis applied once; normalize */
    float *top = (float *)malloc(sizeof(float) * 2 * HM), *den = top + HM;
    float *fsum = (float *)malloc(sizeof(float) * (HM * rmax + 1)), *row = (float *)malloc(sizeof(float) * (dmax + 1));
    for (int64_t b = 0; b < B; b++) {
        const float *rb = res + b * per_b * stride;
        float *ob = out + b * HM * d;
        for (int64_t r = 0; r < HM; r++) {
            top[r] = -INFINITY;
            den[r] = 0.f;
            for (int64_t i = 0; i < per_b; i++) top[r] = rb[i * stride + r] > top[r] ? rb[i * stride + r] : top[r];
        }
        memset(ob, 0, sizeof(float) * HM * d);
        for (int64_t i = 0, first = 0; i < per_b; i = first) {
            const int64_t p = item_p[b * per_b + i];
            const piece_t *pc = pieces + p;
            const int factors = pc->values == VALUES_FACTORS;
            const int64_t R = pc->v_R, w_row = factors ? R : d;
            if (factors) memset(fsum, 0, sizeof(float) * HM * R);
            for (first = i; first < per_b && item_p[b * per_b + first] == p; first++) {  /* the piece's items */
                const float *it = rb + first * stride;
                for (int64_t r = 0; r < HM; r++) {
                    if (it[r] == -INFINITY) continue;
                    const float w = expf(it[r] - top[r]);
                    den[r] += w * it[HM + r];
                    const float *a = it + 2 * HM + r * w_row;
                    float *o = factors ? fsum + r * R : ob + r * d;
                    for (int64_t c = 0; c < w_row; c++) o[c] += w * a[c];
                }
            }
            if (!factors) continue;
            const int64_t D = pc->Hp * d;
            for (int64_t j = 0; j < R; j++) {  /* sums (HM, R) x basis (R, Hp * d) of the rows' own heads */
                const float *bj = basis_row(pc->v_basis, pc->v_dt, b, R, j, D, row);
                for (int64_t r = 0; r < HM; r++) {
                    const int64_t lh = own_head(pc, r / M);
                    const float wj = fsum[r * R + j];
                    if (lh < 0 || wj == 0.f) continue;
                    float *restrict o = ob + r * d;
                    for (int64_t c = 0; c < d; c++) o[c] += wj * bj[lh * d + c];
                }
            }
        }
        for (int64_t r = 0; r < HM; r++) {  /* no token allowed: zeros */
            if (top[r] == -INFINITY) continue;
            const float inv = 1.f / den[r];
            for (int64_t c = 0; c < d; c++) ob[r * d + c] *= inv;
        }
    }
    free(top); free(fsum); free(row);
    free(qs); free(qt_at); free(qt); free(item_p); free(item_t); free(res);
}

/* n independent one-sample steps (a serving step's sequences, each over its own pieces): step i is
   ap_decode(descs[i], Ps[i], queries[i], masks[i], mask_sbs[i], scale, softcap, outs[i], 1, H, M, d). The threads
   share the steps, one step per thread at a time (no fork and join per sequence), while every thread has one;
   the last n % threads steps then run one after the other, each on all threads (its items shared), so that 13
   steps on 2 threads take 6.5 steps' time, not 7. A step's result does not depend on which way it ran (its items'
   partial results are merged in the same order). */
void ap_decode_rows(int64_t n, const int64_t *descs, const int64_t *Ps, const int64_t *queries, const int64_t *masks,
                    const int64_t *mask_sbs, float scale, float softcap, const int64_t *outs, int64_t H, int64_t M,
                    int64_t d) {
    const int64_t threads = omp_in_parallel() ? 1 : omp_get_max_threads();
    const int64_t shared = threads > 1 ? n - n % threads : n;  /* steps run one per thread */
#pragma omp parallel for schedule(dynamic, 1) if (shared > 1)
    for (int64_t i = 0; i < shared; i++)
        ap_decode((const int64_t *)descs[i], Ps[i], (const float *)queries[i], (const uint8_t *)masks[i], mask_sbs[i],
                  scale, softcap, (float *)outs[i], 1, H, M, d);
    for (int64_t i = shared; i < n; i++)
        ap_decode((const int64_t *)descs[i], Ps[i], (const float *)queries[i], (const uint8_t *)masks[i], mask_sbs[i],
                  scale, softcap, (float *)outs[i], 1, H, M, d);
}
