//! The masked autoencoder on the engine: `models_mae.py`'s forward pass and its backward
//! pass written out layer by layer over one buffer plan, in the manner of llm.c's
//! `train_gpt2.c`. Names follow the published model.

use super::cpu::CpuKernels;
use super::blocks::{grad, keep_outputs, stack_acts, BlockParams, Linear, Norm, Params, Stack};
use super::{AdamWRange, AdamWStep, Arena, Epilogue, Grid, Kernels, Layout, MseShape, MseTarget, Slot, Source};
use super::cpu::NONE;
use crate::bail;
use crate::checkpoint::Stored;
use crate::config::{MaeConfig, Target, PCA_COMPONENTS, PCA_MEAN};
use crate::error::{Error, ErrorCode, Result};
use crate::masking::MaskPlan;
use crate::classifier::resize_pos_embed;
use crate::model::{MaskedAutoencoder, Unloaded};
use std::collections::BTreeMap;
use std::path::Path;
use crate::optim::AdamWConfig;

/// What a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward and backward: every activation the backward pass needs is kept.
    Train,
    /// The whole forward pass (loss, predictions, latent), keeping only one block's
    /// activations at a time.
    Forward,
    /// The encoder alone, keeping one block's activations at a time (embeddings).
    Encode,
}

/// The decoder half of a plan.
struct Decoder {
    embed: Linear,
    mask_token: Slot,
    stack: Stack,
    norm: Norm,
    pred: Linear,
    pos_embed: Slot,
    /// decoder_embed's output `[N, T, D_dec]`.
    emb: Slot,
    norm_out: Slot,
    norm_stats: Slot,
    /// `[N, 1 + L, pred_dim]`, the cls row included.
    pred_out: Slot,
    /// A PCA target's basis: the mean patch `[p*p*C]` and the axes `[k, p*p*C]`.
    pca: Option<(Slot, Slot)>,
    /// Training: the gradients of `pred_out`, `emb` and the decoder norm's output.
    dpred: Option<Slot>,
    demb: Option<Slot>,
    dnorm: Option<Slot>,
}

/// A plan for one config and batch shape: every buffer a step touches, allocated once.
pub struct MaeEngine {
    pub config: MaeConfig,
    pub batch: usize,
    pub len_keep: usize,
    pub mode: Mode,
    /// The images' patch grid: the config's, or another for the encoder alone.
    pub grid: Grid,
    kernels: CpuKernels,
    params: Params,

    imgs: Slot,
    pos_embed: Slot,
    patch_embed: Linear,
    cls_token: Slot,
    encoder_mask_token: Option<Slot>,
    /// Patches the encoder embeds, per image (`len_keep`, or every patch with the
    /// encoder mask token).
    embedded: usize,
    patches: Slot,
    emb: Slot,
    encoder: Stack,
    norm: Norm,
    latent: Slot,
    norm_stats: Slot,
    decoder: Option<Decoder>,
    /// Training: the gradient of the embedded patches and of the latent.
    demb: Option<Slot>,
    dlatent: Option<Slot>,

    // Host-side index tables of the current batch, refilled in place every step.
    patch_ids: Vec<u32>,
    encoder_index: Vec<Source>,
    encoder_positions: Vec<u32>,
    decoder_index: Vec<Source>,
    decoder_positions: Vec<u32>,
    mask: Vec<f32>,
}

impl MaeEngine {
    /// The plan for `batch` images of which the encoder sees `len_keep` patches each.
    pub fn new(config: &MaeConfig, batch: usize, len_keep: usize, mode: Mode) -> Result<Self> {
        Self::at_grid(config, batch, len_keep, mode, Grid::square(config.grid_size()))
    }

