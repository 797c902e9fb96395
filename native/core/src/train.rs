//! Pre-training as `main_pretrain.py` / `engine_pretrain.py`: AdamW with the
//! published weight-decay groups, per-iteration warm-up + cosine learning rate,
//! gradient accumulation, optional clipping, and exactly resumable checkpoints.

use crate::bail;
use crate::checkpoint::{self, Stored, OPTIMIZER_PREFIX};
use crate::config::{MaeConfig, Target, PCA_COMPONENTS, PCA_MEAN};
use crate::data::{stream_rng, Batch, Loader, Shard, MASK_STREAM};
use crate::distributed::{FlatBuffer, Group};
use crate::error::{Error, ErrorCode, Result};
use crate::masking::{self, MaskPlan, MaskSampler, Masking};
use crate::model::{MaskedAutoencoder, Unloaded};
use crate::engine::{FlatAdamW, Gradients, MaeEngine, Mode};
use crate::pca::PatchMoments;
use crate::optim::{clip_to_norm, global_norm, AdamW, AdamWConfig, LrSchedule, Optimizer, OptimizerState};
use crate::recipe::{self, Recipe};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The pre-training recipe. Defaults are the published pre-training arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PretrainConfig {
    #[serde(flatten)]
    pub recipe: Recipe,
    pub mask_ratio: f64,
    #[serde(with = "masking_name")]
    pub masking: Masking,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            recipe: Recipe {
                epochs: 400.0,
                accum_iter: 1,
                blr: 1.5e-4,
                lr: None,
                min_lr: 0.0,
                warmup_epochs: 40.0,
                weight_decay: 0.05,
                beta1: 0.9,
                beta2: 0.95,
                clip_grad: None,
                seed: 0,
                max_steps: None,
                checkpoint_dir: None,
                checkpoint_every: 0,
                keep_last: 3,
            },
            mask_ratio: 0.75,
            masking: Masking::Random,
        }
    }
}

mod masking_name {
    use crate::masking::Masking;
    pub fn serialize<S: serde::Serializer>(m: &Masking, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match m {
            Masking::Random => "random",
            Masking::Block => "block",
            Masking::Grid => "grid",
        })
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Masking, D::Error> {
        let name = <String as serde::Deserialize>::deserialize(d)?;
        Masking::parse(&name).map_err(serde::de::Error::custom)
    }
}

impl PretrainConfig {
    /// The defaults with the fields of a JSON object (camelCase) on top.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let config = recipe::from_json(&Self::default(), value, "pre-training")?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        masking::check_mask_ratio(self.mask_ratio)?;
        self.recipe.validate()
    }
}

/// Where a run stands; saved in every checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    pub epoch: usize,
    /// The next loader batch of `epoch`.
    pub batch_in_epoch: usize,
    pub images_seen: u64,
    /// The loader's batch size, which gives `batch_in_epoch` its meaning (absent from
    /// checkpoints written before it was saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// The data-parallel ranks that shared each step (absent from checkpoints written
    /// before it was saved, all of one process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<usize>,
}

/// What a run reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    Step { epoch: usize, step: u64, total_steps: u64, loss: f64, lr: f64, images_per_sec: f64, eta_seconds: f64 },
    Checkpoint { step: u64, path: PathBuf },
    /// Unreadable images left out of a batch.
    Skipped { step: u64, count: usize, first: String },
    EpochEnd { epoch: usize, mean_loss: f64 },
    /// Accuracy on the evaluation set after an epoch (fine-tuning).
    Eval { epoch: usize, top1: f64, top5: f64, loss: f64 },
    /// A PCA target's basis was fitted before the first step: `components` axes keeping
    /// `kept_variance` (a fraction) of the variance of `patches` patches of `images` images.
    PcaBasis { components: usize, kept_variance: f64, images: usize, patches: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: u64,
    pub epochs_completed: usize,
    /// Mean loss of the last completed step (NaN if none ran).
    pub final_loss: f64,
    pub images_seen: u64,
    pub seconds: f64,
    pub aborted: bool,
    pub last_checkpoint: Option<PathBuf>,
    pub skipped_images: usize,
}

/// The masks of a step's images of dataset indices `indices`, each drawn from a
/// generator of its own keyed by the step and the image's index, so that an image is
/// masked alike whichever batch, place in it or data-parallel rank it is in, and a
/// resumed run draws the same masks.
fn step_plan(config: &PretrainConfig, model: &MaeConfig, indices: &[usize], step: u64) -> Result<MaskPlan> {
    let sampler = MaskSampler::new(config.masking, model.grid_size(), config.mask_ratio)?;
    Ok(sampler.per_sample(indices.iter().map(|&index| stream_rng(config.recipe.seed, step, MASK_STREAM, index as u64))))
}

fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:08}.safetensors")
}

