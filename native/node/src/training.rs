//! Pre-training and reconstruction for the binding. Training runs on a thread of
//! its own; JS pulls its events one at a time with `nextEvent()` (a libuv task
//! that waits on a channel), so nothing blocks the event loop.

use crate::{guarded, host_tensor, parse_json, Coded, CodedTask, NativeMae, NativeMaskOptions, NativeTensor, Shared};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vit_mae_core::data::{Augment, Crop, Dataset, IdxDataset, ImageFolder, InMemoryDataset, Loader, LoaderOptions, RandAugment, Shard};
use vit_mae_core::distributed::{Distributed, Group, DEFAULT_TIMEOUT};
use vit_mae_core::finetune::{embed_dataset, Embedder, Embeddings};
use vit_mae_core::Pool;
use vit_mae_core::train::{self, PretrainConfig, TrainEvent, TrainSummary};
use vit_mae_core::{ErrorCode, HostTensor};

/// Where images come from: `folder` (path), `idx` (path, labelsPath) or `memory` (data, shape, labels).
#[napi(object)]
pub struct NativeDatasetSpec {
    pub kind: String,
    pub path: Option<String>,
    pub labels_path: Option<String>,
    pub data: Option<Float32Array>,
    pub shape: Option<Vec<u32>>,
    pub labels: Option<Vec<i64>>,
}

/// Batching and augmentation.
#[napi(object)]
pub struct NativeLoaderOptions {
    pub batch_size: u32,
    pub seed: i64,
    pub shuffle: bool,
    pub workers: u32,
    pub prefetch: u32,
    pub skip_corrupt: bool,
    /// Leave out an epoch's last incomplete batch (training); default true.
    pub drop_last: Option<bool>,
    /// 'center', 'fixed', 'randomResized' or 'whole'.
    pub crop: String,
    pub crop_fraction: f64,
    pub scale: Vec<f64>,
    pub ratio: Vec<f64>,
    pub hflip: bool,
    /// Brightness, contrast and saturation strengths.
    pub color_jitter: Vec<f64>,
    /// timm's RandAugment string, e.g. 'rand-m9-mstd0.5-inc1'.
    pub rand_augment: Option<String>,
    pub random_erasing: f64,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub pad_to: Option<u32>,
}

fn err(code: ErrorCode, message: impl Into<String>) -> vit_mae_core::Error {
    vit_mae_core::Error::new(code, message)
}

pub(crate) fn open_dataset(spec: &NativeDatasetSpec) -> vit_mae_core::Result<Arc<dyn Dataset>> {
    let path = || spec.path.as_deref().map(Path::new).ok_or_else(|| err(ErrorCode::InvalidArgument, format!("a '{}' dataset needs a path", spec.kind)));
    Ok(match spec.kind.as_str() {
        "folder" => Arc::new(ImageFolder::open(path()?)?),
        "idx" => Arc::new(IdxDataset::open(path()?, spec.labels_path.as_deref().map(Path::new))?),
        "memory" => {
            let (Some(data), Some(shape)) = (&spec.data, &spec.shape) else {
                return Err(err(ErrorCode::InvalidArgument, "an in-memory dataset needs data and shape"));
            };
            let t = host_tensor(data, shape)?;
            let [n, c, h, w] = t.shape[..] else {
                return Err(err(ErrorCode::InvalidShape, format!("in-memory images must be [N, C, H, W], got {:?}", t.shape)));
            };
            Arc::new(InMemoryDataset::new(t.data, [n, c, h, w], spec.labels.clone())?)
        }
        other => return Err(err(ErrorCode::InvalidArgument, format!("unknown dataset kind '{other}': expected folder, idx or memory"))),
    })
}

