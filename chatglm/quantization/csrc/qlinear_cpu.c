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
 * Converting every weight to fp32 for FMAs needs more instructions per byte than two cores can issue at memory
 * speed, so the activation row is quantized instead, per block of 512 columns with one fp32 scale:
 *   - int8 weights: activations as int16 (error <= 2^-16 of the block maximum), weights sign-extended to
 *     int16, vpmaddwd, exact int32 sums per block;
 *   - int4 weights: activations as 15-bit integers split into a signed high byte and a 7-bit low byte, weights
 *     as offset-binary nibbles (w ^ 0x88 turns each signed nibble q into q + 8 in [0, 15]), multiplied with
 *     vpmaddubsw (AVX2) or vpdpbusd (AVX512-VNNI) without saturation; the +8 is removed per block with the sum
 *     of the activations. Error <= 2^-15 of the block maximum: far below the int4 weight error and below bf16
 *     rounding of the reference.
 * Each block's exact integer sum is scaled in fp32. The activation bytes are laid out per 64-column step as
 * [high bytes of even columns | of odd columns | low bytes of even | of odd], matching the even (high nibble)
 * and odd (low nibble) columns of 32 packed weight bytes, so the official layout is read as saved: no
 * repacked copy of the weights exists.
 *
 * Parallelism: OpenMP over groups of output rows in dynamic chunks (each chunk a contiguous stream of rows;
 * a thread that loses its core to another process does not hold the others at the join). For few activation
 * rows each thread quantizes them privately, so there is no barrier before the weights stream. The thread
 * count is passed on every call (it follows torch.get_num_threads()); inside a PyTorch process the libgomp
 * torch already loaded is reused (same soname), so there is one thread pool, not two.
 *
 * Dispatch: the AVX2/FMA and AVX512-VNNI paths are compiled with function target attributes and chosen at run
 * time with __builtin_cpu_supports, so the library needs no -march flag (a cache shared by different CPUs
 * stays valid) and the portable C path is always there.
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

#define QBLK 512 /* columns per activation-quantization block */
#define SUB4 64  /* int4 columns per 32-byte vector step */
#define XQ_MAX 32767.0f

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

