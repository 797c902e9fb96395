//! The ViT classifier of the published fine-tuning and linear probing
//! (`models_vit.py`, `main_finetune.py`, `main_linprobe.py`), name for name.

use crate::bail;
use crate::checkpoint::Stored;
use crate::checkpoint::{self, StateDict};
use crate::config::{block_shapes, check_encoder, check_model_memory, largest_activation, linear_shapes, norm_shapes, patch_embed_shapes, snake_case, MaeConfig, NamedShape, PRESETS};
use crate::data::interpolate_bicubic_torch;
use crate::features;
use crate::device::Precision;
use crate::engine::{Gradients, Grid, VitEngine, VitMode};
use crate::error::{Error, ErrorCode, Result};
use crate::model::{MaskedAutoencoder, PatchEmbed, Pool};
use crate::nn::{Block, DropPathScales, LayerNorm, Linear};
use crate::ops;
use crate::params::{Init, ParamBuilder};
use crate::pos_embed::sincos_2d_with_cls;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

/// The arguments of the published `VisionTransformer` (camelCase), plus the linear
/// probe's BatchNorm head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClassifierConfig {
    #[serde(alias = "img_size")]
    pub img_size: usize,
    #[serde(alias = "patch_size")]
    pub patch_size: usize,
    #[serde(alias = "in_chans")]
    pub in_chans: usize,
    #[serde(alias = "embed_dim")]
    pub embed_dim: usize,
    pub depth: usize,
    #[serde(alias = "num_heads")]
    pub num_heads: usize,
    #[serde(alias = "mlp_ratio", default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(alias = "layer_norm_eps", default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(alias = "num_classes")]
    pub num_classes: usize,
    /// Mean of the patch tokens -> `fc_norm` -> `head` (published fine-tuning, no final
    /// `norm`); otherwise the cls token after `norm` -> `head`.
    #[serde(alias = "global_pool", default = "default_global_pool")]
    pub global_pool: bool,
    /// `BatchNorm1d(affine=False, eps=1e-6)` before the head, as `main_linprobe.py`
    /// (keys `head.0.*` and `head.1.*`).
    #[serde(alias = "head_batch_norm", default)]
    pub head_batch_norm: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_global_pool() -> bool {
    true
}

const FIELDS: [&str; 11] = [
    "imgSize", "patchSize", "inChans", "embedDim", "depth", "numHeads", "mlpRatio", "layerNormEps", "numClasses", "globalPool",
    "headBatchNorm",
];

fn canonical(key: &str) -> Option<&'static str> {
    FIELDS.iter().copied().find(|f| *f == key || snake_case(f) == key)
}

/// The known fields of a JSON object under their camelCase names. With `strict`,
/// unknown names are an error (user input); otherwise they are dropped (checkpoint
/// metadata carries other entries, such as the fixtures' `smoothing`).
pub fn config_fields(value: &serde_json::Value, strict: bool) -> Result<serde_json::Map<String, serde_json::Value>> {
    let Some(object) = value.as_object() else {
        bail!(InvalidConfig, "classifier config must be an object, got {value}");
    };
    let mut out = serde_json::Map::new();
    for (k, v) in object {
        match canonical(k) {
            Some(name) => {
                out.insert(name.to_string(), v.clone());
            }
            None if strict => bail!(InvalidConfig, "unknown classifier config field '{k}'; known fields: {FIELDS:?}"),
            None => {}
        }
    }
    Ok(out)
}