    /// The plan for images of `grid` patches, which need not be the config's
    /// (`Mode::Encode` only, for dense features): the position embedding is then resized
    /// as the published `interpolate_pos_embed` does.
    pub fn at_grid(config: &MaeConfig, batch: usize, len_keep: usize, mode: Mode, grid: Grid) -> Result<Self> {
        config.validate()?;
        let c = config;
        if grid != Grid::square(c.grid_size()) && mode != Mode::Encode {
            bail!(Internal, "a plan for {}x{} patches instead of the model's {g}x{g} is for the encoder alone", grid.h, grid.w, g = c.grid_size());
        }
        let l = grid.patches();
        if batch == 0 || len_keep == 0 || len_keep > l {
            bail!(InvalidArgument, "an engine plan needs at least one image and 1..={l} visible patches, got {batch} and {len_keep}");
        }
        let (d, dd) = (c.embed_dim, c.decoder_embed_dim);
        let conv_in = c.in_chans * c.patch_size * c.patch_size;
        let mut p = Params { layout: Layout::default(), names: Vec::new() };
        let patch_weight = p.take("patch_embed.proj.weight", &[d, c.in_chans, c.patch_size, c.patch_size]);
        let patch_bias = p.take("patch_embed.proj.bias", &[d]);
        let patch_embed = Linear { w: patch_weight, b: patch_bias, k: conv_in, n: d };
        let cls_token = p.take("cls_token", &[1, 1, d]);
        let encoder_mask_token = c.encoder_mask_token.then(|| p.take("encoder_mask_token", &[1, 1, d]));
        let blocks: Vec<BlockParams> = (0..c.depth).map(|i| p.block(&format!("blocks.{i}"), d, c.mlp_hidden())).collect();
        let norm = p.norm("norm", d);
        let decoder_params = (mode != Mode::Encode).then(|| {
            let embed = p.linear("decoder_embed", d, dd);
            let mask_token = p.take("mask_token", &[1, 1, dd]);
            let blocks: Vec<BlockParams> = (0..c.decoder_depth).map(|i| p.block(&format!("decoder_blocks.{i}"), dd, c.decoder_mlp_hidden())).collect();
            let norm = p.norm("decoder_norm", dd);
            let pred = p.linear("decoder_pred", dd, c.pred_dim());
            (embed, mask_token, blocks, norm, pred)
        });

        let train = mode == Mode::Train;
        let embedded = if c.encoder_mask_token { l } else { len_keep };
        let tokens = 1 + embedded;
        let mut a = Layout::default();
        let take = |a: &mut Layout, len: usize| a.take(Arena::Acts, len);
        let imgs = take(&mut a, batch * c.in_chans * l * c.patch_size * c.patch_size);
        let pos_embed = take(&mut a, (1 + l) * d);
        let patches = take(&mut a, batch * embedded * conv_in);
        let emb = take(&mut a, batch * embedded * d);
        let trained_from = if train { 0 } else { c.depth };
        let encoder = stack_acts(&mut a, trained_from, false, blocks, batch, tokens, d, c.num_heads, c.mlp_hidden());
        let latent = take(&mut a, batch * tokens * d);
        let norm_stats = take(&mut a, 2 * batch * tokens);
        let demb = train.then(|| take(&mut a, batch * embedded * d));
        let dlatent = train.then(|| take(&mut a, batch * tokens * d));
        let decoder = decoder_params.map(|(embed, mask_token, blocks, norm, pred)| {
            let dec_tokens = 1 + l;
            let pos_embed = take(&mut a, dec_tokens * dd);
            let emb = take(&mut a, batch * tokens * dd);
            let trained_from = if train { 0 } else { c.decoder_depth };
            let stack = stack_acts(&mut a, trained_from, false, blocks, batch, dec_tokens, dd, c.decoder_num_heads, c.decoder_mlp_hidden());
            let norm_out = take(&mut a, batch * dec_tokens * dd);
            let norm_stats = take(&mut a, 2 * batch * dec_tokens);
            let pred_out = take(&mut a, batch * dec_tokens * c.pred_dim());
            let pca = c.target.pca_components().map(|k| (take(&mut a, c.patch_dim()), take(&mut a, k * c.patch_dim())));
            let dpred = train.then(|| take(&mut a, batch * dec_tokens * c.pred_dim()));
            let demb = train.then(|| take(&mut a, batch * tokens * dd));
            let dnorm = train.then(|| take(&mut a, batch * dec_tokens * dd));
            Decoder { embed, mask_token, stack, norm, pred, pos_embed, emb, norm_out, norm_stats, pred_out, pca, dpred, demb, dnorm }
        });
        let kernels = CpuKernels::new(p.layout.len, a.len);
        Ok(MaeEngine {
            config: c.clone(),
            batch,
            len_keep,
            mode,
            grid,
            kernels,
            params: p,
            imgs,
            pos_embed,
            patch_embed,
            cls_token,
            encoder_mask_token,
            embedded,
            patches,
            emb,
            encoder,
            norm,
            latent,
            norm_stats,
            decoder,
            demb,
            dlatent,
            patch_ids: Vec::with_capacity(batch * embedded),
            encoder_index: Vec::with_capacity(batch * tokens),
            encoder_positions: Vec::with_capacity(batch * tokens),
            decoder_index: Vec::with_capacity(batch * (1 + l)),
            decoder_positions: Vec::with_capacity(batch * (1 + l)),
            mask: Vec::with_capacity(batch * l),
        })
    }

