//! A fuzzer on the stable toolchain for every reader of untrusted files: safetensors,
//! `.pth` (zip + pickle), Hugging Face folders (`config.json` + weights), IDX files and
//! images. Each reader's test mutates the seeds in `native/core/fuzz/corpus/<reader>/`
//! with a seeded generator (bit flips, byte inserts and deletes, splices, edits of
//! length fields, repeats, truncation) for `VIT_MAE_FUZZ_SECONDS` (default 5) and hands
//! every input to the reader in-process. The reader must return `Ok` or an error with a
//! code other than `E_INTERNAL`, without panicking, within `INPUT_SECONDS`, and in no more
//! address space than the process had plus `MEMORY_BUDGET`.
//!
//! Each reader runs in a child process (this test binary, run again on that one test), so
//! that a stack overflow or an abort fails the test rather than ending the suite, and so
//! that the address-space limit binds nothing else. The input being read is always on
//! disk in `target/tmp/fuzz-<reader>/input/`, which a failure names together with the
//! seed that replays the run (`VIT_MAE_FUZZ_SEED`). `native/core/fuzz/README.md` lists
//! the seeds; `VIT_MAE_FUZZ_WRITE_CORPUS=1` rewrites them from `synthetic_seeds` below.

use crate::common::pth::{pth_bytes, state_dict_pickle, Pickle, Storage, View};
use crate::common::{SplitMix, TempDir};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vit_mae_core::data::{Dataset, IdxDataset, ImageFolder};
use vit_mae_core::{read_state_dict, ErrorCode, MaeConfig, MaskedAutoencoder, Precision};

/// The longest one input may take to read. Every seed reads in milliseconds.
const INPUT_SECONDS: u64 = 5;
/// The address space one input may add. A reader that allocates by a size the file
/// declares rather than one it holds exceeds it at once.
const MEMORY_BUDGET: u64 = 2 << 30;
/// The line a child prints when it has run, which the parent looks for.
const SUMMARY: &str = "fuzzed:";

struct Reader {
    name: &'static str,
    /// Reads an input laid out at `path` (a file, or a folder of the seed's files).
    read: fn(&Path) -> vit_mae_core::Result<()>,
}

fn read_checkpoint(path: &Path) -> vit_mae_core::Result<()> {
    read_state_dict(path).map(drop)
}

/// An IDX seed is a folder of `images` and, optionally, `labels`.
fn read_idx(folder: &Path) -> vit_mae_core::Result<()> {
    let labels = folder.join("labels");
    let dataset = IdxDataset::open(&folder.join("images"), labels.is_file().then_some(labels.as_path()))?;
    for index in 0..dataset.len().min(4) {
        dataset.get(index)?;
    }
    Ok(())
}

/// An image is decoded as the one file of an image folder.
fn read_image(file: &Path) -> vit_mae_core::Result<()> {
    ImageFolder::open(file.parent().expect("inputs lie in a folder"))?.get(0).map(drop)
}

const SAFETENSORS: Reader = Reader { name: "safetensors", read: read_checkpoint };
const PTH: Reader = Reader { name: "pth", read: read_checkpoint };
const HUGGING_FACE: Reader = Reader { name: "hf", read: read_checkpoint };
const IDX: Reader = Reader { name: "idx", read: read_idx };
const IMAGES: Reader = Reader { name: "images", read: read_image };
const READERS: [&Reader; 5] = [&SAFETENSORS, &PTH, &HUGGING_FACE, &IDX, &IMAGES];

#[test]
fn safetensors() {
    fuzz(&SAFETENSORS);
}

#[test]
fn pth() {
    fuzz(&PTH);
}

#[test]
fn hf() {
    fuzz(&HUGGING_FACE);
}

#[test]
fn idx() {
    fuzz(&IDX);
}

#[test]
fn images() {
    fuzz(&IMAGES);
}

// ---------------------------------------------------------------- the parent

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v} is not a whole number")))
}

