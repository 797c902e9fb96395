//! The engine held against the reference model: the same weights, images and masks
//! through both (`set_reference_only` puts a model on candle's autograd), on configs
//! chosen to reach the engine's corners: 1 and 3 channels, odd head counts, patch sizes
//! that are not powers of two, every mask ratio and strategy, norm-pix on and off, the
//! encoder-mask-token variant, batch 1. Then whole training runs, whose loss curves must
//! agree step by step, and the plan's memory.
//! Tolerances are the parity tests': outputs within 1e-4, gradients within 1e-3 of their
//! tensor's largest magnitude, gradient names exactly the parameters'.

use candle_core::{Device, Tensor};
use crate::common::{host, plain_augment, SplitMix};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use vit_mae_core::classifier::{ClassifierConfig, VitClassifier};
use vit_mae_core::distributed::Group;
use vit_mae_core::data::{InMemoryDataset, Loader, LoaderOptions, Shard};
use vit_mae_core::engine::mae::{MaeEngine, Mode};
use vit_mae_core::finetune::{finetune, FinetuneConfig};
use vit_mae_core::pca::PatchMoments;
use vit_mae_core::train::{pretrain, PretrainConfig, TrainEvent};
use vit_mae_core::{MaeConfig, MaskOptions, MaskedAutoencoder, Masking, Pool, Precision, Target};

const OUTPUTS: f64 = 1e-4;
const GRADIENTS: f64 = 1e-3;

#[allow(clippy::too_many_arguments)]
fn mae_config(img: usize, patch: usize, chans: usize, dim: usize, heads: usize, dec_dim: usize, dec_heads: usize, depths: (usize, usize), mlp_ratio: f64) -> MaeConfig {
    MaeConfig {
        img_size: img,
        patch_size: patch,
        in_chans: chans,
        embed_dim: dim,
        depth: depths.0,
        num_heads: heads,
        decoder_embed_dim: dec_dim,
        decoder_depth: depths.1,
        decoder_num_heads: dec_heads,
        mlp_ratio,
        target: Target::Pixels,
        layer_norm_eps: 1e-6,
        encoder_mask_token: false,
    }
}

