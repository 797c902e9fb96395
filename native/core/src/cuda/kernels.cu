// CUDA kernels of vit-mae's fused ops (src/ops.rs, src/optim.rs), launched from src/cuda/mod.rs.
// Compiled to PTX by build.rs (nvcc --ptx, no fast math: erff, expf, sqrtf and division are
// the IEEE-accurate ones). All arithmetic is in f32; bf16 tensors are widened on load and
// rounded to nearest even on store. Every reduction runs in a fixed order, so results are
// deterministic run to run.
//
// Layout: every tensor is contiguous, row-major, `rows` rows of `d` values; offsets are
// computed in 64 bits. Launch shapes (see mod.rs):
//   row kernels (layer norm forward, dx):  one warp per row, blocks of ROW_BLOCK threads;
//   column kernels (dweight/dbias partials, bias+GELU backward): blocks of (32, COL_ROWS)
//     threads, blockIdx.x a tile of 32 columns, blockIdx.y a chunk of `rows_per_chunk` rows;
//   vm_sum_partials: one thread per column, adding up the chunks' partial sums in order;
//   elementwise kernels: grid-stride loops.

#include <cuda_bf16.h>

#define WARP 32
// Rows a column-kernel block works through at once (its blockDim.y); mod.rs launches with it.
#define COL_ROWS 8

typedef long long i64;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
// Round to nearest even, as candle's f32 -> bf16 conversion.
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The sum over a warp, the same in every lane: each butterfly step adds the same two values
// (in either order, which IEEE addition does not care about) in both lanes of a pair.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = WARP / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Mean and 1/std (biased variance) of one row of `d` values, by the warp: two passes.
__device__ __forceinline__ void row_stats(const float* __restrict__ xr, int d, float eps, int lane, float& mean, float& rstd) {
    float sum = 0.0f;
    for (int i = lane; i < d; i += WARP) sum += xr[i];
    mean = warp_sum(sum) / (float)d;
    float sq = 0.0f;
    for (int i = lane; i < d; i += WARP) {
        const float c = xr[i] - mean;
        sq += c * c;
    }
    const float var = warp_sum(sq) / (float)d;
    rstd = 1.0f / sqrtf(var + eps);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension: y = (x - mean) * rstd * w + b.
// One warp per row; blockDim.x a multiple of 32.
extern "C" __global__ void vm_layer_norm_fwd_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                                                 float* __restrict__ y, int rows, int d, float eps) {
    const int lane = threadIdx.x % WARP;
    const i64 row = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= rows) return;  // the whole warp together
    const float* xr = x + row * d;
    float* yr = y + row * d;
    float mean, rstd;
    row_stats(xr, d, eps, lane, mean, rstd);
    for (int i = lane; i < d; i += WARP) yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
}

// LayerNorm backward, the input's gradient: with xhat = (x - mean) * rstd and wg = w * g,
// dx = rstd * (wg - mean(wg) - xhat * mean(wg * xhat)). Also writes each row's mean and rstd
// to `stats` (2 per row) for vm_layer_norm_bwd_dwdb. One warp per row.
extern "C" __global__ void vm_layer_norm_bwd_dx_f32(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ g,
                                                    float* __restrict__ dx, float* __restrict__ stats, int rows, int d, float eps) {
    const int lane = threadIdx.x % WARP;
    const i64 row = (i64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= rows) return;
    const float* xr = x + row * d;
    const float* gr = g + row * d;
    float* dxr = dx + row * d;
    float mean, rstd;
    row_stats(xr, d, eps, lane, mean, rstd);
    float sum_wg = 0.0f, sum_wg_xhat = 0.0f;
    for (int i = lane; i < d; i += WARP) {
        const float xhat = (xr[i] - mean) * rstd;
        const float wg = w[i] * gr[i];
        sum_wg += wg;
        sum_wg_xhat += wg * xhat;
    }
    const float mean_wg = warp_sum(sum_wg) / (float)d;
    const float mean_wg_xhat = warp_sum(sum_wg_xhat) / (float)d;
    for (int i = lane; i < d; i += WARP) {
        const float xhat = (xr[i] - mean) * rstd;
        dxr[i] = rstd * (w[i] * gr[i] - mean_wg - xhat * mean_wg_xhat);
    }
    if (lane == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

// LayerNorm backward, the partial sums of dweight = sum(g * xhat) and dbias = sum(g) over the
// rows of one chunk: partial[chunk * d + col] (dweight) and partial[(chunks + chunk) * d + col]
// (dbias), chunks = gridDim.y. Blocks of (32, COL_ROWS).
extern "C" __global__ void vm_layer_norm_bwd_dwdb_f32(const float* __restrict__ x, const float* __restrict__ g, const float* __restrict__ stats,
                                                      float* __restrict__ partial, int rows, int d, int rows_per_chunk) {
    __shared__ float s_dw[COL_ROWS][WARP];
    __shared__ float s_db[COL_ROWS][WARP];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * WARP + tx;
    const i64 first = (i64)blockIdx.y * rows_per_chunk;
    const i64 end = min((i64)rows, first + rows_per_chunk);
    float dw = 0.0f, db = 0.0f;
    if (col < d) {
        for (i64 r = first + ty; r < end; r += COL_ROWS) {
            const float mean = stats[2 * r], rstd = stats[2 * r + 1];
            const float gv = g[r * d + col];
            dw += gv * ((x[r * d + col] - mean) * rstd);
            db += gv;
        }
    }
    s_dw[ty][tx] = dw;
    s_db[ty][tx] = db;
    __syncthreads();
    if (ty == 0 && col < d) {
        float sw = 0.0f, sb = 0.0f;
#pragma unroll
        for (int k = 0; k < COL_ROWS; k++) {
            sw += s_dw[k][tx];
            sb += s_db[k][tx];
        }
        partial[(i64)blockIdx.y * d + col] = sw;
        partial[((i64)gridDim.y + blockIdx.y) * d + col] = sb;
    }
}

// out[col] = sum over k < chunks of partial[k * d + col], in order of k. One thread per column.
extern "C" __global__ void vm_sum_partials_f32(const float* __restrict__ partial, float* __restrict__ out, int chunks, int d) {
    const i64 col = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= d) return;
    float sum = 0.0f;
#pragma unroll 8
    for (int k = 0; k < chunks; k++) sum += partial[(i64)k * d + col];
    out[col] = sum;
}

// ---------------------------------------------------------------------------------------------
// bias + GELU with the exact erf: y = gelu(x + b), b broadcast over the rows; x and y of type
// T, b f32, computed in f32.

#define FRAC_1_SQRT_2 0.70710678118654752440f
#define FRAC_1_SQRT_2PI 0.39894228040143267794f

template <typename T>
__device__ __forceinline__ void bias_gelu_fwd(const T* __restrict__ x, const float* __restrict__ b, T* __restrict__ y, int rows, int d) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        T* yr = y + r * d;
        for (int c = threadIdx.x; c < d; c += blockDim.x) {
            const float v = to_f32(xr[c]) + b[c];
            yr[c] = from_f32<T>(0.5f * v * (1.0f + erff(v * FRAC_1_SQRT_2)));
        }
    }
}

