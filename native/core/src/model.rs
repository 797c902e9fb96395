//! The masked autoencoder, following `models_mae.py` (facebookresearch/mae)
//! name for name.

use crate::bail;
use crate::config::{MaeConfig, Target, PCA_COMPONENTS, PCA_MEAN};
use crate::device::Precision;
use crate::engine::{Gradients, Grid, MaeEngine, Mode};
use crate::features;
use crate::error::Result;
use crate::masking::{self, MaskPlan, MaskSampler, Masking};
use crate::nn::{Block, LayerNorm, Linear};
use crate::ops;
use crate::params::{Init, ParamBuilder, Values};
use crate::pos_embed::sincos_2d_with_cls;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;

/// A tensor in host memory, row-major: what crosses into and out of the core.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

impl HostTensor {
    pub fn new(data: Vec<f32>, shape: Vec<usize>) -> Result<Self> {
        let t = HostTensor { data, shape };
        t.check_len()?;
        Ok(t)
    }

    fn check_len(&self) -> Result<()> {
        // Checked: a product that wrapped around could pass for the data's length.
        let expected = self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if expected != Some(self.data.len()) {
            let needed = expected.map_or_else(|| "more than can be addressed".to_string(), |n| n.to_string());
            bail!(InvalidShape, "tensor data has {} values but shape {:?} needs {needed}", self.data.len(), self.shape);
        }
        Ok(())
    }

    /// Refuses NaN and infinite values with `E_INPUT`, naming the first one's index flat
    /// and per dimension: the model would turn them into NaN outputs without a word.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        let Some(flat) = self.data.iter().position(|v| !v.is_finite()) else { return Ok(()) };
        let mut index = vec![0; self.shape.len()];
        let mut rest = flat;
        for (i, &side) in self.shape.iter().enumerate().rev() {
            index[i] = rest % side;
            rest /= side;
        }
        bail!(InvalidInput, "{what} must be finite, but value {flat} (at {index:?}) is {}", self.data[flat]);
    }

    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let shape = t.dims().to_vec();
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(HostTensor { data, shape })
    }

    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        self.check_len()?;
        Ok(Tensor::from_slice(&self.data, self.shape.as_slice(), device)?)
    }
}

/// How to choose the removed patches for one forward pass.
#[derive(Debug, Clone)]
pub struct MaskOptions {
    pub mask_ratio: f64,
    pub masking: Masking,
    /// `[N, L]` noise for random masking; drawn from the model's seeded RNG when absent.
    pub noise: Option<HostTensor>,
}

impl Default for MaskOptions {
    fn default() -> Self {
        MaskOptions { mask_ratio: 0.75, masking: Masking::Random, noise: None }
    }
}

impl MaskOptions {
    /// The mask for a batch of `n` images of a model of `config`, drawing any randomness from `rng`.
    pub fn plan(&self, config: &MaeConfig, rng: &mut impl rand::Rng, n: usize) -> Result<MaskPlan> {
        masking::check_mask_ratio(self.mask_ratio)?;
        let l = config.num_patches();
        match (self.masking, &self.noise) {
            (Masking::Random, Some(noise)) => {
                if noise.shape != [n, l] {
                    bail!(InvalidNoise, "noise must have shape [{n}, {l}] (batch, patches), got {:?}", noise.shape);
                }
                let rows: Vec<Vec<f32>> = noise.data.chunks(l).map(<[f32]>::to_vec).collect();
                masking::random_from_noise(&rows, self.mask_ratio)
            }
            (_, Some(_)) => bail!(InvalidNoise, "noise applies only to random masking"),
            (masking, None) => Ok(MaskSampler::new(masking, config.grid_size(), self.mask_ratio)?.batch(rng, n)),
        }
    }
}

/// What `forward` returns, as in the published `(loss, pred, mask)` plus the
/// restore indices and the encoder's output.
pub struct ForwardOutput {
    /// Scalar.
    pub loss: Tensor,
    /// `[N, L, pred_dim]`: pixels (`p*p*C`), or a PCA target's coefficients.
    pub pred: Tensor,
    /// `[N, L]`, 1 where a patch was removed.
    pub mask: Tensor,
    /// `[N, L]`, position of each patch in the shuffled order.
    pub ids_restore: Tensor,
    /// `[N, 1 + len_keep, D]` (`[N, 1 + L, D]` with `config.encoder_mask_token`),
    /// after the encoder's final norm.
    pub latent: Tensor,
    /// Patches removed from each image.
    pub removed: usize,
}

