/* Fused CPU kernels for attention over quantized cache pieces (see attentionpack/kernels/__init__.py).

   One operand at a time: the value mix and the key scores of one quantized piece. All tensors are contiguous;
   the code layout and threading are described in common.h. */
#include "common.h"

/* The tokens are split over the threads; each sums its share into a private (N, M, L) block, then the blocks
   are added. */
void ap_mix_rows(const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
                 const float *restrict p, float *restrict out, int64_t N, int64_t M, int64_t T, int64_t nb,
                 int64_t G, int64_t group, int64_t L, int bits, int64_t ps) {
    int threads = N * T >= MIN_PARALLEL ? omp_get_max_threads() : 1;
    if (threads > T) threads = (int)T;
    if (threads <= 1) {
        mix_range(codes, scales, mins, p, out, N, M, T, nb, G, group, L, bits, ps, 0, T);
        return;
    }
    const int64_t size = N * M * L;
    float *parts = (float *)malloc(sizeof(float) * size * threads);
    int used = 1;
#pragma omp parallel num_threads(threads)
    {
        const int id = omp_get_thread_num(), nth = omp_get_num_threads();
        if (id == 0) used = nth;
        mix_range(codes, scales, mins, p, parts + id * size, N, M, T, nb, G, group, L, bits, ps,
                  T * id / nth, T * (id + 1) / nth);
    }
    for (int64_t i = 0; i < size; i++) {
        float sum = 0.f;
        for (int k = 0; k < used; k++) sum += parts[k * size + i];
        out[i] = sum;
    }
    free(parts);
}

/* Rows quantized along tokens (per-channel keys, low-rank coefficients: groups of `group` tokens per row),
   scored against query rows: codes (N, R, nb) holding T tokens per row, scales/mins (N, R, G), x (N, M, R)
   -> out (N, M, T), the n-th (M, T) matrix at out + n * os:
   out[n, m, t] = sum_j x[n, m, j] * (scales[n, j, t / group] * code[n, j, t] + mins[...]).
   Threads share blocks of about BLOCK tokens (scores_span within each). */
#define BLOCK 512

void ap_scores_cols(const uint8_t *restrict codes, const _Float16 *restrict scales, const _Float16 *restrict mins,
                    const float *restrict x, float *restrict out, int64_t N, int64_t M, int64_t R, int64_t T,
                    int64_t nb, int64_t G, int64_t group, int bits, int64_t os) {
    const int64_t block = group <= BLOCK ? (BLOCK / group) * group : group;
    const int64_t blocks = (T + block - 1) / block;
    /* every (row, block of tokens) writes its own part of `out`: the blocks are shared among the threads */
#pragma omp parallel for schedule(static) if (N * T >= MIN_PARALLEL)
    for (int64_t i = 0; i < N * blocks; i++) {
        const int64_t n = i / blocks, t0 = (i % blocks) * block, len = t0 + block < T ? block : T - t0;
        const uint8_t *c = codes + n * R * nb;
        const _Float16 *s = scales + n * R * G, *mn = mins + n * R * G;
        float *o = out + n * os + t0;
        if (bits == 4 && group == 32) scores_span(c, s, mn, x + n * M * R, M, R, nb, G, 32, 4, t0, len, o, T);
        else if (bits == 8 && group == 32) scores_span(c, s, mn, x + n * M * R, M, R, nb, G, 32, 8, t0, len, o, T);
        else scores_span(c, s, mn, x + n * M * R, M, R, nb, G, group, bits, t0, len, o, T);
    }
}
