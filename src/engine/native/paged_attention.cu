// Decode attention that reads keys and values in place through the block tables
// (src/engine/native/paged_attention.rs has the layout, the CPU version and the tests).
//
// One thread block per (KV head, sequence): its `group` query heads share that KV head, so each
// key and value row is read from the pool once for all of them. The block's warps split the
// sequence's positions between them; each lane holds elements lane, lane + 32, ... of the query, the
// running softmax (max, sum) and the output accumulator (online softmax: no scores are stored,
// whatever the context length). The warps' partial results are merged in shared memory.
//
// Compiled to PTX by build.rs (feature native-cuda) and loaded through candle's CUDA device.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <float.h>
#include <stdint.h>

#define WARPS 4
#define MAX_GROUP 8
// ceil(head_dim / 32) at most: head_dim up to 256.
#define MAX_PER_LANE 8
#define BLOCK_SIZE 16

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f32(float v, float *out) { *out = v; }
__device__ __forceinline__ void from_f32(float v, __half *out) { *out = __float2half(v); }
__device__ __forceinline__ void from_f32(float v, __nv_bfloat16 *out) { *out = __float2bfloat16(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// q: [batch, heads, head_dim]; k_pool, v_pool: [slots, kv_heads * head_dim];
// meta: [batch, meta_width] u32, column 0 the context length, then the block table;
// out: [batch, heads * head_dim].
template <typename T>
__device__ void paged_decode(const T *__restrict__ q, const T *__restrict__ k_pool,
                             const T *__restrict__ v_pool, const uint32_t *__restrict__ meta,
                             T *__restrict__ out, uint32_t heads, uint32_t kv_heads,
                             uint32_t head_dim, uint32_t meta_width, float scale) {
    const uint32_t kvh = blockIdx.x;
    const uint32_t seq = blockIdx.y;
    const uint32_t warp = threadIdx.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t group = heads / kv_heads;
    const uint32_t *row_meta = meta + (size_t)seq * meta_width;
    const uint32_t len = row_meta[0];
    const uint32_t *table = row_meta + 1;
    const size_t width = (size_t)kv_heads * head_dim;

    // The loops run to the compile-time maxima with guards, so these arrays stay in registers.
    float qv[MAX_GROUP][MAX_PER_LANE];
    float acc[MAX_GROUP][MAX_PER_LANE];
    float m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
    for (uint32_t g = 0; g < MAX_GROUP; ++g) {
        const T *qh = q + ((size_t)seq * heads + kvh * group + g) * head_dim;
#pragma unroll
        for (uint32_t i = 0; i < MAX_PER_LANE; ++i) {
            qv[g][i] = g < group && lane + 32 * i < head_dim ? to_f32(qh[lane + 32 * i]) * scale : 0.f;
            acc[g][i] = 0.f;
        }
        m[g] = -FLT_MAX;
        l[g] = 0.f;
    }

    for (uint32_t p = warp; p < len; p += WARPS) {
        const size_t slot = (size_t)table[p / BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE;
        const T *kr = k_pool + slot * width + (size_t)kvh * head_dim;
        const T *vr = v_pool + slot * width + (size_t)kvh * head_dim;
        float kv[MAX_PER_LANE], vv[MAX_PER_LANE];
#pragma unroll
        for (uint32_t i = 0; i < MAX_PER_LANE; ++i) {
            kv[i] = lane + 32 * i < head_dim ? to_f32(kr[lane + 32 * i]) : 0.f;
            vv[i] = lane + 32 * i < head_dim ? to_f32(vr[lane + 32 * i]) : 0.f;
        }
#pragma unroll
        for (uint32_t g = 0; g < MAX_GROUP; ++g) {
            if (g >= group) break;
            float s = 0.f;
#pragma unroll
            for (uint32_t i = 0; i < MAX_PER_LANE; ++i) s += qv[g][i] * kv[i];
            s = warp_sum(s);
            const float m_new = fmaxf(m[g], s);
            const float correction = __expf(m[g] - m_new);
            const float e = __expf(s - m_new);
            l[g] = l[g] * correction + e;
#pragma unroll
            for (uint32_t i = 0; i < MAX_PER_LANE; ++i) acc[g][i] = acc[g][i] * correction + e * vv[i];
            m[g] = m_new;
        }
    }

    // Merge the warps: each publishes its (max, sum, accumulator) per head.
    __shared__ float sm_m[WARPS][MAX_GROUP];
    __shared__ float sm_l[WARPS][MAX_GROUP];
    extern __shared__ float sm_acc[];  // [WARPS][group][head_dim]
#pragma unroll
    for (uint32_t g = 0; g < MAX_GROUP; ++g) {
        if (g >= group) break;
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
#pragma unroll
        for (uint32_t i = 0; i < MAX_PER_LANE; ++i)
            if (lane + 32 * i < head_dim) sm_acc[(warp * group + g) * head_dim + lane + 32 * i] = acc[g][i];
    }
    __syncthreads();
    // Thread t writes output elements t, t + 128, ... of all the group's heads.
    for (uint32_t e = threadIdx.x; e < group * head_dim; e += WARPS * 32) {
        const uint32_t g = e / head_dim;
        const uint32_t j = e % head_dim;
        float mx = -FLT_MAX;
        for (uint32_t w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        float sum = 0.f, val = 0.f;
        for (uint32_t w = 0; w < WARPS; ++w) {
            // A warp that saw no position has sum 0 and contributes nothing.
            const float c = sm_l[w][g] > 0.f ? __expf(sm_m[w][g] - mx) : 0.f;
            sum += sm_l[w][g] * c;
            val += sm_acc[(w * group + g) * head_dim + j] * c;
        }
        from_f32(sum > 0.f ? val / sum : 0.f,
                 &out[((size_t)seq * heads + kvh * group + g) * head_dim + j]);
    }
}

#define PAGED_DECODE(NAME, T)                                                                 \
    extern "C" __global__ void NAME(const T *q, const T *k_pool, const T *v_pool,             \
                                    const uint32_t *meta, T *out, uint32_t heads,             \
                                    uint32_t kv_heads, uint32_t head_dim, uint32_t meta_width, \
                                    float scale) {                                            \
        paged_decode<T>(q, k_pool, v_pool, meta, out, heads, kv_heads, head_dim, meta_width,  \
                        scale);                                                               \
    }

PAGED_DECODE(paged_decode_f32, float)
PAGED_DECODE(paged_decode_f16, __half)
PAGED_DECODE(paged_decode_bf16, __nv_bfloat16)
