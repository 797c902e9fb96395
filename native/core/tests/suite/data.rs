//! The data pipeline: datasets (IDX, image folders, in memory), the augmentation's
//! invariants, and the loader's determinism, error handling and shutdown.

use crate::common::{plain_augment, TempDir};
use flate2::read::GzDecoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vit_mae_core::data::{
    dataset_statistics, random_resized_crop_params, resize_bicubic, Augment, Batch, Crop, Dataset, IdxDataset, ImageFolder,
    preprocess, ImageInput, InMemoryDataset, Loader, LoaderOptions, RandAugment, RawImage, Shard, FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
};
use vit_mae_core::{ErrorCode, Result};

fn fashion(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist").join(name)
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut out).unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn expect_err<T>(result: Result<T>, code: ErrorCode, mentions: &str) -> String {
    match result {
        Ok(_) => panic!("expected an error mentioning {mentions:?}"),
        Err(e) => {
            assert_eq!(e.code, code, "{e}");
            assert!(e.message.contains(mentions), "{e} does not mention {mentions:?}");
            e.message
        }
    }
}

fn file_name(path: &Path) -> &str {
    path.file_name().unwrap().to_str().unwrap()
}

fn random_images(n: usize, c: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * c * h * w).map(|_| rng.random::<f32>()).collect()
}

/// No crop, no flip, no padding, mean 0 and std 1 (no normalisation).
fn plain(img_size: usize, channels: usize) -> Augment {
    plain_augment(img_size, channels, 0.0, 1.0)
}

fn collect(loader: &Loader, epoch: usize, start: usize) -> Vec<Batch> {
    loader.epoch(epoch, start).map(|b| b.unwrap()).collect()
}

// ---------------------------------------------------------------- IDX

#[test]
fn idx_reads_the_fashion_mnist_sample() {
    let images = fashion("train-images-idx3-ubyte.gz");
    let ds = IdxDataset::open(&images, Some(&fashion("train-labels-idx1-ubyte.gz"))).unwrap();
    assert_eq!(ds.len(), 4000);
    let mut seen = [false; 10];
    for i in 0..ds.len() {
        let label = ds.label(i).unwrap();
        assert!((0..10).contains(&label), "label {label}");
        seen[label as usize] = true;
    }
    assert!(seen.iter().all(|&s| s), "every class occurs in 4000 items");
    assert_eq!(ds.classes().len(), 10);

    // Pixels are the file's bytes / 255, read here independently of the dataset.
    let raw = gunzip(&images);
    for i in [0, 1, 1234, 3999] {
        let image = ds.get(i).unwrap();
        assert_eq!((image.channels, image.height, image.width), (1, 28, 28));
        assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)));
        let bytes = &raw[16 + i * 784..16 + (i + 1) * 784];
        let expected: Vec<f32> = bytes.iter().map(|&b| b as f32 / 255.0).collect();
        assert_eq!(image.data, expected);
    }
    assert!(ds.get(4000).is_err());

    let named = ds.with_class_names(&FASHION_MNIST_CLASSES).unwrap();
    assert_eq!(named.classes()[9], "Ankle boot");
    assert!(named.describe().contains("4000"), "{}", named.describe());

    let test_set = IdxDataset::open(&fashion("t10k-images-idx3-ubyte.gz"), None).unwrap();
    assert_eq!(test_set.len(), 1000);
    assert_eq!(test_set.label(0), None);
    assert!(test_set.classes().is_empty());
}

#[test]
fn idx_gzip_and_plain_give_the_same_data() {
    let dir = TempDir::new("idx-plain");
    let images = dir.write("images.idx", &gunzip(&fashion("t10k-images-idx3-ubyte.gz")));
    let labels = dir.write("labels.idx", &gunzip(&fashion("t10k-labels-idx1-ubyte.gz")));
    let from_plain = IdxDataset::open(&images, Some(&labels)).unwrap();
    let from_gzip =
        IdxDataset::open(&fashion("t10k-images-idx3-ubyte.gz"), Some(&fashion("t10k-labels-idx1-ubyte.gz"))).unwrap();
    assert_eq!(from_plain.len(), from_gzip.len());
    for i in (0..from_plain.len()).step_by(37) {
        assert_eq!(from_plain.get(i).unwrap(), from_gzip.get(i).unwrap());
        assert_eq!(from_plain.label(i), from_gzip.label(i));
    }
}

