/* One step of cached decoding through every decoder layer, in one call: the bf16 decoder at batch
 * 1-16 on a CPU with AVX512-BF16 (imagetx/model/native/__init__.py compiles, loads and calls it).
 * A step decodes W consecutive positions of each image (W = 1: sequential decoding; W > 1: a
 * pass of parallel decoding): B * W rows, each with its own cache places, computed exactly as a
 * one-position step computes it (every row has its own sums, in the same order, whatever B and
 * W), so a pass and W one-position steps give the same bits.
 *
 * Per layer, for each row (post-LN: x = LN(x + sublayer(x)); pre-LN:
 * x = x + sublayer(LN(x))):
 *   self-attention  qkv = Wqkv x (no bias); optional rotary rotation of q and k; k and v written
 *                   to the cache at `slot` (and to a second place when given: the local 2D ring);
 *                   softmax(q . k_j / sqrt(hd)) over the cached keys j in [lo, hi), times v;
 *                   out = Wo o (no bias);
 *   cross-attention (super-resolution) the same over the encoder's cached keys, queries Wq x;
 *   feed-forward    W2 relu(W1 x + b1) + b2.
 * Weights (packed once, see ROWS below), biases, LayerNorm parameters and caches are bf16; the
 * residual stream, softmax, LayerNorm and every sum are fp32; a vector is rounded to bf16 (round
 * to nearest even) where it enters a matrix product, and keys, values and queries where the
 * cache holds them, as in torch's bf16 path. Matrix-vector products stream each weight once per
 * step for all B images with _mm512_dpbf16_ps; OpenMP splits rows (and heads) across the
 * threads torch uses.
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

typedef uint16_t bf16;

typedef struct {
    const bf16 *wqkv, *wo, *w1, *b1, *w2, *b2;      /* packed (3a, d), (d, a), (f, d); (f); packed (d, f); (d) */
    const bf16 *ln1_w, *ln1_b, *ln2_w, *ln2_b;      /* norm_attn, norm_ffn (d) */
    bf16 *k, *v;                                     /* self-attention cache (B, h, N, hd) */
    long cache_b, cache_h;                           /* its strides over B and h, in elements */
    bf16 *k2, *v2;                                   /* NULL, or a second place for the new key/value */
    long k2_b, k2_h;                                 /* (the local 2D ring) and its strides */
    const bf16 *wq_c, *wo_c, *lnc_w, *lnc_b;         /* cross-attention (NULL without): packed (a, d), (d, a); (d) */
    const bf16 *mk, *mv;                             /* the encoder's keys/values (B, h, S, hd) */
    long mem_b, mem_h;
    long mem_len;
} Layer;

/* The contract with the ctypes side (imagetx/model/native/__init__.py), checked when the library
 * is loaded: DECODE_ABI, raised with any change to an exported function's arguments, and Layer's
 * size and field offsets, so that a field added here and not there (or the other way round) is
 * caught before any step runs. */
#define DECODE_ABI 2

int decode_abi(void) { return DECODE_ABI; }

/* Layer's fields in declaration order (sizeof(Layer) catches one added to the struct and not here). */
#define LAYER_FIELDS(X) X(wqkv) X(wo) X(w1) X(b1) X(w2) X(b2) X(ln1_w) X(ln1_b) X(ln2_w) X(ln2_b) X(k) X(v) \
    X(cache_b) X(cache_h) X(k2) X(v2) X(k2_b) X(k2_h) X(wq_c) X(wo_c) X(lnc_w) X(lnc_b) X(mk) X(mv) X(mem_b) X(mem_h) \
    X(mem_len)
#define LAYER_OFFSET(f) (long)offsetof(Layer, f),
#define LAYER_SIZE(f) (long)sizeof(((Layer *)0)->f),
#define LAYER_NAME(f) #f ","

/* The field names, comma-separated, in declaration order. */
const char *decode_layer_names(void) { return LAYER_FIELDS(LAYER_NAME); }

/* Writes the offsets and sizes of Layer's first n fields, in declaration order; returns sizeof(Layer). */
long decode_layer_layout(long *offsets, long *sizes, int n) {
    static const long at[] = {LAYER_FIELDS(LAYER_OFFSET)}, size[] = {LAYER_FIELDS(LAYER_SIZE)};
    for (int i = 0; i < n && i < (int)(sizeof(at) / sizeof(at[0])); i++) {
        offsets[i] = at[i];
        sizes[i] = size[i];
    }
    return (long)sizeof(Layer);
}

/* Weights are packed (native.pack): an (O, I) matrix as blocks of 16 rows, each block as its
 * ceil(I / 32) chunks of 32 columns, each chunk as its 16 rows of 32 bf16 (zeros past O and I).
 * A block is then one contiguous run of memory read front to back (one stream for the hardware
 * prefetchers instead of 16; on the AMD Zen 4 machine both read at about 24 GB/s, against 32-40
 * for a plain read), and each row has its own sum. */
#define ROWS 16

/* The sums of 16 vectors of partial sums a[0..15] as one vector, lane i the sum of a[i], each
 * added in the order of _mm512_reduce_add_ps (lanes i + 8 onto i, then i + 4, i + 2, i + 1), so
 * a key's logit is the same bit for bit whether it is summed here or alone. Four levels of
 * pairwise sums across vectors: 15 additions for 16 keys instead of 4 each. */
TARGET static inline __m512 sums16(const __m512 *a) {
    __m512 s[8], t[4], u[2];
    for (int i = 0; i < 8; i++)  /* lanes 0-7: a[2i]'s i + (i + 8), lanes 8-15: a[2i + 1]'s */
        s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane, one key: its i + (i + 4) */
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88), _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)  /* per 64 bits, one key: its i + (i + 2) */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    /* per lane, one key: its 0 + 1; then the lanes back in key order */
    const __m512 v = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), v);
}

