//! timm's RandAugment (`rand_augment_transform`), the published fine-tuning recipe's
//! `rand-m9-mstd0.5-inc1`, on 8-bit pixels as timm's PIL ops see them.

use super::{below, standard_normal, uniform01};
use crate::bail;
use crate::error::Result;
use rand::Rng;

/// timm's `_LEVEL_DENOM`: magnitudes are in tenths of an op's full range.
const LEVEL_DENOM: f64 = 10.0;

/// The ops of timm's `_RAND_TRANSFORMS` / `_RAND_INCREASING_TRANSFORMS`, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

const OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateXRel,
    Op::TranslateYRel,
];

/// A RandAugment policy in timm's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct RandAugment {
    /// `m`: the magnitude, 0..=`magnitude_max`.
    pub magnitude: f64,
    /// `mstd`: the standard deviation of the magnitude's per-op Gaussian noise; infinite
    /// (timm: above 100) draws it uniformly in [0, magnitude] instead.
    pub magnitude_std: f64,
    /// `mmax`: the magnitude's upper clip; timm's default 10.
    pub magnitude_max: f64,
    /// `n`: ops per image, chosen uniformly with replacement.
    pub num_layers: usize,
    /// `p`: each chosen op's probability of being applied; timm's default 0.5.
    pub prob: f64,
    /// `inc1`: the variants whose severity increases with the magnitude (posterize,
    /// solarize and the enhancements).
    pub increasing: bool,
}

impl RandAugment {
    /// Parses timm's `rand-<section>-<section>...` string, e.g. `rand-m9-mstd0.5-inc1`:
    /// `m` (int), `n` (int), `mstd` (float), `mmax` (int), `p` (float), `inc` (0 or 1).
    /// timm's op weights (`w`) and op subsets (`t`) are not supported.
    pub fn parse(spec: &str) -> Result<RandAugment> {
        let mut sections = spec.split('-');
        if sections.next() != Some("rand") {
            bail!(InvalidArgument, "randAugment '{spec}' must start with 'rand', e.g. 'rand-m9-mstd0.5-inc1'");
        }
        let mut policy =
            RandAugment { magnitude: 10.0, magnitude_std: 0.0, magnitude_max: LEVEL_DENOM, num_layers: 2, prob: 0.5, increasing: false };
        for section in sections {
            let split = section.find(|c: char| c.is_ascii_digit()).unwrap_or(section.len());
            let (key, value) = section.split_at(split);
            let bad = || format!("randAugment '{spec}': bad section '{section}' (expected m<int>, n<int>, mstd<float>, mmax<int>, p<float> or inc<0|1>)");
            let int = || value.parse::<u32>().map_err(|_| crate::Error::new(crate::ErrorCode::InvalidArgument, bad()));
            let float = || match value.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(crate::Error::new(crate::ErrorCode::InvalidArgument, bad())),
            };
            match key {
                "m" => policy.magnitude = f64::from(int()?),
                "n" => policy.num_layers = int()? as usize,
                "mstd" => policy.magnitude_std = float().map(|v| if v > 100.0 { f64::INFINITY } else { v })?,
                // timm reads `mmax0` as unset, the default 10.
                "mmax" => policy.magnitude_max = match int()? { 0 => LEVEL_DENOM, v => f64::from(v) },
                "p" => policy.prob = float()?,
                "inc" => policy.increasing = int()? != 0,
                _ => bail!(InvalidArgument, "{}", bad()),
            }
        }
        policy.validate()?;
        Ok(policy)
    }

    /// Checks the ranges `parse` cannot.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.prob) {
            bail!(InvalidArgument, "randAugment probability must be in [0, 1], got {}", self.prob);
        }
        if !(self.magnitude.is_finite() && self.magnitude >= 0.0 && self.magnitude_max >= 0.0 && self.magnitude_std >= 0.0) {
            bail!(InvalidArgument, "randAugment magnitudes must be non-negative, got {self:?}");
        }
        Ok(())
    }

    /// Applies `num_layers` ops to planar pixels in [0, 1] (`channels x height x width`),
    /// quantised to 8 bits first as timm's PIL images are. `fill` is the per-channel
    /// value (0..=255) that geometric ops move in, timm's `img_mean`.
    pub(crate) fn apply(&self, pixels: &mut [f32], height: usize, width: usize, fill: &[u8], rng: &mut impl Rng) {
        let mut image: Vec<u8> = pixels.iter().map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8).collect();
        let ops: Vec<Op> = (0..self.num_layers).map(|_| OPS[below(rng, OPS.len() as u64) as usize]).collect();
        for op in ops {
            if self.prob < 1.0 && uniform01(rng) >= self.prob {
                continue;
            }
            let magnitude = if self.magnitude_std == f64::INFINITY {
                self.magnitude * uniform01(rng)
            } else if self.magnitude_std > 0.0 {
                self.magnitude + self.magnitude_std * standard_normal(rng)
            } else {
                self.magnitude
            };
            let level = magnitude.clamp(0.0, self.magnitude_max) / LEVEL_DENOM;
            image = apply_op(op, level, self.increasing, || uniform01(rng) < 0.5, image, height, width, fill);
        }
        for (p, &v) in pixels.iter_mut().zip(&image) {
            *p = f32::from(v) / 255.0;
        }
    }
}