/// The augmentation `o` describes, for images of `img_size` and `channels`.
pub(crate) fn augment_of(o: &NativeLoaderOptions, img_size: usize, channels: usize) -> vit_mae_core::Result<Augment> {
    let pair = |v: &[f64], name: &str| match v {
        [a, b] => Ok((*a, *b)),
        _ => Err(err(ErrorCode::InvalidArgument, format!("{name} must be [min, max]"))),
    };
    let crop = match o.crop.as_str() {
        "center" => Crop::Center,
        "fixed" => Crop::Fixed,
        "randomResized" => Crop::RandomResized,
        "whole" => Crop::Whole,
        other => return Err(err(ErrorCode::InvalidArgument, format!("unknown crop '{other}': expected center, fixed, randomResized or whole"))),
    };
    let [brightness, contrast, saturation] = o.color_jitter[..] else {
        return Err(err(ErrorCode::InvalidArgument, "colorJitter must be [brightness, contrast, saturation]"));
    };
    Ok(Augment {
        img_size,
        channels,
        pad_to: o.pad_to.map(|p| p as usize),
        crop,
        crop_fraction: o.crop_fraction,
        scale: pair(&o.scale, "scale")?,
        ratio: pair(&o.ratio, "ratio")?,
        hflip: o.hflip,
        color_jitter: [brightness, contrast, saturation],
        rand_augment: o.rand_augment.as_deref().map(RandAugment::parse).transpose()?,
        random_erasing: o.random_erasing,
        mean: o.mean.iter().map(|&v| v as f32).collect(),
        std: o.std.iter().map(|&v| v as f32).collect(),
    })
}

pub(crate) fn make_loader(dataset: Arc<dyn Dataset>, o: &NativeLoaderOptions, img_size: usize, channels: usize) -> vit_mae_core::Result<Loader> {
    let augment = augment_of(o, img_size, channels)?;
    let seed = u64::try_from(o.seed).map_err(|_| err(ErrorCode::InvalidArgument, "seed must be non-negative"))?;
    let options = LoaderOptions {
        batch_size: o.batch_size as usize,
        seed,
        shuffle: o.shuffle,
        drop_last: o.drop_last.unwrap_or(true),
        workers: o.workers as usize,
        prefetch: o.prefetch as usize,
        skip_corrupt: o.skip_corrupt,
        shard: Shard::default(),
    };
    Loader::new(dataset, augment, options)
}

/// Whether and how a job works with other processes.
#[napi(object)]
pub struct NativeDistributedOptions {
    /// 'auto' (join the MPI job this process was launched in, if any), 'mpi' or 'none'.
    pub kind: String,
    /// How long a collective waits for the other ranks, in seconds.
    pub timeout_seconds: f64,
}

/// A job's distributed options, checked before the job starts.
pub(crate) struct DistributedSpec {
    kind: Distributed,
    timeout: Duration,
}

/// Set while a job of several ranks runs in this process: the collectives of two such
/// jobs would interleave on the one MPI communicator.
static GROUP_IN_USE: AtomicBool = AtomicBool::new(false);

/// A job's hold on the process's group of several ranks; released when dropped.
pub(crate) struct GroupClaim(bool);

impl Drop for GroupClaim {
    fn drop(&mut self) {
        if self.0 {
            GROUP_IN_USE.store(false, Ordering::SeqCst);
        }
    }
}

impl DistributedSpec {
    pub(crate) fn parse(options: Option<&NativeDistributedOptions>) -> vit_mae_core::Result<Self> {
        let Some(o) = options else { return Ok(DistributedSpec { kind: Distributed::Auto, timeout: DEFAULT_TIMEOUT }) };
        if !(o.timeout_seconds.is_finite() && o.timeout_seconds > 0.0) {
            return Err(err(ErrorCode::InvalidArgument, format!("distributedTimeout must be a number of seconds above 0, got {}", o.timeout_seconds)));
        }
        Ok(DistributedSpec { kind: Distributed::parse(&o.kind)?, timeout: Duration::from_secs_f64(o.timeout_seconds) })
    }

