/*
 * Weight-only int4/int8 linear layers for the CPU, reading the official ChatGLM layout directly.
 *
 *   weight  int8 [N, K*bits/8], one row per output feature (int4: byte j = (q[2j] << 4) | (q[2j+1] & 15))
 *   scale   fp32 [N]            (per output row; the caller converts the model-dtype scale once)
 *   y[m, n] = scale[n] * sum_k x[m, k] * q[n, k] + bias[n]
 *
 * Why the kernel looks the way it does
 * ------------------------------------
 * Decoding one token multiplies a single activation row with every weight: the cost is reading the weights
 * from DRAM once, so the kernel streams each packed row exactly once and unpacks inside the dot product.
 * Two cores must keep up with memory (~34 GB/s here), which leaves a handful of vector instructions per 32
 * weight bytes. So the activation row is quantized too, as llama.cpp does for its Q4_0/Q8_0 matmuls: int8
 * per block of 128 columns with one fp32 scale (error <= 1/254 of the block maximum; llama.cpp uses 32
 * columns). Each block's exact integer sum is scaled in fp32.
 *   - int4 weights: w ^ 0x88 turns each signed nibble q into offset-binary q + 8 in [0, 15]; vpmaddubsw
 *     (AVX2) or vpdpbusd (AVX512-VNNI) multiplies the unsigned nibbles with the signed activation bytes; the
 *     +8 is removed once per activation row with the activation sums. The activation bytes of each 64-column
 *     step are stored as [32 even columns | 32 odd columns], matching the high (even) and low (odd) nibbles
 *     of 32 packed weight bytes, so the official layout is read as saved: no repacked copy of the weights.
 *   - int8 weights: AVX2 multiplies |w| with sign(w)*x (vpsignb, the pair sums fit int16); VNNI takes
 *     w ^ 0x80 = w + 128 as the unsigned operand and removes the +128 with the activation sums.
 * Replacing the earlier 15-bit activations (two multiplies per weight byte) by int8 cut the instructions per
 * weight byte by ~40%, which is what moved int4 decoding from ~24 GB/s to the memory limit (bench/README.md).
 *
 * Parallelism: OpenMP over groups of output rows in dynamic chunks (each chunk a contiguous stream of rows;
 * a thread that loses its core to another process does not hold the others at the join). For few activation
 * rows each thread quantizes them privately, so there is no barrier before the weights stream. The thread
 * count is passed on every call (it follows torch.get_num_threads()); inside a PyTorch process the libgomp
 * torch already loaded is reused (same soname), so there is one thread pool, not two.
 *
 * Dispatch: the AVX2/FMA and AVX512-VNNI paths are compiled with function target attributes and chosen at run
 * time with __builtin_cpu_supports, so the library needs no -march flag (a cache shared by different CPUs
 * stays valid) and the portable C path is always there. All paths compute the same integer block sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define CGLM_X86 1
#include <immintrin.h>
#else
#define CGLM_X86 0
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* ------------------------------------------------------------------------------------------------------ */
/* scalar dtype conversions (round to nearest even, like PyTorch)                                            */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    float f;
    if (e == 0) {
        f = ldexpf((float)m, -24);
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (e == 31) {
        u = sign | 0x7f800000u | (m << 13);
    } else {
        u = sign | ((e + 112u) << 23) | (m << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) {                                    /* half subnormal or zero */
        float v;
        memcpy(&v, &ax, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(v * 16777216.0f));
    }
    ax += 0xc8000fffu + ((ax >> 13) & 1u); /* rebias exponent 127 -> 15 and round mantissa to 10 bits */
    return (uint16_t)(sign | (ax >> 13));
}

static inline void store_elem(void *p, int dt, int64_t i, float v) {
    if (dt == DT_F32)
        ((float *)p)[i] = v;
    else if (dt == DT_BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((uint16_t *)p)[i] = f32_to_f16(v);
}


static inline int8_t nib_hi(uint8_t b) { return (int8_t)((int8_t)b >> 4); }
static inline int8_t nib_lo(uint8_t b) { return (int8_t)((int8_t)(uint8_t)(b << 4) >> 4); }

/* ------------------------------------------------------------------------------------------------------ */
/* activation quantization                                                                                   */

#define QBLK 128 /* columns per activation block; int4: <= 256, so two-step int16 sums cannot saturate */
#define STEP4 64 /* int4 columns per 32-byte weight vector */
#define STEP8 32 /* int8 columns per 32-byte weight vector */

typedef struct {
    int64_t M, K, nblk, ldx;
    int bits;
    /* [M][ldx] int8 activations. int4: every whole 64-column step is stored as [32 even | 32 odd columns];
     * columns after the last whole step (K % 64) stay in natural order and are handled by scalar code. */
    int8_t *x8;
    float *xs;   /* [M][nblk] fp32 scale of each block (NaN when the block holds inf/NaN) */
    float *xoff; /* [M] sum over blocks of scale * (sum of the vectorised activations), for the offset paths */
} xquant_t;

static inline int64_t vector_cols(int bits, int64_t n) { return n & ~(int64_t)((bits == 4 ? STEP4 : STEP8) - 1); }

/* fp32 copy of x[m, c0:c1), then symmetric int8 quantization of the block. Returns scale * sum of the
 * vectorised activations (the block's share of xoff). Plain loops so the avx2 clone is auto-vectorized. */
__attribute__((target_clones("avx2", "default"))) static float quantize_block(const void *x, int dt, int64_t m,
                                                                              int64_t b, xquant_t *q,
                                                                              float *buf) {
    const int64_t K = q->K, c0 = b * QBLK, c1 = c0 + QBLK < K ? c0 + QBLK : K, n = c1 - c0;
    if (dt == DT_F32) {
        const float *src = (const float *)x + m * K + c0;
        for (int64_t i = 0; i < n; i++) buf[i] = src[i];
    } else if (dt == DT_BF16) {
        const uint16_t *src = (const uint16_t *)x + m * K + c0;
        for (int64_t i = 0; i < n; i++) {
            uint32_t u = (uint32_t)src[i] << 16;
            memcpy(buf + i, &u, 4);
        }
    } else {
        const uint16_t *src = (const uint16_t *)x + m * K + c0;
        for (int64_t i = 0; i < n; i++) buf[i] = f16_to_f32(src[i]);
    }
    /* max |x| on the bit patterns: for non-negative floats the integer order is the float order, and a NaN
     * pattern is larger than inf, so a NaN in the block wins and is detected below. */
    uint32_t amax_bits = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, buf + i, 4);
        u &= 0x7fffffffu;
        amax_bits = u > amax_bits ? u : amax_bits;
    }
    float amax;
    memcpy(&amax, &amax_bits, 4);
    float s, inv;
    if (amax_bits >= 0x7f800000u) { /* inf or NaN: make the whole output row NaN, as a float matmul would */
        s = NAN;
        inv = 0.f;
    } else {
        s = amax / 127.f;
        inv = amax > 0.f ? 127.f / amax : 0.f;
    }
    q->xs[m * q->nblk + b] = s;
    int8_t *dst = q->x8 + m * q->ldx + c0;
    const int64_t nv = vector_cols(q->bits, n);
    int32_t sum = 0;
    if (q->bits == 4) {
        for (int64_t base = 0; base < nv; base += STEP4)
            for (int j = 0; j < 32; j++) {
                const int32_t xe = (int32_t)lrintf(buf[base + 2 * j] * inv);
                const int32_t xo = (int32_t)lrintf(buf[base + 2 * j + 1] * inv);
                dst[base + j] = (int8_t)xe;
                dst[base + 32 + j] = (int8_t)xo;
                sum += xe + xo;
            }
    } else {
        for (int64_t i = 0; i < nv; i++) {
            const int32_t xi = (int32_t)lrintf(buf[i] * inv);
            dst[i] = (int8_t)xi;
            sum += xi;
        }
    }
    for (int64_t i = nv; i < n; i++) dst[i] = (int8_t)lrintf(buf[i] * inv);
    return (float)sum * s;
}

