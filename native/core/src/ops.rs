//! Differentiable building blocks. candle's fused `softmax_last_dim` and
//! `layer_norm` have no backward pass, and composing them from primitive ops
//! allocates a tensor per step (and more in the backward pass). On the CPU these
//! are single fused kernels with hand-written backward passes, in the manner of
//! llm.c. On CUDA (the `cuda` feature) LayerNorm and bias + GELU are the same ops
//! with CUDA kernels (src/cuda); attention, softmax and the linear layers are
//! composed there, their GEMMs cuBLAS's. Elsewhere the composed forms, whose
//! gradients candle derives.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, D};
use crate::engine::rows::*;
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

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "vit-mae-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?, cpu_slice(s3, l3)?);
        let d = w.len();
        let chunk = d * rows_per_task(d);
        let mut y = vec![0f32; x.len()];
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
                                let mut dx = vec![0f32; x.len()];
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
        let mut y = vec![0f32; x.len()];
        let chunk = d * rows_per_task(d);
        y.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(ys, xs)| softmax_rows(xs, ys, d, self.scale));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = arg.dims().last().copied().unwrap_or(1).max(1);
        let dx = with_values(res, |y| {
            with_values(grad, |g| {
                        let mut dx = vec![0f32; y.len()];
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

impl CustomOp2 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "vit-mae-bias-gelu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (cpu_slice(s1, l1)?, cpu_slice(s2, l2)?);
        let d = b.len();
        let mut y = vec![0f32; x.len()];
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
                                let mut dx = vec![0f32; x.len()];
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
