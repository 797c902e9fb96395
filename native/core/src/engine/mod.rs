//! The training engine, in the manner of llm.c: for one model config and batch shape,
//! a plan lays out every tensor a step touches (parameters, gradients, AdamW's moments,
//! activations) in flat buffers allocated once, and every layer's forward and backward
//! pass is a plain function over those buffers. This is what users' calls run on, on
//! the CPU in f32; the candle model (`model.rs`) is the readable reference that the
//! tests hold it against.
//!
//! The layer code (`mae.rs`) names tensors by [`Slot`]s (an arena and a range) and
//! calls the [`Kernels`] trait; only a kernel implementation turns slots into memory.
//! `cpu.rs` is the CPU implementation; a CUDA one (cuBLAS GEMMs and the existing CUDA
//! kernels over device buffers) implements the same trait without touching the layers.

mod blocks;
pub mod cpu;
pub mod mae;
pub(crate) mod rows;
pub mod vit;

pub use mae::{FlatAdamW, MaeEngine, Mode};
pub use vit::{FlatOptimizer, VitEngine, VitMode};

use crate::distributed::Group;
use crate::error::Result;

/// The patch grid of a plan's images, `h` x `w` patches: the model's own square grid,
/// or another one for dense features of images of other sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub h: usize,
    pub w: usize,
}

impl Grid {
    pub fn square(side: usize) -> Self {
        Grid { h: side, w: side }
    }

    pub fn patches(self) -> usize {
        self.h * self.w
    }
}

/// Which of a plan's buffers a tensor lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arena {
    /// Trainable parameters, in the published order.
    Params,
    /// Their gradients, laid out as `Params`.
    Grads,
    /// Activations, inputs, fixed tables and scratch.
    Acts,
}

/// A tensor of a plan: `len` values from `offset` in `arena`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub arena: Arena,
    pub offset: usize,
    pub len: usize,
}

impl Slot {
    /// `len` values starting `start` values into this slot.
    pub fn part(self, start: usize, len: usize) -> Slot {
        assert!(start + len <= self.len, "slot part {start}+{len} outside a slot of {}", self.len);
        Slot { offset: self.offset + start, len, ..self }
    }

    fn overlaps(self, other: Slot) -> bool {
        self.arena == other.arena && self.offset < other.offset + other.len && other.offset < self.offset + self.len && self.len > 0 && other.len > 0
    }
}

/// Hands out consecutive slots of one arena.
#[derive(Debug, Default, Clone)]
pub struct Layout {
    pub len: usize,
}

impl Layout {
    pub fn take(&mut self, arena: Arena, len: usize) -> Slot {
        let slot = Slot { arena, offset: self.len, len };
        self.len += len;
        slot
    }
}

/// Where a row of a gathered token sequence comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A row of the gathered tensor.
    Row(u32),
    /// One of the learned tokens passed alongside (cls, mask tokens).
    Token(u8),
}

/// What a linear layer does after its product, in the same pass over its output rows.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue {
    None,
    /// `y = gelu(h)`, where `h` (the layer's own output slot) keeps the pre-activation.
    Gelu { y: Slot },
}

/// One AdamW update of a range of the flat parameter buffer (one parameter).
#[derive(Debug, Clone, Copy)]
pub struct AdamWRange {
    pub offset: usize,
    pub len: usize,
    /// `1 - lr * weight_decay` where the parameter decays, else 1.
    pub decay_factor: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
}

/// One parameter of a LARS step: its range and whether it is a matrix (decayed and
/// trust-scaled).
#[derive(Debug, Clone, Copy)]
pub struct LarsRange {
    pub offset: usize,
    pub len: usize,
    pub matrix: bool,
}

/// AdamW's constants for one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f32,
}

/// The operations the layers are written in. Shapes are row-major; `rows` counts the
/// leading dimensions together. Gradients of parameters are always added to (the plan
/// zeroes them once per optimizer step); other outputs are overwritten unless a flag
/// says otherwise.
pub trait Kernels {
    /// Copies host values into a slot.
    fn upload(&mut self, dst: Slot, values: &[f32]);
    /// Copies a slot to the host.
    fn download(&self, src: Slot) -> Vec<f32>;
    fn fill(&mut self, dst: Slot, value: f32);

