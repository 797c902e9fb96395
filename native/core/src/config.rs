//! Model configuration: the published `MaskedAutoencoderViT` arguments in camelCase.

use crate::bail;
use crate::error::Result;
use crate::memory;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};

/// What the decoder predicts for each removed patch: the paper's Table 1d.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The patch's pixels (the published `norm_pix_loss=False`).
    Pixels,
    /// The patch's pixels normalised by their own mean and (unbiased) standard deviation
    /// (the published `norm_pix_loss=True`).
    NormPixels,
    /// The patch's coefficients on the `components` leading principal axes of the training
    /// set's patches (`(patch - mean) @ components^T`): the paper's "PCA" row, 96 of 768.
    Pca { components: usize },
}

/// The names `target` takes in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TargetName {
    Pixels,
    NormPixels,
    Pca,
}

impl Target {
    /// The published `norm_pix_loss` flag: true exactly for [`Target::NormPixels`].
    pub fn norm_pix_loss(self) -> bool {
        self == Target::NormPixels
    }

    /// Values `pred` holds per patch for a patch of `patch_dim` pixels.
    pub fn pred_dim(self, patch_dim: usize) -> usize {
        match self {
            Target::Pca { components } => components,
            Target::Pixels | Target::NormPixels => patch_dim,
        }
    }

    /// The PCA coefficients kept, for a PCA target.
    pub fn pca_components(self) -> Option<usize> {
        match self {
            Target::Pca { components } => Some(components),
            Target::Pixels | Target::NormPixels => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::Pixels => "pixels",
            Target::NormPixels => "normPixels",
            Target::Pca { .. } => "pca",
        }
    }
}

/// `normPixLoss` always (the published flag); `target` and `pcaComponents` only for a
/// PCA target, so that the JSON of every pixel-target config stays as it was before
/// targets were named (the two pixel targets are what `normPixLoss` says).
impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("normPixLoss", &self.norm_pix_loss())?;
        if let Target::Pca { components } = self {
            map.serialize_entry("target", self.name())?;
            map.serialize_entry("pcaComponents", components)?;
        }
        map.end()
    }
}

/// The PCA coefficients a `target: 'pca'` config keeps when it does not say: an eighth of
/// a patch's values (at least one), the paper's 96 of 768 for 16x16x3 patches.
pub fn default_pca_components(patch_dim: usize) -> usize {
    (patch_dim / 8).max(1)
}

/// The arguments of the published `MaskedAutoencoderViT`, camelCased.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MaeConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub mlp_ratio: f64,
    /// Serialised as `normPixLoss` (and, for PCA, `target` and `pcaComponents`).
    #[serde(flatten)]
    pub target: Target,
    pub layer_norm_eps: f64,
    /// Table 1c of the paper: the encoder also takes the removed patches, as a learned
    /// `encoder_mask_token` plus their position embedding (not the published model,
    /// which skips them; for measuring what skipping them saves).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encoder_mask_token: bool,
}

/// A partial configuration as found in JSON: either spelling of each name,
/// unknown names rejected (user input) or ignored (checkpoint metadata).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigPatch {
    #[serde(alias = "img_size")]
    pub img_size: Option<usize>,
    #[serde(alias = "patch_size")]
    pub patch_size: Option<usize>,
    #[serde(alias = "in_chans")]
    pub in_chans: Option<usize>,
    #[serde(alias = "embed_dim")]
    pub embed_dim: Option<usize>,
    pub depth: Option<usize>,
    #[serde(alias = "num_heads")]
    pub num_heads: Option<usize>,
    #[serde(alias = "decoder_embed_dim")]
    pub decoder_embed_dim: Option<usize>,
    #[serde(alias = "decoder_depth")]
    pub decoder_depth: Option<usize>,
    #[serde(alias = "decoder_num_heads")]
    pub decoder_num_heads: Option<usize>,
    #[serde(alias = "mlp_ratio")]
    pub mlp_ratio: Option<f64>,
    #[serde(alias = "norm_pix_loss")]
    pub norm_pix_loss: Option<bool>,
    /// The same choice as `norm_pix_loss`, named; the two must agree when both are given.
    pub target: Option<TargetName>,
    #[serde(alias = "pca_components")]
    pub pca_components: Option<usize>,
    #[serde(alias = "layer_norm_eps")]
    pub layer_norm_eps: Option<f64>,
    #[serde(alias = "encoder_mask_token")]
    pub encoder_mask_token: Option<bool>,
}