static inline float load_elem(const void *p, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float *)p)[i];
    if (dt == DT_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return f16_to_f32(((const uint16_t *)p)[i]);
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

typedef struct {
    int64_t M, K, nblk;
    int bits;
    int64_t ldx16, ldx8;
    /* int8 weights: activations as int16 in natural column order. int4 weights: only the ragged tail
     * (columns past the last whole 64-column step) lives here, also in natural order. */
    int16_t *x16;
    /* int4 weights: 15-bit activations xi = 128 * xh + xl split into a signed high byte xh in [-128, 127] and an
     * unsigned low byte xl in [0, 127], stored per 64-column step as four 32-byte vectors
     * [xh of even columns | xh of odd columns | xl of even columns | xl of odd columns]
     * so vpmaddubsw can multiply them with the unsigned nibbles without saturating. */
    int8_t *x8;
    float *xs;     /* [M][nblk] fp32 scale of each block */
    int32_t *xsum; /* [M][nblk] sum of xi over the block's whole steps (undoes the +8 nibble offset) */
} xquant_t;

/* fp32 copy of x[m, c0:c1), then per-block symmetric quantization. Written as plain loops so that the
 * avx2 clone is auto-vectorized by the compiler. */
__attribute__((target_clones("avx2", "default"))) static void quantize_block(const void *x, int dt, int64_t m,
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
    const float qmax = q->bits == 8 ? 32767.f : 16383.f;
    float s, inv;
    if (amax_bits >= 0x7f800000u) { /* inf or NaN: make the whole output of this row NaN, as a float matmul would */
        s = NAN;
        inv = 0.f;
    } else {
        s = amax / qmax;
        inv = amax > 0.f ? qmax / amax : 0.f;
    }
    q->xs[m * q->nblk + b] = s;
    if (q->bits == 8) {
        int16_t *dst = q->x16 + m * q->ldx16 + c0;
        for (int64_t i = 0; i < n; i++) dst[i] = (int16_t)lrintf(buf[i] * inv);
        return;
    }
    const int64_t nv = n & ~(int64_t)(SUB4 - 1); /* whole 64-column steps of this block */
    int32_t sum = 0;
    for (int64_t base = 0; base < nv; base += SUB4) {
        int8_t *dst = q->x8 + m * q->ldx8 + (c0 + base) * 2; /* 128 bytes per 64-column step */
        for (int j = 0; j < 32; j++) {
            const int32_t xe = (int32_t)lrintf(buf[base + 2 * j] * inv);
            const int32_t xo = (int32_t)lrintf(buf[base + 2 * j + 1] * inv);
            dst[j] = (int8_t)(xe >> 7);
            dst[32 + j] = (int8_t)(xo >> 7);
            dst[64 + j] = (int8_t)(xe & 127);
            dst[96 + j] = (int8_t)(xo & 127);
            sum += xe + xo;
        }
    }
    q->xsum[m * q->nblk + b] = sum;
    int16_t *tail = q->x16 + m * q->ldx16;
    for (int64_t i = nv; i < n; i++) tail[c0 + i] = (int16_t)lrintf(buf[i] * inv);
}

/* ------------------------------------------------------------------------------------------------------ */
/* dot products: NR consecutive weight rows against activation row m                                        */
/*                                                                                                          */
/* Several weight rows can share each activation load: the activation digits are 2 bytes per weight against */
/* half a byte of int4 weight. The AVX512-VNNI kernel (32 registers) takes 4 rows at a time; the AVX2 ones    */
/* run fastest one row at a time (see AVX2_NR).                                                              */

#define NR_MAX 4

typedef void (*dot_fn)(const int8_t *w, int64_t ldw, int nr, const xquant_t *q, int64_t m, float *out);

static void dot_generic(const int8_t *w, int64_t ldw, int nr, const xquant_t *q, int64_t m, float *out) {
    const int64_t K = q->K;
    for (int r = 0; r < nr; r++) {
        const int8_t *wrow = w + r * ldw;
        float total = 0.f;
        for (int64_t b = 0; b < q->nblk; b++) {
            const int64_t c0 = b * QBLK, c1 = c0 + QBLK < K ? c0 + QBLK : K;
            int32_t acc = 0;
            if (q->bits == 8) {
                const int16_t *xr = q->x16 + m * q->ldx16;
                for (int64_t c = c0; c < c1; c++) acc += (int32_t)wrow[c] * xr[c];
            } else {
                const int64_t cv = c0 + ((c1 - c0) & ~(int64_t)(SUB4 - 1));
                for (int64_t base = c0; base < cv; base += SUB4) {
                    const int8_t *xp = q->x8 + m * q->ldx8 + base * 2;
                    for (int i = 0; i < 32; i++) {
                        const uint8_t byte = (uint8_t)wrow[(base >> 1) + i];
                        const int32_t xe = 128 * xp[i] + xp[64 + i], xo = 128 * xp[32 + i] + xp[96 + i];
                        acc += nib_hi(byte) * xe + nib_lo(byte) * xo;
                    }
                }
                const int16_t *xt = q->x16 + m * q->ldx16;
                for (int64_t c = cv; c < c1; c++) {
                    const uint8_t byte = (uint8_t)wrow[c >> 1];
                    acc += ((c & 1) ? nib_lo(byte) : nib_hi(byte)) * (int32_t)xt[c];
                }
            }
            total += (float)acc * q->xs[m * q->nblk + b];
        }
        out[r] = total;
    }
}

/* Integer dot product of the int4 tail columns [c, c1) (natural order, int16 activations). */
static inline int32_t tail4(const int8_t *wrow, const int16_t *xt, int64_t c, int64_t c1) {
    int32_t t = 0;
    for (; c < c1; c++) {
        const uint8_t byte = (uint8_t)wrow[c >> 1];
        t += ((c & 1) ? nib_lo(byte) : nib_hi(byte)) * (int32_t)xt[c];
    }
    return t;
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

/* int4, AVX2: per 32-byte step, (w ^ 0x88) turns both two's-complement nibbles into offset-binary n = q + 8
 * in [0, 15]; a mask gives the odd-column nibbles, a 16-bit shift plus mask the even-column ones.
 * vpmaddubsw multiplies them with the activation bytes (|pair sum| <= 2*15*128, no saturation); four steps
 * of int16 partial sums (<= 30720) are widened with vpmaddwd by 128 (high bytes) and 1 (low bytes). The +8
 * offset is removed once per block with the activation sum. NR = 1 or 2 rows. */
#define DEFINE_Q4_AVX2(NR)                                                                                     \
    __attribute__((target("avx2,fma"))) static void dot4_avx2_##NR(const int8_t *w, int64_t ldw,              \
                                                                    const xquant_t *q, int64_t m, float *out) { \
        const int64_t K = q->K;                                                                                \
        const __m256i k88 = _mm256_set1_epi8((char)0x88), k0f = _mm256_set1_epi8(0x0f);                      \
        const int8_t *xrow = q->x8 + m * q->ldx8;                                                              \
        __m256 facc[NR];                                                                                       \
        float corr[NR];                                                                                        \
        for (int r = 0; r < NR; r++) {                                                                         \
            facc[r] = _mm256_setzero_ps();                                                                     \
            corr[r] = 0.f;                                                                                     \
        }                                                                                                      \
        for (int64_t b = 0; b < q->nblk; b++) {                                                                \
            const int64_t c0 = b * QBLK, c1 = c0 + QBLK < K ? c0 + QBLK : K;                                   \
            const int64_t s0 = c0 / SUB4, s1 = s0 + (c1 - c0) / SUB4;                                          \
            __m256i acc[NR];                                                                                   \
            for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_si256();                                      \
            for (int64_t sg = s0; sg < s1; sg += 4) {                                                          \
                const int64_t se = sg + 4 < s1 ? sg + 4 : s1;                                                  \
                __m256i ah[NR], al[NR];                                                                        \
                for (int r = 0; r < NR; r++) ah[r] = al[r] = _mm256_setzero_si256();                           \
                for (int64_t s = sg; s < se; s++) {                                                            \
                    const int8_t *xp = xrow + s * 128;                                                         \
                    const __m256i xhe = _mm256_load_si256((const __m256i *)xp);                                \
                    const __m256i xho = _mm256_load_si256((const __m256i *)(xp + 32));                         \
                    const __m256i xle = _mm256_load_si256((const __m256i *)(xp + 64));                         \
                    const __m256i xlo = _mm256_load_si256((const __m256i *)(xp + 96));                         \
                    for (int r = 0; r < NR; r++) {                                                             \
                        const __m256i u = _mm256_xor_si256(                                                    \
                            _mm256_loadu_si256((const __m256i *)(w + r * ldw + s * 32)), k88);                 \
                        const __m256i lo = _mm256_and_si256(u, k0f);                                           \
                        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(u, 4), k0f);                     \
                        ah[r] = _mm256_add_epi16(ah[r], _mm256_add_epi16(_mm256_maddubs_epi16(hi, xhe),        \
                                                                         _mm256_maddubs_epi16(lo, xho)));      \
                        al[r] = _mm256_add_epi16(al[r], _mm256_add_epi16(_mm256_maddubs_epi16(hi, xle),        \
                                                                         _mm256_maddubs_epi16(lo, xlo)));      \
                    }                                                                                          \
                }                                                                                              \
                for (int r = 0; r < NR; r++)                                                                   \
                    acc[r] = _mm256_add_epi32(acc[r],                                                          \
                                              _mm256_add_epi32(_mm256_madd_epi16(ah[r], _mm256_set1_epi16(128)), \
                                                               _mm256_madd_epi16(al[r], _mm256_set1_epi16(1)))); \
            }                                                                                                  \
            const float xs = q->xs[m * q->nblk + b];                                                           \
            const int32_t offset = -8 * q->xsum[m * q->nblk + b];                                              \
            for (int r = 0; r < NR; r++) {                                                                     \
                facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(xs), facc[r]);            \
                const int32_t t = offset + tail4(w + r * ldw, q->x16 + m * q->ldx16, s1 * SUB4, c1);           \
                corr[r] += (float)t * xs;                                                                      \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < NR; r++) out[r] = hsum256_ps(facc[r]) + corr[r];                                   \
    }

