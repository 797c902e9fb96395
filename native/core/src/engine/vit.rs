//! The classifier of fine-tuning and linear probing (`models_vit.py`) on the engine:
//! patch embedding, cls token and learned position embedding, the blocks with
//! stochastic depth, global (mean + `fc_norm`) or cls (`norm`) pooling, the probe's
//! BatchNorm, the head and the soft-target cross-entropy, forward and backward over
//! one buffer plan. Frozen parameters get no gradient work: the backward pass stops
//! at the first trained block (or at the head).

use super::blocks::{grad, keep_outputs, stack_acts, Linear, Norm, Params, Stack};
use super::cpu::{CpuKernels, NONE};
use super::{AdamWRange, Arena, Epilogue, Grid, Kernels, LarsRange, Layout, Slot, Source};
use crate::bail;
use crate::checkpoint::Stored;
use crate::classifier::{resize_pos_embed, ClassifierConfig, Trainable, VitClassifier};
use crate::error::Result;
use crate::optim::{AdamWConfig, ParamGroup};

/// How a classifier plan runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VitMode {
    /// Evaluation: running BatchNorm statistics, no stochastic depth, nothing kept for a
    /// backward pass.
    Eval,
    /// Gradients of the `trainable` parameters. `train` is the training mode of
    /// fine-tuning (BatchNorm on batch statistics, stochastic depth at `drop_path`, the
    /// last block's rate); without it the pass is in evaluation mode.
    Grad { trainable: Trainable, train: bool, drop_path: f64 },
}

struct BatchNorm {
    /// Batch means and biased variances of the last training pass (`2 * D`).
    stats: Slot,
    running_mean: Slot,
    running_var: Slot,
    out: Slot,
}

/// A classifier plan for one config, batch size and mode.
pub struct VitEngine {
    pub config: ClassifierConfig,
    pub batch: usize,
    pub mode: VitMode,
    /// The images' patch grid: the config's, or another in evaluation.
    pub grid: Grid,
    kernels: CpuKernels,
    params: Params,
    imgs: Slot,
    cls_token: Slot,
    pos_embed: Slot,
    patch_embed: Linear,
    patches: Slot,
    emb: Slot,
    stack: Stack,
    /// `fc_norm` (global pooling) or `norm` (cls pooling).
    norm: Norm,
    pooled: Slot,
    features: Slot,
    norm_stats: Slot,
    batch_norm: Option<BatchNorm>,
    head: Linear,
    logits: Slot,
    // Training: gradients of the logits, of the head's input, of the pooled features and
    // of the embedded patches.
    dlogits: Option<Slot>,
    dhead_in: Option<Slot>,
    dfeatures: Option<Slot>,
    dpooled: Option<Slot>,
    demb: Option<Slot>,
    /// Running statistics updates so far (`num_batches_tracked`).
    pub batches_tracked: i64,
    index: Vec<Source>,
    positions: Vec<u32>,
    patch_ids: Vec<u32>,
    drop_scales: Vec<f32>,
}

impl VitEngine {
    pub fn new(config: &ClassifierConfig, batch: usize, mode: VitMode) -> Result<Self> {
        Self::at_grid(config, batch, mode, Grid::square(config.grid_size()))
    }