/// The engine's model and the reference model: the same seed, so the same weights and
/// the same stream of masks.
fn pair(config: &MaeConfig, seed: u64) -> (MaskedAutoencoder, MaskedAutoencoder) {
    let mut engine = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, seed).unwrap();
    let mut reference = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, seed).unwrap();
    reference.set_reference_only(true);
    assert!(engine.uses_engine() && !reference.uses_engine());
    if let Some(k) = config.target.pca_components() {
        // A PCA target's basis, fitted on other images than the ones the tests run.
        let mut moments = PatchMoments::new(config.patch_dim()).unwrap();
        let sample = host(&images(config, 4, seed + 1000)).iter().map(|&v| v as f32).collect::<Vec<_>>();
        moments.add_images(&sample, 4, config.in_chans, config.img_size, config.patch_size).unwrap();
        let fit = moments.fit(k).unwrap();
        let mean = Tensor::new(fit.mean.iter().map(|&v| v as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
        let axes = Tensor::new(fit.components.iter().map(|&v| v as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap().reshape((k, config.patch_dim())).unwrap();
        for model in [&mut engine, &mut reference] {
            model.set_pca_basis(&mean, &axes).unwrap();
        }
    }
    (engine, reference)
}

/// Normalised-looking images `[n, C, H, W]`.
fn images(config: &MaeConfig, n: usize, seed: u64) -> Tensor {
    let len = n * config.in_chans * config.img_size * config.img_size;
    Tensor::from_vec(SplitMix(seed).values(len, -2.0, 2.0), (n, config.in_chans, config.img_size, config.img_size), &Device::Cpu).unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let worst = host(got).iter().zip(host(want)).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
    assert!(worst <= tol, "{what}: largest difference {worst:e} > {tol:e}");
}

/// Each gradient within `GRADIENTS` of its reference tensor's largest magnitude, and the
/// same names in the same order.
fn assert_gradients(what: &str, got: &[(String, Tensor)], want: &[(String, Tensor)]) {
    let names = |g: &[(String, Tensor)]| g.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: gradient names");
    for ((name, g), (_, w)) in got.iter().zip(want) {
        let scale = host(w).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert_close(&format!("{what}: grad {name}"), g, w, GRADIENTS * scale.max(1e-12));
    }
}

fn assert_loss(what: &str, got: f32, want: f32) {
    assert!((got - want).abs() as f64 <= OUTPUTS, "{what}: loss {got} against the reference's {want}");
}

struct Case {
    name: &'static str,
    config: MaeConfig,
    batch: usize,
    mask_ratio: f64,
    masking: Masking,
}

fn cases() -> Vec<Case> {
    let odd = mae_config(15, 5, 1, 12, 3, 20, 5, (2, 1), 4.0);
    let rgb = mae_config(18, 6, 3, 24, 3, 12, 3, (1, 2), 2.5);
    let fine = mae_config(21, 3, 3, 20, 5, 16, 1, (2, 1), 4.0);
    let even = mae_config(12, 3, 1, 28, 7, 8, 1, (1, 1), 3.0);
    let normpix = |c: &MaeConfig| MaeConfig { target: Target::NormPixels, ..c.clone() };
    let token = |c: &MaeConfig| MaeConfig { encoder_mask_token: true, ..c.clone() };
    let pca = |c: &MaeConfig, components| MaeConfig { target: Target::Pca { components }, ..c.clone() };
    let case = |name, config, batch, mask_ratio, masking| Case { name, config, batch, mask_ratio, masking };
    vec![
        case("1 channel, patch 5, 3 and 5 heads, ratio 0.75", odd.clone(), 3, 0.75, Masking::Random),
        case("ratio 0, norm-pix", normpix(&odd), 2, 0.0, Masking::Random),
        case("3 channels, patch 6, ratio 0.6, block, norm-pix", normpix(&rgb), 4, 0.6, Masking::Block),
        case("patch 3, 5 heads and 1, ratio 0.9", fine.clone(), 2, 0.9, Masking::Random),
        case("batch 1, ratio 0.9, norm-pix", normpix(&fine), 1, 0.9, Masking::Random),
        case("7 heads, grid", even.clone(), 3, 0.75, Masking::Grid),
        case("grid, norm-pix, batch 1", normpix(&even), 1, 0.75, Masking::Grid),
        case("encoder mask token, ratio 0.75", token(&odd), 2, 0.75, Masking::Random),
        case("encoder mask token, block, norm-pix", token(&normpix(&rgb)), 2, 0.6, Masking::Block),
        case("encoder mask token, ratio 0", token(&fine), 1, 0.0, Masking::Random),
        case("pca, 3 channels, 10 of 108 coefficients, ratio 0.6, block", pca(&rgb, 10), 4, 0.6, Masking::Block),
        case("pca, 1 channel, all 25 coefficients, batch 1", pca(&odd, 25), 1, 0.75, Masking::Random),
        case("pca, 1 coefficient, ratio 0", pca(&fine, 1), 2, 0.0, Masking::Random),
        case("pca, encoder mask token, grid", token(&pca(&even, 3)), 2, 0.75, Masking::Grid),
    ]
}

#[test]
fn forward_and_gradients_match_the_reference_model() {
    for (i, case) in cases().iter().enumerate() {
        let (engine, reference) = pair(&case.config, 100 + i as u64);
        let options = MaskOptions { mask_ratio: case.mask_ratio, masking: case.masking, noise: None };
        let what = case.name;
        // Two calls each: the second reuses the engine's plan with other images and masks.
        for call in 0..2 {
            let imgs = images(&case.config, case.batch, 10 * i as u64 + call);
            let got = engine.forward(&imgs, &options).unwrap();
            let want = reference.forward(&imgs, &options).unwrap();
            assert_close(&format!("{what}: mask"), &got.mask, &want.mask, 0.0);
            assert_close(&format!("{what}: ids_restore"), &got.ids_restore, &want.ids_restore, 0.0);
            assert_loss(what, got.loss.to_scalar().unwrap(), want.loss.to_scalar().unwrap());
            assert_close(&format!("{what}: pred"), &got.pred, &want.pred, OUTPUTS);
            assert_close(&format!("{what}: latent"), &got.latent, &want.latent, OUTPUTS);

            let (loss, grads) = engine.loss_and_gradients(&imgs, &options).unwrap();
            let (want_loss, want_grads) = reference.loss_and_gradients(&imgs, &options).unwrap();
            assert_loss(what, loss, want_loss);
            let names: BTreeSet<&str> = engine.params().iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(grads.iter().map(|(n, _)| n.as_str()).collect::<BTreeSet<_>>(), names, "{what}: one gradient per parameter");
            assert_gradients(what, &grads, &want_grads);
        }
    }
}

#[test]
fn embeddings_and_reconstructions_match_the_reference_model() {
    for (i, case) in cases().iter().enumerate().filter(|(_, c)| !c.config.encoder_mask_token) {
        let (engine, reference) = pair(&case.config, 200 + i as u64);
        let imgs = images(&case.config, case.batch, 300 + i as u64);
        for pool in [Pool::Mean, Pool::Cls] {
            let what = format!("{}: embed {pool:?}", case.name);
            assert_close(&what, &engine.embed(&imgs, pool).unwrap(), &reference.embed(&imgs, pool).unwrap(), OUTPUTS);
        }
        let options = MaskOptions { mask_ratio: case.mask_ratio, masking: case.masking, noise: None };
        let got = engine.reconstruct(&imgs, &options).unwrap();
        let want = reference.reconstruct(&imgs, &options).unwrap();
        assert_loss(case.name, got.loss, want.loss);
        assert_close(&format!("{}: reconstruction", case.name), &got.reconstruction, &want.reconstruction, OUTPUTS);
        assert_close(&format!("{}: pasted", case.name), &got.pasted, &want.pasted, OUTPUTS);
    }
}

#[test]
fn forward_only_plans_keep_no_backward_activations() {
    let config = mae_config(32, 4, 3, 64, 4, 32, 4, (4, 2), 4.0);
    let bytes = |mode| MaeEngine::new(&config, 16, 16, mode).unwrap().bytes();
    let (train, forward, encode) = (bytes(Mode::Train), bytes(Mode::Forward), bytes(Mode::Encode));
    // Parameters alone are a floor every plan shares; the activations make the difference.
    let params = 4 * MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, 0).unwrap().parameter_count();
    assert!(train >= 2 * params, "a training plan holds parameters and gradients: {train} bytes for {params} of parameters");
    assert!(forward < train - params, "a forward plan ({forward} bytes) has no gradients and fewer activations than a training plan ({train})");
    assert!(encode < forward, "an encoder-only plan ({encode} bytes) has no decoder, unlike a forward plan ({forward})");
}

// ------------------------------------------------------------------ whole runs

/// `n` random images; with labels, each image's brightness tells its class (of 5), so
/// that every protocol has something to learn.
fn loader(config_side: usize, channels: usize, n: usize, batch_size: usize, labels: Option<Vec<i64>>, seed: u64) -> Loader {
    let image_len = channels * config_side * config_side;
    let mut rng = SplitMix(seed);
    let data: Vec<f32> = (0..n)
        .flat_map(|i| {
            let (lo, hi) = labels.as_ref().map_or((0.0, 1.0), |l| (0.15 * l[i] as f64, 0.15 * l[i] as f64 + 0.4));
            rng.values(image_len, lo, hi)
        })
        .collect();
    let dataset = InMemoryDataset::new(data, [n, channels, config_side, config_side], labels).unwrap();
    let options = LoaderOptions { batch_size, seed, shuffle: true, drop_last: true, workers: 1, prefetch: 2, skip_corrupt: false, shard: Shard::default() };
    Loader::new(Arc::new(dataset), plain_augment(config_side, channels, 0.5, 0.5), options).unwrap()
}

fn step_losses(events: &[TrainEvent]) -> Vec<f64> {
    events.iter().filter_map(|e| if let TrainEvent::Step { loss, .. } = e { Some(*loss) } else { None }).collect()
}

fn assert_same_curve(what: &str, got: &[f64], want: &[f64], steps: usize) {
    assert_eq!(got.len(), steps, "{what}: steps taken");
    assert_eq!(want.len(), steps, "{what}: reference steps taken");
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * w.abs(), "{what}: step {} loss {g} against the reference's {w}", step + 1);
    }
    let (first, last) = (got[..5].iter().sum::<f64>() / 5.0, got[steps - 5..].iter().sum::<f64>() / 5.0);
    assert!(last < first, "{what}: the loss falls over the run (mean of the first 5 steps {first}, of the last 5 {last})");
}