impl ClassifierConfig {
    pub fn from_fields(fields: serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let config: ClassifierConfig = serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| Error::new(ErrorCode::InvalidConfig, format!("invalid classifier config: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The encoder of `mae` with a new head.
    pub fn from_encoder(mae: &MaeConfig, num_classes: usize, global_pool: bool, head_batch_norm: bool) -> Self {
        ClassifierConfig {
            img_size: mae.img_size,
            patch_size: mae.patch_size,
            in_chans: mae.in_chans,
            embed_dim: mae.embed_dim,
            depth: mae.depth,
            num_heads: mae.num_heads,
            mlp_ratio: mae.mlp_ratio,
            layer_norm_eps: mae.layer_norm_eps,
            num_classes,
            global_pool,
            head_batch_norm,
        }
    }

    pub fn grid_size(&self) -> usize {
        self.img_size / self.patch_size
    }

    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    pub fn pool(&self) -> Pool {
        if self.global_pool {
            Pool::Mean
        } else {
            Pool::Cls
        }
    }

    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("imgSize", self.img_size),
            ("patchSize", self.patch_size),
            ("inChans", self.in_chans),
            ("embedDim", self.embed_dim),
            ("numHeads", self.num_heads),
            ("numClasses", self.num_classes),
        ];
        check_encoder(&sizes, &[("depth", self.depth)], self.img_size, self.patch_size, self.embed_dim, self.num_heads, self.mlp_ratio, self.layer_norm_eps)?;
        // A fresh classifier starts its position embedding from the 2-D sin-cos table.
        if self.embed_dim % 4 != 0 {
            bail!(InvalidConfig, "embedDim {} must be a multiple of 4 for the 2-D sin-cos position embedding", self.embed_dim);
        }
        Ok(())
    }

    /// The trainable parameters of the published `VisionTransformer`, by name, in its order.
    pub fn parameter_shapes(&self) -> Vec<NamedShape> {
        let d = self.embed_dim;
        let mut shapes = vec![("cls_token".to_string(), vec![1, 1, d]), ("pos_embed".to_string(), vec![1, 1 + self.num_patches(), d])];
        shapes.extend(patch_embed_shapes(self.in_chans, self.patch_size, d));
        shapes.extend((0..self.depth).flat_map(|i| block_shapes(&format!("blocks.{i}"), d, self.mlp_hidden())));
        shapes.extend(norm_shapes(if self.global_pool { "fc_norm" } else { "norm" }, d));
        shapes.extend(linear_shapes(if self.head_batch_norm { "head.1" } else { "head" }, d, self.num_classes));
        shapes
    }

    /// The linear probe's BatchNorm statistics (none without `headBatchNorm`), by name.
    pub fn buffer_shapes(&self) -> Vec<NamedShape> {
        match self.head_batch_norm {
            true => vec![
                ("head.0.running_mean".to_string(), vec![self.embed_dim]),
                ("head.0.running_var".to_string(), vec![self.embed_dim]),
                ("head.0.num_batches_tracked".to_string(), vec![]),
            ],
            false => Vec::new(),
        }
    }

    /// Refuses (`E_OUT_OF_MEMORY`) a valid config whose parameters and the largest
    /// buffer of one image's forward pass do not fit in memory, as
    /// [`MaeConfig::check_memory`].
    pub fn check_memory(&self) -> Result<()> {
        let per_image = largest_activation(1 + self.num_patches(), self.num_heads, self.mlp_hidden());
        let (parameters, buffers) = (self.parameter_shapes(), self.buffer_shapes());
        check_model_memory("the classifier", parameters.iter().chain(&buffers).map(|(_, shape)| shape.as_slice()), per_image)
    }

    /// Checks a state dict against the config before any weight is set: every
    /// parameter and buffer there with its shape, and nothing else.
    pub fn check_tensors(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let expected: BTreeMap<String, Vec<usize>> = self.parameter_shapes().into_iter().chain(self.buffer_shapes()).collect();
        let unknown: Vec<&String> = tensors.keys().filter(|k| !expected.contains_key(*k)).collect();
        if !unknown.is_empty() {
            bail!(CheckpointKeys, "checkpoint has keys that this classifier does not: {unknown:?}");
        }
        let missing: Vec<&String> = expected.keys().filter(|n| !tensors.contains_key(*n)).collect();
        if !missing.is_empty() {
            bail!(CheckpointKeys, "checkpoint lacks keys: {missing:?}");
        }
        for (name, shape) in &expected {
            let t = &tensors[name];
            if t.dims() != shape.as_slice() {
                bail!(CheckpointShape, "{name}: checkpoint has shape {:?}, the config needs {shape:?}", t.dims());
            }
        }
        Ok(())
    }

    /// The config with the published (snake_case) names, as checkpoints store it.
    pub fn to_published_json(&self) -> serde_json::Value {
        serde_json::json!({
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "layer_norm_eps": self.layer_norm_eps,
            "num_classes": self.num_classes,
            "global_pool": self.global_pool,
            "head_batch_norm": self.head_batch_norm,
        })
    }
}

/// `BatchNorm1d(affine=False, eps=1e-6, momentum=0.1)`: running statistics only.
struct BatchNormStats {
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: i64,
}

const BN_EPS: f64 = 1e-6;
const BN_MOMENTUM: f64 = 0.1;

/// Which parameters train: the three protocols of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// Full fine-tuning.
    All,
    /// Linear probing: the head's linear layer only.
    Head,
    /// Partial fine-tuning: the last `k` blocks, the final norm and the head.
    LastBlocks(usize),
}