#[test]
fn idx_rank_4_is_channels_last() {
    let dir = TempDir::new("idx-rank4");
    // Two 1x2 RGB images.
    let mut bytes = vec![0, 0, 8, 4, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3];
    bytes.extend([10, 20, 30, 40, 50, 60, 255, 0, 0, 0, 255, 0]);
    let ds = IdxDataset::open(&dir.write("rgb.idx", &bytes), None).unwrap();
    let image = ds.get(0).unwrap();
    assert_eq!((image.channels, image.height, image.width), (3, 1, 2));
    // Planar: the red plane holds both pixels' first bytes.
    let expected: Vec<f32> = [10, 40, 20, 50, 30, 60].iter().map(|&b| b as f32 / 255.0).collect();
    assert_eq!(image.data, expected);
    assert_eq!(ds.get(1).unwrap().data, vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
}

#[test]
fn corrupt_idx_files_fail_cleanly() {
    let dir = TempDir::new("idx-corrupt");
    let images = gunzip(&fashion("t10k-images-idx3-ubyte.gz"));
    let invalid = ErrorCode::InvalidArgument;
    let open = |name: &str, bytes: &[u8]| IdxDataset::open(&dir.write(name, bytes), None);

    expect_err(open("truncated.idx", &images[..images.len() / 2]), invalid, "truncated.idx");
    let gz = std::fs::read(fashion("t10k-images-idx3-ubyte.gz")).unwrap();
    expect_err(open("truncated.gz", &gz[..gz.len() / 2]), invalid, "truncated.gz");
    let mut flipped = gz.clone();
    for b in &mut flipped[gz.len() / 2..gz.len() / 2 + 64] {
        *b ^= 0x5a;
    }
    expect_err(open("flipped.gz", &flipped), invalid, "flipped.gz");
    let mut trailing = images.clone();
    trailing.push(0);
    expect_err(open("trailing.idx", &trailing), invalid, "trailing.idx");
    expect_err(open("empty.idx", &[]), invalid, "empty.idx");
    expect_err(open("magic.idx", b"GIF89a not an idx file"), invalid, "magic.idx");
    // Floats (type 0x0d) are valid IDX but not images this reader takes.
    expect_err(open("float.idx", &[0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0]), invalid, "float.idx");
    // A forged header claiming 2^96 bytes must fail without trying to allocate them,
    // plain or gzipped.
    let huge = [0, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    expect_err(open("huge.idx", &huge), invalid, "huge.idx");
    expect_err(open("huge.gz", &gzip(&huge)), invalid, "huge.gz");
    let big = [0, 0, 8, 3, 0, 0x10, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 1, 2, 3];
    expect_err(open("big.gz", &gzip(&big)), invalid, "big.gz");
    // Wrong rank for images.
    expect_err(open("rank1.idx", &[0, 0, 8, 1, 0, 0, 0, 2, 7, 7]), invalid, "rank1.idx");
    expect_err(IdxDataset::open(&dir.path().join("missing.idx"), None), invalid, "missing.idx");

    // Labels: wrong count (test labels for training images) and wrong rank.
    let train = fashion("train-images-idx3-ubyte.gz");
    expect_err(IdxDataset::open(&train, Some(&fashion("t10k-labels-idx1-ubyte.gz"))), invalid, "t10k-labels");
    let test_images = fashion("t10k-images-idx3-ubyte.gz");
    expect_err(IdxDataset::open(&test_images, Some(&test_images)), invalid, "rank");
}

// ---------------------------------------------------------------- image folders

fn png_gray(w: u32, h: u32, f: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    let image = image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    bytes.into_inner()
}

fn encoded_rgb(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let image = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 40) as u8, (y * 40) as u8, 128]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    (0..n).map(|_| rng.random::<u8>()).collect()
}

#[test]
fn image_folder_with_class_subfolders() {
    let dir = TempDir::new("folder-classes");
    dir.write("dog/b.png", &png_gray(4, 3, |x, y| (x * 10 + y) as u8));
    dir.write("cat/a.jpg", &encoded_rgb(5, 5, image::ImageFormat::Jpeg));
    dir.write("cat/deep/er/c.bmp", &encoded_rgb(2, 2, image::ImageFormat::Bmp));
    dir.write("bird/UPPER.PNG", &png_gray(2, 2, |_, _| 7));
    dir.write("bird/notes.txt", b"not an image");
    std::fs::create_dir_all(dir.path().join("empty-class")).unwrap();

    let ds = ImageFolder::open(dir.path()).unwrap();
    assert_eq!(ds.len(), 4, "{:?}", ds.files());
    assert_eq!(ds.classes(), vec!["bird", "cat", "dog"]);
    assert!(ds.files().iter().any(|f| f.ends_with("cat/deep/er/c.bmp")), "nested files are found");
    for (i, file) in ds.files().iter().enumerate() {
        let class = file.strip_prefix(dir.path()).unwrap().components().next().unwrap();
        let label = ds.label(i).unwrap();
        assert_eq!(ds.classes()[label as usize], class.as_os_str().to_str().unwrap());
    }
    assert!(ds.describe().contains("3 classes"), "{}", ds.describe());

    let dog = ds.files().iter().position(|f| f.ends_with("dog/b.png")).unwrap();
    let image = ds.get(dog).unwrap();
    assert_eq!((image.channels, image.height, image.width), (1, 3, 4));
    // Row 2, column 3 of a 4-wide image holds 3 * 10 + 2.
    assert_eq!(image.data[2 * 4 + 3], 32.0 / 255.0);
    let cat = ds.files().iter().position(|f| f.ends_with("cat/a.jpg")).unwrap();
    let image = ds.get(cat).unwrap();
    assert_eq!((image.channels, image.height, image.width), (3, 5, 5));
    assert!(image.data.iter().all(|v| (0.0..=1.0).contains(v)));
}

#[test]
fn image_folder_with_loose_files_is_unlabelled() {
    let dir = TempDir::new("folder-flat");
    dir.write("top.png", &png_gray(2, 2, |_, _| 1));
    dir.write("sub/inner.gif", &encoded_rgb(3, 2, image::ImageFormat::Gif));
    let ds = ImageFolder::open(dir.path()).unwrap();
    assert_eq!(ds.len(), 2);
    assert!(ds.classes().is_empty());
    assert_eq!(ds.label(0), None);
    assert!(ds.describe().contains("unlabelled"), "{}", ds.describe());
    assert_eq!(ds.get(ds.files().iter().position(|f| f.ends_with("inner.gif")).unwrap()).unwrap().width, 3);
}

#[test]
fn image_folder_errors_name_the_path() {
    let dir = TempDir::new("folder-errors");
    let missing = dir.path().join("nope");
    expect_err(ImageFolder::open(&missing), ErrorCode::InvalidArgument, "nope");
    dir.write("docs/readme.txt", b"text");
    let message = expect_err(ImageFolder::open(dir.path()), ErrorCode::InvalidArgument, "no images");
    assert!(message.contains(dir.path().to_str().unwrap()));
}