#[test]
fn pretraining_follows_the_reference_loss_curve() {
    let config = MaeConfig { target: Target::NormPixels, ..mae_config(15, 5, 3, 24, 3, 20, 5, (2, 1), 4.0) };
    // 16 images in batches of 4, two micro-batches a step: 2 steps an epoch.
    let recipe = PretrainConfig::from_json(&json!({
        "epochs": 10.0, "accumIter": 2, "lr": 3e-3, "minLr": 1e-4, "warmupEpochs": 2.0,
        "clipGrad": 0.05, "maskRatio": 0.6, "seed": 7,
    }))
    .unwrap();
    let run = |model: &mut MaskedAutoencoder| {
        let mut events = Vec::new();
        let summary = pretrain(model, &loader(15, 3, 16, 4, None, 11), &recipe, None, &Group::single(), &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();
        assert_eq!(summary.steps, 20);
        step_losses(&events)
    };
    let (mut engine, mut reference) = pair(&config, 5);
    assert_same_curve("pre-training", &run(&mut engine), &run(&mut reference), 20);
}

#[test]
fn pca_pretraining_fits_a_basis_and_follows_the_reference_loss_curve() {
    // Patches of 75 values, 12 coefficients.
    let config = MaeConfig { target: Target::Pca { components: 12 }, ..mae_config(15, 5, 3, 24, 3, 20, 5, (2, 1), 4.0) };
    let recipe = PretrainConfig::from_json(&json!({
        "epochs": 10.0, "lr": 3e-3, "minLr": 1e-4, "warmupEpochs": 2.0, "maskRatio": 0.6, "seed": 7,
    }))
    .unwrap();
    let run = |model: &mut MaskedAutoencoder| {
        assert!(model.pca_basis().is_none());
        let mut events = Vec::new();
        let summary = pretrain(model, &loader(15, 3, 16, 4, None, 11), &recipe, None, &Group::single(), &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();
        assert_eq!(summary.steps, 40);
        // The basis first: all 16 images of the epoch (fewer than the sample's 256), 9 patches each.
        let TrainEvent::PcaBasis { components, kept_variance, images, patches } = events[0] else { panic!("the first event is {:?}", events[0]) };
        assert_eq!((components, images, patches), (12, 16, 144));
        // The leading 12 of 75 axes keep more than an even share, and not everything.
        assert!(kept_variance > 12.0 / 75.0 && kept_variance < 1.0, "kept variance {kept_variance}");
        assert_eq!(events.iter().filter(|e| matches!(e, TrainEvent::PcaBasis { .. })).count(), 1);
        (step_losses(&events), model.pca_basis().map(|b| (host(&b.mean), host(&b.components))).expect("pre-training leaves the basis in the model"))
    };
    let mut engine = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, 5).unwrap();
    let mut reference = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, 5).unwrap();
    reference.set_reference_only(true);
    let ((got, got_basis), (want, want_basis)) = (run(&mut engine), run(&mut reference));
    assert_eq!(got_basis, want_basis, "the same images give the same basis");
    let (mean, axes) = got_basis;
    assert_eq!((mean.len(), axes.len()), (75, 12 * 75));
    for (i, a) in axes.chunks(75).enumerate() {
        for (j, b) in axes.chunks(75).enumerate() {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5, "axes {i} and {j}: dot {dot}");
        }
    }
    assert_same_curve("pca pre-training", &got, &want, 40);
}

