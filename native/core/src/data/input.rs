//! Images as applications hold them (a file path, encoded bytes from an upload, raw
//! 8-bit pixels from a canvas) made into model inputs by the dataset loader's own
//! decoding and evaluation transform, so that one picture gives the same tensor
//! whichever way it arrives.

use super::dataset::{check_pixel_count, decode_bytes, to_raw};
use super::{stream_rng, Augment, Crop, RawImage};
use crate::bail;
use crate::error::{Error, ErrorCode, Result};
use image::{DynamicImage, ImageBuffer};
use rayon::prelude::*;
use std::path::PathBuf;

/// One image, as the caller has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageInput {
    /// A file in any format [`super::IMAGE_EXTENSIONS`] lists, sniffed from its content.
    Path(PathBuf),
    /// A file's bytes (PNG, JPEG, WebP, ...), sniffed from their content.
    Encoded(Vec<u8>),
    /// Interleaved 8-bit pixels, row-major: gray (1 channel), RGB (3) or RGBA (4, alpha
    /// dropped as a decoded RGBA file's is).
    Pixels {
        /// `width * height * channels` bytes.
        data: Vec<u8>,
        /// Columns.
        width: usize,
        /// Rows.
        height: usize,
        /// 1, 3 or 4.
        channels: usize,
    },
}

impl ImageInput {
    /// How errors name item `index`: by index, and by path for files.
    fn name(&self, index: usize) -> String {
        match self {
            ImageInput::Path(path) => format!("{index} ({})", path.display()),
            _ => index.to_string(),
        }
    }

    /// The pixels in [0, 1], channels-first, as the dataset loader decodes a file.
    fn decode(self, index: usize) -> Result<RawImage> {
        let name = self.name(index);
        let image = match self {
            // Read whole, so that a missing file (`E_IO`) and a file that is no image
            // (`E_IMAGE`) are told apart; the decoder sees the same bytes either way.
            ImageInput::Path(path) => std::fs::read(&path)
                .map_err(|e| Error::new(ErrorCode::Io, format!("cannot read {}: {e}", path.display())))
                .and_then(|bytes| decode_bytes(&bytes, &path.display(), ErrorCode::InvalidImage)),
            ImageInput::Encoded(bytes) => decode_bytes(&bytes, &format_args!("of {} bytes", bytes.len()), ErrorCode::InvalidImage),
            ImageInput::Pixels { data, width, height, channels } => pixels(data, width, height, channels),
        };
        // Every message starts by naming the item, whatever part of the pipeline failed.
        image.map_err(|e| Error::new(e.code, format!("image {name}: {}", e.message)))
    }
}

fn pixels(data: Vec<u8>, width: usize, height: usize, channels: usize) -> Result<RawImage> {
    if width == 0 || height == 0 {
        bail!(InvalidImage, "raw pixels of size {width}x{height} have an empty side");
    }
    if let Err(why) = check_pixel_count(width as u64, height as u64) {
        bail!(InvalidImage, "raw pixels: {why}");
    }
    let expected = width * height * channels;
    if !matches!(channels, 1 | 3 | 4) {
        bail!(InvalidImage, "raw pixels have {channels} channels; 1 (gray), 3 (RGB) or 4 (RGBA) are supported");
    }
    if data.len() != expected {
        bail!(InvalidImage, "raw pixels hold {} bytes but {width}x{height}x{channels} needs {expected}", data.len());
    }
    let (w, h) = (width as u32, height as u32);
    // `from_raw` cannot fail: the length was checked above.
    let image = match channels {
        1 => ImageBuffer::from_raw(w, h, data).map(DynamicImage::ImageLuma8),
        3 => ImageBuffer::from_raw(w, h, data).map(DynamicImage::ImageRgb8),
        _ => ImageBuffer::from_raw(w, h, data).map(DynamicImage::ImageRgba8),
    };
    image.map(|i| to_raw(&i)).ok_or_else(|| Error::new(ErrorCode::Internal, "raw pixel buffer rejected after its length was checked"))
}

/// `[N, channels, img_size, img_size]`, normalised: each input decoded as the dataset
/// loader decodes a file, then transformed by `augment`, which must be deterministic
/// (a center crop or the whole image, no flip, jitter, RandAugment or erasing): what
/// the loader gives for the same file in evaluation mode, bit for bit. Images are
/// decoded in parallel on rayon's pool (whose threads persist, so that repeated calls
/// reuse their allocator arenas); an error names the first bad item by its index.
pub fn preprocess(inputs: Vec<ImageInput>, augment: &Augment) -> Result<Vec<f32>> {
    augment.validate()?;
    let random = !matches!(augment.crop, Crop::Center | Crop::Whole)
        || augment.hflip
        || augment.color_jitter.iter().any(|&j| j > 0.0)
        || augment.rand_augment.is_some()
        || augment.random_erasing > 0.0;
    if random {
        bail!(InvalidArgument, "preprocessing applies no random transform: use a center or whole-image crop without flip, jitter, RandAugment or erasing");
    }
    if inputs.is_empty() {
        bail!(InvalidArgument, "no images to preprocess");
    }
    let item = augment.channels * augment.img_size * augment.img_size;
    let bytes = (inputs.len() as u128) * (item as u128) * 4;
    crate::memory::check(bytes, |b| format!("{} preprocessed images of {}x{s}x{s} need {b}", inputs.len(), augment.channels, s = augment.img_size))?;
    let mut out = vec![0f32; inputs.len() * item];
    let failures: Vec<(usize, Error)> = inputs
        .into_par_iter()
        .zip(out.par_chunks_exact_mut(item))
        .enumerate()
        .filter_map(|(index, (input, slot))| {
            // No draw is made by a deterministic transform; `apply` only needs an RNG to hand.
            let mut rng = stream_rng(0, 0, 0, 0);
            let pixels = input
                .decode(index)
                .and_then(|image| augment.apply(&image, &mut rng).map_err(|e| Error::new(e.code, format!("image {index}: {}", e.message))));
            match pixels {
                Ok(pixels) => {
                    slot.copy_from_slice(&pixels);
                    None
                }
                Err(e) => Some((index, e)),
            }
        })
        .collect();
    // The lowest index fails, so the error does not depend on thread timing.
    match failures.into_iter().min_by_key(|(index, _)| *index) {
        Some((_, e)) => Err(e),
        None => Ok(out),
    }
}
