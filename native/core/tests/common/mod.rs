//! Helpers shared by the integration tests: temporary folders, the tests' own random
//! generator, the fixture folder, `.pth` files written without PyTorch (`pth.rs`) and a
//! few small tensor and augmentation helpers.
//! Each test binary compiles this module and uses only part of it.

#![allow(dead_code)]

pub mod pth;

use candle_core::Tensor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use vit_mae_core::data::{Augment, Crop, Dataset, RawImage};

/// The repository's own PyTorch reference fixtures (`test/fixtures`, written by
/// `test/fixtures/generate.py`): `$VIT_MAE_REPO_FIXTURES` when set, for a test binary
/// built on one machine and run from another clone (bench/gpu.sh), else the clone it
/// was built from.
pub fn fixtures() -> PathBuf {
    match std::env::var("VIT_MAE_REPO_FIXTURES") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../test/fixtures"),
    }
}

/// Every fixture folder the parity tests hold the model to: the repository's own, then
/// `$VIT_MAE_FIXTURES` when set, else `../shared/fixtures` beside the repository when
/// it exists (fixtures of an independent implementation).
pub fn fixture_dirs() -> Vec<PathBuf> {
    let extra = match std::env::var("VIT_MAE_FIXTURES") {
        Ok(dir) => Some(PathBuf::from(dir)),
        Err(_) => Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")).filter(|d| d.is_dir()),
    };
    std::iter::once(fixtures()).chain(extra).collect()
}

/// The fixture folders that hold case `name`; the repository's own always does.
pub fn dirs_with(name: &str) -> Vec<PathBuf> {
    let dirs: Vec<PathBuf> = fixture_dirs().into_iter().filter(|d| d.join(format!("{name}.case.safetensors")).is_file()).collect();
    assert!(dirs.first() == Some(&fixtures()), "test/fixtures lacks {name}: run test/fixtures/generate.py");
    dirs
}

/// The device the parity tests run on: `$VIT_MAE_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`)
/// when set, else the CPU. A CUDA build runs them on a GPU this way.
pub fn test_device() -> candle_core::Device {
    let name = std::env::var("VIT_MAE_TEST_DEVICE").unwrap_or_else(|_| "cpu".to_string());
    vit_mae_core::DeviceSpec::parse(&name).and_then(|spec| spec.resolve()).unwrap_or_else(|e| panic!("VIT_MAE_TEST_DEVICE={name}: {e}"))
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty folder whose name holds the test binary, `label`, the process id,
    /// the time and a per-process counter, so no two tests (or runs) share one.
    pub fn new(label: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "vit-mae-core-{}-{label}-{}-{nanos}-{}",
            env!("CARGO_CRATE_NAME"),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// The folder itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the folder (not created).
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The names of the folder's entries, sorted.
    pub fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    /// Writes `bytes` at `relative`, creating folders on the way.
    pub fn write(&self, relative: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SplitMix64: the test's own generator, independent of the crate's.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `n` values uniform in [lo, hi), as f32.
    pub fn values(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| (lo + (hi - lo) * self.unit()) as f32).collect()
    }
}

/// An f32 tensor's bit patterns, flattened.
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// An f32 tensor's values as f64, flattened.
pub fn host(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect()
}

/// No padding, no crop (the central square, resized if needed), no flip; `mean` and
/// `std` the same in every channel.
pub fn plain_augment(img_size: usize, channels: usize, mean: f32, std: f32) -> Augment {
    Augment { crop: Crop::Center, hflip: false, ..Augment::pretrain(img_size, vec![mean; channels], vec![std; channels]) }
}

/// What is wrong with a [`Faulty`] dataset's bad items.
#[derive(Clone, Copy)]
pub enum Fault {
    /// A NaN pixel (`InMemoryDataset` refuses NaN, as it should, so bad pixels come from here).
    NanPixel,
    /// The item cannot be read, as a corrupt file in a folder.
    Unreadable,
}

/// `inner` with `fault` in item `i` when `bad[i]`.
pub struct Faulty<D> {
    pub inner: D,
    pub bad: Vec<bool>,
    pub fault: Fault,
}

impl<D: Dataset> Dataset for Faulty<D> {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn get(&self, index: usize) -> vit_mae_core::Result<RawImage> {
        let mut image = match (self.bad[index], self.fault) {
            (true, Fault::Unreadable) => return Err(vit_mae_core::Error::new(vit_mae_core::ErrorCode::Io, format!("item{index}.png is not an image"))),
            _ => self.inner.get(index)?,
        };
        if self.bad[index] {
            let at = (index * 37) % image.data.len();
            image.data[at] = f32::NAN;
        }
        Ok(image)
    }

    fn label(&self, index: usize) -> Option<i64> {
        self.inner.label(index)
    }

    fn classes(&self) -> Vec<String> {
        self.inner.classes()
    }

    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
}
