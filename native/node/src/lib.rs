//! The Node binding: a thin N-API layer over `vit-mae-core`. Heavy calls run as
//! libuv tasks off the JS thread. Every error reaches JS as an `Error` whose `code` is
//! the core error's (`E_...`) and whose message is the core's message, which the
//! TypeScript facade turns into a `VitMaeError`; panics are caught here and never
//! cross into Node.

mod cell;
mod classifier;
mod features;
mod images;
mod training;

use napi::bindgen_prelude::*;
use napi_derive::napi;
use cell::Cell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use vit_mae_core::{
    checkpoint, ConfigPatch, DeviceSpec, ErrorCode, HostTensor, LoadReport, MaeConfig, MaskOptions, MaskedAutoencoder, Masking, Precision,
};

/// A core error as a napi-rs error: napi-rs makes its status (the code) the JS error's
/// `code`, and its reason the message.
pub(crate) fn to_napi(e: vit_mae_core::Error) -> Error<ErrorCode> {
    Error::new(e.code, e.message)
}

/// Runs `f`, turning a core error or a panic into a JS-bound error with its code.
pub(crate) fn guarded<T>(f: impl FnOnce() -> vit_mae_core::Result<T>) -> Result<T, ErrorCode> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(to_napi),
        Err(payload) => {
            let detail = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(Error::new(ErrorCode::Internal, format!("internal error (please report): {detail}")))
        }
    }
}

/// Work for a libuv thread whose failure keeps its code. napi-rs's own `Task` can fail
/// only with a napi status, so [`Coded`] runs this one and turns its error into a JS
/// error on the JS thread.
pub trait CodedTask: Send + Sized {
    type Output: Send + 'static;
    type JsValue: ToNapiValue + TypeName;

    /// On a libuv thread; errors come from `guarded`.
    fn compute(&mut self) -> Result<Self::Output, ErrorCode>;

    /// On the JS thread, with what `compute` returned.
    fn resolve(&mut self, env: Env, output: Self::Output) -> Result<Self::JsValue>;
}

/// The napi-rs `Task` of a [`CodedTask`], for `AsyncTask`.
pub struct Coded<T>(pub(crate) T);

impl<T: CodedTask> Task for Coded<T> {
    type Output = Result<T::Output, ErrorCode>;
    type JsValue = T::JsValue;

    fn compute(&mut self) -> Result<Self::Output> {
        Ok(self.0.compute())
    }

    fn resolve(&mut self, env: Env, output: Self::Output) -> Result<T::JsValue> {
        match output {
            Ok(value) => self.0.resolve(env, value),
            // Made here, on the JS thread, the JS error keeps its `code`; napi-rs rejects
            // the promise with that very object.
            Err(e) => Err(Error::from(JsError::from(e).into_unknown(env))),
        }
    }
}

fn parse_config(json: &str, strict: bool) -> vit_mae_core::Result<ConfigPatch> {
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| vit_mae_core::Error::new(ErrorCode::InvalidConfig, format!("config is not valid JSON: {e}")))?;
    ConfigPatch::from_json(&value, strict)
}

pub(crate) fn parse_json(json: &str, what: &str) -> vit_mae_core::Result<serde_json::Value> {
    serde_json::from_str(json).map_err(|e| vit_mae_core::Error::new(ErrorCode::InvalidArgument, format!("{what} is not valid JSON: {e}")))
}

pub(crate) fn host_tensor(data: &[f32], shape: &[u32]) -> vit_mae_core::Result<HostTensor> {
    HostTensor::new(data.to_vec(), shape.iter().map(|&d| d as usize).collect())
}

pub(crate) fn seed_of(seed: i64) -> vit_mae_core::Result<u64> {
    u64::try_from(seed).map_err(|_| vit_mae_core::Error::new(ErrorCode::InvalidArgument, format!("seed must be a non-negative integer, got {seed}")))
}

/// A tensor crossing the boundary: row-major data and its shape.
#[napi(object)]
pub struct NativeTensor {
    pub data: Float32Array,
    pub shape: Vec<u32>,
}

impl NativeTensor {
    pub(crate) fn from_host(t: HostTensor) -> Self {
        NativeTensor { data: Float32Array::new(t.data), shape: t.shape.into_iter().map(|d| d as u32).collect() }
    }
}

#[napi(object)]
pub struct NativeNamedTensor {
    pub name: String,
    pub data: Float32Array,
    pub shape: Vec<u32>,
}

