//! Differentiable building blocks. candle's fused `softmax_last_dim` and
//! `layer_norm` have no backward pass, so these are written from primitive ops
//! whose gradients candle knows.

use candle_core::{Result, Tensor, D};

/// LayerNorm over the last dimension (biased variance, as torch).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centered = xs.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last dimension; the max is subtracted for stability and
/// carries no gradient (softmax is invariant to it).
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let exp = xs.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension: `x - max - log(sum(exp(x - max)))`, the max
/// detached as in `softmax_last_dim`.
pub fn log_softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let shifted = xs.broadcast_sub(&xs.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// GELU with the exact erf, as `nn.GELU()`.
pub fn gelu(xs: &Tensor) -> Result<Tensor> {
    xs.gelu_erf()
}
