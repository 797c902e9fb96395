//! Differentiable building blocks. candle's fused `softmax_last_dim` and
//! `layer_norm` have no backward pass, and composing them from primitive ops
//! allocates a tensor per step (and more in the backward pass). On the CPU these
//! are single fused kernels with hand-written backward passes, in the manner of
//! llm.c. On CUDA (the `cuda` feature) LayerNorm and bias + GELU are the same ops
//! with CUDA kernels (src/cuda); attention, softmax and the linear layers are
//! composed there, their GEMMs cuBLAS's. Elsewhere the composed forms, whose
//! gradients candle derives.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, D};
use crate::sgemm::{sgemm, written_by, Threads};
use rayon::prelude::*;

/// Whether the CUDA kernels of the fused ops take these tensors: all on a CUDA device
/// (with the `cuda` feature), non-empty, of the given dtypes.
fn on_cuda(tensors: &[(&Tensor, &[candle_core::DType])]) -> bool {
    cfg!(feature = "cuda") && tensors.iter().all(|(t, dtypes)| t.device().is_cuda() && t.elem_count() > 0 && dtypes.contains(&t.dtype()))
}

const F32: &[candle_core::DType] = &[candle_core::DType::F32];

/// LayerNorm over the last dimension (biased variance, as torch).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if (xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32) || on_cuda(&[(xs, F32), (weight, F32), (bias, F32)]) {
        return xs.contiguous()?.apply_op3(weight, bias, LayerNormOp { eps: eps as f32 });
    }
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// `softmax(scale * xs)` over the last dimension; the max is subtracted for
/// stability (softmax is invariant to it).
pub fn softmax_last_dim(xs: &Tensor, scale: f64) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 {
        return xs.contiguous()?.apply_op1(SoftmaxOp { scale: scale as f32 });
    }
    let xs = (xs * scale)?;
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Multi-head self-attention core, `softmax(q k^T / sqrt(d)) v` per head, from the
/// fused projection `qkv` `[B, N, 3C]` (q, k, v each `[H, C/H]` per token, as timm
/// lays them out) to `[B, N, C]` with the heads side by side. On the CPU one fused
/// op over every (image, head), its backward recomputing the attention weights
/// rather than storing them.
pub fn attention(qkv: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let head_dim = c / num_heads;
    let scale = (head_dim as f64).powf(-0.5);
    if qkv.device().is_cpu() && qkv.dtype() == candle_core::DType::F32 {
        return qkv.contiguous()?.apply_op1(AttentionOp { num_heads, scale: scale as f32 });
    }
    let qkv = qkv.reshape((b, n, 3, num_heads, head_dim))?.permute((2, 0, 3, 1, 4))?;
    let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
    // In f32 whatever the products' dtype, as autocast runs softmax.
    let weights = softmax_last_dim(&q.matmul(&k.t()?)?.to_dtype(candle_core::DType::F32)?, scale)?.to_dtype(v.dtype())?;
    weights.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))
}

/// Log-softmax over the last dimension: `x - max - log(sum(exp(x - max)))`, the max
/// detached as in `softmax_last_dim`.
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let shifted = xs.broadcast_sub(&xs.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// `xs @ weight^T` for `xs` `[..., K]` and `weight` `[N, K]` (a linear layer without
/// its bias). On the CPU one op whose backward gives `dx = g w` and `dw = g^T x`
/// straight from GEMMs, without the transposed copies and strided accumulation of
/// candle's matmul backward.
pub fn matmul_wt(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 {
        return xs.contiguous()?.apply_op2(weight, MatmulWtOp);
    }
    let k = xs.dim(D::Minus1)?;
    let mut out_shape = xs.dims().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = weight.dim(0)?;
    xs.reshape(((), k))?.matmul(&weight.t()?)?.reshape(out_shape)
}

/// `xs @ weight^T + bias`, a linear layer, as one op: the bias is added in the GEMM's
/// output and its gradient summed row by row, with no separate node (and gradient
/// buffer) for the bias add. `bias` is f32; in bf16 the bias is added, and its
/// gradient summed, in f32 (as cuBLAS's epilogue), the output rounded to bf16 once.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32 {
        return xs.contiguous()?.apply_op3(weight, bias, LinearOp);
    }
    matmul_wt(xs, weight)?.to_dtype(bias.dtype())?.broadcast_add(bias)?.to_dtype(xs.dtype())
}

