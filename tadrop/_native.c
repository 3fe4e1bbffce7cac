/* Fused CPU kernels of the merge methods (loaded by tadrop/native.py through ctypes).

Why: the torch path of EMR's elect/mask/unify runs ~15 elementwise operations over the K task
rows of a block, each one a pass through memory; fused, a block is read once.  Every result
here is the bit-for-bit result of the torch path in tadrop/methods.py (the same IEEE operations
on each element, in the same order), which the tests check on both paths.

No Python C-API: plain functions on raw pointers, so the library does not depend on the
Python version.  Inner loops run over the contiguous element index j, in tiles that stay in the
L1 cache, so that the compiler vectorises them; on x86-64 Linux every function is compiled for
AVX-512, AVX2 and the baseline, and the loader picks the best the CPU has (target_clones).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TADROP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TADROP_CLONES
#endif

#define TILE 512

int tadrop_native_abi(void) { return 4; }

/* EMR elect / mask / unify (official harveyhuang18/EMR_Merging `emr_merge`, SPEC 2;
   methods.emr is the torch path) on n elements of K task rows, tile by tile:
     S_j      = sum_k t[k][j] in float64, task order    (flag = +1 where S_j > 0, else -1)
     M_k,j    = t[k][j] * flag > 0  [and keep[k][j]]
     uni_j    = flag * max(+0, max_k over M_k,j of t[k][j] * flag)
     mu[k][j] = M_k,j ? max(...) : +0                   (the rescaler's |M_k tau_uni| term)
   t, keep, masks, mu: row k at row stride ldt, ldk, ldm, ldmu elements; keep may be NULL;
   masks are bytes 0/1 (torch bool).
   pre (NULL, or 3K floats lam, scale, weight per task): each t[k][j] is first replaced, in place,
   by ((|t| <= lam_k ? +0 : t) * scale_k) * weight_k in float32, the sparsifier's apply and the
   task weight as the engine runs them (sparsify.TADrop.apply, then the weight), fused here so
   the block is not walked once more for them.
   kept, hist (NULL, or K and K + 1 counters): the mask statistics of native.mask_counts, added. */
void tadrop_mask_counts(int64_t K, int64_t n, const uint8_t *m, int64_t ld, int64_t *kept,
                        int64_t *hist);

static inline __attribute__((always_inline)) void
emr_span(int64_t K, int64_t m, float *restrict t, int64_t ldt, const uint8_t *restrict keep,
         int64_t ldk, uint8_t *restrict masks, int64_t ldm, float *restrict uni,
         float *restrict mu, int64_t ldmu, const float *restrict pre, int64_t *kept, int64_t *hist)
{
    double S[TILE];
    float flag[TILE], u[TILE];
    for (int64_t j0 = 0; j0 < m; j0 += TILE) {
        const int64_t n = (m - j0 < TILE) ? m - j0 : TILE;
        for (int64_t j = 0; j < n; j++)
            S[j] = 0.0;
        for (int64_t k = 0; k < K; k++) {
            float *tk = t + k * ldt + j0;
            for (int64_t q = 0; q < TILE; q += 16)   /* the next tile of this row (no fault) */
                __builtin_prefetch(tk + TILE + q, 1, 3);
            if (pre != NULL) {
                const float lam = pre[k], sc = pre[K + k], w = pre[2 * K + k];
                for (int64_t j = 0; j < n; j++) {
                    const float v = ((fabsf(tk[j]) <= lam ? 0.0f : tk[j]) * sc) * w;
                    tk[j] = v;
                    S[j] = k ? S[j] + (double)v : (double)v;
                }
            } else {
                for (int64_t j = 0; j < n; j++)
                    S[j] = k ? S[j] + (double)tk[j] : (double)tk[j];
            }
        }
        for (int64_t j = 0; j < n; j++) {
            flag[j] = S[j] > 0.0 ? 1.0f : -1.0f;
            u[j] = 0.0f;
        }
        for (int64_t k = 0; k < K; k++) {
            const float *tk = t + k * ldt + j0;
            uint8_t *mk = masks + k * ldm + j0;
            if (keep != NULL) {
                const uint8_t *kk = keep + k * ldk + j0;
                for (int64_t j = 0; j < n; j++) {
                    const float p = tk[j] * flag[j];
                    const int on = (p > 0.0f) & (kk[j] != 0);
                    mk[j] = (uint8_t)on;
                    u[j] = (on && p > u[j]) ? p : u[j];
                }
            } else {
                for (int64_t j = 0; j < n; j++) {
                    const float p = tk[j] * flag[j];
                    const int on = p > 0.0f;
                    mk[j] = (uint8_t)on;
                    u[j] = (on && p > u[j]) ? p : u[j];
                }
            }
        }
        float *uo = uni + j0;
        for (int64_t j = 0; j < n; j++)
            uo[j] = u[j] * flag[j];
        for (int64_t k = 0; k < K; k++) {
            const uint8_t *mk = masks + k * ldm + j0;
            float *o = mu + k * ldmu + j0;
            for (int64_t j = 0; j < n; j++)
                o[j] = mk[j] ? u[j] : 0.0f;
        }
        if (kept != NULL)     /* a call: inlined into this loop nest, its loops do not vectorise */
            tadrop_mask_counts(K, n, masks + j0, ldm, kept, hist);
    }
}