#[napi(object)]
pub struct NativeMaskOptions {
    pub mask_ratio: f64,
    /// 'random' | 'block' | 'grid'
    pub masking: String,
    pub noise: Option<Float32Array>,
    pub noise_shape: Option<Vec<u32>>,
}

impl NativeMaskOptions {
    pub(crate) fn to_core(&self) -> vit_mae_core::Result<MaskOptions> {
        let noise = match (&self.noise, &self.noise_shape) {
            (Some(data), Some(shape)) => Some(host_tensor(data, shape)?),
            (None, None) => None,
            _ => return Err(vit_mae_core::Error::new(ErrorCode::InvalidNoise, "noise needs both data and shape")),
        };
        Ok(MaskOptions { mask_ratio: self.mask_ratio, masking: Masking::parse(&self.masking)?, noise })
    }
}

#[napi(object)]
pub struct NativeForwardOutput {
    pub loss: f64,
    pub pred: NativeTensor,
    pub mask: NativeTensor,
    pub ids_restore: NativeTensor,
    pub latent: NativeTensor,
}

#[napi(object)]
pub struct NativeLossAndGradients {
    pub loss: f64,
    /// In the published parameter order.
    pub gradients: Vec<NativeNamedTensor>,
}

pub(crate) type Shared = cell::Shared<MaskedAutoencoder>;

/// A masked autoencoder living in Rust memory.
#[napi]
pub struct NativeMae {
    pub(crate) model: Shared,
    fresh_decoder: bool,
    checkpoint_format: Option<String>,
    converted_dtypes: HashMap<String, String>,
    ignored_config_fields: Vec<String>,
}

#[napi]
impl NativeMae {
    /// A freshly initialised model from a JSON config (complete, or a preset name
    /// plus overrides) and a seed.
    #[napi(factory)]
    pub fn create(preset: Option<String>, config_json: Option<String>, seed: i64, device: String, precision: String) -> Result<NativeMae, ErrorCode> {
        guarded(|| {
            let patch = match &config_json {
                Some(json) => parse_config(json, true)?,
                None => ConfigPatch::default(),
            };
            let config = match &preset {
                Some(name) => {
                    let config = patch.apply_to(&MaeConfig::preset(name)?)?;
                    config.validate()?;
                    config
                }
                None => patch.complete()?,
            };
            let device = DeviceSpec::parse(&device)?.resolve()?;
            let model = MaskedAutoencoder::new(config, &device, Precision::parse(&precision)?, seed_of(seed)?)?;
            Ok(NativeMae { model: Cell::new(model), fresh_decoder: false, checkpoint_format: None, converted_dtypes: HashMap::new(), ignored_config_fields: Vec::new() })
        })
    }