/// How a forward pass runs.
pub struct ForwardMode<'a> {
    /// Training mode: BatchNorm uses (and updates) batch statistics, and stochastic
    /// depth drops branches at `drop_path` (the last block's rate), image `i`'s drawn
    /// from the `i`-th generator (one per image).
    pub train: Option<(&'a mut [ChaCha8Rng], f64)>,
    /// Parameters before the trainable ones are cut from the graph, so their
    /// gradients are never computed.
    pub trainable: Trainable,
}

impl ForwardMode<'_> {
    /// Evaluation: no stochastic depth, BatchNorm running statistics, every parameter
    /// differentiable.
    pub fn eval() -> ForwardMode<'static> {
        ForwardMode { train: None, trainable: Trainable::All }
    }
}

/// The published `VisionTransformer` for classification.
pub struct VitClassifier {
    pub config: ClassifierConfig,
    device: Device,
    precision: Precision,
    params: Vec<(String, Var)>,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    /// Cls pooling only (the published global-pool model deletes it).
    norm: Option<LayerNorm>,
    /// Global pooling only.
    fc_norm: Option<LayerNorm>,
    head_bn: Option<Mutex<BatchNormStats>>,
    head: Linear,
    /// The engine plan of the last call on the CPU in f32, reused while its batch size
    /// and mode stay the same.
    engine: Mutex<Option<VitEngine>>,
    /// Every call on this reference model, wherever the engine could run it.
    reference_only: bool,
}

/// What `predict` returns.
pub struct Prediction {
    /// `[N, K]` softmax of the logits.
    pub probabilities: Tensor,
    /// The `min(5, K)` most likely classes of each image, most likely first.
    pub top: Vec<Vec<u32>>,
}

impl VitClassifier {
    /// A freshly initialised classifier: the MAE initialisation for the encoder
    /// (xavier-uniform linears, normal(0.02) cls token, 2-D sin-cos position
    /// embedding as the start of the learned one), and the head as published:
    /// trunc-normal std 2e-5 (fine-tuning) or 0.01 (linear probe), zero bias.
    pub fn new(config: ClassifierConfig, device: &Device, precision: Precision, seed: u64) -> Result<Self> {
        config.validate()?;
        config.check_memory()?;
        let c = &config;
        let mut p = ParamBuilder::new(ChaCha8Rng::seed_from_u64(seed), device.clone(), precision);
        let l = c.num_patches();
        let cls_token = p.param("cls_token", &[1, 1, c.embed_dim], Init::Normal { std: 0.02 })?;
        // Learned here (fixed in pre-training); set to the sin-cos table below.
        let pos_embed = p.param("pos_embed", &[1, l + 1, c.embed_dim], Init::Zeros)?;
        let patch_embed = PatchEmbed::new(&mut p, c.in_chans, c.patch_size, c.embed_dim)?;
        let blocks = (0..c.depth)
            .map(|i| Block::new(&mut p, &format!("blocks.{i}"), c.embed_dim, c.num_heads, c.mlp_hidden(), c.layer_norm_eps))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (norm, fc_norm) = if c.global_pool {
            (None, Some(LayerNorm::new(&mut p, "fc_norm", c.embed_dim, c.layer_norm_eps)?))
        } else {
            (Some(LayerNorm::new(&mut p, "norm", c.embed_dim, c.layer_norm_eps)?), None)
        };
        let (head_bn, head) = if c.head_batch_norm {
            let stats = BatchNormStats {
                running_mean: Tensor::zeros(c.embed_dim, DType::F32, device)?,
                running_var: Tensor::ones(c.embed_dim, DType::F32, device)?,
                num_batches_tracked: 0,
            };
            (Some(Mutex::new(stats)), Linear::with_init(&mut p, "head.1", c.embed_dim, c.num_classes, Init::TruncNormal { std: 0.01 })?)
        } else {
            (None, Linear::with_init(&mut p, "head", c.embed_dim, c.num_classes, Init::TruncNormal { std: 2e-5 })?)
        };
        let params = p.finish();
        let table = Tensor::from_vec(sincos_2d_with_cls(c.embed_dim, c.grid_size()), (1, l + 1, c.embed_dim), device)?;
        if let Some((_, var)) = params.iter().find(|(n, _)| n == "pos_embed") {
            var.set(&table)?;
        }
        Ok(VitClassifier { config, device: device.clone(), precision, params, patch_embed, cls_token, pos_embed, blocks, norm, fc_norm, head_bn, head, engine: Mutex::new(None), reference_only: false })
    }