/// `PatchEmbed` as patchify + matmul: the same numbers as the published conv,
/// without a gradient for the pixels.
pub(crate) struct PatchEmbed {
    weight: Tensor,
    bias: Tensor,
    patch_size: usize,
    compute: DType,
}

impl PatchEmbed {
    pub(crate) fn new(p: &mut ParamBuilder, in_chans: usize, patch_size: usize, embed_dim: usize) -> candle_core::Result<Self> {
        let fan_in = in_chans * patch_size * patch_size;
        // Published: xavier-uniform on the weight viewed as [D, C*p*p]; the bias keeps
        // nn.Conv2d's default init.
        let weight = p.param(
            "patch_embed.proj.weight",
            &[embed_dim, in_chans, patch_size, patch_size],
            Init::XavierUniform { fan_in, fan_out: embed_dim },
        )?;
        let bias = p.param("patch_embed.proj.bias", &[embed_dim], Init::Uniform { bound: 1.0 / (fan_in as f64).sqrt() })?;
        Ok(PatchEmbed { weight, bias, patch_size, compute: p.compute_dtype() })
    }

    /// `[N, C, H, W]` -> `[N, L, D]` in f32, the product in the compute dtype.
    pub(crate) fn forward(&self, imgs: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = imgs.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        // Each patch flattened in (c, i, j) order, matching the conv weight's layout.
        let patches = imgs.reshape((n, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((n * gh * gw, c * p * p))?;
        let weight = self.weight.reshape((self.weight.dim(0)?, c * p * p))?.to_dtype(self.compute)?;
        ops::linear(&patches.to_dtype(self.compute)?, &weight, &self.bias)?.to_dtype(DType::F32)?.reshape((n, gh * gw, ()))
    }
}

/// A PCA target's basis (`crate::pca`), f32 on the model's device: the mean patch
/// `[p*p*C]` and the kept principal axes `[k, p*p*C]` (orthonormal rows).
#[derive(Clone)]
pub struct PcaBasis {
    pub mean: Tensor,
    pub components: Tensor,
}

impl PcaBasis {
    /// Patches `[N, L, p*p*C]` -> their coefficients `[N, L, k]`: `(x - mean) @ components^T`.
    pub fn coefficients(&self, patches: &Tensor) -> Result<Tensor> {
        let (n, l, d) = patches.dims3()?;
        let centred = patches.broadcast_sub(&self.mean)?.reshape((n * l, d))?;
        Ok(centred.matmul(&self.components.t()?)?.reshape((n, l, ()))?)
    }

    /// Coefficients `[N, L, k]` -> patches `[N, L, p*p*C]`: `coef @ components + mean`.
    pub fn patches(&self, coefficients: &Tensor) -> Result<Tensor> {
        let (n, l, k) = coefficients.dims3()?;
        let flat = coefficients.reshape((n * l, k))?.matmul(&self.components)?;
        Ok(flat.broadcast_add(&self.mean)?.reshape((n, l, ()))?)
    }
}

pub struct MaskedAutoencoder {
    pub config: MaeConfig,
    device: Device,
    precision: Precision,
    params: Vec<(String, Var)>,
    /// Fixed (not trainable) tables, `[1, 1 + L, D]` and `[1, 1 + L, D_dec]`.
    pos_embed: Tensor,
    decoder_pos_embed: Tensor,
    /// The basis of a PCA target, once fitted (pre-training fits it) or loaded.
    pca: Option<PcaBasis>,
    /// Drawn from when a forward pass is not given noise.
    mask_rng: Mutex<ChaCha8Rng>,
    /// The engine plan of the last call on the CPU in f32, reused while the batch shape
    /// stays the same (its buffers are allocated once).
    engine: Mutex<Option<MaeEngine>>,
    /// Every call on this reference model, wherever the engine could run it.
    reference_only: bool,

    patch_embed: PatchEmbed,
    cls_token: Tensor,
    /// Only with `config.encoder_mask_token` (Table 1c).
    encoder_mask_token: Option<Tensor>,
    blocks: Vec<Block>,
    norm: LayerNorm,

    decoder_embed: Linear,
    mask_token: Tensor,
    decoder_blocks: Vec<Block>,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
}

/// What a model keeps while a training engine holds its weights.
pub struct Unloaded {
    config: MaeConfig,
    device: Device,
    precision: Precision,
    pos_embed: Tensor,
    decoder_pos_embed: Tensor,
    pca: Option<PcaBasis>,
    mask_rng: ChaCha8Rng,
    reference_only: bool,
}

/// The fixed tensors of a model, by checkpoint name: the position tables, and the PCA
/// basis when there is one.
fn fixed_tensors<'a>(pos_embed: &'a Tensor, decoder_pos_embed: &'a Tensor, pca: Option<&'a PcaBasis>) -> Vec<(&'static str, &'a Tensor)> {
    let mut buffers = vec![("pos_embed", pos_embed), ("decoder_pos_embed", decoder_pos_embed)];
    if let Some(basis) = pca {
        buffers.extend([(PCA_MEAN, &basis.mean), (PCA_COMPONENTS, &basis.components)]);
    }
    buffers
}

impl Unloaded {
    /// The fixed tensors (position tables, PCA basis), by checkpoint name.
    pub(crate) fn buffers(&self) -> Vec<(&'static str, &Tensor)> {
        fixed_tensors(&self.pos_embed, &self.decoder_pos_embed, self.pca.as_ref())
    }