DEFINE_Q4_AVX2(1)
DEFINE_Q4_AVX2(2)

/* int8, AVX2: sign-extend 16 weights to int16 (vpmovsxbw from memory) and vpmaddwd with int16 activations.
 * NR = 1 or 2 rows. */
#define DEFINE_Q8_AVX2(NR)                                                                                     \
    __attribute__((target("avx2,fma"))) static void dot8_avx2_##NR(const int8_t *w, int64_t ldw,              \
                                                                    const xquant_t *q, int64_t m, float *out) { \
        const int64_t K = q->K;                                                                                \
        const int16_t *xrow = q->x16 + m * q->ldx16;                                                           \
        __m256 facc[NR];                                                                                       \
        float tail[NR];                                                                                        \
        for (int r = 0; r < NR; r++) {                                                                         \
            facc[r] = _mm256_setzero_ps();                                                                     \
            tail[r] = 0.f;                                                                                     \
        }                                                                                                      \
        for (int64_t b = 0; b < q->nblk; b++) {                                                                \
            const int64_t c0 = b * QBLK, c1 = c0 + QBLK < K ? c0 + QBLK : K;                                   \
            const int64_t cv = c0 + ((c1 - c0) & ~(int64_t)31);                                                \
            __m256i acc[NR];                                                                                   \
            for (int r = 0; r < NR; r++) acc[r] = _mm256_setzero_si256();                                      \
            for (int64_t c = c0; c < cv; c += 32) {                                                            \
                const __m256i x0 = _mm256_load_si256((const __m256i *)(xrow + c));                             \
                const __m256i x1 = _mm256_load_si256((const __m256i *)(xrow + c + 16));                        \
                for (int r = 0; r < NR; r++) {                                                                 \
                    const int8_t *wp = w + r * ldw + c;                                                        \
                    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wp));             \
                    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wp + 16)));      \
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(_mm256_madd_epi16(w0, x0),              \
                                                                       _mm256_madd_epi16(w1, x1)));            \
                }                                                                                              \
            }                                                                                                  \
            const float xs = q->xs[m * q->nblk + b];                                                           \
            for (int r = 0; r < NR; r++) {                                                                     \
                facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(xs), facc[r]);            \
                if (cv < c1) {                                                                                 \
                    int32_t t = 0;                                                                             \
                    for (int64_t c = cv; c < c1; c++) t += (int32_t)w[r * ldw + c] * xrow[c];                  \
                    tail[r] += (float)t * xs;                                                                  \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < NR; r++) out[r] = hsum256_ps(facc[r]) + tail[r];                                   \
    }