    /// Trainable parameters in the published order: name, shape, and range in the flat buffer.
    pub fn param_layout(&self) -> impl Iterator<Item = (&str, &[usize], std::ops::Range<usize>)> {
        self.params.names.iter().map(|(n, shape, s)| (n.as_str(), shape.as_slice(), s.offset..s.offset + s.len))
    }

    pub fn params(&self) -> &[f32] {
        self.kernels.params()
    }

    pub fn grads(&self) -> &[f32] {
        self.kernels.grads()
    }

    /// Bytes held by the plan's buffers.
    pub fn bytes(&self) -> usize {
        self.kernels.bytes()
    }

    /// Copies the model's parameters and fixed tables into the plan. The model must have
    /// the plan's config (for `Mode::Encode`, its decoder is not copied).
    pub fn load_from(&mut self, model: &MaskedAutoencoder) -> Result<()> {
        if model.config != self.config {
            bail!(Internal, "engine plan for another config");
        }
        let mut ours = self.params.names.iter();
        for (name, var) in model.params() {
            let Some((our_name, shape, slot)) = ours.next() else { break };
            if our_name != name || var.dims() != shape.as_slice() {
                bail!(Internal, "engine parameter {our_name} {shape:?} does not match the model's {name} {:?}", var.dims());
            }
            let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            self.kernels.upload(*slot, &values);
        }
        if ours.next().is_some() {
            bail!(Internal, "the model has fewer parameters than the engine plan");
        }
        if self.decoder.as_ref().is_some_and(|dec| dec.pca.is_some()) {
            // The loss needs the basis; the encoder alone does not.
            model.require_pca_basis()?;
        }
        for (name, table) in model.buffers() {
            let values = table.flatten_all()?.to_vec1::<f32>()?;
            let pca = self.decoder.as_ref().and_then(|dec| dec.pca);
            match (name, &self.decoder, pca) {
                // At the model's own grid, the table itself.
                ("pos_embed", _, _) => self.kernels.upload(self.pos_embed, &resize_pos_embed(table, self.grid.h, self.grid.w)?.flatten_all()?.to_vec1::<f32>()?),
                ("decoder_pos_embed", Some(dec), _) => self.kernels.upload(dec.pos_embed, &values),
                (PCA_MEAN, _, Some((mean, _))) => self.kernels.upload(mean, &values),
                (PCA_COMPONENTS, _, Some((_, components))) => self.kernels.upload(components, &values),
                _ => {}
            }
        }
        Ok(())
    }

