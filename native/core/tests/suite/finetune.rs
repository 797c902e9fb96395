//! Fine-tuning, linear probing and partial fine-tuning: layer-wise lr decay groups,
//! LARS, mixup/cutmix, stochastic depth, the probe's BatchNorm, which parameters each
//! protocol trains, whole runs (learning, evaluation events, exact resume), position
//! embedding resizing, building a classifier on a pre-trained encoder, evaluation and
//! embeddings, and classifier checkpoints.
//! Expected values are computed in the tests from the published formulas
//! (`util/lr_decay.py`, `util/lars.py`, timm's `Mixup` / `drop_path`,
//! `torch.nn.BatchNorm1d`, `torch.nn.functional.interpolate(mode='bicubic')`), never
//! copied from a run of the code under test.

use candle_core::{Device, Tensor, Var};
use crate::common::{bits, host, plain_augment, Fault, Faulty, SplitMix, TempDir};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use vit_mae_core::classifier::{load_classifier, resize_pos_embed, save_classifier, ClassifierConfig, ForwardMode, Trainable, VitClassifier};
use vit_mae_core::distributed::Group;
use vit_mae_core::data::{Augment, InMemoryDataset, Loader, LoaderOptions, Shard};
use vit_mae_core::finetune::{embed_dataset, evaluate, finetune, Embedder, FinetuneConfig, Protocol};
use vit_mae_core::mixup::MixupConfig;
use vit_mae_core::nn::DropPathScales;
use vit_mae_core::optim::{layer_decay_groups, AdamW, AdamWConfig, Lars, Optimizer, OptimizerState};
use vit_mae_core::recipe::Recipe;
use vit_mae_core::train::{list_checkpoints, TrainEvent, TrainSummary};
use vit_mae_core::checkpoint::Stored;
use vit_mae_core::{save_model, ErrorCode, Precision, MaeConfig, MaskedAutoencoder, Pool};

// ---------------------------------------------------------------- helpers

const SIDE: usize = 8;
const CHANNELS: usize = 3;
const DIM: usize = 16;
const IMAGE_LEN: usize = CHANNELS * SIDE * SIDE;

/// img 8, patch 4 (2x2 grid), embed 16, 2 heads.
fn cls_config(depth: usize, num_classes: usize, global_pool: bool, head_batch_norm: bool) -> ClassifierConfig {
    ClassifierConfig {
        img_size: SIDE,
        patch_size: 4,
        in_chans: CHANNELS,
        embed_dim: DIM,
        depth,
        num_heads: 2,
        mlp_ratio: 4.0,
        layer_norm_eps: 1e-6,
        num_classes,
        global_pool,
        head_batch_norm,
    }
}

pub(crate) fn classifier(depth: usize, num_classes: usize, global_pool: bool, head_batch_norm: bool, seed: u64) -> VitClassifier {
    VitClassifier::new(cls_config(depth, num_classes, global_pool, head_batch_norm), &Device::Cpu, Precision::F32, seed).unwrap()
}

/// The MAE whose encoder matches `cls_config(depth, ..)`.
pub(crate) fn mae_config(depth: usize) -> MaeConfig {
    MaeConfig {
        img_size: SIDE,
        patch_size: 4,
        in_chans: CHANNELS,
        embed_dim: DIM,
        depth,
        num_heads: 2,
        decoder_embed_dim: 8,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 4.0,
        target: vit_mae_core::Target::Pixels,
        layer_norm_eps: 1e-6,
        encoder_mask_token: false,
    }
}

fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
}

fn var(values: &[f32], shape: &[usize]) -> Var {
    Var::from_tensor(&tensor(values, shape)).unwrap()
}

fn param<'a>(c: &'a VitClassifier, name: &str) -> &'a Var {
    &c.params().iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no parameter {name}")).1
}

/// Every parameter's f32 bit patterns, by name.
pub(crate) fn param_bits(params: &[(String, Var)]) -> BTreeMap<String, Vec<u32>> {
    params.iter().map(|(n, v)| (n.clone(), bits(v.as_tensor()))).collect()
}

fn buffer(c: &VitClassifier, name: &str) -> Tensor {
    c.buffers().unwrap().into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no buffer {name}")).1
}

fn batches_tracked(c: &VitClassifier) -> i64 {
    buffer(c, "head.0.num_batches_tracked").to_scalar::<i64>().unwrap()
}

fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w} (tolerance {tol})");
    }
}

/// Label smoothing as timm's `one_hot`: `1 - s + s/K` on the label, `s/K` elsewhere.
fn smoothed(label: i64, k: usize, s: f64) -> Vec<f64> {
    (0..k).map(|j| if j as i64 == label { 1.0 - s + s / k as f64 } else { s / k as f64 }).collect()
}

/// No crop, no flip, mean/std 0.5: a pixel `v` becomes `2v - 1`.
pub(crate) fn augment() -> Augment {
    plain_augment(SIDE, CHANNELS, 0.5, 0.5)
}

fn loader(data: InMemoryDataset, batch_size: usize, shuffle: bool, drop_last: bool, seed: u64) -> Loader {
    let options = LoaderOptions { batch_size, seed, shuffle, drop_last, workers: 1, prefetch: 2, skip_corrupt: false, shard: Shard::default() };
    Loader::new(Arc::new(data), augment(), options).unwrap()
}

/// Two classes: bright images (label 1) and dark ones (label 0), plus noise.
fn bright_dark(n: usize, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = SplitMix(seed);
    let mut data = Vec::with_capacity(n * IMAGE_LEN);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 2) as i64;
        let base = if label == 1 { 0.65 + 0.2 * rng.unit() } else { 0.15 + 0.2 * rng.unit() };
        for _ in 0..IMAGE_LEN {
            data.push((base + 0.2 * (rng.unit() - 0.5)).clamp(0.0, 1.0) as f32);
        }
        labels.push(label);
    }
    (data, labels)
}

pub(crate) fn bright_dark_dataset(n: usize, seed: u64) -> InMemoryDataset {
    let (data, labels) = bright_dark(n, seed);
    InMemoryDataset::new(data, [n, CHANNELS, SIDE, SIDE], Some(labels)).unwrap()
}

fn run_finetune(
    c: &VitClassifier,
    train: &Loader,
    eval: Option<&Loader>,
    config: &FinetuneConfig,
    resume: Option<&Path>,
) -> vit_mae_core::Result<(TrainSummary, Vec<TrainEvent>)> {
    let mut events = Vec::new();
    let cancel = AtomicBool::new(false);
    let summary = finetune(c, train, eval, config, resume, &Group::single(), &mut |e| events.push(e), &cancel)?;
    Ok((summary, events))
}

fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blocks.")?.split('.').next()?.parse().ok()
}

// ---------------------------------------------------------------- 1. layer-wise lr decay

#[test]
fn layer_decay_groups_follow_param_groups_lrd() {
    let c = classifier(3, 5, true, false, 0);
    let params = c.params();
    let groups = layer_decay_groups(params, 3, 0.5);
    assert_eq!(groups.len(), params.len());

    let names: BTreeSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    for must in ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc2.bias", "fc_norm.weight", "head.weight", "head.bias"] {
        assert!(names.contains(must), "classifier lacks {must}");
    }

    // util/lr_decay.py with num_layers = depth + 1 = 4: layer 0 (embeddings) 0.5^4,
    // block i is layer i + 1 -> 0.5^(3 - i), the rest layer 4 -> 1.
    for ((name, var), group) in params.iter().zip(&groups) {
        let want_scale = if name == "cls_token" || name == "pos_embed" || name.starts_with("patch_embed.") {
            0.0625
        } else if let Some(i) = block_index(name) {
            [0.125, 0.25, 0.5][i]
        } else {
            assert!(name.starts_with("fc_norm.") || name.starts_with("head."), "unexpected parameter {name}");
            1.0
        };
        assert!((group.lr_scale - want_scale).abs() < 1e-15, "{name}: lr_scale {} want {want_scale}", group.lr_scale);
        let want_decay = !(name == "cls_token" || name == "pos_embed" || var.dims().len() == 1);
        assert_eq!(group.decays, want_decay, "{name} (shape {:?}) weight decay flag", var.dims());
    }
    let group = |n: &str| groups[params.iter().position(|(m, _)| m == n).unwrap()];
    assert!(!group("cls_token").decays && !group("pos_embed").decays, "cls_token / pos_embed are 3-D yet exempt (no_weight_decay)");
    assert!(group("patch_embed.proj.weight").decays && !group("patch_embed.proj.bias").decays);
    assert!(group("blocks.1.attn.proj.weight").decays && !group("blocks.1.attn.proj.bias").decays);
    assert!(!group("blocks.1.norm2.weight").decays && !group("fc_norm.weight").decays);
    assert!(group("head.weight").decays && !group("head.bias").decays);
    // Another decay rate, to make sure it is the exponent base.
    let g = layer_decay_groups(params, 3, 0.75);
    assert!((g[0].lr_scale - 0.75f64.powi(4)).abs() < 1e-15);
}

