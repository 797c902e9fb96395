//! Dense features for detection and segmentation (the paper's Tables 4-5, through
//! ViTDet): the encoder's patch tokens as `[N, D, H/p, W/p]` maps, at the model's image
//! size or any other whose sides are multiples of the patch size (the position
//! embedding then resized as the published `interpolate_pos_embed` does), and the
//! parameter-free part of ViTDet's simple feature pyramid.

use crate::bail;
use crate::classifier::resize_pos_embed;
use crate::engine::Grid;
use crate::error::Result;
use crate::model::{HostTensor, PatchEmbed};
use crate::nn::Block;
use candle_core::Tensor;

/// The encoder blocks whose outputs become maps: `layers` as block indices, negative
/// ones counted from the end (-1 is the last block), in the order given.
pub fn resolve_layers(layers: &[i64], depth: usize) -> Result<Vec<usize>> {
    if layers.is_empty() {
        bail!(InvalidArgument, "layers must name at least one block");
    }
    layers
        .iter()
        .map(|&layer| {
            let index = if layer < 0 { depth as i64 + layer } else { layer };
            if !(0..depth as i64).contains(&index) {
                bail!(InvalidArgument, "layer {layer} is not a block of this {depth}-block encoder (0..{depth}, or -{depth}..-1 from the end)");
            }
            Ok(index as usize)
        })
        .collect()
}

/// Checks that host images are `[N, in_chans, H, W]` with `H` and `W` positive multiples
/// of the patch size, the size that dense features accept.
pub fn check_images(imgs: &HostTensor, in_chans: usize, patch_size: usize) -> Result<()> {
    let ok = imgs.shape.len() == 4
        && imgs.shape[0] > 0
        && imgs.shape[1] == in_chans
        && imgs.shape[2] > 0
        && imgs.shape[3] > 0
        && imgs.shape[2] % patch_size == 0
        && imgs.shape[3] % patch_size == 0;
    if !ok {
        bail!(
            InvalidShape,
            "images must have shape [N, {in_chans}, H, W] (N >= 1) with H and W positive multiples of the patch size {patch_size}, got {:?}",
            imgs.shape
        );
    }
    imgs.check_finite("images")
}

/// The encoder's weights that dense features use, borrowed from a model.
pub(crate) struct Encoder<'a> {
    pub patch_embed: &'a PatchEmbed,
    pub patch_size: usize,
    pub cls_token: &'a Tensor,
    /// `[1, 1 + grid*grid, D]`, for the model's own image size.
    pub pos_embed: &'a Tensor,
    pub blocks: &'a [Block],
}

/// What runs a model's engine plan: the pixels of images of a patch grid in, the
/// outputs `[N, 1 + L, D]` of the requested blocks out.
pub(crate) type EngineBlocks<'a> = Box<dyn FnOnce(&[f32], Grid) -> Result<Vec<Vec<f32>>> + 'a>;

impl Encoder<'_> {
    /// The outputs of blocks `layers` (from [`resolve_layers`]) over every patch of
    /// `imgs` `[N, C, H, W]` (no masking), the cls token dropped, each as a map
    /// `[N, D, H/p, W/p]`. No final norm: ViTDet takes the last block's output as it is.
    /// On `engine` when given (which resizes the position embedding itself), else here.
    pub fn feature_maps(&self, imgs: &Tensor, layers: &[usize], engine: Option<EngineBlocks<'_>>) -> Result<Vec<Tensor>> {
        let (n, _, h, w) = imgs.dims4()?;
        let (gh, gw) = (h / self.patch_size, w / self.patch_size);
        let d = self.pos_embed.dim(2)?;
        if let Some(run) = engine {
            let outputs = run(&imgs.flatten_all()?.to_vec1::<f32>()?, Grid { h: gh, w: gw })?;
            return outputs.into_iter().map(|x| tokens_to_map(&Tensor::from_vec(x, (n, 1 + gh * gw, d), imgs.device())?, gh, gw)).collect();
        }
        let x = self.patch_embed.forward(imgs)?;
        let pos_embed = resize_pos_embed(self.pos_embed, gh, gw)?;
        let cls = self.cls_token.broadcast_as((n, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&pos_embed)?;
        let last = layers.iter().copied().max().unwrap_or(0);
        let mut outputs = Vec::with_capacity(last + 1);
        for blk in &self.blocks[..=last] {
            x = blk.forward(&x)?;
            outputs.push(x.clone());
        }
        layers.iter().map(|&i| tokens_to_map(&outputs[i].detach(), gh, gw)).collect()
    }
}