/// `gelu(xs + bias)` with the exact erf, as `nn.GELU()` after a biased linear layer.
/// `bias` is f32; a bf16 `xs` is activated in f32 and the output rounded to bf16.
pub fn bias_gelu(xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if (xs.device().is_cpu() && xs.dtype() == candle_core::DType::F32) || on_cuda(&[(xs, &[candle_core::DType::F32, candle_core::DType::BF16]), (bias, F32)]) {
        return xs.contiguous()?.apply_op2(bias, BiasGeluOp);
    }
    xs.to_dtype(bias.dtype())?.broadcast_add(bias)?.gelu_erf()?.to_dtype(xs.dtype())
}

/// Whether this CPU has AVX2 and FMA. The shipped binary targets baseline x86-64;
/// the kernels below are compiled a second time for AVX2+FMA and picked at run time.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Defines `$name` calling `$generic` through an AVX2+FMA build of it when the CPU
/// has those, else the baseline build.
macro_rules! dispatch {
    ($(#[$meta:meta])* fn $name:ident / $avx2:ident = $generic:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) $(-> $ret)? {
            $generic($($arg),*)
        }

        $(#[$meta])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the CPU supports the features the function was compiled for.
                return unsafe { $avx2($($arg),*) };
            }
            $generic($($arg),*)
        }
    };
}

/// `e^x` in f32 (relative error below 3e-7) in plain arithmetic that vectorises:
/// x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial, times 2^n.
/// Inputs are clamped to [-87.3, 88] (the callers pass values <= 0).
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits, so
    // n and 2^n come from bit operations that vectorise (an `as i32` cast does not: Rust
    // saturates it lane by lane).
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    // ln 2 split in two so that n * ln2 is exact enough.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits((shifted.to_bits().wrapping_sub(ROUNDER.to_bits()).wrapping_add(127)) << 23)
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), vectorisable.
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    erf_given_exp(x, fast_exp(-x * x))
}

/// erf(x) as [`fast_erf`] computes it, given `exp_neg_x2 = e^(-x^2)`, which GELU's
/// derivative needs as well.
#[inline(always)]
fn erf_given_exp(x: f32, exp_neg_x2: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp_neg_x2).copysign(x)
}

/// Softmax of `scale * x` for each row of `d` values.
#[inline(always)]
fn softmax_rows_generic(x: &[f32], y: &mut [f32], d: usize, scale: f32) {
    for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
        let max = xr.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m }) * scale;
        for (y, &x) in yr.iter_mut().zip(xr) {
            *y = fast_exp(x * scale - max);
        }
        let inv = 1.0 / yr.iter().sum::<f32>();
        yr.iter_mut().for_each(|y| *y *= inv);
    }
}

dispatch!(fn softmax_rows / softmax_rows_avx2 = softmax_rows_generic(x: &[f32], y: &mut [f32], d: usize, scale: f32));

/// `y = gelu(x + b)` for each row of `b.len()` values.
#[inline(always)]
fn bias_gelu_rows_generic(x: &[f32], b: &[f32], y: &mut [f32]) {
    for (yr, xr) in y.chunks_mut(b.len()).zip(x.chunks(b.len())) {
        for ((y, &x), &b) in yr.iter_mut().zip(xr).zip(b) {
            let v = x + b;
            *y = 0.5 * v * (1.0 + fast_erf(v * FRAC_1_SQRT_2));
        }
    }
}

dispatch!(fn bias_gelu_rows / bias_gelu_rows_avx2 = bias_gelu_rows_generic(x: &[f32], b: &[f32], y: &mut [f32]));

/// `dx = g * gelu'(x + b)` for each row, adding `dx` into `db`.
#[inline(always)]
fn bias_gelu_grad_rows_generic(x: &[f32], b: &[f32], g: &[f32], dx: &mut [f32], db: &mut [f32]) {
    let d = b.len();
    for ((dxr, xr), gr) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
        for ((((dx, &x), &g), &b), db) in dxr.iter_mut().zip(xr).zip(gr).zip(b).zip(db.iter_mut()) {
            let v = x + b;
            let z = v * FRAC_1_SQRT_2;
            // gelu'(v) = Phi(v) + v phi(v); phi and erf share e^(-v^2 / 2).
            let gauss = fast_exp(-z * z);
            *dx = g * (0.5 * (1.0 + erf_given_exp(z, gauss)) + v * FRAC_1_SQRT_2PI * gauss);
            *db += *dx;
        }
    }
}