/// One op at `level` (magnitude / 10) with timm's level-to-argument functions;
/// `negate` is the coin of timm's `_randomly_negate`, drawn only by ops that have one.
#[allow(clippy::too_many_arguments)]
fn apply_op(op: Op, level: f64, increasing: bool, mut negate: impl FnMut() -> bool, image: Vec<u8>, height: usize, width: usize, fill: &[u8]) -> Vec<u8> {
    let mut signed = |v: f64| if negate() { -v } else { v };
    let plane = height * width;
    match op {
        Op::AutoContrast => per_channel_lut(image, plane, autocontrast_lut),
        Op::Equalize => per_channel_lut(image, plane, equalize_lut),
        Op::Invert => image.into_iter().map(|v| 255 - v).collect(),
        Op::Posterize => {
            let bits = (level * 4.0) as i32;
            let bits = if increasing { 4 - bits } else { bits };
            if bits >= 8 {
                return image;
            }
            let mask = !((1u16 << (8 - bits.max(0))) - 1) as u8;
            image.into_iter().map(|v| v & mask).collect()
        }
        Op::Solarize => {
            let threshold = ((level * 256.0) as i32).min(256);
            let threshold = if increasing { 256 - threshold } else { threshold };
            image.into_iter().map(|v| if i32::from(v) < threshold { v } else { 255 - v }).collect()
        }
        Op::SolarizeAdd => {
            let add = ((level * 110.0) as i32).min(128);
            image.into_iter().map(|v| if v < 128 { (i32::from(v) + add).min(255) as u8 } else { v }).collect()
        }
        Op::Color | Op::Contrast | Op::Brightness | Op::Sharpness => {
            // timm keeps the increasing factor at 0.1 or more (reachable with mmax > 10).
            let factor = if increasing { (1.0 + signed(level * 0.9)).max(0.1) } else { level * 1.8 + 0.1 };
            let degenerate = match op {
                Op::Color => gray_planes(&image, plane),
                Op::Contrast => {
                    let gray = gray_planes(&image, plane);
                    let mean = (gray[..plane].iter().map(|&v| u64::from(v)).sum::<u64>() as f64 / plane as f64 + 0.5) as u8;
                    vec![mean; image.len()]
                }
                Op::Brightness => vec![0; image.len()],
                _ => smooth(&image, height, width),
            };
            blend(&degenerate, &image, factor as f32)
        }
        Op::Rotate => {
            // PIL's `rotate(degrees)`: counter-clockwise about the centre (w/2, h/2).
            // PIL rounds the matrix to 15 decimals, which makes right angles exact.
            let angle = -signed(level * 30.0).to_radians();
            let (cos, sin) = (round15(angle.cos()), round15(angle.sin()));
            let (cx, cy) = (width as f64 / 2.0, height as f64 / 2.0);
            let matrix = [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy];
            affine(&image, height, width, matrix, fill)
        }
        Op::ShearX => affine(&image, height, width, [1.0, signed(level * 0.3), 0.0, 0.0, 1.0, 0.0], fill),
        Op::ShearY => affine(&image, height, width, [1.0, 0.0, 0.0, signed(level * 0.3), 1.0, 0.0], fill),
        Op::TranslateXRel => affine(&image, height, width, [1.0, 0.0, signed(level * 0.45) * width as f64, 0.0, 1.0, 0.0], fill),
        Op::TranslateYRel => affine(&image, height, width, [1.0, 0.0, 0.0, 0.0, 1.0, signed(level * 0.45) * height as f64], fill),
    }
}

