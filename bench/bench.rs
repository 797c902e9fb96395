//! vit-mae's side of `npm run bench` (release build) and of the GPU benchmark
//! (bench/gpu.sh): one workload of `bench/reference.py`, timed the same way after
//! warm-up. Prints one JSON line: images/s (median step) for a pre-training step
//! (forward, backward, AdamW), for embedding (the encoder over every patch) and for
//! reconstruction (a masked forward pass), the model's matmul FLOPs per image, the
//! achieved training TFLOP/s and MFU, and the peak RSS of the process once the training steps are done.
//!
//!   cargo run --release -p vit-mae-core --example bench -- [--device cpu|cuda|cuda:N] \
//!       [--precision f32|bf16] [--distributed mpi] <tiny|base|fmnist|base224|large224|gemm> [steps] [modes]
//!
//! `--distributed mpi` (under `mpirun`, on the candle path: `--device cuda`): every rank
//! joins the MPI group, takes the GPU of its local rank, trains on images of its own and
//! averages each step's gradients with the others (`Group::all_reduce_mean`: NCCL when
//! every rank is on CUDA), as `pretrain` does. Each rank prints its JSON line, with its
//! rank, the group's size, how it moved tensors and a checksum of its final weights
//! (equal on every rank when the averaging works).
//!
//! `modes` (default `train,embed,reconstruct`) picks what runs, e.g. `train` alone
//! under a profiler; the others are then reported as null. Workloads: `tiny`, `base`
//! (ViT-B at batch 8) and `fmnist` for `npm run bench` on the CPU; `base224`
//! (mae_vit_base_patch16, batch 256) and `large224` (mae_vit_large_patch16, batch 128)
//! for a GPU. Images are standard normal noise, made on the device.
//!
//! FLOPs are the model's matmul FLOPs (a multiply-add counts 2; elementwise ops,
//! norms and softmax are not counted); a training step counts 3x the masked forward
//! pass (forward + backward of activations + backward of weights). MFU is those
//! FLOPs per second over `PEAK_TFLOPS`, the H200's (= H100 SXM's) dense bf16 tensor-core
//! peak; it is only reported on CUDA. On CUDA every timed call ends with
//! `Device::synchronize`, so the times are of finished GPU work.
//!
//! `gemm`: GEMM rates. On the CPU (as `npm run bench` runs it), for every GEMM library
//! of the build (`VIT_MAE_GEMM` names), a linear layer's three training products
//! (forward, input gradient, weight gradient) as the engine lays them out: at 1024^3,
//! and over each CPU workload's linear layers; on CUDA 8192^3 in `--precision`
//! through candle's matmul (cuBLAS), best of 10 synchronised timings of 5 products
//! each after warm-up: the measured peak MFU can also be quoted against.
//! (Fine-tuning's and the forward passes' shapes are a subset of these.)

use std::time::Instant;
use vit_mae_core::candle_core::{DType, Device, Tensor};
use vit_mae_core::distributed::{Distributed, FlatBuffer, Group, DEFAULT_TIMEOUT};
use vit_mae_core::engine::{FlatAdamW, Gradients, MaeEngine, Mode};
use vit_mae_core::optim::{AdamW, AdamWConfig};
use vit_mae_core::model::Unloaded;
use vit_mae_core::{DeviceSpec, MaeConfig, MaskOptions, MaskedAutoencoder, Pool, Precision};
use rand::SeedableRng;

/// Dense bf16 tensor-core peak of an H200 (and H100 SXM), TFLOP/s: MFU's denominator.
const PEAK_TFLOPS: f64 = 989.0;

/// Images per second of the median of `steps` timed calls of `f` after `warmup`
/// untimed calls (the median, because this shared machine has noisy neighbours). Each
/// call ends with the device synchronised, so its time is of finished work.
fn rate(device: &Device, warmup: usize, steps: usize, batch: usize, mut f: impl FnMut() -> vit_mae_core::Result<()>) -> vit_mae_core::Result<f64> {
    let mut call = || -> vit_mae_core::Result<()> {
        f()?;
        Ok(device.synchronize()?)
    };
    for _ in 0..warmup {
        call()?;
    }
    let mut seconds = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        call()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    seconds.sort_by(f64::total_cmp);
    Ok(batch as f64 / seconds[steps / 2])
}

/// Matmul FLOPs (multiply-adds count 2) of one transformer block over `t` tokens of width `d`.
fn block_flops(t: f64, d: f64) -> f64 {
    // qkv, proj and the 4x MLP: 2 * t * d * (3d + d + 8d); scores and weighted sum: 2 * 2 * t^2 * d.
    24.0 * t * d * d + 4.0 * t * t * d
}

