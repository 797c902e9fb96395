//! Mixup and CutMix as timm's `Mixup` in its default 'batch' mode, which the
//! published fine-tuning uses: one mixing coefficient per batch, each image mixed
//! with the image at the mirrored position of the batch (or, across data-parallel
//! ranks, of the partner rank's batch).

use crate::bail;
use crate::classifier::soft_targets;
use crate::error::Result;
use rand::Rng;
use rand_distr::{Beta, Distribution};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MixupConfig {
    /// Beta(alpha, alpha) for mixup; 0 turns mixup off.
    pub mixup_alpha: f64,
    /// Beta(alpha, alpha) for cutmix; 0 turns cutmix off.
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub prob: f64,
    /// With both on, the probability of cutmix rather than mixup.
    pub switch_prob: f64,
    pub label_smoothing: f64,
    pub num_classes: usize,
}

/// How a batch was mixed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mixing {
    /// The weight of each image's own label (1: not mixed).
    pub lam: f64,
    /// Rows `y0..y1` and columns `x0..x1` pasted from the mirrored image (cutmix).
    pub cutmix_box: Option<[usize; 4]>,
}

impl MixupConfig {
    pub fn enabled(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0
    }

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("mixup", self.mixup_alpha), ("cutmix", self.cutmix_alpha)] {
            if !(v.is_finite() && v >= 0.0) {
                bail!(InvalidArgument, "{name} alpha must be a non-negative number, got {v}");
            }
        }
        for (name, v) in [("mixupProb", self.prob), ("mixupSwitchProb", self.switch_prob), ("smoothing", self.label_smoothing)] {
            if !(0.0..=1.0).contains(&v) {
                bail!(InvalidArgument, "{name} must be in [0, 1], got {v}");
            }
        }
        Ok(())
    }

    /// timm's `_params_per_batch`: the coefficient and whether to cut.
    fn draw(&self, rng: &mut impl Rng) -> Result<(f64, bool)> {
        if !self.enabled() || rng.random::<f64>() >= self.prob {
            return Ok((1.0, false));
        }
        let beta = |alpha: f64, rng: &mut dyn rand::RngCore| -> Result<f64> {
            let d = Beta::new(alpha, alpha).map_err(|e| crate::error::Error::new(crate::error::ErrorCode::InvalidArgument, format!("bad mixing alpha {alpha}: {e}")))?;
            Ok(d.sample(rng))
        };
        Ok(if self.mixup_alpha > 0.0 && self.cutmix_alpha > 0.0 {
            let cut = rng.random::<f64>() < self.switch_prob;
            (beta(if cut { self.cutmix_alpha } else { self.mixup_alpha }, rng)?, cut)
        } else if self.mixup_alpha > 0.0 {
            (beta(self.mixup_alpha, rng)?, false)
        } else {
            (beta(self.cutmix_alpha, rng)?, true)
        })
    }

    /// Mixes `images` (`[N, C, H, W]`, in place) with a partner batch of the same shape
    /// and returns the soft targets `[N, K]`: image `i` is mixed with the partner's image
    /// `N - 1 - i`, and the targets are `lam * smoothed(y) + (1 - lam) * smoothed(partner's
    /// y reversed)`. The partner is this batch itself when `None` (timm's `x.flip(0)`; the
    /// batch size must then be even); data-parallel training passes the batch of the
    /// mirrored rank (global position `j`'s partner is `W*B - 1 - j`), the same `rng` on
    /// every rank giving them one coefficient and one box.
    pub fn mix(&self, images: &mut [f32], shape: [usize; 4], labels: &[i64], partner: Option<(&[f32], &[i64])>, rng: &mut impl Rng) -> Result<(Vec<f32>, Mixing)> {
        let [n, c, h, w] = shape;
        if let Some((partner_images, partner_labels)) = partner {
            if partner_images.len() != images.len() || partner_labels.len() != labels.len() {
                bail!(
                    InvalidArgument,
                    "the partner batch has {} values and {} labels where this one has {} and {}",
                    partner_images.len(),
                    partner_labels.len(),
                    images.len(),
                    labels.len()
                );
            }
        } else if n % 2 != 0 {
            bail!(InvalidArgument, "mixup and cutmix need an even batch size, got {n}");
        }
        let (mut lam, cut) = self.draw(rng)?;
        let mut cutmix_box = None;
        if lam < 1.0 {
            let own;
            let partner_images = match partner {
                Some((partner_images, _)) => partner_images,
                None => {
                    own = images.to_vec();
                    &own
                }
            };
            let image_len = c * h * w;
            if cut {
                let [y0, y1, x0, x1] = cutmix_bbox(h, w, lam, rng);
                lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
                cutmix_box = Some([y0, y1, x0, x1]);
                for i in 0..n {
                    let (dst, src) = (i * image_len, (n - 1 - i) * image_len);
                    for ch in 0..c {
                        for y in y0..y1 {
                            let row = ch * h * w + y * w;
                            images[dst + row + x0..dst + row + x1].copy_from_slice(&partner_images[src + row + x0..src + row + x1]);
                        }
                    }
                }
            } else {
                for i in 0..n {
                    let (dst, src) = (i * image_len, (n - 1 - i) * image_len);
                    for k in 0..image_len {
                        images[dst + k] = (images[dst + k] as f64 * lam + partner_images[src + k] as f64 * (1.0 - lam)) as f32;
                    }
                }
            }
        }
        let k = self.num_classes;
        let own = soft_targets(labels, k, self.label_smoothing);
        let reversed: Vec<i64> = partner.map_or(labels, |(_, partner_labels)| partner_labels).iter().rev().copied().collect();
        let other = soft_targets(&reversed, k, self.label_smoothing);
        let targets = own.iter().zip(&other).map(|(a, b)| (*a as f64 * lam + *b as f64 * (1.0 - lam)) as f32).collect();
        Ok((targets, Mixing { lam, cutmix_box }))
    }
}

/// timm's `rand_bbox`: a box of `sqrt(1 - lam)` of each side, centred uniformly,
/// clipped to the image. Returns `[y0, y1, x0, x1]`.
fn cutmix_bbox(h: usize, w: usize, lam: f64, rng: &mut impl Rng) -> [usize; 4] {
    let ratio = (1.0 - lam).sqrt();
    let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let cy = rng.random_range(0..h as i64);
    let cx = rng.random_range(0..w as i64);
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    [clip(cy - cut_h / 2, h), clip(cy + cut_h / 2, h), clip(cx - cut_w / 2, w), clip(cx + cut_w / 2, w)]
}