    /// Joins the processes working together, on the job's thread (MPI's start and the
    /// first collective wait for the other ranks), reports them as the job's first
    /// event, and holds the group for this job; with it, `loader` serving this rank's shard.
    pub(crate) fn join(&self, loader: &Loader, on_event: &mut dyn FnMut(NativeJobEvent)) -> vit_mae_core::Result<(Group, GroupClaim, Loader)> {
        let group = Group::join(self.kind, self.timeout)?;
        let claim = GroupClaim(group.size() > 1);
        if claim.0 && GROUP_IN_USE.swap(true, Ordering::SeqCst) {
            std::mem::forget(claim);
            return Err(err(ErrorCode::Busy, "another job of several ranks is running in this process: their collectives would interleave; run one at a time"));
        }
        on_event(NativeJobEvent::Started { rank: group.rank() as u32, world_size: group.size() as u32, local_rank: group.local_rank() as u32, backend: group.backend().to_string() });
        let loader = loader.sharded(Shard { rank: group.rank(), ranks: group.size() })?;
        Ok((group, claim, loader))
    }
}

/// What a job reports: one variant per kind of event, told apart by `type` in
/// JavaScript. A job's first event is `started`, its last `trained`, `evaluated` or
/// `embedded`.
#[napi(discriminant = "type", discriminant_case = "camelCase")]
pub enum NativeJobEvent {
    /// The job started: this process's rank among `worldSize` working together (0 of 1
    /// alone), its index among those on its machine, and the backend ('none' or 'mpi').
    Started { rank: u32, world_size: u32, local_rank: u32, backend: String },
    /// A training step finished.
    Step { epoch: u32, step: f64, total_steps: f64, loss: f64, lr: f64, images_per_sec: f64, eta_seconds: f64 },
    /// A training checkpoint was written.
    Checkpoint { step: f64, path: String },
    /// Unreadable images were left out of a batch; `message` is the first one's error.
    Skipped { step: f64, count: u32, message: String },
    /// A training epoch finished.
    EpochEnd { epoch: u32, mean_loss: f64 },
    /// Accuracy on the evaluation set after a fine-tuning epoch.
    Eval { epoch: u32, top1: f64, top5: f64, loss: f64 },
    /// A PCA target's basis was fitted before the first step: `components` axes keeping
    /// the fraction `keptVariance` of the variance of `patches` patches of `images` images.
    PcaBasis { components: u32, kept_variance: f64, images: u32, patches: f64 },
    /// Images done of a pass over a dataset (evaluation, embedding).
    Progress { images: u32, total_images: u32 },
    /// A training run ended.
    Trained { summary: NativeTrainSummary },
    /// An evaluation ended.
    Evaluated { evaluation: NativeEvaluation },
    /// An embedding pass ended; `takeEmbeddings()` gives its result.
    Embedded,
}

#[napi(object)]
#[derive(Clone)]
pub struct NativeEvaluation {
    pub top1: f64,
    pub top5: f64,
    pub loss: f64,
    pub count: u32,
}

#[napi(object)]
#[derive(Clone)]
pub struct NativeTrainSummary {
    pub steps: f64,
    pub epochs_completed: u32,
    pub final_loss: f64,
    pub images_seen: f64,
    pub seconds: f64,
    pub aborted: bool,
    pub last_checkpoint: Option<String>,
    pub skipped_images: u32,
}

enum Message {
    Event(NativeJobEvent),
    Done(vit_mae_core::Result<NativeJobEvent>),
}

/// A count of images done, for evaluation and embedding jobs.
pub(crate) fn progress_event(done: usize, total: usize) -> NativeJobEvent {
    NativeJobEvent::Progress { images: done as u32, total_images: total as u32 }
}

pub(crate) fn trained_event(summary: TrainSummary) -> NativeJobEvent {
    NativeJobEvent::Trained {
        summary: NativeTrainSummary {
            steps: summary.steps as f64,
            epochs_completed: summary.epochs_completed as u32,
            final_loss: summary.final_loss,
            images_seen: summary.images_seen as f64,
            seconds: summary.seconds,
            aborted: summary.aborted,
            last_checkpoint: summary.last_checkpoint.map(|p| p.display().to_string()),
            skipped_images: summary.skipped_images as u32,
        },
    }
}

