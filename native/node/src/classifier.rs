//! The classifier for the binding: built from a pre-trained MAE or loaded, used for
//! prediction, embedding and evaluation, and trained by the fine-tuning protocols.

use crate::training::{embed_job, evaluated_event, DistributedSpec, NativeDistributedOptions, make_loader, open_dataset, progress_event, spawn_job, to_native, trained_event, NativeDatasetSpec, NativeJob, NativeLoaderOptions};
use crate::{guarded, host_tensor, parse_json, seed_of, Coded, CodedTask, NativeMae, NativeNamedShape, NativeNamedTensor, NativeTensor};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::path::PathBuf;
use vit_mae_core::data::Shard;
use crate::cell::{named_shapes, Cell};
use std::sync::Arc;
use vit_mae_core::classifier::{config_fields, load_classifier, save_classifier, ClassifierConfig, VitClassifier};
use vit_mae_core::finetune::{evaluate, finetune, Embedder, FinetuneConfig};
use vit_mae_core::{DeviceSpec, ErrorCode, HostTensor, Precision};

type SharedClassifier = crate::cell::Shared<VitClassifier>;

fn err(code: ErrorCode, message: impl Into<String>) -> vit_mae_core::Error {
    vit_mae_core::Error::new(code, message)
}

/// A ViT classifier living in Rust memory.
#[napi]
pub struct NativeClassifier {
    model: SharedClassifier,
    checkpoint_format: Option<String>,
}

#[napi]
impl NativeClassifier {
    /// A classifier on `mae`'s encoder. `options_json`: numClasses, globalPool,
    /// headBatchNorm, imgSize (all but numClasses optional).
    #[napi(factory)]
    pub fn from_mae(mae: &NativeMae, options_json: String, seed: i64) -> Result<NativeClassifier, ErrorCode> {
        guarded(|| {
            let mae = mae.model.read()?;
            let mut fields = serde_json::to_value(ClassifierConfig::from_encoder(&mae.config, 0, true, false))
                .map_err(|e| err(ErrorCode::Internal, e.to_string()))?
                .as_object()
                .cloned()
                .unwrap_or_default();
            fields.extend(config_fields(&parse_json(&options_json, "classifier options")?, true)?);
            let config = ClassifierConfig::from_fields(fields)?;
            let classifier = VitClassifier::from_encoder(&mae, config, seed_of(seed)?)?;
            Ok(NativeClassifier { model: Cell::new(classifier), checkpoint_format: None })
        })
    }

    /// A freshly initialised classifier (training from scratch) from a complete config.
    #[napi(factory)]
    pub fn create(config_json: String, seed: i64, device: String, precision: String) -> Result<NativeClassifier, ErrorCode> {
        guarded(|| {
            let config = ClassifierConfig::from_fields(config_fields(&parse_json(&config_json, "config")?, true)?)?;
            let device = DeviceSpec::parse(&device)?.resolve()?;
            Ok(NativeClassifier { model: Cell::new(VitClassifier::new(config, &device, Precision::parse(&precision)?, seed_of(seed)?)?), checkpoint_format: None })
        })
    }

    /// Loads a classifier checkpoint (`.pth` or safetensors).
    #[napi(ts_return_type = "Promise<NativeClassifier>")]
    pub fn load(path: String, config_json: Option<String>, seed: i64, device: String, precision: String) -> AsyncTask<Coded<LoadClassifierTask>> {
        AsyncTask::new(Coded(LoadClassifierTask { path: PathBuf::from(path), config_json, seed, device, precision }))
    }

    /// The config as camelCase JSON.
    #[napi(getter)]
    pub fn config_json(&self) -> String {
        self.model.facts.config_json.clone()
    }

    /// Frees the native weights (see `Cell::dispose`); later calls get E_DISPOSED.
    #[napi]
    pub fn dispose(&self) -> Result<(), ErrorCode> {
        guarded(|| self.model.dispose())
    }