DEFINE_Q8_AVX2(1)
DEFINE_Q8_AVX2(2)

/* One row at a time measured faster than two for AVX2 (int8 33 vs 21 GB/s on the 6B stack): with 16
 * registers the two-row version spills. */
#ifndef AVX2_NR
#define AVX2_NR 1
#endif
static void dot_avx2(const int8_t *w, int64_t ldw, int nr, const xquant_t *q, int64_t m, float *out) {
    int r = 0;
    if (AVX2_NR == 1) {
        for (; r < nr; r++) (q->bits == 4 ? dot4_avx2_1 : dot8_avx2_1)(w + r * ldw, ldw, q, m, out + r);
        return;
    }
    if (q->bits == 4) {
        for (; r + 2 <= nr; r += 2) dot4_avx2_2(w + r * ldw, ldw, q, m, out + r);
        if (r < nr) dot4_avx2_1(w + r * ldw, ldw, q, m, out + r);
    } else {
        for (; r + 2 <= nr; r += 2) dot8_avx2_2(w + r * ldw, ldw, q, m, out + r);
        if (r < nr) dot8_avx2_1(w + r * ldw, ldw, q, m, out + r);
    }
}

/* ------------------------------------------------------------------------------------------------------ */
/* AVX512-VNNI on 256-bit registers (Zen 4, Ice Lake and later)                                             */