    /// `y [rows, n] = x [rows, k] w^T + b (+ residual)`, `w` `[n, k]`, then the epilogue.
    #[allow(clippy::too_many_arguments)]
    fn linear(&mut self, x: Slot, w: Slot, b: Slot, residual: Option<Slot>, y: Slot, rows: usize, k: usize, n: usize, epilogue: Epilogue);
    /// The gradients of [`Kernels::linear`] given `dy`: `dx = dy w` (overwritten, or
    /// added to with `accumulate_dx`), `dw += dy^T x` and `db += sum of dy's rows`. A
    /// frozen layer passes no `dw`/`db`; a first layer no `dx`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(&mut self, dy: Slot, x: Slot, w: Slot, dx: Option<Slot>, accumulate_dx: bool, dw_db: Option<(Slot, Slot)>, rows: usize, k: usize, n: usize);
    /// `d *= gelu'(h)`, elementwise.
    fn gelu_backward(&mut self, h: Slot, d: Slot);

    /// `out = base + scale[r / rows_per_scale] * x` row by row (`out = scale * x` without
    /// `base`): drop path's per-sample branch scales.
    fn scaled_add(&mut self, base: Option<Slot>, x: Slot, scales: Slot, out: Slot, rows_per_scale: usize, d: usize);
    /// Adds the sum of the `rows` rows of `x` (each `d` wide) into `acc`.
    fn add_row_sums(&mut self, x: Slot, acc: Slot, rows: usize, d: usize);
    /// Pools `x` `[batch, tokens, d]` to `[batch, d]`: the mean of the patch tokens
    /// (1..), or the cls token (0).
    fn pool(&mut self, x: Slot, out: Slot, batch: usize, tokens: usize, d: usize, mean: bool);
    /// The gradient of [`Kernels::pool`], overwriting `dx`.
    fn pool_backward(&mut self, dout: Slot, dx: Slot, batch: usize, tokens: usize, d: usize, mean: bool);
    /// `BatchNorm1d(affine=False)` over `[n, d]`: with batch statistics (training; their
    /// means and biased variances kept in `stats`, `2 * d`), or with the running ones
    /// `(mean, var)`.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm(&mut self, x: Slot, y: Slot, stats: Slot, running: Option<(Slot, Slot)>, n: usize, d: usize, eps: f32);
    /// Its input gradient, overwriting `dx`: through the batch statistics in `stats`, or
    /// with `running_var` as a constant.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(&mut self, dy: Slot, x: Slot, stats: Slot, running_var: Option<Slot>, dx: Slot, n: usize, d: usize, eps: f32);
    /// timm's `SoftTargetCrossEntropy`: the batch mean of `-sum(targets * log_softmax(logits))`
    /// over `[n, k]` logits, returned; with `dlogits`, writes `grad_scale` times its gradient.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(&mut self, logits: Slot, targets: &[f32], dlogits: Option<Slot>, n: usize, k: usize, grad_scale: f32) -> f32;
    /// One LARS step (`util/lars.py`) over the parameter ranges with the flat momentum
    /// `mu`: matrices get weight decay and the trust ratio, 1-D parameters neither.
    fn lars(&mut self, mu: &mut [f32], ranges: &[LarsRange], lr: f32, weight_decay: f32, momentum: f32, trust_coefficient: f32);
    /// Whether [`Kernels::lars`] with these arguments would leave every parameter and
    /// momentum finite; changes nothing.
    fn lars_stays_finite(&self, mu: &[f32], ranges: &[LarsRange], lr: f32, weight_decay: f32, momentum: f32, trust_coefficient: f32) -> bool;

    /// LayerNorm over rows of `d` (biased variance): `y = (x - mean) * rstd * w + b`,
    /// keeping each row's mean and rstd in `stats` (`2 * rows`: means, then rstds).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(&mut self, x: Slot, w: Slot, b: Slot, y: Slot, stats: Slot, rows: usize, d: usize, eps: f32);
    /// Adds LayerNorm's input gradient into `dx` and its parameter gradients into `dw`, `db`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(&mut self, dy: Slot, x: Slot, w: Slot, stats: Slot, dx: Slot, dw: Slot, db: Slot, rows: usize, d: usize);