#[test]
fn an_image_declaring_more_than_32_megapixels_is_refused_before_decoding() {
    // A GIF of a few hundred bytes whose logical screen is 16390x4808 used to be decoded
    // into a canvas of 315 MB and then gigabytes of f32, which took seconds (found by
    // tests/suite/fuzz.rs).
    let dir = TempDir::new("huge-canvas");
    let mut gif = encoded_rgb(3, 2, image::ImageFormat::Gif);
    gif[6..10].copy_from_slice(&[0x06, 0x40, 0xc8, 0x12]);
    let path = dir.write("huge.gif", &gif);
    let ds = ImageFolder::open(dir.path()).unwrap();
    let started = Instant::now();
    let message = expect_err(ds.get(0), ErrorCode::Io, "it is 16390x4808, more than the 33554432 pixels an image may have");
    assert!(message.contains(path.to_str().unwrap()), "{message}");
    assert!(started.elapsed() < Duration::from_secs(1), "refusing it took {:?}", started.elapsed());
}

#[test]
fn corrupt_image_fails_get_and_is_skipped_or_reported_by_the_loader() {
    let dir = TempDir::new("folder-corrupt");
    for i in 0..5 {
        dir.write(&format!("a/{i}.png"), &png_gray(6, 6, |x, y| (x + y + i) as u8));
    }
    dir.write("a/x.png", &random_bytes(300));
    let ds = Arc::new(ImageFolder::open(dir.path()).unwrap());
    let corrupt = ds.files().iter().position(|f| file_name(f) == "x.png").unwrap();
    expect_err(ds.get(corrupt), ErrorCode::Io, "x.png");

    let options = LoaderOptions {
        batch_size: 4,
        seed: 3,
        shuffle: true,
        drop_last: false,
        workers: 2,
        prefetch: 2,
        skip_corrupt: true,
        shard: Shard::default(),
    };
    let loader = Loader::new(ds.clone(), plain(6, 1), options.clone()).unwrap();
    let batches = collect(&loader, 0, 0);
    let images: usize = batches.iter().map(|b| b.shape[0]).sum();
    let skipped: Vec<_> = batches.iter().flat_map(|b| b.skipped.clone()).collect();
    assert_eq!(images, 5);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].0, corrupt);
    assert!(skipped[0].1.contains("x.png"), "{}", skipped[0].1);
    assert!(batches.iter().all(|b| !b.indices.contains(&corrupt)));
    for b in &batches {
        assert_eq!(b.images.len(), b.shape.iter().product::<usize>());
        assert_eq!(b.labels.len(), b.shape[0]);
    }

    let strict = Loader::new(ds, plain(6, 1), LoaderOptions { skip_corrupt: false, ..options }).unwrap();
    let results: Vec<_> = strict.epoch(0, 0).collect();
    let error = results.iter().find_map(|r| r.as_ref().err()).expect("an error for the corrupt file");
    assert_eq!(error.code, ErrorCode::Io);
    assert!(error.message.contains("x.png") && error.message.contains(&format!("item {corrupt}")), "{error}");
    assert!(results.last().unwrap().is_err(), "the epoch ends at the error");
}

#[test]
fn a_batch_of_only_corrupt_items_is_empty() {
    let dir = TempDir::new("folder-all-corrupt");
    dir.write("a.png", &random_bytes(50));
    dir.write("b.png", &random_bytes(60));
    let ds = Arc::new(ImageFolder::open(dir.path()).unwrap());
    let options = LoaderOptions { batch_size: 2, shuffle: false, skip_corrupt: true, ..LoaderOptions::default() };
    let loader = Loader::new(ds, plain(4, 1), options).unwrap();
    let batches = collect(&loader, 0, 0);
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].shape, [0, 1, 4, 4]);
    assert!(batches[0].images.is_empty());
    assert_eq!(batches[0].skipped.len(), 2);
}

// ---------------------------------------------------------------- in memory

#[test]
fn in_memory_dataset_validates() {
    let data = random_images(3, 2, 4, 5, 1);
    let ds = InMemoryDataset::new(data.clone(), [3, 2, 4, 5], Some(vec![0, 2, 1])).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.get(1).unwrap().data, data[40..80].to_vec());
    assert_eq!(ds.label(1), Some(2));
    assert_eq!(ds.classes(), vec!["0", "1", "2"]);
    expect_err(InMemoryDataset::new(data.clone(), [3, 2, 4, 4], None), ErrorCode::InvalidShape, "shape");
    expect_err(InMemoryDataset::new(data.clone(), [3, 2, 4, 5], Some(vec![0, 1])), ErrorCode::InvalidShape, "labels");
    let mut bad = data;
    bad[7] = 255.0;
    expect_err(InMemoryDataset::new(bad, [3, 2, 4, 5], None), ErrorCode::InvalidArgument, "[0, 1]");
}

#[test]
fn statistics_of_known_data_and_of_fashion_mnist() {
    // Half the pixels 0, half 1: mean 0.5, population std 0.5.
    let mut data = vec![0.0; 8];
    data.extend(vec![1.0; 8]);
    let ds = InMemoryDataset::new(data, [2, 1, 2, 4], None).unwrap();
    let (mean, std) = dataset_statistics(&ds, 10).unwrap();
    assert_eq!((mean, std), (vec![0.5], vec![0.5]));
    // With one item, only the first (all zeros) is used.
    assert_eq!(dataset_statistics(&ds, 1).unwrap(), (vec![0.0], vec![0.0]));

    let fashion = IdxDataset::open(&fashion("train-images-idx3-ubyte.gz"), None).unwrap();
    let (mean, std) = dataset_statistics(&fashion, 2000).unwrap();
    assert!((mean[0] - FASHION_MNIST_MEAN[0]).abs() < 0.01, "mean {mean:?}");
    assert!((std[0] - FASHION_MNIST_STD[0]).abs() < 0.01, "std {std:?}");
}

// ---------------------------------------------------------------- augmentation

fn gray(h: usize, w: usize, f: impl Fn(usize, usize) -> f32) -> RawImage {
    RawImage::new(1, h, w, (0..h * w).map(|i| f(i / w, i % w)).collect()).unwrap()
}