const FIELDS: [&str; 15] = [
    "imgSize", "patchSize", "inChans", "embedDim", "depth", "numHeads", "decoderEmbedDim",
    "decoderDepth", "decoderNumHeads", "mlpRatio", "normPixLoss", "target", "pcaComponents", "layerNormEps", "encoderMaskToken",
];

/// `imgSize` -> `img_size`: the published spelling of a camelCase field name.
pub(crate) fn snake_case(name: &str) -> String {
    name.chars()
        .flat_map(|c| if c.is_ascii_uppercase() { vec!['_', c.to_ascii_lowercase()] } else { vec![c] })
        .collect()
}

impl ConfigPatch {
    /// Parses a JSON object. With `strict`, names that are not config fields are an error.
    pub fn from_json(value: &serde_json::Value, strict: bool) -> Result<Self> {
        let Some(object) = value.as_object() else {
            bail!(InvalidConfig, "config must be an object, got {value}");
        };
        if strict {
            let unknown: Vec<&String> = object
                .keys()
                .filter(|k| !FIELDS.iter().any(|f| *f == k.as_str() || snake_case(f) == k.as_str()))
                .collect();
            if !unknown.is_empty() {
                bail!(InvalidConfig, "unknown config field(s): {unknown:?}; known fields: {FIELDS:?}");
            }
        }
        let known: serde_json::Map<String, serde_json::Value> = object
            .iter()
            .filter(|(k, _)| FIELDS.iter().any(|f| *f == k.as_str() || snake_case(f) == k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        serde_json::from_value(serde_json::Value::Object(known))
            .map_err(|e| crate::error::Error::new(crate::error::ErrorCode::InvalidConfig, format!("invalid config: {e}")))
    }

    /// Fills the fields this patch sets into `base`. `normPixLoss` and `target` name one
    /// choice: contradicting each other, or `pcaComponents` without a PCA target, is
    /// `E_CONFIG`.
    pub fn apply_to(&self, base: &MaeConfig) -> Result<MaeConfig> {
        let name = match (self.target, self.norm_pix_loss) {
            (Some(name), Some(norm_pix)) if norm_pix != (name == TargetName::NormPixels) => {
                bail!(InvalidConfig, "normPixLoss {norm_pix} contradicts target '{}': normPixLoss is true exactly for target 'normPixels'", target_name(name))
            }
            (Some(name), _) => name,
            (None, Some(true)) => TargetName::NormPixels,
            // Not normalised pixels: raw pixels in place of normalised ones, else the base's.
            (None, Some(false)) if base.target == Target::NormPixels => TargetName::Pixels,
            (None, _) => base_name(base.target),
        };
        let patch_dim = self.patch_size.unwrap_or(base.patch_size).saturating_mul(self.patch_size.unwrap_or(base.patch_size)).saturating_mul(self.in_chans.unwrap_or(base.in_chans));
        let target = match name {
            TargetName::Pixels | TargetName::NormPixels if self.pca_components.is_some() => {
                bail!(InvalidConfig, "pcaComponents applies only to target 'pca' (the target here is '{}')", target_name(name))
            }
            TargetName::Pixels => Target::Pixels,
            TargetName::NormPixels => Target::NormPixels,
            TargetName::Pca => Target::Pca {
                components: self.pca_components.or(base.target.pca_components()).unwrap_or_else(|| default_pca_components(patch_dim)),
            },
        };
        Ok(MaeConfig {
            img_size: self.img_size.unwrap_or(base.img_size),
            patch_size: self.patch_size.unwrap_or(base.patch_size),
            in_chans: self.in_chans.unwrap_or(base.in_chans),
            embed_dim: self.embed_dim.unwrap_or(base.embed_dim),
            depth: self.depth.unwrap_or(base.depth),
            num_heads: self.num_heads.unwrap_or(base.num_heads),
            decoder_embed_dim: self.decoder_embed_dim.unwrap_or(base.decoder_embed_dim),
            decoder_depth: self.decoder_depth.unwrap_or(base.decoder_depth),
            decoder_num_heads: self.decoder_num_heads.unwrap_or(base.decoder_num_heads),
            mlp_ratio: self.mlp_ratio.unwrap_or(base.mlp_ratio),
            target,
            layer_norm_eps: self.layer_norm_eps.unwrap_or(base.layer_norm_eps),
            encoder_mask_token: self.encoder_mask_token.unwrap_or(base.encoder_mask_token),
        })
    }

    /// The complete config this patch describes, with the published defaults
    /// (`mlpRatio` 4, `normPixLoss` false, `layerNormEps` 1e-6) for the optional fields.
    /// The fields a complete config needs that this one lacks (camelCase).
    pub fn missing(&self) -> Vec<&'static str> {
        [
            ("imgSize", self.img_size.is_none()),
            ("patchSize", self.patch_size.is_none()),
            ("inChans", self.in_chans.is_none()),
            ("embedDim", self.embed_dim.is_none()),
            ("depth", self.depth.is_none()),
            ("numHeads", self.num_heads.is_none()),
            ("decoderEmbedDim", self.decoder_embed_dim.is_none()),
            ("decoderDepth", self.decoder_depth.is_none()),
            ("decoderNumHeads", self.decoder_num_heads.is_none()),
        ]
        .into_iter()
        .filter_map(|(name, absent)| absent.then_some(name))
        .collect()
    }

    /// The fields this config sets, as camelCase JSON.
    pub fn known(&self) -> serde_json::Map<String, serde_json::Value> {
        let fields: [(&str, Option<serde_json::Value>); 15] = [
            ("imgSize", self.img_size.map(Into::into)),
            ("patchSize", self.patch_size.map(Into::into)),
            ("inChans", self.in_chans.map(Into::into)),
            ("embedDim", self.embed_dim.map(Into::into)),
            ("depth", self.depth.map(Into::into)),
            ("numHeads", self.num_heads.map(Into::into)),
            ("decoderEmbedDim", self.decoder_embed_dim.map(Into::into)),
            ("decoderDepth", self.decoder_depth.map(Into::into)),
            ("decoderNumHeads", self.decoder_num_heads.map(Into::into)),
            ("mlpRatio", self.mlp_ratio.map(Into::into)),
            ("normPixLoss", self.norm_pix_loss.map(Into::into)),
            ("target", self.target.map(|name| target_name(name).into())),
            ("pcaComponents", self.pca_components.map(Into::into)),
            ("layerNormEps", self.layer_norm_eps.map(Into::into)),
            ("encoderMaskToken", self.encoder_mask_token.map(Into::into)),
        ];
        fields.into_iter().filter_map(|(name, value)| Some((name.to_string(), value?))).collect()
    }

    pub fn complete(&self) -> Result<MaeConfig> {
        let missing = self.missing();
        if !missing.is_empty() {
            bail!(InvalidConfig, "config is missing field(s) {missing:?} (or name a preset)");
        }
        let defaults = MaeConfig { mlp_ratio: 4.0, target: Target::Pixels, layer_norm_eps: 1e-6, encoder_mask_token: false, ..PRESETS[0].1.clone() };
        let config = self.apply_to(&defaults)?;
        config.validate()?;
        Ok(config)
    }
}

/// Named configurations: the paper's three, plus small ones that train on a CPU.
pub const PRESETS: [(&str, MaeConfig); 7] = [
    ("mae_vit_base_patch16", preset(224, 16, 3, 768, 12, 12, 512, 8, 16, false)),
    ("mae_vit_large_patch16", preset(224, 16, 3, 1024, 24, 16, 512, 8, 16, false)),
    ("mae_vit_huge_patch14", preset(224, 14, 3, 1280, 32, 16, 512, 8, 16, false)),
    ("mae_vit_small_patch16", preset(224, 16, 3, 384, 12, 6, 256, 4, 8, false)),
    ("mae_vit_tiny_patch16", preset(224, 16, 3, 192, 12, 3, 128, 4, 4, false)),
    // The CPU benchmark's workload (64x64 images, patch 8).
    ("mae_vit_tiny_patch8_64", preset(64, 8, 3, 192, 12, 3, 128, 4, 4, false)),
    // Fashion-MNIST padded to 32x32, one channel, per-patch normalised targets.
    ("mae_vit_fmnist_patch4_32", preset(32, 4, 1, 128, 6, 4, 64, 2, 4, true)),
];

#[allow(clippy::too_many_arguments)]
/// A config with the published `mlpRatio` 4 and `layerNormEps` 1e-6.
pub const fn preset(
    img_size: usize,
    patch_size: usize,
    in_chans: usize,
    embed_dim: usize,
    depth: usize,
    num_heads: usize,
    decoder_embed_dim: usize,
    decoder_depth: usize,
    decoder_num_heads: usize,
    norm_pix_loss: bool,
) -> MaeConfig {
    MaeConfig {
        img_size,
        patch_size,
        in_chans,
        embed_dim,
        depth,
        num_heads,
        decoder_embed_dim,
        decoder_depth,
        decoder_num_heads,
        mlp_ratio: 4.0,
        target: if norm_pix_loss { Target::NormPixels } else { Target::Pixels },
        layer_norm_eps: 1e-6,
        encoder_mask_token: false,
    }
}

impl MaeConfig {
    pub fn preset(name: &str) -> Result<MaeConfig> {
        match PRESETS.iter().find(|(n, _)| *n == name) {
            Some((_, config)) => Ok(config.clone()),
            None => {
                let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                bail!(InvalidConfig, "unknown preset '{name}'; presets: {names:?}")
            }
        }
    }