    /// Multi-head self-attention from a fused `qkv` `[batch, tokens, 3 * dim]` (q, k, v
    /// each `[heads, dim / heads]` per token, as timm lays them out) to `out`
    /// `[batch, tokens, dim]`, keeping the attention weights in `probs`
    /// `[batch, heads, tokens, tokens]` (training only).
    #[allow(clippy::too_many_arguments)]
    fn attention(&mut self, qkv: Slot, out: Slot, probs: Option<Slot>, batch: usize, tokens: usize, dim: usize, heads: usize);
    /// The gradient of [`Kernels::attention`] with respect to `qkv`, overwritten.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(&mut self, dout: Slot, qkv: Slot, probs: Slot, dqkv: Slot, batch: usize, tokens: usize, dim: usize, heads: usize);

    /// Rows `[count, c * p * p]` of image patches, each flattened in (c, i, j) order (the
    /// patch-embedding conv's weight layout): row `r` is patch `patches[r % per_image]`
    /// (row-major over `grid`) of image `r / per_image` of `imgs`
    /// `[N, c, grid.h * p, grid.w * p]`.
    #[allow(clippy::too_many_arguments)]
    fn patch_rows(&mut self, imgs: Slot, patches: &[u32], per_image: usize, out: Slot, c: usize, p: usize, grid: Grid);
    /// Gathers rows of `d` values: `out[i]` is row `r` of `src` for `Source::Row(r)`, or
    /// learned token `tokens[t]` for `Source::Token(t)`, plus row `positions[i]` of `add`
    /// when given (position embeddings).
    fn gather_rows(&mut self, src: Slot, index: &[Source], tokens: [Slot; 2], add: Option<(Slot, &[u32])>, out: Slot, d: usize);
    /// The gradient of [`Kernels::gather_rows`]: `dsrc`'s gathered rows overwritten (each
    /// source row is gathered at most once), each token's rows added into `dtokens`.
    fn scatter_rows(&mut self, dout: Slot, index: &[Source], dsrc: Slot, dtokens: [Slot; 2], d: usize);

    /// The published loss: per-patch MSE of `pred` against the target `shape.target` makes
    /// of the patchified images (pixels, pixels normalised per patch with the unbiased
    /// variance, or PCA coefficients), averaged over the removed patches (`mask` 1; with
    /// none removed the loss is 0), and returns it.
    /// With `dpred`, writes `grad_scale * dloss/dpred` there (zero on every other row).
    fn masked_mse(&mut self, imgs: Slot, pred: Slot, mask: &[f32], dpred: Option<Slot>, shape: MseShape, grad_scale: f32) -> f32;

    /// The global L2 norm of a slot (gradient clipping).
    fn norm(&mut self, x: Slot) -> f64;
    fn scale(&mut self, x: Slot, factor: f32);
    /// One AdamW step over the parameter ranges, with the flat moments `m` and `v`.
    fn adamw(&mut self, m: &mut [f32], v: &mut [f32], ranges: &[AdamWRange], step: AdamWStep);
    /// Whether [`Kernels::adamw`] with these arguments would leave every parameter and
    /// moment finite; changes nothing.
    fn adamw_stays_finite(&self, m: &[f32], v: &[f32], ranges: &[AdamWRange], step: AdamWStep) -> bool;
}

/// Where [`Kernels::masked_mse`] finds its predictions and targets.
#[derive(Debug, Clone, Copy)]
pub struct MseShape {
    pub batch: usize,
    pub channels: usize,
    pub patch: usize,
    pub grid: usize,
    /// Rows of `pred` per image: the cls token's, then one per patch.
    pub rows_per_image: usize,
    pub target: MseTarget,
}