dispatch!(fn bias_gelu_grad_rows / bias_gelu_grad_rows_avx2 = bias_gelu_grad_rows_generic(x: &[f32], b: &[f32], g: &[f32], dx: &mut [f32], db: &mut [f32]));

/// Adds every row of `g` (rows of `acc.len()` values) into `acc`.
#[inline(always)]
fn sum_rows_generic(g: &[f32], acc: &mut [f32]) {
    for row in g.chunks(acc.len()) {
        acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
    }
}

dispatch!(fn sum_rows / sum_rows_avx2 = sum_rows_generic(g: &[f32], acc: &mut [f32]));

/// The sum of the rows of `g` (each `d` wide), in parallel partial sums.
fn column_sums(g: &[f32], d: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = g
        .par_chunks(d * rows_per_task(d))
        .map(|rows| {
            let mut acc = vec![0f32; d];
            sum_rows(rows, &mut acc);
            acc
        })
        .collect();
    let mut total = vec![0f32; d];
    for p in partials {
        total.iter_mut().zip(p).for_each(|(a, v)| *a += v);
    }
    total
}

/// The f32 values of a contiguous CPU tensor.
pub(crate) fn cpu_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("fused ops take f32 tensors") };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused ops take contiguous tensors"),
    }
}

/// [`cpu_slice`] for an in-place op's output.
pub(crate) fn cpu_slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("fused ops take f32 tensors") };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&mut data[start..end]),
        None => candle_core::bail!("fused ops take contiguous tensors"),
    }
}

/// Runs `f` on the f32 values of a CPU tensor (made contiguous first).
fn with_values<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(cpu_slice(cpu, layout)?),
        _ => candle_core::bail!("fused CPU op given a tensor on another device"),
    }
}

fn from_vec(values: Vec<f32>, shape: &Shape, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, shape.clone(), like.device())
}

/// A vector of `len` f32 for a kernel to overwrite, without the zeroing pass that
/// `vec![0.0; len]` costs (a memset on the calling thread, while the others wait).
///
/// # Safety
/// Every value must be written before it is read.
unsafe fn uninit_vec(len: usize) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    values.set_len(len);
    values
}

/// Rows per parallel task: enough work to be worth a thread hop.
fn rows_per_task(dim: usize) -> usize {
    (16384 / dim.max(1)).max(1)
}

struct LayerNormOp {
    eps: f32,
}

/// The sum of `f(i)` for `i` in `0..n`, in eight partial sums so that it vectorises (a
/// single running sum is a serial chain the compiler may not reorder). Callers index
/// slices of length `n`, so that the bounds checks fold away.
#[inline(always)]
fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    for c in 0..n / 8 {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += f(c * 8 + j);
        }
    }
    let tail: f32 = (n - n % 8..n).map(&f).sum();
    acc.iter().sum::<f32>() + tail
}

/// Mean and 1/std of one row.
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len();
    let mean = lane_sum(d, |i| row[i]) / d as f32;
    let var = lane_sum(d, |i| (row[i] - mean) * (row[i] - mean)) / d as f32;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `y = (x - mean) / std * w + b` for each row of `w.len()` values.
#[inline(always)]
fn layer_norm_rows_generic(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
    let d = w.len();
    for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
        let (mean, rstd) = row_stats(xr, eps);
        for (((y, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
            *y = (x - mean) * rstd * w + b;
        }
    }
}

dispatch!(fn layer_norm_rows / layer_norm_rows_avx2 = layer_norm_rows_generic(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f32));

/// LayerNorm's `dx` for each row given the output gradient `g`, adding into `dw`, `db`:
/// `dx = rstd * (w g - mean(w g) - xhat * mean(w g xhat))`.
#[inline(always)]
fn layer_norm_grad_rows_generic(x: &[f32], w: &[f32], g: &[f32], dx: &mut [f32], dw: &mut [f32], db: &mut [f32], eps: f32) {
    let d = w.len();
    for ((dxr, xr), gr) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
        let (mean, rstd) = row_stats(xr, eps);
        // xhat into dx first; dx is overwritten below.
        for (xh, &x) in dxr.iter_mut().zip(xr) {
            *xh = (x - mean) * rstd;
        }
        let (w, gr, xhat) = (&w[..d], &gr[..d], &dxr[..d]);
        let mean_wg = lane_sum(d, |i| w[i] * gr[i]) / d as f32;
        let mean_wg_xhat = lane_sum(d, |i| w[i] * gr[i] * xhat[i]) / d as f32;
        for ((((dx, &w), &g), dw), db) in dxr.iter_mut().zip(w).zip(gr).zip(dw.iter_mut()).zip(db.iter_mut()) {
            let xhat = *dx;
            *dw += g * xhat;
            *db += g;
            *dx = rstd * (w * g - mean_wg - xhat * mean_wg_xhat);
        }
    }
}