    /// Patches per side.
    pub fn grid_size(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Patches per image (`L`).
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    /// Values per patch in `pred` (`p*p*C`).
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.in_chans
    }

    /// Hidden width of the encoder's MLPs, as timm computes it: `int(dim * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    pub fn decoder_mlp_hidden(&self) -> usize {
        (self.decoder_embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Checks that the config describes a model that can be built: every size in range,
    /// whole patches and heads, and the rest below. Whether it fits in memory is
    /// [`MaeConfig::check_memory`]'s question.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("imgSize", self.img_size),
            ("patchSize", self.patch_size),
            ("inChans", self.in_chans),
            ("embedDim", self.embed_dim),
            ("numHeads", self.num_heads),
            ("decoderEmbedDim", self.decoder_embed_dim),
            ("decoderNumHeads", self.decoder_num_heads),
        ];
        let depths = [("depth", self.depth), ("decoderDepth", self.decoder_depth)];
        check_encoder(&sizes, &depths, self.img_size, self.patch_size, self.embed_dim, self.num_heads, self.mlp_ratio, self.layer_norm_eps)?;
        if self.decoder_mlp_hidden() > MAX_SIZE {
            bail!(InvalidConfig, "mlpRatio {:?} makes the decoder's MLPs wider than {MAX_SIZE}", self.mlp_ratio);
        }
        // `pred` holds patchSize^2 x inChans values per patch: within MAX_SIZE, and without
        // overflowing before that is known.
        let patch_values = self.patch_size.checked_mul(self.patch_size).and_then(|v| v.checked_mul(self.in_chans));
        if patch_values.is_none_or(|v| v > MAX_SIZE) {
            bail!(InvalidConfig, "patchSize {} and inChans {} make patches of more than {MAX_SIZE} values", self.patch_size, self.in_chans);
        }
        if let Target::Pca { components } = self.target {
            if !(1..=self.patch_dim()).contains(&components) {
                bail!(InvalidConfig, "pcaComponents must be an integer from 1 to the {} values of a patch (patchSize^2 x inChans), got {components}", self.patch_dim());
            }
        }
        if self.target == Target::NormPixels && self.patch_dim() == 1 {
            bail!(
                InvalidConfig,
                "normPixLoss needs patches of at least two values (patchSize^2 x inChans is 1 here): it divides each patch by the unbiased variance of its values, which is NaN for a single value"
            );
        }
        if self.decoder_embed_dim % self.decoder_num_heads != 0 {
            bail!(
                InvalidConfig,
                "decoderEmbedDim {} is not divisible by decoderNumHeads {}",
                self.decoder_embed_dim,
                self.decoder_num_heads
            );
        }
        if self.decoder_mlp_hidden() == 0 {
            bail!(InvalidConfig, "mlpRatio must be a positive number, got {}", self.mlp_ratio);
        }
        // The 2-D sin-cos table splits each width in four (sin/cos of rows and columns).
        for (name, dim) in [("embedDim", self.embed_dim), ("decoderEmbedDim", self.decoder_embed_dim)] {
            if dim % 4 != 0 {
                bail!(InvalidConfig, "{name} {dim} must be a multiple of 4 for the 2-D sin-cos position embedding");
            }
        }
        Ok(())
    }

