//! Datasets backed by image files in a folder tree, or by pixels already in memory.

use super::{Dataset, RawImage};
use crate::bail;
use crate::error::{Error, ErrorCode, Result};
use image::{DynamicImage, ImageDecoder};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

/// File extensions (lower case) of the formats this crate's `image` features decode.
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"];

/// Images found under a folder, decoded when asked for. Laid out as torchvision's
/// `ImageFolder` (`root/class/.../file.jpg`) it is labelled by class; a flat or mixed
/// folder is unlabelled.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    /// Sorted, so that item indices (and hence training runs) do not depend on the
    /// order the file system lists entries in.
    files: Vec<PathBuf>,
    classes: Vec<String>,
    /// `labels[i]` is the class of `files[i]`; empty when unlabelled.
    labels: Vec<i64>,
}

impl ImageFolder {
    /// Walks `root` recursively (following links, each folder once) for files with one
    /// of [`IMAGE_EXTENSIONS`] (any case). When every image lies inside a first-level
    /// subfolder, those subfolders' names, sorted, are the classes; subfolders without
    /// images are not classes. Nothing is decoded here.
    pub fn open(root: &Path) -> Result<ImageFolder> {
        if !root.is_dir() {
            bail!(InvalidArgument, "image folder {} does not exist or is not a folder", root.display());
        }
        let mut files = Vec::new();
        let mut visited = HashSet::new();
        walk(root, &mut files, &mut visited)?;
        if files.is_empty() {
            bail!(
                InvalidArgument,
                "image folder {} contains no images (looked for {})",
                root.display(),
                IMAGE_EXTENSIONS.join(", ")
            );
        }
        files.sort();

        // The first path component below the root is the class when every file has one.
        let class_of: Vec<Option<String>> = files
            .iter()
            .map(|f| {
                let relative = f.strip_prefix(root).ok()?;
                let mut parts = relative.components();
                let first = parts.next()?;
                parts.next().map(|_| first.as_os_str().to_string_lossy().into_owned())
            })
            .collect();
        let (classes, labels) = if class_of.iter().all(Option::is_some) {
            let names: BTreeSet<&str> = class_of.iter().flatten().map(String::as_str).collect();
            let index: HashMap<&str, i64> = names.iter().copied().zip(0..).collect();
            let labels = class_of.iter().flatten().map(|c| index[c.as_str()]).collect();
            (names.into_iter().map(str::to_owned).collect(), labels)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(ImageFolder { root: root.to_path_buf(), files, classes, labels })
    }

    /// The image files, in item order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// Appends the image files under `dir` to `out`. `visited` holds the canonical paths of
/// folders already walked, so that a link back up the tree cannot loop forever.
fn walk(dir: &Path, out: &mut Vec<PathBuf>, visited: &mut HashSet<PathBuf>) -> Result<()> {
    let canonical = fs::canonicalize(dir).map_err(|e| io_error("cannot resolve folder", dir, &e))?;
    if !visited.insert(canonical) {
        return Ok(());
    }
    let entries = fs::read_dir(dir).map_err(|e| io_error("cannot list folder", dir, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("cannot list folder", dir, &e))?;
        let path = entry.path();
        // `fs::metadata` follows links; a dangling link is not an image, so it is passed over.
        let Ok(meta) = fs::metadata(&path) else { continue };
        if meta.is_dir() {
            walk(&path, out, visited)?;
        } else if meta.is_file() && has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| known.eq_ignore_ascii_case(e)))
}

fn io_error(what: &str, path: &Path, e: &dyn std::fmt::Display) -> Error {
    Error::new(ErrorCode::Io, format!("{what} {}: {e}", path.display()))
}

/// The most pixels an image may have: 32 megapixels (8192x4096), 384 MB as the f32 RGB
/// this module makes of it. The size is checked before decoding, as a GIF of a few
/// hundred bytes may declare a canvas of 16390x4808 that would take seconds and
/// gigabytes to fill.
const MAX_IMAGE_PIXELS: u64 = 1 << 25;

/// Decodes an image file. Grayscale files give 1 channel and everything else 3; alpha is
/// dropped without compositing, as PIL's `convert("RGB")` in the published loader does.
/// The format is sniffed from the content, so a PNG named `.jpg` still decodes.
pub(super) fn decode_file(path: &Path) -> Result<RawImage> {
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| io_error("cannot read image", path, &e))?;
    decode(reader, &path.display(), ErrorCode::Io)
}

/// Decodes an encoded image held in memory, as `decode_file` decodes a file; bytes that
/// are no image this crate decodes fail with `code`, their `name` in the message.
pub(super) fn decode_bytes(bytes: &[u8], name: &dyn std::fmt::Display, code: ErrorCode) -> Result<RawImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::new(code, format!("cannot read image {name}: {e}")))?;
    decode(reader, name, code)
}

fn decode<R: std::io::BufRead + std::io::Seek>(reader: image::ImageReader<R>, name: &dyn std::fmt::Display, code: ErrorCode) -> Result<RawImage> {
    let failed = |e: &dyn std::fmt::Display| Error::new(code, format!("cannot decode image {name}: {e}"));
    let decoder = reader.into_decoder().map_err(|e| failed(&e))?;
    let (width, height) = decoder.dimensions();
    check_pixel_count(u64::from(width), u64::from(height)).map_err(|e| failed(&e))?;
    let decoded = DynamicImage::from_decoder(decoder).map_err(|e| failed(&e))?;
    if decoded.width() == 0 || decoded.height() == 0 {
        return Err(failed(&format_args!("it is {}x{}", decoded.width(), decoded.height())));
    }
    Ok(to_raw(&decoded))
}