/// The checkpoints in `dir`, oldest first.
pub fn list_checkpoints(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("checkpoint-") && n.ends_with(".safetensors"))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// What the training loop trains: pre-training or one of the fine-tuning protocols.
pub(crate) trait Task {
    /// The loss of one micro-batch of `[n, C, H, W]` images; its gradients, times
    /// `grad_scale`, are added to the step's. `step` and each image's dataset index key
    /// that image's randomness (masks, stochastic depth); `step` and `micro` the batch's
    /// (mixing).
    /// A non-finite loss ends the run, so its gradients never reach an update.
    fn micro_batch(&mut self, batch: Batch, step: u64, micro: usize, grad_scale: f64) -> Result<f64>;
    /// Averages the step's gradients over `group`'s ranks (a no-op alone); `what` names
    /// the all-reduce in errors.
    fn average_gradients(&mut self, group: &Group, what: &str) -> Result<()>;
    /// Sets every rank's weights to rank 0's (a no-op alone).
    fn broadcast_weights(&mut self, group: &Group) -> Result<()>;
    /// The global L2 norm of the step's gradients.
    fn grad_norm(&mut self) -> Result<f64>;
    /// Clips the step's gradients, of global norm `norm`, to `clip_grad`; then, unless the
    /// update at learning rate `lr` would make a parameter or the optimizer's state
    /// non-finite (false: both are left as they were), updates the parameters and
    /// starts the next step's gradients from zero (true).
    fn apply(&mut self, norm: f64, clip_grad: Option<f64>, lr: f64) -> Result<bool>;
    fn optimizer(&mut self) -> &mut dyn OptimizerState;
    /// Writes the model and the optimizer's state with `metadata` (plus the recipe) to `path`.
    fn save(&mut self, metadata: HashMap<String, String>, path: &Path) -> Result<()>;
    /// Copies a training checkpoint's weights into the model.
    fn restore_weights(&mut self, state: &checkpoint::StateDict, path: &Path) -> Result<()>;
    /// Called when an epoch ends (evaluation, for fine-tuning).
    fn epoch_end(&mut self, _epoch: usize, _on_event: &mut dyn FnMut(TrainEvent)) -> Result<()> {
        Ok(())
    }
    /// Called when the run stops (finished, aborted or failed): leaves the weights of
    /// the last step taken in the model.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A step's gradients as candle tensors, for the tasks that run on the reference model.
#[derive(Default)]
pub(crate) struct Accumulated(Option<Vec<Tensor>>);

impl Accumulated {
    pub fn add(&mut self, grads: Vec<Tensor>, scale: f64) -> Result<()> {
        let grads = grads.into_iter().map(|g| g * scale).collect::<candle_core::Result<Vec<_>>>()?;
        self.0 = Some(match self.0.take() {
            Some(acc) => acc.iter().zip(&grads).map(|(a, g)| a + g).collect::<candle_core::Result<Vec<_>>>()?,
            None => grads,
        });
        Ok(())
    }

    /// Averages the accumulated gradients over `group`'s ranks: one all-reduce of them
    /// packed into a flat buffer (on the GPUs with NCCL when the group prepared for it).
    pub fn average_over(&mut self, group: &Group, what: &str) -> Result<()> {
        let Some(grads) = self.0.as_mut().filter(|_| group.size() > 1) else { return Ok(()) };
        let mut flat = FlatBuffer::pack(grads.iter())?;
        group.all_reduce_mean(&mut flat, what)?;
        *grads = flat.unpack(grads.iter())?;
        Ok(())
    }

    /// The global L2 norm of the accumulated gradients (0 before any).
    pub fn norm(&self) -> Result<f64> {
        self.0.as_deref().map_or(Ok(0.0), global_norm)
    }