    /// The trainable parameters of the published model, by name, in its order.
    pub fn parameter_shapes(&self) -> Vec<NamedShape> {
        let (d, dd) = (self.embed_dim, self.decoder_embed_dim);
        let mut shapes: Vec<NamedShape> = patch_embed_shapes(self.in_chans, self.patch_size, d).into();
        shapes.push(("cls_token".to_string(), vec![1, 1, d]));
        if self.encoder_mask_token {
            shapes.push(("encoder_mask_token".to_string(), vec![1, 1, d]));
        }
        shapes.extend((0..self.depth).flat_map(|i| block_shapes(&format!("blocks.{i}"), d, self.mlp_hidden())));
        shapes.extend(norm_shapes("norm", d));
        shapes.extend(linear_shapes("decoder_embed", d, dd));
        shapes.push(("mask_token".to_string(), vec![1, 1, dd]));
        shapes.extend((0..self.decoder_depth).flat_map(|i| block_shapes(&format!("decoder_blocks.{i}"), dd, self.decoder_mlp_hidden())));
        shapes.extend(norm_shapes("decoder_norm", dd));
        shapes.extend(linear_shapes("decoder_pred", dd, self.pred_dim()));
        shapes
    }

    /// Values `pred` holds per patch: `p*p*C` pixels, or the PCA coefficients kept.
    pub fn pred_dim(&self) -> usize {
        self.target.pred_dim(self.patch_dim())
    }

