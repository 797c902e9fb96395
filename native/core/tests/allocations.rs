//! The engine allocates its plan once: after the first step, a step (forward, backward,
//! clipping, the optimizer) allocates nothing. Counted by the library's global
//! allocator, across every thread; this file holds one test so that no other test's
//! allocations run beside it.
//!
//! The steps run inside rayon's pool, as the engine's parallel loops then queue their
//! tasks on the workers' own deques. Called from outside the pool, each parallel loop
//! enters through rayon's shared injector queue, which allocates a block per 63 entries:
//! amortised memory of the thread pool, not of the step.

mod common;

use candle_core::Device;
use common::SplitMix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vit_mae_core::classifier::{soft_targets, ClassifierConfig, Trainable, VitClassifier};
use vit_mae_core::engine::{FlatAdamW, FlatOptimizer, Gradients, MaeEngine, Mode, VitEngine, VitMode};
use vit_mae_core::optim::{layer_decay_groups, AdamWConfig};
use vit_mae_core::{allocation_count, MaeConfig, MaskOptions, MaskedAutoencoder, Masking, Precision};

/// Allocations made by `step`'s third call (the first two may size scratch space).
fn allocations_in_third_step(mut step: impl FnMut(usize)) -> u64 {
    step(0);
    step(1);
    let before = allocation_count();
    step(2);
    allocation_count() - before
}

#[test]
fn engine_steps_allocate_nothing_after_the_first() {
    if vit_mae_core::gemm_library() == "gemm" {
        // The gemm crate allocates a flag vector per product; the engine's allocation-free
        // steps rest on BLAS (build.rs says why this build has none).
        eprintln!("skipped: built without BLAS");
        return;
    }
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    pool.install(steps_allocate_nothing);
}

fn steps_allocate_nothing() {
    let config = MaeConfig {
        img_size: 32,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 64,
        depth: 2,
        num_heads: 4,
        decoder_embed_dim: 32,
        decoder_depth: 1,
        decoder_num_heads: 4,
        mlp_ratio: 4.0,
        target: vit_mae_core::Target::NormPixels,
        layer_norm_eps: 1e-6,
        encoder_mask_token: false,
    };
    let (n, pixels) = (16, 16 * 3 * 32 * 32);
    let model = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, 0).unwrap();
    let images: Vec<Vec<f32>> = (0..3).map(|i| SplitMix(i).values(pixels, -2.0, 2.0)).collect();
    let options = MaskOptions { mask_ratio: 0.75, masking: Masking::Random, noise: None };
    let plans: Vec<_> = (0..6).map(|_| model.mask_plan(n, &options).unwrap()).collect();

    let mut engine = MaeEngine::new(&config, n, plans[0].len_keep, Mode::Train).unwrap();
    engine.load_from(&model).unwrap();
    let mut adamw = FlatAdamW::new(&engine, AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 });
    let training = allocations_in_third_step(|s| {
        engine.zero_grad();
        // Two micro-batches, clipping, AdamW: a whole optimizer step.
        engine.accumulate(&images[s], &plans[2 * s], 0.5).unwrap();
        engine.accumulate(&images[(s + 1) % 3], &plans[2 * s + 1], 0.5).unwrap();
        let norm = engine.grad_norm();
        engine.clip_grads(norm, 1.0);
        engine.adamw_step(&mut adamw, 1e-3);
    });
    assert_eq!(training, 0, "allocations in a pre-training step");

    let mut forward = MaeEngine::new(&config, n, plans[0].len_keep, Mode::Forward).unwrap();
    forward.load_from(&model).unwrap();
    let forward_only = allocations_in_third_step(|s| {
        forward.run_forward(&images[s], &plans[s]).unwrap();
    });
    assert_eq!(forward_only, 0, "allocations in a forward pass");

    let cls = ClassifierConfig {
        img_size: 32,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 64,
        depth: 2,
        num_heads: 4,
        mlp_ratio: 4.0,
        layer_norm_eps: 1e-6,
        num_classes: 10,
        global_pool: true,
        head_batch_norm: false,
    };
    let classifier = VitClassifier::new(cls.clone(), &Device::Cpu, Precision::F32, 0).unwrap();
    let mode = VitMode::Grad { trainable: Trainable::All, train: true, drop_path: 0.1 };
    let mut engine = VitEngine::new(&cls, n, mode).unwrap();
    engine.load_from(&classifier).unwrap();
    let trained = classifier.trainable_params(Trainable::All).unwrap();
    let groups = layer_decay_groups(&trained, cls.depth, 0.75);
    let named: Vec<_> = trained.iter().map(|(name, _)| name.clone()).zip(groups).collect();
    let mut optimizer = FlatOptimizer::adamw(&engine, &named, AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 }).unwrap();
    let targets = soft_targets(&(0..n as i64).map(|i| i % 10).collect::<Vec<_>>(), 10, 0.1);
    // Stochastic depth's generators, one per image, are the caller's.
    let mut rngs: Vec<ChaCha8Rng> = (0..n as u64).map(ChaCha8Rng::seed_from_u64).collect();
    let finetuning = allocations_in_third_step(|s| {
        engine.zero_grad();
        engine.accumulate(&images[s], &targets, 1.0, Some(&mut rngs)).unwrap();
        let norm = engine.grad_norm();
        engine.clip_grads(norm, 1.0);
        engine.optimizer_step(&mut optimizer, 1e-3);
    });
    assert_eq!(finetuning, 0, "allocations in a fine-tuning step with stochastic depth");
}