    /// [`Task::apply`] of the accumulated gradients with `optimizer`.
    pub fn apply(&mut self, optimizer: &mut dyn Optimizer, norm: f64, clip_grad: Option<f64>, lr: f64) -> Result<bool> {
        let Some(mut grads) = self.0.take() else { return Ok(true) };
        if let Some(max_norm) = clip_grad {
            clip_to_norm(&mut grads, norm, max_norm)?;
        }
        if !optimizer.step_stays_finite(&grads, lr)? {
            return Ok(false);
        }
        optimizer.step(&grads, lr)?;
        Ok(true)
    }
}

/// Where the checkpoint of `state`'s step goes; none without a checkpoint folder.
fn checkpoint_path(state: &TrainState, recipe: &Recipe) -> Option<PathBuf> {
    recipe.checkpoint_dir.as_ref().map(|dir| dir.join(checkpoint_name(state.step)))
}

fn save_checkpoint(task: &mut dyn Task, state: &TrainState, recipe: &Recipe) -> Result<Option<PathBuf>> {
    let (Some(dir), Some(path)) = (&recipe.checkpoint_dir, checkpoint_path(state, recipe)) else { return Ok(None) };
    std::fs::create_dir_all(dir).map_err(|e| Error::new(ErrorCode::Io, format!("cannot create {}: {e}", dir.display())))?;
    let metadata = HashMap::from([
        ("train_state".to_string(), serde_json::to_string(state).map_err(|e| Error::new(ErrorCode::Internal, e.to_string()))?),
        ("optimizer_step".to_string(), task.optimizer().steps_taken().to_string()),
    ]);
    task.save(metadata, &path)?;
    let existing = list_checkpoints(dir);
    for old in existing.iter().take(existing.len().saturating_sub(recipe.keep_last)) {
        let _ = std::fs::remove_file(old);
    }
    Ok(Some(path))
}

/// An optimizer's state as checkpoint entries (`optim.<kind>.<param>`).
pub(crate) fn optimizer_entries(optimizer: &dyn OptimizerState) -> Vec<(String, Stored<'_>)> {
    optimizer.state().into_iter().map(|(k, t)| (format!("{OPTIMIZER_PREFIX}{k}"), t)).collect()
}

/// Restores weights, optimizer state and position from a checkpoint file, or from
/// the newest checkpoint in a folder, once it is known that this run (its `recipe`,
/// loader batch size and number of ranks) can continue from there.
/// The checkpoint a run resumes from: `from`, or the newest in the folder `from`.
fn resume_path(from: &Path) -> Result<PathBuf> {
    if !from.is_dir() {
        return Ok(from.to_path_buf());
    }
    match list_checkpoints(from).pop() {
        Some(p) => Ok(p),
        None => bail!(CheckpointNotFound, "no checkpoint-*.safetensors in {}", from.display()),
    }
}

fn restore(task: &mut dyn Task, from: &Path, recipe: &Recipe, batch_size: usize, ranks: usize) -> Result<(TrainState, PathBuf)> {
    let path = resume_path(from)?;
    let state = checkpoint::read_state_dict(&path)?;
    let Some(train_state) = state.metadata.get("train_state") else {
        bail!(CheckpointKeys, "{} is a model, not a training checkpoint (it has no train_state)", path.display());
    };
    let train_state: TrainState = serde_json::from_str(train_state).map_err(|e| Error::new(ErrorCode::CheckpointCorrupt, format!("{}: bad train_state: {e}", path.display())))?;
    check_same_position_settings(&path, &state.metadata, &train_state, recipe, batch_size, ranks)?;
    let optimizer_step: u64 = state.metadata.get("optimizer_step").and_then(|s| s.parse().ok()).unwrap_or(train_state.step);
    task.restore_weights(&state, &path)?;
    let optimizer_state = state.tensors.iter().filter_map(|(k, t)| Some((k.strip_prefix(OPTIMIZER_PREFIX)?.to_string(), t.clone()))).collect();
    let optimizer = task.optimizer();
    optimizer.load_state(&optimizer_state).map_err(|e| Error::new(e.code, format!("{}: {}", path.display(), e.message)))?;
    optimizer.set_steps_taken(optimizer_step);
    Ok((train_state, path))
}

/// Refuses to resume with another global batch (`batchSize` x ranks), `accumIter` or
/// `seed` than the checkpoint was written with: they fix which images its steps trained
/// on and which come next (the position is a global batch of an epoch's seeded order,
/// and a step a number of micro-batches), so a run that changed them would repeat some
/// images and skip others without saying so. The number of ranks may change when the
/// global batch does not (8 ranks of 16 resume as 4 of 32), as may the schedule
/// (epochs, learning rates, warm-up), as in the published code: lowering the rate after
/// a divergence, for one.
fn check_same_position_settings(path: &Path, metadata: &HashMap<String, String>, saved: &TrainState, recipe: &Recipe, batch_size: usize, ranks: usize) -> Result<()> {
    let saved_recipe = ["pretrain_config", "finetune_config"].iter().find_map(|key| metadata.get(*key));
    let saved_recipe: Option<Recipe> = saved_recipe
        .map(|json| serde_json::from_str(json))
        .transpose()
        .map_err(|e| Error::new(ErrorCode::CheckpointCorrupt, format!("{}: bad recipe in the metadata: {e}", path.display())))?;
    if let Some(saved_batch) = saved.batch_size {
        let saved_ranks = saved.ranks.unwrap_or(1);
        if saved_batch * saved_ranks != batch_size * ranks {
            bail!(
                InvalidArgument,
                "cannot resume from {} with batchSize {batch_size} on {ranks} rank(s) (a global batch of {}): it was written with batchSize {saved_batch} on {saved_ranks} rank(s) (a global batch of {}), which fixes the images each step trains on; resume with a global batch of {} (batchSize x ranks), or start a new run from its weights (load it as a model)",
                path.display(),
                batch_size * ranks,
                saved_batch * saved_ranks,
                saved_batch * saved_ranks
            );
        }
    }
    let fields = [("accumIter", saved_recipe.as_ref().map(|r| r.accum_iter as u64), recipe.accum_iter as u64), ("seed", saved_recipe.as_ref().map(|r| r.seed), recipe.seed)];
    for (name, saved, now) in fields {
        if let Some(saved) = saved.filter(|&saved| saved != now) {
            bail!(
                InvalidArgument,
                "cannot resume from {} with {name} {now}: it was written with {name} {saved}, which fixes the images each step trains on; resume with {name} {saved}, or start a new run from its weights (load it as a model)",
                path.display()
            );
        }
    }
    Ok(())
}

/// Runs pre-training on `loader`'s batches, calling `on_event` as it goes, and leaves
/// the trained weights in `model`. Stops after the current step when `cancel` is set,
/// and always leaves a checkpoint of where it stopped (when a checkpoint folder is
/// configured). Data-parallel over `group`, whose rank's shard `loader` serves: every
/// rank starts from rank 0's weights, averages each step's gradients with the others,
/// and stops with them (rank 0 alone writes checkpoints).
pub fn pretrain(
    model: &mut MaskedAutoencoder,
    loader: &Loader,
    config: &PretrainConfig,
    resume: Option<&Path>,
    group: &Group,
    on_event: &mut dyn FnMut(TrainEvent),
    cancel: &AtomicBool,
) -> Result<TrainSummary> {
    config.validate()?;
    ensure_pca_basis(model, loader, resume, group, on_event)?;
    let adamw = AdamWConfig { beta1: config.recipe.beta1, beta2: config.recipe.beta2, eps: 1e-8, weight_decay: config.recipe.weight_decay };
    if !model.uses_engine() {
        let mut task = Pretraining { model, config, optimizer: AdamW::new(model.params(), adamw)?, grads: Accumulated::default() };
        return run(&mut task, loader, &config.recipe, resume, group, on_event, cancel);
    }
    let len_keep = masking::len_keep(model.config.num_patches(), config.mask_ratio);
    let mut engine = MaeEngine::new(&model.config, loader.batch_size(), len_keep, Mode::Train)?;
    engine.load_from(model)?;
    let optimizer = FlatAdamW::new(&engine, adamw);
    // The engine holds the weights for the run; the model gets them back at the end.
    let mut task = EnginePretraining { unloaded: model.unload()?, config, engine, optimizer };
    crate::release_freed_memory();
    let result = run(&mut task, loader, &config.recipe, resume, group, on_event, cancel);
    let EnginePretraining { unloaded, engine, optimizer, .. } = task;
    drop(optimizer);
    engine.store_into(unloaded, model)?;
    result
}

/// The images of the training data a PCA target's basis is fitted on: the first this
/// many of epoch 0 as the loader serves them (its order, augmentation and seed), all of
/// them when an epoch has fewer. Every patch of each counts (256 images of 224x224 in
/// patches of 16 are 50,176 patches for 768 values each).
pub const PCA_SAMPLE_IMAGES: usize = 256;

/// Gives a model whose target is 'pca' a basis when it has none: the one of the
/// checkpoint a run resumes from, else one fitted (`crate::pca`) on [`PCA_SAMPLE_IMAGES`]
/// images of the whole data (every rank the same ones; rank 0's basis is broadcast, so
/// that the ranks agree to the bit), reported as a `PcaBasis` event.
fn ensure_pca_basis(model: &mut MaskedAutoencoder, loader: &Loader, resume: Option<&Path>, group: &Group, on_event: &mut dyn FnMut(TrainEvent)) -> Result<()> {
    let Target::Pca { components: k } = model.config.target else { return Ok(()) };
    if model.pca_basis().is_some() {
        return Ok(());
    }
    if let Some((mean, components)) = resume.map(|from| checkpoint::read_pca_basis(&resume_path(from)?)).transpose()?.flatten() {
        return model.set_pca_basis(&mean, &components);
    }
    let c = model.config.clone();
    let (d, whole) = (c.patch_dim(), loader.sharded(Shard::default())?);
    let mut moments = PatchMoments::new(d)?;
    let mut images = 0;
    for batch in whole.epoch(0, 0) {
        let batch = batch?;
        let n = batch.shape[0].min(PCA_SAMPLE_IMAGES - images);
        moments.add_images(&batch.images, n, c.in_chans, c.img_size, c.patch_size)?;
        images += n;
        if images == PCA_SAMPLE_IMAGES {
            break;
        }
    }
    let fit = group.agree(moments.fit(k), "fitting the PCA basis")?;
    let mut basis: Vec<f32> = fit.mean.iter().chain(&fit.components).map(|&v| v as f32).collect();
    if group.size() > 1 {
        group.broadcast(bytemuck::cast_slice_mut(&mut basis), 0, "the broadcast of the PCA basis")?;
    }
    let device = candle_core::Device::Cpu;
    let mean = Tensor::from_slice(&basis[..d], d, &device)?;
    let components = Tensor::from_slice(&basis[d..], (k, d), &device)?;
    model.set_pca_basis(&mean, &components)?;
    on_event(TrainEvent::PcaBasis { components: k, kept_variance: fit.kept_variance(), images, patches: fit.patches });
    Ok(())
}

/// Refuses to resume from a checkpoint whose PCA basis is not the model's: its weights
/// learnt to predict the coefficients of its own basis.
fn check_same_pca_basis(buffers: &[(&str, &Tensor)], state: &checkpoint::StateDict, path: &Path) -> Result<()> {
    for name in [PCA_MEAN, PCA_COMPONENTS] {
        let Some(saved) = state.tensors.get(name) else { continue };
        let ours = buffers.iter().find(|(n, _)| *n == name).map(|(_, t)| t.flatten_all()?.to_vec1::<f32>()).transpose()?;
        if ours.as_deref() != Some(&saved.flatten_all()?.to_vec1::<f32>()?[..]) {
            bail!(InvalidConfig, "{} was trained with another PCA basis than this model's ({name} differs)", path.display());
        }
    }
    Ok(())
}

/// Pre-training on the reference model (CUDA, bf16).
struct Pretraining<'a> {
    model: &'a MaskedAutoencoder,
    config: &'a PretrainConfig,
    optimizer: AdamW,
    grads: Accumulated,
}