/* The products of several images with a block go IMAGES images and QUARTER rows at a time:
 * 16 accumulators, with the IMAGES vectors of x and one of W beside them (21 of the 32 vector
 * registers). Each weight vector loaded then serves IMAGES images and each vector of x QUARTER
 * rows, so a pass of W positions reads the block from cache W / IMAGES times, not W times; and
 * the 16 sums come out together (sums16), where summing each alone costs more than the products
 * of a short row. */
#define IMAGES 4
#define QUARTER 4
#define SPAN 16  /* chunks (512 columns) */
#define GROUP 16  /* images */

/* The first n of 16 lanes (all 16 from n = 16 on). */
static inline __mmask16 first16(long n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

/* The first n of 32 lanes (all 32 from n = 32 on). */
static inline __mmask32 first32(long n) { return n >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1); }

/* n bf16 at p (n <= 16) -> fp32 in the first n lanes, zeros after. */
TARGET static inline __m512 bf16_lanes(const bf16 *p, int n) {
    const __m256i raw = _mm256_maskz_loadu_epi16(first16(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* 16 floats -> bf16, rounded to nearest even as torch rounds: the top half of u + 0x7fff + (bit
 * 16 of u), u the float's bits; a NaN stays a quiet NaN. */
TARGET static inline __m256i round16(__m512 v) {
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x40);
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, lsb)), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, magnitude), inf);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), quiet);
    return _mm512_cvtepi32_epi16(r);
}

/* y[b, o .. o + 16) = W[o .. o + 16) x[b] (+ bias) for every image b, for the block at o (rows
 * past O are not written). x bf16 (B, xs) rows, zero from I to the next multiple of 32; y fp32
 * (B, ys), or where yb is not NULL, relu(y) = max(y, 0) (NaN -> 0, as y > 0 ? y : 0) rounded
 * to bf16 into yb (B, ys) instead: the feed-forward's hidden rows, with no phase of their own. Each (row,
 * image) sum is the same sequence of operations in every path: one
 * accumulator over the chunks in order, its lanes summed as _mm512_reduce_add_ps sums them
 * (sums16), then the bias. That keeps a W-position pass of the fused step equal, bit for bit, to
 * W one-position steps (model/decoding.py relies on it). */
TARGET static void dot_block(const bf16 *block, long chunks, const bf16 *bias, const bf16 *x, long xs, float *y, bf16 *yb,
                             long ys, int B, long o, long O) {
    const int n = O - o < ROWS ? (int)(O - o) : ROWS;
    /* the next block is fetched while this one is worked on, spread evenly over its products:
     * its ROWS x chunks cache lines over the (B / IMAGES) x (ROWS / QUARTER) x chunks steps below */
    const char *ahead = (const char *)(block + chunks * ROWS * 32), *ahead_end = ahead + chunks * ROWS * 64;
    const int steps = (B / IMAGES) * (ROWS / QUARTER), ahead_per_step = steps ? (ROWS + steps - 1) / steps : 0;
    /* Rows longer than SPAN chunks go SPAN chunks at a time over each GROUP of images, every
     * accumulator kept in `held` between spans (stored and loaded as it is: the same sums in the
     * same order). A span of the block and of the group's x then stays in L1 while the group's
     * 16 tiles read it: a whole w2 block (16 x 2048 bf16, 64 KB) and 16 rows of x (64 KB) do
     * not fit Zen 4's 32 KB, and one thread's products at I = 2048 ran at 327-362 GFLOP/s
     * against 433-456 at I = 512 (micro-benchmark, hot and streaming weights); now 390-405. A
     * 16-position pass at the CIFAR-10 config: 3.01 -> 2.81 ms (AMD EPYC Zen 4, 2 threads). */
    const int full = B / IMAGES * IMAGES;
    const long span = chunks > SPAN ? SPAN : chunks;
    __m512 held[GROUP / IMAGES * (ROWS / QUARTER) * 16];
    for (int g = 0; g < full; g += GROUP) {
        const int g_end = g + GROUP < full ? g + GROUP : full;
        for (long c0 = 0; c0 < chunks; c0 += span) {
            const long c1 = c0 + span < chunks ? c0 + span : chunks;
            for (int b = g; b < g_end; b += IMAGES) {
                const bf16 *x0 = x + b * xs, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
                for (int h = 0; h < n; h += QUARTER) {
                    __m512 acc[16];  /* image i, row h + r: acc[4 i + r] */
                    __m512 *keep = held + ((b - g) / IMAGES * (ROWS / QUARTER) + h / QUARTER) * 16;
                    if (c0 == 0) {
#pragma GCC unroll 16
                        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
                    } else {
#pragma GCC unroll 16
                        for (int i = 0; i < 16; i++) acc[i] = keep[i];
                    }
                    const bf16 *w = block + 32 * h + c0 * ROWS * 32;
                    for (long c = c0; c < c1; c++, w += ROWS * 32) {
                        for (int i = 0; i < ahead_per_step && ahead < ahead_end; i++, ahead += 64) _mm_prefetch(ahead, _MM_HINT_T0);
                        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(x0 + 32 * c);
                        const __m512bh v1 = (__m512bh)_mm512_loadu_si512(x1 + 32 * c);
                        const __m512bh v2 = (__m512bh)_mm512_loadu_si512(x2 + 32 * c);
                        const __m512bh v3 = (__m512bh)_mm512_loadu_si512(x3 + 32 * c);
#pragma GCC unroll 4
                        for (int r = 0; r < QUARTER; r++) {
                            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + 32 * r);
                            acc[r] = _mm512_dpbf16_ps(acc[r], wv, v0);
                            acc[4 + r] = _mm512_dpbf16_ps(acc[4 + r], wv, v1);
                            acc[8 + r] = _mm512_dpbf16_ps(acc[8 + r], wv, v2);
                            acc[12 + r] = _mm512_dpbf16_ps(acc[12 + r], wv, v3);
                        }
                    }
                    if (c1 < chunks) {
#pragma GCC unroll 16
                        for (int i = 0; i < 16; i++) keep[i] = acc[i];
                        continue;
                    }
                    __m512 s = sums16(acc);  /* lane 4 i + r */
                    const int m = n - h < QUARTER ? n - h : QUARTER;
                    if (bias) {  /* the same four biases for each image */
                        const __m128 b4 = _mm512_castps512_ps128(bf16_lanes(bias + o + h, m));
                        s = _mm512_add_ps(s, _mm512_broadcast_f32x4(b4));
                    }
                    const __mmask8 keep4 = (__mmask8)((1u << m) - 1);
                    if (yb) {
                        const __m256i r = round16(_mm512_max_ps(s, _mm512_setzero_ps()));
                        const __m128i r01 = _mm256_castsi256_si128(r), r23 = _mm256_extracti128_si256(r, 1);
                        bf16 *yh = yb + b * ys + o + h;
                        _mm_mask_storeu_epi16(yh, keep4, r01);
                        _mm_mask_storeu_epi16(yh + ys, keep4, _mm_srli_si128(r01, 8));
                        _mm_mask_storeu_epi16(yh + 2 * ys, keep4, r23);
                        _mm_mask_storeu_epi16(yh + 3 * ys, keep4, _mm_srli_si128(r23, 8));
                        continue;
                    }
                    float *yh = y + b * ys + o + h;
                    _mm_mask_storeu_ps(yh, keep4, _mm512_extractf32x4_ps(s, 0));
                    _mm_mask_storeu_ps(yh + ys, keep4, _mm512_extractf32x4_ps(s, 1));
                    _mm_mask_storeu_ps(yh + 2 * ys, keep4, _mm512_extractf32x4_ps(s, 2));
                    _mm_mask_storeu_ps(yh + 3 * ys, keep4, _mm512_extractf32x4_ps(s, 3));
                }
            }
        }
    }
    int b = full;
    for (; b < B; b++) {  /* the images left over, one at a time over all 16 rows */
        const bf16 *xb = x + b * xs;
        __m512 acc[ROWS];
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        const bf16 *w = block;
        for (long c = 0; c < chunks; c++, w += ROWS * 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + 32 * c);
#pragma GCC unroll 16
            for (int r = 0; r < ROWS; r++) acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + 32 * r), xv);
        }
        __m512 s = sums16(acc);  /* lane r: row r */
        if (bias) s = _mm512_add_ps(s, bf16_lanes(bias + o, n));
        if (yb)
            _mm256_mask_storeu_epi16(yb + b * ys + o, first16(n), round16(_mm512_max_ps(s, _mm512_setzero_ps())));
        else
            _mm512_mask_storeu_ps(y + b * ys + o, first16(n), s);
    }
}

