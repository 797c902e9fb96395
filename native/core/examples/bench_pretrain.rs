//! Pre-training throughput on the shipped Fashion-MNIST subset: the loader alone
//! (decode + augment on worker threads) beside the trainer, so it is plain whether
//! the model ever waits on data. Release build:
//!
//!   cargo run --release -p vit-mae-core --example bench_pretrain [steps] [workers]

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use vit_mae_core::candle_core::Device;
use vit_mae_core::distributed::Group;
use vit_mae_core::data::{Augment, IdxDataset, Loader, LoaderOptions, Shard, FASHION_MNIST_MEAN, FASHION_MNIST_STD};
use vit_mae_core::recipe::Recipe;
use vit_mae_core::train::{pretrain, PretrainConfig, TrainEvent};
use vit_mae_core::{MaeConfig, MaskedAutoencoder, Precision};

fn main() -> vit_mae_core::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let steps = args.first().copied().unwrap_or(10) as u64;
    let workers = args.get(1).copied().unwrap_or(2);
    let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist/train-images-idx3-ubyte.gz");
    let dataset = Arc::new(IdxDataset::open(&images, None)?);
    let config = MaeConfig::preset("mae_vit_fmnist_patch4_32")?;
    let augment = Augment { pad_to: Some(32), ..Augment::pretrain(config.img_size, FASHION_MNIST_MEAN.to_vec(), FASHION_MNIST_STD.to_vec()) };
    let options = LoaderOptions { batch_size: 128, seed: 0, shuffle: true, drop_last: true, workers, prefetch: 4, skip_corrupt: true, shard: Shard::default() };
    let loader = Loader::new(dataset, augment, options)?;

    let start = Instant::now();
    let mut count = 0;
    for batch in loader.epoch(0, 0) {
        count += batch?.shape[0];
    }
    let loader_rate = count as f64 / start.elapsed().as_secs_f64();

    let mut model = MaskedAutoencoder::new(config, &Device::Cpu, Precision::F32, 0)?;
    let defaults = PretrainConfig::default();
    let train = PretrainConfig { recipe: Recipe { epochs: 1.0, warmup_epochs: 0.2, blr: 1.5e-3, max_steps: Some(steps), ..defaults.recipe }, ..defaults };
    let mut rate = 0.0;
    let summary = pretrain(&mut model, &loader, &train, None, &Group::single(), &mut |e| {
        if let TrainEvent::Step { images_per_sec, .. } = e {
            rate = images_per_sec;
        }
    }, &AtomicBool::new(false))?;
    println!("loader ({workers} workers): {loader_rate:.0} images/s");
    println!("trainer (mae_vit_fmnist_patch4_32, batch 128, {} steps): {rate:.1} images/s, final loss {:.4}", summary.steps, summary.final_loss);
    println!("loader / trainer: {:.0}x", loader_rate / rate);
    Ok(())
}