dispatch!(fn layer_norm_grad_rows / layer_norm_grad_rows_avx2 = layer_norm_grad_rows_generic(x: &[f32], w: &[f32], g: &[f32], dx: &mut [f32], dw: &mut [f32], db: &mut [f32], eps: f32));

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "vit-mae-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let d = w.len();
        let chunk = d * rows_per_task(d);
        // SAFETY: the row tasks write every value.
        let mut y = unsafe { uninit_vec(x.len()) };
        y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(ys, xs)| layer_norm_rows(xs, w, b, ys, self.eps));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::layer_norm_fwd(s1, l1, s2, l2, s3, l3, self.eps)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw, db) = crate::cuda::layer_norm_bwd(x, w, grad, self.eps)?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        let d = w.elem_count();
        let (dx, dw, db) = with_values(x, |x| {
            with_values(w, |w| {
                with_values(grad, |g| {
                    let chunk = d * rows_per_task(d);
                    // SAFETY: the row tasks write every value.
                    let mut dx = unsafe { uninit_vec(x.len()) };
                    // Per-task partial sums of dw and db, added up after.
                    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(chunk)
                        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                        .map(|(dxs, (xs, gs))| {
                            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                            layer_norm_grad_rows(xs, w, gs, dxs, &mut dw, &mut db, self.eps);
                            (dw, db)
                        })
                        .collect();
                    let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
                    for (pw, pb) in partials {
                        for i in 0..d {
                            dw[i] += pw[i];
                            db[i] += pb[i];
                        }
                    }
                    Ok((dx, dw, db))
                })
            })
        })?;
        Ok((Some(from_vec(dx, x.shape(), x)?), Some(from_vec(dw, w.shape(), w)?), Some(from_vec(db, w.shape(), w)?)))
    }
}

struct SoftmaxOp {
    scale: f32,
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "vit-mae-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(storage, layout)?;
        let d = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        // SAFETY: the row tasks write every value.
        let mut y = unsafe { uninit_vec(x.len()) };
        let chunk = d * rows_per_task(d);
        y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(ys, xs)| softmax_rows(xs, ys, d, self.scale));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.dims().last().copied().unwrap_or(1).max(1);
        let dx = with_values(res, |y| {
            with_values(grad, |g| {
                // SAFETY: the row tasks write every value.
                let mut dx = unsafe { uninit_vec(y.len()) };
                let chunk = d * rows_per_task(d);
                dx.par_chunks_mut(chunk).zip(y.par_chunks(chunk).zip(g.par_chunks(chunk))).for_each(|(dxs, (ys, gs))| {
                    for ((dxr, yr), gr) in dxs.chunks_mut(d).zip(ys.chunks(d)).zip(gs.chunks(d)) {
                        // dx = scale * y * (g - sum(g * y))
                        let dot: f32 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
                        for i in 0..d {
                            dxr[i] = self.scale * yr[i] * (gr[i] - dot);
                        }
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(from_vec(dx, arg.shape(), arg)?))
    }
}

struct BiasGeluOp;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

impl CustomOp2 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "vit-mae-bias-gelu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?);
        let d = b.len();
        // SAFETY: the row tasks write every value.
        let mut y = unsafe { uninit_vec(x.len()) };
        let chunk = d * rows_per_task(d);
        y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(ys, xs)| bias_gelu_rows(xs, b, ys));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::bias_gelu_fwd(s1, l1, s2, l2)
    }

    fn bwd(&self, x: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, db) = crate::cuda::bias_gelu_bwd(x, b, grad)?;
            return Ok((Some(dx), Some(db)));
        }
        let d = b.elem_count();
        let (dx, db) = with_values(x, |x| {
            with_values(b, |b| {
                with_values(grad, |g| {
                    let chunk = d * rows_per_task(d);
                    // SAFETY: the row tasks write every value.
                    let mut dx = unsafe { uninit_vec(x.len()) };
                    let partials: Vec<Vec<f32>> = dx
                        .par_chunks_mut(chunk)
                        .zip(x.par_chunks(chunk).zip(g.par_chunks(chunk)))
                        .map(|(dxs, (xs, gs))| {
                            let mut db = vec![0f32; d];
                            bias_gelu_grad_rows(xs, b, gs, dxs, &mut db);
                            db
                        })
                        .collect();
                    let mut db = vec![0f32; d];
                    for p in partials {
                        db.iter_mut().zip(p).for_each(|(a, v)| *a += v);
                    }
                    Ok((dx, db))
                })
            })
        })?;
        Ok((Some(from_vec(dx, x.shape(), x)?), Some(from_vec(db, b.shape(), b)?)))
    }
}