/* The blocks of 16 rows this thread computes: a contiguous run, split evenly. */
static void my_blocks(long blocks, long *b0, long *b1) {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    long per = blocks / n, extra = blocks % n;
    *b0 = t * per + (t < extra ? t : extra);
    *b1 = *b0 + per + (t < extra ? 1 : 0);
}

/* y = W x (+ bias) for all B images, W packed (O, I) (yb: see dot_block); inside a parallel
 * region, ends with a barrier. */
TARGET static void gemv(const bf16 *W, const bf16 *bias, const bf16 *x, long xs, float *y, bf16 *yb, long ys, int B,
                        long O, long I) {
    const long chunks = (I + 31) / 32, blocks = (O + ROWS - 1) / ROWS;
    long b0, b1;
    my_blocks(blocks, &b0, &b1);
    for (long k = b0; k < b1; k++) dot_block(W + k * chunks * ROWS * 32, chunks, bias, x, xs, y, yb, ys, B, k * ROWS, O);
#pragma omp barrier
}

/* dst (n) bf16 = src (n) fp32, rounded to nearest even as torch rounds (round16), 16 at a time. */
TARGET static void round_row(bf16 *dst, const float *src, long n) {
    for (long i = 0; i < n; i += 16) {
        const __mmask16 m = first16(n - i);
        _mm256_mask_storeu_epi16(dst + i, m, round16(_mm512_maskz_loadu_ps(m, src + i)));
    }
}

/* The same for a vector entering a product, then zeros up to a multiple of 32: the packed
 * weights' padding must meet zeros, not stale values that could be NaN. */
TARGET static void round_input(bf16 *dst, const float *src, long n) {
    round_row(dst, src, n);
    for (long i = n; i % 32; i++) dst[i] = 0;
}

/* The sum of the 8 lanes of v, in a fixed order. */
TARGET static inline double sum8(__m512d v) {
    const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
}

/* out = LayerNorm(in) with bf16 weight and bias (biased variance, as torch): the mean and the
 * variance summed in double, 8 lanes at a time; out = ((in - mean) * inv) * w + b in fp32. */
TARGET static void layer_norm(float *out, const float *in, const bf16 *w, const bf16 *b, long d, float eps) {
    __m512d s = _mm512_setzero_pd();
    for (long i = 0; i < d; i += 8) s = _mm512_add_pd(s, _mm512_cvtps_pd(_mm256_maskz_loadu_ps((__mmask8)first16(d - i), in + i)));
    const double mean = sum8(s) / d;
    const __m512d mean8 = _mm512_set1_pd(mean);
    __m512d q = _mm512_setzero_pd();
    for (long i = 0; i < d; i += 8) {
        const __mmask8 m = (__mmask8)first16(d - i);
        const __m512d c = _mm512_maskz_sub_pd(m, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m, in + i)), mean8);
        q = _mm512_add_pd(q, _mm512_mul_pd(c, c));
    }
    const __m512 inv = _mm512_set1_ps(1.f / sqrtf((float)(sum8(q) / d) + eps)), m = _mm512_set1_ps((float)mean);
    for (long i = 0; i < d; i += 16) {
        const int n = d - i < 16 ? (int)(d - i) : 16;
        const __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(first16(n), in + i), m), inv);
        _mm512_mask_storeu_ps(out + i, first16(n), _mm512_add_ps(_mm512_mul_ps(x, bf16_lanes(w + i, n)), bf16_lanes(b + i, n)));
    }
}