/// Runs `reader`'s fuzzing in a child process and fails with what the child left if it
/// fails, is killed or hangs.
fn fuzz(reader: &Reader) {
    let seconds = env_u64("VIT_MAE_FUZZ_SECONDS").unwrap_or(5);
    if std::env::var("VIT_MAE_FUZZ_CHILD").as_deref() == Ok(reader.name) {
        let seed = env_u64("VIT_MAE_FUZZ_SEED").expect("the parent sets the seed");
        return run_child(reader, seconds, seed);
    }
    let seed = env_u64("VIT_MAE_FUZZ_SEED").unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    let dir = work_dir(reader);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log_path = dir.join("child.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &format!("fuzz::{}", reader.name), "--nocapture", "--test-threads=1"])
        .env("VIT_MAE_FUZZ_CHILD", reader.name)
        .env("VIT_MAE_FUZZ_SEED", seed.to_string())
        .env("VIT_MAE_FUZZ_SECONDS", seconds.to_string())
        // OpenBLAS's idle threads spin, and nothing here multiplies matrices.
        .env("OPENBLAS_NUM_THREADS", "1")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // Time for the seeds themselves and a loaded machine, besides the fuzzing.
    let give_up = Instant::now() + Duration::from_secs(seconds + 120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > give_up {
            child.kill().unwrap();
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail: String = output.chars().rev().take(4000).collect::<Vec<_>>().into_iter().rev().collect();
    let context = format!(
        "VIT_MAE_FUZZ_SEED={seed} replays it; the input being read is in {}; the child's output ends:\n{tail}",
        dir.join("input").display()
    );
    match status {
        None => panic!("the {} fuzzer did not finish within {} s, so a read hangs; {context}", reader.name, seconds + 120),
        Some(status) if !status.success() => panic!("the {} fuzzer failed ({}); {context}", reader.name, describe(status)),
        Some(_) => {
            // The harness prints the test's name on the same line.
            let summary = output.lines().find_map(|l| l.find(SUMMARY).map(|at| &l[at..]));
            println!("{}", summary.unwrap_or_else(|| panic!("the {} fuzzer's child fuzzed nothing; {context}", reader.name)));
        }
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(signal) => format!("killed by signal {signal}, as by an abort on a stack overflow or on an allocation past the memory budget"),
        None => status.to_string(),
    }
}

fn work_dir(reader: &Reader) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-{}", reader.name))
}

// ---------------------------------------------------------------- the child

/// A seed: one file, or a folder of files read as a whole.
#[derive(Clone)]
struct Seed {
    name: String,
    folder: bool,
    files: Vec<(String, Vec<u8>)>,
}

fn corpus_dir(reader: &Reader) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(reader.name)
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).map(|e| e.unwrap().path()).collect();
    entries.sort();
    entries
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

fn committed_seeds(reader: &Reader) -> Vec<Seed> {
    sorted_entries(&corpus_dir(reader))
        .into_iter()
        .map(|path| {
            let folder = path.is_dir();
            let files = if folder { sorted_entries(&path) } else { vec![path.clone()] };
            Seed { name: file_name(&path), folder, files: files.iter().map(|f| (file_name(f), std::fs::read(f).unwrap())).collect() }
        })
        .collect()
}

/// Where seed `index`'s inputs are written: a folder of its own, so that an image is
/// the only file of its image folder. Returns the path its reader reads.
fn input_path(root: &Path, index: usize, seed: &Seed) -> PathBuf {
    root.join(index.to_string()).join(&seed.name)
}

fn make_input_folder(root: &Path, index: usize, seed: &Seed) {
    let path = input_path(root, index, seed);
    std::fs::create_dir_all(if seed.folder { &path } else { path.parent().unwrap() }).unwrap();
}

/// Writes `input` (seed `index`, or a mutation of it) over the files of the last input
/// made from that seed.
fn write_input(root: &Path, index: usize, input: &Seed) -> PathBuf {
    let path = input_path(root, index, input);
    if input.folder {
        for (name, bytes) in &input.files {
            overwrite(&path.join(name), bytes);
        }
    } else {
        overwrite(&path, &input.files[0].1);
    }
    path
}

/// Replaces a file's contents. Not `fs::write`: ext4 flushes a file that was truncated
/// to nothing and written again when it is closed, which made each input wait for the disk.
fn overwrite(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).unwrap();
    file.write_all(bytes).unwrap();
    file.set_len(bytes.len() as u64).unwrap();
}