/// A pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

struct AttentionOp {
    num_heads: usize,
    scale: f32,
}

impl AttentionOp {
    /// The attention weights `p` (`n x n`) of image `b`, head `h`.
    ///
    /// # Safety
    /// `qkv` holds `[B, n, 3C]` with `b` in range.
    unsafe fn weights(&self, qkv: &[f32], n: usize, c: usize, b: usize, h: usize, scores: &mut [f32], p: &mut [f32]) {
        let hd = c / self.num_heads;
        let base = qkv.as_ptr().add(b * n * 3 * c + h * hd);
        // scores = scale * q k^T: q rows of stride 3C; k^T read through k's strides.
        sgemm(Threads::One, n, n, hd, scores.as_mut_ptr(), n, base, 3 * c, 1, base.add(c), 1, 3 * c, self.scale, false);
        softmax_rows(scores, p, n, 1.0);
    }
}

impl CustomOp1 for AttentionOp {
    fn name(&self) -> &'static str {
        "vit-mae-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = cpu_slice(storage, layout)?;
        let (b, n, c3) = layout.shape().dims3()?;
        let (c, heads) = (c3 / 3, self.num_heads);
        let hd = c / heads;
        let attend = |out: *mut f32| {
            let dst = SharedMut(out);
            (0..b * heads).into_par_iter().for_each_init(
                || (vec![0f32; n * n], vec![0f32; n * n]),
                |(scores, p), task| {
                    let (bi, h) = (task / heads, task % heads);
                    let dst = dst;
                    // SAFETY: every (image, head) reads its own q/k/v columns and writes its
                    // own `hd` columns of `out`; the extents follow from the shape.
                    unsafe {
                        self.weights(qkv, n, c, bi, h, scores, p);
                        let v = qkv.as_ptr().add(bi * n * 3 * c + 2 * c + h * hd);
                        sgemm(Threads::One, n, hd, n, dst.0.add(bi * n * c + h * hd), c, p.as_ptr(), n, 1, v, 3 * c, 1, 1.0, false);
                    }
                },
            );
        };
        // SAFETY: the (image, head) tasks together write every column of every row.
        let out = unsafe { written_by(b * n * c, attend) };
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (b, n, c3) = arg.dims3()?;
        let (c, heads) = (c3 / 3, self.num_heads);
        let hd = c / heads;
        let dqkv = with_values(arg, |qkv| {
            with_values(res, |out| {
                with_values(grad, |dout| {
                    let backprop = |dqkv: *mut f32| {
                        let dst = SharedMut(dqkv);
                        (0..b * heads).into_par_iter().for_each_init(
                            || (vec![0f32; n * n], vec![0f32; n * n], vec![0f32; n * n]),
                            |(scores, p, dp), task| {
                                let (bi, h) = (task / heads, task % heads);
                                let dst = dst;
                                // SAFETY: as in the forward pass; each task writes its own
                                // q, k and v columns of `dqkv`.
                                unsafe {
                                    self.weights(qkv, n, c, bi, h, scores, p);
                                    let base = qkv.as_ptr().add(bi * n * 3 * c + h * hd);
                                    let (q, k, v) = (base, base.add(c), base.add(2 * c));
                                    let dbase = dst.0.add(bi * n * 3 * c + h * hd);
                                    let d_o = dout.as_ptr().add(bi * n * c + h * hd);
                                    // dv = p^T do
                                    sgemm(Threads::One, n, hd, n, dbase.add(2 * c), 3 * c, p.as_ptr(), 1, n, d_o, c, 1, 1.0, false);
                                    // dp = do v^T
                                    sgemm(Threads::One, n, n, hd, dp.as_mut_ptr(), n, d_o, c, 1, v, 1, 3 * c, 1.0, false);
                                    // ds = p * (dp - rowsum(do * o)) * scale, into `scores`
                                    for i in 0..n {
                                        let o_row = &out[bi * n * c + i * c + h * hd..][..hd];
                                        let do_row = &dout[bi * n * c + i * c + h * hd..][..hd];
                                        let dot: f32 = o_row.iter().zip(do_row).map(|(a, b)| a * b).sum();
                                        for j in 0..n {
                                            scores[i * n + j] = p[i * n + j] * (dp[i * n + j] - dot) * self.scale;
                                        }
                                    }
                                    // dq = ds k, dk = ds^T q
                                    sgemm(Threads::One, n, hd, n, dbase, 3 * c, scores.as_ptr(), n, 1, k, 3 * c, 1, 1.0, false);
                                    sgemm(Threads::One, n, hd, n, dbase.add(c), 3 * c, scores.as_ptr(), 1, n, q, 3 * c, 1, 1.0, false);
                                }
                            },
                        );
                    };
                    // SAFETY: the (image, head) tasks together write every q, k and v
                    // column of every row.
                    let dqkv = unsafe { written_by(qkv.len(), backprop) };
                    Ok(dqkv)
                })
            })
        })?;
        Ok(Some(from_vec(dqkv, arg.shape(), arg)?))
    }
}