/* q . k for one key row k (hd bf16) and the query q (hd bf16), as a vector of partial sums. */
TARGET static inline __m512 dot_key(const bf16 *k, const bf16 *q, long full, long rest, __mmask32 tail) {
    __m512 acc = _mm512_setzero_ps();
    for (long i = 0; i < full; i++)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(k + 32 * i), (__m512bh)_mm512_loadu_si512(q + 32 * i));
    if (rest)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(tail, k + 32 * full),
                               (__m512bh)_mm512_maskz_loadu_epi16(tail, q + 32 * full));
    return acc;
}

/* e^x for x <= 0 in each lane, within 1 unit in the last place of glibc's expf (checked on
 * about 1e9 floats down to -110): x = n ln 2 + r with |r| <= ln 2 / 2, e^r by Cephes' expf
 * polynomial, times 2^n (scalef: exact, to 0 below the smallest float). Softmax weights, 16
 * keys at a time. */
TARGET static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  /* e^-104 is 0 in float; also keeps n finite */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, n);
}

/* out (hd) = inv * sum_j p[j - lo] v_j over the value rows v_j = row ROW(j) of V. Each
 * dimension's sum runs over the keys in order as two sums, of the keys at even and at odd
 * places from lo, added at the end: more chains of fmas in flight, where one chain a dimension
 * waited on each fma's latency. 64 dimensions per pass over the keys, read as pairs: a bf16 at
 * an even place becomes a float by a shift, one at an odd place by a mask; the sums are
 * interleaved back into dimension order once. The same for every caller, so a pass and a
 * one-position step sum a position's values alike. */
TARGET static void attend_values(float *out, const float *p, const bf16 *V, long lo, long hi, long hd, const long *rows,
                                 __m512 inv) {
    const __m512i odd_half = _mm512_set1_epi32((int)0xFFFF0000);
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (long c = 0; c < hd; c += 64) {
        const long m0 = hd - c < 32 ? hd - c : 32, m1 = hd - c - 32 < 0 ? 0 : hd - c - 32 > 32 ? 32 : hd - c - 32;
        const __mmask32 k0 = first32(m0), k1 = first32(m1);
        /* [key parity]: dimensions c .. c + 32 even and odd places, then c + 32 .. c + 64 */
        __m512 e0[2], o0[2], e1[2], o1[2];
        for (int t = 0; t < 2; t++) e0[t] = o0[t] = e1[t] = o1[t] = _mm512_setzero_ps();
#define ADD_KEY(t, jj, row)                                                                          \
        {                                                                                            \
            const bf16 *vj = V + (row) * hd + c;                                                     \
            const __m512 w = _mm512_set1_ps(p[(jj) - lo]);                                           \
            const __m512i v0 = _mm512_maskz_loadu_epi16(k0, vj);                                     \
            e0[t] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), e0[t]);      \
            o0[t] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_and_si512(v0, odd_half)), o0[t]); \
            if (m1) {                                                                                \
                const __m512i v1 = _mm512_maskz_loadu_epi16(k1, vj + 32);                            \
                e1[t] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), e1[t]);  \
                o1[t] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_and_si512(v1, odd_half)), o1[t]); \
            }                                                                                        \
        }
#define ALL_KEYS(row_of)                                                                             \
        {                                                                                            \
            long j = lo;                                                                             \
            for (; j + 2 <= hi; j += 2) {                                                            \
                ADD_KEY(0, j, row_of(j))                                                             \
                ADD_KEY(1, j + 1, row_of(j + 1))                                                     \
            }                                                                                        \
            if (j < hi) ADD_KEY(0, j, row_of(j))                                                     \
        }
#define LISTED(j) rows[j]
#define IN_ORDER(j) (j)
        if (rows) {
            ALL_KEYS(LISTED)
        } else {
            ALL_KEYS(IN_ORDER)
        }
#undef LISTED
#undef IN_ORDER
#undef ALL_KEYS
#undef ADD_KEY
        /* dimensions c + 32 g .. c + 32 g + 32 in order: the first 16 of the interleaved pairs, then the rest */
        const __m512 even[2] = {_mm512_add_ps(e0[0], e0[1]), _mm512_add_ps(e1[0], e1[1])};
        const __m512 odd[2] = {_mm512_add_ps(o0[0], o0[1]), _mm512_add_ps(o1[0], o1[1])};
        const long m[2] = {m0, m1};
        for (int g = 0; g < 2; g++) {
            _mm512_mask_storeu_ps(out + c + 32 * g, first16(m[g]), _mm512_mul_ps(_mm512_permutex2var_ps(even[g], first, odd[g]), inv));
            _mm512_mask_storeu_ps(out + c + 32 * g + 16, first16(m[g] > 16 ? m[g] - 16 : 0),
                                  _mm512_mul_ps(_mm512_permutex2var_ps(even[g], second, odd[g]), inv));
        }
    }
}

/* One query over keys K[lo:hi] and values V[lo:hi] (rows of hd bf16): out (hd fp32) =
 * softmax_j(scale * q . k_j) v_j, q bf16 (hd). p: scratch of hi - lo floats. Keys 16 at a
 * time (their sums through sums16), then their weights 16 at a time; the values by attend_values.
 * rows: NULL, or key j is row rows[j] of K and V (the same arithmetic over the same keys in the
 * same order). The logits from key `from` on (lo + a multiple of 16: those before it are in p
 * already, see attend_group). */
#define ROW(j) (rows ? rows[j] : (j))
TARGET static void logits_from(float *p, const bf16 *q, float scale, const bf16 *K, long lo, long from, long hi, long hd,
                               const long *rows) {
    const long full = hd / 32, rest = hd % 32;
    const __mmask32 tail = rest ? (__mmask32)((1ull << rest) - 1) : 0;
    const __m512 scales = _mm512_set1_ps(scale);
    long j = from;
    for (; j + 16 <= hi; j += 16) {
        __m512 a[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) a[i] = dot_key(K + ROW(j + i) * hd, q, full, rest, tail);
        _mm512_storeu_ps(p + (j - lo), _mm512_mul_ps(sums16(a), scales));
    }
    for (; j < hi; j++) p[j - lo] = _mm512_reduce_add_ps(dot_key(K + ROW(j) * hd, q, full, rest, tail)) * scale;
}

