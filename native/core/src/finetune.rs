//! The paper's three protocols on a pre-trained encoder, as `main_finetune.py` and
//! `main_linprobe.py`: full fine-tuning (AdamW, layer-wise lr decay, drop path,
//! label smoothing, mixup/cutmix), linear probing (frozen encoder, BatchNorm +
//! linear head, LARS) and partial fine-tuning (the last k blocks); plus evaluation
//! and embeddings of a whole dataset.

use crate::bail;
use crate::checkpoint::StateDict;
use crate::checkpoint::Stored;
use crate::classifier::{save_classifier, soft_targets, ForwardMode, Trainable, VitClassifier};
use crate::distributed::Group;
use crate::data::{stream_rng, Batch, Loader, DROP_PATH_STREAM};
use crate::error::{Error, ErrorCode, Result};
use crate::mixup::MixupConfig;
use crate::model::{MaskedAutoencoder, Pool};
use crate::engine::{FlatOptimizer, Gradients, VitEngine, VitMode};
use crate::optim::{layer_decay_groups, AdamW, AdamWConfig, Lars, Optimizer, OptimizerState, ParamGroup};
use crate::recipe::{self, Recipe};
use crate::train::{self, Accumulated, Task, TrainEvent, TrainSummary};
use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    /// Every parameter trains (AdamW with layer-wise lr decay).
    Finetune,
    /// The head's linear layer trains on frozen features (LARS).
    Linprobe,
    /// The last `partialBlocks` blocks, the final norm and the head train (AdamW).
    Partial,
}

/// A fine-tuning recipe. `FinetuneConfig::defaults(protocol)` gives the published
/// arguments of `main_finetune.py` or `main_linprobe.py`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FinetuneConfig {
    #[serde(flatten)]
    pub recipe: Recipe,
    pub protocol: Protocol,
    /// Blocks trained by the partial protocol.
    pub partial_blocks: usize,
    /// Layer-wise learning-rate decay (AdamW protocols).
    pub layer_decay: f64,
    /// Stochastic depth rate of the last block.
    pub drop_path: f64,
    /// Label smoothing.
    pub smoothing: f64,
    /// Mixup alpha (0: off).
    pub mixup: f64,
    /// CutMix alpha (0: off).
    pub cutmix: f64,
    pub mixup_prob: f64,
    pub mixup_switch_prob: f64,
}

impl FinetuneConfig {
    pub fn defaults(protocol: Protocol) -> Self {
        let finetune = FinetuneConfig {
            recipe: Recipe {
                epochs: 50.0,
                accum_iter: 1,
                blr: 1e-3,
                lr: None,
                min_lr: 1e-6,
                warmup_epochs: 5.0,
                weight_decay: 0.05,
                beta1: 0.9,
                beta2: 0.999,
                clip_grad: None,
                seed: 0,
                max_steps: None,
                checkpoint_dir: None,
                checkpoint_every: 0,
                keep_last: 3,
            },
            protocol,
            partial_blocks: 0,
            layer_decay: 0.75,
            drop_path: 0.1,
            smoothing: 0.1,
            mixup: 0.0,
            cutmix: 0.0,
            mixup_prob: 1.0,
            mixup_switch_prob: 0.5,
        };
        match protocol {
            Protocol::Finetune => finetune,
            // Partial fine-tuning follows the fine-tuning recipe without layer decay
            // (the paper's Figure 9 does not give one).
            Protocol::Partial => FinetuneConfig { layer_decay: 1.0, ..finetune },
            Protocol::Linprobe => FinetuneConfig {
                recipe: Recipe { epochs: 90.0, blr: 0.1, min_lr: 0.0, warmup_epochs: 10.0, weight_decay: 0.0, ..finetune.recipe },
                layer_decay: 1.0,
                drop_path: 0.0,
                smoothing: 0.0,
                ..finetune
            },
        }
    }