static void quantize_row_x(const void *x, int dt, int64_t m, xquant_t *q, float *buf) {
    float off = 0.f;
    for (int64_t b = 0; b < q->nblk; b++) off += quantize_block(x, dt, m, b, q, buf);
    q->xoff[m] = off;
}

/* ------------------------------------------------------------------------------------------------------ */
/* dot products of one weight row with activation row m (the result still lacks the row's weight scale)    */

typedef float (*dot_fn)(const int8_t *wrow, const xquant_t *q, int64_t m);

/* Integer dot product of the scalar columns [c, c1) of a block (natural order). */
static inline int32_t tail_dot(const int8_t *wrow, int bits, const int8_t *x, int64_t c, int64_t c1) {
    int32_t t = 0;
    for (; c < c1; c++) {
        int32_t wq;
        if (bits == 8)
            wq = wrow[c];
        else
            wq = (c & 1) ? nib_lo((uint8_t)wrow[c >> 1]) : nib_hi((uint8_t)wrow[c >> 1]);
        t += wq * (int32_t)x[c];
    }
    return t;
}

static float dot_generic(const int8_t *wrow, const xquant_t *q, int64_t m) {
    const int64_t K = q->K;
    const int8_t *x = q->x8 + m * q->ldx;
    float total = 0.f;
    for (int64_t b = 0; b < q->nblk; b++) {
        const int64_t c0 = b * QBLK, c1 = c0 + QBLK < K ? c0 + QBLK : K, cv = c0 + vector_cols(q->bits, c1 - c0);
        int32_t acc = 0;
        if (q->bits == 8) {
            for (int64_t c = c0; c < cv; c++) acc += (int32_t)wrow[c] * x[c];
        } else {
            for (int64_t base = c0; base < cv; base += STEP4)
                for (int j = 0; j < 32; j++) {
                    const uint8_t byte = (uint8_t)wrow[(base >> 1) + j];
                    acc += nib_hi(byte) * (int32_t)x[base + j] + nib_lo(byte) * (int32_t)x[base + 32 + j];
                }
        }
        acc += tail_dot(wrow, q->bits, x, cv, c1);
        total += (float)acc * q->xs[m * q->nblk + b];
    }
    return total;
}