    /// A classifier on the encoder of a pre-trained MAE, as `main_finetune.py` /
    /// `main_linprobe.py` start: the encoder's weights (and its final `norm` for cls
    /// pooling), the position embedding resized bicubically when `img_size` differs,
    /// a fresh `fc_norm` and head.
    pub fn from_encoder(mae: &MaskedAutoencoder, config: ClassifierConfig, seed: u64) -> Result<Self> {
        let m = &mae.config;
        let same = m.patch_size == config.patch_size
            && m.in_chans == config.in_chans
            && m.embed_dim == config.embed_dim
            && m.depth == config.depth
            && m.num_heads == config.num_heads
            && m.mlp_ratio == config.mlp_ratio;
        if !same {
            bail!(InvalidConfig, "the classifier's encoder settings differ from the pre-trained MAE's");
        }
        let classifier = VitClassifier::new(config, mae.device(), mae.precision(), seed)?;
        let (_, pos_embed) = mae.buffers()[0];
        for (name, var) in &classifier.params {
            let source = if name == "pos_embed" {
                Some(resize_pos_embed(pos_embed, classifier.config.grid_size(), classifier.config.grid_size())?)
            } else {
                mae.params().iter().find(|(n, _)| n == name).map(|(_, v)| v.as_tensor().clone())
            };
            if let Some(t) = source {
                var.set(&t)?;
            }
        }
        Ok(classifier)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Trainable parameters in the published order, by published name.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The parameters a protocol trains, in `params()` order.
    pub fn trainable_params(&self, trainable: Trainable) -> Result<Vec<(String, Var)>> {
        let depth = self.config.depth;
        if let Trainable::LastBlocks(k) = trainable {
            if k > depth {
                bail!(InvalidArgument, "cannot fine-tune the last {k} blocks of a {depth}-block encoder");
            }
        }
        let head_prefix = if self.config.head_batch_norm { "head.1." } else { "head." };
        Ok(self
            .params
            .iter()
            .filter(|(name, _)| match trainable {
                Trainable::All => true,
                Trainable::Head => name.starts_with(head_prefix),
                Trainable::LastBlocks(k) => match block_index(name) {
                    Some(i) => i >= depth - k,
                    None => name.starts_with("head") || name.starts_with("norm.") || name.starts_with("fc_norm."),
                },
            })
            .cloned()
            .collect())
    }

    /// Checks that host images are `[N, C, H, W]` with the config's channels and size.
    pub fn images_to_tensor(&self, imgs: &crate::HostTensor) -> Result<Tensor> {
        let c = &self.config;
        if imgs.shape.len() != 4 || imgs.shape[0] == 0 || imgs.shape[1..] != [c.in_chans, c.img_size, c.img_size] {
            bail!(InvalidShape, "images must have shape [N, {}, {}, {}] (N >= 1) for this classifier, got {:?}", c.in_chans, c.img_size, c.img_size, imgs.shape);
        }
        imgs.check_finite("images")?;
        imgs.to_tensor(&self.device)
    }

    /// The published `forward_features`: pooled, normalised features `[N, D]`, what
    /// the head sees (before the linear probe's BatchNorm).
    pub fn forward_features(&self, imgs: &Tensor, mode: &mut ForwardMode) -> Result<Tensor> {
        let depth = self.config.depth;
        let x = self.patch_embed.forward(imgs)?;
        let (n, _, d) = x.dims3()?;
        let cls = self.cls_token.broadcast_as((n, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos_embed)?;
        // Partial fine-tuning cuts the graph before the first trainable block (or
        // after the last block when only the norm and head train).
        let cut_before = match mode.trainable {
            Trainable::LastBlocks(k) => Some(depth - k.min(depth)),
            Trainable::All | Trainable::Head => None,
        };
        for (i, blk) in self.blocks.iter().enumerate() {
            if cut_before == Some(i) {
                x = x.detach();
            }
            x = match &mut mode.train {
                Some((rngs, rate)) if *rate > 0.0 => {
                    if rngs.len() != n {
                        bail!(Internal, "stochastic depth needs a generator per image: {} for {n} images", rngs.len());
                    }
                    // Stochastic depth rises linearly from 0 at the first block to `rate` at the
                    // last (`torch.linspace(0, rate, depth)`: a single block gets 0).
                    let block_rate = if depth > 1 { *rate * i as f64 / (depth - 1) as f64 } else { 0.0 };
                    let scales = DropPathScales::draw(rngs, block_rate, &self.device)?;
                    blk.forward_dropping(&x, Some(&scales))?
                }
                _ => blk.forward(&x)?,
            };
        }
        if cut_before == Some(depth) {
            x = x.detach();
        }
        let features = match (&self.fc_norm, &self.norm) {
            (Some(fc_norm), _) => fc_norm.forward(&Pool::Mean.apply(&x)?)?,
            (None, Some(norm)) => Pool::Cls.apply(&norm.forward(&x)?)?,
            (None, None) => bail!(Internal, "classifier has neither norm nor fc_norm"),
        };
        Ok(if mode.trainable == Trainable::Head { features.detach() } else { features })
    }

    /// Logits `[N, K]` from features: the probe's BatchNorm (if any) and the head.
    pub fn forward_head(&self, features: &Tensor, train: bool) -> Result<Tensor> {
        let x = match &self.head_bn {
            None => features.clone(),
            Some(stats) => {
                let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
                if train {
                    let n = features.dim(0)?;
                    if n < 2 {
                        bail!(InvalidArgument, "BatchNorm needs more than one image per training batch");
                    }
                    let mean = features.mean_keepdim(0)?;
                    let centered = features.broadcast_sub(&mean)?;
                    let var = centered.sqr()?.mean_keepdim(0)?;
                    // Running statistics: momentum 0.1, the variance unbiased (as torch).
                    let unbiased = (var.detach().squeeze(0)? * (n as f64 / (n - 1) as f64))?;
                    stats.running_mean = ((&stats.running_mean * (1.0 - BN_MOMENTUM))? + (mean.detach().squeeze(0)? * BN_MOMENTUM)?)?;
                    stats.running_var = ((&stats.running_var * (1.0 - BN_MOMENTUM))? + (unbiased * BN_MOMENTUM)?)?;
                    stats.num_batches_tracked += 1;
                    centered.broadcast_div(&(var + BN_EPS)?.sqrt()?)?
                } else {
                    features.broadcast_sub(&stats.running_mean)?.broadcast_div(&(&stats.running_var + BN_EPS)?.sqrt()?)?
                }
            }
        };
        Ok(self.head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Logits of a forward pass in `mode`.
    pub fn forward_mode(&self, imgs: &Tensor, mode: &mut ForwardMode) -> Result<Tensor> {
        let train = mode.train.is_some();
        let features = self.forward_features(imgs, mode)?;
        self.forward_head(&features, train)
    }

    /// Logits `[N, K]` in evaluation mode: on the engine on the CPU in f32, else the
    /// reference model.
    pub fn forward(&self, imgs: &Tensor) -> Result<Tensor> {
        if !self.uses_engine() {
            return self.forward_mode(imgs, &mut ForwardMode::eval());
        }
        let n = imgs.dim(0)?;
        let pixels = imgs.flatten_all()?.to_vec1::<f32>()?;
        let logits = self.with_engine(n, VitMode::Eval, |e| e.logits(&pixels))?;
        Ok(Tensor::from_vec(logits, (n, self.config.num_classes), &self.device)?)
    }

    /// Features `[N, D]` for downstream use: what the head sees, in evaluation mode,
    /// without a gradient.
    pub fn embed(&self, imgs: &Tensor) -> Result<Tensor> {
        if !self.uses_engine() {
            return Ok(self.forward_features(imgs, &mut ForwardMode::eval())?.detach());
        }
        let n = imgs.dim(0)?;
        let pixels = imgs.flatten_all()?.to_vec1::<f32>()?;
        let features = self.with_engine(n, VitMode::Eval, |e| {
            e.logits(&pixels)?;
            Ok(e.features())
        })?;
        Ok(Tensor::from_vec(features, (n, self.config.embed_dim), &self.device)?)
    }

    /// Dense features of the encoder, as [`MaskedAutoencoder::feature_maps`]: the outputs
    /// of blocks `layers` over every patch of `imgs` (any size whose sides are multiples
    /// of the patch size), each as a map `[N, D, H/p, W/p]`, without `norm` or `fc_norm`.
    pub fn feature_maps(&self, imgs: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        let n = imgs.dim(0)?;
        let engine = self.uses_engine().then(|| -> features::EngineBlocks<'_> { Box::new(move |pixels, grid| self.with_engine_at(n, VitMode::Eval, grid, |e| e.block_outputs(pixels, layers))) });
        let c = &self.config;
        let encoder = features::Encoder { patch_embed: &self.patch_embed, patch_size: c.patch_size, cls_token: &self.cls_token, pos_embed: &self.pos_embed, blocks: &self.blocks };
        encoder.feature_maps(imgs, layers, engine)
    }

    /// Whether calls run on the engine (`crate::engine`): f32 on the CPU, unless
    /// [`VitClassifier::set_reference_only`].
    pub fn uses_engine(&self) -> bool {
        !self.reference_only && self.device.is_cpu() && self.precision == Precision::F32
    }

    /// Runs every call (forward passes, gradients, fine-tuning) on the reference model
    /// with candle's autograd, not the engine: the second oracle the tests hold the
    /// engine against.
    pub fn set_reference_only(&mut self, reference_only: bool) {
        self.reference_only = reference_only;
        *self.engine.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Runs `f` on an engine plan for `n` images in `mode`, loaded with this classifier's
    /// weights; the plan is kept for the next call of the same shape.
    fn with_engine<T>(&self, n: usize, mode: VitMode, f: impl FnOnce(&mut VitEngine) -> Result<T>) -> Result<T> {
        self.with_engine_at(n, mode, Grid::square(self.config.grid_size()), f)
    }

    /// [`VitClassifier::with_engine`] for images of `grid` patches (`VitMode::Eval` where
    /// it is not the model's own).
    fn with_engine_at<T>(&self, n: usize, mode: VitMode, grid: Grid, f: impl FnOnce(&mut VitEngine) -> Result<T>) -> Result<T> {
        let mut cached = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        if !cached.as_ref().is_some_and(|e| e.batch == n && e.mode == mode && e.grid == grid) {
            *cached = None;
            *cached = Some(VitEngine::at_grid(&self.config, n, mode, grid)?);
        }
        let engine = cached.as_mut().expect("set above");
        engine.load_from(self)?;
        f(engine)
    }

    /// Class probabilities and the top classes, in evaluation mode.
    pub fn predict(&self, imgs: &Tensor) -> Result<Prediction> {
        let probabilities = ops::softmax_last_dim(&self.forward(imgs)?.detach(), 1.0)?;
        let k = self.config.num_classes.min(5);
        let rows = probabilities.to_vec2::<f32>()?;
        let top = rows.iter().map(|row| top_k(row, k)).collect();
        Ok(Prediction { probabilities, top })
    }

    /// Checks labels against `num_classes`.
    pub fn check_labels(&self, labels: &[i64], n: usize) -> Result<()> {
        if labels.len() != n {
            bail!(InvalidArgument, "got {} labels for {n} images", labels.len());
        }
        let k = self.config.num_classes as i64;
        if let Some(bad) = labels.iter().find(|&&y| y < 0 || y >= k) {
            bail!(InvalidArgument, "label {bad} is not a class index: labels must be in [0, {k}) for numClasses {k}");
        }
        Ok(())
    }

    /// The cross-entropy against soft targets `[N, K]` (one-hot, smoothed or mixed),
    /// averaged over the batch: timm's `SoftTargetCrossEntropy`, which equals
    /// `LabelSmoothingCrossEntropy` for smoothed one-hot targets.
    pub fn loss(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let per_image = (targets * ops::log_softmax_last_dim(logits)?)?.sum(D::Minus1)?.neg()?;
        Ok(per_image.mean_all()?)
    }

    /// Loss (with `smoothing`) and the gradient of every parameter, in evaluation mode.
    pub fn loss_and_gradients(&self, imgs: &Tensor, labels: &[i64], smoothing: f64) -> Result<(f32, Vec<(String, Tensor)>)> {
        let n = imgs.dim(0)?;
        self.check_labels(labels, n)?;
        let targets = soft_targets(labels, self.config.num_classes, smoothing);
        if self.uses_engine() {
            let pixels = imgs.flatten_all()?.to_vec1::<f32>()?;
            let mode = VitMode::Grad { trainable: Trainable::All, train: false, drop_path: 0.0 };
            return self.with_engine(n, mode, |e| {
                e.zero_grad();
                let loss = e.accumulate(&pixels, &targets, 1.0, None)?;
                let grads = e.grads();
                let gradients = e.param_layout().map(|(name, shape, r)| Ok((name.to_string(), Tensor::from_slice(&grads[r], shape, &self.device)?))).collect::<Result<Vec<_>>>()?;
                Ok((loss, gradients))
            });
        }
        let targets = Tensor::from_vec(targets, (n, self.config.num_classes), &self.device)?;
        let loss = self.loss(&self.forward_mode(imgs, &mut ForwardMode::eval())?, &targets)?;
        let grads = loss.backward()?;
        let gradients = self
            .params
            .iter()
            .map(|(name, var)| match grads.get(var.as_tensor()) {
                Some(g) => Ok((name.clone(), g.clone())),
                None => bail!(Internal, "parameter {name} received no gradient"),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((loss.to_scalar::<f32>()?, gradients))
    }

    /// The probe's BatchNorm running statistics: mean, variance, updates so far.
    pub fn batch_norm_stats(&self) -> Result<Option<(Vec<f32>, Vec<f32>, i64)>> {
        let Some(stats) = &self.head_bn else { return Ok(None) };
        let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Some((stats.running_mean.to_vec1::<f32>()?, stats.running_var.to_vec1::<f32>()?, stats.num_batches_tracked)))
    }

    /// Sets the probe's BatchNorm running statistics (from a training engine).
    pub fn set_batch_norm_stats(&self, mean: Vec<f32>, var: Vec<f32>, tracked: i64) -> Result<()> {
        let Some(stats) = &self.head_bn else { return Ok(()) };
        let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
        let d = mean.len();
        stats.running_mean = Tensor::from_vec(mean, d, &self.device)?;
        stats.running_var = Tensor::from_vec(var, d, &self.device)?;
        stats.num_batches_tracked = tracked;
        Ok(())
    }

    /// The BatchNorm running statistics under their published names.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let Some(stats) = &self.head_bn else { return Ok(Vec::new()) };
        let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
        Ok(vec![
            ("head.0.running_mean".to_string(), stats.running_mean.clone()),
            ("head.0.running_var".to_string(), stats.running_var.clone()),
            ("head.0.num_batches_tracked".to_string(), Tensor::new(stats.num_batches_tracked, &Device::Cpu)?),
        ])
    }

    /// Copies a state dict's tensors in, after [`ClassifierConfig::check_tensors`].
    pub fn assign(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.config.check_tensors(tensors)?;
        for (name, var) in &self.params {
            var.set(&tensors[name].to_device(&self.device)?)?;
        }
        if let Some(stats) = &self.head_bn {
            let mut stats = stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.running_mean = tensors["head.0.running_mean"].to_device(&self.device)?;
            stats.running_var = tensors["head.0.running_var"].to_device(&self.device)?;
            stats.num_batches_tracked = tensors["head.0.num_batches_tracked"].to_dtype(DType::F64)?.to_scalar::<f64>()? as i64;
        }
        Ok(())
    }
}

fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blocks.")?.split('.').next()?.parse().ok()
}

/// Indices of the `k` largest values, largest first.
fn top_k(row: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// One-hot targets with label smoothing as timm: `1 - s + s/K` on the label, `s/K` elsewhere.
pub fn soft_targets(labels: &[i64], num_classes: usize, smoothing: f64) -> Vec<f32> {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let mut t = vec![off as f32; labels.len() * num_classes];
    for (i, &y) in labels.iter().enumerate() {
        t[i * num_classes + y as usize] = on as f32;
    }
    t
}

/// The published `interpolate_pos_embed`: the grid part of a `[1, 1 + g*g, D]` table
/// resized bicubically (torch semantics) to `new_h` x `new_w` patches, the cls row
/// kept; at the table's own grid, the table itself.
pub fn resize_pos_embed(pos_embed: &Tensor, new_h: usize, new_w: usize) -> Result<Tensor> {
    let (_, rows, d) = pos_embed.dims3()?;
    let grid = ((rows - 1) as f64).sqrt().round() as usize;
    if grid * grid + 1 != rows {
        bail!(CheckpointShape, "pos_embed has {rows} rows, not 1 + a square grid");
    }
    if (grid, grid) == (new_h, new_w) {
        return Ok(pos_embed.clone());
    }
    let cls = pos_embed.narrow(1, 0, 1)?;
    // [1, g*g, D] -> planes [D, g, g]
    let planes = pos_embed.narrow(1, 1, grid * grid)?.squeeze(0)?.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let resized = interpolate_bicubic_torch(&planes, d, grid, grid, new_h, new_w);
    let resized = Tensor::from_vec(resized, (d, new_h * new_w), pos_embed.device())?.t()?.unsqueeze(0)?;
    Ok(Tensor::cat(&[&cls, &resized], 1)?.contiguous()?)
}

/// Which head a checkpoint's keys describe, and its config as far as shapes tell.
fn infer_fields(tensors: &BTreeMap<String, Tensor>) -> serde_json::Map<String, serde_json::Value> {
    let dim = |name: &str, i: usize| tensors.get(name).and_then(|t| t.dims().get(i).copied());
    let mut f = serde_json::Map::new();
    let mut put = |k: &str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            f.insert(k.to_string(), v);
        }
    };
    let embed_dim = dim("patch_embed.proj.weight", 0);
    let patch = dim("patch_embed.proj.weight", 2);
    put("embedDim", embed_dim.map(Into::into));
    put("patchSize", patch.map(Into::into));
    put("inChans", dim("patch_embed.proj.weight", 1).map(Into::into));
    if let (Some(rows), Some(p)) = (dim("pos_embed", 1), patch) {
        put("imgSize", Some((((rows.saturating_sub(1)) as f64).sqrt().round() as usize * p).into()));
    }
    let depth = tensors.keys().filter_map(|k| block_index(k)).max().map(|i| i + 1);
    put("depth", depth.map(Into::into));
    if let (Some(h), Some(d)) = (dim("blocks.0.mlp.fc1.weight", 0), embed_dim) {
        put("mlpRatio", Some((h as f64 / d as f64).into()));
    }
    let batch_norm = tensors.contains_key("head.1.weight");
    put("headBatchNorm", Some(batch_norm.into()));
    put("numClasses", dim(if batch_norm { "head.1.weight" } else { "head.weight" }, 0).map(Into::into));
    put("globalPool", Some(tensors.contains_key("fc_norm.weight").into()));
    // Heads are not visible in shapes: the preset of the same width says.
    put("numHeads", PRESETS.iter().find(|(_, c)| Some(c.embed_dim) == embed_dim).map(|(_, c)| c.num_heads.into()));
    f
}

/// Loads a classifier checkpoint (published fine-tuning or linear-probe layout, as
/// `.pth` or safetensors). The config is, in increasing priority: what the shapes
/// imply, the checkpoint's own config, and `explicit` (camelCase or published names).
pub fn load_classifier(path: &Path, explicit: Option<&serde_json::Value>, device: &Device, precision: Precision, seed: u64) -> Result<(VitClassifier, StateDict)> {
    let mut state = checkpoint::read_state_dict(path)?;
    if !state.tensors.contains_key("head.weight") && !state.tensors.contains_key("head.1.weight") {
        bail!(CheckpointKeys, "{} has no classification head (head.weight); load an MAE checkpoint with fromPretrained instead", path.display());
    }
    let mut fields = infer_fields(&state.tensors);
    if let Some(json) = state.metadata.get("config") {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| Error::new(ErrorCode::CheckpointCorrupt, format!("{}: metadata config is not JSON: {e}", path.display())))?;
        fields.extend(config_fields(&value, false)?);
    }
    if let Some(value) = explicit {
        fields.extend(config_fields(value, true)?);
    }
    let config = ClassifierConfig::from_fields(fields)
        .map_err(|e| Error::new(e.code, format!("cannot configure the classifier from {}: {}; pass the config explicitly", path.display(), e.message)))?;
    let (mut model_tensors, other): (BTreeMap<_, _>, BTreeMap<_, _>) =
        std::mem::take(&mut state.tensors).into_iter().partition(|(k, _)| !k.starts_with(checkpoint::OPTIMIZER_PREFIX));
    // Nothing of the config's size is allocated before the checkpoint is known to match
    // it (at the checkpoint's own resolution: its position embedding is resized to the
    // config's below) and it is known to fit in memory.
    let checkpoint_img_size = match model_tensors.get("pos_embed").map(|t| t.dims()) {
        Some(&[1, rows, _]) if rows > 1 => ((rows - 1) as f64).sqrt().round() as usize * config.patch_size,
        _ => config.img_size,
    };
    ClassifierConfig { img_size: checkpoint_img_size, ..config.clone() }.check_tensors(&model_tensors)?;
    config.check_memory()?;
    // At another resolution than the checkpoint's, the position embedding is resized as published.
    if let Some(pos_embed) = model_tensors.get_mut("pos_embed") {
        *pos_embed = resize_pos_embed(pos_embed, config.grid_size(), config.grid_size())?;
    }
    let classifier = VitClassifier::new(config, device, precision, seed)?;
    classifier.assign(&model_tensors)?;
    state.tensors = other;
    Ok((classifier, state))
}

/// Saves in the published key layout with the config in `__metadata__.config`, atomically.
pub fn save_classifier(classifier: &VitClassifier, extra: Vec<(String, Stored<'_>)>, metadata: std::collections::HashMap<String, String>, path: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Stored)> = classifier.params.iter().map(|(n, v)| (n.clone(), Stored::Tensor(v.as_tensor().clone()))).collect();
    tensors.extend(classifier.buffers()?.into_iter().map(|(n, t)| (n, Stored::Tensor(t))));
    tensors.extend(extra);
    checkpoint::save_tensors(tensors, classifier.config.to_published_json(), metadata, path)
}