    /// Sets the parameters from a checkpoint's tensors (read from `path`), by published name.
    /// Every tensor is checked before any is set, so a checkpoint that does not fit
    /// leaves the plan's weights as they were.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, candle_core::Tensor>, path: &Path) -> Result<()> {
        let mut found = Vec::with_capacity(self.params.names.len());
        for (name, shape, slot) in &self.params.names {
            let t = tensors.get(name).ok_or_else(|| Error::new(ErrorCode::CheckpointKeys, format!("{} lacks {name}", path.display())))?;
            if t.dims() != shape.as_slice() {
                bail!(CheckpointShape, "{name}: checkpoint {:?}, model {shape:?}", t.dims());
            }
            found.push((*slot, t));
        }
        for (slot, t) in found {
            let values = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            self.kernels.upload(slot, &values);
        }
        Ok(())
    }

    /// The parameters by published name, borrowed from the flat buffer, for checkpoints.
    pub fn stored_params(&self) -> impl Iterator<Item = (String, Stored<'_>)> {
        let params = self.kernels.params();
        self.params.names.iter().map(move |(name, shape, s)| (name.clone(), Stored::F32 { values: &params[s.offset..s.offset + s.len], shape: shape.clone() }))
    }

    /// Gives the weights back to the model they were unloaded from. The plan's other
    /// buffers are freed first, so the weights are never in memory three times.
    pub fn store_into(self, unloaded: Unloaded, model: &mut MaskedAutoencoder) -> Result<()> {
        let MaeEngine { params, kernels, .. } = self;
        let values = kernels.into_params();
        let mut ours = params.names.into_iter();
        unloaded.reload(
            model,
            Box::new(move |name, shape| match ours.next() {
                Some((our_name, our_shape, s)) if our_name == name && our_shape == shape => Ok(values[s.offset..s.offset + s.len].to_vec()),
                _ => Err(candle_core::Error::Msg(format!("the engine plan's parameters do not match the model's {name} {shape:?}"))),
            }),
        )
    }

    /// The same plan for `batch` images, keeping the weights and gradients (a batch short
    /// of skipped images). Allocates the activations anew.
    pub fn reshape(&mut self, batch: usize) -> Result<()> {
        let mut other = MaeEngine::at_grid(&self.config, batch, self.len_keep, self.mode, self.grid)?;
        other.kernels.take_weights_from(&mut self.kernels);
        let decoders = self.decoder.as_ref().zip(other.decoder.as_ref());
        let pca = decoders.and_then(|(a, b)| a.pca.zip(b.pca)).map(|((am, ac), (bm, bc))| [(am, bm), (ac, bc)]);
        let tables = [(self.pos_embed, other.pos_embed)].into_iter().chain(decoders.map(|(a, b)| (a.pos_embed, b.pos_embed))).chain(pca.into_iter().flatten());
        for (from, to) in tables.collect::<Vec<_>>() {
            let values = self.kernels.download(from);
            other.kernels.upload(to, &values);
        }
        *self = other;
        Ok(())
    }

    /// Fills the host index tables from a mask plan.
    fn set_plan(&mut self, plan: &MaskPlan) -> Result<()> {
        let (n, l, t) = (self.batch, self.grid.patches(), 1 + self.embedded);
        if plan.ids_shuffle.len() != n || plan.len_keep != self.len_keep || plan.ids_shuffle.iter().any(|s| s.len() != l) {
            bail!(Internal, "mask plan of {} images keeping {} does not fit an engine plan of {n} keeping {}", plan.ids_shuffle.len(), plan.len_keep, self.len_keep);
        }
        let k = self.len_keep;
        self.patch_ids.clear();
        self.encoder_index.clear();
        self.encoder_positions.clear();
        self.decoder_index.clear();
        self.decoder_positions.clear();
        self.mask.clear();
        for (i, shuffle) in plan.ids_shuffle.iter().enumerate() {
            let start = self.mask.len();
            self.mask.resize(start + l, 1.0);
            for &patch in &shuffle[..k] {
                self.mask[start + patch as usize] = 0.0;
            }
            self.encoder_index.push(Source::Token(0));
            self.encoder_positions.push(0);
            if self.encoder_mask_token.is_some() {
                // Every patch in place, the removed ones as the encoder's mask token.
                for j in 0..l {
                    self.patch_ids.push(j as u32);
                    let removed = self.mask[start + j] != 0.0;
                    self.encoder_index.push(if removed { Source::Token(1) } else { Source::Row((i * l + j) as u32) });
                    self.encoder_positions.push(1 + j as u32);
                }
                for j in 0..t {
                    self.decoder_index.push(Source::Row((i * t + j) as u32));
                    self.decoder_positions.push(j as u32);
                }
                continue;
            }
            for (r, &patch) in shuffle[..k].iter().enumerate() {
                self.patch_ids.push(patch);
                self.encoder_index.push(Source::Row((i * k + r) as u32));
                self.encoder_positions.push(1 + patch);
            }
            // The decoder: the cls row, then each patch in place from its encoded token
            // (`ids_restore`) or the shared mask token.
            self.decoder_index.push(Source::Row((i * t) as u32));
            self.decoder_positions.push(0);
            let restore_start = self.decoder_index.len();
            self.decoder_index.resize(restore_start + l, Source::Token(0));
            for (position, &patch) in shuffle.iter().enumerate() {
                if position < k {
                    self.decoder_index[restore_start + patch as usize] = Source::Row((i * t + 1 + position) as u32);
                }
            }
            self.decoder_positions.extend(1..=l as u32);
        }
        Ok(())
    }

    /// The forward pass over `imgs` `[N, C, H, W]` (already checked) with `plan`'s masks.
    /// Returns the loss (0 for `Mode::Encode`); in training, `dpred` is filled with
    /// `grad_scale` times the loss's gradient.
    fn forward(&mut self, imgs: &[f32], plan: &MaskPlan, grad_scale: f32) -> Result<f32> {
        self.encode(imgs, plan, |_, _, _| ())?;
        let c = &self.config;
        let (n, d, eps) = (self.batch, c.embed_dim, c.layer_norm_eps as f32);
        let k = &mut self.kernels;
        let rows = self.encoder.rows();
        k.layer_norm(self.encoder.output(), self.norm.w, self.norm.b, self.latent, self.norm_stats, rows, d, eps);
        let Some(dec) = &self.decoder else { return Ok(0.0) };

        let dd = c.decoder_embed_dim;
        k.linear(self.latent, dec.embed.w, dec.embed.b, None, dec.emb, rows, d, dd, Epilogue::None);
        k.gather_rows(dec.emb, &self.decoder_index, [dec.mask_token, NONE], Some((dec.pos_embed, &self.decoder_positions)), dec.stack.input(), dd);
        dec.stack.forward(k, eps);
        let dec_rows = dec.stack.rows();
        k.layer_norm(dec.stack.output(), dec.norm.w, dec.norm.b, dec.norm_out, dec.norm_stats, dec_rows, dd, eps);
        k.linear(dec.norm_out, dec.pred.w, dec.pred.b, None, dec.pred_out, dec_rows, dd, c.pred_dim(), Epilogue::None);
        let target = match (c.target, dec.pca) {
            (Target::Pixels, _) => MseTarget::Pixels,
            (Target::NormPixels, _) => MseTarget::NormPixels,
            (Target::Pca { components: k }, Some((mean, components))) => MseTarget::Pca { mean, components, k },
            (Target::Pca { .. }, None) => bail!(Internal, "the engine plan of a PCA target lacks its basis slots"),
        };
        let shape = MseShape { batch: n, channels: c.in_chans, patch: c.patch_size, grid: c.grid_size(), rows_per_image: 1 + c.num_patches(), target };
        Ok(k.masked_mse(self.imgs, dec.pred_out, &self.mask, dec.dpred, shape, grad_scale))
    }

    /// The encoder's blocks over `imgs` with `plan`'s masks (its final norm not applied),
    /// handing `observe` each block's index and output `[N, 1 + embedded, D]`.
    fn encode(&mut self, imgs: &[f32], plan: &MaskPlan, observe: impl FnMut(&CpuKernels, usize, Slot)) -> Result<()> {
        self.set_plan(plan)?;
        let c = &self.config;
        let (n, d, eps) = (self.batch, c.embed_dim, c.layer_norm_eps as f32);
        let k = &mut self.kernels;
        k.upload(self.imgs, imgs);
        // PatchEmbed on the patches the encoder sees, then cls + position embeddings.
        k.patch_rows(self.imgs, &self.patch_ids, self.embedded, self.patches, c.in_chans, c.patch_size, self.grid);
        let pe = self.patch_embed;
        k.linear(self.patches, pe.w, pe.b, None, self.emb, n * self.embedded, pe.k, pe.n, Epilogue::None);
        let tokens = [self.cls_token, self.encoder_mask_token.unwrap_or(NONE)];
        k.gather_rows(self.emb, &self.encoder_index, tokens, Some((self.pos_embed, &self.encoder_positions)), self.encoder.input(), d);
        self.encoder.forward_observed(k, eps, observe);
        Ok(())
    }

    /// The outputs `[N, 1 + embedded, D]` of encoder blocks `layers` (indices, in the
    /// order given) over `imgs` with `plan`'s masks: dense features.
    pub fn block_outputs(&mut self, imgs: &[f32], plan: &MaskPlan, layers: &[usize]) -> Result<Vec<Vec<f32>>> {
        let mut outputs = vec![Vec::new(); layers.len()];
        self.encode(imgs, plan, keep_outputs(layers, &mut outputs))?;
        Ok(outputs)
    }

    /// Backpropagates the last training forward pass, adding every parameter's gradient.
    fn backward(&mut self) {
        let c = &self.config;
        let (n, d, dd) = (self.batch, c.embed_dim, c.decoder_embed_dim);
        let k = &mut self.kernels;
        let dec = self.decoder.as_ref().expect("a training plan has a decoder");
        let dec_scratch = dec.stack.scratch.expect("a training plan");
        let dec_rows = dec.stack.rows();
        let (dpred, demb, dnorm) = (dec.dpred.expect("training"), dec.demb.expect("training"), dec.dnorm.expect("training"));
        k.linear_backward(dpred, dec.norm_out, dec.pred.w, Some(dnorm), false, Some((grad(dec.pred.w), grad(dec.pred.b))), dec_rows, dd, c.pred_dim());
        k.fill(dec_scratch.dres, 0.0);
        k.layer_norm_backward(dnorm, dec.stack.output(), dec.norm.w, dec.norm_stats, dec_scratch.dres, grad(dec.norm.w), grad(dec.norm.b), dec_rows, dd);
        dec.stack.backward(k);
        k.scatter_rows(dec_scratch.dres, &self.decoder_index, demb, [grad(dec.mask_token), NONE], dd);
        let rows = self.encoder.rows();
        let dlatent = self.dlatent.expect("training");
        k.linear_backward(demb, self.latent, dec.embed.w, Some(dlatent), false, Some((grad(dec.embed.w), grad(dec.embed.b))), rows, d, dd);

        let enc_scratch = self.encoder.scratch.expect("a training plan");
        k.fill(enc_scratch.dres, 0.0);
        k.layer_norm_backward(dlatent, self.encoder.output(), self.norm.w, self.norm_stats, enc_scratch.dres, grad(self.norm.w), grad(self.norm.b), rows, d);
        self.encoder.backward(k);
        let demb_patches = self.demb.expect("training");
        let token_grads = [grad(self.cls_token), self.encoder_mask_token.map_or(NONE, grad)];
        k.scatter_rows(enc_scratch.dres, &self.encoder_index, demb_patches, token_grads, d);
        let pe = self.patch_embed;
        // No gradient for the pixels.
        k.linear_backward(demb_patches, self.patches, pe.w, None, false, Some((grad(pe.w), grad(pe.b))), n * self.embedded, pe.k, pe.n);
    }

    /// Forward and backward of one micro-batch: returns the loss and adds `grad_scale`
    /// times its gradient into the gradient buffer.
    pub fn accumulate(&mut self, imgs: &[f32], plan: &MaskPlan, grad_scale: f32) -> Result<f32> {
        if self.mode != Mode::Train {
            bail!(Internal, "accumulate needs a training plan");
        }
        let loss = self.forward(imgs, plan, grad_scale)?;
        self.backward();
        Ok(loss)
    }

    /// The forward pass alone; read its outputs with [`MaeEngine::pred`] and [`MaeEngine::latent`].
    pub fn run_forward(&mut self, imgs: &[f32], plan: &MaskPlan) -> Result<f32> {
        self.forward(imgs, plan, 1.0)
    }

    /// The last forward pass's predictions `[N, L, pred_dim]` (the cls rows left out).
    pub fn pred(&self) -> Vec<f32> {
        let dec = self.decoder.as_ref().expect("a plan with a decoder");
        let (l, w) = (self.config.num_patches(), self.config.pred_dim());
        let all = self.kernels.download(dec.pred_out);
        all.chunks((1 + l) * w).flat_map(|image| image[w..].iter().copied()).collect()
    }

    /// The last forward pass's encoder output after its norm, `[N, 1 + visible, D]`.
    pub fn latent(&self) -> Vec<f32> {
        self.kernels.download(self.latent)
    }

    /// The last forward pass's mask `[N, L]`, 1 where a patch was removed.
    pub fn mask(&self) -> &[f32] {
        &self.mask
    }

    /// One AdamW update of every parameter from the accumulated gradients.
    pub fn adamw_step(&mut self, opt: &mut FlatAdamW, lr: f64) {
        opt.step += 1;
        let step = opt.prepare(opt.step, lr);
        self.kernels.adamw(&mut opt.exp_avg, &mut opt.exp_avg_sq, &opt.ranges, step);
    }

    /// Whether [`MaeEngine::adamw_step`] would leave every parameter and moment finite;
    /// changes neither.
    pub fn adamw_step_stays_finite(&self, opt: &mut FlatAdamW, lr: f64) -> bool {
        let step = opt.prepare(opt.step + 1, lr);
        self.kernels.adamw_stays_finite(&opt.exp_avg, &opt.exp_avg_sq, &opt.ranges, step)
    }
}