fn cls_config(global_pool: bool, head_batch_norm: bool) -> ClassifierConfig {
    ClassifierConfig {
        img_size: 15,
        patch_size: 5,
        in_chans: 3,
        embed_dim: 24,
        depth: 3,
        num_heads: 3,
        mlp_ratio: 4.0,
        layer_norm_eps: 1e-6,
        num_classes: 5,
        global_pool,
        head_batch_norm,
    }
}

fn cls_pair(config: &ClassifierConfig, seed: u64) -> (VitClassifier, VitClassifier) {
    let engine = VitClassifier::new(config.clone(), &Device::Cpu, Precision::F32, seed).unwrap();
    let mut reference = VitClassifier::new(config.clone(), &Device::Cpu, Precision::F32, seed).unwrap();
    reference.set_reference_only(true);
    assert!(engine.uses_engine() && !reference.uses_engine());
    (engine, reference)
}

#[test]
fn classifier_heads_match_the_reference_model() {
    for (global_pool, head_batch_norm) in [(true, false), (false, false), (true, true)] {
        let what = format!("global pool {global_pool}, BatchNorm head {head_batch_norm}");
        let config = cls_config(global_pool, head_batch_norm);
        let (engine, reference) = cls_pair(&config, 9);
        for batch in [1, 6] {
            let imgs = Tensor::from_vec(SplitMix(batch as u64).values(batch * 3 * 15 * 15, -2.0, 2.0), (batch, 3, 15, 15), &Device::Cpu).unwrap();
            let labels: Vec<i64> = (0..batch as i64).map(|i| i % 5).collect();
            assert_close(&format!("{what}: logits"), &engine.forward(&imgs).unwrap(), &reference.forward(&imgs).unwrap(), OUTPUTS);
            assert_close(&format!("{what}: embed"), &engine.embed(&imgs).unwrap(), &reference.embed(&imgs).unwrap(), OUTPUTS);
            if batch > 1 || !head_batch_norm {
                let (loss, grads) = engine.loss_and_gradients(&imgs, &labels, 0.1).unwrap();
                let (want_loss, want_grads) = reference.loss_and_gradients(&imgs, &labels, 0.1).unwrap();
                assert_loss(&what, loss, want_loss);
                assert_gradients(&what, &grads, &want_grads);
            }
        }
    }
}