#if CGLM_X86
/* ------------------------------------------------------------------------------------------------------ */
/* AVX2                                                                                                      */

__attribute__((target("avx2,fma"))) static inline float hsum256_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Shared block loop: INNER(c) accumulates the 32 weight bytes of the vector step at column c into acc, as
 * int32 lanes (VNNI) or int16 lanes widened once per block (AVX2, WIDEN). OFFSET: 8 (int4) or 128 (int8
 * VNNI) times the activation sums is subtracted at the end; 0 when the products are exact. */
#define BLOCK_LOOP(STEP, INNER, WIDEN, OFFSET)                                                                   \
    const int64_t K = q->K;                                                                                    \
    const int8_t *x = q->x8 + m * q->ldx;                                                                      \
    const float *xs = q->xs + m * q->nblk;                                                                     \
    __m256 facc = _mm256_setzero_ps();                                                                         \
    float tail = 0.f;                                                                                          \
    for (int64_t b = 0; b < q->nblk; b++) {                                                                    \
        const int64_t c0 = b * QBLK, c1 = c0 + QBLK < K ? c0 + QBLK : K;                                       \
        const int64_t cv = c0 + ((c1 - c0) & ~(int64_t)(STEP - 1));                                            \
        __m256i acc = _mm256_setzero_si256();                                                                  \
        for (int64_t c = c0; c < cv; c += STEP) INNER(c);                                                      \
        facc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(WIDEN(acc)), _mm256_set1_ps(xs[b]), facc);                   \
        if (cv < c1) tail += (float)tail_dot(wrow, q->bits, x, cv, c1) * xs[b];                                \
    }                                                                                                          \
    return hsum256_ps(facc) + tail - (float)(OFFSET) * q->xoff[m];