/* Block sums in the order of _buffers._block_sums: pairwise halving of a SUM_BLOCK-element block,
   b[i] += b[i + s] for s = SUM_BLOCK/2, ..., 1, the sum being b[0].  The first level is taken
   straight from the input (two sequential streams), the others in an L1-resident buffer; every
   level is a contiguous vectorised loop.  IEEE addition is commutative, so only the tree (which
   values meet) decides the bits. */
#define SUM_BLOCK 4096
#define HALF (SUM_BLOCK / 2)

static inline double halve_rest(double *b)
{
    for (int64_t s = HALF / 2; s >= 1; s >>= 1)
        for (int64_t i = 0; i < s; i++)
            b[i] += b[i + s];
    return b[0];
}

static inline __attribute__((always_inline)) double f_op(const int op, const float x)
{
    const double d = (double)x;
    return op == 0 ? d : op == 1 ? fabs(d) : d * d;
}

/* One SUM_BLOCK-element block's sum of f(p[i]) (op 0: x, 1: |x|, 2: x * x). */
static inline __attribute__((always_inline)) double block_sum(const int op, const float *p)
{
    double b[HALF];
    for (int64_t i = 0; i < HALF; i++)
        b[i] = f_op(op, p[i]) + f_op(op, p[i + HALF]);
    return halve_rest(b);
}

/* EMR on one block of m elements (emr_span above), with the rescaler sums of the elements
   [head, head + nb * SUM_BLOCK) fused in: for each of those nb blocks and each task k,
   abs_sums[k * nb + b] = the block sum of |t[k]| and uni_sums[k * nb + b] = that of mu[k] (the
   order of tadrop_block_sums, so Sum64Rows takes them as its own), with mu kept in an L1/L2
   buffer instead of `mu` (which gets only the elements outside those blocks: the caller feeds
   them to Sum64Rows itself).  nb = 0: plain EMR, mu written everywhere.  pre, kept, hist: see
   emr_span.  Returns 2 when out of memory (nothing written), else 0. */
TADROP_CLONES
int tadrop_emr_block(int64_t K, int64_t m, float *t, int64_t ldt, const uint8_t *keep,
                     int64_t ldk, uint8_t *masks, int64_t ldm, float *uni, float *mu,
                     int64_t ldmu, int64_t head, int64_t nb, double *abs_sums, double *uni_sums,
                     const float *pre, int64_t *kept, int64_t *hist)
{
    if (nb <= 0 || K <= 0) {
        emr_span(K, m, t, ldt, keep, ldk, masks, ldm, uni, mu, ldmu, pre, kept, hist);
        return 0;
    }
    float *buf = malloc((size_t)K * SUM_BLOCK * sizeof *buf);
    if (buf == NULL)
        return 2;
    emr_span(K, head, t, ldt, keep, ldk, masks, ldm, uni, mu, ldmu, pre, kept, hist);
    for (int64_t b = 0; b < nb; b++) {
        const int64_t j0 = head + b * SUM_BLOCK;
        emr_span(K, SUM_BLOCK, t + j0, ldt, keep == NULL ? NULL : keep + j0, ldk, masks + j0, ldm,
                 uni + j0, buf, SUM_BLOCK, pre, kept, hist);
        for (int64_t k = 0; k < K; k++) {
            abs_sums[k * nb + b] = block_sum(1, t + k * ldt + j0);
            uni_sums[k * nb + b] = block_sum(0, buf + k * SUM_BLOCK);
        }
    }
    const int64_t j1 = head + nb * SUM_BLOCK;
    emr_span(K, m - j1, t + j1, ldt, keep == NULL ? NULL : keep + j1, ldk, masks + j1, ldm,
             uni + j1, mu + j1, ldmu, pre, kept, hist);
    free(buf);
    return 0;
}