/* Same int4 scheme, but vpdpbusd multiplies unsigned nibbles by signed activation bytes and accumulates
 * straight into int32: no int16 partial sums, no widening. EVEX encoding gives 32 vector registers, enough
 * for 4 rows x 4 product streams of accumulators, so each activation load serves 4 rows. */
#define VNNI_TARGET "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni"

#define DEFINE_Q4_VNNI(NR)                                                                                     \
    __attribute__((target(VNNI_TARGET))) static void dot4_vnni_##NR(const int8_t *w, int64_t ldw,             \
                                                                     const xquant_t *q, int64_t m, float *out) { \
        const int64_t K = q->K;                                                                                \
        const __m256i k88 = _mm256_set1_epi8((char)0x88), k0f = _mm256_set1_epi8(0x0f);                      \
        const int8_t *xrow = q->x8 + m * q->ldx8;                                                              \
        __m256 facc[NR];                                                                                       \
        float corr[NR];                                                                                        \
        for (int r = 0; r < NR; r++) {                                                                         \
            facc[r] = _mm256_setzero_ps();                                                                     \
            corr[r] = 0.f;                                                                                     \
        }                                                                                                      \
        for (int64_t b = 0; b < q->nblk; b++) {                                                                \
            const int64_t c0 = b * QBLK, c1 = c0 + QBLK < K ? c0 + QBLK : K;                                   \
            const int64_t s0 = c0 / SUB4, s1 = s0 + (c1 - c0) / SUB4;                                          \
            __m256i a[NR][4];                                                                                  \
            for (int r = 0; r < NR; r++)                                                                       \
                for (int i = 0; i < 4; i++) a[r][i] = _mm256_setzero_si256();                                  \
            for (int64_t s = s0; s < s1; s++) {                                                                \
                const int8_t *xp = xrow + s * 128;                                                             \
                const __m256i xhe = _mm256_load_si256((const __m256i *)xp);                                    \
                const __m256i xho = _mm256_load_si256((const __m256i *)(xp + 32));                             \
                const __m256i xle = _mm256_load_si256((const __m256i *)(xp + 64));                             \
                const __m256i xlo = _mm256_load_si256((const __m256i *)(xp + 96));                             \
                for (int r = 0; r < NR; r++) {                                                                 \
                    const __m256i u =                                                                          \
                        _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + r * ldw + s * 32)), k88);    \
                    const __m256i lo = _mm256_and_si256(u, k0f);                                               \
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(u, 4), k0f);                         \
                    a[r][0] = _mm256_dpbusd_epi32(a[r][0], hi, xhe);                                           \
                    a[r][1] = _mm256_dpbusd_epi32(a[r][1], lo, xho);                                           \
                    a[r][2] = _mm256_dpbusd_epi32(a[r][2], hi, xle);                                           \
                    a[r][3] = _mm256_dpbusd_epi32(a[r][3], lo, xlo);                                           \
                }                                                                                              \
            }                                                                                                  \
            const float xs = q->xs[m * q->nblk + b];                                                           \
            const int32_t offset = -8 * q->xsum[m * q->nblk + b];                                              \
            for (int r = 0; r < NR; r++) {                                                                     \
                const __m256i ah = _mm256_add_epi32(a[r][0], a[r][1]);                                         \
                const __m256i al = _mm256_add_epi32(a[r][2], a[r][3]);                                         \
                const __m256i acc = _mm256_add_epi32(_mm256_slli_epi32(ah, 7), al);                            \
                facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(xs), facc[r]);               \
                const int32_t t = offset + tail4(w + r * ldw, q->x16 + m * q->ldx16, s1 * SUB4, c1);           \
                corr[r] += (float)t * xs;                                                                      \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < NR; r++) out[r] = hsum256_ps(facc[r]) + corr[r];                                   \
    }