pub(crate) fn evaluated_event(e: vit_mae_core::finetune::Evaluation) -> NativeJobEvent {
    NativeJobEvent::Evaluated { evaluation: NativeEvaluation { top1: e.top1, top5: e.top5, loss: e.loss, count: e.count as u32 } }
}

pub(crate) fn to_native(event: TrainEvent) -> NativeJobEvent {
    match event {
        TrainEvent::Step { epoch, step, total_steps, loss, lr, images_per_sec, eta_seconds } => NativeJobEvent::Step {
            epoch: epoch as u32,
            step: step as f64,
            total_steps: total_steps as f64,
            loss,
            lr,
            images_per_sec,
            eta_seconds,
        },
        TrainEvent::Checkpoint { step, path } => NativeJobEvent::Checkpoint { step: step as f64, path: path.display().to_string() },
        TrainEvent::Skipped { step, count, first } => NativeJobEvent::Skipped { step: step as f64, count: count as u32, message: first },
        TrainEvent::EpochEnd { epoch, mean_loss } => NativeJobEvent::EpochEnd { epoch: epoch as u32, mean_loss },
        TrainEvent::Eval { epoch, top1, top5, loss } => NativeJobEvent::Eval { epoch: epoch as u32, top1, top5, loss },
        TrainEvent::PcaBasis { components, kept_variance, images, patches } => {
            NativeJobEvent::PcaBasis { components: components as u32, kept_variance, images: images as u32, patches: patches as f64 }
        }
    }
}

/// Long work on a thread of its own (training, evaluation, embedding): JS pulls
/// its events with `nextEvent()` and may `abort()` it.
#[napi]
pub struct NativeJob {
    events: Arc<Mutex<Receiver<Message>>>,
    cancel: Arc<AtomicBool>,
    output: Arc<Mutex<Option<Embeddings>>>,
}

#[napi]
impl NativeJob {
    /// The next event; the last one is `trained`, `evaluated` or `embedded` (or the
    /// promise rejects with the job's error).
    #[napi(ts_return_type = "Promise<NativeJobEvent>")]
    pub fn next_event(&self) -> AsyncTask<Coded<NextEventTask>> {
        AsyncTask::new(Coded(NextEventTask { events: self.events.clone() }))
    }

    /// Asks the job to stop: training stops after the current step and writes a
    /// checkpoint; evaluation and embedding fail with E_ABORTED.
    #[napi]
    pub fn abort(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// The embeddings of a finished embedding job (once).
    #[napi]
    pub fn take_embeddings(&self) -> Option<NativeEmbeddings> {
        let embeddings = self.output.lock().ok()?.take()?;
        let n = embeddings.indices.len() as u32;
        Some(NativeEmbeddings {
            features: NativeTensor { data: Float32Array::new(embeddings.features), shape: vec![n, embeddings.dim as u32] },
            labels: (!embeddings.labels.is_empty()).then(|| embeddings.labels.iter().map(|&l| l as i32).collect()),
            indices: embeddings.indices.iter().map(|&i| i as u32).collect(),
        })
    }
}

#[napi(object)]
pub struct NativeEmbeddings {
    pub features: NativeTensor,
    pub labels: Option<Vec<i32>>,
    pub indices: Vec<u32>,
}

/// Runs `work` on a named thread, forwarding its events; a panic becomes an internal error.
pub(crate) fn spawn_job(
    name: &str,
    output: Arc<Mutex<Option<Embeddings>>>,
    work: impl FnOnce(&mut dyn FnMut(NativeJobEvent), &AtomicBool) -> vit_mae_core::Result<NativeJobEvent> + Send + 'static,
) -> Result<NativeJob, ErrorCode> {
    let (tx, rx) = channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let stop = cancel.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let events = tx.clone();
            let mut on_event = |e: NativeJobEvent| {
                let _ = events.send(Message::Event(e));
            };
            let result = guarded_core(|| work(&mut on_event, &stop));
            let _ = tx.send(Message::Done(result));
        })
        .map_err(|e| crate::to_napi(err(ErrorCode::Internal, format!("cannot start a worker thread: {e}"))))?;
    Ok(NativeJob { events: Arc::new(Mutex::new(rx)), cancel, output })
}

