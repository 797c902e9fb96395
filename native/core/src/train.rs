//! Pre-training as `main_pretrain.py` / `engine_pretrain.py`: AdamW with the
//! published weight-decay groups, per-iteration warm-up + cosine learning rate,
//! gradient accumulation, optional clipping, and exactly resumable checkpoints.

use crate::bail;
use crate::checkpoint::{self, OPTIMIZER_PREFIX};
use crate::data::Loader;
use crate::error::{Error, ErrorCode, Result};
use crate::masking::{self, MaskPlan, Masking};
use crate::model::{MaskOptions, MaskedAutoencoder};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The recipe. Defaults are the published pre-training arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PretrainConfig {
    pub epochs: usize,
    pub accum_iter: usize,
    /// Base learning rate: `lr = blr * effective_batch / 256`.
    pub blr: f64,
    /// Absolute learning rate; overrides `blr` when set.
    pub lr: Option<f64>,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Clip the global gradient norm to this value.
    pub clip_grad: Option<f64>,
    pub mask_ratio: f64,
    #[serde(with = "masking_name")]
    pub masking: Masking,
    /// Seeds the masks (the data order and augmentation have the loader's seed).
    pub seed: u64,
    /// Stop once this many optimizer steps have been taken in total.
    pub max_steps: Option<u64>,
    /// Folder for checkpoints; none are written without it.
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every this many optimizer steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Keep this many most recent checkpoints.
    pub keep_last: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            epochs: 400,
            accum_iter: 1,
            blr: 1.5e-4,
            lr: None,
            min_lr: 0.0,
            warmup_epochs: 40.0,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.95,
            clip_grad: None,
            mask_ratio: 0.75,
            masking: Masking::Random,
            seed: 0,
            max_steps: None,
            checkpoint_dir: None,
            checkpoint_every: 0,
            keep_last: 3,
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
    pub fn validate(&self) -> Result<()> {
        masking::check_mask_ratio(self.mask_ratio)?;
        if self.epochs == 0 || self.accum_iter == 0 {
            bail!(InvalidArgument, "epochs and accumIter must be positive");
        }
        let rates = [("blr", Some(self.blr)), ("lr", self.lr), ("minLr", Some(self.min_lr)), ("weightDecay", Some(self.weight_decay))];
        for (name, value) in rates {
            if let Some(v) = value {
                if !(v.is_finite() && v >= 0.0) {
                    bail!(InvalidArgument, "{name} must be a non-negative number, got {v}");
                }
            }
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0 && self.warmup_epochs < self.epochs as f64) {
            bail!(InvalidArgument, "warmupEpochs must be in [0, epochs), got {}", self.warmup_epochs);
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!(InvalidArgument, "{name} must be in [0, 1), got {beta}");
            }
        }
        if let Some(c) = self.clip_grad {
            if !(c.is_finite() && c > 0.0) {
                bail!(InvalidArgument, "clipGrad must be positive, got {c}");
            }
        }
        if self.keep_last == 0 {
            bail!(InvalidArgument, "keepLast must be at least 1");
        }
        Ok(())
    }

    /// The peak learning rate for a per-step batch of `batch_size`.
    pub fn peak_lr(&self, batch_size: usize) -> f64 {
        self.lr.unwrap_or(self.blr * (batch_size * self.accum_iter) as f64 / 256.0)
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
}

/// What a run reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    Step { epoch: usize, step: u64, total_steps: u64, loss: f64, lr: f64, images_per_sec: f64, eta_seconds: f64 },
    Checkpoint { step: u64, path: PathBuf },
    /// Unreadable images left out of a batch.
    Skipped { step: u64, count: usize, first: String },
    EpochEnd { epoch: usize, mean_loss: f64 },
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

/// The masks for one step, from a generator of its own so a resumed run draws
/// the same ones.
fn step_plan(config: &PretrainConfig, model: &MaskedAutoencoder, n: usize, step: u64, micro: usize) -> Result<MaskPlan> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x6d61_736b);
    rng.set_stream(step * 1024 + micro as u64);
    model.mask_plan_with(&mut rng, n, &MaskOptions { mask_ratio: config.mask_ratio, masking: config.masking, noise: None })
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