#[test]
fn adamw_step_is_scaled_by_layer_decay() {
    let c = classifier(3, 5, true, false, 1);
    let params = c.params();
    let groups = layer_decay_groups(params, 3, 0.5);
    let (lr, wd) = (0.01, 0.1);
    let mut adamw = AdamW::with_groups(params, groups.clone(), AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: wd }).unwrap();
    let before: Vec<Vec<f64>> = params.iter().map(|(_, v)| host(v.as_tensor())).collect();
    let with_grad = ["blocks.0.attn.qkv.weight", "head.weight"];
    let mut rng = SplitMix(9);
    let grads: Vec<Tensor> = params
        .iter()
        .map(|(name, v)| {
            let n = v.elem_count();
            let values: Vec<f32> = if with_grad.contains(&name.as_str()) {
                // Magnitudes in [0.5, 1.5) with random signs.
                (0..n).map(|_| ((0.5 + rng.unit()) * if rng.unit() < 0.5 { -1.0 } else { 1.0 }) as f32).collect()
            } else {
                vec![0.0; n]
            };
            tensor(&values, v.dims())
        })
        .collect();
    adamw.step(&grads, lr).unwrap();

    for (((name, v), group), (p0, g)) in params.iter().zip(&groups).zip(before.iter().zip(&grads)) {
        let after = host(v.as_tensor());
        let g = host(g);
        let scaled = lr * group.lr_scale;
        let shrink = if group.decays { 1.0 - scaled * wd } else { 1.0 };
        // First step: m_hat = g, v_hat = g^2, so the update is scaled * g / (|g| + eps).
        let want: Vec<f64> = p0.iter().zip(&g).map(|(p, g)| p * shrink - scaled * g / (g.abs() + 1e-8)).collect();
        assert_close(&after, &want, 2e-7, name);
        if !group.decays && !with_grad.contains(&name.as_str()) {
            assert_eq!(after, *p0, "{name}: no gradient and no decay must leave it untouched");
        }
    }
    // The two moved matrices: block 0 moves 1/8 as far as the head.
    let moved = |name: &str| {
        let i = params.iter().position(|(n, _)| n == name).unwrap();
        let after = host(params[i].1.as_tensor());
        let shrink = 1.0 - lr * groups[i].lr_scale * wd;
        after.iter().zip(&before[i]).map(|(a, b)| (a - b * shrink).abs()).sum::<f64>() / after.len() as f64
    };
    let (block0, head) = (moved("blocks.0.attn.qkv.weight"), moved("head.weight"));
    assert!((head - lr).abs() < 1e-6, "head moves lr per element, got {head}");
    assert!((block0 - lr * 0.125).abs() < 1e-6, "block 0 moves lr * 0.5^3 per element, got {block0}");
}

// ---------------------------------------------------------------- 2. LARS

/// `util/lars.py`'s step for one parameter, in f64.
fn lars_reference(p: &mut [f64], mu: &mut [f64], g: &[f64], matrix: bool, wd: f64, lr: f64) {
    let mut dp = g.to_vec();
    if matrix {
        for (d, p) in dp.iter_mut().zip(p.iter()) {
            *d += wd * p;
        }
        let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
        let (param_norm, update_norm) = (norm(p), norm(&dp));
        let q = if param_norm > 0.0 && update_norm > 0.0 { 0.001 * param_norm / update_norm } else { 1.0 };
        for d in dp.iter_mut() {
            *d *= q;
        }
    }
    for i in 0..p.len() {
        mu[i] = 0.9 * mu[i] + dp[i];
        p[i] -= lr * mu[i];
    }
}

#[test]
fn lars_matches_published_step_and_state_round_trips() {
    let (wd, lr) = (0.1, 0.5);
    let w0 = [0.5f32, -1.0, 2.0, 0.25];
    let b0 = [0.3f32, -0.2];
    let z0 = [0.0f32; 4];
    let grads1: [Vec<f32>; 3] = [vec![0.1, 0.2, -0.3, 0.4], vec![0.05, -0.1], vec![0.2, -0.1, 0.0, 0.3]];
    let grads2: [Vec<f32>; 3] = [vec![-0.2, 0.05, 0.1, 0.3], vec![0.2, 0.15], vec![0.1, 0.1, -0.2, 0.0]];
    let shapes: [&[usize]; 3] = [&[2, 2], &[2], &[2, 2]];
    let make = |values: [&[f32]; 3]| -> Vec<(String, Var)> {
        ["w", "b", "z"].iter().zip(values).zip(shapes).map(|((n, v), s)| (n.to_string(), var(v, s))).collect()
    };
    let params = make([&w0, &b0, &z0]);
    let mut lars = Lars::new(&params, wd).unwrap();
    let opt: &mut dyn Optimizer = &mut lars;
    let to_tensors = |g: &[Vec<f32>; 3]| g.iter().zip(shapes).map(|(v, s)| tensor(v, s)).collect::<Vec<_>>();

    // Reference state.
    let mut p: Vec<Vec<f64>> = [&w0[..], &b0[..], &z0[..]].iter().map(|v| v.iter().map(|&x| x as f64).collect()).collect();
    let mut mu: Vec<Vec<f64>> = p.iter().map(|v| vec![0.0; v.len()]).collect();
    let reference_step = |p: &mut Vec<Vec<f64>>, mu: &mut Vec<Vec<f64>>, g: &[Vec<f32>; 3]| {
        for i in 0..3 {
            let g: Vec<f64> = g[i].iter().map(|&x| x as f64).collect();
            lars_reference(&mut p[i], &mut mu[i], &g, shapes[i].len() > 1, wd, lr);
        }
    };

    opt.step(&to_tensors(&grads1), lr).unwrap();
    reference_step(&mut p, &mut mu, &grads1);
    for (i, (name, v)) in params.iter().enumerate() {
        assert_close(&host(v.as_tensor()), &p[i], 1e-6, &format!("step 1 {name}"));
    }
    // Sanity of the reference itself: the trust ratio makes the matrix move ~1e-3 of
    // what the bias (plain SGD) moves; the zero matrix gets ratio 1.
    assert!((p[0][0] - 0.5).abs() < 1e-3 && (p[1][0] - 0.3).abs() > 0.02 && (p[2][0] + 0.1).abs() < 1e-7);

    let state: BTreeMap<String, Tensor> = opt
        .state()
        .into_iter()
        .map(|(k, t)| match t {
            Stored::Tensor(t) => (k, t),
            Stored::F32 { .. } => panic!("LARS keeps its state as tensors"),
        })
        .collect();
    assert_eq!(state.keys().cloned().collect::<Vec<_>>(), vec!["momentum.b", "momentum.w", "momentum.z"]);
    for (i, name) in ["w", "b", "z"].iter().enumerate() {
        assert_close(&host(&state[&format!("momentum.{name}")]), &mu[i], 1e-6, &format!("momentum of {name}"));
    }

    // A fresh optimizer over copies of the current weights, given the state, continues identically.
    let copies = make([
        &params[0].1.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &params[1].1.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &params[2].1.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    ]);
    let mut restored = Lars::new(&copies, wd).unwrap();
    restored.load_state(&state).unwrap();
    restored.set_steps_taken(1);

    opt.step(&to_tensors(&grads2), lr).unwrap();
    restored.step(&to_tensors(&grads2), lr).unwrap();
    reference_step(&mut p, &mut mu, &grads2);
    assert_eq!(opt.steps_taken(), 2);
    assert_eq!(restored.steps_taken(), 2);
    for (i, ((name, v), (_, r))) in params.iter().zip(&copies).enumerate() {
        assert_close(&host(v.as_tensor()), &p[i], 1e-6, &format!("step 2 {name}"));
        assert_eq!(bits(v.as_tensor()), bits(r.as_tensor()), "{name}: restored optimizer diverged");
    }
    // Momentum matters: without it the second step of the bias would be lr * g2 alone.
    let plain = b0[0] as f64 - lr * grads1[1][0] as f64 - lr * grads2[1][0] as f64;
    assert!((p[1][0] - plain).abs() > 0.01);

    // Missing or misshapen state is refused.
    let mut partial = state.clone();
    partial.remove("momentum.b");
    assert_eq!(Lars::new(&copies, wd).unwrap().load_state(&partial).unwrap_err().code, ErrorCode::CheckpointKeys);
    let mut misshapen = state.clone();
    misshapen.insert("momentum.w".into(), tensor(&[0.0; 4], &[4]));
    assert_eq!(Lars::new(&copies, wd).unwrap().load_state(&misshapen).unwrap_err().code, ErrorCode::CheckpointShape);
}

// ---------------------------------------------------------------- 3. mixup / cutmix

fn mix_config(mixup: f64, cutmix: f64, prob: f64, switch_prob: f64) -> MixupConfig {
    MixupConfig { mixup_alpha: mixup, cutmix_alpha: cutmix, prob, switch_prob, label_smoothing: 0.1, num_classes: 3 }
}

const MIX_SHAPE: [usize; 4] = [4, 2, 4, 5];
const MIX_LABELS: [i64; 4] = [0, 1, 2, 1];

fn mix_images() -> Vec<f32> {
    SplitMix(77).values(MIX_SHAPE.iter().product(), 0.0, 1.0)
}