fn round15(v: f64) -> f64 {
    (v * 1e15).round() / 1e15
}

/// Each channel through the lookup table that `lut` builds from its histogram.
fn per_channel_lut(mut image: Vec<u8>, plane: usize, lut: fn(&[u64; 256]) -> [u8; 256]) -> Vec<u8> {
    for channel in image.chunks_exact_mut(plane) {
        let mut histogram = [0u64; 256];
        for &v in channel.iter() {
            histogram[v as usize] += 1;
        }
        let table = lut(&histogram);
        for v in channel.iter_mut() {
            *v = table[*v as usize];
        }
    }
    image
}

/// PIL's `ImageOps.autocontrast` (no cutoff): the channel's [lo, hi] stretched to
/// [0, 255], truncated; a constant channel is left alone.
fn autocontrast_lut(histogram: &[u64; 256]) -> [u8; 256] {
    let lo = histogram.iter().position(|&n| n > 0).unwrap_or(0);
    let hi = histogram.iter().rposition(|&n| n > 0).unwrap_or(0);
    if hi <= lo {
        return std::array::from_fn(|i| i as u8);
    }
    let scale = 255.0 / (hi - lo) as f64;
    let offset = -(lo as f64) * scale;
    std::array::from_fn(|i| ((i as f64 * scale + offset) as i64).clamp(0, 255) as u8)
}

/// PIL's `ImageOps.equalize`: cumulative histogram over steps of (total - last
/// nonzero bin) / 256, starting half a step in; identity when the step is 0.
fn equalize_lut(histogram: &[u64; 256]) -> [u8; 256] {
    let last = histogram.iter().rev().find(|&&n| n > 0).copied().unwrap_or(0);
    let step = (histogram.iter().sum::<u64>() - last) / 256;
    if step == 0 {
        return std::array::from_fn(|i| i as u8);
    }
    let mut n = step / 2;
    std::array::from_fn(|i| {
        let v = (n / step).min(255) as u8;
        n += histogram[i];
        v
    })
}

/// PIL's `convert("L")` (`(19595 R + 38470 G + 7471 B + 0x8000) >> 16`) broadcast back
/// to every channel; one channel is already gray.
fn gray_planes(image: &[u8], plane: usize) -> Vec<u8> {
    if image.len() == plane {
        return image.to_vec();
    }
    let gray: Vec<u8> = (0..plane)
        .map(|i| ((19595 * u32::from(image[i]) + 38470 * u32::from(image[plane + i]) + 7471 * u32::from(image[2 * plane + i]) + 0x8000) >> 16) as u8)
        .collect();
    gray.repeat(image.len() / plane)
}

/// PIL's `ImageFilter.SMOOTH` (3x3, centre 5, others 1, over 13), rounded; the border
/// pixels are copied, as PIL's filter does.
fn smooth(image: &[u8], height: usize, width: usize) -> Vec<u8> {
    let mut out = image.to_vec();
    for (channel, source) in out.chunks_exact_mut(height * width).zip(image.chunks_exact(height * width)) {
        for y in 1..height.saturating_sub(1) {
            for x in 1..width.saturating_sub(1) {
                let mut sum = 4 * u32::from(source[y * width + x]);
                for dy in 0..3 {
                    for dx in 0..3 {
                        sum += u32::from(source[(y + dy - 1) * width + x + dx - 1]);
                    }
                }
                channel[y * width + x] = (sum as f32 / 13.0 + 0.5) as u8;
            }
        }
    }
    out
}

/// PIL's `Image.blend(degenerate, image, factor)`: `degenerate + factor (image -
/// degenerate)` in f32, clipped to [0, 255] and truncated.
fn blend(degenerate: &[u8], image: &[u8], factor: f32) -> Vec<u8> {
    degenerate
        .iter()
        .zip(image)
        .map(|(&d, &v)| (f32::from(d) + factor * (f32::from(v) - f32::from(d))).clamp(0.0, 255.0) as u8)
        .collect()
}