/* TIES merged tensor on one block of m elements of K task rows (SPEC 2; methods.ties is the
   torch path):
     S_j    = sum_k t[k][j] in float64, task order     (s = +1 where S_j >= 0, else -1)
     a_k,j  = relu(t[k][j] * s)   (torch's relu: -0.0 stays -0.0, negatives give +0.0)
     v_j    = (sum_k a_k,j in float64, task order) / max(1, #{k : a_k,j > 0}) * s
     out_j  = (float)(v_j * lam + base_j)                (float64, rounded once) */
TADROP_CLONES
void tadrop_ties_block(int64_t K, int64_t m, const float *t, int64_t ldt, const float *base,
                       double lam, float *out)
{
    double S[TILE], num[TILE];
    float sg[TILE], cnt[TILE];
    for (int64_t j0 = 0; j0 < m; j0 += TILE) {
        const int64_t n = (m - j0 < TILE) ? m - j0 : TILE;
        for (int64_t j = 0; j < n; j++)
            S[j] = K > 0 ? (double)t[j0 + j] : 0.0;
        for (int64_t k = 1; k < K; k++) {
            const float *tk = t + k * ldt + j0;
            for (int64_t j = 0; j < n; j++)
                S[j] += (double)tk[j];
        }
        for (int64_t j = 0; j < n; j++)
            sg[j] = S[j] >= 0.0 ? 1.0f : -1.0f;
        for (int64_t k = 0; k < K; k++) {
            const float *tk = t + k * ldt + j0;
            for (int64_t j = 0; j < n; j++) {
                const float p = tk[j] * sg[j];
                const float a = p < 0.0f ? 0.0f : p;
                if (k == 0) {
                    num[j] = (double)a;
                    cnt[j] = a > 0.0f ? 1.0f : 0.0f;
                } else {
                    num[j] += (double)a;
                    cnt[j] += a > 0.0f ? 1.0f : 0.0f;
                }
            }
        }
        float *o = out + j0;
        const float *b = base + j0;
        for (int64_t j = 0; j < n; j++) {
            const double c = K > 0 ? (double)(cnt[j] < 1.0f ? 1.0f : cnt[j]) : 1.0;
            const double v = (K > 0 ? num[j] : 0.0) / c * (double)sg[j];
            o[j] = (float)(v * lam + (double)b[j]);
        }
    }
}

/* TADrop's apply on n contiguous floats, in place (sparsify.TADrop.apply is the torch path):
   x = 0 where |x| <= lambd (torch's hardshrink, which gives +0.0) when shrink, then x *= scale
   (float32) when rescale. */
TADROP_CLONES
void tadrop_shrink_scale(int64_t n, float *x, float lambd, int shrink, float scale, int rescale)
{
    if (shrink && rescale) {
        for (int64_t j = 0; j < n; j++)
            x[j] = (fabsf(x[j]) <= lambd ? 0.0f : x[j]) * scale;
    } else if (shrink) {
        for (int64_t j = 0; j < n; j++)
            x[j] = fabsf(x[j]) <= lambd ? 0.0f : x[j];
    } else if (rescale) {
        for (int64_t j = 0; j < n; j++)
            x[j] = x[j] * scale;
    }
}