impl Task for Pretraining<'_> {
    fn micro_batch(&mut self, batch: Batch, step: u64, _micro: usize, grad_scale: f64) -> Result<f64> {
        let plan = step_plan(self.config, &self.model.config, &batch.indices, step)?;
        let imgs = Tensor::from_vec(batch.images, batch.shape.as_slice(), self.model.device())?;
        let out = self.model.forward_with_plan(&imgs, &plan)?;
        // The backward pass is queued before the loss is read, so a GPU never waits
        // for the host mid-step; a non-finite loss still discards the gradients.
        let grads = self.model.gradients(&out)?.into_iter().map(|(_, g)| g).collect();
        let loss = out.loss.to_scalar::<f32>()? as f64;
        if loss.is_finite() {
            self.grads.add(grads, grad_scale)?;
        }
        Ok(loss)
    }

    fn average_gradients(&mut self, group: &Group, what: &str) -> Result<()> {
        self.grads.average_over(group, what)
    }

    fn broadcast_weights(&mut self, group: &Group) -> Result<()> {
        broadcast_params(self.model.params(), group)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        self.grads.norm()
    }

    fn apply(&mut self, norm: f64, clip_grad: Option<f64>, lr: f64) -> Result<bool> {
        self.grads.apply(&mut self.optimizer, norm, clip_grad, lr)
    }

    fn optimizer(&mut self) -> &mut dyn OptimizerState {
        &mut self.optimizer
    }

    fn save(&mut self, metadata: HashMap<String, String>, path: &Path) -> Result<()> {
        checkpoint::save_with(self.model, optimizer_entries(&self.optimizer), with_recipe(self.config, metadata)?, path)
    }

    fn restore_weights(&mut self, state: &checkpoint::StateDict, path: &Path) -> Result<()> {
        check_pretraining_config(&self.model.config, state, path)?;
        check_same_pca_basis(&self.model.buffers(), state, path)?;
        copy_params(self.model.params(), &state.tensors, path)
    }
}