/// Forward matmul FLOPs per image: (masked forward pass, encoder over every patch).
fn forward_flops(c: &MaeConfig, mask_ratio: f64) -> (f64, f64) {
    let l = c.num_patches() as f64;
    let keep = (l * (1.0 - mask_ratio)).floor();
    let (d, dd, pdim) = (c.embed_dim as f64, c.decoder_embed_dim as f64, c.patch_dim() as f64);
    let patch_embed = 2.0 * l * pdim * d;
    let encoder = |t: f64| patch_embed + c.depth as f64 * block_flops(t, d);
    let decoder = 2.0 * (1.0 + keep) * d * dd + c.decoder_depth as f64 * block_flops(1.0 + l, dd) + 2.0 * (1.0 + l) * dd * pdim;
    (encoder(1.0 + keep) + decoder, encoder(1.0 + l))
}

/// The process's peak resident set, from /proc (Linux).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The CPU workloads of `npm run bench`: preset and batch.
const CPU_WORKLOADS: [(&str, &str, usize); 3] = [("tiny", "mae_vit_tiny_patch8_64", 64), ("fmnist", "mae_vit_fmnist_patch4_32", 256), ("base", "mae_vit_base_patch16", 8)];

/// The linear layers of one pre-training step of `config` at `batch` (mask ratio 0.75),
/// as (rows, inputs, outputs, how many): patch embedding, the encoder's qkv, proj, fc1
/// and fc2 over the visible tokens, the decoder embedding, the decoder's layers over
/// every token, the prediction. bench/reference.py lists the same.
fn linear_layers(config: &MaeConfig, batch: usize) -> Vec<(usize, usize, usize, usize)> {
    let patches = (config.img_size / config.patch_size).pow(2);
    let patch_dim = config.patch_size.pow(2) * config.in_chans;
    let (encoder_rows, decoder_rows) = (batch * (patches / 4 + 1), batch * (patches + 1));
    let block = |rows: usize, dim: usize, depth: usize| {
        let hidden = (dim as f64 * config.mlp_ratio) as usize;
        [(rows, dim, 3 * dim, depth), (rows, dim, dim, depth), (rows, dim, hidden, depth), (rows, hidden, dim, depth)]
    };
    let mut layers = vec![(batch * patches, patch_dim, config.embed_dim, 1)];
    layers.extend(block(encoder_rows, config.embed_dim, config.depth));
    layers.push((encoder_rows, config.embed_dim, config.decoder_embed_dim, 1));
    layers.extend(block(decoder_rows, config.decoder_embed_dim, config.decoder_depth));
    layers.push((decoder_rows, config.decoder_embed_dim, patch_dim, 1));
    layers
}

/// GFLOP/s of `library` over `layers`: each layer's three training products
/// (`vit_mae_core::linear_products`), best of five timings after one warm-up, weighted
/// by how often the step runs them.
fn linear_layers_gflops(library: &str, layers: &[(usize, usize, usize, usize)]) -> vit_mae_core::Result<f64> {
    let (mut flops, mut seconds) = (0f64, 0f64);
    for &(rows, inputs, outputs, count) in layers {
        let x: Vec<f32> = (0..rows * inputs).map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5).collect();
        let w: Vec<f32> = (0..outputs * inputs).map(|i| ((i * 104729) % 991) as f32 / 991.0 - 0.5).collect();
        let (mut y, mut dx, mut dw) = (vec![0f32; rows * outputs], vec![0f32; rows * inputs], vec![0f32; outputs * inputs]);
        vit_mae_core::linear_products(library, rows, inputs, outputs, &x, &w, &mut y, &mut dx, &mut dw)?;
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let start = Instant::now();
            vit_mae_core::linear_products(library, rows, inputs, outputs, &x, &w, &mut y, &mut dx, &mut dw)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        flops += count as f64 * 6.0 * (rows * inputs * outputs) as f64;
        seconds += count as f64 * best;
    }
    Ok(flops / seconds / 1e9)
}

/// The CPU `gemm` row: for every GEMM library of this build, its 1024^3 rate and its rate
/// over each CPU workload's linear layers; `gflops` is the 1024^3 rate of the library the
/// engine chose for this CPU.
fn gemm_cpu() -> vit_mae_core::Result<serde_json::Value> {
    let mut libraries = serde_json::Map::new();
    for library in vit_mae_core::gemm_libraries() {
        let mut rates = serde_json::Map::new();
        rates.insert("1024".into(), linear_layers_gflops(library, &[(1024, 1024, 1024, 1)])?.into());
        for (workload, preset, batch) in CPU_WORKLOADS {
            rates.insert(workload.into(), linear_layers_gflops(library, &linear_layers(&MaeConfig::preset(preset)?, batch))?.into());
        }
        libraries.insert(library.into(), rates.into());
    }
    let chosen = vit_mae_core::gemm_library();
    Ok(serde_json::json!({
        "workload": "gemm", "device": "cpu", "precision": "f32", "n": 1024,
        "gflops": libraries[chosen]["1024"], "library": chosen, "libraries": libraries,
        "openblas_core": vit_mae_core::openblas_core(),
    }))
}