/// What [`Kernels::masked_mse`] compares each row of `pred` with.
#[derive(Debug, Clone, Copy)]
pub enum MseTarget {
    /// The patch's `p*p*c` pixels in (i, j, c) order.
    Pixels,
    /// The same, normalised by their mean and unbiased standard deviation.
    NormPixels,
    /// The patch's `k` coefficients `(x - mean) @ components^T`: `mean` `[p*p*c]`,
    /// `components` `[k, p*p*c]`.
    Pca { mean: Slot, components: Slot, k: usize },
}

/// AdamW's constants for update number `t` at learning rate `lr`: a range for each
/// parameter (`offset`, `len`, group) into `ranges`, and those every range shares.
pub(crate) fn adamw_constants(
    config: &crate::optim::AdamWConfig,
    t: u64,
    lr: f64,
    params: impl Iterator<Item = (usize, usize, crate::optim::ParamGroup)>,
    ranges: &mut Vec<AdamWRange>,
) -> AdamWStep {
    let crate::optim::AdamWConfig { beta1, beta2, eps, weight_decay } = *config;
    let bias_correction1 = 1.0 - beta1.powi(t as i32);
    let bias_correction2 = 1.0 - beta2.powi(t as i32);
    ranges.clear();
    for (offset, len, group) in params {
        let lr = lr * group.lr_scale;
        let decay_factor = if group.decays { 1.0 - lr * weight_decay } else { 1.0 } as f32;
        ranges.push(AdamWRange { offset, len, decay_factor, step_size: (lr / bias_correction1) as f32 });
    }
    AdamWStep { beta1: beta1 as f32, beta2: beta2 as f32, eps: eps as f32, bias_correction2_sqrt: bias_correction2.sqrt() as f32 }
}

/// An engine's gradient buffer, as training uses it: one slot over every parameter's
/// gradient (a frozen parameter's stays 0).
pub trait Gradients {
    /// The engine's kernels and the slot of every gradient.
    fn gradients(&mut self) -> (&mut cpu::CpuKernels, Slot);

    fn zero_grad(&mut self) {
        let (kernels, all) = self.gradients();
        kernels.fill(all, 0.0);
    }

    /// The global L2 norm of every gradient at once.
    fn grad_norm(&mut self) -> f64 {
        let (kernels, all) = self.gradients();
        kernels.norm(all)
    }

    /// Averages the gradients over `group`'s ranks: one all-reduce of the whole flat
    /// buffer, then a scale by 1 / ranks (DDP's mean). A no-op alone.
    fn average_gradients(&mut self, group: &Group, what: &str) -> Result<()> {
        if group.size() == 1 {
            return Ok(());
        }
        let (kernels, all) = self.gradients();
        group.all_reduce_sum_f32(kernels.grads_mut(), what)?;
        kernels.scale(all, 1.0 / group.size() as f32);
        Ok(())
    }

    /// Sets the parameters to rank 0's of `group`. A no-op alone.
    fn broadcast_params(&mut self, group: &Group) -> Result<()> {
        if group.size() == 1 {
            return Ok(());
        }
        let (kernels, _) = self.gradients();
        group.broadcast(bytemuck::cast_slice_mut(kernels.params_mut()), 0, "the broadcast of the weights")
    }

    /// `torch.nn.utils.clip_grad_norm_` given the gradients' global norm `norm` (from
    /// [`Gradients::grad_norm`]): scales them to a norm of at most `max_norm`.
    fn clip_grads(&mut self, norm: f64, max_norm: f64) {
        if let Some(scale) = crate::optim::clip_factor(norm, max_norm) {
            let (kernels, all) = self.gradients();
            kernels.scale(all, scale as f32);
        }
    }
}

/// Checks that the outputs of a kernel call overlap nothing else it is given, so that
/// mutable views of them alias nothing.
pub(crate) fn check_disjoint(ins: &[Slot], outs: &[Slot]) {
    for (i, o) in outs.iter().enumerate() {
        assert!(!ins.iter().any(|s| s.overlaps(*o)), "kernel output {o:?} overlaps an input");
        assert!(!outs[..i].iter().any(|s| s.overlaps(*o)), "kernel outputs overlap at {o:?}");
    }
}