#define WIDEN_I16(a) _mm256_madd_epi16(a, _mm256_set1_epi16(1))
#define NO_WIDEN(a) (a)

/* int4: two 64-column steps per block, each adding two vpmaddubsw results (|pair| <= 2*15*127) to int16
 * lanes: at most 4 * 3810 = 15240 per lane before the widening. */
#define Q4_AVX2_STEP(c)                                                                                        \
    do {                                                                                                       \
        const __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wrow + (c) / 2)),            \
                                           _mm256_set1_epi8((char)0x88));                                      \
        const __m256i lo = _mm256_and_si256(u, _mm256_set1_epi8(0x0f));                                        \
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(u, 4), _mm256_set1_epi8(0x0f));                  \
        acc = _mm256_add_epi16(acc, _mm256_add_epi16(                                                          \
            _mm256_maddubs_epi16(hi, _mm256_load_si256((const __m256i *)(x + (c)))),                           \
            _mm256_maddubs_epi16(lo, _mm256_load_si256((const __m256i *)(x + (c) + 32)))));                    \
    } while (0)

__attribute__((target("avx2,fma"))) static float dot4_avx2(const int8_t *wrow, const xquant_t *q, int64_t m) {
    BLOCK_LOOP(STEP4, Q4_AVX2_STEP, WIDEN_I16, 8)
}

/* int8: |w| * (sign(w) * x) with vpmaddubsw; |w| <= 128 and |x| <= 127, so pairs fit int16 exactly. */
#define Q8_AVX2_STEP(c)                                                                                        \
    do {                                                                                                       \
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(wrow + (c)));                                  \
        const __m256i xv = _mm256_load_si256((const __m256i *)(x + (c)));                                      \
        acc = _mm256_add_epi32(acc, WIDEN_I16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)))); \
    } while (0)

__attribute__((target("avx2,fma"))) static float dot8_avx2(const int8_t *wrow, const xquant_t *q, int64_t m) {
    BLOCK_LOOP(STEP8, Q8_AVX2_STEP, NO_WIDEN, 0)
}

static float dot_avx2(const int8_t *wrow, const xquant_t *q, int64_t m) {
    return q->bits == 4 ? dot4_avx2(wrow, q, m) : dot8_avx2(wrow, q, m);
}

/* ------------------------------------------------------------------------------------------------------ */
/* AVX512-VNNI on 256-bit registers (Zen 4, Ice Lake and later): vpdpbusd accumulates u8 x s8 products     */
/* straight into int32 lanes, saving the int16 stage and the widening.                                      */

#define VNNI_TARGET "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni"

#define Q4_VNNI_STEP(c)                                                                                        \
    do {                                                                                                       \
        const __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wrow + (c) / 2)),            \
                                           _mm256_set1_epi8((char)0x88));                                      \
        const __m256i lo = _mm256_and_si256(u, _mm256_set1_epi8(0x0f));                                        \
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(u, 4), _mm256_set1_epi8(0x0f));                  \
        acc = _mm256_dpbusd_epi32(acc, hi, _mm256_load_si256((const __m256i *)(x + (c))));                     \
        acc = _mm256_dpbusd_epi32(acc, lo, _mm256_load_si256((const __m256i *)(x + (c) + 32)));                \
    } while (0)

#define Q8_VNNI_STEP(c)                                                                                        \
    acc = _mm256_dpbusd_epi32(acc,                                                                             \
                              _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wrow + (c))),              \
                                               _mm256_set1_epi8((char)0x80)),                                  \
                              _mm256_load_si256((const __m256i *)(x + (c))))