/// `x @ w^T` for contiguous `x` (`m x k`, `m = x.len() / k`) and `w` (`n x k`).
fn matmul_wt_values(x: &[f32], w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let m = x.len() / k;
    // SAFETY: x is m x k, w is n x k (read as its transpose), y is m x n, all contiguous.
    unsafe { written_by(m * n, |y| sgemm(Threads::All, m, n, k, y, n, x.as_ptr(), k, 1, w.as_ptr(), 1, k, 1.0, false)) }
}

/// The gradients of `x @ w^T` given `g` (`m x n`): `dx = g w` (only `with_dx`: the
/// input of a first layer, such as pixels, needs none) and `dw = g^T x`.
fn matmul_wt_grads(x: &[f32], w: &[f32], g: &[f32], n: usize, k: usize, with_dx: bool) -> (Option<Vec<f32>>, Vec<f32>) {
    let m = x.len() / k;
    // SAFETY: g is m x n, w is n x k, x is m x k, all contiguous; g^T is read through
    // transposed strides.
    unsafe {
        let dx = with_dx.then(|| written_by(m * k, |dx| sgemm(Threads::All, m, k, n, dx, k, g.as_ptr(), n, 1, w.as_ptr(), k, 1, 1.0, false)));
        let dw = written_by(n * k, |dw| sgemm(Threads::All, n, k, m, dw, k, g.as_ptr(), 1, n, x.as_ptr(), k, 1, 1.0, false));
        (dx, dw)
    }
}

/// The output shape of `x @ w^T`: `x`'s with the last dimension `n`, after checking
/// that it is `w`'s `k`.
fn matmul_wt_shape(x: &Layout, w: &Layout) -> Result<(usize, usize, Shape)> {
    let (n, k) = w.shape().dims2()?;
    if x.shape().dims().last() != Some(&k) {
        candle_core::bail!("linear: input {:?} does not end in {k}", x.shape());
    }
    let mut dims = x.shape().dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    Ok((n, k, Shape::from(dims)))
}

struct MatmulWtOp;

impl CustomOp2 for MatmulWtOp {
    fn name(&self) -> &'static str {
        "vit-mae-matmul-wt"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k, shape) = matmul_wt_shape(l1, l2)?;
        Ok((CpuStorage::F32(matmul_wt_values(cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, n, k)), shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let (dx, dw) = with_values(x, |xs| with_values(w, |ws| with_values(grad, |g| Ok(matmul_wt_grads(xs, ws, g, n, k, x.track_op())))))?;
        Ok((dx.map(|dx| from_vec(dx, x.shape(), x)).transpose()?, Some(from_vec(dw, w.shape(), w)?)))
    }
}