    /// Makes `model` whole again, each parameter (in the published order) set from `values`.
    pub(crate) fn reload(self, model: &mut MaskedAutoencoder, values: Values<'_>) -> Result<()> {
        let (device, precision) = (self.device.clone(), self.precision);
        *model = self.build(ParamBuilder::given(values, device, precision))?;
        Ok(())
    }

    /// The modules of `models_mae.py`, their parameters from `p`.
    fn build(self, mut p: ParamBuilder<'_>) -> Result<MaskedAutoencoder> {
        let c = &self.config;
        let patch_embed = PatchEmbed::new(&mut p, c.in_chans, c.patch_size, c.embed_dim)?;
        let cls_token = p.param("cls_token", &[1, 1, c.embed_dim], Init::Normal { std: 0.02 })?;
        let encoder_mask_token = c.encoder_mask_token.then(|| p.param("encoder_mask_token", &[1, 1, c.embed_dim], Init::Normal { std: 0.02 })).transpose()?;
        let blocks = (0..c.depth)
            .map(|i| Block::new(&mut p, &format!("blocks.{i}"), c.embed_dim, c.num_heads, c.mlp_hidden(), c.layer_norm_eps))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = LayerNorm::new(&mut p, "norm", c.embed_dim, c.layer_norm_eps)?;

        let decoder_embed = Linear::new(&mut p, "decoder_embed", c.embed_dim, c.decoder_embed_dim)?;
        let mask_token = p.param("mask_token", &[1, 1, c.decoder_embed_dim], Init::Normal { std: 0.02 })?;
        let decoder_blocks = (0..c.decoder_depth)
            .map(|i| {
                let name = format!("decoder_blocks.{i}");
                Block::new(&mut p, &name, c.decoder_embed_dim, c.decoder_num_heads, c.decoder_mlp_hidden(), c.layer_norm_eps)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let decoder_norm = LayerNorm::new(&mut p, "decoder_norm", c.decoder_embed_dim, c.layer_norm_eps)?;
        let decoder_pred = Linear::new(&mut p, "decoder_pred", c.decoder_embed_dim, c.pred_dim())?;
        let params = p.finish();

        let Unloaded { config, device, precision, pos_embed, decoder_pos_embed, pca, mask_rng, reference_only } = self;
        Ok(MaskedAutoencoder {
            config,
            device,
            precision,
            params,
            pos_embed,
            decoder_pos_embed,
            pca,
            mask_rng: Mutex::new(mask_rng),
            engine: Mutex::new(None),
            reference_only,
            patch_embed,
            cls_token,
            encoder_mask_token,
            blocks,
            norm,
            decoder_embed,
            mask_token,
            decoder_blocks,
            decoder_norm,
            decoder_pred,
        })
    }
}

impl MaskedAutoencoder {
    /// A freshly initialised model computing in `precision`. Everything random
    /// (weights, later masks) derives from `seed`.
    pub fn new(config: MaeConfig, device: &Device, precision: Precision, seed: u64) -> Result<Self> {
        config.validate()?;
        config.check_memory()?;
        let (l, grid) = (config.num_patches(), config.grid_size());
        let pos_embed = Tensor::from_vec(sincos_2d_with_cls(config.embed_dim, grid), (1, l + 1, config.embed_dim), device)?;
        let decoder_pos_embed = Tensor::from_vec(sincos_2d_with_cls(config.decoder_embed_dim, grid), (1, l + 1, config.decoder_embed_dim), device)?;
        let unloaded = Unloaded {
            config,
            device: device.clone(),
            precision,
            pos_embed,
            decoder_pos_embed,
            pca: None,
            // A stream of its own, so masks do not depend on how many weights were drawn.
            mask_rng: ChaCha8Rng::seed_from_u64(seed ^ 0x6d61_736b),
            reference_only: false,
        };
        unloaded.build(ParamBuilder::new(ChaCha8Rng::seed_from_u64(seed), device.clone(), precision))
    }

    /// Drops the weights while a training engine holds them, so that they live in
    /// memory once; until `Unloaded::reload`, this model is hollow (every parameter
    /// empty) and is not to be used.
    pub fn unload(&mut self) -> Result<Unloaded> {
        let unloaded = self.shell();
        *self = self.shell().build(ParamBuilder::hollow(self.device.clone(), self.precision))?;
        Ok(unloaded)
    }

    /// Everything but the weights.
    fn shell(&self) -> Unloaded {
        Unloaded {
            config: self.config.clone(),
            device: self.device.clone(),
            precision: self.precision,
            pos_embed: self.pos_embed.clone(),
            decoder_pos_embed: self.decoder_pos_embed.clone(),
            pca: self.pca.clone(),
            mask_rng: self.mask_rng.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            reference_only: self.reference_only,
        }
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

    /// The fixed tensors (the position tables, and a PCA target's basis once there is
    /// one), by checkpoint name.
    pub fn buffers(&self) -> Vec<(&'static str, &Tensor)> {
        fixed_tensors(&self.pos_embed, &self.decoder_pos_embed, self.pca.as_ref())
    }

    /// A PCA target's basis, when it has one.
    pub fn pca_basis(&self) -> Option<&PcaBasis> {
        self.pca.as_ref()
    }

    /// The basis of a PCA target, or `E_CONFIG` saying how to get one.
    pub(crate) fn require_pca_basis(&self) -> Result<&PcaBasis> {
        match &self.pca {
            Some(basis) => Ok(basis),
            None => bail!(
                InvalidConfig,
                "this model's target is 'pca' and it has no PCA basis yet: pre-training computes one from the training images, and checkpoints of such a model hold it (pca_mean, pca_components)"
            ),
        }
    }

    /// Sets a PCA target's basis: `mean` `[p*p*C]` and `components` `[k, p*p*C]`.
    pub fn set_pca_basis(&mut self, mean: &Tensor, components: &Tensor) -> Result<()> {
        let Target::Pca { components: k } = self.config.target else {
            bail!(InvalidConfig, "a PCA basis applies only to a model whose target is 'pca'");
        };
        let d = self.config.patch_dim();
        if mean.dims() != [d] || components.dims() != [k, d] {
            bail!(CheckpointShape, "the PCA basis must be {PCA_MEAN} [{d}] and {PCA_COMPONENTS} [{k}, {d}] for this config, got {:?} and {:?}", mean.dims(), components.dims());
        }
        let on_device = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?) };
        self.pca = Some(PcaBasis { mean: on_device(mean)?, components: on_device(components)? });
        Ok(())
    }

    /// Replaces a fixed table (loaded checkpoints carry their own copy).
    pub(crate) fn set_buffer(&mut self, name: &str, value: Tensor) -> Result<()> {
        let slot = match name {
            "pos_embed" => &mut self.pos_embed,
            "decoder_pos_embed" => &mut self.decoder_pos_embed,
            _ => bail!(Internal, "no buffer named {name}"),
        };
        if slot.dims() != value.dims() {
            bail!(CheckpointShape, "{name}: checkpoint has shape {:?}, the config needs {:?}", value.dims(), slot.dims());
        }
        *slot = value.to_device(&self.device)?.to_dtype(DType::F32)?;
        Ok(())
    }

    /// Checks that host images are `[N, C, H, W]` with the config's channels and size.
    pub fn images_to_tensor(&self, imgs: &HostTensor) -> Result<Tensor> {
        let c = &self.config;
        let ok = imgs.shape.len() == 4
            && imgs.shape[0] > 0
            && imgs.shape[1] == c.in_chans
            && imgs.shape[2] == c.img_size
            && imgs.shape[3] == c.img_size;
        if !ok {
            bail!(
                InvalidShape,
                "images must have shape [N, {}, {}, {}] (N >= 1) for this model, got {:?}",
                c.in_chans,
                c.img_size,
                c.img_size,
                imgs.shape
            );
        }
        imgs.check_finite("images")?;
        imgs.to_tensor(&self.device)
    }

    /// The mask for a batch of `n` images.
    pub fn mask_plan(&self, n: usize, options: &MaskOptions) -> Result<MaskPlan> {
        let mut rng = self.mask_rng.lock().unwrap_or_else(|e| e.into_inner());
        options.plan(&self.config, &mut *rng, n)
    }

    /// Encoder on the visible patches only: `[N, 1 + len_keep, D]`; with
    /// `config.encoder_mask_token`, on every patch, the removed ones replaced by the
    /// encoder's mask token: `[N, 1 + L, D]`.
    pub fn forward_encoder(&self, imgs: &Tensor, plan: &MaskPlan) -> Result<Tensor> {
        let x = self.patch_embed.forward(imgs)?;
        let (n, l, d) = x.dims3()?;
        let x = match &self.encoder_mask_token {
            Some(token) => {
                let mask = Tensor::from_vec(plan.mask().into_iter().flatten().collect::<Vec<f32>>(), (n, l, 1), &self.device)?;
                (x.broadcast_mul(&(1.0 - &mask)?)? + mask.broadcast_mul(token)?)?
            }
            None => x,
        };
        let x = x.broadcast_add(&self.pos_embed.narrow(1, 1, l)?)?;

        let x = if self.encoder_mask_token.is_some() { x } else { self.keep_visible(&x, plan)? };
        let cls_token = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)?)?.broadcast_as((n, 1, d))?;
        let mut x = Tensor::cat(&[&cls_token, &x], 1)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// The visible patches of `x` `[N, L, D]`, in the plan's order: `[N, len_keep, D]`.
    fn keep_visible(&self, x: &Tensor, plan: &MaskPlan) -> Result<Tensor> {
        let (n, _, d) = x.dims3()?;
        let ids_keep: Vec<u32> = plan.ids_shuffle.iter().flat_map(|ids| ids[..plan.len_keep].iter().copied()).collect();
        let ids_keep = Tensor::from_vec(ids_keep, (n, plan.len_keep, 1), &self.device)?.broadcast_as((n, plan.len_keep, d))?.contiguous()?;
        Ok(x.gather(&ids_keep, 1)?)
    }