__attribute__((target(VNNI_TARGET))) static float dot4_vnni(const int8_t *wrow, const xquant_t *q, int64_t m) {
    BLOCK_LOOP(STEP4, Q4_VNNI_STEP, NO_WIDEN, 8)
}

__attribute__((target(VNNI_TARGET))) static float dot8_vnni(const int8_t *wrow, const xquant_t *q, int64_t m) {
    BLOCK_LOOP(STEP8, Q8_VNNI_STEP, NO_WIDEN, 128)
}

static float dot_vnni(const int8_t *wrow, const xquant_t *q, int64_t m) {
    return q->bits == 4 ? dot4_vnni(wrow, q, m) : dot8_vnni(wrow, q, m);
}
#endif /* CGLM_X86 */

/* ------------------------------------------------------------------------------------------------------ */
/* dispatch                                                                                                  */

static int g_force_isa = -1; /* -1: detect; 0: portable; 1: AVX2; 2: AVX512-VNNI (256-bit) */

static int detect_isa(void) {
    if (g_force_isa >= 0) return g_force_isa;
#if CGLM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        if (__builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vnni"))
            return 2;
        return 1;
    }
#endif
    return 0;
}

static dot_fn pick_dot(void) {
#if CGLM_X86
    const int isa = detect_isa();
    if (isa == 2) return dot_vnni;
    if (isa == 1) return dot_avx2;
#endif
    return dot_generic;
}

/* ------------------------------------------------------------------------------------------------------ */
/* exported API (all pointers are raw data pointers of contiguous tensors)                                  */

/* Which instruction set the kernels will use: 0 portable C, 1 AVX2/FMA, 2 AVX512-VNNI. */
int cglm_isa(void) { return detect_isa(); }

/* Force an instruction set (tests check every path this CPU can run); -1 restores detection. Requests above
 * what the CPU supports are capped. */
void cglm_force_isa(int isa) {
    g_force_isa = -1;
    const int best = detect_isa();
    g_force_isa = isa < 0 ? -1 : (isa > best ? best : isa);
}

/* Columns per int8 activation block of the fused path (tests derive their error bound from it). */
int cglm_activation_block(void) { return QBLK; }

int cglm_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static int xquant_alloc(xquant_t *q, int64_t M, int64_t K, int bits) {
    q->M = M;
    q->K = K;
    q->bits = bits;
    q->nblk = (K + QBLK - 1) / QBLK;
    /* rows 64-byte aligned, so no 32-byte activation load splits a cache line (that alone costs ~10%) */
    q->ldx = (K + 63) & ~(int64_t)63;
    q->x8 = (int8_t *)aligned_alloc(64, (size_t)(M * q->ldx));
    q->xs = (float *)malloc((size_t)(M * q->nblk) * sizeof(float));
    q->xoff = (float *)malloc((size_t)M * sizeof(float));
    return q->x8 && q->xs && q->xoff;
}

static void xquant_free(xquant_t *q) {
    free(q->x8);
    free(q->xs);
    free(q->xoff);
}

/* Output rows per scheduling unit: with several activation rows, each weight row is read from DRAM once and
 * reused from L1 for every activation row. */
#define ROWS_PER_GROUP 4