/// One parameter's optimisation settings, as a range of the flat buffers.
#[derive(Debug, Clone)]
pub struct FlatGroup {
    pub name: String,
    pub offset: usize,
    pub len: usize,
    pub decays: bool,
    pub lr_scale: f64,
}

/// AdamW over the engine's flat buffers: one moment buffer each, the weight-decay and
/// learning-rate groups as ranges.
pub struct FlatAdamW {
    pub config: AdamWConfig,
    pub groups: Vec<FlatGroup>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    pub step: u64,
    ranges: Vec<AdamWRange>,
}

impl FlatAdamW {
    /// The pre-training groups (`optim::decays`) over a plan's parameters.
    pub fn new(engine: &MaeEngine, config: AdamWConfig) -> Self {
        let groups: Vec<FlatGroup> = engine
            .param_layout()
            .map(|(name, shape, range)| FlatGroup { name: name.to_string(), offset: range.start, len: range.len(), decays: crate::optim::decays(name, shape), lr_scale: 1.0 })
            .collect();
        let len = engine.params().len();
        FlatAdamW { config, ranges: Vec::with_capacity(groups.len()), groups, exp_avg: vec![0.0; len], exp_avg_sq: vec![0.0; len], step: 0 }
    }
}

impl super::Gradients for MaeEngine {
    fn gradients(&mut self) -> (&mut CpuKernels, Slot) {
        (&mut self.kernels, Slot { arena: Arena::Grads, offset: 0, len: self.params.layout.len })
    }
}