    /// The plan for images of `grid` patches, which need not be the config's
    /// (`VitMode::Eval` only, for dense features): its `pos_embed` is then the model's
    /// resized as the published `interpolate_pos_embed` does.
    pub fn at_grid(config: &ClassifierConfig, batch: usize, mode: VitMode, grid: Grid) -> Result<Self> {
        config.validate()?;
        if batch == 0 {
            bail!(InvalidArgument, "an engine plan needs at least one image");
        }
        let c = config;
        if grid != Grid::square(c.grid_size()) && mode != VitMode::Eval {
            bail!(Internal, "a plan for {}x{} patches instead of the model's {g}x{g} is for evaluation only", grid.h, grid.w, g = c.grid_size());
        }
        let (l, d, t) = (grid.patches(), c.embed_dim, 1 + grid.patches());
        let conv_in = c.in_chans * c.patch_size * c.patch_size;
        let mut p = Params { layout: Layout::default(), names: Vec::new() };
        let cls_token = p.take("cls_token", &[1, 1, d]);
        let pos_embed = p.take("pos_embed", &[1, t, d]);
        let patch_embed = Linear { w: p.take("patch_embed.proj.weight", &[d, c.in_chans, c.patch_size, c.patch_size]), b: p.take("patch_embed.proj.bias", &[d]), k: conv_in, n: d };
        let blocks = (0..c.depth).map(|i| p.block(&format!("blocks.{i}"), d, c.mlp_hidden())).collect();
        let norm = p.norm(if c.global_pool { "fc_norm" } else { "norm" }, d);
        let head = p.linear(if c.head_batch_norm { "head.1" } else { "head" }, d, c.num_classes);

        let (trained_from, grads, drop_path) = match mode {
            VitMode::Eval => (c.depth, false, false),
            VitMode::Grad { trainable, train, drop_path } => {
                let from = match trainable {
                    Trainable::All => 0,
                    Trainable::LastBlocks(k) => c.depth - k.min(c.depth),
                    Trainable::Head => c.depth,
                };
                (from, true, train && drop_path > 0.0)
            }
        };
        let encoder_trains = grads && !matches!(mode, VitMode::Grad { trainable: Trainable::Head, .. });
        let mut a = Layout::default();
        let mut take = |len: usize| a.take(Arena::Acts, len);
        let imgs = take(batch * c.in_chans * l * c.patch_size * c.patch_size);
        let patches = take(batch * l * conv_in);
        let emb = take(batch * l * d);
        let (pooled, features, norm_stats) = (take(batch * d), take(batch * d), take(2 * batch));
        let batch_norm = c.head_batch_norm.then(|| BatchNorm { stats: take(2 * d), running_mean: take(d), running_var: take(d), out: take(batch * d) });
        let logits = take(batch * c.num_classes);
        let dlogits = grads.then(|| take(batch * c.num_classes));
        let dhead_in = (encoder_trains && c.head_batch_norm).then(|| take(batch * d));
        let dfeatures = encoder_trains.then(|| take(batch * d));
        let dpooled = encoder_trains.then(|| take(batch * d));
        let demb = (grads && trained_from == 0).then(|| take(batch * l * d));
        let stack = stack_acts(&mut a, if encoder_trains { trained_from } else { c.depth }, drop_path, blocks, batch, t, d, c.num_heads, c.mlp_hidden());
        let mut index = Vec::with_capacity(batch * t);
        let mut positions = Vec::with_capacity(batch * t);
        for n in 0..batch {
            index.push(Source::Token(0));
            index.extend((0..l).map(|j| Source::Row((n * l + j) as u32)));
            positions.extend(0..t as u32);
        }
        Ok(VitEngine {
            config: c.clone(),
            batch,
            mode,
            grid,
            kernels: CpuKernels::new(p.layout.len, a.len),
            params: p,
            imgs,
            cls_token,
            pos_embed,
            patch_embed,
            patches,
            emb,
            stack,
            norm,
            pooled,
            features,
            norm_stats,
            batch_norm,
            head,
            logits,
            dlogits,
            dhead_in,
            dfeatures,
            dpooled,
            demb,
            batches_tracked: 0,
            index,
            positions,
            patch_ids: (0..batch).flat_map(|_| 0..l as u32).collect(),
            drop_scales: Vec::with_capacity(2 * batch * c.depth),
        })
    }

    /// Parameters in the published order: name, shape and range in the flat buffers.
    pub fn param_layout(&self) -> impl Iterator<Item = (&str, &[usize], std::ops::Range<usize>)> {
        self.params.names.iter().map(|(n, shape, s)| (n.as_str(), shape.as_slice(), s.offset..s.offset + s.len))
    }

    pub fn grads(&self) -> &[f32] {
        self.kernels.grads()
    }

    /// Moves `other`'s weights and gradients into this plan (one config, another batch).
    pub fn take_grads_from(&mut self, other: &mut VitEngine) {
        self.kernels.take_weights_from(&mut other.kernels);
    }

    pub fn bytes(&self) -> usize {
        self.kernels.bytes()
    }