static inline __attribute__((always_inline)) void
sums_op(const int op, int64_t K, int64_t nb, const float *x, int64_t ldx, double lam, double *out,
        double *out2)
{
    double b[HALF], kb[HALF];
    for (int64_t k = 0; k < K; k++) {
        for (int64_t blk = 0; blk < nb; blk++) {
            const float *p = x + k * ldx + blk * SUM_BLOCK;
            for (int64_t i = 0; i < HALF; i++)
                b[i] = f_op(op, p[i]) + f_op(op, p[i + HALF]);
            if (op == 3) {
                for (int64_t i = 0; i < HALF; i++) {
                    const double u = f_op(op, p[i]), v = f_op(op, p[i + HALF]);
                    kb[i] = (u > lam ? u : 0.0) + (v > lam ? v : 0.0);
                }
            }
            out[k * nb + blk] = halve_rest(b);
            if (op == 3)
                out2[k * nb + blk] = halve_rest(kb);
        }
    }
}

/* Float64 sums of f(x) over nb consecutive SUM_BLOCK-element blocks of each of K float32 rows
   (row k at x + k * ldx): out[k * nb + b].  op 0: x, 1: |x|, 2: x * x, 3: x * x, and out2 gets
   the sums of the squares above lam (those v = x * x with v > lam; TADrop's kept norm). */
TADROP_CLONES
void tadrop_block_sums(int64_t K, int64_t nb, const float *x, int64_t ldx, int op, double lam,
                       double *out, double *out2)
{
    switch (op) {
    case 0: sums_op(0, K, nb, x, ldx, lam, out, out2); break;
    case 1: sums_op(1, K, nb, x, ldx, lam, out, out2); break;
    case 2: sums_op(2, K, nb, x, ldx, lam, out, out2); break;
    default: sums_op(3, K, nb, x, ldx, lam, out, out2); break;
    }
}

/* Exact order statistics of |x| by counting (select.NativeOrder): the float32 bit pattern of |x|
   (sign cleared) orders like |x| itself, so the top 16 bits name a bucket of values and the low
   16 bits the value inside it; two histograms give every rank's value and count exactly, ties or
   not (a quickselect crawls through long runs of one value; counting does not care). */

/* hist[b] += #{i : bits(|x_i|) >> 16 == b} for b < 32768 (the sign bit is cleared) over n
   elements; returns 1 when some x_i is NaN or +-Inf (hist is then incomplete), 2 when out of
   memory, else 0.  Per tile, the buckets are first taken in a vectorised loop (which streams x
   from memory at full speed: 2.4x faster on tensors larger than the cache than one loop doing
   both), then counted into four 32-bit histograms in turn (512 KB, about L2), so a value
   repeated back to back (task vectors have long runs) does not wait on its own last increment;
   they are added into hist every 2^30 elements, before a counter could overflow. */
#define HI_BINS 32768
#define HI_TILE 1024
#define HI_SEGMENT (1LL << 30)

TADROP_CLONES
int tadrop_abs_hist_hi(const float *x, int64_t n, int64_t *hist)
{
    uint32_t *h = calloc(4 * HI_BINS, sizeof *h);
    if (h == NULL)
        return 2;
    const uint32_t *u = (const uint32_t *)x;
    uint32_t bad = 0;
    uint16_t key[HI_TILE];
    for (int64_t s0 = 0; s0 < n; s0 += HI_SEGMENT) {
        const int64_t s1 = (n - s0 < HI_SEGMENT) ? n : s0 + HI_SEGMENT;
        for (int64_t i0 = s0; i0 < s1; i0 += HI_TILE) {
            const int64_t t = (s1 - i0 < HI_TILE) ? s1 - i0 : HI_TILE;
            for (int64_t i = 0; i < t; i++) {
                const uint32_t a = u[i0 + i] & 0x7fffffffu;
                bad |= (a >= 0x7f800000u);
                key[i] = (uint16_t)(a >> 16);
            }
            int64_t i = 0;
            for (; i + 3 < t; i += 4) {
                h[key[i]]++;
                h[HI_BINS + key[i + 1]]++;
                h[2 * HI_BINS + key[i + 2]]++;
                h[3 * HI_BINS + key[i + 3]]++;
            }
            for (; i < t; i++)
                h[key[i]]++;
        }
        for (int64_t v = 0; v < HI_BINS; v++)
            hist[v] += (int64_t)h[v] + h[HI_BINS + v] + h[2 * HI_BINS + v] + h[3 * HI_BINS + v];
        memset(h, 0, 4 * HI_BINS * sizeof *h);
    }
    free(h);
    return bad != 0;
}