/// GFLOP/s of the best of 10 synchronised timings of 5 `n`^3 products in `precision`
/// through candle's matmul on `device`, after 3 warm-up products.
fn gemm_peak_device(device: &Device, precision: Precision, n: usize) -> vit_mae_core::Result<f64> {
    let dtype = precision.compute_dtype();
    let a = Tensor::randn(0f32, 1f32, (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1f32, (n, n), device)?.to_dtype(dtype)?;
    for _ in 0..3 {
        let _ = a.matmul(&b)?;
    }
    device.synchronize()?;
    let (reps, mut best) = (5, 0f64);
    for _ in 0..10 {
        let start = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b)?;
        }
        device.synchronize()?;
        best = best.max(reps as f64 * 2.0 * (n * n * n) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}

/// The command line: `--device X`, `--precision Y`, `--distributed Z` (anywhere, also as
/// `--device=X`), and the positional arguments.
struct Args {
    device: String,
    precision: Precision,
    distributed: Distributed,
    positional: Vec<String>,
}

fn parse_args() -> vit_mae_core::Result<Args> {
    let mut parsed = Args { device: "cpu".to_string(), precision: Precision::F32, distributed: Distributed::None, positional: Vec::new() };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next()).unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => parsed.device = value(),
            "--precision" => parsed.precision = Precision::parse(&value())?,
            "--distributed" => parsed.distributed = Distributed::parse(&value())?,
            f if f.starts_with("--") => panic!("unknown flag {f}: --device <cpu|cuda|cuda:N>, --precision <f32|bf16>, --distributed <mpi|auto|none>"),
            _ => parsed.positional.push(arg),
        }
    }
    Ok(parsed)
}