/// 40 labelled images in batches of 8, five steps an epoch.
fn finetune_curves(config: &ClassifierConfig, recipe: serde_json::Value) -> (Vec<f64>, Vec<f64>) {
    let recipe = FinetuneConfig::from_json(&recipe).unwrap();
    let labels: Vec<i64> = (0..40).map(|i| i % 5).collect();
    let run = |classifier: &VitClassifier| {
        let mut events = Vec::new();
        let train = loader(15, 3, 40, 8, Some(labels.clone()), 21);
        let summary = finetune(classifier, &train, None, &recipe, None, &Group::single(), &mut |e| events.push(e), &AtomicBool::new(false)).unwrap();
        assert_eq!(summary.steps, 20);
        step_losses(&events)
    };
    let (engine, reference) = cls_pair(config, 13);
    (run(&engine), run(&reference))
}

#[test]
fn finetuning_with_mixup_and_drop_path_follows_the_reference_loss_curve() {
    let recipe = json!({
        "protocol": "finetune", "epochs": 4.0, "lr": 2e-3, "warmupEpochs": 1.0, "layerDecay": 0.75,
        "dropPath": 0.2, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1, "clipGrad": 1.0, "accumIter": 1, "seed": 4,
    });
    let (got, want) = finetune_curves(&cls_config(true, false), recipe);
    assert_same_curve("fine-tuning", &got, &want, 20);
}

#[test]
fn linear_probing_and_partial_finetuning_follow_the_reference_loss_curves() {
    let probe = json!({ "protocol": "linprobe", "epochs": 4.0, "lr": 0.05, "warmupEpochs": 1.0, "seed": 2 });
    let (got, want) = finetune_curves(&cls_config(true, true), probe);
    assert_same_curve("linear probe", &got, &want, 20);
    let partial = json!({ "protocol": "partial", "partialBlocks": 1, "epochs": 4.0, "lr": 2e-3, "warmupEpochs": 1.0, "seed": 3 });
    let (got, want) = finetune_curves(&cls_config(false, false), partial);
    assert_same_curve("partial fine-tuning", &got, &want, 20);
}
