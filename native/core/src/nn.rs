//! The transformer's modules, mirroring timm's `Block`, `Attention` and `Mlp`
//! as the published MAE uses them.

use crate::ops;
use crate::params::{Init, ParamBuilder};
use candle_core::{DType, Result, Tensor};

/// A linear layer. Its f32 weight is cast to `compute` (a differentiable cast, so
/// gradients reach it in f32) and the output is in `compute`.
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
    compute: DType,
}

impl Linear {
    /// `nn.Linear(in_dim, out_dim)` with the MAE init: xavier-uniform weight, zero bias.
    pub fn new(p: &mut ParamBuilder, name: &str, in_dim: usize, out_dim: usize) -> Result<Self> {
        Self::with_init(p, name, in_dim, out_dim, Init::XavierUniform { fan_in: in_dim, fan_out: out_dim })
    }

    /// A linear layer whose weight starts as `weight_init` (the bias at zero).
    pub fn with_init(p: &mut ParamBuilder, name: &str, in_dim: usize, out_dim: usize, weight_init: Init) -> Result<Self> {
        let weight = p.param(&format!("{name}.weight"), &[out_dim, in_dim], weight_init)?;
        let bias = p.param(&format!("{name}.bias"), &[out_dim], Init::Zeros)?;
        Ok(Linear { weight, bias, compute: p.compute_dtype() })
    }

    /// `xs @ weight^T + bias` over the last dimension of a `[B, T, in]` or `[B, in]` input.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::linear(&xs.to_dtype(self.compute)?, &self.weight.to_dtype(self.compute)?, &self.bias)
    }

    /// `xs @ weight^T`, the bias left for a fused op to add.
    pub fn matmul(&self, xs: &Tensor) -> Result<Tensor> {
        ops::matmul_wt(&xs.to_dtype(self.compute)?, &self.weight.to_dtype(self.compute)?)
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &mut ParamBuilder, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = p.param(&format!("{name}.weight"), &[dim], Init::Ones)?;
        let bias = p.param(&format!("{name}.bias"), &[dim], Init::Zeros)?;
        Ok(LayerNorm { weight, bias, eps })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        ops::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

/// Multi-head self-attention with a fused, biased qkv projection.
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
}

impl Attention {
    pub fn new(p: &mut ParamBuilder, name: &str, dim: usize, num_heads: usize) -> Result<Self> {
        Ok(Attention {
            qkv: Linear::new(p, &format!("{name}.qkv"), dim, 3 * dim)?,
            proj: Linear::new(p, &format!("{name}.proj"), dim, dim)?,
            num_heads,
        })
    }

    /// Returns f32, the residual stream's dtype.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.proj.forward(&ops::attention(&self.qkv.forward(xs)?, self.num_heads)?)?.to_dtype(DType::F32)
    }
}

pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(p: &mut ParamBuilder, name: &str, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Mlp { fc1: Linear::new(p, &format!("{name}.fc1"), dim, hidden)?, fc2: Linear::new(p, &format!("{name}.fc2"), hidden, dim)? })
    }

    /// Returns f32, the residual stream's dtype.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&ops::bias_gelu(&self.fc1.matmul(xs)?, self.fc1.bias())?)?.to_dtype(DType::F32)
    }
}

/// A pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    pub fn new(p: &mut ParamBuilder, name: &str, dim: usize, num_heads: usize, mlp_hidden: usize, eps: f64) -> Result<Self> {
        Ok(Block {
            norm1: LayerNorm::new(p, &format!("{name}.norm1"), dim, eps)?,
            attn: Attention::new(p, &format!("{name}.attn"), dim, num_heads)?,
            norm2: LayerNorm::new(p, &format!("{name}.norm2"), dim, eps)?,
            mlp: Mlp::new(p, &format!("{name}.mlp"), dim, mlp_hidden)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_dropping(xs, None)
    }

    /// The forward pass with stochastic depth (timm's `DropPath`): each residual
    /// branch is multiplied per sample by its `[N, 1, 1]` scale (0, or 1 / keep_prob).
    pub fn forward_dropping(&self, xs: &Tensor, scales: Option<&DropPathScales>) -> Result<Tensor> {
        let attn = self.attn.forward(&self.norm1.forward(xs)?)?;
        let attn = match scales {
            Some(s) => attn.broadcast_mul(&s.attn)?,
            None => attn,
        };
        let xs = (xs + attn)?;
        let mlp = self.mlp.forward(&self.norm2.forward(&xs)?)?;
        let mlp = match scales {
            Some(s) => mlp.broadcast_mul(&s.mlp)?,
            None => mlp,
        };
        &xs + mlp
    }
}

/// Per-sample scales of a block's two residual branches under stochastic depth.
pub struct DropPathScales {
    pub attn: Tensor,
    pub mlp: Tensor,
}

impl DropPathScales {
    /// timm's `drop_path` over a batch whose sample `i` draws from `rngs[i]`: each sample
    /// keeps a branch with probability `1 - rate`, and kept branches are scaled by
    /// `1 / (1 - rate)` so the expectation is unchanged. A sample draws once for the
    /// attention branch, then once for the MLP.
    pub fn draw(rngs: &mut [impl rand::Rng], rate: f64, device: &candle_core::Device) -> Result<Self> {
        let n = rngs.len();
        let mut draw = || -> Result<Tensor> {
            let mut values = Vec::with_capacity(n);
            drop_path_scales(rngs, rate, &mut values);
            Tensor::from_vec(values, (n, 1, 1), device)
        };
        Ok(DropPathScales { attn: draw()?, mlp: draw()? })
    }
}

/// One residual branch's per-sample scales under stochastic depth at `rate`, sample
/// `i`'s drawn from `rngs[i]` (so that it does not depend on the other samples),
/// appended to `out`: `1 / (1 - rate)` with probability `1 - rate`, else 0.
pub fn drop_path_scales(rngs: &mut [impl rand::Rng], rate: f64, out: &mut Vec<f32>) {
    let keep = 1.0 - rate;
    out.extend(rngs.iter_mut().map(|rng| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }));
}