/// The sum and the sum of squares of every parameter, in f64: equal on ranks whose
/// weights are.
fn weights_checksum(model: &MaskedAutoencoder) -> vit_mae_core::Result<String> {
    let (mut sum, mut squares) = (0f64, 0f64);
    for (_, var) in model.params() {
        let values = var.as_tensor().to_dtype(DType::F64)?;
        sum += values.sum_all()?.to_scalar::<f64>()?;
        squares += values.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(format!("{sum:e}/{squares:e}"))
}

/// What a training step runs on: the engine (CPU, f32) or the candle model (CUDA, bf16).
enum Trainer {
    /// As `pretrain` holds it: the weights in the engine alone, the model unloaded.
    Engine { pixels: Vec<f32>, engine: MaeEngine, adamw: FlatAdamW, unloaded: Unloaded },
    Candle(AdamW),
}

fn main() -> vit_mae_core::Result<()> {
    // As the npm package's loader does (ts/native.ts): one candle pool thread.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let Args { device: mut device_name, precision, distributed, positional: args } = parse_args()?;
    let group = Group::join(distributed, DEFAULT_TIMEOUT)?;
    if group.size() > 1 && device_name == "cuda" {
        // One GPU per rank on its machine.
        device_name = format!("cuda:{}", group.local_rank());
    }
    let device = DeviceSpec::parse(&device_name)?.resolve()?;
    let workload = args.first().map(String::as_str).unwrap_or("tiny");
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let modes = args.get(2).map_or("train,embed,reconstruct", String::as_str);
    let runs = |mode: &str| modes.split(',').any(|m| m == mode);
    let on_gpu = !device.is_cpu();
    let (config, batch) = match (workload, CPU_WORKLOADS.iter().find(|w| w.0 == workload)) {
        ("gemm", _) if !on_gpu && precision == Precision::F32 => {
            println!("{}", gemm_cpu()?);
            return Ok(());
        }
        ("gemm", _) => {
            let n = if on_gpu { 8192 } else { 1024 };
            let gflops = gemm_peak_device(&device, precision, n)?;
            println!(
                "{}",
                serde_json::json!({
                    "workload": "gemm", "device": &device_name, "precision": precision.name(), "n": n,
                    "gflops": gflops, "tflops": gflops / 1e3,
                    "fraction_of_peak": if on_gpu { Some(gflops / 1e3 / PEAK_TFLOPS) } else { None },
                })
            );
            return Ok(());
        }
        (_, Some(&(_, preset, batch))) => (MaeConfig::preset(preset)?, batch),
        ("base224", _) => (MaeConfig::preset("mae_vit_base_patch16")?, 256),
        ("large224", _) => (MaeConfig::preset("mae_vit_large_patch16")?, 128),
        (other, _) => panic!("unknown workload {other}: tiny, base, fmnist, base224, large224 or gemm"),
    };
    let mut model = MaskedAutoencoder::new(config.clone(), &device, precision, 0)?;
    // Each rank's images its own (shifted by the rank), so only averaged gradients keep
    // the ranks' weights equal.
    let imgs = Tensor::randn(0f32, 1f32, (batch, config.in_chans, config.img_size, config.img_size), &device)?.affine(1.0, 0.1 * group.rank() as f64)?;
    let options = MaskOptions::default();
    // On the CPU in f32 a training step runs on the engine, as `pretrain` does; only the
    // path that runs gets an optimizer (candle's AdamW allocates its moments up front).
    let mut trainer = match model.uses_engine() {
        true => {
            let len_keep = vit_mae_core::masking::len_keep(config.num_patches(), options.mask_ratio);
            let mut engine = MaeEngine::new(&config, batch, len_keep, Mode::Train)?;
            engine.load_from(&model)?;
            let adamw = FlatAdamW::new(&engine, AdamWConfig::default());
            let unloaded = model.unload()?;
            vit_mae_core::release_freed_memory();
            Trainer::Engine { pixels: imgs.flatten_all()?.to_vec1::<f32>()?, engine, adamw, unloaded }
        }
        false => Trainer::Candle(AdamW::new(model.params(), AdamWConfig::default())?),
    };
    if group.size() > 1 && matches!(trainer, Trainer::Engine { .. }) {
        panic!("--distributed runs the candle path's training step: use --device cuda (or --precision bf16)");
    }
    // Every rank starts from the same weights (the same seed); this joins NCCL on CUDA.
    group.prepare_for(&device)?;
    // The engine's masks, as `pretrain` draws them, from a generator of their own.
    let mut mask_rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    // On a GPU the first calls also load (JIT-compile) kernels and grow the allocator's pool.
    let warmup = if on_gpu { 2 } else { 1 };

    let timed = |mode: &str, f: &mut dyn FnMut() -> vit_mae_core::Result<()>| runs(mode).then(|| rate(&device, warmup, steps, batch, f)).transpose();
    let train = timed("train", &mut || match &mut trainer {
        Trainer::Engine { pixels, engine, adamw, .. } => {
            let plan = options.plan(&config, &mut mask_rng, batch)?;
            engine.zero_grad();
            engine.accumulate(pixels, &plan, 1.0)?;
            engine.adamw_step(adamw, 1e-4);
            Ok(())
        }
        Trainer::Candle(optimizer) => {
            let out = model.forward(&imgs, &options)?;
            let mut grads: Vec<Tensor> = model.gradients(&out)?.into_iter().map(|(_, g)| g).collect();
            if group.size() > 1 {
                let mut flat = FlatBuffer::pack(&grads)?;
                group.all_reduce_mean(&mut flat, "the gradient all-reduce")?;
                grads = flat.unpack(&grads)?;
            }
            optimizer.step(&grads, 1e-4)
        }
    })?;
    // Peak RSS of the training steps, read before the forward-only passes add their own buffers.
    let train_peak_rss_mb = peak_rss_mb();
    if let Trainer::Engine { engine, adamw, unloaded, .. } = trainer {
        drop(adamw);
        engine.store_into(unloaded, &mut model)?;
    }
    let embed = timed("embed", &mut || model.embed(&imgs, Pool::Mean).map(drop))?;
    let reconstruct = timed("reconstruct", &mut || model.reconstruct(&imgs, &options).map(drop))?;
    let (masked, full) = forward_flops(&config, options.mask_ratio);
    let train_tflops = train.map(|r| r * 3.0 * masked / 1e12);
    println!(
        "{}",
        serde_json::json!({
            "workload": workload,
            "device": &device_name,
            "precision": precision.name(),
            "batch": batch,
            "steps": steps,
            "threads": vit_mae_core::candle_core::utils::get_num_threads(),
            "train": train,
            "embed": embed,
            "reconstruct": reconstruct,
            "train_gflop_per_image": 3.0 * masked / 1e9,
            "embed_gflop_per_image": full / 1e9,
            "reconstruct_gflop_per_image": masked / 1e9,
            "train_tflops": train_tflops,
            "train_mfu": if on_gpu { train_tflops.map(|t| t / PEAK_TFLOPS) } else { None },
            "mfu_peak_tflops": PEAK_TFLOPS,
            "peak_rss_mb": train_peak_rss_mb,
            "rank": group.rank(),
            "ranks": group.size(),
            "tensor_backend": group.tensor_backend(),
            "weights_checksum": if group.size() > 1 { Some(weights_checksum(&model)?) } else { None },
        })
    );
    Ok(())
}