/// PIL's `transform(AFFINE, matrix, BICUBIC, fillcolor=fill)`: output pixel centre
/// `(x + 0.5, y + 0.5)` maps to input point `(a x + b y + c, d x + e y + f)`; points
/// outside the image take `fill`, others are interpolated with PIL's transform kernel
/// (cubic convolution with a = -1, taps clamped to the image), clipped and truncated.
fn affine(image: &[u8], height: usize, width: usize, matrix: [f64; 6], fill: &[u8]) -> Vec<u8> {
    let [a, b, c, d, e, f] = matrix;
    let plane = height * width;
    let mut out = Vec::with_capacity(image.len());
    for (channel, source) in image.chunks_exact(plane).enumerate() {
        let at = |x: i64, y: i64| f64::from(source[y.clamp(0, height as i64 - 1) as usize * width + x.clamp(0, width as i64 - 1) as usize]);
        for y in 0..height {
            for x in 0..width {
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                let (u, v) = (a * px + b * py + c, d * px + e * py + f);
                if !(0.0 <= u && u < width as f64 && 0.0 <= v && v < height as f64) {
                    out.push(fill[channel]);
                    continue;
                }
                let (u, v) = (u - 0.5, v - 0.5);
                let (x0, y0) = (u.floor() as i64, v.floor() as i64);
                let (dx, dy) = (u - u.floor(), v - v.floor());
                let row = |y: i64| cubic_pil(at(x0 - 1, y), at(x0, y), at(x0 + 1, y), at(x0 + 2, y), dx);
                let value = cubic_pil(row(y0 - 1), row(y0), row(y0 + 1), row(y0 + 2), dy);
                out.push(value.clamp(0.0, 255.0) as u8);
            }
        }
    }
    out
}