/* y[M, N] = x[M, K] @ dequant(W)^T (+ bias). x/y dtypes: 0 fp32, 1 bf16, 2 fp16. Returns 0 on success. */
int cglm_qlinear(const void *x, int xdt, int64_t M, int64_t K, const int8_t *w, int bits, const float *scale,
                 const float *bias, void *y, int ydt, int64_t N, int nthreads) {
    if ((bits != 4 && bits != 8) || M <= 0 || N <= 0 || K <= 0) return 1;
    if (bits == 4 && (K & 1)) return 2;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > N) nthreads = (int)N;
    const int64_t ldw = K * bits / 8;
    const dot_fn dot = pick_dot();
    /* Few activation rows (decoding): every thread quantizes them into its own buffers, a few microseconds of
     * work, so the threads never wait for each other before streaming weights. Many rows: share the work. */
    const int private_x = M <= 4 || nthreads == 1;
    xquant_t shared;
    if (!private_x && !xquant_alloc(&shared, M, K, bits)) {
        xquant_free(&shared);
        return 3;
    }
    /* Dynamic chunks of row groups rather than one static range per thread: if another process takes a core,
     * the other threads pick up its rows instead of idling at the join. Chunks stay large enough to stream. */
    const int64_t ngroups = (N + ROWS_PER_GROUP - 1) / ROWS_PER_GROUP;
    int64_t chunk = ngroups / ((int64_t)nthreads * 8);
    if (chunk < 4) chunk = 4;
    int failed = 0;

#pragma omp parallel num_threads(nthreads)
    {
        float buf[QBLK];
        xquant_t local, *q = &shared;
        int ok = 1;
        if (private_x) {
            ok = xquant_alloc(&local, M, K, bits);
            if (ok)
                for (int64_t m = 0; m < M; m++) quantize_row_x(x, xdt, m, &local, buf);
            q = &local;
        } else {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) quantize_row_x(x, xdt, m, &shared, buf);
        }
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, chunk)
        for (int64_t g = 0; g < ngroups; g++) {
            if (!ok) continue;
            const int64_t n0 = g * ROWS_PER_GROUP, n1 = n0 + ROWS_PER_GROUP < N ? n0 + ROWS_PER_GROUP : N;
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = n0; n < n1; n++)
                    store_elem(y, ydt, m * N + n, dot(w + n * ldw, q, m) * scale[n] + (bias ? bias[n] : 0.f));
        }
        if (private_x) xquant_free(&local);
    }
    if (!private_x) xquant_free(&shared);
    return failed ? 3 : 0;
}

/* Dequantize rows [n0, n1) of W into out[(n1-n0), K] (dtype odt): out = q * scale, formed in fp32 and rounded
 * once. Used for long prompts, where a float matmul on dequantized tiles is the compute-bound fast path. */
__attribute__((target_clones("avx2", "default"))) static void dequant_row_bf16(const int8_t *wrow, int bits,
                                                                                float sc, int64_t K,
                                                                                uint16_t *o) {
    if (bits == 8) {
        for (int64_t c = 0; c < K; c++) o[c] = f32_to_bf16((float)wrow[c] * sc);
    } else {
        for (int64_t j = 0; j < K / 2; j++) {
            const uint8_t b = (uint8_t)wrow[j];
            o[2 * j] = f32_to_bf16((float)nib_hi(b) * sc);
            o[2 * j + 1] = f32_to_bf16((float)nib_lo(b) * sc);
        }
    }
}

__attribute__((target_clones("avx2", "default"))) static void dequant_row_f32(const int8_t *wrow, int bits,
                                                                               float sc, int64_t K, float *o) {
    if (bits == 8) {
        for (int64_t c = 0; c < K; c++) o[c] = (float)wrow[c] * sc;
    } else {
        for (int64_t j = 0; j < K / 2; j++) {
            const uint8_t b = (uint8_t)wrow[j];
            o[2 * j] = (float)nib_hi(b) * sc;
            o[2 * j + 1] = (float)nib_lo(b) * sc;
        }
    }
}