    /// The protocol's defaults with the fields of a JSON object (camelCase) on top;
    /// `protocol` must be among them.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let protocol: Protocol = value
            .get("protocol")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Error::new(ErrorCode::InvalidArgument, format!("protocol must be 'finetune', 'linprobe' or 'partial': {e}")))?
            .ok_or_else(|| Error::new(ErrorCode::InvalidArgument, "fine-tuning options need a protocol"))?;
        let config: FinetuneConfig = recipe::from_json(&Self::defaults(protocol), value, "fine-tuning")?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<()> {
        self.recipe.validate()?;
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            bail!(InvalidArgument, "layerDecay must be in (0, 1], got {}", self.layer_decay);
        }
        if !(0.0..1.0).contains(&self.drop_path) {
            bail!(InvalidArgument, "dropPath must be in [0, 1), got {}", self.drop_path);
        }
        self.mixup_config(1).validate()
    }

    pub fn trainable(&self) -> Trainable {
        match self.protocol {
            Protocol::Finetune => Trainable::All,
            Protocol::Linprobe => Trainable::Head,
            Protocol::Partial => Trainable::LastBlocks(self.partial_blocks),
        }
    }

    fn mixup_config(&self, num_classes: usize) -> MixupConfig {
        MixupConfig {
            mixup_alpha: self.mixup,
            cutmix_alpha: self.cutmix,
            prob: self.mixup_prob,
            switch_prob: self.mixup_switch_prob,
            label_smoothing: self.smoothing,
            num_classes,
        }
    }
}

/// The optimizer a protocol uses over `classifier`'s trained parameters.
pub fn optimizer_for(classifier: &VitClassifier, config: &FinetuneConfig) -> Result<Box<dyn Optimizer>> {
    let params = classifier.trainable_params(config.trainable())?;
    Ok(match config.protocol {
        Protocol::Linprobe => Box::new(Lars::new(&params, config.recipe.weight_decay)?),
        Protocol::Finetune | Protocol::Partial => {
            let groups = protocol_groups(classifier, &params, config);
            Box::new(AdamW::with_groups(&params, groups, adamw_config(config))?)
        }
    })
}

/// The AdamW protocols' layer-decay groups of the trained parameters (LARS ignores them).
fn protocol_groups(classifier: &VitClassifier, trained: &[(String, candle_core::Var)], config: &FinetuneConfig) -> Vec<crate::optim::ParamGroup> {
    layer_decay_groups(trained, classifier.config.depth, config.layer_decay)
}

fn adamw_config(config: &FinetuneConfig) -> AdamWConfig {
    AdamWConfig { beta1: config.recipe.beta1, beta2: config.recipe.beta2, eps: 1e-8, weight_decay: config.recipe.weight_decay }
}

struct Finetuning<'a> {
    classifier: &'a VitClassifier,
    config: &'a FinetuneConfig,
    trained: Vec<(String, candle_core::Var)>,
    optimizer: Box<dyn Optimizer>,
    grads: Accumulated,
    eval_loader: Option<&'a Loader>,
    group: &'a Group,
}