/* p (n_keys logits) -> their softmax weights e^(p - max), unnormalised; returns 1 / their sum. */
TARGET static __m512 softmax_weights(float *p, long n_keys) {
    __m512 most = _mm512_set1_ps(-INFINITY);
    for (long j = 0; j < n_keys; j += 16) {
        const __mmask16 m = first16(n_keys - j);
        most = _mm512_mask_max_ps(most, m, most, _mm512_maskz_loadu_ps(m, p + j));
    }
    const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(most));
    __m512 sums = _mm512_setzero_ps();  /* lane i: the weights of keys i, i + 16, ... in order */
    for (long j = 0; j < n_keys; j += 16) {
        const __mmask16 m = first16(n_keys - j);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + j), best));
        _mm512_mask_storeu_ps(p + j, m, e);
        sums = _mm512_mask_add_ps(sums, m, sums, e);
    }
    return _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sums));
}

TARGET static void attend_one(float *out, const bf16 *q, float scale, const bf16 *K, const bf16 *V, long lo, long hi,
                              long hd, float *p, const long *rows) {
    logits_from(p, q, scale, K, lo, lo, hi, hd, rows);
    attend_values(out, p, V, lo, hi, hd, rows, softmax_weights(p, hi - lo));
}

/* QUERIES queries of one image and head over the same keys from lo (the consecutive positions
 * of a pass, in one block: query i sees [lo, hi[i])), each computed exactly as attend_one
 * computes it alone, but each key and value row read once for all of them where their ranges
 * overlap. The logits: 4 keys x 4 queries per sums16 (a lane's sum is its own vector's, in the
 * same order wherever it sits), over the blocks of 16 keys that are whole for every query; the
 * rest of each query's keys by logits_from. The values: 32 dimensions at a time, each row
 * converted once and fma'd into each query's two chains (keys at even and odd places from lo)
 * while every query sees it; then each query's own last keys into its own chains. A
 * 16-position pass at the CIFAR-10 config read every key and value row 16 times, once per
 * query; with this, 2.76 -> 2.55 ms at 300 keys, 3.58 -> 2.90 at 500 (AMD EPYC Zen 4, 2
 * threads). The values 16 keys at a time over all dimensions (chains held in memory between,
 * rows read once from L2 instead of once per 32 dimensions) measured 3-7% slower. */
#define QUERIES 4
TARGET static void attend_group(float *const *out, const bf16 *const *q, float scale, const bf16 *K, const bf16 *V,
                                long lo, const long *hi, long hd, float *const *p) {
    long common = hi[0], last = hi[0];
    for (int i = 1; i < QUERIES; i++) {
        common = hi[i] < common ? hi[i] : common;
        last = hi[i] > last ? hi[i] : last;
    }
    const long whole = lo + (common - lo) / 16 * 16;  /* keys in blocks of 16 whole for every query */
    const long full = hd / 32, rest = hd % 32;
    const __mmask32 tail = rest ? (__mmask32)((1ull << rest) - 1) : 0;
    const __m512 scales = _mm512_set1_ps(scale);
    for (long j = lo; j < whole; j += 4) {
        __m512 a[16];  /* query i, key j + k: a[4 i + k] */
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) a[i] = _mm512_setzero_ps();
        const bf16 *k0 = K + j * hd;
        for (long c = 0; c < full; c++) {
            const __m512bh q0 = (__m512bh)_mm512_loadu_si512(q[0] + 32 * c), q1 = (__m512bh)_mm512_loadu_si512(q[1] + 32 * c);
            const __m512bh q2 = (__m512bh)_mm512_loadu_si512(q[2] + 32 * c), q3 = (__m512bh)_mm512_loadu_si512(q[3] + 32 * c);
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const __m512bh kv = (__m512bh)_mm512_loadu_si512(k0 + k * hd + 32 * c);
                a[k] = _mm512_dpbf16_ps(a[k], kv, q0);
                a[4 + k] = _mm512_dpbf16_ps(a[4 + k], kv, q1);
                a[8 + k] = _mm512_dpbf16_ps(a[8 + k], kv, q2);
                a[12 + k] = _mm512_dpbf16_ps(a[12 + k], kv, q3);
            }
        }
        if (rest) {
            const __m512bh q0 = (__m512bh)_mm512_maskz_loadu_epi16(tail, q[0] + 32 * full);
            const __m512bh q1 = (__m512bh)_mm512_maskz_loadu_epi16(tail, q[1] + 32 * full);
            const __m512bh q2 = (__m512bh)_mm512_maskz_loadu_epi16(tail, q[2] + 32 * full);
            const __m512bh q3 = (__m512bh)_mm512_maskz_loadu_epi16(tail, q[3] + 32 * full);
            for (int k = 0; k < 4; k++) {
                const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(tail, k0 + k * hd + 32 * full);
                a[k] = _mm512_dpbf16_ps(a[k], kv, q0);
                a[4 + k] = _mm512_dpbf16_ps(a[4 + k], kv, q1);
                a[8 + k] = _mm512_dpbf16_ps(a[8 + k], kv, q2);
                a[12 + k] = _mm512_dpbf16_ps(a[12 + k], kv, q3);
            }
        }
        const __m512 s = _mm512_mul_ps(sums16(a), scales);
        _mm_storeu_ps(p[0] + (j - lo), _mm512_extractf32x4_ps(s, 0));
        _mm_storeu_ps(p[1] + (j - lo), _mm512_extractf32x4_ps(s, 1));
        _mm_storeu_ps(p[2] + (j - lo), _mm512_extractf32x4_ps(s, 2));
        _mm_storeu_ps(p[3] + (j - lo), _mm512_extractf32x4_ps(s, 3));
    }
    __m512 inv[QUERIES];
    for (int i = 0; i < QUERIES; i++) {
        logits_from(p[i], q[i], scale, K, lo, whole, hi[i], hd, NULL);
        inv[i] = softmax_weights(p[i], hi[i] - lo);
    }
    const __m512i odd_half = _mm512_set1_epi32((int)0xFFFF0000);
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (long c = 0; c < hd; c += 32) {
        const long m = hd - c < 32 ? hd - c : 32;
        const __mmask32 k32 = first32(m);
        __m512 e[QUERIES][2], o[QUERIES][2];  /* query i, key parity t: its even and odd dimensions */
#pragma GCC unroll 4
        for (int i = 0; i < QUERIES; i++) e[i][0] = e[i][1] = o[i][0] = o[i][1] = _mm512_setzero_ps();
#define ADD_VALUE(i, t, jj, v)                                                              \
        {                                                                                   \
            const __m512 w = _mm512_set1_ps(p[i][(jj) - lo]);                               \
            e[i][t] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), e[i][t]);      \
            o[i][t] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_and_si512(v, odd_half)), o[i][t]); \
        }
        long j = lo;
        for (; j + 2 <= common; j += 2) {
            const __m512i v0 = _mm512_maskz_loadu_epi16(k32, V + j * hd + c), v1 = _mm512_maskz_loadu_epi16(k32, V + (j + 1) * hd + c);
#pragma GCC unroll 4
            for (int i = 0; i < QUERIES; i++) {
                ADD_VALUE(i, 0, j, v0)
                ADD_VALUE(i, 1, j + 1, v1)
            }
        }
        for (; j < common; j++) {  /* one left (at an even place) */
            const __m512i v = _mm512_maskz_loadu_epi16(k32, V + j * hd + c);
#pragma GCC unroll 4
            for (int i = 0; i < QUERIES; i++) ADD_VALUE(i, 0, j, v)
        }
        for (; j < last; j++) {  /* each query's own last keys */
            const __m512i v = _mm512_maskz_loadu_epi16(k32, V + j * hd + c);
            const int t = (j - lo) & 1;
#pragma GCC unroll 4
            for (int i = 0; i < QUERIES; i++) {
                if (j >= hi[i]) continue;
                if (t) ADD_VALUE(i, 1, j, v) else ADD_VALUE(i, 0, j, v)
            }
        }