impl FlatAdamW {
    /// The constants of update number `t` at learning rate `lr` (the ranges in `self.ranges`).
    fn prepare(&mut self, t: u64, lr: f64) -> AdamWStep {
        let params = self.groups.iter().map(|g| (g.offset, g.len, crate::optim::ParamGroup { decays: g.decays, lr_scale: g.lr_scale }));
        super::adamw_constants(&self.config, t, lr, params, &mut self.ranges)
    }
}

impl crate::optim::OptimizerState for FlatAdamW {
    fn steps_taken(&self) -> u64 {
        self.step
    }

    fn set_steps_taken(&mut self, steps: u64) {
        self.step = steps;
    }

    fn state(&self) -> Vec<(String, Stored<'_>)> {
        let range = |g: &FlatGroup| g.offset..g.offset + g.len;
        self.groups
            .iter()
            .flat_map(|g| {
                [
                    (format!("exp_avg.{}", g.name), Stored::F32 { values: &self.exp_avg[range(g)], shape: vec![g.len] }),
                    (format!("exp_avg_sq.{}", g.name), Stored::F32 { values: &self.exp_avg_sq[range(g)], shape: vec![g.len] }),
                ]
            })
            .collect()
    }

    fn load_state(&mut self, tensors: &std::collections::BTreeMap<String, candle_core::Tensor>) -> Result<()> {
        for g in &self.groups {
            for (kind, flat) in [("exp_avg", &mut self.exp_avg), ("exp_avg_sq", &mut self.exp_avg_sq)] {
                let t = tensors.get(&format!("{kind}.{}", g.name)).ok_or_else(|| crate::optim::missing_state(kind, &g.name))?;
                if t.elem_count() != g.len {
                    bail!(CheckpointShape, "optimizer state for {} has the wrong shape", g.name);
                }
                let values = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                flat[g.offset..g.offset + g.len].copy_from_slice(&values);
            }
        }
        Ok(())
    }
}