    /// The fixed tensors that are not trained, by name: the sin-cos position tables, and
    /// for a PCA target the basis (`pca_mean` `[p*p*C]`, `pca_components` `[k, p*p*C]`).
    pub fn buffer_shapes(&self) -> Vec<NamedShape> {
        let rows = 1 + self.num_patches();
        let mut shapes = vec![("pos_embed".to_string(), vec![1, rows, self.embed_dim]), ("decoder_pos_embed".to_string(), vec![1, rows, self.decoder_embed_dim])];
        if let Target::Pca { components } = self.target {
            shapes.push((PCA_MEAN.to_string(), vec![self.patch_dim()]));
            shapes.push((PCA_COMPONENTS.to_string(), vec![components, self.patch_dim()]));
        }
        shapes
    }

    /// Refuses (`E_OUT_OF_MEMORY`) a valid config whose parameters (position tables
    /// included) and the largest buffer of one image's forward pass do not fit in the
    /// memory this process can allocate. Sizes are counted in 128 bits (the largest valid
    /// shapes overflow 64), before anything is allocated.
    pub fn check_memory(&self) -> Result<()> {
        let tokens = 1 + self.num_patches();
        let per_image = largest_activation(tokens, self.num_heads, self.mlp_hidden()).max(largest_activation(tokens, self.decoder_num_heads, self.decoder_mlp_hidden()));
        let (parameters, buffers) = (self.parameter_shapes(), self.buffer_shapes());
        check_model_memory("the model", parameters.iter().chain(&buffers).map(|(_, shape)| shape.as_slice()), per_image)
    }