#[test]
fn output_shape_and_channel_conversion() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let image = gray(28, 28, |y, x| ((x + y) % 7) as f32 / 7.0);
    let one = Augment::pretrain(16, vec![0.5], vec![0.25]);
    assert_eq!(one.apply(&image, &mut rng).unwrap().len(), 16 * 16);
    let three = Augment::pretrain(20, vec![0.5; 3], vec![0.25; 3]);
    let out = three.apply(&image, &mut rng).unwrap();
    assert_eq!(out.len(), 3 * 20 * 20);
    // Gray replicated: the three planes are equal.
    assert_eq!(out[..400], out[400..800]);
    assert_eq!(out[..400], out[800..]);
    // RGB to gray: luma of pure red is 0.299.
    let red = RawImage::new(3, 4, 4, [vec![1.0; 16], vec![0.0; 32]].concat()).unwrap();
    let out = plain(4, 1).apply(&red, &mut rng).unwrap();
    assert!(out.iter().all(|&v| (v - 0.299).abs() < 1e-6), "{out:?}");

    let mut bad = one.clone();
    bad.mean = vec![0.5, 0.5];
    expect_err(bad.apply(&image, &mut rng), ErrorCode::InvalidArgument, "mean");
    let padded = Augment { pad_to: Some(20), ..one };
    expect_err(padded.apply(&image, &mut rng), ErrorCode::InvalidArgument, "padTo");
}

#[test]
fn without_crop_an_image_of_the_output_size_is_only_normalised() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let data = random_images(1, 3, 12, 12, 5);
    let image = RawImage::new(3, 12, 12, data.clone()).unwrap();
    let augment = Augment { mean: vec![0.1, 0.4, 0.7], std: vec![0.2, 0.3, 0.9], ..plain(12, 3) };
    let out = augment.apply(&image, &mut rng).unwrap();
    let expected: Vec<f32> =
        data.iter().enumerate().map(|(i, &x)| (x - augment.mean[i / 144]) / augment.std[i / 144]).collect();
    assert_eq!(out, expected);
}

#[test]
fn horizontal_flip_mirrors_half_the_time_and_keeps_row_sums() {
    let image = gray(9, 9, |y, x| (x * x + y) as f32 / 100.0);
    let mirrored: Vec<f32> = image.data.chunks(9).flat_map(|row| row.iter().rev().copied()).collect();
    let augment = Augment { hflip: true, ..plain(9, 1) };
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (mut flipped, mut kept) = (0, 0);
    for _ in 0..64 {
        let out = augment.apply(&image, &mut rng).unwrap();
        if out == image.data {
            kept += 1;
        } else {
            assert_eq!(out, mirrored);
            flipped += 1;
        }
        for (a, b) in out.chunks(9).zip(image.data.chunks(9)) {
            assert!((a.iter().sum::<f32>() - b.iter().sum::<f32>()).abs() < 1e-5);
        }
    }
    assert!(flipped > 10 && kept > 10, "flipped {flipped}, kept {kept}");
}

#[test]
fn random_resized_crop_of_a_constant_image_is_constant() {
    let image = gray(40, 30, |_, _| 0.3);
    let augment = Augment::pretrain(16, vec![0.5], vec![0.25]);
    let expected = (0.3f32 - 0.5) / 0.25;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..20 {
        let out = augment.apply(&image, &mut rng).unwrap();
        assert!(out.iter().all(|&v| (v - expected).abs() < 1e-6), "{:?}", &out[..8]);
    }
}

#[test]
fn crop_parameters_follow_scale_and_ratio() {
    let (height, width) = (80, 100);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut fractions = Vec::new();
    for _ in 0..2000 {
        let crop = random_resized_crop_params(height, width, (0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0), &mut rng);
        assert!(crop.height > 0 && crop.width > 0);
        assert!(crop.top + crop.height <= height && crop.left + crop.width <= width, "{crop:?}");
        let fraction = (crop.height * crop.width) as f64 / (height * width) as f64;
        // Sides are rounded to whole pixels, which moves the area by a few percent at most.
        assert!((0.2 * 0.95..=1.0).contains(&fraction), "{crop:?}: {fraction}");
        let ratio = crop.width as f64 / crop.height as f64;
        assert!((0.75 * 0.95..=4.0 / 3.0 * 1.05).contains(&ratio), "{crop:?}: ratio {ratio}");
        fractions.push(fraction);
    }
    let min = fractions.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = fractions.iter().cloned().fold(0.0, f64::max);
    assert!(min < 0.25 && max > 0.9, "draws should span the range: {min}..{max}");
    // A crop lands at various places, not always the corner or the centre.
    let lefts: std::collections::HashSet<usize> =
        (0..50).map(|_| random_resized_crop_params(height, width, (0.2, 0.3), (1.0, 1.0), &mut rng).left).collect();
    assert!(lefts.len() > 10);
}

#[test]
fn bicubic_keeps_a_ramp_a_ramp() {
    let ramp = gray(4, 16, |_, x| x as f32 / 15.0);
    // Upscaling by 2.5: source coordinate (o + 0.5) / 2.5 - 0.5. Away from the borders
    // (all four taps inside) the result rises steadily and stays close to the ramp.
    let up = resize_bicubic(&ramp, 4, 40).unwrap();
    assert_eq!(up.data[..40], up.data[120..], "rows stay equal");
    let interior: Vec<usize> = (0..40)
        .filter(|&o| {
            let src = (o as f64 + 0.5) / 2.5 - 0.5;
            (1.0..14.0).contains(&src)
        })
        .collect();
    assert!(interior.len() > 25);
    for pair in interior.windows(2) {
        assert!(up.data[pair[1]] > up.data[pair[0]]);
    }
    for &o in &interior {
        let ideal = ((o as f64 + 0.5) / 2.5 - 0.5) / 15.0;
        assert!((up.data[o] as f64 - ideal).abs() < 0.05 / 15.0, "{o}: {} vs {ideal}", up.data[o]);
    }
    // Halving samples exactly between two pixels, where the kernel is symmetric: exact.
    let down = resize_bicubic(&ramp, 2, 8).unwrap();
    for o in 1..7 {
        let ideal = (2.0 * o as f32 + 0.5) / 15.0;
        assert!((down.data[o] - ideal).abs() < 1e-6, "{o}: {} vs {ideal}", down.data[o]);
    }
}