impl Task for Finetuning<'_> {
    fn micro_batch(&mut self, batch: Batch, step: u64, micro: usize, grad_scale: f64) -> Result<f64> {
        let c = self.classifier;
        let [n, ..] = batch.shape;
        if batch.labels.len() != n {
            bail!(InvalidArgument, "fine-tuning needs labelled data: the dataset gives no labels");
        }
        c.check_labels(&batch.labels, n)?;
        let k = c.config.num_classes;
        let shape = batch.shape;
        let mut rngs = drop_path_rngs(self.config, step, &batch.indices);
        let (targets, images) = batch_targets(self.config, k, batch, self.group, step, micro)?;
        let imgs = Tensor::from_vec(images, shape.as_slice(), c.device())?;
        let targets = Tensor::from_vec(targets, (n, k), c.device())?;
        let mut mode = ForwardMode { train: Some((&mut rngs, self.config.drop_path)), trainable: self.config.trainable() };
        let loss = c.loss(&c.forward_mode(&imgs, &mut mode)?, &targets)?;
        // The backward pass is queued before the loss is read (no GPU wait mid-step).
        let grads = loss.backward()?;
        let grads = self
            .trained
            .iter()
            .map(|(name, var)| grads.get(var.as_tensor()).cloned().ok_or_else(|| Error::new(ErrorCode::Internal, format!("parameter {name} received no gradient"))))
            .collect::<Result<Vec<_>>>()?;
        let value = loss.to_scalar::<f32>()? as f64;
        if value.is_finite() {
            self.grads.add(grads, grad_scale)?;
        }
        Ok(value)
    }

    fn average_gradients(&mut self, group: &Group, what: &str) -> Result<()> {
        self.grads.average_over(group, what)
    }

    fn broadcast_weights(&mut self, group: &Group) -> Result<()> {
        train::broadcast_params(self.classifier.params(), group)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        self.grads.norm()
    }

    fn apply(&mut self, norm: f64, clip_grad: Option<f64>, lr: f64) -> Result<bool> {
        self.grads.apply(self.optimizer.as_mut(), norm, clip_grad, lr)
    }

    fn optimizer(&mut self) -> &mut dyn OptimizerState {
        self.optimizer.as_mut()
    }

    fn save(&mut self, metadata: HashMap<String, String>, path: &Path) -> Result<()> {
        save_finetuning(self.classifier, self.config, train::optimizer_entries(self.optimizer.as_ref()), metadata, path)
    }

    fn restore_weights(&mut self, state: &StateDict, path: &Path) -> Result<()> {
        restore_finetuning(self.classifier, state, path)
    }

    fn epoch_end(&mut self, epoch: usize, on_event: &mut dyn FnMut(TrainEvent)) -> Result<()> {
        evaluate_after_epoch(self.classifier, self.eval_loader, self.group, epoch, on_event)
    }
}

/// A micro-batch's soft targets `[n, K]` (mixed, or smoothed one-hot) and images (mixed
/// in place), the mixing drawn from a generator of the batch, keyed by step and
/// micro-batch, as timm draws one mixing per batch. Data-parallel, each image is mixed
/// with the one a single process would pair it with (see [`mirror_batch`]).
fn batch_targets(config: &FinetuneConfig, k: usize, batch: Batch, group: &Group, step: u64, micro: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.recipe.seed ^ 0x6674);
    rng.set_stream(step * 1024 + micro as u64);
    let mixup = config.mixup_config(k);
    let mut images = batch.images;
    let targets = if mixup.enabled() {
        let mirror = mirror_batch(group, &images, &batch.labels, &format!("the mixing exchange of step {} (micro-batch {micro})", step + 1))?;
        let partner = mirror.as_ref().map(|(images, labels)| (images.as_slice(), labels.as_slice()));
        mixup.mix(&mut images, batch.shape, &batch.labels, partner, &mut rng)?.0
    } else {
        soft_targets(&batch.labels, k, config.smoothing)
    };
    Ok((targets, images))
}

/// The batch to mix with, from the mirror rank. timm mixes a batch with itself flipped:
/// in a single process's batch of W x B images, position j with W x B - 1 - j. Data-
/// parallel, position j = r + W i is rank r's image i (the loader's shards interleave),
/// so its partner is rank W - 1 - r's image B - 1 - i: the two ranks swap batches and
/// each mixes with the other's flipped. `None` (mix with this batch) alone, for the
/// middle rank of an odd number, and when the two batches differ in size (one left out
/// unreadable images), where no pairing by position exists; both ranks see the sizes, so
/// both fall back alike.
fn mirror_batch(group: &Group, images: &[f32], labels: &[i64], what: &str) -> Result<Option<(Vec<f32>, Vec<i64>)>> {
    let peer = group.size() - 1 - group.rank();
    if peer == group.rank() {
        return Ok(None);
    }
    let mut their_len = [0u8; 8];
    group.exchange(&(images.len() as u64).to_le_bytes(), peer, &mut their_len, what)?;
    if u64::from_le_bytes(their_len) != images.len() as u64 {
        return Ok(None);
    }
    let mut their_images = vec![0f32; images.len()];
    group.exchange(bytemuck::cast_slice(images), peer, bytemuck::cast_slice_mut(&mut their_images), what)?;
    let mut their_labels = vec![0i64; labels.len()];
    group.exchange(bytemuck::cast_slice(labels), peer, bytemuck::cast_slice_mut(&mut their_labels), what)?;
    Ok(Some((their_images, their_labels)))
}