    /// The config as JSON with the published (snake_case) names, as checkpoints store it.
    pub fn to_published_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "decoder_embed_dim": self.decoder_embed_dim,
            "decoder_depth": self.decoder_depth,
            "decoder_num_heads": self.decoder_num_heads,
            "mlp_ratio": self.mlp_ratio,
            "norm_pix_loss": self.target.norm_pix_loss(),
            "layer_norm_eps": self.layer_norm_eps,
        });
        if self.encoder_mask_token {
            json["encoder_mask_token"] = true.into();
        }
        if let Target::Pca { components } = self.target {
            json["target"] = "pca".into();
            json["pca_components"] = components.into();
        }
        json
    }
}

/// Checkpoint keys of a PCA target's basis.
pub const PCA_MEAN: &str = "pca_mean";
pub const PCA_COMPONENTS: &str = "pca_components";

fn target_name(name: TargetName) -> &'static str {
    match name {
        TargetName::Pixels => "pixels",
        TargetName::NormPixels => "normPixels",
        TargetName::Pca => "pca",
    }
}

fn base_name(target: Target) -> TargetName {
    match target {
        Target::Pixels => TargetName::Pixels,
        Target::NormPixels => TargetName::NormPixels,
        Target::Pca { .. } => TargetName::Pca,
    }
}

/// The largest size (width, side, channels, heads, classes) a config may have: shapes
/// reach JavaScript as 32-bit integers. Whether a model of such sizes fits in memory is
/// checked on its own (`check_memory`).
pub const MAX_SIZE: usize = u32::MAX as usize;

/// The most blocks an encoder or decoder may have (the published models have at most 32).
pub const MAX_DEPTH: usize = 1024;

/// The checks an encoder's settings must pass, shared by the MAE and classifier
/// configs: every size in `sizes` in 1..=[`MAX_SIZE`], every depth in
/// 1..=[`MAX_DEPTH`], whole patches, whole heads, a positive MLP ratio and LayerNorm
/// epsilon.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_encoder(
    sizes: &[(&str, usize)],
    depths: &[(&str, usize)],
    img_size: usize,
    patch_size: usize,
    embed_dim: usize,
    num_heads: usize,
    mlp_ratio: f64,
    layer_norm_eps: f64,
) -> Result<()> {
    for (fields, max) in [(sizes, MAX_SIZE), (depths, MAX_DEPTH)] {
        if let Some((name, value)) = fields.iter().find(|(_, v)| !(1..=max).contains(v)) {
            bail!(InvalidConfig, "{name} must be an integer from 1 to {max}, got {value}");
        }
    }
    if img_size % patch_size != 0 {
        bail!(InvalidConfig, "imgSize {img_size} is not a multiple of patchSize {patch_size}");
    }
    if embed_dim % num_heads != 0 {
        bail!(InvalidConfig, "embedDim {embed_dim} is not divisible by numHeads {num_heads}");
    }
    let mlp_hidden = embed_dim as f64 * mlp_ratio;
    if !(mlp_ratio.is_finite() && mlp_ratio > 0.0) || mlp_hidden < 1.0 {
        bail!(InvalidConfig, "mlpRatio must be a positive number, got {mlp_ratio}");
    }
    if mlp_hidden > MAX_SIZE as f64 {
        bail!(InvalidConfig, "mlpRatio {mlp_ratio:?} makes the MLPs wider than {MAX_SIZE}");
    }
    if !(layer_norm_eps.is_finite() && layer_norm_eps > 0.0) {
        bail!(InvalidConfig, "layerNormEps must be a positive number, got {layer_norm_eps}");
    }
    Ok(())
}