struct LinearOp;

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "vit-mae-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k, shape) = matmul_wt_shape(l1, l2)?;
        let b = cpu_slice(s3, l3)?;
        if b.len() != n {
            candle_core::bail!("linear: bias of {} for {n} outputs", b.len());
        }
        let x = cpu_slice(s1, l1)?;
        let (w, m) = (cpu_slice(s2, l2)?, x.len() / k);
        // The bias rows first, the product added onto them: no separate pass for either
        // the bias or BLAS's zeroing of the output.
        let biased_product = |y: *mut f32| {
            let rows = SharedMut(y);
            (0..m).into_par_iter().with_min_len(rows_per_task(n)).for_each(|i| {
                let rows = rows;
                // SAFETY: row i of the m x n output.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), rows.0.add(i * n), n) };
            });
            // SAFETY: x is m x k, w is n x k (read as its transpose), y is m x n, all contiguous.
            unsafe { sgemm(Threads::All, m, n, k, y, n, x.as_ptr(), k, 1, w.as_ptr(), 1, k, 1.0, true) };
        };
        // SAFETY: the bias rows initialise all m x n values.
        Ok((CpuStorage::F32(unsafe { written_by(m * n, biased_product) }), shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let (dx, dw, db) = with_values(x, |xs| {
            with_values(w, |ws| {
                with_values(grad, |g| {
                    let (dx, dw) = matmul_wt_grads(xs, ws, g, n, k, x.track_op());
                    Ok((dx, dw, column_sums(g, n)))
                })
            })
        })?;
        Ok((dx.map(|dx| from_vec(dx, x.shape(), x)).transpose()?, Some(from_vec(dw, w.shape(), w)?), Some(from_vec(db, b.shape(), b)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        for i in -4000..=4000 {
            let x = i as f32 * 0.02;
            let (e, want) = (fast_exp(x), x.exp());
            assert!((e - want).abs() <= 3e-7 * want, "exp({x}) = {e}, want {want}");
            let (f, want) = (fast_erf(x), libm::erff(x));
            assert!((f - want).abs() <= 3e-7, "erf({x}) = {f}, want {want}");
        }
        assert_eq!(fast_exp(-200.0), fast_exp(-87.3));
        assert!(fast_exp(100.0).is_finite());
    }

    #[test]
    fn dispatched_kernels_match_the_baseline_build() {
        let d = 37;
        let x: Vec<f32> = (0..5 * d).map(|i| ((i * 7919) % 101) as f32 / 25.0 - 2.0).collect();
        let b: Vec<f32> = (0..d).map(|i| i as f32 / d as f32 - 0.5).collect();
        let (mut y1, mut y2) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        softmax_rows(&x, &mut y1, d, 0.7);
        softmax_rows_generic(&x, &mut y2, d, 0.7);
        assert!(y1.iter().zip(&y2).all(|(a, b)| (a - b).abs() < 1e-6));
        for row in y1.chunks(d) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        bias_gelu_rows(&x, &b, &mut y1);
        bias_gelu_rows_generic(&x, &b, &mut y2);
        assert!(y1.iter().zip(&y2).all(|(a, b)| (a - b).abs() < 1e-6));
        let exact = |v: f32| 0.5 * v * (1.0 + libm::erff(v * FRAC_1_SQRT_2));
        for (i, y) in y2.iter().enumerate() {
            assert!((y - exact(x[i] + b[i % d])).abs() < 1e-6);
        }
        let (mut db1, mut db2) = (vec![0f32; d], vec![0f32; d]);
        bias_gelu_grad_rows(&x, &b, &x, &mut y1, &mut db1);
        bias_gelu_grad_rows_generic(&x, &b, &x, &mut y2, &mut db2);
        assert!(y1.iter().zip(&y2).all(|(a, b)| (a - b).abs() < 1e-5));
        assert!(db1.iter().zip(&db2).all(|(a, b)| (a - b).abs() < 1e-4));
        let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 / d as f32).collect();
        layer_norm_rows(&x, &w, &b, &mut y1, 1e-6);
        layer_norm_rows_generic(&x, &w, &b, &mut y2, 1e-6);
        assert!(y1.iter().zip(&y2).all(|(a, b)| (a - b).abs() < 1e-5));
        let (mut dw1, mut dw2, mut db1, mut db2) = (vec![0f32; d], vec![0f32; d], vec![0f32; d], vec![0f32; d]);
        layer_norm_grad_rows(&x, &w, &b.repeat(5), &mut y1, &mut dw1, &mut db1, 1e-6);
        layer_norm_grad_rows_generic(&x, &w, &b.repeat(5), &mut y2, &mut dw2, &mut db2, 1e-6);
        assert!(y1.iter().zip(&y2).all(|(a, b)| (a - b).abs() < 1e-5));
        assert!(dw1.iter().zip(&dw2).chain(db1.iter().zip(&db2)).all(|(a, b)| (a - b).abs() < 1e-4));
        let sums = column_sums(&x, d);
        for (j, s) in sums.iter().enumerate() {
            let want: f32 = (0..5).map(|r| x[r * d + j]).sum();
            assert!((s - want).abs() < 1e-5);
        }
    }

    /// The fused ops give what their composed forms give, forward and backward.
    #[test]
    fn fused_ops_match_their_composed_forms() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let var = |shape: &[usize], seed: u64| -> Result<candle_core::Var> {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0).collect();
            candle_core::Var::from_tensor(&Tensor::from_vec(values, shape, &dev)?)
        };
        let (x, w, b) = (var(&[2, 5, 12], 1)?, var(&[12, 12], 2)?, var(&[12], 3)?);
        let qkv = var(&[2, 5, 36], 4)?;
        let cases: Vec<(&str, Tensor, Tensor)> = vec![
            ("matmul_wt", matmul_wt(&x, &w)?, x.reshape((10, 12))?.matmul(&w.t()?)?.reshape((2, 5, 12))?),
            ("linear", linear(&x, &w, &b)?, x.reshape((10, 12))?.matmul(&w.t()?)?.reshape((2, 5, 12))?.broadcast_add(&b)?),
            ("bias_gelu", bias_gelu(&x, &b)?, x.broadcast_add(&b)?.gelu_erf()?),
            ("layer_norm", layer_norm(&x, &w.narrow(0, 0, 1)?.squeeze(0)?, &b, 1e-6)?, {
                let mean = x.mean_keepdim(D::Minus1)?;
                let c = x.broadcast_sub(&mean)?;
                let v = c.sqr()?.mean_keepdim(D::Minus1)?;
                c.broadcast_div(&(v + 1e-6)?.sqrt()?)?.broadcast_mul(&w.narrow(0, 0, 1)?.squeeze(0)?)?.broadcast_add(&b)?
            }),
            ("attention", attention(&qkv, 3)?, {
                let t = qkv.reshape((2, 5, 3, 3, 4))?.permute((2, 0, 3, 1, 4))?;
                let (q, k, v) = (t.get(0)?.contiguous()?, t.get(1)?.contiguous()?, t.get(2)?.contiguous()?);
                let s = (q.matmul(&k.t()?)? * 0.5)?;
                let p = s.broadcast_sub(&s.max_keepdim(D::Minus1)?.detach())?.exp()?;
                let p = p.broadcast_div(&p.sum_keepdim(D::Minus1)?)?;
                p.matmul(&v)?.transpose(1, 2)?.reshape((2, 5, 12))?
            }),
        ];
        for (name, fused, composed) in cases {
            let diff = (&fused - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{name}: forward differs by {diff}");
            // A loss that weighs every output differently, so every gradient path matters.
            let weights = Tensor::arange(0f32, fused.elem_count() as f32, &dev)?.reshape(fused.shape())?.sin()?;
            let (gf, gc) = ((&fused * &weights)?.sum_all()?.backward()?, (&composed * &weights)?.sum_all()?.backward()?);
            for input in [&x, &w, &b, &qkv] {
                if let (Some(a), Some(c)) = (gf.get(input.as_tensor()), gc.get(input.as_tensor())) {
                    let diff = (a - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(diff < 1e-4, "{name}: gradient differs by {diff}");
                } else {
                    assert_eq!(gf.get(input.as_tensor()).is_some(), gc.get(input.as_tensor()).is_some(), "{name}: gradient presence");
                }
            }
        }
        Ok(())
    }
}