fn check_targets(targets: &[f32], lam: f64, what: &str) {
    let (n, k) = (MIX_SHAPE[0], 3);
    assert_eq!(targets.len(), n * k);
    for i in 0..n {
        let (own, other) = (smoothed(MIX_LABELS[i], k, 0.1), smoothed(MIX_LABELS[n - 1 - i], k, 0.1));
        let want: Vec<f64> = own.iter().zip(&other).map(|(a, b)| lam * a + (1.0 - lam) * b).collect();
        let row: Vec<f64> = targets[i * k..(i + 1) * k].iter().map(|&v| v as f64).collect();
        assert_close(&row, &want, 1e-6, &format!("{what}: targets row {i}"));
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-6, "{what}: row {i} sums to {}", row.iter().sum::<f64>());
    }
}

#[test]
fn mixup_blends_images_and_labels_with_the_mirrored_image() {
    let original = mix_images();
    let [n, c, h, w] = MIX_SHAPE;
    let len = c * h * w;
    let config = mix_config(1.0, 0.0, 1.0, 0.5);
    let mut lams = Vec::new();
    for seed in 0..5 {
        let mut images = original.clone();
        let (targets, mixing) = config.mix(&mut images, MIX_SHAPE, &MIX_LABELS, None, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        let lam = mixing.lam;
        assert!(lam > 0.0 && lam < 1.0, "Beta(1, 1) draw {lam}");
        assert_eq!(mixing.cutmix_box, None);
        check_targets(&targets, lam, "mixup");
        for i in 0..n {
            for k in 0..len {
                let want = lam * original[i * len + k] as f64 + (1.0 - lam) * original[(n - 1 - i) * len + k] as f64;
                assert!((images[i * len + k] as f64 - want).abs() < 1e-6, "image {i} value {k}");
            }
        }
        lams.push(lam);
    }
    assert!(lams.windows(2).any(|p| p[0] != p[1]), "lam must come from the generator: {lams:?}");
}

#[test]
fn cutmix_pastes_the_mirrored_box_and_corrects_lam() {
    let original = mix_images();
    let [n, c, h, w] = MIX_SHAPE;
    let config = mix_config(0.0, 1.0, 1.0, 0.5);
    let mut nonempty = 0;
    for seed in 0..20 {
        let mut images = original.clone();
        let (targets, mixing) = config.mix(&mut images, MIX_SHAPE, &MIX_LABELS, None, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        let Some([y0, y1, x0, x1]) = mixing.cutmix_box else {
            // Only an unmixed batch (lam 1) has no box.
            assert_eq!(mixing.lam, 1.0);
            assert_eq!(images, original);
            continue;
        };
        assert!(y0 <= y1 && y1 <= h && x0 <= x1 && x1 <= w, "box {:?} outside {h}x{w}", [y0, y1, x0, x1]);
        let area = (y1 - y0) * (x1 - x0);
        nonempty += usize::from(area > 0);
        assert!((mixing.lam - (1.0 - area as f64 / (h * w) as f64)).abs() < 1e-12, "lam {} for box area {area}", mixing.lam);
        check_targets(&targets, mixing.lam, "cutmix");
        for i in 0..n {
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let at = |img: usize| ((img * c + ch) * h + y) * w + x;
                        let inside = (y0..y1).contains(&y) && (x0..x1).contains(&x);
                        let want = if inside { original[at(n - 1 - i)] } else { original[at(i)] };
                        assert_eq!(images[at(i)], want, "seed {seed}: image {i} ch {ch} ({y}, {x}) inside={inside}");
                    }
                }
            }
        }
    }
    assert!(nonempty >= 5, "only {nonempty} of 20 seeds cut a non-empty box");
}

#[test]
fn mixing_probability_switch_errors_and_determinism() {
    let original = mix_images();
    // prob 0: nothing mixed, plain smoothed one-hot targets.
    let mut images = original.clone();
    let (targets, mixing) = mix_config(1.0, 1.0, 0.0, 0.5).mix(&mut images, MIX_SHAPE, &MIX_LABELS, None, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
    assert_eq!(mixing.lam, 1.0);
    assert_eq!(mixing.cutmix_box, None);
    assert_eq!(images, original);
    for (i, &y) in MIX_LABELS.iter().enumerate() {
        let row: Vec<f64> = targets[i * 3..(i + 1) * 3].iter().map(|&v| v as f64).collect();
        assert_close(&row, &smoothed(y, 3, 0.1), 1e-7, "unmixed targets");
    }

    // Both on: switch 1 always cuts, switch 0 never does.
    for seed in 0..6 {
        let mut images = original.clone();
        let (_, m) = mix_config(1.0, 1.0, 1.0, 1.0).mix(&mut images, MIX_SHAPE, &MIX_LABELS, None, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        assert!(m.cutmix_box.is_some() || m.lam == 1.0, "switch 1 must cut");
        let mut images = original.clone();
        let (_, m) = mix_config(1.0, 1.0, 1.0, 0.0).mix(&mut images, MIX_SHAPE, &MIX_LABELS, None, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        assert!(m.cutmix_box.is_none() && m.lam < 1.0, "switch 0 must blend");
    }

    // An odd batch is refused.
    let mut odd = original[..3 * 40].to_vec();
    let err = mix_config(1.0, 0.0, 1.0, 0.5).mix(&mut odd, [3, 2, 4, 5], &MIX_LABELS[..3], None, &mut ChaCha8Rng::seed_from_u64(0)).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);

    // The same generator state gives the same mixing; other seeds give others.
    let config = mix_config(0.8, 1.0, 1.0, 0.5);
    let run = |seed: u64| {
        let mut images = original.clone();
        let (targets, mixing) = config.mix(&mut images, MIX_SHAPE, &MIX_LABELS, None, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        (images, targets, mixing)
    };
    assert_eq!(run(11), run(11));
    assert!((12..16).any(|s| run(s) != run(11)));
}

/// Mixing with the batch itself as the partner is timm's mixing of the batch. And
/// ranks holding the interleaved parts of a batch (rank r of W the positions r, r + W,
/// ...), each mixing with the batch of the mirrored rank W - 1 - r under the same
/// generator, reproduce the whole batch's mixing exactly: images, targets, coefficient
/// and box.
#[test]
fn mixing_with_the_mirrored_rank_reproduces_the_whole_batch() {
    let original = mix_images();
    let [n, c, h, w] = MIX_SHAPE;
    let image_len = c * h * w;
    let mut cut = 0;
    for (mixup, cutmix) in [(1.0, 0.0), (0.0, 1.0), (0.8, 1.0)] {
        let config = mix_config(mixup, cutmix, 1.0, 0.5);
        for seed in 0..6 {
            let rng = || ChaCha8Rng::seed_from_u64(seed);
            let mut whole = original.clone();
            let (targets, mixing) = config.mix(&mut whole, MIX_SHAPE, &MIX_LABELS, None, &mut rng()).unwrap();
            // Prob 1 always mixes (a cut box can still be empty, leaving lam at 1).
            assert!(mixing.lam < 1.0 || mixing.cutmix_box.is_some(), "seed {seed}: not mixed");
            cut += usize::from(mixing.cutmix_box.is_some_and(|[y0, y1, x0, x1]| y1 > y0 && x1 > x0));
            let mut itself = original.clone();
            let own = config.mix(&mut itself, MIX_SHAPE, &MIX_LABELS, Some((&original, &MIX_LABELS)), &mut rng()).unwrap();
            assert_eq!((itself, own), (whole.clone(), (targets.clone(), mixing)), "seed {seed}: the batch as its own partner");

            for ranks in [2, 4] {
                let local = n / ranks;
                let shard = |rank: usize| {
                    let positions: Vec<usize> = (0..local).map(|i| rank + ranks * i).collect();
                    let images: Vec<f32> = positions.iter().flat_map(|&j| original[j * image_len..(j + 1) * image_len].to_vec()).collect();
                    let labels: Vec<i64> = positions.iter().map(|&j| MIX_LABELS[j]).collect();
                    (positions, images, labels)
                };
                for rank in 0..ranks {
                    let (positions, mut images, labels) = shard(rank);
                    let (_, partner_images, partner_labels) = shard(ranks - 1 - rank);
                    let (rank_targets, rank_mixing) =
                        config.mix(&mut images, [local, c, h, w], &labels, Some((&partner_images, &partner_labels)), &mut rng()).unwrap();
                    assert_eq!(rank_mixing, mixing, "seed {seed}, rank {rank} of {ranks}");
                    for (i, &j) in positions.iter().enumerate() {
                        let what = format!("seed {seed}, rank {rank} of {ranks}, image {i} (position {j})");
                        assert_eq!(images[i * image_len..(i + 1) * image_len], whole[j * image_len..(j + 1) * image_len], "{what}");
                        assert_eq!(rank_targets[i * 3..(i + 1) * 3], targets[j * 3..(j + 1) * 3], "{what}: targets");
                    }
                }
            }
        }
    }
    assert!(cut >= 3, "only {cut} mixings cut a non-empty box");

    // A partner of another size is refused.
    let mut images = original.clone();
    let err = mix_config(1.0, 0.0, 1.0, 0.5)
        .mix(&mut images, MIX_SHAPE, &MIX_LABELS, Some((&original[image_len..], &MIX_LABELS[1..])), &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument);
}

// ---------------------------------------------------------------- 4. drop path

/// Replaces the head's tiny initial weight (std 2e-5) with values of order 1, so that
/// logits reflect the features clearly.
fn widen_head(c: &VitClassifier, seed: u64) {
    let name = if c.config.head_batch_norm { "head.1.weight" } else { "head.weight" };
    let v = param(c, name);
    let values = SplitMix(seed).values(v.elem_count(), -1.0, 1.0);
    v.set(&tensor(&values, v.dims())).unwrap();
}

fn random_images(n: usize, seed: u64) -> Tensor {
    let values = SplitMix(seed).values(n * IMAGE_LEN, -1.0, 1.0);
    tensor(&values, &[n, CHANNELS, SIDE, SIDE])
}

#[test]
fn drop_path_is_off_in_evaluation_and_on_in_training() {
    let c = classifier(3, 4, true, false, 2);
    widen_head(&c, 3);
    let imgs = random_images(4, 4);
    // The reference model's evaluation, to compare its training passes with bit for bit.
    let eval = c.forward_mode(&imgs, &mut ForwardMode::eval()).unwrap();
    assert_eq!(bits(&eval), bits(&c.forward_mode(&imgs, &mut ForwardMode::eval()).unwrap()), "evaluation is deterministic");

    let train = |rate: f64, seed: u64| {
        let mut rngs = sample_rngs(4, seed);
        let mut mode = ForwardMode { train: Some((&mut rngs, rate)), trainable: Trainable::All };
        c.forward_mode(&imgs, &mut mode).unwrap()
    };
    assert_eq!(bits(&train(0.0, 1)), bits(&eval), "training at rate 0 equals evaluation (no BatchNorm head)");
    let scale = host(&eval).iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let differs = (0..5).filter(|&s| host(&train(0.5, s)).iter().zip(host(&eval)).any(|(a, b)| (a - b).abs() > 1e-3 * scale)).count();
    assert!(differs >= 1, "drop path at 0.5 never changed the logits over 5 seeds");
    // The same generator seed drops the same branches.
    assert_eq!(bits(&train(0.5, 7)), bits(&train(0.5, 7)));
}

/// `n` generators of stochastic depth, one per image.
fn sample_rngs(n: usize, seed: u64) -> Vec<ChaCha8Rng> {
    (0..n as u64).map(|i| ChaCha8Rng::seed_from_u64(seed * 1_000_003 + i)).collect()
}

#[test]
fn drop_path_scales_are_zero_or_inverse_keep() {
    let n = 20_000;
    let scales = DropPathScales::draw(&mut sample_rngs(n, 5), 0.25, &Device::Cpu).unwrap();
    assert_eq!(scales.attn.dims(), [n, 1, 1]);
    assert_eq!(scales.mlp.dims(), [n, 1, 1]);
    let keep_value = (1.0 / 0.75f64) as f32;
    for (what, t) in [("attn", &scales.attn), ("mlp", &scales.mlp)] {
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|&v| v == 0.0 || v == keep_value), "{what}: values other than 0 and 1/0.75");
        let kept = values.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        // Binomial std is 0.003 here.
        assert!((kept - 0.75).abs() < 0.015, "{what}: kept fraction {kept}");
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.02, "{what}: mean scale {mean} (expectation is preserved)");
    }
    assert_ne!(bits(&scales.attn), bits(&scales.mlp), "the two branches draw independently");
    let none = DropPathScales::draw(&mut sample_rngs(100, 6), 0.0, &Device::Cpu).unwrap();
    assert!(host(&none.attn).iter().chain(host(&none.mlp).iter()).all(|&v| v == 1.0), "rate 0 keeps everything at scale 1");
}

