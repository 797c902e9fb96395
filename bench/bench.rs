//! vit-mae's side of `npm run bench` (release build): one workload of
//! `bench/reference.py`, timed the same way after one warm-up step. Prints one JSON line:
//! images/s (median step) for a pre-training step (forward, backward, AdamW), for embedding (the
//! encoder over every patch) and for reconstruction (a masked forward pass), the
//! model's matmul FLOPs per image, and the peak RSS of the process.
//!
//!   cargo run --release -p vit-mae-core --example bench -- <tiny|base|fmnist|gemm> [steps] [modes]
//!
//! `modes` (default `train,embed,reconstruct`) picks what runs, e.g. `train` alone
//! under a profiler; the others are then reported as null.

use std::time::Instant;
use vit_mae_core::candle_core::{Device, Tensor};
use vit_mae_core::optim::{AdamW, AdamWConfig};
use vit_mae_core::{MaeConfig, MaskOptions, MaskedAutoencoder, Pool};

/// Images per second of the median of `steps` timed calls of `f` after one warm-up call
/// (the median, because this shared machine has noisy neighbours).
fn rate(steps: usize, batch: usize, mut f: impl FnMut() -> vit_mae_core::Result<()>) -> vit_mae_core::Result<f64> {
    f()?;
    let mut seconds = Vec::with_capacity(steps);
    for _ in 0..steps {
        let start = Instant::now();
        f()?;
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

/// GFLOP/s of the best of five 1024^3 f32 products through the GEMM the model's
/// linear layers use: the ceiling its matmuls can reach.
fn gemm_peak() -> vit_mae_core::Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1f32, (n, n), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1f32, (n, n), &Device::Cpu)?;
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let _ = vit_mae_core::ops::matmul_wt(&a, &b)?;
        best = best.max(2.0 * (n * n * n) as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    Ok(best)
}

fn main() -> vit_mae_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let workload = args.first().map(String::as_str).unwrap_or("tiny");
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let modes = args.get(2).map_or("train,embed,reconstruct", String::as_str);
    let runs = |mode: &str| modes.split(',').any(|m| m == mode);
    let (config, batch) = match workload {
        "gemm" => {
            println!("{}", serde_json::json!({ "workload": "gemm", "gflops": gemm_peak()? }));
            return Ok(());
        }
        "tiny" => (MaeConfig::preset("mae_vit_tiny_patch8_64")?, 64),
        "base" => (MaeConfig::preset("mae_vit_base_patch16")?, 8),
        "fmnist" => (MaeConfig::preset("mae_vit_fmnist_patch4_32")?, 128),
        other => panic!("unknown workload {other}: tiny, base, fmnist or gemm"),
    };
    let device = Device::Cpu;
    let model = MaskedAutoencoder::new(config.clone(), &device, 0)?;
    let imgs = Tensor::randn(0f32, 1f32, (batch, config.in_chans, config.img_size, config.img_size), &device)?;
    let options = MaskOptions::default();
    let mut optimizer = AdamW::new(model.params(), AdamWConfig::default())?;

    let train = if runs("train") {
        Some(rate(steps, batch, || {
            let out = model.forward(&imgs, &options)?;
            let grads: Vec<Tensor> = model.gradients(&out)?.into_iter().map(|(_, g)| g).collect();
            optimizer.step(&grads, 1e-4)
        })?)
    } else {
        None
    };
    let embed = if runs("embed") { Some(rate(steps, batch, || model.embed(&imgs, Pool::Mean).map(drop))?) } else { None };
    let reconstruct = if runs("reconstruct") { Some(rate(steps, batch, || model.reconstruct(&imgs, &options).map(drop))?) } else { None };
    let (masked, full) = forward_flops(&config, options.mask_ratio);
    println!(
        "{}",
        serde_json::json!({
            "workload": workload,
            "batch": batch,
            "threads": vit_mae_core::candle_core::utils::get_num_threads(),
            "train": train,
            "embed": embed,
            "reconstruct": reconstruct,
            "train_gflop_per_image": 3.0 * masked / 1e9,
            "embed_gflop_per_image": full / 1e9,
            "reconstruct_gflop_per_image": masked / 1e9,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
