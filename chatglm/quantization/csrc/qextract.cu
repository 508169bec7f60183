// Weight extraction for the official ChatGLM int4/int8 layout, compiled at run time with NVRTC.
//
//   out[r, c] = q[r, c] * scale[r]   (product in fp32, rounded once to the output dtype)
//
// int4: byte j of a row holds column 2j in the high nibble and 2j+1 in the low nibble, both signed.
// One block per row; threads stride over the packed bytes. No headers are included, so NVRTC needs no
// include paths: half and bfloat16 results are produced from fp32 with PTX conversions / integer rounding.

typedef unsigned short u16;

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                         // round to nearest even
    return (u16)(u >> 16);
}

__device__ __forceinline__ void put(u16 *out, long i, float v, int kind) {
    out[i] = kind == 0 ? f32_to_f16(v) : f32_to_bf16(v);
}

#define INT4_KERNEL(NAME, T, STORE)                                                                       \
    extern "C" __global__ void NAME(const signed char *__restrict__ w, const float *__restrict__ scale,   \
                                    T *__restrict__ out, int n, int m) {                                  \
        const int row = blockIdx.x;                                                                        \
        if (row >= n) return;                                                                              \
        const float s = scale[row];                                                                        \
        const signed char *src = w + (long)row * m;                                                        \
        T *dst = out + (long)row * m * 2;                                                                  \
        for (int j = threadIdx.x; j < m; j += blockDim.x) {                                                \
            const signed char b = src[j];                                                                  \
            const int hi = b >> 4;                                                                         \
            const int lo = (signed char)(b << 4) >> 4;                                                     \
            STORE(dst, 2L * j, (float)hi * s);                                                             \
            STORE(dst, 2L * j + 1, (float)lo * s);                                                         \
        }                                                                                                  \
    }

#define INT8_KERNEL(NAME, T, STORE)                                                                       \
    extern "C" __global__ void NAME(const signed char *__restrict__ w, const float *__restrict__ scale,   \
                                    T *__restrict__ out, int n, int m) {                                  \
        const int row = blockIdx.x;                                                                        \
        if (row >= n) return;                                                                              \
        const float s = scale[row];                                                                        \
        const signed char *src = w + (long)row * m;                                                        \
        T *dst = out + (long)row * m;                                                                      \
        for (int j = threadIdx.x; j < m; j += blockDim.x) STORE(dst, (long)j, (float)src[j] * s);          \
    }

#define STORE_F16(p, i, v) put((p), (i), (v), 0)
#define STORE_BF16(p, i, v) put((p), (i), (v), 1)
#define STORE_F32(p, i, v) ((p)[(i)] = (v))

INT4_KERNEL(qextract_int4_f16, u16, STORE_F16)
INT4_KERNEL(qextract_int4_bf16, u16, STORE_BF16)
INT4_KERNEL(qextract_int4_f32, float, STORE_F32)
INT8_KERNEL(qextract_int8_f16, u16, STORE_F16)
INT8_KERNEL(qextract_int8_bf16, u16, STORE_BF16)
INT8_KERNEL(qextract_int8_f32, float, STORE_F32)