/// The published model builds its rates with `torch.linspace(0, drop_path, depth)`,
/// which for a single block is `[0.]`: a depth-1 classifier never drops.
#[test]
fn drop_path_of_a_single_block_is_zero_as_torch_linspace() {
    let c = classifier(1, 4, true, false, 2);
    widen_head(&c, 3);
    let imgs = random_images(4, 4);
    let eval = c.forward_mode(&imgs, &mut ForwardMode::eval()).unwrap();
    for seed in 0..5 {
        let mut rngs = sample_rngs(4, seed);
        let mut mode = ForwardMode { train: Some((&mut rngs, 0.5)), trainable: Trainable::All };
        assert_eq!(bits(&c.forward_mode(&imgs, &mut mode).unwrap()), bits(&eval), "seed {seed}");
    }
}

// ---------------------------------------------------------------- 5. BatchNorm of the probe

fn bn_features(n: usize, shift: f64) -> (Vec<Vec<f64>>, Tensor) {
    let rows: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..DIM).map(|j| ((i as f64 * 1.3 + j as f64 * 0.7).sin() * (j as f64 + 1.0) * 0.5 + j as f64 * 0.1 + shift) as f32 as f64).collect())
        .collect();
    let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    (rows, tensor(&flat, &[n, DIM]))
}

/// `x_hat @ W^T + b` for rows `x_hat`.
fn linear(rows: &[Vec<f64>], w: &[f64], b: &[f64]) -> Vec<f64> {
    let k = b.len();
    let d = w.len() / k;
    rows.iter().flat_map(|r| (0..k).map(move |o| b[o] + (0..d).map(|j| w[o * d + j] * r[j]).sum::<f64>())).collect()
}

#[test]
fn probe_batch_norm_uses_batch_statistics_in_training_and_running_ones_in_evaluation() {
    let c = classifier(2, 3, true, true, 4);
    widen_head(&c, 5);
    param(&c, "head.1.bias").set(&tensor(&[0.1, -0.2, 0.3], &[3])).unwrap();
    let w = host(param(&c, "head.1.weight").as_tensor());
    let b = [0.1f32 as f64, -0.2f32 as f64, 0.3f32 as f64];
    let names: Vec<String> = c.buffers().unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked"]);
    assert_eq!(host(&buffer(&c, "head.0.running_mean")), vec![0.0; DIM]);
    assert_eq!(host(&buffer(&c, "head.0.running_var")), vec![1.0; DIM]);
    assert_eq!(batches_tracked(&c), 0);

    let n = 4;
    let (rows, features) = bn_features(n, 0.0);
    let mean: Vec<f64> = (0..DIM).map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n as f64).collect();
    let biased: Vec<f64> = (0..DIM).map(|j| rows.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f64>() / n as f64).collect();
    let unbiased: Vec<f64> = biased.iter().map(|v| v * n as f64 / (n - 1) as f64).collect();

    let out = c.forward_head(&features, true).unwrap();
    let normalised: Vec<Vec<f64>> = rows.iter().map(|r| (0..DIM).map(|j| (r[j] - mean[j]) / (biased[j] + 1e-6).sqrt()).collect()).collect();
    assert_close(&host(&out), &linear(&normalised, &w, &b), 1e-4, "training-mode logits");

    let rm1: Vec<f64> = mean.iter().map(|m| 0.1 * m).collect();
    let rv1: Vec<f64> = unbiased.iter().map(|v| 0.9 + 0.1 * v).collect();
    assert_close(&host(&buffer(&c, "head.0.running_mean")), &rm1, 1e-6, "running_mean");
    assert_close(&host(&buffer(&c, "head.0.running_var")), &rv1, 1e-5, "running_var (unbiased)");
    assert_eq!(batches_tracked(&c), 1);

    // Evaluation normalises with the running statistics and leaves them alone.
    let (rows2, features2) = bn_features(3, 0.4);
    let out = c.forward_head(&features2, false).unwrap();
    let normalised: Vec<Vec<f64>> = rows2.iter().map(|r| (0..DIM).map(|j| (r[j] - rm1[j]) / (rv1[j] + 1e-6).sqrt()).collect()).collect();
    assert_close(&host(&out), &linear(&normalised, &w, &b), 1e-4, "evaluation logits");
    assert_eq!(batches_tracked(&c), 1);
    assert_close(&host(&buffer(&c, "head.0.running_mean")), &rm1, 1e-6, "running_mean after evaluation");

    // A second training batch: momentum 0.1 again.
    c.forward_head(&features2, true).unwrap();
    let m2: Vec<f64> = (0..DIM).map(|j| rows2.iter().map(|r| r[j]).sum::<f64>() / 3.0).collect();
    let uv2: Vec<f64> = (0..DIM).map(|j| rows2.iter().map(|r| (r[j] - m2[j]).powi(2)).sum::<f64>() / 2.0).collect();
    let rm2: Vec<f64> = rm1.iter().zip(&m2).map(|(r, m)| 0.9 * r + 0.1 * m).collect();
    let rv2: Vec<f64> = rv1.iter().zip(&uv2).map(|(r, v)| 0.9 * r + 0.1 * v).collect();
    assert_close(&host(&buffer(&c, "head.0.running_mean")), &rm2, 1e-6, "running_mean after 2 batches");
    assert_close(&host(&buffer(&c, "head.0.running_var")), &rv2, 1e-5, "running_var after 2 batches");
    assert_eq!(batches_tracked(&c), 2);

    // One image cannot give batch statistics in training; evaluation is fine.
    let (_, one) = bn_features(1, 0.0);
    assert_eq!(c.forward_head(&one, true).unwrap_err().code, ErrorCode::InvalidArgument);
    assert_eq!(batches_tracked(&c), 2, "a refused batch must not count");
    assert_eq!(c.forward_head(&one, false).unwrap().dims(), [1, 3]);
}

// ---------------------------------------------------------------- 6. partial fine-tuning / linear probe

fn names(params: &[(String, Var)]) -> Vec<String> {
    params.iter().map(|(n, _)| n.clone()).collect()
}