/// A parameter's published name and shape.
pub type NamedShape = (String, Vec<usize>);

/// `name.weight` `[out, inp]` and `name.bias` `[out]`: an `nn.Linear`.
pub(crate) fn linear_shapes(name: &str, inp: usize, out: usize) -> [NamedShape; 2] {
    [(format!("{name}.weight"), vec![out, inp]), (format!("{name}.bias"), vec![out])]
}

/// `name.weight` and `name.bias`, both `[dim]`: a LayerNorm.
pub(crate) fn norm_shapes(name: &str, dim: usize) -> [NamedShape; 2] {
    [(format!("{name}.weight"), vec![dim]), (format!("{name}.bias"), vec![dim])]
}

/// The parameters of the transformer block `name` (`crate::nn::Block`), in its order.
pub(crate) fn block_shapes(name: &str, dim: usize, mlp_hidden: usize) -> Vec<NamedShape> {
    [
        norm_shapes(&format!("{name}.norm1"), dim),
        linear_shapes(&format!("{name}.attn.qkv"), dim, 3 * dim),
        linear_shapes(&format!("{name}.attn.proj"), dim, dim),
        norm_shapes(&format!("{name}.norm2"), dim),
        linear_shapes(&format!("{name}.mlp.fc1"), dim, mlp_hidden),
        linear_shapes(&format!("{name}.mlp.fc2"), mlp_hidden, dim),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// `patch_embed.proj.weight` `[D, C, p, p]` and its bias `[D]`.
pub(crate) fn patch_embed_shapes(in_chans: usize, patch_size: usize, embed_dim: usize) -> [NamedShape; 2] {
    [("patch_embed.proj.weight".to_string(), vec![embed_dim, in_chans, patch_size, patch_size]), ("patch_embed.proj.bias".to_string(), vec![embed_dim])]
}

/// One transformer's share of one image's largest buffer: `tokens` rows of the
/// attention scores (`heads x tokens` each) or of the MLP's hidden layer.
pub(crate) fn largest_activation(tokens: usize, heads: usize, mlp_hidden: usize) -> u128 {
    (tokens as u128).saturating_mul((heads as u128 * tokens as u128).max(mlp_hidden as u128))
}

/// Refuses, with `E_OUT_OF_MEMORY`, a model whose weights (f32 values of `shapes`)
/// cannot be allocated, or whose weights and the largest buffer of one image's forward
/// pass (`per_image` f32 values) cannot be together. `what` names it ("the model").
pub(crate) fn check_model_memory<'a>(what: &str, shapes: impl IntoIterator<Item = &'a [usize]>, per_image: u128) -> Result<()> {
    let values = shapes.into_iter().map(|shape| shape.iter().fold(1u128, |n, &d| n.saturating_mul(d as u128))).fold(0u128, u128::saturating_add);
    let (weights, activations) = (values.saturating_mul(4), per_image.saturating_mul(4));
    memory::check(weights, |bytes| format!("{what} needs {bytes} for its parameters"))?;
    memory::check(weights.saturating_add(activations), |bytes| {
        format!("{what} needs {bytes} to run: {} for its parameters and {} for the attention scores or MLP activations of one image", memory::format_bytes(weights), memory::format_bytes(activations))
    })
}
