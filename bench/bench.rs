//! Pre-training and forward-only throughput of vit-mae on the CPU (release build):
//! the workloads of `bench/reference.py`, step by step (forward, backward, AdamW).
//!
//!   cargo run --release -p vit-mae-core --example bench -- [tiny|base] [steps]

use std::time::Instant;
use vit_mae_core::candle_core::{Device, Tensor};
use vit_mae_core::optim::{AdamW, AdamWConfig};
use vit_mae_core::{MaeConfig, MaskOptions, MaskedAutoencoder};

fn main() -> vit_mae_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let workload = args.first().map(String::as_str).unwrap_or("tiny");
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let (config, batch) = match workload {
        "tiny" => (MaeConfig::preset("mae_vit_tiny_patch8_64")?, 64),
        "base" => (MaeConfig::preset("mae_vit_base_patch16")?, 8),
        "fmnist" => (MaeConfig::preset("mae_vit_fmnist_patch4_32")?, 128),
        other => panic!("unknown workload {other}"),
    };
    let device = Device::Cpu;
    let model = MaskedAutoencoder::new(config.clone(), &device, 0)?;
    let imgs = Tensor::randn(0f32, 1f32, (batch, config.in_chans, config.img_size, config.img_size), &device)?;
    let mut opt = AdamW::new(model.params(), AdamWConfig::default())?;
    let options = MaskOptions::default();
    let (mut tf, mut tb, mut to) = (0.0, 0.0, 0.0);
    for step in 0..steps + 1 {
        let t0 = Instant::now();
        let out = model.forward(&imgs, &options)?;
        let _ = out.loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = model.gradients(&out)?;
        let t2 = Instant::now();
        let g: Vec<Tensor> = grads.into_iter().map(|(_, g)| g).collect();
        opt.step(&g, 1e-4)?;
        let t3 = Instant::now();
        if step > 0 {
            tf += (t1 - t0).as_secs_f64();
            tb += (t2 - t1).as_secs_f64();
            to += (t3 - t2).as_secs_f64();
        }
    }
    let n = steps as f64;
    println!("{workload}: forward {:.3}s backward {:.3}s adamw {:.3}s per step; {:.1} img/s", tf / n, tb / n, to / n, batch as f64 * n / (tf + tb + to));
    Ok(())
}