/// Pre-training on the engine (the CPU in f32): the weights, gradients and AdamW's
/// moments live in the engine's flat buffers for the whole run (the model is unloaded
/// meanwhile), and checkpoints are written straight from them.
struct EnginePretraining<'a> {
    unloaded: Unloaded,
    config: &'a PretrainConfig,
    engine: MaeEngine,
    optimizer: FlatAdamW,
}

impl Task for EnginePretraining<'_> {
    fn micro_batch(&mut self, batch: Batch, step: u64, _micro: usize, grad_scale: f64) -> Result<f64> {
        let n = batch.shape[0];
        let plan = step_plan(self.config, &self.engine.config, &batch.indices, step)?;
        if n != self.engine.batch {
            // A batch short of skipped images: a plan of its size, sharing the weights.
            self.engine.reshape(n)?;
        }
        self.engine.accumulate(&batch.images, &plan, grad_scale as f32).map(f64::from)
    }

    fn average_gradients(&mut self, group: &Group, what: &str) -> Result<()> {
        self.engine.average_gradients(group, what)
    }

    fn broadcast_weights(&mut self, group: &Group) -> Result<()> {
        self.engine.broadcast_params(group)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        Ok(self.engine.grad_norm())
    }

    fn apply(&mut self, norm: f64, clip_grad: Option<f64>, lr: f64) -> Result<bool> {
        if let Some(max_norm) = clip_grad {
            self.engine.clip_grads(norm, max_norm);
        }
        if !self.engine.adamw_step_stays_finite(&mut self.optimizer, lr) {
            return Ok(false);
        }
        self.engine.adamw_step(&mut self.optimizer, lr);
        self.engine.zero_grad();
        Ok(true)
    }

    fn optimizer(&mut self) -> &mut dyn OptimizerState {
        &mut self.optimizer
    }

    fn save(&mut self, metadata: HashMap<String, String>, path: &Path) -> Result<()> {
        let params = self.engine.stored_params().collect();
        checkpoint::save_weights(&self.engine.config, params, self.unloaded.buffers(), optimizer_entries(&self.optimizer), with_recipe(self.config, metadata)?, path)
    }

    fn restore_weights(&mut self, state: &checkpoint::StateDict, path: &Path) -> Result<()> {
        check_pretraining_config(&self.engine.config, state, path)?;
        check_same_pca_basis(&self.unloaded.buffers(), state, path)?;
        self.engine.load_state(&state.tensors, path)
    }
}

/// A checkpoint's metadata with the recipe that wrote it.
fn with_recipe(config: &PretrainConfig, mut metadata: HashMap<String, String>) -> Result<HashMap<String, String>> {
    let json = serde_json::to_string(config).map_err(|e| Error::new(ErrorCode::Internal, e.to_string()))?;
    metadata.insert("pretrain_config".to_string(), json);
    Ok(metadata)
}