int cglm_dequant(const int8_t *w, int bits, const float *scale, int64_t n0, int64_t n1, int64_t K, void *out,
                 int odt, int nthreads) {
    if ((bits != 4 && bits != 8) || (bits == 4 && (K & 1))) return 1;
    if (nthreads < 1) nthreads = 1;
    const int64_t ldw = K * bits / 8;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wrow = w + n * ldw;
        const int64_t r = n - n0;
        if (odt == DT_BF16) {
            dequant_row_bf16(wrow, bits, scale[n], K, (uint16_t *)out + r * K);
        } else if (odt == DT_F32) {
            dequant_row_f32(wrow, bits, scale[n], K, (float *)out + r * K);
        } else {
            for (int64_t c = 0; c < K; c++) {
                float q = bits == 8 ? (float)wrow[c]
                                    : (float)((c & 1) ? nib_lo((uint8_t)wrow[c >> 1]) : nib_hi((uint8_t)wrow[c >> 1]));
                ((uint16_t *)out)[r * K + c] = f32_to_f16(q * scale[n]);
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------ */
/* quantization of a float weight into the official layout (fast path of format.quantize_weight)            */

static inline float round_to(float v, int dt) {
    if (dt == DT_BF16) return bf16_to_f32(f32_to_bf16(v));
    if (dt == DT_F16) return f16_to_f32(f32_to_f16(v));
    return v;
}

/* Bit-for-bit the PyTorch reference (format.py), which reproduces the original's fp16 CUDA ops:
 *   scale = dtype(fp32(max|w|) * (1.0f / qmax));  q = clamp(round_half_even(dtype(fp32(w) / fp32(scale))))
 * with q = 0 for an all-zero row. w and scale_out are in dtype dt; q_out is int8 [N, K*bits/8]. */
__attribute__((target_clones("avx2", "default"))) static void quantize_row(const void *w, int dt, int64_t n,
                                                                           int64_t K, int bits, void *scale_out,
                                                                           int8_t *q_out, float *buf) {
    const float qmax = bits == 8 ? 127.f : 7.f;
    const float inv = 1.0f / qmax;
    if (dt == DT_F32) {
        memcpy(buf, (const float *)w + n * K, (size_t)K * sizeof(float));
    } else if (dt == DT_BF16) {
        const uint16_t *src = (const uint16_t *)w + n * K;
        for (int64_t k = 0; k < K; k++) buf[k] = bf16_to_f32(src[k]);
    } else {
        const uint16_t *src = (const uint16_t *)w + n * K;
        for (int64_t k = 0; k < K; k++) buf[k] = f16_to_f32(src[k]);
    }
    float amax = 0.f;
    for (int64_t k = 0; k < K; k++) {
        const float a = fabsf(buf[k]);
        amax = a > amax ? a : amax;
    }
    const float s = round_to(amax * inv, dt);
    store_elem(scale_out, dt, n, s);
    const float sd = s == 0.f ? 1.f : s;
    for (int64_t k = 0; k < K; k++) {
        float v = nearbyintf(round_to(buf[k] / sd, dt));
        v = v > qmax ? qmax : (v < -qmax ? -qmax : v);
        buf[k] = v == v ? v : 0.f;
    }
    if (bits == 8) {
        int8_t *dst = q_out + n * K;
        for (int64_t k = 0; k < K; k++) dst[k] = (int8_t)buf[k];
    } else {
        int8_t *dst = q_out + n * (K / 2);
        for (int64_t j = 0; j < K / 2; j++) {
            const int hi = (int)buf[2 * j], lo = (int)buf[2 * j + 1];
            dst[j] = (int8_t)(uint8_t)(((hi & 15) << 4) | (lo & 15));
        }
    }
}

int cglm_quantize(const void *w, int dt, int64_t N, int64_t K, int bits, void *scale_out, int8_t *q_out,
                  int nthreads) {
    if ((bits != 4 && bits != 8) || (bits == 4 && (K & 1)) || N < 0 || K <= 0) return 1;
    if (nthreads < 1) nthreads = 1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)malloc((size_t)K * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++)
            if (buf) quantize_row(w, dt, n, K, bits, scale_out, q_out, buf);
        free(buf);
    }
    return failed ? 3 : 0;
}