#[test]
fn padding_centres_the_image_on_zeros() {
    let image = gray(28, 28, |y, x| 0.01 + (y * 28 + x) as f32 / 1000.0);
    let augment = Augment { pad_to: Some(32), ..plain(32, 1) };
    let out = augment.apply(&image, &mut ChaCha8Rng::seed_from_u64(5)).unwrap();
    assert_eq!(out.len(), 32 * 32);
    for y in 0..32 {
        for x in 0..32 {
            let v = out[y * 32 + x];
            if (2..30).contains(&y) && (2..30).contains(&x) {
                assert_eq!(v, image.data[(y - 2) * 28 + (x - 2)]);
            } else {
                assert_eq!(v, 0.0, "border at ({y}, {x})");
            }
        }
    }
}

// ---------------------------------------------------------------- loader

fn synthetic(n: usize) -> Arc<InMemoryDataset> {
    let labels = (0..n as i64).map(|i| i % 5).collect();
    Arc::new(InMemoryDataset::new(random_images(n, 3, 12, 12, 7), [n, 3, 12, 12], Some(labels)).unwrap())
}

fn options(workers: usize, prefetch: usize) -> LoaderOptions {
    LoaderOptions { batch_size: 5, seed: 11, shuffle: true, drop_last: false, workers, prefetch, skip_corrupt: false, shard: Shard::default() }
}

#[test]
fn batches_do_not_depend_on_threads_or_start_batch() {
    let ds = synthetic(37);
    let augment = Augment::pretrain(8, vec![0.5; 3], vec![0.2; 3]);
    let single = Loader::new(ds.clone(), augment.clone(), options(1, 1)).unwrap();
    let threaded = Loader::new(ds.clone(), augment.clone(), options(3, 4)).unwrap();
    let reference = collect(&single, 2, 0);
    assert_eq!(reference.len(), 8);
    assert_eq!(collect(&threaded, 2, 0), reference);
    assert_eq!(collect(&threaded, 2, 3), reference[3..].to_vec());
    assert_eq!(collect(&single, 2, 7), reference[7..].to_vec());
    assert!(collect(&single, 2, 8).is_empty());
    assert!(collect(&single, 2, 100).is_empty());

    let mut indices: Vec<usize> = reference.iter().flat_map(|b| b.indices.clone()).collect();
    for b in &reference {
        assert_eq!(b.labels, b.indices.iter().map(|&i| i as i64 % 5).collect::<Vec<_>>());
        assert_eq!(b.shape, [b.indices.len(), 3, 8, 8]);
        assert_eq!(b.images.len(), b.indices.len() * 3 * 64);
    }
    indices.sort();
    assert_eq!(indices, (0..37).collect::<Vec<_>>(), "every item once per epoch");

    // An item's augmentation depends on its index and the epoch, not its place: the
    // same item is augmented alike by a loader with another batch size and no shuffle.
    let other = Loader::new(ds, augment, LoaderOptions { batch_size: 3, shuffle: false, ..options(2, 2) }).unwrap();
    let find = |batches: &[Batch], index: usize| -> Vec<f32> {
        let b = batches.iter().find(|b| b.indices.contains(&index)).unwrap();
        let at = b.indices.iter().position(|&i| i == index).unwrap();
        b.images[at * 192..(at + 1) * 192].to_vec()
    };
    let regrouped = collect(&other, 2, 0);
    assert_eq!(find(&regrouped, 17), find(&reference, 17));
}

#[test]
fn epochs_differ_and_shuffle_can_be_off() {
    let ds = synthetic(37);
    let augment = Augment::pretrain(8, vec![0.5; 3], vec![0.2; 3]);
    let loader = Loader::new(ds.clone(), augment.clone(), options(2, 2)).unwrap();
    let order = |e| collect(&loader, e, 0).iter().flat_map(|b| b.indices.clone()).collect::<Vec<_>>();
    assert_ne!(order(0), order(1));
    assert_eq!(order(1), order(1));
    assert_eq!(order(1), loader.epoch_order(1));
    let reseeded = Loader::new(ds.clone(), augment.clone(), LoaderOptions { seed: 12, ..options(2, 2) }).unwrap();
    assert_ne!(reseeded.epoch_order(0), loader.epoch_order(0));

    let ordered = Loader::new(ds, augment, LoaderOptions { shuffle: false, ..options(2, 2) }).unwrap();
    let first = collect(&ordered, 0, 0);
    let second = collect(&ordered, 1, 0);
    let indices: Vec<usize> = first.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(indices, (0..37).collect::<Vec<_>>());
    // Same order, but each epoch draws new crops.
    assert_eq!(first[0].indices, second[0].indices);
    assert_ne!(first[0].images, second[0].images);
}

