//! The published MAE pre-training augmentation (`RandomResizedCrop(img_size, scale=(0.2,
//! 1.0), interpolation=3)`, `RandomHorizontalFlip()`, `ToTensor()`, `Normalize(mean,
//! std)`) with torchvision's semantics, on f32 pixels; the other crops of the paper's
//! Table 1e, its color jitter, and the fine-tuning recipe's RandAugment and random erasing.

use super::rand_augment::RandAugment;
use super::{below, standard_normal, uniform01, Dataset, RawImage};
use crate::bail;
use crate::error::Result;
use rand::Rng;
use std::borrow::Cow;

/// ImageNet's per-channel mean (RGB), as used by the published pre-training.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation (RGB).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Fashion-MNIST's pixel mean (training set, pixels in [0, 1]).
pub const FASHION_MNIST_MEAN: [f32; 1] = [0.2860];
/// Fashion-MNIST's pixel standard deviation.
pub const FASHION_MNIST_STD: [f32; 1] = [0.3530];

/// The Keys cubic-convolution parameter. The published pipeline resizes PIL images,
/// and PIL's bicubic uses -0.5 (torch's tensor bicubic uses -0.75).
const CUBIC_A: f64 = -0.5;

/// How one image becomes one model input.
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    /// Output side.
    pub img_size: usize,
    /// Output channels: 1 or 3. Grayscale input is replicated to RGB; RGB input becomes
    /// gray by ITU-R 601-2 luma (`0.299 R + 0.587 G + 0.114 B`, as PIL's `convert("L")`).
    pub channels: usize,
    /// Zero-pad (background 0, before normalisation) centred to this side before
    /// cropping, e.g. 28 -> 32 (odd margins put the extra pixel bottom/right).
    pub pad_to: Option<usize>,
    /// Which region of the (padded) image is resized (bicubic) to `img_size`.
    pub crop: Crop,
    /// Side of the `Center` and `Fixed` crops as a fraction of the image's shorter side:
    /// 1 is the whole central square, 224/256 the published evaluation's
    /// `Resize(256)` + `CenterCrop(224)`.
    pub crop_fraction: f64,
    /// Range of the crop's area as a fraction of the image's (`RandomResized`); published (0.2, 1.0).
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio (width / height), drawn log-uniformly; (3/4, 4/3).
    pub ratio: (f64, f64),
    /// `RandomHorizontalFlip(p=0.5)`, after the crop.
    pub hflip: bool,
    /// `ColorJitter(brightness, contrast, saturation)` strengths after the flip (0 = off);
    /// the paper's Table 1e uses 0.4 each. See `color_jitter`.
    pub color_jitter: [f64; 3],
    /// timm's RandAugment after the flip and jitter, on 8-bit pixels (fine-tuning).
    pub rand_augment: Option<RandAugment>,
    /// timm's `RandomErasing(probability, mode='pixel')` after normalisation (0 = off).
    pub random_erasing: f64,
    /// Per output channel.
    pub mean: Vec<f32>,
    /// Per output channel.
    pub std: Vec<f32>,
}

/// The crops of the paper's Table 1e.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crop {
    /// The central square of side `crop_fraction` x the shorter side ("none": evaluation,
    /// reconstruction, and training without crop augmentation).
    Center,
    /// A square of side `crop_fraction` x the shorter side placed uniformly at random
    /// ("crop, fixed size"): `Resize(img_size / crop_fraction)` + `RandomCrop(img_size)`
    /// up to the order of resampling and cropping.
    Fixed,
    /// torchvision's `RandomResizedCrop(scale, ratio)` ("crop, rand size").
    RandomResized,
    /// The whole image, resized to a square whatever its aspect ratio: a plain resize, as
    /// torchvision's `Resize((size, size))` (an option for preprocessing users' images).
    Whole,
}

/// A crop rectangle in pixels, as torchvision's `get_params` returns it (`i, j, h, w`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows, at least 1.
    pub height: usize,
    /// Columns, at least 1.
    pub width: usize,
}