    /// Decoder over all patches: `[N, L, pred_dim]` (`p*p*C`, or the PCA coefficients).
    pub fn forward_decoder(&self, latent: &Tensor, plan: &MaskPlan) -> Result<Tensor> {
        let x = self.decoder_embed.forward(latent)?.to_dtype(DType::F32)?;
        let (n, _, d) = x.dims3()?;
        let l = self.config.num_patches();
        if self.encoder_mask_token.is_some() {
            // Every patch came through the encoder, in place.
            return self.decode(x.broadcast_add(&self.decoder_pos_embed)?, l);
        }

        let visible = x.narrow(1, 1, plan.len_keep)?;
        let x_ = if plan.len_keep < l {
            let mask_tokens = self.mask_token.broadcast_as((n, l - plan.len_keep, d))?;
            Tensor::cat(&[&visible, &mask_tokens], 1)?
        } else {
            visible
        };
        let ids_restore: Vec<u32> = plan.ids_restore().into_iter().flatten().collect();
        let ids_restore = Tensor::from_vec(ids_restore, (n, l, 1), &self.device)?.broadcast_as((n, l, d))?.contiguous()?;
        let x_ = x_.contiguous()?.gather(&ids_restore, 1)?;
        let x = Tensor::cat(&[&x.narrow(1, 0, 1)?, &x_], 1)?.broadcast_add(&self.decoder_pos_embed)?;
        self.decode(x, l)
    }