#[test]
fn batches_per_epoch_respects_drop_last() {
    let ds = synthetic(37);
    let augment = plain(12, 3);
    let keep = Loader::new(ds.clone(), augment.clone(), options(2, 2)).unwrap();
    let drop = Loader::new(ds.clone(), augment.clone(), LoaderOptions { drop_last: true, ..options(2, 2) }).unwrap();
    assert_eq!((keep.batches_per_epoch(), drop.batches_per_epoch()), (8, 7));
    let kept = collect(&keep, 0, 0);
    assert_eq!(kept.len(), 8);
    assert_eq!(kept.last().unwrap().shape[0], 2);
    let dropped = collect(&drop, 0, 0);
    assert_eq!(dropped.len(), 7);
    assert!(dropped.iter().all(|b| b.shape[0] == 5));

    let exact =
        Loader::new(synthetic(35), augment.clone(), LoaderOptions { drop_last: true, ..options(1, 1) }).unwrap();
    assert_eq!(exact.batches_per_epoch(), 7);
    assert_eq!(keep.batch_size(), 5);

    for bad in [
        LoaderOptions { batch_size: 0, ..options(1, 1) },
        LoaderOptions { workers: 0, ..options(1, 1) },
        LoaderOptions { prefetch: 0, ..options(1, 1) },
    ] {
        expect_err(Loader::new(ds.clone(), augment.clone(), bad), ErrorCode::InvalidArgument, "at least 1");
    }
}

/// Loaders of every rank of `ranks` over `ds`, the rest of the options as `base`.
fn shard_loaders(ds: &Arc<InMemoryDataset>, ranks: usize, base: &LoaderOptions) -> Vec<Loader> {
    let augment = Augment::pretrain(8, vec![0.5; 3], vec![0.2; 3]);
    (0..ranks)
        .map(|rank| Loader::new(ds.clone(), augment.clone(), LoaderOptions { shard: Shard { rank, ranks }, ..base.clone() }).unwrap())
        .collect()
}

/// Item `at` of a batch: its dataset index, label and pixels.
fn batch_item(batch: &Batch, at: usize) -> (usize, i64, Vec<f32>) {
    let len = batch.shape[1..].iter().product::<usize>();
    (batch.indices[at], batch.labels[at], batch.images[at * len..(at + 1) * len].to_vec())
}

/// Every random part of the augmentation (fixed crop, flip, color jitter, RandAugment,
/// random erasing) is keyed by (seed, epoch, dataset index): an item comes out alike
/// whatever the batch size, order, thread count or data-parallel rank that loads it.
#[test]
fn the_whole_augmentation_depends_only_on_seed_epoch_and_index() {
    let ds = synthetic(13);
    let augment = Augment {
        crop: Crop::Fixed,
        crop_fraction: 0.75,
        color_jitter: [0.4; 3],
        rand_augment: Some(RandAugment::parse("rand-m9-mstd0.5-inc1").unwrap()),
        random_erasing: 0.25,
        ..Augment::pretrain(8, vec![0.5; 3], vec![0.2; 3])
    };
    let items = |options: LoaderOptions, epoch: usize| -> std::collections::BTreeMap<usize, Vec<f32>> {
        let loader = Loader::new(ds.clone(), augment.clone(), options).unwrap();
        let batches = collect(&loader, epoch, 0);
        batches.iter().flat_map(|b| (0..b.indices.len()).map(|at| batch_item(b, at)).map(|(index, _, pixels)| (index, pixels)).collect::<Vec<_>>()).collect()
    };
    let reference = items(options(1, 1), 1);
    assert_eq!(reference.len(), 13);
    assert_eq!(items(LoaderOptions { batch_size: 3, shuffle: false, ..options(2, 2) }, 1), reference);
    for rank in 0..3 {
        let shard = items(LoaderOptions { batch_size: 2, drop_last: true, shard: Shard { rank, ranks: 3 }, ..options(2, 2) }, 1);
        assert!(!shard.is_empty());
        for (index, pixels) in shard {
            assert_eq!(pixels, reference[&index], "rank {rank}, item {index}");
        }
    }
    // Another epoch draws anew.
    let next = items(options(1, 1), 2);
    assert!((0..13).all(|i| next[&i] != reference[&i]));
}