impl Augment {
    /// The published pre-training transform: random resized crop with scale (0.2, 1.0)
    /// and ratio (3/4, 4/3), horizontal flip, no padding; as many channels as `mean` has.
    pub fn pretrain(img_size: usize, mean: Vec<f32>, std: Vec<f32>) -> Augment {
        Augment {
            img_size,
            channels: mean.len(),
            pad_to: None,
            crop: Crop::RandomResized,
            crop_fraction: 1.0,
            scale: (0.2, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: true,
            color_jitter: [0.0; 3],
            rand_augment: None,
            random_erasing: 0.0,
            mean,
            std,
        }
    }

    /// The same transform without randomness (the central crop, nothing random): what
    /// evaluation and reconstruction of a model trained with `self` should see.
    pub fn evaluation(&self) -> Augment {
        Augment {
            crop: Crop::Center,
            hflip: false,
            color_jitter: [0.0; 3],
            rand_augment: None,
            random_erasing: 0.0,
            ..self.clone()
        }
    }

    /// Checks the settings; `apply` does too, and the loader calls it up front so that a
    /// bad setting fails before any thread starts.
    pub fn validate(&self) -> Result<()> {
        if self.img_size == 0 {
            bail!(InvalidArgument, "augmentation imgSize must be at least 1");
        }
        if self.channels != 1 && self.channels != 3 {
            bail!(InvalidArgument, "augmentation channels must be 1 or 3, not {}", self.channels);
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            bail!(
                InvalidArgument,
                "augmentation mean and std need {} values each (one per channel), got {} and {}",
                self.channels,
                self.mean.len(),
                self.std.len()
            );
        }
        if self.mean.iter().any(|m| !m.is_finite()) || self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            bail!(
                InvalidArgument,
                "augmentation mean must be finite and std finite and positive: {:?} / {:?}",
                self.mean,
                self.std
            );
        }
        if self.pad_to == Some(0) {
            bail!(InvalidArgument, "augmentation padTo must be at least 1");
        }
        let (s0, s1) = self.scale;
        if !(s0.is_finite() && s1.is_finite() && 0.0 < s0 && s0 <= s1) {
            bail!(InvalidArgument, "augmentation scale must satisfy 0 < min <= max, got ({s0}, {s1})");
        }
        let (r0, r1) = self.ratio;
        if !(r0.is_finite() && r1.is_finite() && 0.0 < r0 && r0 <= r1) {
            bail!(InvalidArgument, "augmentation ratio must satisfy 0 < min <= max, got ({r0}, {r1})");
        }
        if !(self.crop_fraction.is_finite() && 0.0 < self.crop_fraction && self.crop_fraction <= 1.0) {
            bail!(InvalidArgument, "augmentation cropFraction must be in (0, 1], got {}", self.crop_fraction);
        }
        if self.color_jitter.iter().any(|j| !(j.is_finite() && *j >= 0.0)) {
            bail!(InvalidArgument, "augmentation colorJitter strengths must be finite and non-negative, got {:?}", self.color_jitter);
        }
        if !(0.0..=1.0).contains(&self.random_erasing) {
            bail!(InvalidArgument, "augmentation randomErasing must be a probability in [0, 1], got {}", self.random_erasing);
        }
        if let Some(rand_augment) = &self.rand_augment {
            rand_augment.validate()?;
        }
        Ok(())
    }