    /// Copies the classifier's parameters and BatchNorm statistics into the plan.
    pub fn load_from(&mut self, classifier: &VitClassifier) -> Result<()> {
        if classifier.config != self.config {
            bail!(Internal, "engine plan for another classifier config");
        }
        if classifier.params().len() != self.params.names.len() {
            bail!(Internal, "the classifier has {} parameters, the engine plan {}", classifier.params().len(), self.params.names.len());
        }
        for ((name, shape, slot), (model_name, var)) in self.params.names.iter().zip(classifier.params()) {
            // At the model's own grid, `resize_pos_embed` gives the table itself.
            let value = match name.as_str() {
                "pos_embed" => resize_pos_embed(var.as_tensor(), self.grid.h, self.grid.w)?,
                _ => var.as_tensor().clone(),
            };
            if name != model_name || value.dims() != shape.as_slice() {
                bail!(Internal, "engine parameter {name} {shape:?} does not match the classifier's {model_name} {:?}", value.dims());
            }
            self.kernels.upload(*slot, &value.flatten_all()?.to_vec1::<f32>()?);
        }
        if let (Some(bn), Some((mean, var, tracked))) = (&self.batch_norm, classifier.batch_norm_stats()?) {
            self.kernels.upload(bn.running_mean, &mean);
            self.kernels.upload(bn.running_var, &var);
            self.batches_tracked = tracked;
        }
        Ok(())
    }

    /// Copies the plan's parameters and BatchNorm statistics back into the classifier.
    pub fn store_to(&self, classifier: &VitClassifier) -> Result<()> {
        for ((_, shape, slot), (_, var)) in self.params.names.iter().zip(classifier.params()) {
            var.set(&candle_core::Tensor::from_slice(&self.kernels.params()[slot.offset..slot.offset + slot.len], shape.as_slice(), var.device())?)?;
        }
        if let Some(bn) = &self.batch_norm {
            classifier.set_batch_norm_stats(self.kernels.download(bn.running_mean), self.kernels.download(bn.running_var), self.batches_tracked)?;
        }
        Ok(())
    }

    fn training(&self) -> bool {
        matches!(self.mode, VitMode::Grad { train: true, .. })
    }

    /// The forward pass to the logits. In training mode, `drop_path` (a generator per
    /// image) draws stochastic depth as the reference model does (every block, attention
    /// then MLP).
    fn forward(&mut self, imgs: &[f32], drop_path: Option<&mut [rand_chacha::ChaCha8Rng]>) -> Result<()> {
        self.encode(imgs, drop_path, |_, _, _| ())?;
        let c = &self.config;
        let (n, d, t, eps) = (self.batch, c.embed_dim, 1 + self.grid.patches(), c.layer_norm_eps as f32);
        let training = self.training();
        let k = &mut self.kernels;
        k.pool(self.stack.output(), self.pooled, n, t, d, c.global_pool);
        // Cls pooling takes the cls token of `norm` over every token: LayerNorm is per
        // token, so normalising the cls tokens alone gives the same features.
        k.layer_norm(self.pooled, self.norm.w, self.norm.b, self.features, self.norm_stats, n, d, eps);
        let head_in = match &self.batch_norm {
            Some(bn) => {
                let train = training;
                if train && n < 2 {
                    bail!(InvalidArgument, "BatchNorm needs more than one image per training batch");
                }
                let running = (!train).then_some((bn.running_mean, bn.running_var));
                k.batch_norm(self.features, bn.out, bn.stats, running, n, d, BN_EPS);
                bn.out
            }
            None => self.features,
        };
        let h = self.head;
        k.linear(head_in, h.w, h.b, None, self.logits, n, d, c.num_classes, Epilogue::None);
        if let (Some(bn), true) = (&self.batch_norm, training) {
            // Running statistics: momentum 0.1, the variance unbiased (as torch).
            let stats = k.download(bn.stats);
            let (mut mean, mut var) = (k.download(bn.running_mean), k.download(bn.running_var));
            let unbias = n as f32 / (n - 1) as f32;
            for j in 0..d {
                mean[j] = mean[j] * (1.0 - BN_MOMENTUM) + stats[j] * BN_MOMENTUM;
                var[j] = var[j] * (1.0 - BN_MOMENTUM) + stats[d + j] * unbias * BN_MOMENTUM;
            }
            k.upload(bn.running_mean, &mean);
            k.upload(bn.running_var, &var);
            self.batches_tracked += 1;
        }
        Ok(())
    }