    /// Loads a checkpoint (`.pth`, `.safetensors` or a Hugging Face folder).
    #[napi(ts_return_type = "Promise<NativeMae>")]
    pub fn load(path: String, config_json: Option<String>, seed: i64, device: String, precision: String) -> AsyncTask<Coded<LoadTask>> {
        AsyncTask::new(Coded(LoadTask { path: PathBuf::from(path), config_json, seed, device, precision }))
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
    pub fn fresh_decoder(&self) -> bool {
        self.fresh_decoder
    }

    #[napi(getter)]
    pub fn checkpoint_format(&self) -> Option<String> {
        self.checkpoint_format.clone()
    }

    /// The weights the checkpoint stored as f16, bf16 or f64 (converted to f32), by name.
    #[napi(getter, ts_return_type = "Record<string, string>")]
    pub fn converted_dtypes(&self) -> HashMap<String, String> {
        self.converted_dtypes.clone()
    }

    /// The Hugging Face `config.json` fields that describe the model but were not followed.
    #[napi(getter)]
    pub fn ignored_config_fields(&self) -> Vec<String> {
        self.ignored_config_fields.clone()
    }

    #[napi(getter)]
    pub fn device(&self) -> String {
        self.model.facts.device.clone()
    }

    #[napi(getter)]
    pub fn precision(&self) -> String {
        self.model.facts.precision.clone()
    }

    /// Published names and shapes of the trainable parameters.
    #[napi]
    pub fn parameter_shapes(&self) -> Vec<NativeNamedShape> {
        cell::named_shapes(&self.model.facts)
    }

    #[napi(ts_return_type = "Promise<NativeForwardOutput>")]
    pub fn forward(&self, images: Float32Array, shape: Vec<u32>, options: NativeMaskOptions) -> Result<AsyncTask<Coded<ForwardTask>>, ErrorCode> {
        let input = guarded(|| Ok((host_tensor(&images, &shape)?, options.to_core()?)))?;
        Ok(AsyncTask::new(Coded(ForwardTask { model: self.model.clone(), images: input.0, options: input.1 })))
    }

    #[napi(ts_return_type = "Promise<NativeLossAndGradients>")]
    pub fn loss_and_gradients(&self, images: Float32Array, shape: Vec<u32>, options: NativeMaskOptions) -> Result<AsyncTask<Coded<GradientsTask>>, ErrorCode> {
        let input = guarded(|| Ok((host_tensor(&images, &shape)?, options.to_core()?)))?;
        Ok(AsyncTask::new(Coded(GradientsTask { model: self.model.clone(), images: input.0, options: input.1 })))
    }

    /// Features `[N, D]` of whole images: the encoder over every patch, pooled ('mean' | 'cls').
    #[napi(ts_return_type = "Promise<NativeTensor>")]
    pub fn embed(&self, images: Float32Array, shape: Vec<u32>, pool: String) -> Result<AsyncTask<Coded<EmbedTask>>, ErrorCode> {
        let input = guarded(|| Ok((host_tensor(&images, &shape)?, vit_mae_core::Pool::parse(&pool)?)))?;
        Ok(AsyncTask::new(Coded(EmbedTask { model: self.model.clone(), images: input.0, pool: input.1 })))
    }

    /// Dense features: the outputs of encoder blocks `layers` (negative from the end) as
    /// maps `[N, D, H/p, W/p]`, with the simple feature pyramid of the last when `pyramid`.
    #[napi(ts_return_type = "Promise<NativeFeatureMaps>")]
    pub fn feature_maps(&self, images: Float32Array, shape: Vec<u32>, layers: Vec<i64>, pyramid: bool) -> Result<AsyncTask<Coded<features::FeatureMapsTask<MaskedAutoencoder>>>, ErrorCode> {
        features::feature_maps_task(&self.model, images, shape, layers, pyramid)
    }

    /// Writes safetensors in the published layout, atomically.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn save(&self, path: String) -> AsyncTask<Coded<SaveTask>> {
        AsyncTask::new(Coded(SaveTask { model: self.model.clone(), path: PathBuf::from(path) }))
    }
}

#[napi(object)]
pub struct NativeNamedShape {
    pub name: String,
    pub shape: Vec<u32>,
}

/// Lets f32 matrix products on CUDA use TF32 tensor cores, process-wide.
#[napi]
pub fn set_allow_tf32(allow: bool) {
    vit_mae_core::device::set_allow_tf32(allow);
}

/// The names of the built-in presets with their configs as camelCase JSON.
#[napi]
pub fn presets() -> Vec<Vec<String>> {
    vit_mae_core::PRESETS
        .iter()
        .map(|(name, config)| vec![name.to_string(), serde_json::to_string(config).unwrap_or_default()])
        .collect()
}

pub struct LoadTask {
    path: PathBuf,
    config_json: Option<String>,
    seed: i64,
    device: String,
    precision: String,
}

impl CodedTask for LoadTask {
    type Output = (MaskedAutoencoder, LoadReport);
    type JsValue = NativeMae;

    fn compute(&mut self) -> Result<Self::Output, ErrorCode> {
        guarded(|| {
            let explicit = self.config_json.as_deref().map(|json| parse_config(json, true)).transpose()?;
            let device = DeviceSpec::parse(&self.device)?.resolve()?;
            checkpoint::load_model(&self.path, explicit.as_ref(), &device, Precision::parse(&self.precision)?, seed_of(self.seed)?)
        })
    }

    fn resolve(&mut self, _env: Env, (model, report): Self::Output) -> Result<NativeMae> {
        Ok(NativeMae {
            model: Cell::new(model),
            fresh_decoder: report.fresh_decoder,
            checkpoint_format: Some(report.format.as_str().to_string()),
            converted_dtypes: report.converted.into_iter().map(|(name, dtype)| (name, dtype.as_str().to_string())).collect(),
            ignored_config_fields: report.ignored_config_fields,
        })
    }
}

pub struct ForwardTask {
    model: Shared,
    images: HostTensor,
    options: MaskOptions,
}

impl CodedTask for ForwardTask {
    type Output = (f64, [HostTensor; 4]);
    type JsValue = NativeForwardOutput;