pub struct NextEventTask {
    events: Arc<Mutex<Receiver<Message>>>,
}

impl CodedTask for NextEventTask {
    type Output = NativeJobEvent;
    type JsValue = NativeJobEvent;

    fn compute(&mut self) -> Result<NativeJobEvent, ErrorCode> {
        guarded(|| {
            let events = self.events.lock().map_err(|_| err(ErrorCode::Internal, "event channel poisoned"))?;
            match events.recv() {
                Ok(Message::Event(e)) => Ok(e),
                Ok(Message::Done(result)) => result,
                Err(_) => Err(err(ErrorCode::InvalidArgument, "the job has already finished")),
            }
        })
    }

    fn resolve(&mut self, _env: Env, output: NativeJobEvent) -> Result<NativeJobEvent> {
        Ok(output)
    }
}

#[napi]
impl NativeMae {
    /// Starts pre-training on a thread of its own.
    #[napi]
    pub fn pretrain(
        &self,
        dataset: NativeDatasetSpec,
        loader: NativeLoaderOptions,
        config_json: String,
        resume: Option<String>,
        distributed: Option<NativeDistributedOptions>,
    ) -> Result<NativeJob, ErrorCode> {
        let model = self.model.clone();
        let (config, loader, distributed) = guarded(|| {
            let config = PretrainConfig::from_json(&parse_json(&config_json, "training options")?)?;
            let c = model.read()?.config.clone();
            let loader = make_loader(open_dataset(&dataset)?, &loader, c.img_size, c.in_chans)?;
            Ok((config, loader, DistributedSpec::parse(distributed.as_ref())?))
        })?;
        let claim = guarded(|| model.claim())?;
        spawn_job("vit-mae-train", Arc::default(), move |on_event, cancel| {
            let (group, _group_claim, loader) = distributed.join(&loader, on_event)?;
            let resume = resume.as_deref().map(PathBuf::from);
            let summary = train::pretrain(&mut *claim.model()?, &loader, &config, resume.as_deref(), &group, &mut |e| on_event(to_native(e)), cancel)?;
            drop(claim);
            Ok(trained_event(summary))
        })
    }

    /// Embeds a whole dataset with the encoder (pooled 'mean' or 'cls'); writes the
    /// embeddings to `output` (safetensors) when given.
    #[napi]
    pub fn embed_dataset(
        &self,
        dataset: NativeDatasetSpec,
        loader: NativeLoaderOptions,
        pool: String,
        output: Option<String>,
        distributed: Option<NativeDistributedOptions>,
    ) -> Result<NativeJob, ErrorCode> {
        let model = self.model.clone();
        let (loader, pool, distributed) = guarded(|| {
            let c = model.read()?.config.clone();
            Ok((make_loader(open_dataset(&dataset)?, &loader, c.img_size, c.in_chans)?, Pool::parse(&pool)?, DistributedSpec::parse(distributed.as_ref())?))
        })?;
        let slot: Arc<Mutex<Option<Embeddings>>> = Arc::default();
        let result = slot.clone();
        spawn_job("vit-mae-embed", slot, move |on_event, cancel| {
            let (group, _group_claim, loader) = distributed.join(&loader, on_event)?;
            let model = model.read()?;
            embed_job(&Embedder::Mae(&model, pool), &loader, &group, output, &result, on_event, cancel)
        })
    }