    /// Returns `[channels, img_size, img_size]`, normalised `(x - mean) / std`. Draws
    /// from `rng` in the published pipelines' order: the crop's parameters, the flip's
    /// coin, the color jitter, RandAugment, random erasing.
    pub fn apply(&self, image: &RawImage, rng: &mut impl Rng) -> Result<Vec<f32>> {
        self.validate()?;
        image.check()?;
        // Gray -> RGB is replicated only at the end: the crop, resize and flip of three
        // equal planes are three equal planes, so this is exact and a third of the work.
        let replicate = image.channels == 1 && self.channels == 3;
        let mut work = if replicate { Cow::Borrowed(image) } else { convert_channels(image, self.channels)? };
        if let Some(side) = self.pad_to {
            if work.height > side || work.width > side {
                bail!(InvalidArgument, "image of {}x{} is larger than padTo {side}", work.height, work.width);
            }
            if work.height != side || work.width != side {
                work = Cow::Owned(pad_centered(&work, side));
            }
        }
        let (height, width) = (work.height, work.width);
        // Square crops of a fraction of the shorter side; rounded as Python's `round`.
        let square = || ((height.min(width) as f64 * self.crop_fraction).round_ties_even() as usize).max(1);
        let region = match self.crop {
            Crop::RandomResized => random_resized_crop_params(height, width, self.scale, self.ratio, rng),
            Crop::Center => {
                let side = square();
                CropBox { top: (height - side) / 2, left: (width - side) / 2, height: side, width: side }
            }
            Crop::Fixed => {
                let side = square();
                let top = below(rng, (height - side + 1) as u64) as usize;
                let left = below(rng, (width - side + 1) as u64) as usize;
                CropBox { top, left, height: side, width: side }
            }
            Crop::Whole => CropBox { top: 0, left: 0, height, width },
        };
        let size = self.img_size;
        let mut pixels = resize_region(&work, region, size, size);
        if self.hflip && uniform01(rng) < 0.5 {
            for row in pixels.chunks_exact_mut(size) {
                row.reverse();
            }
        }
        let plane = size * size;
        let jitter = self.color_jitter.iter().any(|&j| j > 0.0);
        let mut replicate = replicate;
        if replicate && (jitter || self.rand_augment.is_some()) {
            // Three equal planes stop being equal: the jitter's luma weights sum to 0.9999
            // and RandAugment's fill differs per channel.
            pixels = pixels.repeat(self.channels);
            replicate = false;
        }
        if jitter {
            color_jitter(&mut pixels, plane, self.color_jitter, rng);
        }
        if let Some(rand_augment) = &self.rand_augment {
            // timm's `img_mean`: the normalisation mean in 8 bits.
            let fill: Vec<u8> = self.mean.iter().map(|m| (255.0 * m).round_ties_even().clamp(0.0, 255.0) as u8).collect();
            rand_augment.apply(&mut pixels, size, size, &fill, rng);
        }
        let mut out = Vec::with_capacity(self.channels * plane);
        for c in 0..self.channels {
            let source = if replicate { 0 } else { c };
            let (mean, std) = (self.mean[c], self.std[c]);
            out.extend(pixels[source * plane..(source + 1) * plane].iter().map(|&x| (x - mean) / std));
        }
        if self.random_erasing > 0.0 {
            random_erasing(&mut out, self.channels, size, size, self.random_erasing, rng);
        }
        Ok(out)
    }
}

/// torchvision's `ColorJitter(brightness, contrast, saturation)` on float pixels in [0, 1]
/// (its tensor path, no 8-bit rounding): the three adjustments in a random order, each
/// factor uniform in `[max(0, 1 - s), 1 + s]`, a strength of 0 leaving its adjustment
/// out; brightness blends with black, contrast with the mean of the grayscale image,
/// saturation with the grayscale image (`0.2989 R + 0.587 G + 0.114 B`), each clamped to
/// [0, 1]. One plane is gray: saturation leaves it alone, as torchvision does.
pub fn color_jitter(pixels: &mut [f32], plane: usize, strengths: [f64; 3], rng: &mut impl Rng) {
    let mut order = [0usize, 1, 2];
    // Fisher-Yates, as `torch.randperm`.
    for i in (1..order.len()).rev() {
        order.swap(i, below(rng, i as u64 + 1) as usize);
    }
    let factors = strengths.map(|s| (s > 0.0).then(|| (1.0 - s).max(0.0) + ((1.0 + s) - (1.0 - s).max(0.0)) * uniform01(rng)));
    for adjustment in order {
        if let Some(factor) = factors[adjustment] {
            adjust_color(pixels, plane, adjustment, factor as f32);
        }
    }
}

/// One of torchvision's `adjust_brightness` (0), `adjust_contrast` (1) and
/// `adjust_saturation` (2): a blend `factor x + (1 - factor) degenerate`, clamped to [0, 1].
fn adjust_color(pixels: &mut [f32], plane: usize, adjustment: usize, factor: f32) {
    let degenerate: Vec<f32> = match adjustment {
        0 => vec![0.0],
        1 => {
            let gray = grayscale(pixels, plane);
            vec![(gray.iter().map(|&g| f64::from(g)).sum::<f64>() / plane as f64) as f32]
        }
        _ if pixels.len() == plane => return,
        _ => grayscale(pixels, plane),
    };
    for (i, v) in pixels.iter_mut().enumerate() {
        *v = (factor * *v + (1.0 - factor) * degenerate[i % plane % degenerate.len()]).clamp(0.0, 1.0);
    }
}