// Grid-stride over rows (blockIdx.x), block-stride over the columns of a row.
extern "C" __global__ void vm_bias_gelu_fwd_f32(const float* __restrict__ x, const float* __restrict__ b, float* __restrict__ y, int rows, int d) {
    bias_gelu_fwd(x, b, y, rows, d);
}

extern "C" __global__ void vm_bias_gelu_fwd_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ b, __nv_bfloat16* __restrict__ y,
                                                int rows, int d) {
    bias_gelu_fwd(x, b, y, rows, d);
}

// dx = g * gelu'(x + b), gelu'(v) = Phi(v) + v phi(v), written as T; the partial sums of
// dbias = sum(dx) over the rows of one chunk, of the f32 dx before any rounding, to
// partial[chunk * d + col]. Blocks of (32, COL_ROWS), as vm_layer_norm_bwd_dwdb.
template <typename T>
__device__ __forceinline__ void bias_gelu_bwd(const T* __restrict__ x, const float* __restrict__ b, const T* __restrict__ g, T* __restrict__ dx,
                                              float* __restrict__ partial, int rows, int d, int rows_per_chunk) {
    __shared__ float s_db[COL_ROWS][WARP];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * WARP + tx;
    const i64 first = (i64)blockIdx.y * rows_per_chunk;
    const i64 end = min((i64)rows, first + rows_per_chunk);
    float db = 0.0f;
    if (col < d) {
        const float bc = b[col];
        for (i64 r = first + ty; r < end; r += COL_ROWS) {
            const i64 i = r * d + col;
            const float v = to_f32(x[i]) + bc;
            const float z = v * FRAC_1_SQRT_2;
            // phi and erf share e^(-v^2 / 2) = e^(-z^2).
            const float gauss = expf(-z * z);
            const float dv = to_f32(g[i]) * (0.5f * (1.0f + erff(z)) + v * FRAC_1_SQRT_2PI * gauss);
            dx[i] = from_f32<T>(dv);
            db += dv;
        }
    }
    s_db[ty][tx] = db;
    __syncthreads();
    if (ty == 0 && col < d) {
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < COL_ROWS; k++) sum += s_db[k][tx];
        partial[(i64)blockIdx.y * d + col] = sum;
    }
}

extern "C" __global__ void vm_bias_gelu_bwd_f32(const float* __restrict__ x, const float* __restrict__ b, const float* __restrict__ g,
                                                float* __restrict__ dx, float* __restrict__ partial, int rows, int d, int rows_per_chunk) {
    bias_gelu_bwd(x, b, g, dx, partial, rows, d, rows_per_chunk);
}

extern "C" __global__ void vm_bias_gelu_bwd_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ b, const __nv_bfloat16* __restrict__ g,
                                                 __nv_bfloat16* __restrict__ dx, float* __restrict__ partial, int rows, int d, int rows_per_chunk) {
    bias_gelu_bwd(x, b, g, dx, partial, rows, d, rows_per_chunk);
}

// ---------------------------------------------------------------------------------------------
// AdamW (torch.optim.AdamW) in place, the arithmetic of optim.rs's CPU MomentUpdate and
// ParamUpdate operation for operation, each rounded as there (the _rn intrinsics keep nvcc
// from contracting a multiply and an add into an FMA):
//   m = m * beta1 + g * (1 - beta1)
//   v = v * beta2 + g * g * (1 - beta2)
//   p = p * decay_factor - step_size * (m / (sqrt(v) / bias_correction2_sqrt + eps))
// Grid-stride loop over the n elements.
extern "C" __global__ void vm_adamw_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
                                        unsigned long long n, float beta1, float beta2, float decay_factor, float step_size,
                                        float bias_correction2_sqrt, float eps) {
    const float rest1 = __fsub_rn(1.0f, beta1);
    const float rest2 = __fsub_rn(1.0f, beta2);
    const unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = g[i];
        const float mi = __fadd_rn(__fmul_rn(m[i], beta1), __fmul_rn(gi, rest1));
        const float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(gi, gi), rest2));
        m[i] = mi;
        v[i] = vi;
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bias_correction2_sqrt), eps);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay_factor), __fmul_rn(step_size, __fdiv_rn(mi, denom)));
    }
}