#undef ADD_VALUE
#pragma GCC unroll 4
        for (int i = 0; i < QUERIES; i++) {
            const __m512 even = _mm512_add_ps(e[i][0], e[i][1]), odd = _mm512_add_ps(o[i][0], o[i][1]);
            _mm512_mask_storeu_ps(out[i] + c, first16(m), _mm512_mul_ps(_mm512_permutex2var_ps(even, first, odd), inv[i]));
            _mm512_mask_storeu_ps(out[i] + c + 16, first16(m > 16 ? m - 16 : 0),
                                  _mm512_mul_ps(_mm512_permutex2var_ps(even, second, odd), inv[i]));
        }
    }
}

/* The length of a bf16 row entering a product: the widest input (d, f or a), rounded up to 32,
 * and 64 more. At d_ff = 2048 the rows were 4 KB apart, so the same columns of the 16 rows a
 * product reads fell in the same L1 sets: one thread's products at I = 512 ran at 440-446
 * GFLOP/s with rows 4 KB apart, 456-460 with 4 KB + 128 bytes (micro-benchmark, hot weights). */
static long row_len(int d, int f, int a) {
    int w = f > d ? f : d;
    return ((w > a ? w : a) + 31) / 32 * 32 + 64;
}

/* Scratch floats decode_step needs for these sizes (the caller allocates them). */
long decode_scratch_floats(int B, int d, int a, int f, int h, long keys) {
    long x_bf = (long)B * row_len(d, f, a) / 2 + 16;  /* bf16 rows, in floats */
    return (long)B * d * 2 + (long)B * 3 * a + (long)B * a + 2 * x_bf + (long)h * B * (keys + 16) + 64;
}

/* Row r's input to sublayer `sub` of L (0 self-attention, 1 cross-attention, 2 feed-forward),
 * rounded to bf16 into xbr; pre-LN: normalised first, into tr. */
TARGET static void sublayer_input(const Layer *L, int sub, int pre_norm, float eps, const float *xr, float *tr, bf16 *xbr,
                                  long d) {
    const bf16 *nw = sub == 0 ? L->ln1_w : sub == 1 ? L->lnc_w : L->ln2_w;
    const bf16 *nb = sub == 0 ? L->ln1_b : sub == 1 ? L->lnc_b : L->ln2_b;
    if (pre_norm) {
        layer_norm(tr, xr, nw, nb, d, eps);
        xr = tr;
    }
    round_input(xbr, xr, d);
}

/* The places of decode_step, passed to its parts. */
typedef struct {
    int B, W, h, hd, a, P, ring;
    const long *slot, *lo, *hi, *off2, *key_rows, *rows_at;
    const float *cos, *sin;
    float *qkv, *o, *probs;
    bf16 *xb;
    long xs, keys;
    float scale;
} Step;

/* Row r's key and value of head `head` into the cache (rotary first: q and k in place). */
TARGET static void write_kv(const Layer *L, const Step *S, int r, int head) {
    const int b = r / S->W, j = r % S->W, hd = S->hd, P = S->P;
    float *q = S->qkv + (long)r * 3 * S->a + (long)head * hd;
    float *k = q + S->a, *v = q + 2 * S->a;
    if (S->cos) {  /* rotary: pairs (i, P + i) of q and k */
        const float *cj = S->cos + (long)j * P, *sj = S->sin + (long)j * P;
        for (int i = 0; i < P; i++) {
            float q1 = q[i], q2 = q[P + i], k1 = k[i], k2 = k[P + i];
            q[i] = q1 * cj[i] - q2 * sj[i];
            q[P + i] = q2 * cj[i] + q1 * sj[i];
            k[i] = k1 * cj[i] - k2 * sj[i];
            k[P + i] = k2 * cj[i] + k1 * sj[i];
        }
    }
    if (S->ring) {
        round_row(L->k2 + b * L->k2_b + head * L->k2_h + S->slot[j] * hd, k, hd);
        round_row(L->v2 + b * L->k2_b + head * L->k2_h + S->slot[j] * hd, v, hd);
        return;
    }
    bf16 *kc = L->k + b * L->cache_b + head * L->cache_h;
    bf16 *vc = L->v + b * L->cache_b + head * L->cache_h;
    round_row(kc + S->slot[j] * hd, k, hd);
    round_row(vc + S->slot[j] * hd, v, hd);
    if (L->k2 && S->off2) {
        memcpy(L->k2 + b * L->k2_b + head * L->k2_h + S->off2[j], kc + S->slot[j] * hd, hd * sizeof(bf16));
        memcpy(L->v2 + b * L->k2_b + head * L->k2_h + S->off2[j], vc + S->slot[j] * hd, hd * sizeof(bf16));
    }
}