/// The stochastic-depth generators of a step's images of dataset indices `indices`, each
/// keyed by the step and the image's index, so that an image's branches are dropped
/// alike whichever batch, place in it or data-parallel rank it is in.
fn drop_path_rngs(config: &FinetuneConfig, step: u64, indices: &[usize]) -> Vec<ChaCha8Rng> {
    indices.iter().map(|&index| stream_rng(config.recipe.seed, step, DROP_PATH_STREAM, index as u64)).collect()
}

fn save_finetuning(classifier: &VitClassifier, config: &FinetuneConfig, extra: Vec<(String, Stored<'_>)>, mut metadata: HashMap<String, String>, path: &Path) -> Result<()> {
    let json = serde_json::to_string(config).map_err(|e| Error::new(ErrorCode::Internal, e.to_string()))?;
    metadata.insert("finetune_config".to_string(), json);
    save_classifier(classifier, extra, metadata, path)
}

fn restore_finetuning(classifier: &VitClassifier, state: &StateDict, path: &Path) -> Result<()> {
    if let Some(json) = state.metadata.get("config") {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| Error::new(ErrorCode::CheckpointCorrupt, format!("{}: {e}", path.display())))?;
        let saved = crate::classifier::ClassifierConfig::from_fields(crate::classifier::config_fields(&value, false)?)?;
        if saved != classifier.config {
            bail!(InvalidConfig, "{} was written by a classifier with another config", path.display());
        }
    }
    let model_tensors = state.tensors.iter().filter(|(k, _)| !k.starts_with(crate::checkpoint::OPTIMIZER_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect();
    classifier.assign(&model_tensors)
}

fn evaluate_after_epoch(classifier: &VitClassifier, eval_loader: Option<&Loader>, group: &Group, epoch: usize, on_event: &mut dyn FnMut(TrainEvent)) -> Result<()> {
    if let Some(loader) = eval_loader {
        // Each rank's probe BatchNorm kept statistics of its own batches (as DDP without
        // SyncBatchNorm); every rank evaluates with rank 0's, the ones its checkpoints keep.
        broadcast_batch_norm(classifier, group)?;
        let e = evaluate(classifier, loader, group, &mut |_| {}, &AtomicBool::new(false))?;
        on_event(TrainEvent::Eval { epoch, top1: e.top1, top5: e.top5, loss: e.loss });
    }
    Ok(())
}

/// Sets the probe BatchNorm's running statistics to rank 0's (a no-op alone or without one).
fn broadcast_batch_norm(classifier: &VitClassifier, group: &Group) -> Result<()> {
    if group.size() == 1 {
        return Ok(());
    }
    let Some((mut mean, mut var, tracked)) = classifier.batch_norm_stats()? else { return Ok(()) };
    let what = "the broadcast of the BatchNorm statistics";
    group.broadcast(bytemuck::cast_slice_mut(&mut mean), 0, what)?;
    group.broadcast(bytemuck::cast_slice_mut(&mut var), 0, what)?;
    let mut tracked = tracked.to_le_bytes();
    group.broadcast(&mut tracked, 0, what)?;
    classifier.set_batch_norm_stats(mean, var, i64::from_le_bytes(tracked))
}

/// Fine-tuning on the engine (the CPU in f32): the weights, gradients and optimizer
/// state live in the engine's flat buffers during the run, and are written back to the
/// classifier at each checkpoint, before each evaluation and when the run stops.
struct EngineFinetuning<'a> {
    classifier: &'a VitClassifier,
    config: &'a FinetuneConfig,
    engine: VitEngine,
    optimizer: FlatOptimizer,
    eval_loader: Option<&'a Loader>,
    /// Whether the engine holds the classifier's weights (copied in on the first
    /// micro-batch, after any resume has set them).
    loaded: bool,
    group: &'a Group,
}

impl EngineFinetuning<'_> {
    /// Copies the classifier's weights into the engine, once.
    fn load(&mut self) -> Result<()> {
        if !self.loaded {
            self.engine.load_from(self.classifier)?;
            self.engine.zero_grad();
            self.loaded = true;
        }
        Ok(())
    }
}