    #[napi(getter)]
    pub fn parameter_count(&self) -> f64 {
        self.model.facts.parameter_count
    }

    #[napi(getter)]
    pub fn checkpoint_format(&self) -> Option<String> {
        self.checkpoint_format.clone()
    }

    #[napi(getter)]
    pub fn device(&self) -> String {
        self.model.facts.device.clone()
    }

    #[napi(getter)]
    pub fn precision(&self) -> String {
        self.model.facts.precision.clone()
    }

    #[napi]
    pub fn parameter_shapes(&self) -> Vec<NativeNamedShape> {
        named_shapes(&self.model.facts)
    }

    /// `kind`: 'logits' | 'embed' | 'predict' | 'gradients'.
    fn task(&self, kind: Compute, images: Float32Array, shape: Vec<u32>) -> Result<AsyncTask<Coded<ClassifierTask>>, ErrorCode> {
        let images = guarded(|| host_tensor(&images, &shape))?;
        Ok(AsyncTask::new(Coded(ClassifierTask { model: self.model.clone(), images, kind })))
    }

    /// Logits `[N, numClasses]` (evaluation mode).
    #[napi(ts_return_type = "Promise<NativeClassifierOutput>")]
    pub fn forward(&self, images: Float32Array, shape: Vec<u32>) -> Result<AsyncTask<Coded<ClassifierTask>>, ErrorCode> {
        self.task(Compute::Logits, images, shape)
    }

    /// Features `[N, D]`: what the head sees.
    #[napi(ts_return_type = "Promise<NativeClassifierOutput>")]
    pub fn embed(&self, images: Float32Array, shape: Vec<u32>) -> Result<AsyncTask<Coded<ClassifierTask>>, ErrorCode> {
        self.task(Compute::Embed, images, shape)
    }

    /// Dense features of the encoder, as `NativeMae::feature_maps`.
    #[napi(ts_return_type = "Promise<NativeFeatureMaps>")]
    pub fn feature_maps(&self, images: Float32Array, shape: Vec<u32>, layers: Vec<i64>, pyramid: bool) -> Result<AsyncTask<Coded<crate::features::FeatureMapsTask<VitClassifier>>>, ErrorCode> {
        crate::features::feature_maps_task(&self.model, images, shape, layers, pyramid)
    }

    /// Probabilities and the top classes.
    #[napi(ts_return_type = "Promise<NativeClassifierOutput>")]
    pub fn predict(&self, images: Float32Array, shape: Vec<u32>) -> Result<AsyncTask<Coded<ClassifierTask>>, ErrorCode> {
        self.task(Compute::Predict, images, shape)
    }

    /// The label-smoothed cross-entropy and every parameter's gradient.
    #[napi(ts_return_type = "Promise<NativeClassifierOutput>")]
    pub fn loss_and_gradients(&self, images: Float32Array, shape: Vec<u32>, labels: Vec<i64>, smoothing: f64) -> Result<AsyncTask<Coded<ClassifierTask>>, ErrorCode> {
        self.task(Compute::Gradients { labels, smoothing }, images, shape)
    }

    /// Top-1/top-5 accuracy on a labelled dataset.
    #[napi]
    pub fn evaluate(&self, dataset: NativeDatasetSpec, loader: NativeLoaderOptions, distributed: Option<NativeDistributedOptions>) -> Result<NativeJob, ErrorCode> {
        let model = self.model.clone();
        let (loader, distributed) = guarded(|| {
            let c = model.read()?.config.clone();
            Ok((make_loader(open_dataset(&dataset)?, &loader, c.img_size, c.in_chans)?, DistributedSpec::parse(distributed.as_ref())?))
        })?;
        spawn_job("vit-mae-eval", Arc::default(), move |on_event, cancel| {
            let (group, _group_claim, loader) = distributed.join(&loader, on_event)?;
            let total = loader.images_per_epoch();
            let e = evaluate(&*model.read()?, &loader, &group, &mut |done| on_event(progress_event(done, total)), cancel)?;
            Ok(evaluated_event(e))
        })
    }