/// PIL's `BICUBIC` macro of its transforms: the cubic through four samples at offset `t`
/// from the second (Keys' kernel with a = -1).
fn cubic_pil(v1: f64, v2: f64, v3: f64, v4: f64, t: f64) -> f64 {
    let p2 = v3 - v1;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    v2 + t * (p2 + t * (p3 + t * p4))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILL: [u8; 3] = [124, 116, 104];

    fn op(op: Op, level: f64, increasing: bool, negate: bool, image: &[u8], height: usize, width: usize) -> Vec<u8> {
        apply_op(op, level, increasing, || negate, image.to_vec(), height, width, &FILL)
    }

    #[test]
    fn parses_timm_grammar() {
        let p = RandAugment::parse("rand-m9-mstd0.5-inc1").unwrap();
        assert_eq!(p, RandAugment { magnitude: 9.0, magnitude_std: 0.5, magnitude_max: 10.0, num_layers: 2, prob: 0.5, increasing: true });
        let p = RandAugment::parse("rand-n3-m5-p1-mmax12-mstd101").unwrap();
        assert_eq!((p.num_layers, p.magnitude, p.prob, p.magnitude_max, p.magnitude_std), (3, 5.0, 1.0, 12.0, f64::INFINITY));
        assert_eq!(RandAugment::parse("rand-mmax0").unwrap().magnitude_max, 10.0);
        for bad in ["m9", "rand-x1", "rand-m", "rand-w0", "rand-p2", "rand-mstd-1"] {
            let e = RandAugment::parse(bad).unwrap_err();
            assert_eq!(e.code, crate::ErrorCode::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn pixel_ops_match_pil() {
        let image = [0u8, 10, 100, 127, 128, 200, 250, 255];
        assert_eq!(op(Op::Invert, 0.9, true, false, &image, 2, 4), [255, 245, 155, 128, 127, 55, 5, 0]);
        // Posterize inc at m9: 4 - int(3.6) = 1 bit kept.
        assert_eq!(op(Op::Posterize, 0.9, true, false, &image, 2, 4), [0, 0, 0, 0, 128, 128, 128, 128]);
        // Not increasing: int(3.6) = 3 bits.
        assert_eq!(op(Op::Posterize, 0.9, false, false, &image, 2, 4), [0, 0, 96, 96, 128, 192, 224, 224]);
        // Solarize inc at m9: threshold 256 - int(230.4) = 26.
        assert_eq!(op(Op::Solarize, 0.9, true, false, &image, 2, 4), [0, 10, 155, 128, 127, 55, 5, 0]);
        // SolarizeAdd at m9: + int(99) below 128.
        assert_eq!(op(Op::SolarizeAdd, 0.9, true, false, &image, 2, 4), [99, 109, 199, 226, 128, 200, 250, 255]);
        // AutoContrast: [0, 255] already; [50, 100] stretches by 5.1, truncated (100 x 5.1
        // - 255 is 254.99999999999994 in floating point, so 254, as Pillow gives).
        assert_eq!(op(Op::AutoContrast, 0.0, true, false, &image, 2, 4), image);
        assert_eq!(op(Op::AutoContrast, 0.0, true, false, &[50, 60, 75, 100], 2, 2), [0, 51, 127, 254]);
        // Beyond m10 (mmax15, level 1.5) timm caps SolarizeAdd's addition at 128.
        assert_eq!(op(Op::SolarizeAdd, 1.5, true, false, &[0, 127, 128, 200], 2, 2), [128, 255, 128, 200]);
        // Equalize of 8 pixels: step (8 - 1) / 256 = 0, identity.
        assert_eq!(op(Op::Equalize, 0.0, true, false, &image, 2, 4), image);
    }

    #[test]
    fn equalize_follows_pil_cumulative_steps() {
        // 256 pixels of 10 and 256 of 20: step (512 - 256) / 256 = 1 and n starts at 0, so
        // lut[10] = 0 (nothing below it) and lut[20] = 256 (the 10s below it), clipped to 255.
        let mut image = vec![10u8; 256];
        image.extend(vec![20u8; 256]);
        let out = op(Op::Equalize, 0.0, true, false, &image, 16, 32);
        assert_eq!((out[0], out[511]), (0, 255));
    }

    #[test]
    fn enhancements_blend_with_their_degenerate_image() {
        // Increasing, m9 and not negated: factor 1 + 0.81 = 1.81; negated 0.19.
        let gray = [100u8, 200, 100, 200];
        // Brightness: 100 * 1.81 = 181, 200 * 1.81 = 362 -> 255.
        assert_eq!(op(Op::Brightness, 0.9, true, false, &gray, 2, 2), [181, 255, 181, 255]);
        // Contrast: mean 150; 150 + 0.19 * (100 - 150) = 140.5 -> 140, 159.5 -> 159.
        assert_eq!(op(Op::Contrast, 0.9, true, true, &gray, 2, 2), [140, 159, 140, 159]);
        // Beyond m10, negated: 1 - 1.35 is kept at 0.1.
        assert_eq!(op(Op::Brightness, 1.5, true, true, &gray, 2, 2), [10, 20, 10, 20]);
        // Color (saturation) of a gray image is the identity.
        assert_eq!(op(Op::Color, 0.9, true, false, &gray, 2, 2), gray);
        // Color of RGB (255, 0, 0): gray (19595 * 255 + 0x8000) >> 16 = 76; factor 0.19:
        // 76 + 0.19 * 179 = 110.01 -> 110, 76 - 0.19 * 76 = 61.56 -> 61.
        assert_eq!(op(Op::Color, 0.9, true, true, &[255, 0, 0], 1, 1), [110, 61, 61]);
        // Sharpness: the centre of a 3x3 image with a bright centre; SMOOTH gives
        // (8 * 0 + 5 * 130) / 13 = 50; 50 + 1.81 * 80 = 194.8 -> 194. Borders copied.
        let mut spot = [0u8; 9];
        spot[4] = 130;
        let out = op(Op::Sharpness, 0.9, true, false, &spot, 3, 3);
        assert_eq!(out[4], 194);
        assert_eq!(out[0], 0);
    }

    #[test]
    fn geometric_ops_move_pixels_and_fill() {
        // TranslateXRel at m9, negated: -0.405 x 10 = -4.05 pixels, so output pixel x reads
        // input x + 0.5 - 4.05: the first four read outside and take the fill; x = 4 reads
        // -0.05 (pixel index), taps (0, 0, 0, 20) at t = 0.95 give -35, clipped to 0.
        // x = 5 reads index 0.95: taps (0, 0, 20, 40) give 0.95 (20 + 0.95 (-20 + 0.95 x 20))
        // = 18.0975 -> 18. The rest as Pillow 13 gives them.
        let ramp: Vec<u8> = (0..10).map(|i| i * 20).collect();
        let out = op(Op::TranslateXRel, 0.9, true, true, &ramp, 1, 10);
        assert_eq!(out, [124, 124, 124, 124, 0, 18, 38, 58, 78, 98]);
        // Level 0 is the identity.
        assert_eq!(op(Op::ShearY, 0.0, true, false, &ramp, 1, 10), ramp);
        // Rotate at level 6 (180 degrees; the matrix is exact after PIL's rounding)
        // reverses a square.
        let square = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(op(Op::Rotate, 6.0, true, false, &square, 3, 3), [9, 8, 7, 6, 5, 4, 3, 2, 1]);
        // TranslateYRel at m10 on 2 rows: 0.9 rows, so the second row reads 2.4, outside,
        // and takes its channel's fill.
        let rgb = [50u8; 3 * 4];
        let out = op(Op::TranslateYRel, 1.0, true, false, &rgb, 2, 2);
        assert_eq!(out, [50, 50, FILL[0], FILL[0], 50, 50, FILL[1], FILL[1], 50, 50, FILL[2], FILL[2]]);
    }

    /// Pillow 13's `transform(AFFINE, (1, 0.27, 0, 0, 1, 0), BICUBIC, fillcolor=124)` and
    /// `rotate(-27, BICUBIC, fillcolor=124)` of a random 6x7 image, as timm's ShearX and
    /// Rotate call them (level 0.9, the rotation negated); test/fixtures/augment/reference_ops.py
    /// prints these and the other tests' Pillow values.
    #[test]
    fn shear_and_rotate_match_pillow() {
        let image: Vec<u8> = [
            [217, 163, 130, 69, 78, 10, 19],
            [4, 44, 208, 166, 233, 128, 155],
            [248, 186, 161, 139, 143, 239, 71],
            [208, 171, 0, 100, 219, 141, 8],
            [195, 186, 216, 44, 22, 220, 5],
            [138, 20, 76, 123, 108, 103, 7],
        ]
        .concat();
        let sheared: Vec<u8> = [
            [210, 154, 118, 65, 69, 4, 19],
            [4, 120, 207, 197, 197, 123, 158],
            [209, 167, 143, 125, 232, 132, 124],
            [181, 4, 88, 216, 152, 15, 124],
            [197, 183, 9, 69, 200, 0, 124],
            [26, 107, 122, 115, 55, 0, 124],
        ]
        .concat();
        let rotated: Vec<u8> = [
            [124, 24, 51, 155, 69, 124, 124],
            [255, 230, 162, 219, 151, 115, 0],
            [202, 173, 55, 136, 167, 199, 80],
            [145, 215, 49, 149, 201, 238, 137],
            [0, 117, 97, 9, 191, 71, 5],
            [124, 124, 140, 82, 198, 22, 124],
        ]
        .concat();
        assert_eq!(op(Op::ShearX, 0.9, true, false, &image, 6, 7), sheared);
        assert_eq!(op(Op::Rotate, 0.9, true, true, &image, 6, 7), rotated);
    }

    #[test]
    fn applies_deterministically_and_only_with_probability() {
        let policy = RandAugment::parse("rand-m9-mstd0.5-inc1").unwrap();
        let image: Vec<f32> = (0..3 * 64).map(|i| (i % 17) as f32 / 16.0).collect();
        let run = |seed| {
            let mut pixels = image.clone();
            policy.apply(&mut pixels, 8, 8, &FILL, &mut super::super::stream_rng(seed, 0, 1, 0));
            pixels
        };
        assert_eq!(run(3), run(3));
        let never = RandAugment { prob: 0.0, ..policy };
        let mut pixels = image.clone();
        never.apply(&mut pixels, 8, 8, &FILL, &mut super::super::stream_rng(0, 0, 1, 0));
        // Only the 8-bit quantisation is left.
        assert!(pixels.iter().zip(&image).all(|(a, b)| (a - b).abs() <= 0.5 / 255.0 + 1e-6));
    }
}