/* Row r's attention output of head `head` rounded into its slice of the row entering the out
 * projection (round_input rounds each float alone: slices give the row's bits), the zeros past
 * a with the last head. */
TARGET static void round_head(const Step *S, int r, int head) {
    bf16 *xbr = S->xb + (long)r * S->xs;
    round_row(xbr + (long)head * S->hd, S->o + (long)r * S->a + (long)head * S->hd, S->hd);
    if (head == S->h - 1)
        for (long i = S->a; i % 32; i++) xbr[i] = 0;
}

/* Row r, head `head`: one query by attend_one (self-attention, ring or cross), its output rounded. */
TARGET static void attend_row(const Layer *L, const Step *S, int cross, int r, int head) {
    const int b = r / S->W, j = r % S->W, hd = S->hd;
    const float *q = S->qkv + (long)r * 3 * S->a + (long)head * hd;
    const bf16 *K, *V;
    const long *rows = NULL;
    long from, to;
    if (cross) {
        K = L->mk + b * L->mem_b + head * L->mem_h;
        V = L->mv + b * L->mem_b + head * L->mem_h;
        from = 0;
        to = L->mem_len;
    } else if (S->ring) {
        K = L->k2 + b * L->k2_b + head * L->k2_h;
        V = L->v2 + b * L->k2_b + head * L->k2_h;
        rows = S->key_rows + S->rows_at[j];
        from = S->lo[j];
        to = S->hi[j];
    } else {
        K = L->k + b * L->cache_b + head * L->cache_h;
        V = L->v + b * L->cache_b + head * L->cache_h;
        from = S->lo[j];
        to = S->hi[j];
    }
    bf16 qb[hd + 32];  /* the query rounded to bf16, as the keys are */
    round_row(qb, q, hd);
    float *out = S->o + (long)r * S->a + (long)head * hd, *p = S->probs + ((long)r * S->h + head) * (S->keys + 16);
    if (rows)
        attend_one(out, qb, S->scale, K, V, from, to, hd, p, rows);
    else  /* its own call, which the compiler specialises to rows in order: B = 16 one-position
           * steps took 5% longer through the call above alone */
        attend_one(out, qb, S->scale, K, V, from, to, hd, p, NULL);
    round_head(S, r, head);
}

/* Image b, head `head`, the pass's positions [j0, j1) (self-attention, not the ring): runs of
 * QUERIES with the same first key by attend_group, the others by attend_one; outputs rounded. */
TARGET static void attend_rows(const Layer *L, const Step *S, int b, int head, int j0, int j1) {
    const int hd = S->hd;
    const bf16 *K = L->k + b * L->cache_b + head * L->cache_h;
    const bf16 *V = L->v + b * L->cache_b + head * L->cache_h;
    bf16 qb[QUERIES][hd + 32];  /* the queries rounded to bf16, as the keys are */
    for (int s = j0; s < j1;) {
        int e = s + 1;
        while (e < j1 && e - s < QUERIES && S->lo[e] == S->lo[s]) e++;
        float *outs[QUERIES], *ps[QUERIES];
        const bf16 *qs[QUERIES];
        long his[QUERIES];
        for (int j = s; j < e; j++) {
            const int r = b * S->W + j, i = j - s;
            outs[i] = S->o + (long)r * S->a + (long)head * hd;
            ps[i] = S->probs + ((long)r * S->h + head) * (S->keys + 16);
            qs[i] = qb[i];
            his[i] = S->hi[j];
            round_row(qb[i], S->qkv + (long)r * 3 * S->a + (long)head * hd, hd);
        }
        if (e - s == QUERIES)
            attend_group(outs, qs, S->scale, K, V, S->lo[s], his, hd, ps);
        else  /* fewer (a pass across blocks, or W not a multiple of QUERIES): one at a time */
            for (int i = 0; i < e - s; i++) attend_one(outs[i], qs[i], S->scale, K, V, S->lo[s], his[i], hd, ps[i], NULL);
        for (int j = s; j < e; j++) round_head(S, b * S->W + j, head);
        s = e;
    }
}

/* x (B * W, d) fp32: the decoder inputs in (row b * W + j: image b, the step's position j), the
 * last layer's outputs out. Per position j: slot[j], where its key and value go in each
 * self-attention cache; [lo[j], hi[j]), the cached keys it attends to; off2[j], its place in the
 * second buffers (elements from k2/v2; ignored where those are NULL or off2 is NULL).
 * key_rows: NULL, or the ring mode of the local 2D parallel pass: the keys are kept in the second
 * buffers only, seen as rows of hd (slot[j] is the row position j writes), and position j attends
 * to rows key_rows[rows_at[j] + i] for i in [lo[j], hi[j]).
 * cos, sin: NULL, or the rotary angles of the W positions (W, P): dimension i and P + i of each
 * head's q and k rotate by pair i. keys: the largest hi - lo and mem_len, for the scratch.
 * Every position's key is written before any position attends, so a position sees those of the
 * positions before it in the step. */