/// Caps the address space at what the process has mapped now plus `MEMORY_BUDGET`: an
/// input that makes a reader allocate more aborts the child (a failure) instead of
/// exhausting the machine.
fn limit_address_space() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let mapped_kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmSize:")?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap();
    let limit = mapped_kb * 1024 + MEMORY_BUDGET;
    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: setrlimit reads the struct it is given and lowers this process's own limit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rlimit) }, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

fn below(rng: &mut SplitMix, n: usize) -> usize {
    (rng.next_u64() % n.max(1) as u64) as usize
}

/// Integers that tend to find mistakes in length and offset fields.
fn interesting(rng: &mut SplitMix, len: usize) -> u64 {
    let len = len as u64;
    let choices = [0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0xffff, 0x7fff_ffff, 0xffff_ffff, u64::MAX / 2, u64::MAX, len.wrapping_sub(1), len, len + 1];
    match below(rng, choices.len() + 1) {
        i if i < choices.len() => choices[i],
        _ => rng.next_u64() >> below(rng, 64),
    }
}

/// One to four random edits of `bytes`; `donor` (another seed's file) supplies splices.
fn mutate(bytes: &mut Vec<u8>, donor: &[u8], rng: &mut SplitMix) {
    for _ in 0..1 + below(rng, 4) {
        let len = bytes.len();
        let at = below(rng, len + 1);
        match below(rng, 8) {
            0 if len > 0 => bytes[at.min(len - 1)] ^= 1 << below(rng, 8),
            1 if len > 0 => bytes[at.min(len - 1)] = interesting(rng, len) as u8,
            2 => {
                let inserted: Vec<u8> = (0..1 + below(rng, 16)).map(|_| rng.next_u64() as u8).collect();
                bytes.splice(at..at, inserted);
            }
            3 => {
                let end = (at + 1 + below(rng, 16)).min(len);
                bytes.drain(at..end);
            }
            4 if !donor.is_empty() => {
                let from = below(rng, donor.len());
                let chunk = &donor[from..(from + 1 + below(rng, 64)).min(donor.len())];
                let end = (at + chunk.len()).min(len);
                bytes.splice(at..end, chunk.iter().copied());
            }
            5 => {
                // A length or offset field: 1, 2, 4 or 8 bytes, either byte order.
                let width = 1 << below(rng, 4);
                let value = interesting(rng, len);
                let field = if below(rng, 2) == 0 { value.to_le_bytes() } else { value.to_be_bytes() };
                let field = if below(rng, 2) == 0 { &field[..width] } else { &field[8 - width..] };
                let end = (at + width).min(len);
                bytes.splice(at..end, field.iter().copied());
            }
            6 => bytes.truncate(at),
            _ => {
                // A run repeated in place: deep nesting, long lists.
                let end = (at + 1 + below(rng, 16)).min(len);
                let run = bytes[at..end].to_vec();
                let repeated = run.repeat(1 + below(rng, 256));
                bytes.splice(at..end, repeated);
            }
        }
    }
}

/// Reads every seed as it is, then mutated ones until `seconds` have passed.
fn run_child(reader: &Reader, seconds: u64, seed: u64) {
    limit_address_space();
    let seeds = committed_seeds(reader);
    assert!(!seeds.is_empty(), "no seeds in {}", corpus_dir(reader).display());
    let root = work_dir(reader).join("input");
    for (index, seed) in seeds.iter().enumerate() {
        make_input_folder(&root, index, seed);
    }
    let mut rng = SplitMix(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut count = 0;
    while count < seeds.len() || Instant::now() < deadline {
        let (index, input) = match seeds.get(count) {
            Some(seed) => (count, seed.clone()),
            None => {
                let index = below(&mut rng, seeds.len());
                let (base, donor) = (&seeds[index], &seeds[below(&mut rng, seeds.len())]);
                let mut files = base.files.clone();
                let which = below(&mut rng, files.len());
                mutate(&mut files[which].1, &donor.files[below(&mut rng, donor.files.len())].1, &mut rng);
                (index, Seed { name: base.name.clone(), folder: base.folder, files })
            }
        };
        let path = write_input(&root, index, &input);
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (reader.read)(&path)));
        let elapsed = started.elapsed();
        match outcome {
            Err(_) => panic!("reading input {count} ({}) panicked", path.display()),
            Ok(Err(e)) if e.code == ErrorCode::Internal => panic!("reading input {count} ({}) gave E_INTERNAL: {e}", path.display()),
            _ => {}
        }
        assert!(elapsed < Duration::from_secs(INPUT_SECONDS), "reading input {count} ({}) took {elapsed:?}", path.display());
        count += 1;
    }
    println!("{SUMMARY} {} read {count} inputs ({} seeds) in {seconds} s without a crash", reader.name, seeds.len());
}