/// `[N, 1 + gh*gw, D]` tokens (cls first, patches row-major) -> the patch tokens as a
/// map `[N, D, gh, gw]`.
pub fn tokens_to_map(tokens: &Tensor, gh: usize, gw: usize) -> Result<Tensor> {
    let (n, _, d) = tokens.dims3()?;
    Ok(tokens.narrow(1, 1, gh * gw)?.reshape((n, gh, gw, d))?.permute((0, 3, 1, 2))?.contiguous()?)
}

/// The parameter-free part of ViTDet's simple feature pyramid over a map `[N, D, h, w]`
/// (stride p): scales 4, 2, 1 and 1/2 (strides 4, 8, 16, 32 at patch 16). Upsampling is
/// nearest-neighbour (each value repeated, as FPN's top-down path upsamples), the 1/2
/// scale ViTDet's 2x2 max-pool with stride 2 (odd sides floored). ViTDet's learnable
/// deconvolutions and convolutions are the detector's to add and train.
pub fn simple_pyramid(map: &Tensor) -> Result<[Tensor; 4]> {
    let (_, _, h, w) = map.dims4()?;
    if h < 2 || w < 2 {
        bail!(InvalidShape, "the feature pyramid's stride-32 level needs a map of at least 2x2 patches, got {h}x{w}");
    }
    Ok([map.upsample_nearest2d(4 * h, 4 * w)?, map.upsample_nearest2d(2 * h, 2 * w)?, map.clone(), map.max_pool2d(2)?])
}

/// A model whose encoder gives dense features.
pub trait DenseFeatures {
    /// The encoder's input channels, patch size and depth.
    fn encoder_shape(&self) -> (usize, usize, usize);
    fn device(&self) -> &candle_core::Device;
    /// Maps of blocks `layers` (resolved indices) of images already checked.
    fn feature_maps(&self, imgs: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>>;
}

/// The two models answer alike: their own `feature_maps`, their config's encoder shape.
macro_rules! dense_features_of {
    ($($model:ty),*) => {$(
        impl DenseFeatures for $model {
            fn encoder_shape(&self) -> (usize, usize, usize) {
                (self.config.in_chans, self.config.patch_size, self.config.depth)
            }
            fn device(&self) -> &candle_core::Device {
                self.device()
            }
            fn feature_maps(&self, imgs: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
                self.feature_maps(imgs, layers)
            }
        }
    )*};
}

dense_features_of!(crate::MaskedAutoencoder, crate::VitClassifier);

/// What [`dense_features`] returns.
pub struct FeatureMaps {
    /// One `[N, D, H/p, W/p]` map per requested block, in the order asked.
    pub maps: Vec<Tensor>,
    /// [`simple_pyramid`] of the last of `maps`, when asked for.
    pub pyramid: Option<[Tensor; 4]>,
}

/// Dense features of host images `[N, C, H, W]` (sides multiples of the patch size):
/// the maps of blocks `layers` (negative from the end), and the simple feature pyramid
/// of the last one with `pyramid`.
pub fn dense_features(model: &impl DenseFeatures, imgs: &HostTensor, layers: &[i64], pyramid: bool) -> Result<FeatureMaps> {
    let (in_chans, patch_size, depth) = model.encoder_shape();
    let layers = resolve_layers(layers, depth)?;
    check_images(imgs, in_chans, patch_size)?;
    let maps = model.feature_maps(&imgs.to_tensor(model.device())?, &layers)?;
    let pyramid = if pyramid { Some(simple_pyramid(maps.last().expect("at least one layer"))?) } else { None };
    Ok(FeatureMaps { maps, pyramid })
}
