//! The IDX format of MNIST and Fashion-MNIST: a 4-byte magic (`0 0 type rank`), `rank`
//! big-endian u32 dimensions, then the elements row-major. Only unsigned bytes (type
//! 0x08) occur in these datasets and only they are read. Files may be gzipped.

use super::dataset::numbered_classes;
use super::{Dataset, RawImage};
use crate::bail;
use crate::error::{Error, ErrorCode, Result};
use flate2::read::MultiGzDecoder;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Fashion-MNIST's class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const UNSIGNED_BYTE: u8 = 0x08;
/// Deflate cannot expand data by more than about 1032:1, which bounds what a gzip file
/// of a given size can hold before anything is allocated for it.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// An IDX image file (`[N, H, W]` or `[N, H, W, C]` bytes) with an optional label file
/// (`[N]` bytes), held in memory as bytes (47 MB for all of MNIST) and converted per item.
#[derive(Debug, Clone)]
pub struct IdxDataset {
    path: PathBuf,
    count: usize,
    height: usize,
    width: usize,
    channels: usize,
    /// `[N, H, W, C]`.
    pixels: Vec<u8>,
    labels: Option<Vec<u8>>,
    classes: Vec<String>,
}

impl IdxDataset {
    /// Reads and validates both files (gzip detected by content). Anything malformed,
    /// truncated or inconsistent fails with `InvalidArgument` naming the file; a file
    /// that exists but cannot be read fails with `Io`. Pixels become `byte / 255`.
    /// Labelled datasets are classed "0", "1", ... up to the largest label until named
    /// with [`IdxDataset::with_class_names`].
    pub fn open(images: &Path, labels: Option<&Path>) -> Result<IdxDataset> {
        let (dims, pixels) = read_idx(images)?;
        let (count, height, width, channels) = match dims[..] {
            [n, h, w] => (n, h, w, 1),
            [n, h, w, c] => (n, h, w, c),
            _ => {
                bail!(InvalidArgument, "IDX file {} has rank {}; images need rank 3 or 4", images.display(), dims.len())
            }
        };
        if count == 0 || height == 0 || width == 0 || channels == 0 {
            bail!(InvalidArgument, "IDX file {} holds no images (dimensions {dims:?})", images.display());
        }
        let labels = match labels {
            Some(path) => {
                let (label_dims, values) = read_idx(path)?;
                if label_dims.len() != 1 {
                    bail!(
                        InvalidArgument,
                        "IDX label file {} has rank {}; labels need rank 1",
                        path.display(),
                        label_dims.len()
                    );
                }
                if label_dims[0] != count {
                    bail!(
                        InvalidArgument,
                        "IDX label file {} has {} labels but image file {} has {count} images",
                        path.display(),
                        label_dims[0],
                        images.display()
                    );
                }
                Some(values)
            }
            None => None,
        };
        let classes = numbered_classes(labels.as_ref().and_then(|l| l.iter().max()).map(|&m| i64::from(m)));
        Ok(IdxDataset { path: images.to_path_buf(), count, height, width, channels, pixels, labels, classes })
    }

    /// Names the classes (label `i` is `names[i]`); there must be a name for every label
    /// present.
    pub fn with_class_names(mut self, names: &[&str]) -> Result<IdxDataset> {
        if self.labels.is_none() {
            bail!(InvalidArgument, "IDX dataset {} has no labels to name", self.path.display());
        }
        if names.len() < self.classes.len() {
            bail!(
                InvalidArgument,
                "{} class names given but the labels go up to {}",
                names.len(),
                self.classes.len() - 1
            );
        }
        self.classes = names.iter().map(|n| n.to_string()).collect();
        Ok(self)
    }
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::InvalidArgument, format!("IDX file {}: {what}", path.display()))
}

/// A read error: data that ends early or does not inflate is a corrupt file
/// (`InvalidArgument`); anything else is the file system's fault (`Io`).
fn read_error(path: &Path, e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => invalid(path, "truncated"),
        io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => {
            invalid(path, format_args!("corrupt gzip data ({e})"))
        }
        _ => Error::new(ErrorCode::Io, format!("cannot read IDX file {}: {e}", path.display())),
    }
}