// ---------------------------------------------------------------- the seeds

/// What reading a seed gives.
enum Expect {
    Ok,
    Err(ErrorCode, &'static str),
}

struct SyntheticSeed {
    reader: &'static Reader,
    name: &'static str,
    /// One file (named `name`), or a folder's files.
    files: Vec<(&'static str, Vec<u8>)>,
    expect: Expect,
}

#[test]
fn corpus_holds_the_documented_seeds() {
    let seeds = synthetic_seeds();
    if std::env::var_os("VIT_MAE_FUZZ_WRITE_CORPUS").is_some() {
        for reader in READERS {
            let _ = std::fs::remove_dir_all(corpus_dir(reader));
        }
        for seed in &seeds {
            let path = corpus_dir(seed.reader).join(seed.name);
            match &seed.files[..] {
                [("", bytes)] => {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(&path, bytes).unwrap();
                }
                files => {
                    std::fs::create_dir_all(&path).unwrap();
                    for (name, bytes) in files {
                        std::fs::write(path.join(name), bytes).unwrap();
                    }
                }
            }
        }
    }
    for reader in READERS {
        let mut committed: Vec<String> = sorted_entries(&corpus_dir(reader)).iter().map(|p| file_name(p)).collect();
        let mut documented: Vec<String> = seeds.iter().filter(|s| s.reader.name == reader.name).map(|s| s.name.to_string()).collect();
        committed.sort();
        documented.sort();
        assert_eq!(committed, documented, "the {} corpus is not the one synthetic_seeds writes (VIT_MAE_FUZZ_WRITE_CORPUS=1 rewrites it)", reader.name);
    }
    // The committed files, read as the fuzzers read them, give what each seed is there for.
    let dir = TempDir::new("fuzz-corpus");
    for reader in READERS {
        for (index, committed) in committed_seeds(reader).iter().enumerate() {
            make_input_folder(dir.path(), index, committed);
            let path = write_input(dir.path(), index, committed);
            let seed = seeds.iter().find(|s| s.reader.name == reader.name && s.name == committed.name).unwrap();
            match ((reader.read)(&path), &seed.expect) {
                (Ok(()), Expect::Ok) => {}
                (Err(e), Expect::Err(code, needle)) => {
                    assert_eq!(e.code, *code, "{}: {e}", committed.name);
                    assert!(e.message.contains(needle), "{}: the message should say {needle:?}: {}", committed.name, e.message);
                }
                (Ok(()), Expect::Err(..)) => panic!("{} seed {} should not read", reader.name, committed.name),
                (Err(e), Expect::Ok) => panic!("{} seed {} should read: {e}", reader.name, committed.name),
            }
        }
    }
}

fn file(reader: &'static Reader, name: &'static str, bytes: Vec<u8>, expect: Expect) -> SyntheticSeed {
    SyntheticSeed { reader, name, files: vec![("", bytes)], expect }
}

fn safetensors_bytes(tensors: &BTreeMap<String, Tensor>, metadata: Option<std::collections::HashMap<String, String>>) -> Vec<u8> {
    safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata).unwrap()
}

/// The small files the fuzzers start from: valid ones of every kind each reader takes,
/// and the files that crashed, hung or misled the readers before (issue 20).
fn synthetic_seeds() -> Vec<SyntheticSeed> {
    let tensor = |values: Vec<f32>, shape: &[usize], dtype: DType| Tensor::from_vec(values, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    let ramp = |n: usize| (0..n).map(|i| i as f32 / 8.0 - 1.0).collect::<Vec<f32>>();
    let mut seeds = Vec::new();

    // safetensors: every dtype a checkpoint may hold, a config in the metadata; and a
    // header length far past the end of the file.
    let tensors = BTreeMap::from([
        ("cls_token".to_string(), tensor(ramp(4), &[1, 1, 4], DType::F32)),
        ("patch_embed.proj.weight".to_string(), tensor(ramp(16), &[4, 1, 2, 2], DType::F16)),
        ("norm.weight".to_string(), tensor(ramp(4), &[4], DType::BF16)),
        ("norm.bias".to_string(), tensor(ramp(4), &[4], DType::F64)),
        ("head.0.num_batches_tracked".to_string(), Tensor::new(7i64, &Device::Cpu).unwrap()),
    ]);
    let metadata = std::collections::HashMap::from([("config".to_string(), r#"{"embed_dim": 4, "patch_size": 2}"#.to_string())]);
    seeds.push(file(&SAFETENSORS, "model.safetensors", safetensors_bytes(&tensors, Some(metadata)), Expect::Ok));
    let mut huge_header = (u64::MAX / 2).to_le_bytes().to_vec();
    huge_header.extend_from_slice(br#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#);
    seeds.push(file(&SAFETENSORS, "huge-header.safetensors", huge_header, Expect::Err(ErrorCode::CheckpointCorrupt, "header declares")));

    // .pth: the published layout with the training script's extras, a bare state dict in
    // protocol-4 opcodes, and the four files of issue 20.
    seeds.push(file(&PTH, "checkpoint.pth", training_checkpoint_pth(), Expect::Ok));
    seeds.push(file(&PTH, "bare-protocol-4.pth", protocol_4_pth(), Expect::Ok));
    let storage = Storage::f32("0", &ramp(96));
    let offset_view = View { storage: 0, offset: 48, sizes: vec![48], strides: vec![1] };
    seeds.push(file(&PTH, "offset-view.pth", pth_bytes(&state_dict_pickle(&[("w", offset_view)], &[storage], true), &[Storage::f32("0", &ramp(96))]), Expect::Ok));
    let aliases: Vec<String> = (0..300).map(|i| format!("alias.{i}")).collect();
    let views: Vec<(&str, View)> = aliases.iter().map(|n| (n.as_str(), View::contiguous(0, &[1024]))).collect();
    let storages = [Storage::f32("0", &ramp(1024))];
    seeds.push(file(&PTH, "aliases.pth", pth_bytes(&state_dict_pickle(&views, &storages, true), &storages), Expect::Err(ErrorCode::CheckpointCorrupt, "views of one storage overlap")));
    let mut nested = Pickle::new();
    nested.op(b")").op(&vec![0x85; 1 << 16]).op(b".");
    seeds.push(file(&PTH, "nested.pth", pth_bytes(&nested.to_vec(), &[]), Expect::Err(ErrorCode::CheckpointCorrupt, "nest deeper than 64 levels")));

    // Hugging Face: a small ViTMAE folder, and one whose key projection has another shape.
    let (config, weights) = hugging_face_folder();
    seeds.push(SyntheticSeed { reader: &HUGGING_FACE, name: "mae.hf", files: vec![("config.json", config.clone()), ("model.safetensors", safetensors_bytes(&weights, None))], expect: Expect::Ok });
    let mut wrong = weights;
    wrong.insert("vit.encoder.layer.0.attention.attention.key.weight".to_string(), tensor(ramp(32), &[8, 4], DType::F32));
    seeds.push(SyntheticSeed {
        reader: &HUGGING_FACE,
        name: "wrong-qkv.hf",
        files: vec![("config.json", config), ("model.safetensors", safetensors_bytes(&wrong, None))],
        expect: Expect::Err(ErrorCode::CheckpointShape, "must have one shape"),
    });

    // IDX: plain grayscale images with labels, and gzipped colour images without.
    let idx = |dims: &[u32]| -> Vec<u8> {
        let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
        bytes.extend(dims.iter().flat_map(|d| d.to_be_bytes()));
        bytes.extend((0..dims.iter().product::<u32>()).map(|i| (i * 37) as u8));
        bytes
    };
    seeds.push(SyntheticSeed { reader: &IDX, name: "plain", files: vec![("images", idx(&[3, 4, 5])), ("labels", idx(&[3]))], expect: Expect::Ok });
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&idx(&[2, 3, 3, 3])).unwrap();
    seeds.push(SyntheticSeed { reader: &IDX, name: "gzip-rgb", files: vec![("images", gzip.finish().unwrap())], expect: Expect::Ok });

    // Images: each format the image folders decode, a few pixels each.
    let rgb = image::RgbImage::from_fn(6, 5, |x, y| image::Rgb([(x * 40) as u8, (y * 50) as u8, ((x + y) * 20) as u8]));
    let encode = |image: image::DynamicImage, format: image::ImageFormat| {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, format).unwrap();
        bytes.into_inner()
    };
    let rgb = image::DynamicImage::ImageRgb8(rgb);
    for (name, image, format) in [
        ("gray.png", image::DynamicImage::ImageLuma8(rgb.to_luma8()), image::ImageFormat::Png),
        ("rgba16.png", image::DynamicImage::ImageRgba16(rgb.to_rgba16()), image::ImageFormat::Png),
        ("rgb.jpg", rgb.clone(), image::ImageFormat::Jpeg),
        ("rgba.gif", image::DynamicImage::ImageRgba8(rgb.to_rgba8()), image::ImageFormat::Gif),
        ("rgb.bmp", rgb.clone(), image::ImageFormat::Bmp),
        ("rgba.webp", image::DynamicImage::ImageRgba8(rgb.to_rgba8()), image::ImageFormat::WebP),
        ("rgb.tiff", rgb.clone(), image::ImageFormat::Tiff),
    ] {
        seeds.push(file(&IMAGES, name, encode(image, format), Expect::Ok));
    }
    // What the GIF this fuzzer found (173 bytes) did: declare a canvas of 16390x4808.
    let mut huge = encode(image::DynamicImage::ImageRgba8(rgb.to_rgba8()), image::ImageFormat::Gif);
    huge[6..10].copy_from_slice(&[0x06, 0x40, 0xc8, 0x12]);
    seeds.push(file(&IMAGES, "huge-canvas.gif", huge, Expect::Err(ErrorCode::Io, "more than the 33554432 pixels")));
    seeds
}

/// `{"model": state_dict, "epoch": 3, "args": Namespace(lr=0.1)}` as the published
/// training scripts save it, the storage's persistent id memoised and fetched again as
/// `torch.save` does: a contiguous tensor, a view at an offset, a transposed view of the
/// same storage, an f16 tensor and BatchNorm's int64 step count.
fn training_checkpoint_pth() -> Vec<u8> {
    let floats = Storage::f32("0", &(0..40).map(|i| i as f32 * 0.25).collect::<Vec<_>>());
    let halves = Storage { key: "1".to_string(), class: "HalfStorage", element_size: 2, bytes: [0x3c00u16, 0xc000, 0x3555, 0].iter().flat_map(|v| v.to_le_bytes()).collect() };
    let count = Storage { key: "2".to_string(), class: "LongStorage", element_size: 8, bytes: 12i64.to_le_bytes().to_vec() };
    let mut p = Pickle::new();
    p.op(b"}q\x00(").str("model").global("collections", "OrderedDict").op(b")R(");
    p.str("fc.weight").tensor(&floats, &View::contiguous(0, &[4, 5]));
    // The next two reuse the first one's persistent id through the memo, as torch.save does.
    p.str("fc.bias").global("torch._utils", "_rebuild_tensor_v2").op(b"((").str("storage").global("torch", "FloatStorage").str("0").str("cpu").int(40).op(b"tq\x01Q");
    p.int(20).ints(&[4]).ints(&[1]).op(&[0x89]).global("collections", "OrderedDict").op(b")RtR");
    p.str("proj.weight").global("torch._utils", "_rebuild_tensor_v2").op(b"(h\x01Q").int(24).ints(&[4, 3]).ints(&[1, 4]).op(&[0x89]).global("collections", "OrderedDict").op(b")RtR");
    p.str("norm.weight").tensor(&halves, &View::contiguous(0, &[4]));
    p.str("bn.num_batches_tracked").tensor(&count, &View::contiguous(0, &[]));
    p.op(b"u").str("epoch").int(3).str("args").global("argparse", "Namespace").op(&[b')', 0x81, b'}']).str("lr").op(b"G").op(&0.1f64.to_be_bytes()).op(b"sb").op(b"u.");
    pth_bytes(&p.to_vec(), &[floats, halves, count])
}

/// A bare state dict in the opcodes of pickle protocol 4: FRAME, SHORT_BINUNICODE,
/// STACK_GLOBAL, MEMOIZE, EMPTY_DICT with SETITEMS, and a bf16 parameter.
fn protocol_4_pth() -> Vec<u8> {
    let storage = Storage { key: "0".to_string(), class: "BFloat16Storage", element_size: 2, bytes: [0x3f80u16, 0x4000, 0xbf80].iter().flat_map(|v| v.to_le_bytes()).collect() };
    let mut p = Pickle(vec![0x80, 4, 0x95]);
    p.op(&0u64.to_le_bytes()).op(&[b'}', 0x94, b'(']).short_str("w").op(&[0x94]);
    p.stack_global("torch._utils", "_rebuild_parameter").op(&[0x94]).stack_global("torch._utils", "_rebuild_tensor_v2").op(&[0x94]);
    p.op(b"((").short_str("storage").stack_global("torch", "BFloat16Storage").op(&[0x94]).short_str("0").short_str("cpu");
    p.int(3).op(b"tQ").int(0).ints(&[3]).ints(&[1]).op(&[0x89, b'}', b't', b'R', 0x88, b'}', 0x87, b'R', b'u', b'.']);
    pth_bytes(&p.to_vec(), &[storage])
}

/// A ViTMAE folder for an 8x8 one-channel MAE (patch 4, width 8, one block each side),
/// its weights under Hugging Face's names with q, k and v apart.
fn hugging_face_folder() -> (Vec<u8>, BTreeMap<String, Tensor>) {
    // The Fashion-MNIST preset's patch, channel and MLP ratio, made as small as can be.
    let fmnist = MaeConfig::preset("mae_vit_fmnist_patch4_32").unwrap();
    let config = MaeConfig { img_size: 8, embed_dim: 8, depth: 1, num_heads: 2, decoder_embed_dim: 8, decoder_depth: 1, decoder_num_heads: 2, ..fmnist };
    let json = serde_json::json!({
        "model_type": "vit_mae", "image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "hidden_act": "gelu", "qkv_bias": true,
        "decoder_hidden_size": 8, "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 32, "layer_norm_eps": 1e-6, "norm_pix_loss": true, "mask_ratio": 0.75
    });
    let model = MaskedAutoencoder::new(config, &Device::Cpu, Precision::F32, 5).unwrap();
    let named = model.params().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).chain(model.buffers().into_iter().map(|(n, t)| (n.to_string(), t.clone())));
    let block_names = [
        ("norm1.", "layernorm_before."),
        ("norm2.", "layernorm_after."),
        ("attn.proj.", "attention.output.dense."),
        ("mlp.fc1.", "intermediate.dense."),
        ("mlp.fc2.", "output.dense."),
    ];
    let mut weights = BTreeMap::new();
    for (name, tensor) in named {
        let (prefix, rest) = match name.split_once('.') {
            Some(("blocks", rest)) => ("vit.encoder.layer.", rest),
            Some(("decoder_blocks", rest)) => ("decoder.decoder_layers.", rest),
            _ => {
                let hf = match name.as_str() {
                    "cls_token" => "vit.embeddings.cls_token".to_string(),
                    "pos_embed" => "vit.embeddings.position_embeddings".to_string(),
                    "mask_token" => "decoder.mask_token".to_string(),
                    "decoder_pos_embed" => "decoder.decoder_pos_embed".to_string(),
                    other if other.starts_with("patch_embed.proj.") => other.replace("patch_embed.proj.", "vit.embeddings.patch_embeddings.projection."),
                    other if other.starts_with("norm.") => format!("vit.layer{other}"),
                    other => format!("decoder.{other}"),
                };
                weights.insert(hf, tensor);
                continue;
            }
        };
        let (index, part) = rest.split_once('.').unwrap();
        if let Some(kind) = part.strip_prefix("attn.qkv.") {
            for (i, which) in ["query", "key", "value"].iter().enumerate() {
                weights.insert(format!("{prefix}{index}.attention.attention.{which}.{kind}"), tensor.narrow(0, i * 8, 8).unwrap().contiguous().unwrap());
            }
        } else {
            let (ours, theirs) = block_names.iter().find(|(ours, _)| part.starts_with(ours)).unwrap();
            weights.insert(format!("{prefix}{index}.{theirs}{}", &part[ours.len()..]), tensor);
        }
    }
    (serde_json::to_vec_pretty(&json).unwrap(), weights)
}