    /// Patch embedding, cls token and position embedding, and the blocks (drawing
    /// stochastic depth as [`VitEngine::forward`] says), handing `observe` each block's
    /// index and output `[N, 1 + L, D]`.
    fn encode(&mut self, imgs: &[f32], drop_path: Option<&mut [rand_chacha::ChaCha8Rng]>, observe: impl FnMut(&CpuKernels, usize, Slot)) -> Result<()> {
        let c = &self.config;
        let (n, d, eps) = (self.batch, c.embed_dim, c.layer_norm_eps as f32);
        let l = self.grid.patches();
        if imgs.len() != n * c.in_chans * l * c.patch_size * c.patch_size {
            bail!(Internal, "engine plan for {n} images given {} values", imgs.len());
        }
        if let (Some(dp), VitMode::Grad { drop_path: last_rate, .. }) = (&self.stack.drop_path, self.mode) {
            let rngs = match drop_path {
                Some(rngs) if rngs.len() == n => rngs,
                _ => bail!(Internal, "stochastic depth needs a generator per image"),
            };
            let depth = c.depth;
            for (i, (attn, mlp)) in dp.scales.iter().enumerate() {
                // `torch.linspace(0, rate, depth)`: a single block gets 0.
                let rate = if depth > 1 { last_rate * i as f64 / (depth - 1) as f64 } else { 0.0 };
                for slot in [attn, mlp] {
                    self.drop_scales.clear();
                    crate::nn::drop_path_scales(rngs, rate, &mut self.drop_scales);
                    self.kernels.upload(*slot, &self.drop_scales);
                }
            }
        }
        let k = &mut self.kernels;
        k.upload(self.imgs, imgs);
        k.patch_rows(self.imgs, &self.patch_ids, l, self.patches, c.in_chans, c.patch_size, self.grid);
        let pe = self.patch_embed;
        k.linear(self.patches, pe.w, pe.b, None, self.emb, n * l, pe.k, pe.n, Epilogue::None);
        k.gather_rows(self.emb, &self.index, [self.cls_token, NONE], Some((self.pos_embed, &self.positions)), self.stack.input(), d);
        self.stack.forward_observed(k, eps, observe);
        Ok(())
    }

    /// The outputs `[N, 1 + L, D]` of blocks `layers` (indices, in the order given) over
    /// `imgs`, in this plan's mode without stochastic depth: dense features.
    pub fn block_outputs(&mut self, imgs: &[f32], layers: &[usize]) -> Result<Vec<Vec<f32>>> {
        let mut outputs = vec![Vec::new(); layers.len()];
        self.encode(imgs, None, keep_outputs(layers, &mut outputs))?;
        Ok(outputs)
    }

    /// Logits `[N, K]` of `imgs` (an `Eval` plan, or any plan in its mode).
    pub fn logits(&mut self, imgs: &[f32]) -> Result<Vec<f32>> {
        self.forward(imgs, None)?;
        Ok(self.kernels.download(self.logits))
    }

    /// The features the head sees (before the probe's BatchNorm), `[N, D]`, of the last pass.
    pub fn features(&self) -> Vec<f32> {
        self.kernels.download(self.features)
    }