/// Returns the dimensions and the element bytes of an unsigned-byte IDX file. The byte
/// count is checked against the file's size (plain) or the most it could inflate to
/// (gzip) before allocating, so a forged header cannot make it allocate more.
fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>)> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!(InvalidArgument, "IDX file {} does not exist", path.display())
        }
        Err(e) => bail!(Io, "cannot open IDX file {}: {e}", path.display()),
    };
    let file_len = file.metadata().map_err(|e| read_error(path, e))?.len();
    let mut sniff = [0u8; 2];
    let gzipped = file_len >= 2 && {
        file.read_exact(&mut sniff).map_err(|e| read_error(path, e))?;
        file.seek(SeekFrom::Start(0)).map_err(|e| read_error(path, e))?;
        sniff == GZIP_MAGIC
    };
    let mut reader: Box<dyn Read> =
        if gzipped { Box::new(MultiGzDecoder::new(BufReader::new(file))) } else { Box::new(BufReader::new(file)) };

    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic).map_err(|e| read_error(path, e))?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(invalid(path, format_args!("not an IDX file (magic bytes {magic:02x?})")));
    }
    if magic[2] != UNSIGNED_BYTE {
        return Err(invalid(
            path,
            format_args!("element type 0x{:02x} is not supported; only unsigned bytes (0x08) are", magic[2]),
        ));
    }
    let rank = magic[3] as usize;
    if rank == 0 || rank > 4 {
        return Err(invalid(path, format_args!("rank {rank} is not supported (1 to 4)")));
    }
    let mut dims = Vec::with_capacity(rank);
    for _ in 0..rank {
        let mut d = [0u8; 4];
        reader.read_exact(&mut d).map_err(|e| read_error(path, e))?;
        dims.push(u32::from_be_bytes(d) as usize);
    }
    let header_len = 4 + 4 * rank as u64;
    let Some(payload) = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64)) else {
        return Err(invalid(path, format_args!("dimensions {dims:?} are too large")));
    };
    if gzipped && payload > file_len.saturating_mul(MAX_DEFLATE_RATIO) {
        let why =
            format!("dimensions {dims:?} need {payload} bytes of data, more than a {file_len}-byte gzip file holds");
        return Err(invalid(path, format_args!("truncated: {why}")));
    }
    if !gzipped && payload != file_len.saturating_sub(header_len) {
        return Err(invalid(
            path,
            format_args!(
                "dimensions {dims:?} need {payload} bytes of data but the file holds {}",
                file_len.saturating_sub(header_len)
            ),
        ));
    }
    let payload = usize::try_from(payload).map_err(|_| invalid(path, "too large for this machine"))?;
    // A plain file's size was just checked, so its buffer can be sized up front; a gzip
    // buffer grows with what actually inflates instead of trusting the header.
    let mut data = Vec::with_capacity(if gzipped { 0 } else { payload });
    // One byte more than needed, to notice trailing data (and, for gzip, to reach the
    // end of the stream so that its checksum is verified).
    reader.take(payload as u64 + 1).read_to_end(&mut data).map_err(|e| read_error(path, e))?;
    if data.len() < payload {
        return Err(invalid(
            path,
            format_args!("truncated: dimensions {dims:?} need {payload} bytes of data, found {}", data.len()),
        ));
    }
    if data.len() > payload {
        return Err(invalid(
            path,
            format_args!("data continues past the {payload} bytes that dimensions {dims:?} need"),
        ));
    }
    Ok((dims, data))
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.count
    }

    fn get(&self, index: usize) -> Result<RawImage> {
        if index >= self.count {
            bail!(InvalidArgument, "item {index} is out of range: the dataset has {} items", self.count);
        }
        let (channels, plane) = (self.channels, self.height * self.width);
        let size = plane * channels;
        let item = &self.pixels[index * size..(index + 1) * size];
        // Interleaved [H, W, C] to planar [C, H, W].
        let mut data = vec![0f32; size];
        for (pixel, values) in item.chunks_exact(channels).enumerate() {
            for (c, &v) in values.iter().enumerate() {
                data[c * plane + pixel] = f32::from(v) / 255.0;
            }
        }
        Ok(RawImage { channels, height: self.height, width: self.width, data })
    }

    fn label(&self, index: usize) -> Option<i64> {
        self.labels.as_ref()?.get(index).map(|&l| i64::from(l))
    }

    fn classes(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn describe(&self) -> String {
        let labels = match &self.labels {
            Some(_) => format!("{} classes", self.classes.len()),
            None => "unlabelled".to_string(),
        };
        format!(
            "IDX {} ({} images {}x{}x{}, {labels})",
            self.path.display(),
            self.count,
            self.height,
            self.width,
            self.channels
        )
    }
}