/* For each element whose bucket b has slot[b] < nslots (<= 256):
   lo[slot[b] * 65536 + (bits & 0xffff)]++.  Returns 0.  Per tile, the wanted elements' counter
   indices are first compacted without a branch (a branch on membership mispredicts whenever the
   wanted buckets hold a large share of the elements, i.e. long runs), then counted: 1.4x faster
   where the buckets hold 13% of a tensor; a variant sending the others to spare counters was 1.6x
   slower. */
static inline __attribute__((always_inline)) int64_t
hist_lo(const int skip_zeros, const uint32_t *u, int64_t n, const uint8_t *slot, int64_t nslots,
        int64_t *lo)
{
    uint32_t idx[HI_TILE], bits[HI_TILE];
    int64_t zeros = 0;
    for (int64_t i0 = 0; i0 < n; i0 += HI_TILE) {
        const int64_t t = (n - i0 < HI_TILE) ? n - i0 : HI_TILE;
        int64_t c = 0;
        for (int64_t i = 0; i < t; i++)       /* vectorised: streams x at full speed (2.1x) */
            bits[i] = u[i0 + i] & 0x7fffffffu;
        for (int64_t i = 0; i < t; i++) {
            const uint32_t a = bits[i];
            const uint32_t s = slot[a >> 16];
            idx[c] = (s << 16) | (a & 0xffffu);
            if (skip_zeros) {
                c += (s < (uint64_t)nslots) & (a != 0);
                zeros += (a == 0);
            } else {
                c += (s < (uint64_t)nslots);
            }
        }
        for (int64_t i = 0; i < c; i++)
            lo[idx[i]]++;
    }
    return zeros;
}

TADROP_CLONES
int tadrop_abs_hist_lo(const float *x, int64_t n, const uint8_t *slot, int64_t nslots, int64_t *lo)
{
    const uint32_t *u = (const uint32_t *)x;
    /* Where the zero bucket is asked, exact zeros (task vectors hold long runs of them) are
       counted apart, not one by one into their single counter, where each increment would wait
       on the last: 1.2x faster on the benchmark's embedding (41% zeros); elsewhere the plain loop
       (the extra count costs 1.1-1.3x there). */
    if (slot[0] < nslots)
        lo[(int64_t)slot[0] << 16] += hist_lo(1, u, n, slot, nslots, lo);
    else
        hist_lo(0, u, n, slot, nslots, lo);
    return 0;
}

/* Mask statistics of one block of K mask rows (bytes 0/1, row k at m + k * ld), n entries:
   kept[k] += entries row k keeps; hist[c] += entries kept by exactly c of the K rows (hist has
   K + 1 counters).  Counted by comparison per tile, as a histogram of K + 1 bins would stall on
   its few counters. */
TADROP_CLONES
void tadrop_mask_counts(int64_t K, int64_t n, const uint8_t *m, int64_t ld, int64_t *kept,
                        int64_t *hist)
{
    uint16_t c[TILE];
    for (int64_t j0 = 0; j0 < n; j0 += TILE) {
        const int64_t t = (n - j0 < TILE) ? n - j0 : TILE;
        for (int64_t j = 0; j < t; j++)
            c[j] = 0;
        for (int64_t k = 0; k < K; k++) {
            const uint8_t *mk = m + k * ld + j0;
            uint16_t s = 0;
            for (int64_t j = 0; j < t; j++) {
                c[j] += mk[j];
                s += mk[j];
            }
            kept[k] += s;
        }
        for (int64_t v = 0; v <= K; v++) {
            const uint16_t w = (uint16_t)v;
            uint16_t s = 0;                 /* at most TILE: 16 bits, and the loop vectorises */
            for (int64_t j = 0; j < t; j++)
                s += (uint16_t)(c[j] == w);
            hist[v] += s;
        }
    }
}