    /// Embeds a whole dataset; writes the embeddings to `output` when given.
    #[napi]
    pub fn embed_dataset(&self, dataset: NativeDatasetSpec, loader: NativeLoaderOptions, output: Option<String>, distributed: Option<NativeDistributedOptions>) -> Result<NativeJob, ErrorCode> {
        let model = self.model.clone();
        let (loader, distributed) = guarded(|| {
            let c = model.read()?.config.clone();
            Ok((make_loader(open_dataset(&dataset)?, &loader, c.img_size, c.in_chans)?, DistributedSpec::parse(distributed.as_ref())?))
        })?;
        let slot: Arc<std::sync::Mutex<Option<vit_mae_core::finetune::Embeddings>>> = Arc::default();
        let result = slot.clone();
        spawn_job("vit-mae-embed", slot, move |on_event, cancel| {
            let (group, _group_claim, loader) = distributed.join(&loader, on_event)?;
            let model = model.read()?;
            embed_job(&Embedder::Classifier(&model), &loader, &group, output, &result, on_event, cancel)
        })
    }

    /// Trains by a protocol (`config_json` holds `protocol` and the recipe), evaluating
    /// on the evaluation set after every epoch when one is given.
    #[napi]
    pub fn finetune(
        &self,
        dataset: NativeDatasetSpec,
        loader: NativeLoaderOptions,
        eval_dataset: Option<NativeDatasetSpec>,
        eval_loader: Option<NativeLoaderOptions>,
        config_json: String,
        resume: Option<String>,
        distributed: Option<NativeDistributedOptions>,
    ) -> Result<NativeJob, ErrorCode> {
        let model = self.model.clone();
        let (config, loader, eval_loader, distributed) = guarded(|| {
            let config = FinetuneConfig::from_json(&parse_json(&config_json, "fine-tuning options")?)?;
            let c = model.read()?.config.clone();
            let loader = make_loader(open_dataset(&dataset)?, &loader, c.img_size, c.in_chans)?;
            let eval_loader = match (&eval_dataset, &eval_loader) {
                (Some(d), Some(o)) => Some(make_loader(open_dataset(d)?, o, c.img_size, c.in_chans)?),
                _ => None,
            };
            Ok((config, loader, eval_loader, DistributedSpec::parse(distributed.as_ref())?))
        })?;
        let claim = guarded(|| model.claim())?;
        spawn_job("vit-mae-finetune", Arc::default(), move |on_event, cancel| {
            let (group, _group_claim, loader) = distributed.join(&loader, on_event)?;
            let eval_loader = eval_loader.map(|l| l.sharded(Shard { rank: group.rank(), ranks: group.size() })).transpose()?;
            let resume = resume.as_deref().map(PathBuf::from);
            let summary = finetune(&*claim.model()?, &loader, eval_loader.as_ref(), &config, resume.as_deref(), &group, &mut |e| on_event(to_native(e)), cancel)?;
            drop(claim);
            Ok(trained_event(summary))
        })
    }

    /// Writes safetensors in the published layout, atomically.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn save(&self, path: String) -> AsyncTask<Coded<SaveClassifierTask>> {
        AsyncTask::new(Coded(SaveClassifierTask { model: self.model.clone(), path: PathBuf::from(path) }))
    }
}

pub struct LoadClassifierTask {
    path: PathBuf,
    config_json: Option<String>,
    seed: i64,
    device: String,
    precision: String,
}

impl CodedTask for LoadClassifierTask {
    type Output = (VitClassifier, String);
    type JsValue = NativeClassifier;