    fn compute(&mut self) -> Result<Self::Output, ErrorCode> {
        guarded(|| {
            let model = self.model.read()?;
            let imgs = model.images_to_tensor(&self.images)?;
            let out = model.forward(&imgs, &self.options)?;
            let loss = out.loss.to_scalar::<f32>()? as f64;
            Ok((
                loss,
                [
                    HostTensor::from_tensor(&out.pred)?,
                    HostTensor::from_tensor(&out.mask)?,
                    HostTensor::from_tensor(&out.ids_restore)?,
                    HostTensor::from_tensor(&out.latent)?,
                ],
            ))
        })
    }

    fn resolve(&mut self, _env: Env, (loss, [pred, mask, ids_restore, latent]): Self::Output) -> Result<NativeForwardOutput> {
        Ok(NativeForwardOutput {
            loss,
            pred: NativeTensor::from_host(pred),
            mask: NativeTensor::from_host(mask),
            ids_restore: NativeTensor::from_host(ids_restore),
            latent: NativeTensor::from_host(latent),
        })
    }
}

pub struct GradientsTask {
    model: Shared,
    images: HostTensor,
    options: MaskOptions,
}

impl CodedTask for GradientsTask {
    type Output = (f64, Vec<(String, HostTensor)>);
    type JsValue = NativeLossAndGradients;

    fn compute(&mut self) -> Result<Self::Output, ErrorCode> {
        guarded(|| {
            let model = self.model.read()?;
            let imgs = model.images_to_tensor(&self.images)?;
            let (loss, grads) = model.loss_and_gradients(&imgs, &self.options)?;
            let grads = grads.into_iter().map(|(n, g)| Ok((n, HostTensor::from_tensor(&g)?))).collect::<vit_mae_core::Result<_>>()?;
            Ok((loss as f64, grads))
        })
    }

    fn resolve(&mut self, _env: Env, (loss, grads): Self::Output) -> Result<NativeLossAndGradients> {
        let gradients = grads
            .into_iter()
            .map(|(name, t)| NativeNamedTensor { name, data: Float32Array::new(t.data), shape: t.shape.into_iter().map(|d| d as u32).collect() })
            .collect();
        Ok(NativeLossAndGradients { loss, gradients })
    }
}

pub struct SaveTask {
    model: Shared,
    path: PathBuf,
}

impl CodedTask for SaveTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> Result<(), ErrorCode> {
        guarded(|| checkpoint::save_model(&*self.model.read()?, &self.path))
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> Result<()> {
        Ok(())
    }
}

pub struct EmbedTask {
    model: Shared,
    images: HostTensor,
    pool: vit_mae_core::Pool,
}

impl CodedTask for EmbedTask {
    type Output = HostTensor;
    type JsValue = NativeTensor;

    fn compute(&mut self) -> Result<HostTensor, ErrorCode> {
        guarded(|| {
            let model = self.model.read()?;
            let imgs = model.images_to_tensor(&self.images)?;
            HostTensor::from_tensor(&model.embed(&imgs, self.pool)?)
        })
    }

    fn resolve(&mut self, _env: Env, output: HostTensor) -> Result<NativeTensor> {
        Ok(NativeTensor::from_host(output))
    }
}

/// What a checkpoint holds, read without building a model.
#[napi(object)]
pub struct NativeInspection {
    pub format: String,
    pub tensors: Vec<NativeNamedShape>,
    /// The config fields the file tells (camelCase JSON).
    pub config_json: String,
    /// The fields a complete config needs that the file does not tell.
    pub unknown: Vec<String>,
}

#[napi(ts_return_type = "Promise<NativeInspection>")]
pub fn inspect_checkpoint(path: String) -> AsyncTask<Coded<InspectTask>> {
    AsyncTask::new(Coded(InspectTask { path: PathBuf::from(path) }))
}

pub struct InspectTask {
    path: PathBuf,
}

impl CodedTask for InspectTask {
    type Output = checkpoint::Inspection;
    type JsValue = NativeInspection;

    fn compute(&mut self) -> Result<checkpoint::Inspection, ErrorCode> {
        guarded(|| checkpoint::inspect(&self.path))
    }

    fn resolve(&mut self, _env: Env, i: checkpoint::Inspection) -> Result<NativeInspection> {
        Ok(NativeInspection {
            format: i.format.as_str().to_string(),
            tensors: i.tensors.into_iter().map(|(name, shape)| NativeNamedShape { name, shape: shape.into_iter().map(|d| d as u32).collect() }).collect(),
            config_json: serde_json::Value::Object(i.config.known()).to_string(),
            unknown: i.config.missing().into_iter().map(String::from).collect(),
        })
    }
}