TARGET void decode_step(const Layer *layers, int n_layers, int B, int W, int d, int h, int hd, int f, int pre_norm,
                        float eps, float *x, const long *slot, const long *lo, const long *hi, const long *off2,
                        const long *key_rows, const long *rows_at, const float *cos, const float *sin, int P,
                        long keys, float *scratch) {
    const int a = h * hd;
    const int N = B * W;                  /* rows */
    const long xs = row_len(d, f, a);
    float *t = scratch;                   /* (N, d): the normalised input of a sublayer (pre-LN) */
    float *y = t + (long)N * d;           /* (N, d): a sublayer's output */
    float *qkv = y + (long)N * d;         /* (N, 3a) */
    float *o = qkv + (long)N * 3 * a;     /* (N, a): attention output */
    bf16 *hb = (bf16 *)(o + (long)N * a);  /* (N, xs) bf16: the feed-forward's hidden rows, rounded */
    bf16 *xb = hb + (long)N * xs + 32;    /* (N, xs) bf16: the vector entering a product */
    float *probs = (float *)(xb + (long)N * xs + 32);
    const Step S = {B, W, h, hd, a, P, key_rows != NULL, slot, lo, hi, off2, key_rows, rows_at, cos, sin,
                    qkv, o, probs, xb, xs, keys, 1.f / sqrtf((float)hd)};

    /* Phases end at barriers, and the fewer the better: each costs both threads their wait for
     * the slower one. Per layer: the products (each a phase), the attention (the keys written
     * and read by the thread of their image and head, the outputs rounded there), and the
     * residual, which also makes the next sublayer's input; the hidden rows come out of the
     * first feed-forward product relu'd and rounded. 7 barriers a layer where there were 12:
     * a 16-position pass at the CIFAR-10 config 2.81 -> 2.68 ms (AMD EPYC Zen 4, 2 threads). */
#pragma omp parallel
    {
        const int threads = omp_get_num_threads();
#pragma omp for schedule(static)
        for (int r = 0; r < N; r++) {
            sublayer_input(&layers[0], 0, pre_norm, eps, x + (long)r * d, t + (long)r * d, xb + (long)r * xs, d);
            for (long i = f; i % 32; i++) hb[(long)r * xs + i] = 0;  /* the zeros past f, once */
        }
        for (int l = 0; l < n_layers; l++) {
            const Layer *L = &layers[l];
            for (int sub = 0; sub < 3; sub++) {
                if (sub == 1 && !L->wq_c) continue;
                if (sub == 2) {  /* feed-forward */
                    gemv(L->w1, L->b1, xb, xs, NULL, hb, xs, N, f, d);
                    gemv(L->w2, L->b2, hb, xs, y, NULL, d, N, d, f);
                } else if (sub == 1) {  /* cross-attention */
                    gemv(L->wq_c, NULL, xb, xs, qkv, NULL, 3 * a, N, a, d);
#pragma omp for schedule(static)
                    for (int rh = 0; rh < N * h; rh++) attend_row(L, &S, 1, rh / h, rh % h);
                    gemv(L->wo_c, NULL, xb, xs, y, NULL, d, N, d, a);
                } else {  /* self-attention: every position's key and value into the cache first */
                    gemv(L->wqkv, NULL, xb, xs, qkv, NULL, 3 * a, N, 3 * a, d);
                    if (S.ring) {
#pragma omp for schedule(static)
                        for (int rh = 0; rh < N * h; rh++) write_kv(L, &S, rh / h, rh % h);
#pragma omp for schedule(static)
                        for (int rh = 0; rh < N * h; rh++) attend_row(L, &S, 0, rh / h, rh % h);
                    } else if (W == 1) {  /* a row is its image's only one: its keys, then its attention */
#pragma omp for schedule(static)
                        for (int rh = 0; rh < N * h; rh++) {
                            write_kv(L, &S, rh / h, rh % h);
                            attend_row(L, &S, 0, rh / h, rh % h);
                        }
                    } else if (B * h % threads == 0) {  /* a pass, an image and head per thread: its keys, then its queries */
#pragma omp for schedule(static)
                        for (int u = 0; u < B * h; u++) {
                            const int b = u / h, head = u % h;
                            for (int j = 0; j < W; j++) write_kv(L, &S, b * W + j, head);
                            attend_rows(L, &S, b, head, 0, W);
                        }
                    } else {  /* a pass over fewer images and heads than threads, or not as many each */
                        const int groups = (W + QUERIES - 1) / QUERIES;
#pragma omp for schedule(static)
                        for (int rh = 0; rh < N * h; rh++) write_kv(L, &S, rh / h, rh % h);
#pragma omp for schedule(static)
                        for (int u = 0; u < B * h * groups; u++) {
                            const int b = u / (h * groups), head = u / groups % h, j0 = u % groups * QUERIES;
                            attend_rows(L, &S, b, head, j0, j0 + QUERIES < W ? j0 + QUERIES : W);
                        }
                    }
                    gemv(L->wo, NULL, xb, xs, y, NULL, d, N, d, a);
                }
                /* the residual, post-LN's norm, and the next sublayer's input */
                int next_l = l, next_sub = sub + 1;
                if (next_sub == 1 && !L->wq_c) next_sub = 2;
                if (next_sub == 3) next_l++, next_sub = 0;
#pragma omp for schedule(static)
                for (int r = 0; r < N; r++) {
                    float *xr = x + (long)r * d, *yr = y + (long)r * d;
                    for (long i = 0; i < d; i++) xr[i] += yr[i];
                    if (!pre_norm) {
                        const bf16 *nw = sub == 0 ? L->ln1_w : sub == 1 ? L->lnc_w : L->ln2_w;
                        const bf16 *nb = sub == 0 ? L->ln1_b : sub == 1 ? L->lnc_b : L->ln2_b;
                        layer_norm(yr, xr, nw, nb, d, eps);
                        memcpy(xr, yr, d * sizeof(float));
                    }
                    if (next_l < n_layers)
                        sublayer_input(&layers[next_l], next_sub, pre_norm, eps, xr, t + (long)r * d, xb + (long)r * xs, d);
                }
            }
        }
    }
}