/// Refuses a checkpoint written by a model with another config.
fn check_pretraining_config(model: &MaeConfig, state: &checkpoint::StateDict, path: &Path) -> Result<()> {
    if let Some(patch) = &state.config {
        if patch.apply_to(model)? != *model {
            bail!(InvalidConfig, "{} was written by a model with another config", path.display());
        }
    }
    Ok(())
}

/// Sets every rank's parameters to rank 0's (a no-op alone), in one broadcast. Every rank
/// calls it as a run starts, so the group prepares here for the parameters' device.
pub(crate) fn broadcast_params(params: &[(String, candle_core::Var)], group: &Group) -> Result<()> {
    let Some((_, first)) = params.first().filter(|_| group.size() > 1) else { return Ok(()) };
    group.prepare_for(first.device())?;
    let tensors = || params.iter().map(|(_, var)| var.as_tensor());
    let mut flat = FlatBuffer::pack(tensors())?;
    group.broadcast_flat(&mut flat, 0, "the broadcast of the initial weights")?;
    for ((_, var), value) in params.iter().zip(flat.unpack(tensors())?) {
        var.set(&value)?;
    }
    Ok(())
}

/// Sets each parameter from the tensor of the same name.
pub(crate) fn copy_params(params: &[(String, candle_core::Var)], tensors: &std::collections::BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    for (name, var) in params {
        let t = tensors.get(name).ok_or_else(|| Error::new(ErrorCode::CheckpointKeys, format!("{} lacks {name}", path.display())))?;
        if t.dims() != var.dims() {
            bail!(CheckpointShape, "{name}: checkpoint {:?}, model {:?}", t.dims(), var.dims());
        }
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}

/// The training loop shared by every recipe: per-iteration warm-up + cosine learning
/// rate, gradient accumulation, optional clipping, events, cancellation, and
/// checkpoints that resume exactly. A checkpoint folder that cannot be written to
/// fails it before the first step; a cancel already set by then ends it, aborted,
/// before that step, with no checkpoint written.
///
/// Data-parallel over `group` (`loader` serving this rank's shard): every rank starts
/// from rank 0's weights, each step's gradients are averaged over the ranks before the
/// update (so every rank updates alike), the ranks agree at every step on whether one
/// failed or was cancelled (all then stop, with the failed rank's error code), and rank
/// 0 alone writes checkpoints.
pub(crate) fn run(
    task: &mut dyn Task,
    loader: &Loader,
    recipe: &Recipe,
    resume: Option<&Path>,
    group: &Group,
    on_event: &mut dyn FnMut(TrainEvent),
    cancel: &AtomicBool,
) -> Result<TrainSummary> {
    let folder = match &recipe.checkpoint_dir {
        Some(dir) if group.rank() == 0 => checkpoint::check_writable_folder(dir).map(|()| remove_stale_temporaries(dir)),
        _ => Ok(()),
    };
    group.agree(folder, "checking the checkpoint folder")?;
    let result = train_steps(task, loader, recipe, resume, group, on_event, cancel);
    // Also after a failed step: the model gets the weights of the last step taken.
    let finished = task.finish();
    let summary = result?;
    finished?;
    Ok(summary)
}

fn train_steps(
    task: &mut dyn Task,
    loader: &Loader,
    recipe: &Recipe,
    resume: Option<&Path>,
    group: &Group,
    on_event: &mut dyn FnMut(TrainEvent),
    cancel: &AtomicBool,
) -> Result<TrainSummary> {
    let ranks = group.size();
    let shard = loader.shard();
    if (shard.rank, shard.ranks) != (group.rank(), ranks) {
        bail!(InvalidArgument, "the loader serves shard {} of {}, but this process is rank {} of {}", shard.rank, shard.ranks, group.rank(), ranks);
    }
    let batch_size = Some(loader.batch_size());
    let mut state = TrainState { step: 0, epoch: 0, batch_in_epoch: 0, images_seen: 0, batch_size, ranks: Some(ranks) };
    let mut last_checkpoint = None;
    let restored = resume.map(|from| restore(task, from, recipe, loader.batch_size(), ranks)).transpose();
    if let Some((restored, path)) = group.agree(restored, "resuming")? {
        state = TrainState { batch_size, ranks: Some(ranks), ..restored };
        last_checkpoint = Some(path);
    }
    // Every rank starts from rank 0's weights, as DDP broadcasts them.
    task.broadcast_weights(group)?;

    let batches = loader.batches_per_epoch();
    let steps_per_epoch = batches / recipe.accum_iter;
    if steps_per_epoch == 0 {
        bail!(
            InvalidArgument,
            "{} gives {batches} full batches of {} an epoch (an incomplete last batch is left out), fewer than the {} of a step (accumIter): use a smaller batchSize or accumIter",
            loader.describe(),
            loader.batch_size(),
            recipe.accum_iter
        );
    }
    // As published, micro-batches left over after an epoch's last full step are not used.
    let used_batches = steps_per_epoch * recipe.accum_iter;
    if state.batch_in_epoch >= used_batches || state.batch_in_epoch % recipe.accum_iter != 0 {
        bail!(
            InvalidArgument,
            "the checkpoint stopped at batch {} of epoch {}, which this loader ({used_batches} usable batches an epoch, accumIter {}) cannot continue from: resume with the same data, batch size and accumIter",
            state.batch_in_epoch,
            state.epoch,
            recipe.accum_iter
        );
    }
    // A fractional epoch count ends the last epoch early, at the nearest whole step
    // (at least one); the schedule still reaches its end there.
    let epoch_steps = ((steps_per_epoch as f64 * recipe.epochs).round() as u64).max(1);
    let total_steps = epoch_steps.min(recipe.max_steps.unwrap_or(u64::MAX));
    // Published: the rate scales with the effective batch, batchSize x accumIter x ranks.
    let schedule = LrSchedule { lr: recipe.peak_lr(loader.batch_size() * ranks), min_lr: recipe.min_lr, warmup_epochs: recipe.warmup_epochs, epochs: recipe.epochs };

    let started = Instant::now();
    let start_step = state.step;
    // Checked again at every step, and agreed by every rank; a cancel that came before
    // the first step leaves nothing to train or to save.
    let [cancels] = group.agree_sum(Ok([f64::from(u8::from(cancel.load(Ordering::SeqCst)))]), "starting")?;
    let mut aborted = cancels > 0.0 && state.step < total_steps;
    let mut images_this_run = 0u64;
    let mut final_loss = f64::NAN;
    let mut skipped_images = 0;

    'epochs: while state.step < total_steps && !aborted {
        let mut epoch_losses = Vec::new();
        let mut epoch_batches = loader.epoch(state.epoch, state.batch_in_epoch).take(used_batches - state.batch_in_epoch);
        while state.batch_in_epoch < used_batches {
            // Published: the rate is set at the first micro-batch of each step.
            let lr = schedule.at(state.epoch as f64 + state.batch_in_epoch as f64 / batches as f64);
            let work = micro_batches(task, &mut epoch_batches, recipe.accum_iter, loader, &mut state, &last_checkpoint, on_event);
            skipped_images += work.as_ref().map_or(0, |w| w.skipped);
            // Every rank's outcome before any gradient moves: a rank that failed stops
            // them all, with its error.
            let what = format!("step {}", state.step + 1);
            let [loss_sum, micro_count, images] = group.agree_sum(work.map(|w| [w.loss_sum, w.micro_batches as f64, w.images as f64]), &what)?;
            task.average_gradients(group, &format!("the gradient all-reduce of {what}"))?;
            let norm = task.grad_norm()?;
            if !norm.is_finite() {
                return Err(stopped(format!("the gradient norm is {norm} (with a finite loss)"), &state, &last_checkpoint));
            }
            if !task.apply(norm, recipe.clip_grad, lr)? {
                return Err(stopped(format!("the update at learning rate {lr:e} would make weights or the optimizer's moments non-finite"), &state, &last_checkpoint));
            }
            state.step += 1;
            state.images_seen += images as u64;
            images_this_run += images as u64;
            final_loss = loss_sum / micro_count;
            epoch_losses.push(final_loss);
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            let steps_done = (state.step - start_step) as f64;
            on_event(TrainEvent::Step {
                epoch: state.epoch,
                step: state.step,
                total_steps,
                loss: final_loss,
                lr,
                images_per_sec: images_this_run as f64 / elapsed,
                eta_seconds: elapsed / steps_done * (total_steps - state.step) as f64,
            });

            let epoch_done = state.batch_in_epoch == used_batches;
            if epoch_done {
                on_event(TrainEvent::EpochEnd { epoch: state.epoch, mean_loss: mean(&epoch_losses) });
                task.epoch_end(state.epoch, on_event)?;
                state.epoch += 1;
                state.batch_in_epoch = 0;
            }
            let finished = state.step >= total_steps;
            // A cancel stops every rank after the same step.
            let [cancels] = group.agree_sum(Ok([f64::from(u8::from(cancel.load(Ordering::SeqCst)))]), &format!("the end of step {}", state.step))?;
            aborted = cancels > 0.0 && !finished;
            if finished || aborted || (recipe.checkpoint_every > 0 && state.step % recipe.checkpoint_every == 0) {
                // Rank 0 writes it; the others wait to hear that it did.
                let written = if group.rank() == 0 { save_checkpoint(task, &state, recipe) } else { Ok(checkpoint_path(&state, recipe)) };
                if let Some(path) = group.agree(written, &format!("the checkpoint of step {}", state.step))? {
                    on_event(TrainEvent::Checkpoint { step: state.step, path: path.clone() });
                    last_checkpoint = Some(path);
                }
            }
            if finished || aborted {
                break 'epochs;
            }
            if epoch_done {
                continue 'epochs;
            }
        }
    }

    Ok(TrainSummary {
        steps: state.step,
        epochs_completed: state.epoch,
        final_loss,
        images_seen: state.images_seen,
        seconds: started.elapsed().as_secs_f64(),
        aborted,
        last_checkpoint,
        skipped_images,
    })
}