/// torchvision's `rgb_to_grayscale` of planar pixels; one plane is already gray.
fn grayscale(pixels: &[f32], plane: usize) -> Vec<f32> {
    if pixels.len() == plane {
        return pixels.to_vec();
    }
    let (r, rest) = pixels.split_at(plane);
    let (g, b) = rest.split_at(plane);
    r.iter().zip(g).zip(b).map(|((&r, &g), &b)| 0.2989 * r + 0.587 * g + 0.114 * b).collect()
}

/// timm's `RandomErasing(probability, mode='pixel', max_count=1)` of one normalised image:
/// with `probability`, up to 10 attempts at a rectangle of area uniform in (0.02, 1/3)
/// of the image and log-uniform aspect ratio in (0.3, 1/0.3), sides rounded as Python's
/// `round`, accepted when strictly smaller than the image, placed uniformly; its pixels
/// become standard normal noise, drawn per channel and pixel.
pub fn random_erasing(pixels: &mut [f32], channels: usize, height: usize, width: usize, probability: f64, rng: &mut impl Rng) {
    // timm erases when `random() <= probability`; a draw in [0, 1) below it is the same
    // event up to the measure-zero tie.
    if uniform01(rng) >= probability {
        return;
    }
    let area = (height * width) as f64;
    let (log_r0, log_r1) = (0.3f64.ln(), (1.0f64 / 0.3).ln());
    for _ in 0..10 {
        let target_area = area * (0.02 + (1.0 / 3.0 - 0.02) * uniform01(rng));
        let aspect_ratio = (log_r0 + (log_r1 - log_r0) * uniform01(rng)).exp();
        let h = (target_area * aspect_ratio).sqrt().round_ties_even() as usize;
        let w = (target_area / aspect_ratio).sqrt().round_ties_even() as usize;
        if w < width && h < height {
            let top = below(rng, (height - h + 1) as u64) as usize;
            let left = below(rng, (width - w + 1) as u64) as usize;
            for c in 0..channels {
                for y in top..top + h {
                    for v in &mut pixels[(c * height + y) * width + left..][..w] {
                        *v = standard_normal(rng) as f32;
                    }
                }
            }
            return;
        }
    }
}

/// `image` with `channels` channels: unchanged, gray replicated to RGB, or RGB reduced to
/// luma. Other combinations have no agreed meaning and fail with `InvalidShape`.
fn convert_channels(image: &RawImage, channels: usize) -> Result<Cow<'_, RawImage>> {
    let plane = image.height * image.width;
    let data = match (image.channels, channels) {
        (from, to) if from == to => return Ok(Cow::Borrowed(image)),
        (1, 3) => image.data.repeat(3),
        (3, 1) => {
            let (r, rest) = image.data.split_at(plane);
            let (g, b) = rest.split_at(plane);
            r.iter().zip(g).zip(b).map(|((&r, &g), &b)| r * 0.299 + g * 0.587 + b * 0.114).collect()
        }
        (from, to) => bail!(InvalidShape, "cannot convert an image with {from} channels to {to}"),
    };
    Ok(Cow::Owned(RawImage { channels, height: image.height, width: image.width, data }))
}

/// Zero border around `image` to make it `side` x `side`; `side` is at least its size.
fn pad_centered(image: &RawImage, side: usize) -> RawImage {
    let (h, w) = (image.height, image.width);
    let (top, left) = ((side - h) / 2, (side - w) / 2);
    let mut data = vec![0f32; image.channels * side * side];
    for c in 0..image.channels {
        for y in 0..h {
            let src = &image.data[(c * h + y) * w..][..w];
            data[(c * side + top + y) * side + left..][..w].copy_from_slice(src);
        }
    }
    RawImage { channels: image.channels, height: side, width: side, data }
}