DEFINE_Q4_VNNI(1)
DEFINE_Q4_VNNI(2)
DEFINE_Q4_VNNI(4)

static void dot_vnni(const int8_t *w, int64_t ldw, int nr, const xquant_t *q, int64_t m, float *out) {
    if (q->bits != 4) { /* int8 is limited by memory bandwidth with AVX2 already */
        dot_avx2(w, ldw, nr, q, m, out);
        return;
    }
    int r = 0;
    for (; r + 4 <= nr; r += 4) dot4_vnni_4(w + r * ldw, ldw, q, m, out + r);
    for (; r + 2 <= nr; r += 2) dot4_vnni_2(w + r * ldw, ldw, q, m, out + r);
    if (r < nr) dot4_vnni_1(w + r * ldw, ldw, q, m, out + r);
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

int cglm_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* y[M, N] = x[M, K] @ dequant(W)^T (+ bias). x/y dtypes: 0 fp32, 1 bf16, 2 fp16. Returns 0 on success. */
static int xquant_alloc(xquant_t *q, int64_t M, int64_t K, int bits) {
    q->M = M;
    q->K = K;
    q->bits = bits;
    q->nblk = (K + QBLK - 1) / QBLK;
    q->ldx16 = q->nblk * QBLK;
    q->ldx8 = bits == 4 ? (K / SUB4) * 128 : 0;
    /* 64-byte aligned, so no 32-byte activation load splits a cache line (that alone costs ~10%), with
     * slack at the ends so that vector loads of the last step never leave the allocations */
    const size_t n16 = (((size_t)(M * q->ldx16 + 32) * sizeof(int16_t)) + 63) & ~(size_t)63;
    const size_t n8 = ((size_t)(M * q->ldx8 + 64) + 63) & ~(size_t)63;
    q->x16 = (int16_t *)aligned_alloc(64, n16);
    q->x8 = (int8_t *)aligned_alloc(64, n8);
    if (q->x16) memset(q->x16, 0, n16);
    q->xs = (float *)malloc((size_t)(M * q->nblk) * sizeof(float));
    q->xsum = (int32_t *)calloc((size_t)(M * q->nblk), sizeof(int32_t));
    return q->x16 && q->x8 && q->xs && q->xsum;
}

static void xquant_free(xquant_t *q) {
    free(q->x16);
    free(q->x8);
    free(q->xs);
    free(q->xsum);
}

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
    const int64_t ngroups = (N + NR_MAX - 1) / NR_MAX;
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
                for (int64_t t = 0; t < M * local.nblk; t++) quantize_block(x, xdt, t / local.nblk, t % local.nblk, &local, buf);
            q = &local;
        } else {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < M * shared.nblk; t++) quantize_block(x, xdt, t / shared.nblk, t % shared.nblk, &shared, buf);
        }
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, chunk)
        for (int64_t g = 0; g < ngroups; g++) {
            if (!ok) continue;
            const int64_t n0 = g * NR_MAX;
            const int nr = (int)(N - n0 < NR_MAX ? N - n0 : NR_MAX);
            float r[NR_MAX];
            for (int64_t m = 0; m < M; m++) {
                dot(w + n0 * ldw, ldw, nr, q, m, r);
                for (int j = 0; j < nr; j++) {
                    const int64_t n = n0 + j;
                    store_elem(y, ydt, m * N + n, r[j] * scale[n] + (bias ? bias[n] : 0.f));
                }
            }
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