/// What one rank's micro-batches of a step came to.
struct StepWork {
    /// The sum of the micro-batches' mean losses.
    loss_sum: f64,
    /// Micro-batches that had images.
    micro_batches: usize,
    images: usize,
    /// Unreadable images left out.
    skipped: usize,
}

/// Runs a step's `accum_iter` micro-batches from `batches`, adding their gradients up,
/// and moves `state` past them. Fails on a non-finite loss (before its gradients reach
/// an update) and on a step whose images were all unreadable.
fn micro_batches(
    task: &mut dyn Task,
    batches: &mut impl Iterator<Item = Result<Batch>>,
    accum_iter: usize,
    loader: &Loader,
    state: &mut TrainState,
    last_checkpoint: &Option<PathBuf>,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<StepWork> {
    let mut work = StepWork { loss_sum: 0.0, micro_batches: 0, images: 0, skipped: 0 };
    let mut first_skipped = None;
    for micro in 0..accum_iter {
        let Some(batch) = batches.next() else {
            bail!(Internal, "the loader ended inside step {}", state.step + 1);
        };
        let batch = batch?;
        state.batch_in_epoch += 1;
        if let Some((_, first)) = batch.skipped.first() {
            work.skipped += batch.skipped.len();
            first_skipped.get_or_insert_with(|| first.clone());
            on_event(TrainEvent::Skipped { step: state.step, count: batch.skipped.len(), first: first.clone() });
        }
        let n = batch.shape[0];
        if n > 0 {
            let loss = task.micro_batch(batch, state.step, micro, 1.0 / accum_iter as f64)?;
            if !loss.is_finite() {
                return Err(stopped(format!("loss is {loss}"), state, last_checkpoint));
            }
            work.loss_sum += loss;
            work.micro_batches += 1;
            work.images += n;
        }
    }
    if work.micro_batches == 0 {
        bail!(
            InvalidArgument,
            "step {} (epoch {}) has no images: all {} images of its batches in {} were unreadable and skipped (the first: {}); remove or repair them",
            state.step + 1,
            state.epoch,
            work.skipped,
            loader.describe(),
            first_skipped.as_deref().unwrap_or("")
        );
    }
    Ok(work)
}

/// Why a step stopped the run, with the checkpoint to go back to.
fn stopped(what: String, state: &TrainState, last_checkpoint: &Option<PathBuf>) -> Error {
    let kept = last_checkpoint.as_deref().map_or("no checkpoint had been written".to_string(), |p| format!("the last good checkpoint is {}", p.display()));
    Error::new(ErrorCode::NonFiniteLoss, format!("{what} at step {} (epoch {}); training stopped before the step's update and {kept}", state.step + 1, state.epoch))
}

/// Removes the temporary files that checkpoint writes into `dir` left behind when their
/// process was killed mid-write: `.<checkpoint file name>.<pid>….tmp`, as
/// `checkpoint::write_atomic` names them, whose writing process is gone. Those of a
/// live process are left alone (it may be writing them), and so is every other file.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let writer = entry.file_name().to_str().and_then(temporary_writer);
        if writer.is_some_and(|pid| !process_alive(pid)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The writing process's id in the name of a checkpoint's temporary file:
/// `.checkpoint-<step>.safetensors.<pid>[.<anything>].tmp`.
fn temporary_writer(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(".checkpoint-")?.strip_suffix(".tmp")?;
    let (step, rest) = rest.split_once(".safetensors.")?;
    if step.is_empty() || !step.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.split('.').next()?.parse().ok()
}

#[cfg(target_os = "linux")]
fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Without `/proc` there is no portable check: every writer counts as alive, so
/// nothing is removed.
#[cfg(not(target_os = "linux"))]
fn process_alive(_pid: u32) -> bool {
    true
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image's mask depends on the step and its dataset index only: the same in any
    /// batch and at any place in it (so on any data-parallel rank), another at another step.
    #[test]
    fn an_image_is_masked_alike_in_any_batch_and_place() {
        let model = MaeConfig::preset("mae_vit_fmnist_patch4_32").unwrap();
        for masking in [Masking::Random, Masking::Block, Masking::Grid] {
            let config = PretrainConfig { masking, ..PretrainConfig::default() };
            let batch = step_plan(&config, &model, &[4, 9, 2, 7], 3).unwrap();
            let other = step_plan(&config, &model, &[7, 11, 4], 3).unwrap();
            assert_eq!(other.ids_shuffle[0], batch.ids_shuffle[3], "{masking:?}: image 7");
            assert_eq!(other.ids_shuffle[2], batch.ids_shuffle[0], "{masking:?}: image 4");
            assert_eq!(other.len_keep, batch.len_keep);
            if masking == Masking::Grid {
                continue;
            }
            assert_ne!(batch.ids_shuffle[0], batch.ids_shuffle[1], "{masking:?}: other images, other masks");
            let next_step = step_plan(&config, &model, &[4], 4).unwrap();
            assert_ne!(next_step.ids_shuffle[0], batch.ids_shuffle[0], "{masking:?}: another step, another mask");
            let reseeded = PretrainConfig { recipe: Recipe { seed: 1, ..config.recipe.clone() }, ..config.clone() };
            assert_ne!(step_plan(&reseeded, &model, &[4], 3).unwrap().ids_shuffle[0], batch.ids_shuffle[0], "{masking:?}: another seed");
        }
    }
}