    /// Forward and backward of one micro-batch against soft targets `[N, K]`: returns the
    /// loss and adds `grad_scale` times the trained parameters' gradients. A plan with
    /// stochastic depth needs `drop_path`, a generator per image.
    pub fn accumulate(&mut self, imgs: &[f32], targets: &[f32], grad_scale: f32, drop_path: Option<&mut [rand_chacha::ChaCha8Rng]>) -> Result<f32> {
        let VitMode::Grad { trainable, .. } = self.mode else { bail!(Internal, "accumulate needs a gradient plan") };
        self.forward(imgs, drop_path)?;
        let training = self.training();
        let c = &self.config;
        let (n, d, t, kc) = (self.batch, c.embed_dim, 1 + c.num_patches(), c.num_classes);
        let k = &mut self.kernels;
        let dlogits = self.dlogits.expect("a gradient plan");
        let loss = k.cross_entropy(self.logits, targets, Some(dlogits), n, kc, grad_scale);
        let head_in = self.batch_norm.as_ref().map_or(self.features, |bn| bn.out);
        let h = self.head;
        let Some(dfeatures) = self.dfeatures else {
            // Linear probing: the head alone.
            k.linear_backward(dlogits, head_in, h.w, None, false, Some((grad(h.w), grad(h.b))), n, d, kc);
            return Ok(loss);
        };
        match (&self.batch_norm, self.dhead_in) {
            (Some(bn), Some(dhead_in)) => {
                k.linear_backward(dlogits, head_in, h.w, Some(dhead_in), false, Some((grad(h.w), grad(h.b))), n, d, kc);
                let running_var = (!training).then_some(bn.running_var);
                k.batch_norm_backward(dhead_in, self.features, bn.stats, running_var, dfeatures, n, d, BN_EPS);
            }
            _ => k.linear_backward(dlogits, head_in, h.w, Some(dfeatures), false, Some((grad(h.w), grad(h.b))), n, d, kc),
        }
        let dpooled = self.dpooled.expect("the encoder trains");
        k.fill(dpooled, 0.0);
        k.layer_norm_backward(dfeatures, self.pooled, self.norm.w, self.norm_stats, dpooled, grad(self.norm.w), grad(self.norm.b), n, d);
        if trainable == Trainable::LastBlocks(0) {
            return Ok(loss);
        }
        let dres = self.stack.scratch.expect("trained blocks").dres;
        k.pool_backward(dpooled, dres, n, t, d, c.global_pool);
        self.stack.backward(k);
        if let Some(demb) = self.demb {
            k.scatter_rows(dres, &self.index, demb, [grad(self.cls_token), NONE], d);
            k.add_row_sums(dres, grad(self.pos_embed), n, t * d);
            let pe = self.patch_embed;
            k.linear_backward(demb, self.patches, pe.w, None, false, Some((grad(pe.w), grad(pe.b))), n * c.num_patches(), pe.k, pe.n);
        }
        Ok(loss)
    }

    /// One optimizer step over the trained parameters' ranges.
    pub fn optimizer_step(&mut self, opt: &mut FlatOptimizer, lr: f64) {
        opt.steps += 1;
        let t = opt.steps;
        match &mut opt.kind {
            FlatKind::AdamW { config, exp_avg, exp_avg_sq, ranges } => {
                let step = super::adamw_constants(config, t, lr, opt.groups.iter().map(|g| (g.offset, g.len, g.group)), ranges);
                self.kernels.adamw(exp_avg, exp_avg_sq, ranges, step);
            }
            FlatKind::Lars { weight_decay, momentum, trust_coefficient, mu, ranges } => {
                lars_ranges(&opt.groups, ranges);
                self.kernels.lars(mu, ranges, lr as f32, *weight_decay as f32, *momentum as f32, *trust_coefficient as f32);
            }
        }
    }

    /// Whether [`VitEngine::optimizer_step`] would leave every parameter and the
    /// optimizer's state finite; changes neither.
    pub fn optimizer_step_stays_finite(&self, opt: &mut FlatOptimizer, lr: f64) -> bool {
        let t = opt.steps + 1;
        match &mut opt.kind {
            FlatKind::AdamW { config, exp_avg, exp_avg_sq, ranges } => {
                let step = super::adamw_constants(config, t, lr, opt.groups.iter().map(|g| (g.offset, g.len, g.group)), ranges);
                self.kernels.adamw_stays_finite(exp_avg, exp_avg_sq, ranges, step)
            }
            FlatKind::Lars { weight_decay, momentum, trust_coefficient, mu, ranges } => {
                lars_ranges(&opt.groups, ranges);
                self.kernels.lars_stays_finite(mu, ranges, lr as f32, *weight_decay as f32, *momentum as f32, *trust_coefficient as f32)
            }
        }
    }
}

/// The LARS ranges of the trained parameters, into `ranges`.
fn lars_ranges(groups: &[FlatParam], ranges: &mut Vec<LarsRange>) {
    ranges.clear();
    ranges.extend(groups.iter().map(|g| LarsRange { offset: g.offset, len: g.len, matrix: g.matrix }));
}

impl super::Gradients for VitEngine {
    fn gradients(&mut self) -> (&mut CpuKernels, Slot) {
        (&mut self.kernels, Slot { arena: Arena::Grads, offset: 0, len: self.params.layout.len })
    }
}

const BN_EPS: f32 = 1e-6;
const BN_MOMENTUM: f32 = 0.1;

/// One trained parameter as a range of the flat buffers.
#[derive(Debug, Clone)]
pub struct FlatParam {
    pub name: String,
    pub offset: usize,
    pub len: usize,
    pub group: ParamGroup,
    /// Rank above 1 (LARS decays and trust-scales only these).
    pub matrix: bool,
}