    /// The published visualisation: masked input, reconstruction, reconstruction with the visible patches.
    #[napi(ts_return_type = "Promise<NativeReconstruction>")]
    pub fn reconstruct(&self, images: Float32Array, shape: Vec<u32>, options: NativeMaskOptions) -> Result<AsyncTask<Coded<ReconstructTask>>, ErrorCode> {
        let input = guarded(|| Ok((host_tensor(&images, &shape)?, options.to_core()?)))?;
        Ok(AsyncTask::new(Coded(ReconstructTask { model: self.model.clone(), images: input.0, options: input.1 })))
    }
}

/// `guarded` for code that stays in Rust: a panic becomes an internal error.
fn guarded_core<T>(f: impl FnOnce() -> vit_mae_core::Result<T>) -> vit_mae_core::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| Err(err(ErrorCode::Internal, "internal error in the training thread (please report)")))
}

#[napi(object)]
pub struct NativeReconstruction {
    pub loss: f64,
    pub mask: NativeTensor,
    pub masked: NativeTensor,
    pub reconstruction: NativeTensor,
    pub pasted: NativeTensor,
}

pub struct ReconstructTask {
    model: Shared,
    images: HostTensor,
    options: vit_mae_core::MaskOptions,
}

impl CodedTask for ReconstructTask {
    type Output = (f64, [HostTensor; 4]);
    type JsValue = NativeReconstruction;

    fn compute(&mut self) -> Result<Self::Output, ErrorCode> {
        guarded(|| {
            let model = self.model.read()?;
            let imgs = model.images_to_tensor(&self.images)?;
            let r = model.reconstruct(&imgs, &self.options)?;
            Ok((
                r.loss as f64,
                [HostTensor::from_tensor(&r.mask)?, HostTensor::from_tensor(&r.masked)?, HostTensor::from_tensor(&r.reconstruction)?, HostTensor::from_tensor(&r.pasted)?],
            ))
        })
    }

    fn resolve(&mut self, _env: Env, (loss, [mask, masked, reconstruction, pasted]): Self::Output) -> Result<NativeReconstruction> {
        Ok(NativeReconstruction {
            loss,
            mask: NativeTensor::from_host(mask),
            masked: NativeTensor::from_host(masked),
            reconstruction: NativeTensor::from_host(reconstruction),
            pasted: NativeTensor::from_host(pasted),
        })
    }
}

/// Loads `count` images starting at `start` (in dataset order), augmented and normalised as `loader` says.
#[napi(ts_return_type = "Promise<NativeTensor>")]
pub fn load_images(dataset: NativeDatasetSpec, loader: NativeLoaderOptions, img_size: u32, channels: u32, start: u32, count: u32) -> Result<AsyncTask<Coded<LoadImagesTask>>, ErrorCode> {
    let dataset = guarded(|| open_dataset(&dataset))?;
    let loader = guarded(|| {
        let mut o = loader;
        o.batch_size = count.max(1);
        o.shuffle = false;
        make_loader(dataset, &o, img_size as usize, channels as usize)
    })?;
    Ok(AsyncTask::new(Coded(LoadImagesTask { loader, start: start as usize, count: count as usize })))
}

pub struct LoadImagesTask {
    loader: Loader,
    start: usize,
    count: usize,
}

impl CodedTask for LoadImagesTask {
    type Output = HostTensor;
    type JsValue = NativeTensor;

    fn compute(&mut self) -> Result<HostTensor, ErrorCode> {
        guarded(|| {
            if self.count == 0 || self.start % self.count != 0 {
                return Err(err(ErrorCode::InvalidArgument, "start must be a multiple of count, and count positive"));
            }
            match self.loader.epoch(0, self.start / self.count).next() {
                Some(batch) => {
                    let batch = batch?;
                    HostTensor::new(batch.images, batch.shape.to_vec())
                }
                None => Err(err(ErrorCode::InvalidArgument, format!("the dataset has fewer than {} images", self.start + self.count))),
            }
        })
    }

