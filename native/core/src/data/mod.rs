//! The data pipeline: datasets that decode one image at a time, the published MAE
//! pre-training augmentation, and a multi-threaded batch loader whose output is
//! bit-for-bit reproducible (and resumable mid-epoch) whatever the thread count.
//!
//! Every random draw comes from a ChaCha8 stream keyed by `(seed, epoch, stream,
//! index)` (see `stream_rng`), and draws are turned into numbers by this module's own
//! helpers rather than `rand`'s distributions, so a `rand` upgrade cannot silently
//! change a training run.

mod augment;
mod dataset;
mod idx;
mod input;
mod loader;
mod rand_augment;

pub use augment::{
    color_jitter, dataset_statistics, interpolate_bicubic_torch, random_erasing, random_resized_crop_params, resize_bicubic, Augment,
    Crop, CropBox, FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD,
};
pub use rand_augment::RandAugment;
pub use dataset::{ImageFolder, InMemoryDataset, IMAGE_EXTENSIONS};
pub use idx::{IdxDataset, FASHION_MNIST_CLASSES};
pub use input::{preprocess, ImageInput};
pub use loader::{Batch, EpochBatches, Loader, LoaderOptions, Shard};

use crate::bail;
use crate::error::Result;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One decoded image, channels-first, values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct RawImage {
    /// 1 (grayscale) or 3 (RGB) for decoded files; any count for in-memory data.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `[channels, height, width]`, row-major.
    pub data: Vec<f32>,
}

impl RawImage {
    /// Checks that `data` holds exactly `channels * height * width` values and that no
    /// side is zero.
    pub fn new(channels: usize, height: usize, width: usize, data: Vec<f32>) -> Result<Self> {
        let image = RawImage { channels, height, width, data };
        image.check()?;
        Ok(image)
    }

    /// The same checks as `new`, for images built field by field (the fields are public).
    pub fn check(&self) -> Result<()> {
        if self.channels == 0 || self.height == 0 || self.width == 0 {
            bail!(InvalidShape, "image has an empty side: {}x{}x{}", self.channels, self.height, self.width);
        }
        let expected = self.channels.checked_mul(self.height).and_then(|n| n.checked_mul(self.width));
        if expected != Some(self.data.len()) {
            bail!(
                InvalidShape,
                "image data has {} values but {}x{}x{} needs {}",
                self.data.len(),
                self.channels,
                self.height,
                self.width,
                self.channels.saturating_mul(self.height).saturating_mul(self.width)
            );
        }
        Ok(())
    }
}

/// A source of images, decoded on demand so that a dataset larger than memory can be
/// streamed. Shared by the loader's worker threads, hence `Send + Sync`.
pub trait Dataset: Send + Sync {
    /// Number of items.
    fn len(&self) -> usize;
    /// Whether the dataset has no items (the loader rejects such datasets).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decodes item `index`. An unreadable or corrupt image fails with `ErrorCode::Io`
    /// and a message naming its file; an index out of range with `InvalidArgument`.
    fn get(&self, index: usize) -> Result<RawImage>;
    /// Class index of item `index`, if the dataset has labels.
    fn label(&self, index: usize) -> Option<i64>;
    /// Class names, in class-index order (empty when unlabelled).
    fn classes(&self) -> Vec<String>;
    /// A short human-readable description ("image folder /x (1234 files, 10 classes)").
    fn describe(&self) -> String;
}

/// Stream tags keep the streams of each kind of draw independent even where their
/// other key parts coincide: the epoch order and the items' augmentations (keyed by
/// epoch), and the training steps' masks and stochastic depth (keyed by step).
const ORDER_STREAM: u64 = 0;
const AUGMENT_STREAM: u64 = 1;
pub(crate) const MASK_STREAM: u64 = 2;
pub(crate) const DROP_PATH_STREAM: u64 = 3;

/// The RNG of one stream: ChaCha8 whose 32-byte key is `(seed, round, stream, index)`,
/// little-endian, where `round` is the epoch for the data's draws and the optimizer
/// step for a step's masks and stochastic depth, and `index` a dataset index (0 for the
/// epoch order). Keying an image's draws by its dataset index rather than its place in a
/// batch makes them the same whichever batch, or data-parallel rank, it lands in.
/// Packing (rather than hashing) the key makes distinct tuples distinct streams.
pub(crate) fn stream_rng(seed: u64, round: u64, stream: u64, index: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, part) in key.chunks_exact_mut(8).zip([seed, round, stream, index]) {
        chunk.copy_from_slice(&part.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// Uniform in [0, 1) from the top 53 bits of one draw (as torch's `uniform_` on f64).
fn uniform01<R: RngCore + ?Sized>(rng: &mut R) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Standard normal by Box-Muller from two uniform draws (the second's sine half unused,
/// so every value costs the same two draws).
fn standard_normal<R: RngCore + ?Sized>(rng: &mut R) -> f64 {
    let u1 = 1.0 - uniform01(rng); // in (0, 1]: ln is finite
    let u2 = uniform01(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Uniform in `0..n` without modulo bias (Lemire's multiply-and-reject). `n` must be > 0.
fn below<R: RngCore + ?Sized>(rng: &mut R, n: u64) -> u64 {
    debug_assert!(n > 0);
    // 2^64 mod n: products whose low half falls below it would over-represent some values.
    let threshold = n.wrapping_neg() % n;
    loop {
        let product = u128::from(rng.next_u64()) * u128::from(n);
        if product as u64 >= threshold {
            return (product >> 64) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = stream_rng(1, 2, 3, 4);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let v = below(&mut rng, 7) as usize;
            seen[v] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(below(&mut rng, 1), 0);
    }

    #[test]
    fn uniform01_is_in_unit_interval() {
        let mut rng = stream_rng(0, 0, 0, 0);
        let draws: Vec<f64> = (0..1000).map(|_| uniform01(&mut rng)).collect();
        assert!(draws.iter().all(|&u| (0.0..1.0).contains(&u)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.05, "mean {mean}");
    }

    #[test]
    fn streams_differ_by_every_key_part() {
        let first = |mut r: ChaCha8Rng| r.next_u64();
        let base = first(stream_rng(1, 1, 1, 1));
        assert_ne!(base, first(stream_rng(2, 1, 1, 1)));
        assert_ne!(base, first(stream_rng(1, 2, 1, 1)));
        assert_ne!(base, first(stream_rng(1, 1, 2, 1)));
        assert_ne!(base, first(stream_rng(1, 1, 1, 2)));
        assert_eq!(base, first(stream_rng(1, 1, 1, 1)));
    }
}