#[test]
fn trainable_params_per_protocol() {
    let c = classifier(3, 4, true, false, 0);
    let all = names(c.params());
    let last1 = names(&c.trainable_params(Trainable::LastBlocks(1)).unwrap());
    let want: Vec<String> = all.iter().filter(|n| n.starts_with("blocks.2.") || n.starts_with("fc_norm.") || n.starts_with("head.")).cloned().collect();
    assert_eq!(last1, want);
    assert_eq!(last1.iter().filter(|n| n.starts_with("blocks.2.")).count(), 12, "a block has 12 tensors");
    assert_eq!(last1.len(), 12 + 2 + 2);
    let last0 = names(&c.trainable_params(Trainable::LastBlocks(0)).unwrap());
    assert_eq!(last0, ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]);
    let last3 = names(&c.trainable_params(Trainable::LastBlocks(3)).unwrap());
    assert_eq!(last3.len(), all.len() - 4, "all but cls_token, pos_embed and patch_embed.*");
    assert!(!last3.iter().any(|n| n == "cls_token" || n == "pos_embed" || n.starts_with("patch_embed")));
    assert_eq!(c.trainable_params(Trainable::LastBlocks(4)).unwrap_err().code, ErrorCode::InvalidArgument);
    assert_eq!(names(&c.trainable_params(Trainable::All).unwrap()), all);
    assert_eq!(names(&c.trainable_params(Trainable::Head).unwrap()), ["head.weight", "head.bias"]);

    let cls = classifier(3, 4, false, false, 0);
    let last1 = names(&cls.trainable_params(Trainable::LastBlocks(1)).unwrap());
    assert!(last1.iter().any(|n| n == "norm.weight") && !last1.iter().any(|n| n.starts_with("fc_norm")));
    assert_eq!(last1.len(), 16);

    let probe = classifier(3, 4, true, true, 0);
    assert_eq!(names(&probe.trainable_params(Trainable::Head).unwrap()), ["head.1.weight", "head.1.bias"]);
}

fn assert_only_changed(before: &BTreeMap<String, Vec<u32>>, after: &BTreeMap<String, Vec<u32>>, trained: &[String], what: &str) {
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    for (name, b) in before {
        let changed = b != &after[name];
        if trained.contains(name) {
            assert!(changed, "{what}: trained parameter {name} did not change");
        } else {
            assert!(!changed, "{what}: frozen parameter {name} changed");
        }
    }
}

#[test]
fn finetune_config_from_json_layers_options_over_protocol_defaults() {
    let c = FinetuneConfig::from_json(&json!({ "protocol": "linprobe", "epochs": 3, "warmupEpochs": 1, "lr": null })).unwrap();
    assert_eq!(c.protocol, Protocol::Linprobe);
    assert_eq!(c.recipe.epochs, 3.0);
    assert_eq!(c.recipe.lr, None, "null keeps the default");
    assert_eq!(c.recipe.blr, FinetuneConfig::defaults(Protocol::Linprobe).recipe.blr);
    assert_eq!(FinetuneConfig::from_json(&json!({ "protocol": "partial" })).unwrap().layer_decay, 1.0);
    assert_eq!(FinetuneConfig::from_json(&json!({ "protocol": "finetune", "epochs": 3.64 })).unwrap().recipe.epochs, 3.64, "fractional epochs");
    for bad in [
        json!({ "epochs": 3 }),
        json!({ "protocol": "finetune", "epochs": 0 }),
        json!({ "protocol": "finetune", "epochs": -2.5 }),
        json!({ "protocol": "pretrain" }),
        json!({ "protocol": "finetune", "noSuchOption": 1 }),
        json!({ "protocol": "finetune", "dropPath": 1.0 }),
        json!({ "protocol": "finetune", "layerDecay": 0.0 }),
        json!({ "protocol": "finetune", "warmupEpochs": -1.0 }),
        json!({ "protocol": "finetune", "mixupProb": 1.5 }),
    ] {
        assert_eq!(FinetuneConfig::from_json(&bad).unwrap_err().code, ErrorCode::InvalidArgument, "{bad}");
    }
}

#[test]
fn partial_finetuning_trains_only_the_last_block_norm_and_head() {
    let c = classifier(3, 2, true, false, 6);
    let train = loader(bright_dark_dataset(8, 1), 4, true, true, 2);
    let config = FinetuneConfig::from_json(&json!({
        "protocol": "partial", "partialBlocks": 1, "epochs": 1, "lr": 1e-2, "warmupEpochs": 0, "dropPath": 0.1
    }))
    .unwrap();
    assert_eq!(config.trainable(), Trainable::LastBlocks(1));
    let before = param_bits(c.params());
    let (summary, _) = run_finetune(&c, &train, None, &config, None).unwrap();
    assert_eq!(summary.steps, 2);
    let trained = names(&c.trainable_params(Trainable::LastBlocks(1)).unwrap());
    assert_only_changed(&before, &param_bits(c.params()), &trained, "partial");
}

#[test]
fn linear_probe_trains_only_the_linear_head_and_updates_batch_norm() {
    let c = classifier(2, 2, true, true, 7);
    let train = loader(bright_dark_dataset(8, 2), 4, true, true, 3);
    let config = FinetuneConfig::from_json(&json!({ "protocol": "linprobe", "epochs": 1, "lr": 0.1, "warmupEpochs": 0 })).unwrap();
    assert_eq!(config.trainable(), Trainable::Head);
    assert_eq!(config.recipe.weight_decay, 0.0, "published linear probe: no weight decay");
    let before = param_bits(c.params());
    let (summary, _) = run_finetune(&c, &train, None, &config, None).unwrap();
    assert_eq!(summary.steps, 2);
    assert_only_changed(&before, &param_bits(c.params()), &["head.1.weight".to_string(), "head.1.bias".to_string()], "linprobe");
    assert_eq!(batches_tracked(&c), 2, "one BatchNorm update per training batch");
    assert!(host(&buffer(&c, "head.0.running_mean")).iter().any(|&v| v != 0.0));
    assert!(host(&buffer(&c, "head.0.running_var")).iter().any(|&v| v != 1.0));
}

// ---------------------------------------------------------------- 7. whole runs