pub enum FlatKind {
    AdamW { config: AdamWConfig, exp_avg: Vec<f32>, exp_avg_sq: Vec<f32>, ranges: Vec<AdamWRange> },
    Lars { weight_decay: f64, momentum: f64, trust_coefficient: f64, mu: Vec<f32>, ranges: Vec<LarsRange> },
}

/// The fine-tuning optimizers (AdamW with layer-decay groups, or LARS) over a classifier
/// plan's flat buffers, for the trained parameters only.
pub struct FlatOptimizer {
    pub groups: Vec<FlatParam>,
    pub kind: FlatKind,
    pub steps: u64,
}

impl FlatOptimizer {
    /// `trained` names the trained parameters with their groups, in `param_layout` order.
    pub fn adamw(engine: &VitEngine, trained: &[(String, ParamGroup)], config: AdamWConfig) -> Result<Self> {
        let groups = flat_params(engine, trained)?;
        let len = engine.kernels.params().len();
        let ranges = Vec::with_capacity(groups.len());
        Ok(FlatOptimizer { groups, kind: FlatKind::AdamW { config, exp_avg: vec![0.0; len], exp_avg_sq: vec![0.0; len], ranges }, steps: 0 })
    }

    /// `util/lars.py` with the published probe settings: momentum 0.9, trust coefficient 0.001.
    pub fn lars(engine: &VitEngine, trained: &[(String, ParamGroup)], weight_decay: f64) -> Result<Self> {
        let groups = flat_params(engine, trained)?;
        let len = engine.kernels.params().len();
        let ranges = Vec::with_capacity(groups.len());
        Ok(FlatOptimizer { groups, kind: FlatKind::Lars { weight_decay, momentum: 0.9, trust_coefficient: 0.001, mu: vec![0.0; len], ranges }, steps: 0 })
    }

    /// The buffers of this optimizer's kind, by checkpoint key prefix.
    fn buffers(&mut self) -> Vec<(&'static str, &mut Vec<f32>)> {
        match &mut self.kind {
            FlatKind::AdamW { exp_avg, exp_avg_sq, .. } => vec![("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)],
            FlatKind::Lars { mu, .. } => vec![("momentum", mu)],
        }
    }
}

fn flat_params(engine: &VitEngine, trained: &[(String, ParamGroup)]) -> Result<Vec<FlatParam>> {
    trained
        .iter()
        .map(|(name, group)| match engine.param_layout().find(|(n, _, _)| n == name) {
            Some((_, shape, range)) => Ok(FlatParam { name: name.clone(), offset: range.start, len: range.len(), group: *group, matrix: shape.len() > 1 }),
            None => bail!(Internal, "no engine parameter {name}"),
        })
        .collect()
}

impl crate::optim::OptimizerState for FlatOptimizer {
    fn steps_taken(&self) -> u64 {
        self.steps
    }

    fn set_steps_taken(&mut self, steps: u64) {
        self.steps = steps;
    }

    fn state(&self) -> Vec<(String, Stored<'_>)> {
        let kinds: Vec<(&str, &Vec<f32>)> = match &self.kind {
            FlatKind::AdamW { exp_avg, exp_avg_sq, .. } => vec![("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)],
            FlatKind::Lars { mu, .. } => vec![("momentum", mu)],
        };
        let mut out = Vec::new();
        for g in &self.groups {
            for (kind, values) in &kinds {
                out.push((format!("{kind}.{}", g.name), Stored::F32 { values: &values[g.offset..g.offset + g.len], shape: vec![g.len] }));
            }
        }
        out
    }

    fn load_state(&mut self, tensors: &std::collections::BTreeMap<String, candle_core::Tensor>) -> Result<()> {
        let groups = self.groups.clone();
        for (kind, flat) in self.buffers() {
            for g in &groups {
                let t = tensors.get(&format!("{kind}.{}", g.name)).ok_or_else(|| crate::optim::missing_state(kind, &g.name))?;
                if t.elem_count() != g.len {
                    bail!(CheckpointShape, "optimizer state for {} has the wrong shape", g.name);
                }
                flat[g.offset..g.offset + g.len].copy_from_slice(&t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }
}