/// Refuses images of more than [`MAX_IMAGE_PIXELS`] before they are decoded or copied.
pub(super) fn check_pixel_count(width: u64, height: u64) -> std::result::Result<(), String> {
    if width * height > MAX_IMAGE_PIXELS {
        return Err(format!("it is {width}x{height}, more than the {MAX_IMAGE_PIXELS} pixels an image may have"));
    }
    Ok(())
}

/// Interleaved pixels to channels-first f32. 8- and 16-bit samples map to [0, 1] by their
/// maximum; float samples (HDR TIFF) are clamped into it.
pub(super) fn to_raw(decoded: &DynamicImage) -> RawImage {
    let (width, height) = (decoded.width() as usize, decoded.height() as usize);
    let (channels, interleaved) = if decoded.color().has_color() {
        (3, decoded.to_rgb32f().into_raw())
    } else {
        (1, decoded.to_luma32f().into_raw())
    };
    let plane = height * width;
    let mut data = vec![0f32; channels * plane];
    for (pixel, values) in interleaved.chunks_exact(channels).enumerate() {
        for (c, &v) in values.iter().enumerate() {
            data[c * plane + pixel] = v.clamp(0.0, 1.0);
        }
    }
    RawImage { channels, height, width, data }
}

fn check_index(index: usize, len: usize) -> Result<()> {
    if index >= len {
        bail!(InvalidArgument, "item {index} is out of range: the dataset has {len} items");
    }
    Ok(())
}

/// Class names for integer labels without names of their own: "0" up to the largest label.
pub(super) fn numbered_classes(max_label: Option<i64>) -> Vec<String> {
    max_label.map(|max| (0..=max).map(|c| c.to_string()).collect()).unwrap_or_default()
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        check_index(index, self.files.len())?;
        decode_file(&self.files[index])
    }

    fn label(&self, index: usize) -> Option<i64> {
        self.labels.get(index).copied()
    }

    fn classes(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn describe(&self) -> String {
        let labels = match self.classes.len() {
            0 => "unlabelled".to_string(),
            1 => "1 class".to_string(),
            n => format!("{n} classes"),
        };
        format!("image folder {} ({} files, {labels})", self.root.display(), self.files.len())
    }
}

/// Images already in memory (from JavaScript, or synthetic), `[N, C, H, W]` in [0, 1].
#[derive(Debug, Clone)]
pub struct InMemoryDataset {
    data: Vec<f32>,
    shape: [usize; 4],
    labels: Option<Vec<i64>>,
}

impl InMemoryDataset {
    /// Checks `data.len()` against `shape` (`[N, C, H, W]`, no zero side) and the label
    /// count against N (`InvalidShape`), and that every value is in [0, 1] and every
    /// label non-negative (`InvalidArgument`): pixels normalised twice, or 0..255, are a
    /// common mistake that would otherwise train silently on wrong data.
    pub fn new(data: Vec<f32>, shape: [usize; 4], labels: Option<Vec<i64>>) -> Result<InMemoryDataset> {
        if shape.contains(&0) {
            bail!(InvalidShape, "in-memory dataset shape {shape:?} has an empty side");
        }
        let expected = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if expected != Some(data.len()) {
            bail!(
                InvalidShape,
                "in-memory dataset has {} values but shape {shape:?} needs {}",
                data.len(),
                shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
            );
        }
        if let Some(labels) = &labels {
            if labels.len() != shape[0] {
                bail!(InvalidShape, "in-memory dataset has {} images but {} labels", shape[0], labels.len());
            }
            if let Some(at) = labels.iter().position(|&l| l < 0) {
                bail!(InvalidArgument, "label {} of item {at} is negative", labels[at]);
            }
        }
        if let Some(at) = data.iter().position(|v| !(0.0..=1.0).contains(v)) {
            bail!(InvalidArgument, "in-memory dataset value {} at position {at} is outside [0, 1]", data[at]);
        }
        Ok(InMemoryDataset { data, shape, labels })
    }
}

impl Dataset for InMemoryDataset {
    fn len(&self) -> usize {
        self.shape[0]
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        check_index(index, self.shape[0])?;
        let [_, channels, height, width] = self.shape;
        let size = channels * height * width;
        Ok(RawImage { channels, height, width, data: self.data[index * size..(index + 1) * size].to_vec() })
    }

    fn label(&self, index: usize) -> Option<i64> {
        self.labels.as_ref()?.get(index).copied()
    }

    fn classes(&self) -> Vec<String> {
        numbered_classes(self.labels.as_ref().and_then(|l| l.iter().max().copied()))
    }

    fn describe(&self) -> String {
        let [n, c, h, w] = self.shape;
        let labels = match &self.labels {
            Some(_) => format!("{} classes", self.classes().len()),
            None => "unlabelled".to_string(),
        };
        format!("in-memory dataset ({n} images {c}x{h}x{w}, {labels})")
    }
}