#[test]
fn full_finetuning_learns_a_separable_task_and_evaluates_every_epoch() {
    let c = classifier(2, 2, true, false, 8);
    let train = loader(bright_dark_dataset(16, 3), 4, true, true, 4);
    let eval = loader(bright_dark_dataset(10, 4), 4, false, false, 0);
    let epochs = 6;
    let config = FinetuneConfig::from_json(&json!({
        "protocol": "finetune", "epochs": epochs, "lr": 1e-2, "warmupEpochs": 1, "dropPath": 0.1, "smoothing": 0.1
    }))
    .unwrap();
    assert_eq!(config.layer_decay, FinetuneConfig::defaults(Protocol::Finetune).layer_decay);
    let (summary, events) = run_finetune(&c, &train, Some(&eval), &config, None).unwrap();
    assert_eq!(summary.steps, 4 * epochs as u64);
    assert_eq!(summary.epochs_completed, epochs);

    let epoch_losses: Vec<f64> = events.iter().filter_map(|e| if let TrainEvent::EpochEnd { mean_loss, .. } = e { Some(*mean_loss) } else { None }).collect();
    assert_eq!(epoch_losses.len(), epochs);
    assert!(epoch_losses[epochs - 1] < 0.7 * epoch_losses[0], "loss did not go down: {epoch_losses:?}");

    let evals: Vec<(usize, f64, f64, f64)> =
        events.iter().filter_map(|e| if let TrainEvent::Eval { epoch, top1, top5, loss } = e { Some((*epoch, *top1, *top5, *loss)) } else { None }).collect();
    assert_eq!(evals.iter().map(|e| e.0).collect::<Vec<_>>(), (0..epochs).collect::<Vec<_>>(), "one Eval per epoch");
    // Each Eval follows its epoch's EpochEnd.
    for (i, e) in events.iter().enumerate() {
        if let TrainEvent::Eval { epoch, .. } = e {
            assert!(matches!(events[i - 1], TrainEvent::EpochEnd { epoch: ended, .. } if ended == *epoch));
        }
    }
    let result = evaluate(&c, &eval, &Group::single(), &mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!(result.count, 10);
    assert!(result.top1 >= 0.9, "top1 {} after fine-tuning", result.top1);
    assert_eq!(result.top5, 1.0, "two classes are always in the top 5");
    let last = evals[epochs - 1];
    assert_eq!((last.1, last.2), (result.top1, result.top5), "the last Eval saw the final weights");
    assert!((last.3 - result.loss).abs() < 1e-9);
    assert!(result.loss < evals[0].3 || evals[0].1 >= 0.9, "eval loss did not improve: {evals:?}");
}

/// `steps` in one go vs `split` steps into a checkpoint folder, then a classifier
/// with other initial weights resumed from the folder: the same final weights.
fn check_resume(protocol: &str, head_batch_norm: bool, extra: serde_json::Value, split: u64, with_eval: bool) {
    let train = loader(bright_dark_dataset(16, 5), 4, true, true, 6);
    let eval = loader(bright_dark_dataset(6, 6), 3, false, false, 0);
    let eval = with_eval.then_some(&eval);
    let mut options = json!({ "protocol": protocol, "epochs": 2, "lr": 5e-3, "warmupEpochs": 1, "seed": 4 });
    for (k, v) in extra.as_object().unwrap() {
        options[k] = v.clone();
    }
    let config = FinetuneConfig::from_json(&options).unwrap();
    let total = 8;

    let straight = classifier(2, 2, true, head_batch_norm, 10);
    let (s, _) = run_finetune(&straight, &train, eval, &config, None).unwrap();
    assert_eq!(s.steps, total);

    let dir = TempDir::new("resume");
    let first = classifier(2, 2, true, head_batch_norm, 10);
    let part = FinetuneConfig { recipe: Recipe { max_steps: Some(split), checkpoint_dir: Some(dir.path().to_path_buf()), ..config.recipe.clone() }, ..config.clone() };
    let (s, _) = run_finetune(&first, &train, eval, &part, None).unwrap();
    assert_eq!(s.steps, split);
    let checkpoints = list_checkpoints(dir.path());
    assert_eq!(checkpoints.last().unwrap().file_name().unwrap().to_string_lossy(), format!("checkpoint-{split:08}.safetensors"));

    // A classifier of another shape cannot resume from it.
    let other = classifier(2, 3, true, head_batch_norm, 99);
    let err = run_finetune(&other, &train, eval, &config, Some(dir.path())).err().expect("another config must not resume");
    assert_eq!(err.code, ErrorCode::InvalidConfig, "{}", err.message);

    let resumed = classifier(2, 2, true, head_batch_norm, 99);
    let (s, _) = run_finetune(&resumed, &train, eval, &config, Some(dir.path())).unwrap();
    assert_eq!(s.steps, total);
    let (a, b) = (param_bits(straight.params()), param_bits(resumed.params()));
    for (name, bits_a) in &a {
        let differing = bits_a.iter().zip(&b[name]).filter(|(x, y)| x != y).count();
        assert_eq!(differing, 0, "{protocol}: {name} differs in {differing} of {} values after resuming at {split}", bits_a.len());
    }
    for ((name, x), (_, y)) in straight.buffers().unwrap().iter().zip(resumed.buffers().unwrap().iter()) {
        assert_eq!(host(&x.to_dtype(candle_core::DType::F32).unwrap()), host(&y.to_dtype(candle_core::DType::F32).unwrap()), "{protocol}: buffer {name}");
    }
}

#[test]
fn finetune_resume_is_exact_with_mixup_cutmix_and_drop_path() {
    check_resume("finetune", false, json!({ "mixup": 0.8, "cutmix": 1.0, "dropPath": 0.1 }), 3, false);
}

#[test]
fn linprobe_resume_is_exact_with_batch_norm_and_lars() {
    check_resume("linprobe", true, json!({}), 4, true);
}

#[test]
fn mixing_drop_path_and_seed_change_the_run() {
    let train = loader(bright_dark_dataset(8, 7), 4, true, true, 8);
    let run = |options: serde_json::Value| {
        let c = classifier(2, 2, true, false, 11);
        let config = FinetuneConfig::from_json(&options).unwrap();
        run_finetune(&c, &train, None, &config, None).unwrap();
        param_bits(c.params())
    };
    let base = json!({ "protocol": "finetune", "epochs": 1, "lr": 5e-3, "warmupEpochs": 0, "seed": 1, "dropPath": 0.0 });
    let plain = run(base.clone());
    assert_eq!(plain, run(base.clone()), "runs are reproducible");
    let with = |k: &str, v: serde_json::Value| {
        let mut o = base.clone();
        o[k] = v;
        o
    };
    assert_ne!(plain, run(with("mixup", json!(0.8))), "mixup had no effect");
    assert_ne!(plain, run(with("cutmix", json!(1.0))), "cutmix had no effect");
    assert_ne!(plain, run(with("dropPath", json!(0.3))), "drop path had no effect");
    let mixed = with("mixup", json!(0.8));
    let mut reseeded = mixed.clone();
    reseeded["seed"] = json!(2);
    assert_ne!(run(mixed), run(reseeded), "the seed must key the mixing");
}

// ---------------------------------------------------------------- 8. position embedding resize

/// Keys' cubic convolution kernel with torch's A = -0.75.
fn keys_kernel(x: f64) -> f64 {
    let a = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        (a + 2.0) * x.powi(3) - (a + 3.0) * x.powi(2) + 1.0
    } else if x < 2.0 {
        a * x.powi(3) - 5.0 * a * x.powi(2) + 8.0 * a * x - 4.0 * a
    } else {
        0.0
    }
}

/// `F.interpolate(mode='bicubic', align_corners=False)` at one output position of a
/// `g x g` grid resized to `out x out`, written out from its definition.
fn torch_bicubic(grid: &dyn Fn(usize, usize) -> f64, g: usize, out: usize, oy: usize, ox: usize) -> f64 {
    let scale = g as f64 / out as f64;
    let (sy, sx) = ((oy as f64 + 0.5) * scale - 0.5, (ox as f64 + 0.5) * scale - 0.5);
    let (fy, fx) = (sy.floor() as i64, sx.floor() as i64);
    let clamp = |i: i64| i.clamp(0, g as i64 - 1) as usize;
    let mut total = 0.0;
    for ky in fy - 1..=fy + 2 {
        for kx in fx - 1..=fx + 2 {
            total += keys_kernel(sy - ky as f64) * keys_kernel(sx - kx as f64) * grid(clamp(ky), clamp(kx));
        }
    }
    total
}

#[test]
fn resize_pos_embed_matches_torch_bicubic() {
    let d = 3;
    let table: Vec<f32> = SplitMix(21).values(5 * d, -1.0, 1.0);
    let pos = tensor(&table, &[1, 5, d]);
    assert_eq!(bits(&resize_pos_embed(&pos, 2, 2).unwrap()), bits(&pos), "same grid: unchanged");

    for out in [4, 3, 1] {
        let resized = resize_pos_embed(&pos, out, out).unwrap();
        assert_eq!(resized.dims(), [1, 1 + out * out, d]);
        let got = host(&resized);
        assert_eq!(&got[..d], &table[..d].iter().map(|&v| v as f64).collect::<Vec<_>>()[..], "cls row kept");
        for oy in 0..out {
            for ox in 0..out {
                for ch in 0..d {
                    let grid = |y: usize, x: usize| table[(1 + y * 2 + x) * d + ch] as f64;
                    let want = torch_bicubic(&grid, 2, out, oy, ox);
                    let at = (1 + oy * out + ox) * d + ch;
                    assert!((got[at] - want).abs() < 1e-5, "2->{out} ({oy}, {ox}) channel {ch}: got {} want {want}", got[at]);
                }
            }
        }
    }
    // One element written out by hand: 2 -> 4, output (0, 1), so src = (-0.25, 0.25).
    let resized = host(&resize_pos_embed(&pos, 4, 4).unwrap());
    let v = |y: usize, x: usize| table[(1 + y * 2 + x) * d] as f64;
    let wy = [keys_kernel(1.75), keys_kernel(0.75), keys_kernel(0.25), keys_kernel(1.25)]; // taps -2..1 around -0.25
    let wx = [keys_kernel(1.25), keys_kernel(0.25), keys_kernel(0.75), keys_kernel(1.75)]; // taps -1..2 around 0.25
    let (ys, xs) = ([0, 0, 0, 1], [0, 0, 1, 1]);
    let want: f64 = (0..4).flat_map(|a| (0..4).map(move |b| (a, b))).map(|(a, b)| wy[a] * wx[b] * v(ys[a], xs[b])).sum();
    assert!((resized[(1 + 1) * d] - want).abs() < 1e-5, "got {} want {want}", resized[(1 + 1) * d]);

    // A table constant per channel stays constant (the weights sum to 1).
    let constant: Vec<f32> = (0..5).flat_map(|r| [if r == 0 { 9.0 } else { 0.5 }, -2.0, 3.25]).collect();
    let resized = host(&resize_pos_embed(&tensor(&constant, &[1, 5, 3]), 5, 5).unwrap());
    for (i, v) in resized.iter().enumerate().skip(3) {
        let want = [0.5, -2.0, 3.25][i % 3];
        assert!((v - want).abs() < 1e-6, "constant channel {} became {v}", i % 3);
    }
    assert_eq!(&resized[..3], &[9.0, -2.0, 3.25]);

    assert_eq!(resize_pos_embed(&tensor(&[0.0; 6 * 3], &[1, 6, 3]), 2, 2).unwrap_err().code, ErrorCode::CheckpointShape);
}

// ---------------------------------------------------------------- 9. classifier from a pre-trained encoder