    fn resolve(&mut self, _env: Env, output: HostTensor) -> Result<NativeTensor> {
        Ok(NativeTensor::from_host(output))
    }
}

/// Creates a folder if needed and checks that files can be written there (an `E_IO`
/// naming it otherwise), so that a command fails before its work rather than after.
#[napi]
pub fn check_writable_folder(path: String) -> Result<(), ErrorCode> {
    guarded(|| vit_mae_core::checkpoint::check_writable_folder(Path::new(&path)))
}

/// Encodes the reconstruction PNG grid (masked | reconstruction | pasted | original
/// rows), writes it to `path` when one is given, and returns its bytes.
#[napi(ts_return_type = "Promise<Buffer>")]
pub fn reconstruction_grid(
    path: Option<String>,
    masked: NativeTensor,
    reconstruction: NativeTensor,
    pasted: NativeTensor,
    originals: NativeTensor,
    mean: Vec<f64>,
    std: Vec<f64>,
) -> Result<AsyncTask<Coded<GridTask>>, ErrorCode> {
    let tensors = guarded(|| {
        Ok([&masked, &reconstruction, &pasted, &originals].map(|t| host_tensor(&t.data, &t.shape)).into_iter().collect::<vit_mae_core::Result<Vec<_>>>()?)
    })?;
    let to_f32 = |v: Vec<f64>| v.iter().map(|&v| v as f32).collect();
    Ok(AsyncTask::new(Coded(GridTask { path: path.map(PathBuf::from), tensors, mean: to_f32(mean), std: to_f32(std) })))
}

pub struct GridTask {
    path: Option<PathBuf>,
    tensors: Vec<HostTensor>,
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl CodedTask for GridTask {
    type Output = Vec<u8>;
    type JsValue = Buffer;

    fn compute(&mut self) -> Result<Vec<u8>, ErrorCode> {
        guarded(|| {
            let device = vit_mae_core::candle_core::Device::Cpu;
            let t = self.tensors.iter().map(|t| t.to_tensor(&device)).collect::<vit_mae_core::Result<Vec<_>>>()?;
            let png = vit_mae_core::visualize::reconstruction_grid_png([&t[0], &t[1], &t[2], &t[3]], &self.mean, &self.std)?;
            if let Some(path) = &self.path {
                vit_mae_core::checkpoint::write_atomic(path, &png)?;
            }
            Ok(png)
        })
    }

    fn resolve(&mut self, _env: Env, png: Vec<u8>) -> Result<Buffer> {
        Ok(png.into())
    }
}

/// Embeds `loader`'s images, reporting progress, then keeps the result for
/// `takeEmbeddings()` and writes it to `output` if given (whose folder is created, and
/// checked before the pass).
pub(crate) fn embed_job(
    embedder: &Embedder,
    loader: &Loader,
    group: &Group,
    output: Option<String>,
    result: &Mutex<Option<Embeddings>>,
    on_event: &mut dyn FnMut(NativeJobEvent),
    cancel: &AtomicBool,
) -> vit_mae_core::Result<NativeJobEvent> {
    // Rank 0 alone writes the file, which holds every rank's embeddings.
    let output = output.filter(|_| group.rank() == 0);
    let writable = output.as_deref().map_or(Ok(()), |path| {
        // Before the pass, not after it: a folder that cannot take the file fails at once.
        let folder = Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        vit_mae_core::checkpoint::check_writable_folder(folder)
    });
    group.agree(writable, "checking the output folder")?;
    let total = loader.images_per_epoch();
    let embeddings = embed_dataset(embedder, loader, group, &mut |done| on_event(progress_event(done, total)), cancel)?;
    group.agree(output.as_deref().map_or(Ok(()), |path| embeddings.save(Path::new(path))), "writing the embeddings")?;
    *result.lock().map_err(|_| err(ErrorCode::Internal, "result slot poisoned"))? = Some(embeddings);
    Ok(NativeJobEvent::Embedded)
}