    /// The decoder blocks, norm and prediction on `[N, 1 + L, D_dec]`, without the cls token.
    fn decode(&self, mut x: Tensor, l: usize) -> Result<Tensor> {
        for blk in &self.decoder_blocks {
            x = blk.forward(&x)?;
        }
        let x = self.decoder_pred.forward(&self.decoder_norm.forward(&x)?)?.to_dtype(DType::F32)?;
        Ok(x.narrow(1, 1, l)?)
    }

    /// `imgs` `[N, C, H, W]` -> `[N, L, p*p*C]`, each patch in (i, j, c) order.
    pub fn patchify(&self, imgs: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = imgs.dims4()?;
        let p = self.config.patch_size;
        let (gh, gw) = (h / p, w / p);
        Ok(imgs.reshape((n, c, gh, p, gw, p))?.permute((0, 2, 4, 3, 5, 1))?.reshape((n, gh * gw, p * p * c))?)
    }

    /// The inverse of `patchify`: `[N, L, p*p*C]` -> `[N, C, H, W]`.
    pub fn unpatchify(&self, x: &Tensor) -> Result<Tensor> {
        let (n, l, _) = x.dims3()?;
        let (p, c) = (self.config.patch_size, self.config.in_chans);
        let g = (l as f64).sqrt() as usize;
        if g * g != l {
            bail!(InvalidShape, "unpatchify needs a square number of patches, got {l}");
        }
        Ok(x.reshape((n, g, g, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((n, c, g * p, g * p))?)
    }

    /// Mean squared error on the removed patches only, against the config's target:
    /// pixels, per-patch normalised pixels (unbiased variance, as published), or the
    /// patches' PCA coefficients.
    pub fn forward_loss(&self, imgs: &Tensor, pred: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let patches = self.patchify(imgs)?;
        let target = match self.config.target {
            Target::Pixels => patches,
            Target::NormPixels => {
                let mean = patches.mean_keepdim(D::Minus1)?;
                let var = patches.var_keepdim(D::Minus1)?;
                patches.broadcast_sub(&mean)?.broadcast_div(&(var + 1e-6)?.sqrt()?)?
            }
            Target::Pca { .. } => self.require_pca_basis()?.coefficients(&patches)?,
        };
        let loss = (pred - target)?.sqr()?.mean(D::Minus1)?;
        // Published: sum / mask.sum(). With nothing removed (ratio 0) both are 0
        // and the loss is defined as 0 rather than NaN. Divided on the device: no
        // wait for the host inside a step.
        let removed = mask.sum_all()?.maximum(1f32)?;
        Ok(((loss * mask)?.sum_all()? / removed)?)
    }

    /// The published `forward(imgs, mask_ratio)`: on the engine on the CPU in f32, else
    /// the reference model.
    pub fn forward(&self, imgs: &Tensor, options: &MaskOptions) -> Result<ForwardOutput> {
        let n = imgs.dim(0)?;
        let plan = self.mask_plan(n, options)?;
        if !self.uses_engine() {
            return self.forward_with_plan(imgs, &plan);
        }
        let l = self.config.num_patches();
        let pixels = imgs.flatten_all()?.to_vec1::<f32>()?;
        self.with_engine(n, plan.len_keep, Mode::Forward, |engine| {
            let loss = engine.run_forward(&pixels, &plan)?;
            let tokens = if self.config.encoder_mask_token { l } else { plan.len_keep };
            let ids_restore: Vec<f32> = plan.ids_restore().into_iter().flatten().map(|i| i as f32).collect();
            Ok(ForwardOutput {
                loss: Tensor::new(loss, &self.device)?,
                pred: Tensor::from_vec(engine.pred(), (n, l, self.config.pred_dim()), &self.device)?,
                mask: Tensor::from_slice(engine.mask(), (n, l), &self.device)?,
                ids_restore: Tensor::from_vec(ids_restore, (n, l), &self.device)?,
                latent: Tensor::from_vec(engine.latent(), (n, 1 + tokens, self.config.embed_dim), &self.device)?,
                removed: l - plan.len_keep,
            })
        })
    }

    /// Whether calls run on the engine (`crate::engine`): f32 on the CPU, unless
    /// [`MaskedAutoencoder::set_reference_only`]. Elsewhere they run on this reference model.
    pub fn uses_engine(&self) -> bool {
        !self.reference_only && self.device.is_cpu() && self.precision == Precision::F32
    }

    /// Runs every call (forward passes, gradients, pre-training) on the reference model
    /// with candle's autograd, not the engine: the second oracle the tests hold the
    /// engine against.
    pub fn set_reference_only(&mut self, reference_only: bool) {
        self.reference_only = reference_only;
        *self.engine.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Runs `f` on an engine plan for `n` images keeping `len_keep` patches, loaded with
    /// this model's weights; the plan is kept for the next call of the same shape.
    pub(crate) fn with_engine<T>(&self, n: usize, len_keep: usize, mode: Mode, f: impl FnOnce(&mut MaeEngine) -> Result<T>) -> Result<T> {
        self.with_engine_at(n, len_keep, mode, Grid::square(self.config.grid_size()), f)
    }

    /// [`MaskedAutoencoder::with_engine`] for images of `grid` patches (`Mode::Encode`
    /// where it is not the model's own).
    fn with_engine_at<T>(&self, n: usize, len_keep: usize, mode: Mode, grid: Grid, f: impl FnOnce(&mut MaeEngine) -> Result<T>) -> Result<T> {
        let mut cached = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        if !cached.as_ref().is_some_and(|e| e.batch == n && e.len_keep == len_keep && e.mode == mode && e.grid == grid) {
            // The old plan's buffers go before the new ones are allocated.
            *cached = None;
            *cached = Some(MaeEngine::at_grid(&self.config, n, len_keep, mode, grid)?);
        }
        let engine = cached.as_mut().expect("set above");
        engine.load_from(self)?;
        f(engine)
    }

    pub fn forward_with_plan(&self, imgs: &Tensor, plan: &MaskPlan) -> Result<ForwardOutput> {
        let n = imgs.dim(0)?;
        let l = self.config.num_patches();
        let latent = self.forward_encoder(imgs, plan)?;
        let pred = self.forward_decoder(&latent, plan)?;
        let mask = Tensor::from_vec(plan.mask().into_iter().flatten().collect::<Vec<f32>>(), (n, l), &self.device)?;
        let loss = self.forward_loss(imgs, &pred, &mask)?;
        let ids_restore: Vec<f32> = plan.ids_restore().into_iter().flatten().map(|i| i as f32).collect();
        let ids_restore = Tensor::from_vec(ids_restore, (n, l), &self.device)?;
        Ok(ForwardOutput { loss, pred, mask, ids_restore, latent, removed: l - plan.len_keep })
    }

    /// The loss and the gradient of every trainable parameter, by published name.
    pub fn loss_and_gradients(&self, imgs: &Tensor, options: &MaskOptions) -> Result<(f32, Vec<(String, Tensor)>)> {
        let n = imgs.dim(0)?;
        let plan = self.mask_plan(n, options)?;
        if !self.uses_engine() {
            let out = self.forward_with_plan(imgs, &plan)?;
            return Ok((out.loss.to_scalar::<f32>()?, self.gradients(&out)?));
        }
        let pixels = imgs.flatten_all()?.to_vec1::<f32>()?;
        self.with_engine(n, plan.len_keep, Mode::Train, |engine| {
            engine.zero_grad();
            let loss = engine.accumulate(&pixels, &plan, 1.0)?;
            let grads = engine.grads();
            let gradients = engine
                .param_layout()
                .map(|(name, shape, range)| Ok((name.to_string(), Tensor::from_slice(&grads[range], shape, &self.device)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok((loss, gradients))
        })
    }

    /// Backpropagates a reference forward pass's loss (`forward_with_plan`) to every
    /// trainable parameter.
    pub fn gradients(&self, out: &ForwardOutput) -> Result<Vec<(String, Tensor)>> {
        let grads = out.loss.backward()?;
        // The parameters the loss cannot reach: with nothing removed it is the constant
        // 0 and the mask tokens are unused; the decoder's mask token is unused too when
        // the encoder takes the removed patches.
        let unused = |name: &str| match name {
            "mask_token" => out.removed == 0 || self.encoder_mask_token.is_some(),
            "encoder_mask_token" => out.removed == 0,
            _ => false,
        };
        let mut gradients = Vec::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let grad = match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None if unused(name) => var.zeros_like()?,
                None => bail!(Internal, "parameter {name} received no gradient"),
            };
            gradients.push((name.clone(), grad));
        }
        Ok(gradients)
    }
}

/// How token features become one vector per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Mean of the patch tokens (the cls token left out), as published global pooling.
    Mean,
    /// The cls token.
    Cls,
}

impl Pool {
    pub fn parse(name: &str) -> Result<Pool> {
        match name {
            "mean" => Ok(Pool::Mean),
            "cls" => Ok(Pool::Cls),
            other => bail!(InvalidArgument, "pool must be 'mean' or 'cls', got '{other}'"),
        }
    }

    /// `[N, 1 + L, D]` tokens (cls first) -> `[N, D]`.
    pub fn apply(self, tokens: &Tensor) -> Result<Tensor> {
        let l = tokens.dim(1)? - 1;
        Ok(match self {
            Pool::Mean => tokens.narrow(1, 1, l)?.mean(1)?,
            Pool::Cls => tokens.narrow(1, 0, 1)?.squeeze(1)?,
        })
    }
}

impl MaskedAutoencoder {
    /// Features of whole images `[N, D]`: the encoder over every patch, after its
    /// final norm, pooled. No gradient is kept.
    pub fn embed(&self, imgs: &Tensor, pool: Pool) -> Result<Tensor> {
        let (n, l, d) = (imgs.dim(0)?, self.config.num_patches(), self.config.embed_dim);
        let plan = MaskPlan::keep_all(n, l);
        if !self.uses_engine() {
            return pool.apply(&self.forward_encoder(imgs, &plan)?.detach());
        }
        let pixels = imgs.flatten_all()?.to_vec1::<f32>()?;
        let latent = self.with_engine(n, l, Mode::Encode, |engine| {
            engine.run_forward(&pixels, &plan)?;
            Ok(engine.latent())
        })?;
        pool.apply(&Tensor::from_vec(latent, (n, 1 + l, d), &self.device)?)
    }
}

impl MaskedAutoencoder {
    /// Dense features: the outputs of encoder blocks `layers` (from
    /// [`features::resolve_layers`]) over every patch of `imgs` `[N, C, H, W]`, `H` and
    /// `W` multiples of the patch size, each as a map `[N, D, H/p, W/p]`: the cls token
    /// dropped, no final norm (as ViTDet), the position embedding resized bicubically at
    /// other sizes. On the engine on the CPU in f32, else the reference model.
    pub fn feature_maps(&self, imgs: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        let n = imgs.dim(0)?;
        let engine = self.uses_engine().then(|| -> features::EngineBlocks<'_> {
            Box::new(move |pixels, grid| {
                let plan = MaskPlan::keep_all(n, grid.patches());
                self.with_engine_at(n, grid.patches(), Mode::Encode, grid, |e| e.block_outputs(pixels, &plan, layers))
            })
        });
        let c = &self.config;
        let encoder = features::Encoder { patch_embed: &self.patch_embed, patch_size: c.patch_size, cls_token: &self.cls_token, pos_embed: &self.pos_embed, blocks: &self.blocks };
        encoder.feature_maps(imgs, layers, engine)
    }
}

/// The published visualisation of a forward pass, all `[N, C, H, W]` in the
/// images' (normalised) space.
pub struct Reconstruction {
    pub loss: f32,
    /// `[N, L]`, 1 where a patch was removed.
    pub mask: Tensor,
    /// The input with removed patches zeroed: `x * (1 - mask)`.
    pub masked: Tensor,
    /// The decoder's prediction in pixel space (norm-pix predictions mapped back
    /// with each patch's own mean and standard deviation, PCA coefficients through the
    /// basis: `coef @ components + mean`).
    pub reconstruction: Tensor,
    /// The visible patches pasted onto the prediction: `x * (1 - mask) + y * mask`.
    pub pasted: Tensor,
}

impl MaskedAutoencoder {
    pub fn reconstruct(&self, imgs: &Tensor, options: &MaskOptions) -> Result<Reconstruction> {
        let out = self.forward(imgs, options)?;
        let pred = out.pred.detach();
        let pred = match self.config.target {
            Target::Pixels => pred,
            Target::NormPixels => {
                let target = self.patchify(imgs)?;
                let mean = target.mean_keepdim(D::Minus1)?;
                let std = (target.var_keepdim(D::Minus1)? + 1e-6)?.sqrt()?;
                pred.broadcast_mul(&std)?.broadcast_add(&mean)?
            }
            Target::Pca { .. } => self.require_pca_basis()?.patches(&pred)?,
        };
        let reconstruction = self.unpatchify(&pred)?;
        let (n, l) = out.mask.dims2()?;
        let mask = self.unpatchify(&out.mask.unsqueeze(2)?.broadcast_as((n, l, self.config.patch_dim()))?.contiguous()?)?;
        let visible = (1.0 - &mask)?;
        let masked = (imgs * &visible)?;
        let pasted = (&masked + (&reconstruction * &mask)?)?;
        Ok(Reconstruction { loss: out.loss.to_scalar::<f32>()?, mask: out.mask, masked, reconstruction, pasted })
    }
}