#[test]
fn from_encoder_copies_the_encoder_and_starts_a_fresh_head() {
    let mae = MaskedAutoencoder::new(mae_config(2), &Device::Cpu, Precision::F32, 3).unwrap();
    // Give every MAE parameter (norms and zero biases included) values no fresh
    // classifier has, so that a copy is told apart from an initialisation.
    let mut rng = SplitMix(1);
    for (_, v) in mae.params() {
        v.set(&tensor(&rng.values(v.elem_count(), -0.5, 1.5), v.dims())).unwrap();
    }
    let mae_bits = param_bits(mae.params());

    for global_pool in [true, false] {
        let config = ClassifierConfig::from_encoder(&mae.config, 7, global_pool, false);
        let c = VitClassifier::from_encoder(&mae, config, 9).unwrap();
        let fresh = classifier(2, 7, global_pool, false, 9);
        for (name, v) in c.params() {
            let got = bits(v.as_tensor());
            if name.starts_with("blocks.") || name.starts_with("patch_embed.") || name == "cls_token" {
                assert_eq!(got, mae_bits[name], "{name} must come from the MAE");
                assert_ne!(got, bits(param(&fresh, name).as_tensor()), "{name}: the MAE and a fresh classifier should differ");
            }
        }
        assert_eq!(bits(param(&c, "pos_embed").as_tensor()), bits(mae.buffers()[0].1), "pos_embed is the MAE's fixed table");
        let head = host(param(&c, "head.weight").as_tensor());
        let std = (head.iter().map(|v| v * v).sum::<f64>() / head.len() as f64).sqrt();
        assert!((1.2e-5..3e-5).contains(&std), "head weight std {std}, want ~2e-5");
        assert!(host(param(&c, "head.bias").as_tensor()).iter().all(|&v| v == 0.0));
        if global_pool {
            assert!(host(param(&c, "fc_norm.weight").as_tensor()).iter().all(|&v| v == 1.0));
            assert!(host(param(&c, "fc_norm.bias").as_tensor()).iter().all(|&v| v == 0.0));
            assert!(!c.params().iter().any(|(n, _)| n.starts_with("norm.")));
        } else {
            assert_eq!(bits(param(&c, "norm.weight").as_tensor()), mae_bits["norm.weight"]);
            assert_eq!(bits(param(&c, "norm.bias").as_tensor()), mae_bits["norm.bias"]);
        }
        // Same encoder, same features: the classifier's cls-pool features equal the MAE's embedding.
        if !global_pool {
            let imgs = random_images(2, 5);
            let ours = host(&c.embed(&imgs).unwrap());
            let theirs = host(&mae.embed(&imgs, Pool::Cls).unwrap());
            assert_close(&ours, &theirs, 1e-5, "cls embedding");
        }
    }

    // A larger image: the table is resized to the new grid.
    let config = ClassifierConfig { img_size: 12, ..ClassifierConfig::from_encoder(&mae.config, 7, true, false) };
    let c = VitClassifier::from_encoder(&mae, config, 9).unwrap();
    assert_eq!(bits(param(&c, "pos_embed").as_tensor()), bits(&resize_pos_embed(mae.buffers()[0].1, 3, 3).unwrap()));

    // The linear probe's head: BatchNorm stats at their start, trunc-normal(0.01) weight.
    let probe = VitClassifier::from_encoder(&mae, ClassifierConfig::from_encoder(&mae.config, 7, false, true), 9).unwrap();
    let head = host(param(&probe, "head.1.weight").as_tensor());
    let std = (head.iter().map(|v| v * v).sum::<f64>() / head.len() as f64).sqrt();
    assert!((0.006..0.014).contains(&std), "probe head weight std {std}, want ~0.01");
    assert_eq!(batches_tracked(&probe), 0);
    assert_eq!(bits(param(&probe, "blocks.1.mlp.fc2.weight").as_tensor()), mae_bits["blocks.1.mlp.fc2.weight"]);

    let base = ClassifierConfig::from_encoder(&mae.config, 7, true, false);
    for bad in [
        ClassifierConfig { depth: 3, ..base.clone() },
        ClassifierConfig { embed_dim: 32, ..base.clone() },
        ClassifierConfig { num_heads: 4, ..base.clone() },
        ClassifierConfig { patch_size: 2, ..base.clone() },
        ClassifierConfig { mlp_ratio: 2.0, ..base.clone() },
    ] {
        let err = VitClassifier::from_encoder(&mae, bad.clone(), 0).err().expect("mismatched encoder must fail");
        assert_eq!(err.code, ErrorCode::InvalidConfig, "{bad:?}");
    }
}

// ---------------------------------------------------------------- 10. evaluate / embed_dataset

#[test]
fn evaluate_counts_top1_top5_and_mean_loss() {
    let k = 7;
    let c = classifier(1, k, true, false, 12);
    // A zero head weight makes the logits the bias for every image.
    let head = param(&c, "head.weight");
    head.set(&head.zeros_like().unwrap()).unwrap();
    let bias = [3.5f32, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5];
    param(&c, "head.bias").set(&tensor(&bias, &[k])).unwrap();
    let labels = vec![0i64, 4, 5, 6, 2, 0, 1];
    let n = labels.len();
    let data = SplitMix(13).values(n * IMAGE_LEN, 0.0, 1.0);
    let eval = loader(InMemoryDataset::new(data.clone(), [n, CHANNELS, SIDE, SIDE], Some(labels.clone())).unwrap(), 3, false, false, 0);
    let mut progress = Vec::new();
    let result = evaluate(&c, &eval, &Group::single(), &mut |done| progress.push(done), &AtomicBool::new(false)).unwrap();
    assert_eq!(result.count, n);
    assert_eq!(progress, [3, 6, 7]);
    assert!((result.top1 - 2.0 / 7.0).abs() < 1e-12, "top1 {}", result.top1);
    assert!((result.top5 - 5.0 / 7.0).abs() < 1e-12, "top5 {}", result.top5);
    let lse = bias.iter().map(|&b| (b as f64).exp()).sum::<f64>().ln();
    let want_loss = labels.iter().map(|&y| lse - bias[y as usize] as f64).sum::<f64>() / n as f64;
    assert!((result.loss - want_loss).abs() < 1e-5, "loss {} want {want_loss}", result.loss);

    let unlabelled = loader(InMemoryDataset::new(data, [n, CHANNELS, SIDE, SIDE], None).unwrap(), 3, false, false, 0);
    let no_progress = &mut |_: usize| {};
    assert_eq!(evaluate(&c, &unlabelled, &Group::single(), no_progress, &AtomicBool::new(false)).unwrap_err().code, ErrorCode::InvalidArgument);
    assert_eq!(evaluate(&c, &eval, &Group::single(), no_progress, &AtomicBool::new(true)).unwrap_err().code, ErrorCode::Aborted);
    let out_of_range = loader(InMemoryDataset::new(SplitMix(1).values(2 * IMAGE_LEN, 0.0, 1.0), [2, CHANNELS, SIDE, SIDE], Some(vec![0, 7])).unwrap(), 2, false, false, 0);
    assert_eq!(evaluate(&c, &out_of_range, &Group::single(), no_progress, &AtomicBool::new(false)).unwrap_err().code, ErrorCode::InvalidArgument);
}