#[test]
fn training_shards_pad_the_epoch_and_interleave_the_single_process_batches() {
    let batch = 2;
    let training = LoaderOptions { batch_size: batch, drop_last: true, ..options(2, 2) };
    for len in [1, 3, 12, 13, 14, 15] {
        let ds = synthetic(len);
        for ranks in 1..=4 {
            let what = format!("{len} items, {ranks} ranks");
            let shards = shard_loaders(&ds, ranks, &training);
            let whole = Loader::new(ds.clone(), Augment::pretrain(8, vec![0.5; 3], vec![0.2; 3]), LoaderOptions { batch_size: ranks * batch, ..training.clone() }).unwrap();
            for epoch in [0, 3] {
                let full = whole.epoch_order(epoch);
                let orders: Vec<Vec<usize>> = shards.iter().map(|s| s.epoch_order(epoch)).collect();
                // Equal shards, together the epoch plus the padding: its first items again.
                let shard_len = len.div_ceil(ranks);
                assert!(orders.iter().all(|o| o.len() == shard_len), "{what}: shard lengths {:?}", orders.iter().map(Vec::len).collect::<Vec<_>>());
                let padding = ranks * shard_len - len;
                let mut counts = vec![0; len];
                orders.iter().flatten().for_each(|&i| counts[i] += 1);
                for (position, &index) in full.iter().enumerate() {
                    // Repeated cyclically, should the padding outnumber the items.
                    let taken = (len + padding - position).div_ceil(len);
                    assert_eq!(counts[index], taken, "{what}: item {index} at position {position} of the epoch");
                }

                let batches: Vec<Vec<Batch>> = shards.iter().map(|s| collect(s, epoch, 0)).collect();
                for (rank, (shard, loader)) in batches.iter().zip(&shards).enumerate() {
                    assert_eq!(shard.len(), shard_len / batch, "{what}: rank {rank}'s batches");
                    assert_eq!(loader.batches_per_epoch(), shard.len());
                    assert_eq!(loader.images_per_epoch(), shard.len() * batch);
                    assert_eq!(shard.iter().flat_map(|b| b.indices.clone()).collect::<Vec<_>>(), orders[rank][..shard.len() * batch]);
                    // Resuming mid-epoch gives the same batches.
                    for start in 0..=shard.len() {
                        assert_eq!(collect(loader, epoch, start), shard[start..], "{what}: rank {rank} from batch {start}");
                    }
                }
                // Rank r's batch b is the single process's batch b of ranks x batch items at
                // positions r, r + ranks, ...: the same images, augmented alike. (The ranks can
                // have one batch more, of the padding.)
                let single = collect(&whole, epoch, 0);
                assert!(!single.is_empty() || len < ranks * batch, "{what}");
                assert!(single.len() <= batches[0].len() && batches[0].len() <= single.len() + 1, "{what}: {} single batches", single.len());
                for (b, global) in single.iter().enumerate() {
                    for (rank, shard) in batches.iter().enumerate() {
                        for i in 0..batch {
                            assert_eq!(batch_item(&shard[b], i), batch_item(global, rank + ranks * i), "{what}, epoch {epoch}: rank {rank}, batch {b}, item {i}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn evaluation_shards_split_the_dataset_exactly_once() {
    let evaluation = LoaderOptions { batch_size: 2, shuffle: false, drop_last: false, ..options(2, 2) };
    for len in [3, 12, 13, 14, 15] {
        let ds = synthetic(len);
        for ranks in 1..=4 {
            let what = format!("{len} items, {ranks} ranks");
            let shards = shard_loaders(&ds, ranks, &evaluation);
            let mut seen = Vec::new();
            for (rank, loader) in shards.iter().enumerate() {
                let indices: Vec<usize> = collect(loader, 0, 0).iter().flat_map(|b| b.indices.clone()).collect();
                assert_eq!(indices, (rank..len).step_by(ranks).collect::<Vec<_>>(), "{what}: rank {rank}");
                assert_eq!(loader.images_per_epoch(), indices.len(), "{what}: rank {rank}");
                assert_eq!(loader.batches_per_epoch(), indices.len().div_ceil(2), "{what}: rank {rank}");
                seen.extend(indices);
            }
            let lengths: Vec<usize> = shards.iter().map(Loader::images_per_epoch).collect();
            assert!(lengths.iter().max().unwrap() - lengths.iter().min().unwrap() <= 1, "{what}: shard lengths {lengths:?}");
            seen.sort();
            assert_eq!(seen, (0..len).collect::<Vec<_>>(), "{what}: every item exactly once");
        }
    }
}

#[test]
fn a_shard_must_be_one_of_at_least_one_rank() {
    let ds = synthetic(12);
    for (shard, mentions) in [(Shard { rank: 0, ranks: 0 }, "ranks must be at least 1"), (Shard { rank: 2, ranks: 2 }, "rank must be below ranks (2), got 2")] {
        expect_err(Loader::new(ds.clone(), plain(12, 3), LoaderOptions { shard, ..options(1, 1) }), ErrorCode::InvalidArgument, mentions);
    }
    assert_eq!(LoaderOptions::default().shard, Shard { rank: 0, ranks: 1 });
}

/// Counts `get` calls and takes a little time over each, like a slow disk.
struct SlowDataset {
    len: usize,
    calls: AtomicUsize,
    panic_at: Option<usize>,
}

impl Dataset for SlowDataset {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&self, index: usize) -> Result<RawImage> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if Some(index) == self.panic_at {
            panic!("test panic at {index}");
        }
        std::thread::sleep(Duration::from_millis(2));
        Ok(RawImage::new(1, 4, 4, vec![index as f32 / self.len as f32; 16]).unwrap())
    }
    fn label(&self, _: usize) -> Option<i64> {
        None
    }
    fn classes(&self) -> Vec<String> {
        Vec::new()
    }
    fn describe(&self) -> String {
        format!("slow dataset ({} items)", self.len)
    }
}

#[test]
fn dropping_the_iterator_stops_the_workers() {
    let ds = Arc::new(SlowDataset { len: 100_000, calls: AtomicUsize::new(0), panic_at: None });
    let options = LoaderOptions { batch_size: 16, ..options(4, 3) };
    let loader = Loader::new(ds.clone(), plain(4, 1), options).unwrap();
    let started = Instant::now();
    {
        let mut batches = loader.epoch(0, 0);
        let first = batches.next().unwrap().unwrap();
        assert_eq!(first.shape, [16, 1, 4, 4]);
        assert!(first.labels.is_empty(), "unlabelled data gives no labels");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "dropping took {:?}", started.elapsed());
    let calls = ds.calls.load(Ordering::SeqCst);
    // Bounded by the prefetch window: the first batch plus three ahead.
    assert!(calls <= 4 * 16, "{calls} items loaded");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ds.calls.load(Ordering::SeqCst), calls, "no work after the drop");
}

#[test]
fn a_panicking_dataset_gives_an_error_not_a_hang() {
    let ds = Arc::new(SlowDataset { len: 12, calls: AtomicUsize::new(0), panic_at: Some(3) });
    let options = LoaderOptions { batch_size: 2, shuffle: false, ..options(3, 2) };
    let loader = Loader::new(ds, plain(4, 1), options).unwrap();
    let results: Vec<_> = loader.epoch(0, 0).collect();
    assert_eq!(results.len(), 2, "the epoch ends at the error");
    assert_eq!(results[0].as_ref().unwrap().indices, vec![0, 1]);
    let error = results[1].as_ref().unwrap_err();
    assert_eq!(error.code, ErrorCode::Internal);
    assert!(error.message.contains("item 3") && error.message.contains("test panic at 3"), "{error}");
}

#[test]
fn fashion_mnist_through_the_loader() {
    let ds = Arc::new(
        IdxDataset::open(&fashion("t10k-images-idx3-ubyte.gz"), Some(&fashion("t10k-labels-idx1-ubyte.gz"))).unwrap(),
    );
    let augment =
        Augment { pad_to: Some(32), ..Augment::pretrain(32, FASHION_MNIST_MEAN.to_vec(), FASHION_MNIST_STD.to_vec()) };
    let options = LoaderOptions { batch_size: 64, workers: 4, ..LoaderOptions::default() };
    let loader = Loader::new(ds, augment, options).unwrap();
    assert_eq!(loader.batches_per_epoch(), 15);
    let batches = collect(&loader, 0, 0);
    assert_eq!(batches.len(), 15);
    let low = (0.0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0];
    let high = (1.0 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0];
    for b in &batches {
        assert_eq!(b.shape, [64, 1, 32, 32]);
        assert_eq!(b.labels.len(), 64);
        assert!(b.images.iter().all(|&v| v >= low - 1e-5 && v <= high + 1e-5));
    }
}

// ---------------------------------------------------------------- images as callers hold them

/// RGBA pixels with a varying alpha, and the same image as a PNG.
fn rgba_and_png(w: u32, h: u32) -> (Vec<u8>, Vec<u8>) {
    let image = image::RgbaImage::from_fn(w, h, |x, y| image::Rgba([(x * 9) as u8, (y * 13) as u8, ((x + y) * 5) as u8, ((x * 7 + y) % 256) as u8]));
    let mut png = std::io::Cursor::new(Vec::new());
    image.write_to(&mut png, image::ImageFormat::Png).unwrap();
    (image.into_raw(), png.into_inner())
}

/// The published evaluation crop, at ImageNet's normalisation.
fn evaluation(img_size: usize, channels: usize) -> Augment {
    let (mean, std) = if channels == 1 { (FASHION_MNIST_MEAN.to_vec(), FASHION_MNIST_STD.to_vec()) } else { (vit_mae_core::data::IMAGENET_MEAN.to_vec(), vit_mae_core::data::IMAGENET_STD.to_vec()) };
    Augment { crop_fraction: 224.0 / 256.0, ..Augment::pretrain(img_size, mean, std).evaluation() }
}

#[test]
fn preprocess_gives_the_loader_s_evaluation_batch_for_every_input_kind() {
    let dir = TempDir::new("preprocess");
    let (rgba, png) = rgba_and_png(23, 17);
    let jpeg = encoded_rgb(6, 6, image::ImageFormat::Jpeg);
    dir.write("a.png", &png);
    dir.write("b.jpg", &jpeg);
    for channels in [1, 3] {
        let augment = evaluation(12, channels);
        let folder = Arc::new(ImageFolder::open(dir.path()).unwrap());
        let options = LoaderOptions { batch_size: 2, shuffle: false, drop_last: false, ..LoaderOptions::default() };
        let loader = Loader::new(folder, augment.clone(), options).unwrap();
        let want = collect(&loader, 0, 0).remove(0).images;
        let inputs = vec![
            ImageInput::Pixels { data: rgba.clone(), width: 23, height: 17, channels: 4 },
            ImageInput::Path(dir.path().join("b.jpg")),
        ];
        assert_eq!(preprocess(inputs, &augment).unwrap(), want, "{channels} channels");
        let encoded = vec![ImageInput::Encoded(png.clone()), ImageInput::Encoded(jpeg.clone())];
        assert_eq!(preprocess(encoded, &augment).unwrap(), want, "{channels} channels, encoded");
    }
}

#[test]
fn preprocess_resizes_the_whole_image_with_the_whole_crop() {
    // 8x4 (wide): left half 255, right half 0, gray; a 4x4 output keeps the halves apart.
    let data: Vec<u8> = (0..32).map(|i| if i % 8 < 4 { 255 } else { 0 }).collect();
    let augment = Augment { crop: Crop::Whole, ..plain(4, 1) };
    let out = preprocess(vec![ImageInput::Pixels { data, width: 8, height: 4, channels: 1 }], &augment).unwrap();
    for row in out.chunks_exact(4) {
        assert!(row[0] > 0.99 && row[3] < 0.01, "{row:?}");
        assert!((row[1] + row[2] - 1.0).abs() < 1e-6, "symmetric about the middle: {row:?}");
    }
}

#[test]
fn preprocess_errors_name_the_first_bad_item() {
    let augment = evaluation(8, 3);
    let (rgba, png) = rgba_and_png(5, 5);
    let good = || ImageInput::Encoded(png.clone());
    let pixels = |data: Vec<u8>, width, height, channels| ImageInput::Pixels { data, width, height, channels };
    expect_err(preprocess(vec![good(), ImageInput::Encoded(b"junk".to_vec()), ImageInput::Encoded(vec![])], &augment), ErrorCode::InvalidImage, "image 1: cannot decode image of 4 bytes");
    let missing = std::env::temp_dir().join("vit-mae-no-such-image.png");
    expect_err(preprocess(vec![good(), ImageInput::Path(missing.clone())], &augment), ErrorCode::Io, &format!("image 1 ({}): cannot read", missing.display()));
    expect_err(preprocess(vec![pixels(vec![], 0, 5, 3)], &augment), ErrorCode::InvalidImage, "image 0: raw pixels of size 0x5 have an empty side");
    expect_err(preprocess(vec![good(), pixels(rgba.clone(), 5, 5, 2)], &augment), ErrorCode::InvalidImage, "image 1: raw pixels have 2 channels");
    expect_err(preprocess(vec![pixels(rgba, 5, 4, 4)], &augment), ErrorCode::InvalidImage, "raw pixels hold 100 bytes but 5x4x4 needs 80");
    expect_err(preprocess(vec![pixels(vec![0; 3], 1 << 13, 1 << 13, 3)], &augment), ErrorCode::InvalidImage, "more than the 33554432 pixels");
    expect_err(preprocess(vec![], &augment), ErrorCode::InvalidArgument, "no images");
    let random = Augment::pretrain(8, vec![0.5; 3], vec![0.5; 3]);
    expect_err(preprocess(vec![good()], &random), ErrorCode::InvalidArgument, "no random transform");
}