    fn compute(&mut self) -> Result<Self::Output, ErrorCode> {
        guarded(|| {
            let explicit = self.config_json.as_deref().map(|j| parse_json(j, "config")).transpose()?;
            let device = DeviceSpec::parse(&self.device)?.resolve()?;
            let (classifier, state) = load_classifier(&self.path, explicit.as_ref(), &device, Precision::parse(&self.precision)?, seed_of(self.seed)?)?;
            Ok((classifier, state.format.as_str().to_string()))
        })
    }

    fn resolve(&mut self, _env: Env, (classifier, format): Self::Output) -> Result<NativeClassifier> {
        Ok(NativeClassifier { model: Cell::new(classifier), checkpoint_format: Some(format) })
    }
}

pub enum Compute {
    Logits,
    Embed,
    Predict,
    Gradients { labels: Vec<i64>, smoothing: f64 },
}

/// One of the classifier's per-batch computations; fields are set by kind.
#[napi(object)]
pub struct NativeClassifierOutput {
    pub tensor: Option<NativeTensor>,
    pub top: Option<Vec<Vec<u32>>>,
    pub loss: Option<f64>,
    pub gradients: Option<Vec<NativeNamedTensor>>,
}

pub struct ClassifierTask {
    model: SharedClassifier,
    images: HostTensor,
    kind: Compute,
}

pub struct ClassifierResult {
    tensor: Option<HostTensor>,
    top: Option<Vec<Vec<u32>>>,
    loss: Option<f64>,
    gradients: Option<Vec<(String, HostTensor)>>,
}

impl CodedTask for ClassifierTask {
    type Output = ClassifierResult;
    type JsValue = NativeClassifierOutput;

    fn compute(&mut self) -> Result<ClassifierResult, ErrorCode> {
        guarded(|| {
            let model = self.model.read()?;
            let imgs = model.images_to_tensor(&self.images)?;
            let none = ClassifierResult { tensor: None, top: None, loss: None, gradients: None };
            Ok(match &self.kind {
                Compute::Logits => ClassifierResult { tensor: Some(HostTensor::from_tensor(&model.forward(&imgs)?.detach())?), ..none },
                Compute::Embed => ClassifierResult { tensor: Some(HostTensor::from_tensor(&model.embed(&imgs)?)?), ..none },
                Compute::Predict => {
                    let p = model.predict(&imgs)?;
                    ClassifierResult { tensor: Some(HostTensor::from_tensor(&p.probabilities)?), top: Some(p.top), ..none }
                }
                Compute::Gradients { labels, smoothing } => {
                    if !(0.0..1.0).contains(smoothing) {
                        return Err(err(ErrorCode::InvalidArgument, format!("labelSmoothing must be in [0, 1), got {smoothing}")));
                    }
                    let (loss, grads) = model.loss_and_gradients(&imgs, labels, *smoothing)?;
                    let grads = grads.into_iter().map(|(n, g)| Ok((n, HostTensor::from_tensor(&g)?))).collect::<vit_mae_core::Result<_>>()?;
                    ClassifierResult { loss: Some(loss as f64), gradients: Some(grads), ..none }
                }
            })
        })
    }

    fn resolve(&mut self, _env: Env, r: ClassifierResult) -> Result<NativeClassifierOutput> {
        Ok(NativeClassifierOutput {
            tensor: r.tensor.map(NativeTensor::from_host),
            top: r.top,
            loss: r.loss,
            gradients: r.gradients.map(|g| {
                g.into_iter()
                    .map(|(name, t)| NativeNamedTensor { name, data: Float32Array::new(t.data), shape: t.shape.into_iter().map(|d| d as u32).collect() })
                    .collect()
            }),
        })
    }
}

pub struct SaveClassifierTask {
    model: SharedClassifier,
    path: PathBuf,
}

impl CodedTask for SaveClassifierTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> Result<(), ErrorCode> {
        guarded(|| save_classifier(&*self.model.read()?, Vec::new(), Default::default(), &self.path))
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> Result<()> {
        Ok(())
    }
}