#[test]
fn embed_dataset_follows_the_loader_order() {
    let mae = MaskedAutoencoder::new(mae_config(1), &Device::Cpu, Precision::F32, 14).unwrap();
    let n = 7;
    let data = SplitMix(15).values(n * IMAGE_LEN, 0.0, 1.0);
    let labels: Vec<i64> = vec![3, 1, 4, 1, 5, 9, 2];
    let dataset = || InMemoryDataset::new(data.clone(), [n, CHANNELS, SIDE, SIDE], Some(labels.clone())).unwrap();
    let shuffled = loader(dataset(), 3, true, false, 16);
    let order = shuffled.epoch_order(0);
    assert_ne!(order, (0..n).collect::<Vec<_>>(), "the test wants a shuffled order");

    let mut progress = Vec::new();
    let out = embed_dataset(&Embedder::Mae(&mae, Pool::Mean), &shuffled, &Group::single(), &mut |done| progress.push(done), &AtomicBool::new(false)).unwrap();
    assert_eq!(out.dim, DIM);
    assert_eq!(out.features.len(), n * DIM);
    assert_eq!(out.indices, order);
    assert_eq!(out.labels, order.iter().map(|&i| labels[i]).collect::<Vec<_>>());
    assert_eq!(progress, [3, 6, 7]);
    // The loader normalises with mean/std 0.5: the model sees 2v - 1.
    let normalised: Vec<f32> = data.iter().map(|v| (v - 0.5) / 0.5).collect();
    let all = mae.embed(&tensor(&normalised, &[n, CHANNELS, SIDE, SIDE]), Pool::Mean).unwrap();
    let all = host(&all);
    for (row, &index) in order.iter().enumerate() {
        let got: Vec<f64> = out.features[row * DIM..(row + 1) * DIM].iter().map(|&v| v as f64).collect();
        assert_close(&got, &all[index * DIM..(index + 1) * DIM], 1e-5, &format!("row {row} (item {index})"));
    }

    // A classifier embeds what its head sees.
    let c = classifier(1, 3, true, false, 17);
    let out = embed_dataset(&Embedder::Classifier(&c), &shuffled, &Group::single(), &mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert_eq!((out.dim, out.features.len()), (DIM, n * DIM));
    let all = host(&c.embed(&tensor(&normalised, &[n, CHANNELS, SIDE, SIDE])).unwrap());
    for (row, &index) in order.iter().enumerate() {
        let got: Vec<f64> = out.features[row * DIM..(row + 1) * DIM].iter().map(|&v| v as f64).collect();
        assert_close(&got, &all[index * DIM..(index + 1) * DIM], 1e-5, &format!("classifier row {row}"));
    }

    // Unlabelled data: no labels; cancelled: Aborted.
    let unlabelled = loader(InMemoryDataset::new(data.clone(), [n, CHANNELS, SIDE, SIDE], None).unwrap(), 3, false, false, 0);
    let out = embed_dataset(&Embedder::Mae(&mae, Pool::Cls), &unlabelled, &Group::single(), &mut |_| {}, &AtomicBool::new(false)).unwrap();
    assert!(out.labels.is_empty());
    assert_eq!(out.indices, (0..n).collect::<Vec<_>>());
    let err = embed_dataset(&Embedder::Mae(&mae, Pool::Cls), &unlabelled, &Group::single(), &mut |_| {}, &AtomicBool::new(true)).err().expect("cancelled");
    assert_eq!(err.code, ErrorCode::Aborted);
}

// ---------------------------------------------------------------- 11. save / load

#[test]
fn classifiers_round_trip_through_checkpoints() {
    let dir = TempDir::new("save");
    let imgs = random_images(3, 18);
    for (label, global_pool, head_batch_norm) in [("finetune", true, false), ("cls", false, false), ("probe", true, true)] {
        let c = classifier(2, 4, global_pool, head_batch_norm, 19);
        widen_head(&c, 20);
        if head_batch_norm {
            // Move the running statistics away from their initial values.
            let mut rngs = sample_rngs(3, 0);
            let mut mode = ForwardMode { train: Some((&mut rngs, 0.0)), trainable: Trainable::Head };
            c.forward_mode(&imgs, &mut mode).unwrap();
            assert_eq!(batches_tracked(&c), 1);
        }
        let path = dir.path().join(format!("{label}.safetensors"));
        save_classifier(&c, Vec::new(), HashMap::new(), &path).unwrap();
        let (loaded, _) = load_classifier(&path, None, &Device::Cpu, Precision::F32, 77).unwrap();
        assert_eq!(loaded.config, c.config, "{label}: config");
        assert_eq!(param_bits(loaded.params()), param_bits(c.params()), "{label}: parameters");
        assert_eq!(bits(&loaded.forward(&imgs).unwrap()), bits(&c.forward(&imgs).unwrap()), "{label}: logits");
        if head_batch_norm {
            for name in ["head.0.running_mean", "head.0.running_var"] {
                assert_eq!(bits(&buffer(&loaded, name)), bits(&buffer(&c, name)), "{label}: {name}");
            }
            assert_eq!(batches_tracked(&loaded), 1);
            assert!(host(&buffer(&loaded, "head.0.running_var")).iter().any(|&v| v != 1.0));
        }
    }

    let mae = MaskedAutoencoder::new(mae_config(2), &Device::Cpu, Precision::F32, 21).unwrap();
    let path = dir.path().join("mae.safetensors");
    save_model(&mae, &path).unwrap();
    let err = load_classifier(&path, None, &Device::Cpu, Precision::F32, 0).err().expect("an MAE checkpoint is not a classifier");
    assert_eq!(err.code, ErrorCode::CheckpointKeys);
}

// ---------------------------------------------------------------- config limits

#[test]
fn classifier_parameter_shapes_are_the_models_own() {
    for (global_pool, head_batch_norm) in [(true, false), (false, false), (false, true), (true, true)] {
        let c = cls_config(2, 5, global_pool, head_batch_norm);
        let m = VitClassifier::new(c.clone(), &Device::Cpu, Precision::F32, 0).unwrap();
        let params: Vec<(String, Vec<usize>)> = m.params().iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect();
        assert_eq!(c.parameter_shapes(), params, "globalPool {global_pool}, headBatchNorm {head_batch_norm}");
        let buffers: Vec<(String, Vec<usize>)> = m.buffers().unwrap().into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect();
        assert_eq!(c.buffer_shapes(), buffers, "globalPool {global_pool}, headBatchNorm {head_batch_norm}");
    }
}

#[test]
fn classifiers_too_large_or_out_of_range_are_refused_before_anything_is_allocated() {
    // 1e9 classes of 1e5-wide features: 400 TB of head, more than the 47-bit address space.
    let wide = ClassifierConfig { embed_dim: 100_000, num_heads: 4, num_classes: 1_000_000_000, ..cls_config(1, 2, true, false) };
    wide.validate().unwrap();
    let e = VitClassifier::new(wide, &Device::Cpu, Precision::F32, 0).err().expect("a 400 TB classifier was built");
    assert_eq!(e.code, ErrorCode::OutOfMemory, "{e}");
    assert!(e.message.contains("the classifier needs 400 TB for its parameters"), "{}", e.message);
    for (field, c) in [("numClasses", ClassifierConfig { num_classes: 1 << 33, ..cls_config(1, 2, true, false) }), ("depth", cls_config(2000, 2, true, false))] {
        let e = VitClassifier::new(c, &Device::Cpu, Precision::F32, 0).err().expect("out of range");
        assert_eq!(e.code, ErrorCode::InvalidConfig, "{field}: {e}");
        assert!(e.message.contains(field), "{}", e.message);
    }
}

#[test]
fn classifier_images_must_be_finite() {
    let m = classifier(1, 3, true, false, 0);
    let mut data = vec![0.25f32; 2 * IMAGE_LEN];
    data[IMAGE_LEN + 5] = f32::INFINITY;
    let e = m.images_to_tensor(&vit_mae_core::HostTensor::new(data, vec![2, CHANNELS, SIDE, SIDE]).unwrap()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidInput);
    assert!(e.message.contains(&format!("value {} (at [1, 0, 0, 5]) is inf", IMAGE_LEN + 5)), "{}", e.message);
}

#[test]
fn a_classifier_checkpoint_that_contradicts_its_config_builds_nothing() {
    // Metadata claiming 3e6-wide features for the tiny fixture's tensors: refused on the
    // first contradicting shape rather than by building the 3e6-wide classifier first.
    let dir = TempDir::new("classifier-contradicting");
    let bytes = std::fs::read(crate::common::fixtures().join("vit-cls-tiny.weights.safetensors")).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut metadata = header.metadata().clone().unwrap_or_default();
    let mut config: serde_json::Value = metadata.get("config").map(|c| serde_json::from_str(c).unwrap()).unwrap_or(json!({}));
    config["embed_dim"] = 3_000_000.into();
    config["num_heads"] = 3.into();
    metadata.insert("config".to_string(), config.to_string());
    let tensors: BTreeMap<String, Tensor> = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap().into_iter().collect();
    let path = dir.join("wide.safetensors");
    std::fs::write(&path, safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata)).unwrap()).unwrap();
    let e = load_classifier(&path, None, &Device::Cpu, Precision::F32, 0).err().expect("the load should fail");
    assert_eq!(e.code, ErrorCode::CheckpointShape, "{e}");
}

/// A fine-tuning step that would make something non-finite stops the run before its
/// update, and the classifier keeps the weights of the last step taken: a NaN image in
/// the third batch (its loss) leaves the weights of two steps, and an absurd learning
/// rate (the update) the initial ones. Both protocols' optimizers (AdamW, LARS), on the
/// engine and on the reference model.
#[test]
fn finetuning_stops_before_a_non_finite_update_with_the_last_good_weights() {
    let poisoned = || {
        let data = Faulty { inner: bright_dark_dataset(16, 12), bad: (0..16).map(|i| (8..12).contains(&i)).collect(), fault: Fault::NanPixel };
        let options = LoaderOptions { batch_size: 4, seed: 0, shuffle: false, drop_last: true, workers: 1, prefetch: 2, skip_corrupt: false, shard: Shard::default() };
        Loader::new(Arc::new(data), augment(), options).unwrap()
    };
    for (protocol, head_batch_norm) in [("finetune", false), ("linprobe", true)] {
        for reference in [false, true] {
            let what = format!("{protocol}, reference {reference}");
            let new_classifier = || {
                let mut c = classifier(1, 2, true, head_batch_norm, 13);
                c.set_reference_only(reference);
                c
            };
            let config = FinetuneConfig::from_json(&json!({ "protocol": protocol, "epochs": 2, "lr": 1e-2, "warmupEpochs": 0 })).unwrap();

            let c = new_classifier();
            let err = run_finetune(&c, &poisoned(), None, &config, None).err().expect("a NaN loss must fail the run");
            assert_eq!(err.code, ErrorCode::NonFiniteLoss, "{what}: {}", err.message);
            assert!(err.message.contains("loss is NaN at step 3"), "{what}: {}", err.message);
            let two_steps = new_classifier();
            let limited = FinetuneConfig { recipe: Recipe { max_steps: Some(2), ..config.recipe.clone() }, ..config.clone() };
            run_finetune(&two_steps, &poisoned(), None, &limited, None).unwrap();
            assert_eq!(param_bits(c.params()), param_bits(two_steps.params()), "{what}: the weights after the error vs two steps");

            let c = new_classifier();
            let initial = param_bits(c.params());
            let absurd = FinetuneConfig { recipe: Recipe { lr: Some(1e39), ..config.recipe.clone() }, ..config.clone() };
            let err = run_finetune(&c, &loader(bright_dark_dataset(16, 12), 4, false, true, 0), None, &absurd, None).err().expect("an overflowing update must fail the run");
            assert_eq!(err.code, ErrorCode::NonFiniteLoss, "{what}: {}", err.message);
            assert!(err.message.contains("at step 1"), "{what}: {}", err.message);
            assert_eq!(param_bits(c.params()), initial, "{what}: the weights after the error vs the initial ones");
        }
    }
}