impl Task for EngineFinetuning<'_> {
    fn micro_batch(&mut self, batch: Batch, step: u64, micro: usize, grad_scale: f64) -> Result<f64> {
        let c = self.classifier;
        let [n, ..] = batch.shape;
        if batch.labels.len() != n {
            bail!(InvalidArgument, "fine-tuning needs labelled data: the dataset gives no labels");
        }
        c.check_labels(&batch.labels, n)?;
        self.load()?;
        if n != self.engine.batch {
            // A batch short of skipped images: a plan of its size, sharing the weights.
            let mut other = VitEngine::new(&c.config, n, self.engine.mode)?;
            self.engine.store_to(c)?;
            other.load_from(c)?;
            other.take_grads_from(&mut self.engine);
            self.engine = other;
        }
        let mut rngs = drop_path_rngs(self.config, step, &batch.indices);
        let (targets, images) = batch_targets(self.config, c.config.num_classes, batch, self.group, step, micro)?;
        self.engine.accumulate(&images, &targets, grad_scale as f32, Some(&mut rngs)).map(f64::from)
    }

    fn average_gradients(&mut self, group: &Group, what: &str) -> Result<()> {
        self.engine.average_gradients(group, what)
    }

    fn broadcast_weights(&mut self, group: &Group) -> Result<()> {
        self.load()?;
        self.engine.broadcast_params(group)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        Ok(self.engine.grad_norm())
    }

    fn apply(&mut self, norm: f64, clip_grad: Option<f64>, lr: f64) -> Result<bool> {
        if let Some(max_norm) = clip_grad {
            self.engine.clip_grads(norm, max_norm);
        }
        if !self.engine.optimizer_step_stays_finite(&mut self.optimizer, lr) {
            return Ok(false);
        }
        self.engine.optimizer_step(&mut self.optimizer, lr);
        self.engine.zero_grad();
        Ok(true)
    }

    fn optimizer(&mut self) -> &mut dyn OptimizerState {
        &mut self.optimizer
    }

    fn save(&mut self, metadata: HashMap<String, String>, path: &Path) -> Result<()> {
        self.finish()?;
        save_finetuning(self.classifier, self.config, train::optimizer_entries(&self.optimizer), metadata, path)
    }

    fn restore_weights(&mut self, state: &StateDict, path: &Path) -> Result<()> {
        restore_finetuning(self.classifier, state, path)?;
        self.loaded = false;
        Ok(())
    }

    fn epoch_end(&mut self, epoch: usize, on_event: &mut dyn FnMut(TrainEvent)) -> Result<()> {
        self.finish()?;
        evaluate_after_epoch(self.classifier, self.eval_loader, self.group, epoch, on_event)
    }

    fn finish(&mut self) -> Result<()> {
        if self.loaded {
            self.engine.store_to(self.classifier)?;
        }
        Ok(())
    }
}

/// Trains `classifier` in place by `config`'s protocol on `loader`'s labelled batches,
/// evaluating on `eval_loader` after every epoch. Events, cancellation, checkpoints and
/// data-parallel training over `group` as `train::pretrain`; mixing pairs images across
/// ranks as one process would (so 2 ranks of 16 train as 1 of 32), and the probe's
/// BatchNorm keeps each rank's statistics, as DDP without SyncBatchNorm.
pub fn finetune(
    classifier: &VitClassifier,
    loader: &Loader,
    eval_loader: Option<&Loader>,
    config: &FinetuneConfig,
    resume: Option<&Path>,
    group: &Group,
    on_event: &mut dyn FnMut(TrainEvent),
    cancel: &AtomicBool,
) -> Result<TrainSummary> {
    config.validate()?;
    let trained = classifier.trainable_params(config.trainable())?;
    if classifier.uses_engine() {
        let mode = VitMode::Grad { trainable: config.trainable(), train: true, drop_path: config.drop_path };
        let engine = VitEngine::new(&classifier.config, loader.batch_size(), mode)?;
        let groups = protocol_groups(classifier, &trained, config);
        let named: Vec<(String, ParamGroup)> = trained.iter().map(|(n, _)| n.clone()).zip(groups).collect();
        let optimizer = match config.protocol {
            Protocol::Linprobe => FlatOptimizer::lars(&engine, &named, config.recipe.weight_decay)?,
            Protocol::Finetune | Protocol::Partial => FlatOptimizer::adamw(&engine, &named, adamw_config(config))?,
        };
        let mut task = EngineFinetuning { classifier, config, engine, optimizer, eval_loader, loaded: false, group };
        return train::run(&mut task, loader, &config.recipe, resume, group, on_event, cancel);
    }
    let optimizer = optimizer_for(classifier, config)?;
    let mut task = Finetuning { classifier, config, trained, optimizer, grads: Accumulated::default(), eval_loader, group };
    train::run(&mut task, loader, &config.recipe, resume, group, on_event, cancel)
}