fn save_checkpoint(model: &MaskedAutoencoder, optimizer: &AdamW, state: &TrainState, config: &PretrainConfig) -> Result<Option<PathBuf>> {
    let Some(dir) = &config.checkpoint_dir else { return Ok(None) };
    std::fs::create_dir_all(dir).map_err(|e| Error::new(ErrorCode::Io, format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(checkpoint_name(state.step));
    let mut extra = Vec::new();
    for (name, m, v) in optimizer.state() {
        extra.push((format!("{OPTIMIZER_PREFIX}exp_avg.{name}"), m.clone()));
        extra.push((format!("{OPTIMIZER_PREFIX}exp_avg_sq.{name}"), v.clone()));
    }
    let json = |v: serde_json::Result<String>| v.map_err(|e| Error::new(ErrorCode::Internal, e.to_string()));
    let metadata = HashMap::from([
        ("train_state".to_string(), json(serde_json::to_string(state))?),
        ("pretrain_config".to_string(), json(serde_json::to_string(config))?),
        ("optimizer_step".to_string(), optimizer.step.to_string()),
    ]);
    checkpoint::save_with(model, extra, metadata, &path)?;
    let existing = list_checkpoints(dir);
    for old in existing.iter().take(existing.len().saturating_sub(config.keep_last)) {
        let _ = std::fs::remove_file(old);
    }
    Ok(Some(path))
}

/// Restores weights, optimizer moments and position from a checkpoint file, or
/// from the newest checkpoint in a folder.
pub fn restore(model: &MaskedAutoencoder, optimizer: &mut AdamW, from: &Path) -> Result<(TrainState, PathBuf)> {
    let path = if from.is_dir() {
        match list_checkpoints(from).pop() {
            Some(p) => p,
            None => bail!(CheckpointNotFound, "no checkpoint-*.safetensors in {}", from.display()),
        }
    } else {
        from.to_path_buf()
    };
    let state = checkpoint::read_state_dict(&path)?;
    let Some(train_state) = state.metadata.get("train_state") else {
        bail!(CheckpointKeys, "{} is a model, not a training checkpoint (it has no train_state)", path.display());
    };
    let train_state: TrainState = serde_json::from_str(train_state).map_err(|e| Error::new(ErrorCode::CheckpointCorrupt, format!("{}: bad train_state: {e}", path.display())))?;
    let optimizer_step: u64 = state.metadata.get("optimizer_step").and_then(|s| s.parse().ok()).unwrap_or(train_state.step);
    if let Some(patch) = &state.config {
        if patch.apply_to(&model.config) != model.config {
            bail!(InvalidConfig, "{} was written by a model with another config", path.display());
        }
    }
    let device = model.device().clone();
    for (name, var) in model.params() {
        let t = state.tensors.get(name).ok_or_else(|| Error::new(ErrorCode::CheckpointKeys, format!("{} lacks {name}", path.display())))?;
        if t.dims() != var.dims() {
            bail!(CheckpointShape, "{name}: checkpoint {:?}, model {:?}", t.dims(), var.dims());
        }
        var.set(&t.to_device(&device)?)?;
        let moment = |kind: &str| {
            state.tensors.get(&format!("{OPTIMIZER_PREFIX}{kind}.{name}")).cloned().ok_or_else(|| {
                Error::new(ErrorCode::CheckpointKeys, format!("{} lacks the optimizer state {kind} of {name}", path.display()))
            })
        };
        optimizer.set_state(name, moment("exp_avg")?, moment("exp_avg_sq")?)?;
    }
    optimizer.step = optimizer_step;
    Ok((train_state, path))
}

/// Runs pre-training on `loader`'s batches, calling `on_event` as it goes. Stops
/// after the current step when `cancel` is set, and always leaves a checkpoint
/// of where it stopped (when a checkpoint folder is configured).
pub fn pretrain(
    model: &MaskedAutoencoder,
    loader: &Loader,
    config: &PretrainConfig,
    resume: Option<&Path>,
    on_event: &mut dyn FnMut(TrainEvent),
    cancel: &AtomicBool,
) -> Result<TrainSummary> {
    config.validate()?;
    let adamw = AdamWConfig { beta1: config.beta1, beta2: config.beta2, eps: 1e-8, weight_decay: config.weight_decay };
    let mut optimizer = AdamW::new(model.params(), adamw)?;
    let mut state = TrainState { step: 0, epoch: 0, batch_in_epoch: 0, images_seen: 0 };
    let mut last_checkpoint = None;
    if let Some(from) = resume {
        let (restored, path) = restore(model, &mut optimizer, from)?;
        state = restored;
        last_checkpoint = Some(path);
    }

    let batches = loader.batches_per_epoch();
    let steps_per_epoch = batches / config.accum_iter;
    if steps_per_epoch == 0 {
        bail!(InvalidArgument, "the dataset gives {batches} batches per epoch, fewer than accumIter {}", config.accum_iter);
    }
    // As published, micro-batches left over after an epoch's last full step are not used.
    let used_batches = steps_per_epoch * config.accum_iter;
    if state.batch_in_epoch >= used_batches || state.batch_in_epoch % config.accum_iter != 0 {
        bail!(
            InvalidArgument,
            "the checkpoint stopped at batch {} of epoch {}, which this loader ({used_batches} usable batches an epoch, accumIter {}) cannot continue from: resume with the same data, batch size and accumIter",
            state.batch_in_epoch,
            state.epoch,
            config.accum_iter
        );
    }
    let total_steps = (steps_per_epoch as u64 * config.epochs as u64).min(config.max_steps.unwrap_or(u64::MAX));
    let schedule = LrSchedule { lr: config.peak_lr(loader.batch_size()), min_lr: config.min_lr, warmup_epochs: config.warmup_epochs, epochs: config.epochs as f64 };

    let started = Instant::now();
    let start_step = state.step;
    let mut images_this_run = 0u64;
    let mut final_loss = f64::NAN;
    let mut skipped_images = 0;
    let mut aborted = false;

    'epochs: while state.epoch < config.epochs && state.step < total_steps {
        let mut accumulated: Option<Vec<Tensor>> = None;
        let mut step_losses = Vec::new();
        let mut epoch_losses = Vec::new();
        let mut lr = 0.0;
        for batch in loader.epoch(state.epoch, state.batch_in_epoch).take(used_batches - state.batch_in_epoch) {
            let batch = batch?;
            let i = state.batch_in_epoch;
            state.batch_in_epoch += 1;
            if let Some((_, first)) = batch.skipped.first() {
                skipped_images += batch.skipped.len();
                on_event(TrainEvent::Skipped { step: state.step, count: batch.skipped.len(), first: first.clone() });
            }
            // Published: the rate is set at the first micro-batch of each step.
            if i % config.accum_iter == 0 {
                lr = schedule.at(state.epoch as f64 + i as f64 / batches as f64);
            }
            let n = batch.shape[0];
            if n > 0 {
                let imgs = Tensor::from_vec(batch.images, batch.shape.as_slice(), model.device())?;
                let plan = step_plan(config, model, n, state.step, i % config.accum_iter)?;
                let grads = micro_batch_gradients(model, &imgs, &plan, config.accum_iter, &state, last_checkpoint.as_deref())?;
                accumulated = Some(match accumulated {
                    Some(acc) => acc.iter().zip(&grads.1).map(|(a, g)| a + g).collect::<candle_core::Result<Vec<_>>>()?,
                    None => grads.1,
                });
                step_losses.push(grads.0);
                state.images_seen += n as u64;
                images_this_run += n as u64;
            }
            if (i + 1) % config.accum_iter != 0 {
                continue;
            }
            if let Some(mut grads) = accumulated.take() {
                if let Some(max_norm) = config.clip_grad {
                    clip_grad_norm(&mut grads, max_norm)?;
                }
                optimizer.step(&grads, lr)?;
            }
            state.step += 1;
            final_loss = mean(&step_losses);
            step_losses.clear();
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
                state.epoch += 1;
                state.batch_in_epoch = 0;
            }
            let finished = state.step >= total_steps || state.epoch >= config.epochs;
            aborted = cancel.load(Ordering::SeqCst) && !finished;
            if finished || aborted || (config.checkpoint_every > 0 && state.step % config.checkpoint_every == 0) {
                if let Some(path) = save_checkpoint(model, &optimizer, &state, config)? {
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

/// Loss and gradients (scaled by `1 / accum_iter`) of one micro-batch.
fn micro_batch_gradients(
    model: &MaskedAutoencoder,
    imgs: &Tensor,
    plan: &MaskPlan,
    accum_iter: usize,
    state: &TrainState,
    last_checkpoint: Option<&Path>,
) -> Result<(f64, Vec<Tensor>)> {
    let out = model.forward_with_plan(imgs, plan)?;
    let loss = out.loss.to_scalar::<f32>()? as f64;
    if !loss.is_finite() {
        let kept = last_checkpoint.map_or("no checkpoint had been written".to_string(), |p| format!("the last good checkpoint is {}", p.display()));
        bail!(NonFiniteLoss, "loss is {loss} at step {} (epoch {}); training stopped and {kept}", state.step + 1, state.epoch);
    }
    let grads = model.gradients(&out)?;
    let scale = 1.0 / accum_iter as f64;
    let grads = grads.into_iter().map(|(_, g)| g * scale).collect::<candle_core::Result<Vec<_>>>()?;
    Ok((loss, grads))
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