/// torchvision's `RandomResizedCrop.get_params`, draw for draw: up to 10 attempts at an
/// area fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`, sides
/// rounded half-to-even as Python's `round`, accepted when they fit, placed uniformly;
/// otherwise the central crop with the ratio clamped into `ratio`.
pub fn random_resized_crop_params(
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> CropBox {
    let area = (height * width) as f64;
    let (log_r0, log_r1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * (scale.0 + (scale.1 - scale.0) * uniform01(rng));
        let aspect_ratio = (log_r0 + (log_r1 - log_r0) * uniform01(rng)).exp();
        // Saturating float-to-int casts: an absurd scale just fails the fit test.
        let w = (target_area * aspect_ratio).sqrt().round_ties_even() as usize;
        let h = (target_area / aspect_ratio).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = below(rng, (height - h + 1) as u64) as usize;
            let left = below(rng, (width - w + 1) as u64) as usize;
            return CropBox { top, left, height: h, width: w };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < ratio.0 {
        ((width as f64 / ratio.0).round_ties_even() as usize, width)
    } else if in_ratio > ratio.1 {
        (height, (height as f64 * ratio.1).round_ties_even() as usize)
    } else {
        (height, width)
    };
    // torchvision would crop nothing for an extreme ratio range; one pixel is the least.
    let (h, w) = (h.clamp(1, height), w.clamp(1, width));
    CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// Bicubic resize of the whole image to `out_height` x `out_width` (see `resize_region`).
pub fn resize_bicubic(image: &RawImage, out_height: usize, out_width: usize) -> Result<RawImage> {
    image.check()?;
    if out_height == 0 || out_width == 0 {
        bail!(InvalidArgument, "cannot resize to {out_height}x{out_width}");
    }
    let full = CropBox { top: 0, left: 0, height: image.height, width: image.width };
    let data = resize_region(image, full, out_height, out_width);
    Ok(RawImage { channels: image.channels, height: out_height, width: out_width, data })
}

/// The four source pixels (absolute indices) and weights of one output pixel along one axis.
struct Taps {
    index: [usize; 4],
    weight: [f64; 4],
}

/// Bicubic taps with pixel-centre alignment (align_corners=False, no antialias; PIL's
/// kernel parameter, see `CUBIC_A`) along one axis of
/// the span `start..start + len`: source coordinate `(o + 0.5) * len / out - 0.5`,
/// taps clamped to the span's border, as if the span had been cropped out first.
fn axis_taps(start: usize, len: usize, out: usize, a: f64) -> Vec<Taps> {
    let scale = len as f64 / out as f64;
    (0..out)
        .map(|o| {
            let src = (o as f64 + 0.5) * scale - 0.5;
            let floor = src.floor();
            let t = src - floor;
            let weight = [cubic_far(t + 1.0, a), cubic_near(t, a), cubic_near(1.0 - t, a), cubic_far(2.0 - t, a)];
            let index =
                std::array::from_fn(|k| start + (floor as i64 - 1 + k as i64).clamp(0, len as i64 - 1) as usize);
            Taps { index, weight }
        })
        .collect()
}

/// Keys' kernel for |x| <= 1.
fn cubic_near(x: f64, a: f64) -> f64 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

/// Keys' kernel for 1 < |x| < 2.
fn cubic_far(x: f64, a: f64) -> f64 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// `region` of `image` resized to `out_h` x `out_w`, planar. Separable, accumulated in
/// f64 (so a constant image stays exactly constant), then clamped to [0, 1] as PIL's
/// 8-bit result is: bicubic overshoots at edges. A region already of the output size is
/// copied, which is what the interpolation gives there anyway.
fn resize_region(image: &RawImage, region: CropBox, out_h: usize, out_w: usize) -> Vec<f32> {
    let (height, width) = (image.height, image.width);
    let mut out = Vec::with_capacity(image.channels * out_h * out_w);
    if region.height == out_h && region.width == out_w {
        for c in 0..image.channels {
            for y in region.top..region.top + out_h {
                out.extend_from_slice(&image.data[(c * height + y) * width + region.left..][..out_w]);
            }
        }
        return out;
    }
    let xs = axis_taps(region.left, region.width, out_w, CUBIC_A);
    let ys = axis_taps(region.top, region.height, out_h, CUBIC_A);
    // Horizontal pass over the region's rows, then vertical pass over its result.
    let mut rows = vec![0f64; region.height * out_w];
    for c in 0..image.channels {
        for r in 0..region.height {
            let src = &image.data[(c * height + region.top + r) * width..][..width];
            for (dst, tap) in rows[r * out_w..(r + 1) * out_w].iter_mut().zip(&xs) {
                *dst = (0..4).fold(0.0, |acc, k| acc + tap.weight[k] * f64::from(src[tap.index[k]]));
            }
        }
        for tap in &ys {
            for x in 0..out_w {
                let v = (0..4).fold(0.0, |acc, k| acc + tap.weight[k] * rows[(tap.index[k] - region.top) * out_w + x]);
                out.push((v as f32).clamp(0.0, 1.0));
            }
        }
    }
    out
}

/// `torch.nn.functional.interpolate(mode='bicubic', align_corners=False)` of `[C, H, W]`
/// planes: PyTorch's kernel (A = -0.75), borders clamped, values not clipped. The
/// published fine-tuning resizes position embeddings this way.
pub fn interpolate_bicubic_torch(planes: &[f32], channels: usize, height: usize, width: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    const TORCH_CUBIC_A: f64 = -0.75;
    let xs = axis_taps(0, width, out_w, TORCH_CUBIC_A);
    let ys = axis_taps(0, height, out_h, TORCH_CUBIC_A);
    let mut out = Vec::with_capacity(channels * out_h * out_w);
    let mut rows = vec![0f64; height * out_w];
    for c in 0..channels {
        let plane = &planes[c * height * width..][..height * width];
        for r in 0..height {
            for (dst, tap) in rows[r * out_w..(r + 1) * out_w].iter_mut().zip(&xs) {
                *dst = (0..4).fold(0.0, |acc, k| acc + tap.weight[k] * f64::from(plane[r * width + tap.index[k]]));
            }
        }
        for tap in &ys {
            for x in 0..out_w {
                out.push((0..4).fold(0.0, |acc, k| acc + tap.weight[k] * rows[tap.index[k] * out_w + x]) as f32);
            }
        }
    }
    out
}

/// Per-channel mean and standard deviation (population, over all pixels) of up to
/// `max_items` items spread evenly over `dataset`, for choosing `mean` / `std`. The
/// first item fixes the channel count; later items are converted to it as `apply` would.
pub fn dataset_statistics(dataset: &dyn Dataset, max_items: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let len = dataset.len();
    if max_items == 0 || len == 0 {
        bail!(InvalidArgument, "statistics need at least one item (dataset has {len}, maxItems is {max_items})");
    }
    let n = max_items.min(len);
    let mut channels = 0;
    let (mut sum, mut sum_sq, mut count) = (Vec::new(), Vec::new(), 0u64);
    for i in 0..n {
        let index = (i as u128 * len as u128 / n as u128) as usize;
        let image = dataset.get(index)?;
        image.check()?;
        if i == 0 {
            channels = image.channels;
            sum = vec![0f64; channels];
            sum_sq = vec![0f64; channels];
        }
        let image = convert_channels(&image, channels)?;
        let plane = image.height * image.width;
        for (c, values) in image.data.chunks_exact(plane).enumerate() {
            for &v in values {
                let v = f64::from(v);
                sum[c] += v;
                sum_sq[c] += v * v;
            }
        }
        count += plane as u64;
    }
    let count = count as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    let std = sum_sq.iter().zip(&mean).map(|(sq, m)| ((sq / count - m * m).max(0.0)).sqrt() as f32).collect();
    Ok((mean.iter().map(|&m| m as f32).collect(), std))
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::stream_rng;

    fn square(side: usize, f: impl Fn(usize, usize) -> f32) -> RawImage {
        RawImage { channels: 1, height: side, width: side, data: (0..side * side).map(|i| f(i / side, i % side)).collect() }
    }

    /// No normalisation, no flip.
    fn unnormalised(img_size: usize, crop: Crop, crop_fraction: f64) -> Augment {
        Augment { crop, crop_fraction, hflip: false, ..Augment::pretrain(img_size, vec![0.0], vec![1.0]) }
    }

    #[test]
    fn center_crop_takes_the_central_fraction() {
        // 8x8, fraction 0.5: the 4x4 at rows and columns 2..6, already the output size.
        let image = square(8, |y, x| (8 * y + x) as f32 / 64.0);
        let out = unnormalised(4, Crop::Center, 0.5).apply(&image, &mut stream_rng(0, 0, 0, 0)).unwrap();
        let expected: Vec<f32> = (2..6).flat_map(|y| (2..6).map(move |x| (8 * y + x) as f32 / 64.0)).collect();
        assert_eq!(out, expected);
        // 224/256 of 8 rounds to 7: rows 0..7 (the odd margin's pixel at the bottom).
        let out = unnormalised(7, Crop::Center, 224.0 / 256.0).apply(&image, &mut stream_rng(0, 0, 0, 0)).unwrap();
        assert_eq!(out[0], 0.0);
        assert_eq!(out[48], (8 * 6 + 6) as f32 / 64.0);
    }

    #[test]
    fn fixed_crop_is_a_window_of_fixed_size_anywhere() {
        // 6x6 with distinct pixels, fraction 0.5: a 3x3 window at one of 16 places.
        let image = square(6, |y, x| (6 * y + x) as f32 / 36.0);
        let augment = unnormalised(3, Crop::Fixed, 0.5);
        let mut corners = std::collections::BTreeSet::new();
        for index in 0..200 {
            let out = augment.apply(&image, &mut stream_rng(1, 0, 1, index)).unwrap();
            let first = (out[0] * 36.0).round() as usize;
            let (top, left) = (first / 6, first % 6);
            let window: Vec<f32> = (top..top + 3).flat_map(|y| (left..left + 3).map(move |x| (6 * y + x) as f32 / 36.0)).collect();
            assert_eq!(out, window);
            corners.insert((top, left));
        }
        assert_eq!(corners.len(), 16, "{corners:?}");
    }

    #[test]
    fn color_adjustments_blend_as_torchvision() {
        // Brightness 1.5: 0.2 -> 0.3, 0.8 -> 1.2 clamped to 1.
        let mut gray = vec![0.2f32, 0.8];
        adjust_color(&mut gray, 2, 0, 1.5);
        assert_eq!(gray, [0.3, 1.0]);
        // Contrast 0.5 with the mean 0.4 of [0.2, 0.6]: 0.3 and 0.5.
        let mut gray = vec![0.2f32, 0.6];
        adjust_color(&mut gray, 2, 1, 0.5);
        assert!((gray[0] - 0.3).abs() < 1e-6 && (gray[1] - 0.5).abs() < 1e-6, "{gray:?}");
        // Saturation leaves one plane alone.
        adjust_color(&mut gray, 2, 2, 0.0);
        assert!((gray[0] - 0.3).abs() < 1e-6, "{gray:?}");
        // RGB pixels red and black: contrast 0 gives the grayscale mean 0.2989 / 2 everywhere,
        // saturation 0 the grayscale (0.2989 for red).
        let rgb = vec![1.0f32, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mut flat = rgb.clone();
        adjust_color(&mut flat, 2, 1, 0.0);
        assert!(flat.iter().all(|&v| (v - 0.14945).abs() < 1e-6), "{flat:?}");
        let mut desaturated = rgb;
        adjust_color(&mut desaturated, 2, 2, 0.0);
        assert_eq!(desaturated, [0.2989, 0.0, 0.2989, 0.0, 0.2989, 0.0]);
    }

    /// torchvision 0.29's `adjust_brightness`, `adjust_contrast` and `adjust_saturation` of
    /// float tensors (test/fixtures/augment/reference_ops.py prints them).
    #[test]
    fn color_adjustments_match_torchvision() {
        let rgb = [0.9f32, 0.2, 0.5, 0.1, 0.7, 0.3, 0.4, 0.8, 0.1, 0.6, 0.0, 1.0, 0.3, 0.5, 0.9, 0.2, 0.4, 0.6];
        let mut jittered = rgb.to_vec();
        adjust_color(&mut jittered, 6, 0, 1.3);
        adjust_color(&mut jittered, 6, 1, 0.7);
        adjust_color(&mut jittered, 6, 2, 1.6);
        let torchvision = [
            1.0, 0.152015, 0.737587, 0.095647, 1.0, 0.275071, 0.481105, 0.980815, 0.155187, 0.823647, 0.03198, 0.958271, 0.335505, 0.588815, 1.0,
            0.241247, 0.61438, 0.711871,
        ];
        assert!(jittered.iter().zip(torchvision).all(|(a, b)| (a - b).abs() < 2e-6), "{jittered:?}");
        let mut gray = rgb[..6].to_vec();
        adjust_color(&mut gray, 6, 2, 0.2);
        adjust_color(&mut gray, 6, 1, 1.4);
        let torchvision = [1.0, 0.1, 0.52, 0.0, 0.8, 0.24];
        assert!(gray.iter().zip(torchvision).all(|(a, b)| (a - b).abs() < 2e-6), "{gray:?}");
    }

    #[test]
    fn color_jitter_factors_stay_in_range() {
        // Brightness alone at strength 0.4 scales by a factor in [0.6, 1.4], and zero
        // strengths change nothing.
        for index in 0..50 {
            let mut pixels = vec![0.5f32; 4];
            color_jitter(&mut pixels, 4, [0.4, 0.0, 0.0], &mut stream_rng(2, 0, 1, index));
            assert!(pixels.iter().all(|&v| (0.3..=0.7).contains(&v) && v == pixels[0]), "{pixels:?}");
            let mut same = vec![0.25f32; 4];
            color_jitter(&mut same, 4, [0.0; 3], &mut stream_rng(2, 0, 1, index));
            assert_eq!(same, [0.25; 4]);
        }
    }

    #[test]
    fn random_erasing_fills_one_box_with_noise() {
        let (h, w) = (10, 12);
        let mut boxes = 0;
        for index in 0..100 {
            let mut pixels = vec![0f32; 2 * h * w];
            random_erasing(&mut pixels, 2, h, w, 1.0, &mut stream_rng(3, 0, 1, index));
            let changed: Vec<(usize, usize)> = (0..h * w).filter(|&i| pixels[i] != 0.0).map(|i| (i / w, i % w)).collect();
            if changed.is_empty() {
                continue; // ten attempts can all fail to fit
            }
            boxes += 1;
            let (top, bottom) = (changed.iter().map(|p| p.0).min().unwrap(), changed.iter().map(|p| p.0).max().unwrap());
            let (left, right) = (changed.iter().map(|p| p.1).min().unwrap(), changed.iter().map(|p| p.1).max().unwrap());
            let (bh, bw) = (bottom - top + 1, right - left + 1);
            // A full box strictly smaller than the image, of about 2% to a third of its area,
            // in the second channel too, with different noise there.
            assert_eq!(changed.len(), bh * bw);
            assert!(bh < h && bw < w && (1..=45).contains(&(bh * bw)), "{bh}x{bw}");
            assert!((0..h * w).all(|i| (pixels[i] != 0.0) == (pixels[h * w + i] != 0.0)));
            assert_ne!(pixels[top * w + left], pixels[h * w + top * w + left]);
        }
        assert!(boxes > 90, "{boxes}");
        let mut pixels = vec![0f32; h * w];
        random_erasing(&mut pixels, 1, h, w, 0.0, &mut stream_rng(3, 0, 1, 0));
        assert!(pixels.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn kernel_weights_sum_to_one() {
        for t in [0.0, 0.1, 0.25, 0.5, 0.9] {
            let sum = cubic_far(t + 1.0, CUBIC_A) + cubic_near(t, CUBIC_A) + cubic_near(1.0 - t, CUBIC_A) + cubic_far(2.0 - t, CUBIC_A);
            assert!((sum - 1.0).abs() < 1e-12, "t = {t}: {sum}");
        }
        // Interpolating: the centre tap alone at integer positions.
        assert_eq!((cubic_near(0.0, CUBIC_A), cubic_near(1.0, CUBIC_A), cubic_far(2.0, CUBIC_A)), (1.0, 0.0, 0.0));
    }

    #[test]
    fn luma_uses_itu_601_weights() {
        let rgb = RawImage { channels: 3, height: 1, width: 1, data: vec![1.0, 0.0, 0.0] };
        assert_eq!(convert_channels(&rgb, 1).unwrap().data, vec![0.299]);
        let gray = RawImage { channels: 1, height: 1, width: 2, data: vec![0.25, 0.5] };
        assert_eq!(convert_channels(&gray, 3).unwrap().data, vec![0.25, 0.5, 0.25, 0.5, 0.25, 0.5]);
        let two = RawImage { channels: 2, height: 1, width: 1, data: vec![0.0, 0.0] };
        assert!(convert_channels(&two, 3).is_err());
    }

    #[test]
    fn fallback_crop_is_central_with_clamped_ratio() {
        // No crop with a ratio in [3/4, 4/3] and most of a 1x100 strip's area fits in
        // it, so the fallback applies: full height, width round(1 * 4/3) = 1, centred.
        let mut rng = super::super::stream_rng(0, 0, 0, 0);
        let crop = random_resized_crop_params(1, 100, (0.99, 1.0), (3.0 / 4.0, 4.0 / 3.0), &mut rng);
        assert_eq!(crop, CropBox { top: 0, left: 49, height: 1, width: 1 });
    }
}