/// Accuracy of a classifier on a labelled dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Fraction of images whose label is the most likely class.
    pub top1: f64,
    /// Fraction whose label is among the five most likely (all classes if fewer).
    pub top5: f64,
    /// Mean cross-entropy (no smoothing).
    pub loss: f64,
    pub count: usize,
}

/// Evaluates every batch of `loader`'s first epoch (give it `shuffle: false` and no
/// `drop_last` to see the whole dataset once), calling `progress` with the images
/// done so far. Fails with `Aborted` when `cancel` is set. Data-parallel over `group`,
/// each rank evaluates its shard and the counts are summed: top-1 and top-5 are exactly
/// one process's.
pub fn evaluate(classifier: &VitClassifier, loader: &Loader, group: &Group, progress: &mut dyn FnMut(usize), cancel: &AtomicBool) -> Result<Evaluation> {
    check_shard(loader, group)?;
    let local = evaluate_shard(classifier, loader, progress, cancel);
    let [top1, top5, loss_sum, count] = group.agree_sum(local, "the evaluation")?;
    if count == 0.0 {
        bail!(InvalidArgument, "the evaluation dataset gave no images");
    }
    Ok(Evaluation { top1: top1 / count, top5: top5 / count, loss: loss_sum / count, count: count as usize })
}

/// This rank's correct top-1 and top-5 counts, summed loss and image count.
fn evaluate_shard(classifier: &VitClassifier, loader: &Loader, progress: &mut dyn FnMut(usize), cancel: &AtomicBool) -> Result<[f64; 4]> {
    let k = classifier.config.num_classes;
    let (mut top1, mut top5, mut loss_sum, mut count) = (0usize, 0usize, 0f64, 0usize);
    for batch in loader.epoch(0, 0) {
        check_cancel(cancel, "evaluation")?;
        let batch = batch?;
        let n = batch.shape[0];
        if n == 0 {
            continue;
        }
        if batch.labels.len() != n {
            bail!(InvalidArgument, "evaluation needs labelled data: the dataset gives no labels");
        }
        classifier.check_labels(&batch.labels, n)?;
        let imgs = Tensor::from_vec(batch.images, batch.shape.as_slice(), classifier.device())?;
        let logits = classifier.forward(&imgs)?.detach();
        let targets = Tensor::from_vec(soft_targets(&batch.labels, k, 0.0), (n, k), classifier.device())?;
        loss_sum += classifier.loss(&logits, &targets)?.to_scalar::<f32>()? as f64 * n as f64;
        for (row, &label) in logits.to_vec2::<f32>()?.iter().zip(&batch.labels) {
            let own = row[label as usize];
            // Rank of the label: classes scoring higher (ties broken by index, as topk).
            let rank = row.iter().enumerate().filter(|&(j, &v)| v > own || (v == own && (j as i64) < label)).count();
            top1 += usize::from(rank == 0);
            top5 += usize::from(rank < 5);
        }
        count += n;
        progress(count);
    }
    Ok([top1 as f64, top5 as f64, loss_sum, count as f64])
}

/// Refuses a loader that does not serve `group`'s rank its shard.
fn check_shard(loader: &Loader, group: &Group) -> Result<()> {
    let shard = loader.shard();
    if (shard.rank, shard.ranks) != (group.rank(), group.size()) {
        bail!(InvalidArgument, "the loader serves shard {} of {}, but this process is rank {} of {}", shard.rank, shard.ranks, group.rank(), group.size());
    }
    Ok(())
}

