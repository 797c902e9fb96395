//! The reference model's building blocks, in differentiable composed forms whose
//! gradients candle derives (candle's fused `softmax_last_dim` and `layer_norm` have no
//! backward pass). On the CPU in f32 users' calls run on the engine, so there these
//! forms are the reference alone, the tests' second oracle. On CUDA (the `cuda`
//! feature) LayerNorm and bias + GELU are fused ops with CUDA kernels (src/cuda) and
//! hand-written backward passes: until a CUDA engine can be tested on a GPU, CUDA
//! training runs on this model, and those kernels are its speed.

use candle_core::{CpuStorage, Layout, Result, Tensor, D};

/// Whether the CUDA kernels of the fused ops take these tensors: all on a CUDA device
/// (with the `cuda` feature), non-empty, of the given dtypes.
#[cfg(feature = "cuda")]
fn on_cuda(tensors: &[(&Tensor, &[candle_core::DType])]) -> bool {
    tensors.iter().all(|(t, dtypes)| t.device().is_cuda() && t.elem_count() > 0 && dtypes.contains(&t.dtype()))
}

#[cfg(feature = "cuda")]
const F32: &[candle_core::DType] = &[candle_core::DType::F32];

/// LayerNorm over the last dimension (biased variance, as torch).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(&[(xs, F32), (weight, F32), (bias, F32)]) {
        return xs.contiguous()?.apply_op3(weight, bias, cuda_ops::LayerNormOp { eps: eps as f32 });
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
    let xs = (xs * scale)?;
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Multi-head self-attention core, `softmax(q k^T / sqrt(d)) v` per head, from the
/// fused projection `qkv` `[B, N, 3C]` (q, k, v each `[H, C/H]` per token, as timm
/// lays them out) to `[B, N, C]` with the heads side by side.
pub fn attention(qkv: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    let head_dim = c / num_heads;
    let scale = (head_dim as f64).powf(-0.5);
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
/// its bias).
pub fn matmul_wt(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let k = xs.dim(D::Minus1)?;
    let mut out_shape = xs.dims().to_vec();
    *out_shape.last_mut().expect("rank >= 1") = weight.dim(0)?;
    xs.reshape(((), k))?.matmul(&weight.t()?)?.reshape(out_shape)
}

/// `xs @ weight^T + bias`, a linear layer. `bias` is f32; in bf16 the bias is added in
/// f32 (as cuBLAS's epilogue), the output rounded to bf16 once.
pub fn linear(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    matmul_wt(xs, weight)?.to_dtype(bias.dtype())?.broadcast_add(bias)?.to_dtype(xs.dtype())
}

/// `gelu(xs + bias)` with the exact erf, as `nn.GELU()` after a biased linear layer.
/// `bias` is f32; a bf16 `xs` is activated in f32 and the output rounded to bf16.
pub fn bias_gelu(xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if on_cuda(&[(xs, &[candle_core::DType::F32, candle_core::DType::BF16]), (bias, F32)]) {
        return xs.contiguous()?.apply_op2(bias, cuda_ops::BiasGeluOp);
    }
    xs.to_dtype(bias.dtype())?.broadcast_add(bias)?.gelu_erf()?.to_dtype(xs.dtype())
}

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
/// The fused ops with CUDA kernels; only CUDA tensors reach them.
#[cfg(feature = "cuda")]
mod cuda_ops {
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

    pub struct LayerNormOp {
        pub eps: f32,
    }

    impl CustomOp3 for LayerNormOp {
        fn name(&self) -> &'static str {
            "vit-mae-layer-norm"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("vit-mae-layer-norm runs on CUDA only")
        }

        fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout, s3: &CudaStorage, l3: &Layout) -> Result<(CudaStorage, Shape)> {
            crate::cuda::layer_norm_fwd(s1, l1, s2, l2, s3, l3, self.eps)
        }

        fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let (dx, dw, db) = crate::cuda::layer_norm_bwd(x, w, grad, self.eps)?;
            Ok((Some(dx), Some(dw), Some(db)))
        }
    }

    pub struct BiasGeluOp;

    impl CustomOp2 for BiasGeluOp {
        fn name(&self) -> &'static str {
            "vit-mae-bias-gelu"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("vit-mae-bias-gelu runs on CUDA only")
        }

        fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
            crate::cuda::bias_gelu_fwd(s1, l1, s2, l2)
        }

        fn bwd(&self, x: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
            let (dx, db) = crate::cuda::bias_gelu_bwd(x, b, grad)?;
            Ok((Some(dx), Some(db)))
        }
    }
}