/// What can embed images: a pre-trained MAE (pooled encoder output) or a classifier
/// (the features its head sees).
pub enum Embedder<'a> {
    Mae(&'a MaskedAutoencoder, Pool),
    Classifier(&'a VitClassifier),
}

/// Features of a whole dataset, in loader order.
pub struct Embeddings {
    /// `[N, D]`, row-major.
    pub features: Vec<f32>,
    pub dim: usize,
    /// Empty when the dataset is unlabelled.
    pub labels: Vec<i64>,
    pub indices: Vec<usize>,
}

/// Embeds every image of `loader`'s first epoch, batch by batch, calling `progress`
/// with the images done so far. Fails with `Aborted` when `cancel` is set. Data-parallel
/// over `group`, each rank embeds its shard and every rank gets them all, in dataset
/// order: exactly one process's embeddings.
pub fn embed_dataset(embedder: &Embedder, loader: &Loader, group: &Group, progress: &mut dyn FnMut(usize), cancel: &AtomicBool) -> Result<Embeddings> {
    check_shard(loader, group)?;
    let local = group.agree(embed_shard(embedder, loader, progress, cancel), "the embedding")?;
    if group.size() == 1 {
        return Ok(local);
    }
    let shards = group.all_gather(&local.to_bytes(), "gathering the embeddings")?;
    Embeddings::merge(shards.iter().map(|bytes| Embeddings::from_bytes(bytes)).collect::<Result<Vec<_>>>()?)
}

fn embed_shard(embedder: &Embedder, loader: &Loader, progress: &mut dyn FnMut(usize), cancel: &AtomicBool) -> Result<Embeddings> {
    let mut out = Embeddings { features: Vec::new(), dim: 0, labels: Vec::new(), indices: Vec::new() };
    for batch in loader.epoch(0, 0) {
        check_cancel(cancel, "embedding")?;
        let batch = batch?;
        if batch.shape[0] == 0 {
            continue;
        }
        let features = match embedder {
            Embedder::Mae(m, pool) => m.embed(&Tensor::from_vec(batch.images, batch.shape.as_slice(), m.device())?, *pool)?,
            Embedder::Classifier(c) => c.embed(&Tensor::from_vec(batch.images, batch.shape.as_slice(), c.device())?)?,
        };
        out.dim = features.dim(1)?;
        out.features.extend(features.flatten_all()?.to_vec1::<f32>()?);
        out.labels.extend(batch.labels);
        out.indices.extend(batch.indices);
        progress(out.indices.len());
    }
    Ok(out)
}

fn check_cancel(cancel: &AtomicBool, what: &str) -> Result<()> {
    if cancel.load(std::sync::atomic::Ordering::SeqCst) {
        bail!(Aborted, "{what} was aborted");
    }
    Ok(())
}

impl Embeddings {
    /// Writes `embeddings` `[N, D]` (f32), `indices` `[N]` and, when labelled, `labels`
    /// `[N]` (both i64) as safetensors, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let n = self.indices.len();
        let device = candle_core::Device::Cpu;
        let mut tensors = vec![
            ("embeddings".to_string(), Tensor::from_slice(&self.features, (n, self.dim), &device)?),
            ("indices".to_string(), Tensor::from_vec(self.indices.iter().map(|&i| i as i64).collect::<Vec<_>>(), n, &device)?),
        ];
        if !self.labels.is_empty() {
            tensors.push(("labels".to_string(), Tensor::from_slice(&self.labels, n, &device)?));
        }
        let bytes = safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None)
            .map_err(|e| Error::new(ErrorCode::Internal, format!("cannot serialise embeddings: {e}")))?;
        crate::checkpoint::write_atomic(path, &bytes)
    }

    /// One rank's share, to gather: rows, dim and whether labelled (u64 each), then the
    /// indices (u64), labels (i64) and features (f32), little-endian.
    fn to_bytes(&self) -> Vec<u8> {
        let n = self.indices.len();
        let mut bytes = Vec::with_capacity(24 + n * 16 + self.features.len() * 4);
        for header in [n as u64, self.dim as u64, u64::from(!self.labels.is_empty())] {
            bytes.extend(header.to_le_bytes());
        }
        bytes.extend(self.indices.iter().flat_map(|&i| (i as u64).to_le_bytes()));
        bytes.extend(self.labels.iter().flat_map(|l| l.to_le_bytes()));
        bytes.extend(self.features.iter().flat_map(|f| f.to_le_bytes()));
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Result<Embeddings> {
        let word = |at: usize| bytes.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        let malformed = || Error::new(ErrorCode::Internal, "a rank sent malformed embeddings");
        let (n, dim, labelled) = (word(0).ok_or_else(malformed)? as usize, word(8).ok_or_else(malformed)? as usize, word(16).ok_or_else(malformed)? == 1);
        let labels_at = 24 + n * 8;
        let features_at = labels_at + if labelled { n * 8 } else { 0 };
        if bytes.len() != features_at + n * dim * 4 {
            return Err(malformed());
        }
        Ok(Embeddings {
            indices: (0..n).map(|i| word(24 + i * 8).map(|v| v as usize).ok_or_else(malformed)).collect::<Result<_>>()?,
            labels: if labelled { (0..n).map(|i| word(labels_at + i * 8).map(|v| v as i64).ok_or_else(malformed)).collect::<Result<_>>()? } else { Vec::new() },
            features: bytes[features_at..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect(),
            dim,
        })
    }

    /// The ranks' shares as one process's embeddings: rows in dataset order.
    fn merge(shards: Vec<Embeddings>) -> Result<Embeddings> {
        let dim = shards.iter().map(|s| s.dim).max().unwrap_or(0);
        let labelled = shards.iter().any(|s| !s.labels.is_empty());
        let mut rows: Vec<(usize, i64, &[f32])> = Vec::new();
        for shard in &shards {
            for (i, &index) in shard.indices.iter().enumerate() {
                rows.push((index, shard.labels.get(i).copied().unwrap_or(0), &shard.features[i * dim..(i + 1) * dim]));
            }
        }
        rows.sort_by_key(|&(index, ..)| index);
        Ok(Embeddings {
            features: rows.iter().flat_map(|&(.., f)| f.iter().copied()).collect(),
            dim,
            labels: if labelled { rows.iter().map(|&(_, l, _)| l).collect() } else { Vec::new() },
            indices: rows.iter().map(|&(i, ..)| i).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::DropPathScales;
    use candle_core::Device;

    /// Per block (attention, then MLP), the scales of each image of a batch drawn from
    /// `drop_path_rngs`.
    fn scales(config: &FinetuneConfig, step: u64, indices: &[usize], blocks: usize) -> Vec<Vec<f32>> {
        let mut rngs = drop_path_rngs(config, step, indices);
        (0..blocks)
            .flat_map(|_| {
                let s = DropPathScales::draw(&mut rngs, 0.5, &Device::Cpu).unwrap();
                [s.attn, s.mlp]
            })
            .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    /// An image's stochastic depth depends on the step and its dataset index only: the
    /// same in any batch and at any place in it (so on any data-parallel rank).
    #[test]
    fn an_image_drops_the_same_branches_in_any_batch_and_place() {
        let config = FinetuneConfig::defaults(Protocol::Finetune);
        let blocks = 6;
        let batch = scales(&config, 3, &[4, 9, 2, 7], blocks);
        let other = scales(&config, 3, &[7, 11, 4], blocks);
        let column = |draws: &[Vec<f32>], at: usize| draws.iter().map(|branch| branch[at]).collect::<Vec<f32>>();
        assert_eq!(column(&other, 0), column(&batch, 3), "image 7");
        assert_eq!(column(&other, 2), column(&batch, 0), "image 4");
        // Over 12 branches at rate 0.5, other keys drop others.
        assert_ne!(column(&batch, 0), column(&batch, 1), "other images");
        assert_ne!(column(&scales(&config, 4, &[4], blocks), 0), column(&batch, 0), "another step");
        let reseeded = FinetuneConfig { recipe: Recipe { seed: 1, ..config.recipe.clone() }, ..config.clone() };
        assert_ne!(column(&scales(&reseeded, 3, &[4], blocks), 0), column(&batch, 0), "another seed");
    }
}
