//! Pre-training: the learning-rate schedule, the weight-decay groups, AdamW and
//! gradient clipping against hand-computed values, and whole training runs on a
//! tiny in-memory dataset (loss goes down, runs are reproducible, resuming is
//! exact, checkpoints rotate and load, cancelling and non-finite losses behave).
//! Expected values are computed in the tests from the published formulas
//! (`util/lr_sched.py`, `torch.optim.AdamW`, `clip_grad_norm_`), never copied
//! from a run of the code under test.

use candle_core::{Device, Tensor, Var};
use crate::common::{bits, host, plain_augment, Fault, Faulty, SplitMix, TempDir};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vit_mae_core::distributed::Group;
use vit_mae_core::data::{Augment, Dataset, InMemoryDataset, Loader, LoaderOptions, Shard};
use vit_mae_core::optim::{clip_grad_norm, decays, AdamW, AdamWConfig, LrSchedule};
use vit_mae_core::recipe::Recipe;
use vit_mae_core::train::{list_checkpoints, pretrain, PretrainConfig, TrainEvent, TrainSummary};
use vit_mae_core::{load_model, read_state_dict, Precision, ErrorCode, MaeConfig, MaskPlan, MaskedAutoencoder, Masking, Target};

// ---------------------------------------------------------------- helpers

const SIDE: usize = 16;
const CHANNELS: usize = 3;
const BATCH: usize = 8;

/// img 16, patch 4 (4x4 grid), embed 16, depth 1, 2 heads; decoder 8 / 1 / 2.
pub(crate) fn tiny_config() -> MaeConfig {
    MaeConfig {
        img_size: SIDE,
        patch_size: 4,
        in_chans: CHANNELS,
        embed_dim: 16,
        depth: 1,
        num_heads: 2,
        decoder_embed_dim: 8,
        decoder_depth: 1,
        decoder_num_heads: 2,
        mlp_ratio: 4.0,
        target: Target::Pixels,
        layer_norm_eps: 1e-6,
        encoder_mask_token: false,
    }
}

pub(crate) fn tiny_model(seed: u64) -> MaskedAutoencoder {
    MaskedAutoencoder::new(tiny_config(), &Device::Cpu, Precision::F32, seed).expect("valid config")
}

/// `n` random 3x16x16 images in [0, 1]: a random smooth ramp per image and channel
/// plus a little noise, so that visible patches say something about removed ones.
fn image_data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    let mut data = Vec::with_capacity(n * CHANNELS * SIDE * SIDE);
    for _ in 0..n {
        let (gx, gy) = (rng.unit() - 0.5, rng.unit() - 0.5);
        for _ in 0..CHANNELS {
            let base = 0.2 + 0.6 * rng.unit();
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let ramp = gx * (x as f64 / (SIDE - 1) as f64 - 0.5) + gy * (y as f64 / (SIDE - 1) as f64 - 0.5);
                    let v = base + ramp + 0.05 * (rng.unit() - 0.5);
                    data.push(v.clamp(0.0, 1.0) as f32);
                }
            }
        }
    }
    data
}

pub(crate) fn dataset(n: usize, seed: u64) -> InMemoryDataset {
    InMemoryDataset::new(image_data(n, seed), [n, CHANNELS, SIDE, SIDE], None).unwrap()
}

/// No crop, no flip, mean/std 0.5: the loader's only randomness is the epoch order.
pub(crate) fn augment() -> Augment {
    plain_augment(SIDE, CHANNELS, 0.5, 0.5)
}

fn loader_with(data: Arc<dyn Dataset>, seed: u64, shuffle: bool) -> Loader {
    let options = LoaderOptions { batch_size: BATCH, seed, shuffle, drop_last: true, workers: 1, prefetch: 2, skip_corrupt: false, shard: Shard::default() };
    Loader::new(data, augment(), options).unwrap()
}

fn loader(n_images: usize) -> Loader {
    loader_with(Arc::new(dataset(n_images, 1234)), 5, true)
}

/// A short run with a warm-up so the rate changes from step to step.
fn base_config() -> PretrainConfig {
    with_recipe(&PretrainConfig::default(), |r| Recipe { epochs: 10.0, lr: Some(2e-3), min_lr: 1e-5, warmup_epochs: 1.0, seed: 3, ..r })
}

/// `config` with the recipe `f` makes of its own.
fn with_recipe(config: &PretrainConfig, f: impl FnOnce(Recipe) -> Recipe) -> PretrainConfig {
    PretrainConfig { recipe: f(config.recipe.clone()), ..config.clone() }
}

fn run(
    model: &mut MaskedAutoencoder,
    loader: &Loader,
    config: &PretrainConfig,
    resume: Option<&Path>,
) -> vit_mae_core::Result<(TrainSummary, Vec<TrainEvent>)> {
    let mut events = Vec::new();
    let cancel = AtomicBool::new(false);
    let summary = pretrain(model, loader, config, resume, &Group::single(), &mut |e| events.push(e), &cancel)?;
    Ok((summary, events))
}

/// Every parameter's f32 bit patterns, by name.
fn param_bits(model: &MaskedAutoencoder) -> Vec<(String, Vec<u32>)> {
    model
        .params()
        .iter()
        .map(|(name, var)| {
            let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (name.clone(), values.iter().map(|v| v.to_bits()).collect())
        })
        .collect()
}

fn assert_same_weights(a: &MaskedAutoencoder, b: &MaskedAutoencoder, what: &str) {
    let (a, b) = (param_bits(a), param_bits(b));
    assert_eq!(a.len(), b.len(), "{what}: parameter counts differ");
    for ((name_a, bits_a), (name_b, bits_b)) in a.iter().zip(&b) {
        assert_eq!(name_a, name_b, "{what}: parameter order differs");
        let differing = bits_a.iter().zip(bits_b).filter(|(x, y)| x != y).count();
        assert_eq!(differing, 0, "{what}: {name_a} differs in {differing} of {} values", bits_a.len());
    }
}

fn step_events(events: &[TrainEvent]) -> Vec<(usize, u64, u64, f64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step { epoch, step, total_steps, loss, lr, .. } => Some((*epoch, *step, *total_steps, *loss, *lr)),
            _ => None,
        })
        .collect()
}

fn checkpoint_file(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("checkpoint-{step:08}.safetensors"))
}

/// Whether `message` mentions "step {n}" with no further digit after it.
fn names_step(message: &str, n: u64) -> bool {
    let needle = format!("step {n}");
    message.match_indices(&needle).any(|(at, _)| !message[at + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// `util/lr_sched.py`, written out here.
fn published_lr(lr: f64, min_lr: f64, warmup: f64, epochs: f64, epoch: f64) -> f64 {
    if epoch < warmup {
        lr * epoch / warmup
    } else {
        min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * (epoch - warmup) / (epochs - warmup)).cos())
    }
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-300
}

// ---------------------------------------------------------------- schedule

#[test]
fn lr_schedule_matches_published_formula() {
    let cases = [(1e-3, 1e-5, 5.0, 40.0), (2.4e-3, 0.0, 40.0, 400.0), (1.5e-4, 1e-6, 0.5, 3.0)];
    for (lr, min_lr, warmup, epochs) in cases {
        let s = LrSchedule { lr, min_lr, warmup_epochs: warmup, epochs };
        let mid = (warmup + epochs) / 2.0;
        let points = [0.0, warmup / 2.0, warmup * 0.999, warmup, warmup + 0.37, mid, epochs - 0.01, epochs];
        for epoch in points {
            let want = published_lr(lr, min_lr, warmup, epochs, epoch);
            let got = s.at(epoch);
            assert!(close(got, want, 1e-12), "{s:?} at {epoch}: got {got}, want {want}");
        }
        // Landmarks of the formula, independently of it.
        assert_eq!(s.at(0.0), 0.0);
        assert!(close(s.at(warmup / 2.0), lr / 2.0, 1e-12));
        assert!(close(s.at(warmup), lr, 1e-12), "the peak is reached at the end of warm-up");
        assert!(close(s.at(mid), (lr + min_lr) / 2.0, 1e-12), "half-way through the cosine");
        assert!((s.at(epochs) - min_lr).abs() <= 1e-12 * lr, "the end is min_lr: {}", s.at(epochs));
        // Monotone: up during warm-up, down after.
        let ramp: Vec<f64> = (0..=20).map(|k| s.at(warmup * k as f64 / 20.0)).collect();
        assert!(ramp.windows(2).all(|w| w[0] < w[1]), "warm-up rises");
        let decay: Vec<f64> = (0..=20).map(|k| s.at(warmup + (epochs - warmup) * k as f64 / 20.0)).collect();
        assert!(decay.windows(2).all(|w| w[0] >= w[1]), "cosine falls");
    }
    // No warm-up: the peak at epoch 0.
    let s = LrSchedule { lr: 1e-3, min_lr: 0.0, warmup_epochs: 0.0, epochs: 10.0 };
    assert!(close(s.at(0.0), 1e-3, 1e-12));
    assert!(close(s.at(5.0), 5e-4, 1e-12));
}

#[test]
fn peak_lr_scales_blr_by_effective_batch() {
    let c = PretrainConfig::default().recipe;
    assert_eq!(c.blr, 1.5e-4, "published blr");
    assert!(close(c.peak_lr(64), 1.5e-4 * 64.0 / 256.0, 1e-15));
    assert!(close(c.peak_lr(256), 1.5e-4, 1e-15));
    let c = Recipe { blr: 1e-3, accum_iter: 4, ..PretrainConfig::default().recipe };
    assert!(close(c.peak_lr(32), 1e-3 * 32.0 * 4.0 / 256.0, 1e-15));
    let c = Recipe { blr: 1e-3, accum_iter: 4, lr: Some(7e-4), ..PretrainConfig::default().recipe };
    assert_eq!(c.peak_lr(32), 7e-4, "an absolute lr overrides blr");
    assert_eq!(c.peak_lr(4096), 7e-4);
}

// ---------------------------------------------------------------- weight decay groups

#[test]
fn weight_decay_groups_follow_timm() {
    let config = MaeConfig { depth: 2, ..tiny_config() };
    let model = MaskedAutoencoder::new(config, &Device::Cpu, Precision::F32, 0).unwrap();
    let optimizer = AdamW::new(model.params(), AdamWConfig::default()).unwrap();
    let (decay, no_decay) = optimizer.groups();

    let mut want_decay = Vec::new();
    let mut want_no_decay = Vec::new();
    for (name, var) in model.params() {
        if var.dims().len() <= 1 || name.ends_with(".bias") {
            want_no_decay.push(name.as_str());
        } else {
            want_decay.push(name.as_str());
        }
    }
    assert_eq!(decay, want_decay);
    assert_eq!(no_decay, want_no_decay);

    let decay: BTreeSet<&str> = decay.into_iter().collect();
    let no_decay: BTreeSet<&str> = no_decay.into_iter().collect();
    assert!(decay.is_disjoint(&no_decay));
    assert_eq!(decay.len() + no_decay.len(), model.params().len());

    for name in ["cls_token", "mask_token", "patch_embed.proj.weight", "decoder_embed.weight", "decoder_pred.weight"] {
        assert!(decay.contains(name), "{name} must decay");
    }
    for (prefix, blocks) in [("blocks", 2), ("decoder_blocks", 1)] {
        for i in 0..blocks {
            for linear in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"] {
                assert!(decay.contains(format!("{prefix}.{i}.{linear}.weight").as_str()), "{prefix}.{i}.{linear}.weight must decay");
                assert!(no_decay.contains(format!("{prefix}.{i}.{linear}.bias").as_str()), "{prefix}.{i}.{linear}.bias must not");
            }
            for norm in ["norm1", "norm2"] {
                for kind in ["weight", "bias"] {
                    assert!(no_decay.contains(format!("{prefix}.{i}.{norm}.{kind}").as_str()), "{prefix}.{i}.{norm}.{kind} must not decay");
                }
            }
        }
    }
    for name in ["norm.weight", "norm.bias", "decoder_norm.weight", "decoder_norm.bias", "patch_embed.proj.bias", "decoder_embed.bias", "decoder_pred.bias"] {
        assert!(no_decay.contains(name), "{name} must not decay");
    }
    assert!(decay.iter().all(|n| !n.ends_with(".bias")));
    // Counts from the architecture: 2 tokens + patch weight + 4 linears a block + 2 decoder linears.
    assert_eq!(decay.len(), 3 + 4 * 2 + 2 + 4);
    assert_eq!(no_decay.len(), 7 + 8 * (2 + 1));

    assert!(!decays("x.bias", &[4, 4]), "a 2-D bias is exempt by name");
    assert!(!decays("x.weight", &[4]), "1-D is exempt");
    assert!(!decays("scalar", &[]), "0-D is exempt");
    assert!(decays("cls_token", &[1, 1, 16]));
    assert!(decays("x.weight", &[4, 4]));
}

// ---------------------------------------------------------------- AdamW

/// `torch.optim.AdamW`'s update of one element sequence, in f64.
struct RefAdamW {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl RefAdamW {
    fn new(p: &[f64]) -> Self {
        RefAdamW { p: p.to_vec(), m: vec![0.0; p.len()], v: vec![0.0; p.len()], t: 0 }
    }

    fn step(&mut self, g: &[f64], lr: f64, b1: f64, b2: f64, eps: f64, wd: f64) {
        self.t += 1;
        let bc1 = 1.0 - b1.powi(self.t);
        let bc2 = 1.0 - b2.powi(self.t);
        for i in 0..self.p.len() {
            self.p[i] *= 1.0 - lr * wd;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let denom = self.v[i].sqrt() / bc2.sqrt() + eps;
            self.p[i] -= lr / bc1 * self.m[i] / denom;
        }
    }
}

fn var(values: &[f64], shape: &[usize]) -> Var {
    let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
}

fn tensor(values: &[f64], shape: &[usize]) -> Tensor {
    let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

#[test]
fn adamw_matches_hand_computed_torch_update() {
    // Values exactly representable in f32, so the reference starts from the same numbers.
    let p0 = [0.75, -1.25, 2.0, -0.5, 1.5, 0.875];
    // Includes a zero gradient (only decay moves it) and one small enough that eps
    // matters (eps is added after the square root).
    let g1 = [0.125, -0.25, 0.5, 0.0, 1e-8, -2.0];
    let g2 = [-0.0625, -0.375, 0.25, 0.5, 1e-8, 1.0];
    let (lr1, lr2) = (0.1, 0.05);
    let config = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 };
    let shape = [2, 3];

    // Decays (2-D, not a bias); exempt by name (2-D "x.bias"); exempt by rank (1-D).
    let w = var(&p0, &shape);
    let b = var(&p0, &shape);
    let n = var(&p0, &[6]);
    let params = vec![("x.weight".to_string(), w.clone()), ("x.bias".to_string(), b.clone()), ("norm.weight".to_string(), n.clone())];
    let mut optimizer = AdamW::new(&params, config).unwrap();
    let (decay, no_decay) = optimizer.groups();
    assert_eq!(decay, vec!["x.weight"]);
    assert_eq!(no_decay, vec!["x.bias", "norm.weight"]);

    let mut want_w = RefAdamW::new(&p0);
    let mut want_b = RefAdamW::new(&p0);
    for (g, lr) in [(&g1, lr1), (&g2, lr2)] {
        let grads = vec![tensor(g, &shape), tensor(g, &shape), tensor(g, &[6])];
        optimizer.step(&grads, lr).unwrap();
        want_w.step(g, lr, 0.9, 0.95, 1e-8, 0.05);
        want_b.step(g, lr, 0.9, 0.95, 1e-8, 0.0);
    }
    assert_eq!(optimizer.step, 2);

    for (label, got, want) in [
        ("x.weight", host(w.as_tensor()), &want_w),
        ("x.bias", host(b.as_tensor()), &want_b),
        ("norm.weight", host(n.as_tensor()), &want_b),
    ] {
        for i in 0..p0.len() {
            assert!(
                close(got[i], want.p[i], 1e-6),
                "{label}[{i}]: got {}, torch AdamW gives {} (start {}, grads {}, {})",
                got[i],
                want.p[i],
                p0[i],
                g1[i],
                g2[i]
            );
        }
    }
    // The weight really was decayed and the others not: the two references differ by
    // far more than the tolerance.
    for i in 0..p0.len() {
        assert!((want_w.p[i] - want_b.p[i]).abs() > 1e-4);
    }

    // The moments, as a checkpoint would save them.
    for (name, m, v) in optimizer.state() {
        let (m, v) = (host(m), host(v));
        for i in 0..p0.len() {
            assert!(close(m[i], want_w.m[i], 1e-5) || (m[i] - want_w.m[i]).abs() < 1e-12, "{name} exp_avg[{i}]: {} vs {}", m[i], want_w.m[i]);
            assert!(close(v[i], want_w.v[i], 1e-5) || (v[i] - want_w.v[i]).abs() < 1e-20, "{name} exp_avg_sq[{i}]: {} vs {}", v[i], want_w.v[i]);
        }
    }
}

// ---------------------------------------------------------------- clipping

fn sum_of_squares(grads: &[Tensor]) -> f64 {
    grads.iter().flat_map(host).map(|x| x * x).sum()
}

#[test]
fn clip_grad_norm_scales_to_max_norm() {
    let a: Vec<f64> = (0..12).map(|i| (i as f64 - 5.5) * 0.3).collect();
    let b = [3.0, -4.0, 0.5, 0.0, 2.25];
    let original = vec![tensor(&a, &[3, 4]), tensor(&b, &[5])];
    let norm = sum_of_squares(&original).sqrt();

    // Above (far and slightly): clipped to max_norm, direction kept.
    for fraction in [1.0 / 3.0, 0.8, 0.99] {
        let max_norm = norm * fraction;
        let mut grads = original.clone();
        let returned = clip_grad_norm(&mut grads, max_norm).unwrap();
        assert!(close(returned, norm, 1e-6), "returned {returned}, norm {norm}");
        let after = sum_of_squares(&grads).sqrt();
        assert!((after - max_norm).abs() <= 1e-4, "norm after clipping {after}, max {max_norm}");
        let factor = max_norm / norm;
        for (g, o) in grads.iter().zip(&original) {
            for (x, y) in host(g).iter().zip(host(o)) {
                assert!((x - y * factor).abs() <= 1e-6 * (1.0 + y.abs()), "{x} is not {y} * {factor}");
            }
            assert_eq!(g.dims(), o.dims());
        }
    }

    // Below: untouched, bit for bit.
    let mut grads = original.clone();
    let returned = clip_grad_norm(&mut grads, norm * 2.0).unwrap();
    assert!(close(returned, norm, 1e-6));
    for (g, o) in grads.iter().zip(&original) {
        let (g, o) = (host(g), host(o));
        assert!(g.iter().zip(&o).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

// ---------------------------------------------------------------- training runs

#[test]
fn loss_decreases() {
    check_loss_decreases(Precision::F32);
}

/// Mixed precision trains too: f32 master weights move, the loss falls.
#[test]
fn loss_decreases_in_bf16() {
    check_loss_decreases(Precision::Bf16);
}

fn check_loss_decreases(precision: Precision) {
    let loader = loader(32);
    let mut model = MaskedAutoencoder::new(tiny_config(), &Device::Cpu, precision, 11).unwrap();
    let config = with_recipe(&base_config(), |r| Recipe { lr: Some(5e-3), warmup_epochs: 0.5, epochs: 100.0, max_steps: Some(30), ..r });
    let (summary, events) = run(&mut model, &loader, &config, None).unwrap();
    assert_eq!(summary.steps, 30);
    assert!(!summary.aborted);
    let losses: Vec<f64> = step_events(&events).iter().map(|s| s.3).collect();
    assert_eq!(losses.len(), 30);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0));
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[27..].iter().sum::<f64>() / 3.0;
    assert!(last < 0.9 * first, "loss did not decrease: first three {:?}, last three {:?}", &losses[..3], &losses[27..]);
    assert_eq!(summary.final_loss, losses[29]);
}

#[test]
fn runs_are_reproducible_and_mask_seed_matters() {
    let loader = loader(32);
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(10), ..r });
    let mut a = tiny_model(21);
    let mut b = tiny_model(21);
    let initial = param_bits(&a);
    let (sa, ea) = run(&mut a, &loader, &config, None).unwrap();
    let (sb, eb) = run(&mut b, &loader, &config, None).unwrap();
    assert_eq!(sa.steps, 10);
    assert_eq!(sb.steps, 10);
    assert_ne!(param_bits(&a), initial, "training changed nothing");
    assert_same_weights(&a, &b, "same seeds");
    let losses = |e: &[TrainEvent]| step_events(e).iter().map(|s| s.3.to_bits()).collect::<Vec<_>>();
    assert_eq!(losses(&ea), losses(&eb));

    let mut c = tiny_model(21);
    let (sc, _) = run(&mut c, &loader, &with_recipe(&config, |r| Recipe { seed: r.seed + 1, ..r }), None).unwrap();
    assert_eq!(sc.steps, 10);
    assert_ne!(param_bits(&c), param_bits(&a), "another mask seed gave the same weights");

    // And another loader seed (data order) too.
    let mut d = tiny_model(21);
    let other_order = loader_with(Arc::new(dataset(32, 1234)), 6, true);
    run(&mut d, &other_order, &config, None).unwrap();
    assert_ne!(param_bits(&d), param_bits(&a), "another data order gave the same weights");
}

/// Straight for `2n` steps vs `n` steps, then a fresh model resumed to `2n`.
fn check_exact_resume(n_images: usize, accum_iter: usize, n: u64, clip_grad: Option<f64>) {
    let what = format!("{n_images} images, accum {accum_iter}, resume at {n}");
    let loader = loader(n_images);
    let straight_dir = TempDir::new("straight");
    let split_dir = TempDir::new("split");
    let config = with_recipe(&base_config(), |r| Recipe { accum_iter, clip_grad, epochs: 6.0, ..r });

    let mut straight = tiny_model(31);
    let (s, straight_events) =
        run(&mut straight, &loader, &with_recipe(&config, |r| Recipe { max_steps: Some(2 * n), checkpoint_dir: Some(straight_dir.path().into()), ..r }), None)
            .unwrap();
    assert_eq!(s.steps, 2 * n, "{what}");

    let mut first = tiny_model(31);
    let split = with_recipe(&config, |r| Recipe { max_steps: Some(n), checkpoint_dir: Some(split_dir.path().into()), ..r });
    let (s, _) = run(&mut first, &loader, &split, None).unwrap();
    assert_eq!(s.steps, n, "{what}");
    assert_eq!(s.last_checkpoint.as_deref(), Some(checkpoint_file(split_dir.path(), n).as_path()), "{what}");
    assert_ne!(param_bits(&first), param_bits(&straight), "{what}: the second half changed nothing");

    let mut resumed = tiny_model(31);
    let rest = with_recipe(&split, |r| Recipe { max_steps: Some(2 * n), ..r });
    let (s, resumed_events) = run(&mut resumed, &loader, &rest, Some(split_dir.path())).unwrap();
    assert_eq!(s.steps, 2 * n, "{what}");
    assert_same_weights(&resumed, &straight, &what);

    // The resumed steps saw the same losses and rates as the straight run's.
    let tail: Vec<_> = step_events(&straight_events).into_iter().filter(|e| e.1 > n).collect();
    let resumed_steps = step_events(&resumed_events);
    assert_eq!(resumed_steps.len(), tail.len(), "{what}");
    for (a, b) in resumed_steps.iter().zip(&tail) {
        assert_eq!((a.0, a.1, a.2), (b.0, b.1, b.2), "{what}");
        assert_eq!(a.3.to_bits(), b.3.to_bits(), "{what}: loss at step {}", a.1);
        assert_eq!(a.4.to_bits(), b.4.to_bits(), "{what}: lr at step {}", a.1);
    }
    // Both runs end with the same checkpoint bytes' weights.
    let (a, _) = load_model(&checkpoint_file(straight_dir.path(), 2 * n), None, &Device::Cpu, Precision::F32, 0).unwrap();
    let (b, _) = load_model(&checkpoint_file(split_dir.path(), 2 * n), None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert_same_weights(&a, &b, &what);
}

#[test]
fn resume_is_exact_mid_epoch() {
    // 40 images, batch 8: 5 batches an epoch; 3 is mid-epoch and 6 crosses the boundary.
    check_exact_resume(40, 1, 3, None);
}

#[test]
fn resume_is_exact_at_epoch_boundary() {
    check_exact_resume(40, 1, 5, None);
}

#[test]
fn resume_is_exact_with_accumulation_and_clipping() {
    // 5 batches, accum 2: 2 steps an epoch (the fifth batch is left over); step 3 is
    // mid-epoch 1, after its first two micro-batches.
    check_exact_resume(40, 2, 3, Some(0.5));
}

/// The gradient that reaches AdamW, read back from the first moment in the step-1
/// checkpoint (`exp_avg = (1 - beta1) * g` after one step), against the gradient of the
/// mean loss over both micro-batches computed here in one forward pass of 16 images.
/// Grid masking makes the masks independent of the step and the micro-batch.
#[test]
fn accumulated_and_clipped_gradient_reaches_the_optimizer() {
    let loader = loader(32);
    // The first two batches of epoch 0: the two micro-batches of step 1.
    let batches: Vec<_> = loader.epoch(0, 0).take(2).map(|b| b.unwrap()).collect();
    let mut pixels = batches[0].images.clone();
    pixels.extend_from_slice(&batches[1].images);
    let imgs = Tensor::from_vec(pixels, (2 * BATCH, CHANNELS, SIDE, SIDE), &Device::Cpu).unwrap();
    // Keep the top-left patch of every 2x2 cell of the 4x4 grid.
    let grid = SIDE / 4;
    let (kept, removed): (Vec<u32>, Vec<u32>) = (0..(grid * grid) as u32).partition(|&l| (l as usize / grid) % 2 == 0 && (l as usize % grid) % 2 == 0);
    let order: Vec<u32> = kept.iter().chain(&removed).copied().collect();
    let plan = MaskPlan { ids_shuffle: vec![order; 2 * BATCH], len_keep: kept.len() };
    let reference = tiny_model(81);
    let out = reference.forward_with_plan(&imgs, &plan).unwrap();
    let want: Vec<(String, Vec<f64>)> = reference.gradients(&out).unwrap().into_iter().map(|(n, g)| (n, host(&g))).collect();
    let norm = want.iter().flat_map(|(_, g)| g.iter()).map(|x| x * x).sum::<f64>().sqrt();
    assert!(norm > 1e-3, "gradient norm {norm}");

    // Unclipped, then clipped to a quarter of the norm (torch: max_norm / (norm + 1e-6)).
    for (clip_grad, factor) in [(None, 1.0), (Some(norm / 4.0), (norm / 4.0) / (norm + 1e-6))] {
        let dir = TempDir::new("grad");
        let config = PretrainConfig {
            masking: Masking::Grid,
            mask_ratio: 0.75,
            ..with_recipe(&base_config(), |r| Recipe { accum_iter: 2, clip_grad, max_steps: Some(1), checkpoint_dir: Some(dir.path().into()), ..r })
        };
        let mut model = tiny_model(81);
        run(&mut model, &loader, &config, None).unwrap();
        let state = read_state_dict(&checkpoint_file(dir.path(), 1)).unwrap();
        let mut diff2 = 0.0;
        let mut got_norm2 = 0.0;
        for (name, g) in &want {
            let m = state.tensors.get(&format!("optim.exp_avg.{name}")).unwrap_or_else(|| panic!("no exp_avg for {name}"));
            let got: Vec<f64> = host(m).iter().map(|x| x / (1.0 - config.recipe.beta1)).collect();
            assert_eq!(got.len(), g.len());
            for (a, b) in got.iter().zip(g) {
                diff2 += (a - b * factor).powi(2);
                got_norm2 += a * a;
            }
        }
        let rel = diff2.sqrt() / (norm * factor);
        assert!(rel < 1e-4, "clip {clip_grad:?}: optimizer gradient differs from the 16-image gradient by {rel} (relative)");
        assert!(close(got_norm2.sqrt(), norm * factor, 1e-4), "clip {clip_grad:?}: norm {} vs {}", got_norm2.sqrt(), norm * factor);
    }
}

#[test]
fn checkpoints_rotate_and_load_as_models() {
    let loader = loader(32);
    let dir = TempDir::new("rotate");
    let mut model = tiny_model(41);
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(7), checkpoint_every: 1, keep_last: 3, checkpoint_dir: Some(dir.path().into()), ..r });
    let (summary, events) = run(&mut model, &loader, &config, None).unwrap();
    assert_eq!(summary.steps, 7);

    let names = dir.entries();
    assert_eq!(names.len(), 3, "{names:?}");
    for name in &names {
        let digits = name.strip_prefix("checkpoint-").and_then(|r| r.strip_suffix(".safetensors"));
        assert!(digits.is_some_and(|d| d.len() == 8 && d.bytes().all(|c| c.is_ascii_digit())), "unexpected file {name}");
    }
    let want: Vec<String> = (5..=7).map(|s| format!("checkpoint-{s:08}.safetensors")).collect();
    assert_eq!(names, want, "the three most recent are kept");
    assert_eq!(list_checkpoints(dir.path()), (5..=7).map(|s| checkpoint_file(dir.path(), s)).collect::<Vec<_>>());
    assert_eq!(summary.last_checkpoint, Some(checkpoint_file(dir.path(), 7)));
    let written: Vec<u64> = events.iter().filter_map(|e| if let TrainEvent::Checkpoint { step, .. } = e { Some(*step) } else { None }).collect();
    assert_eq!(written, (1..=7).collect::<Vec<_>>());

    // A training checkpoint is also a model: the optimizer state is left aside.
    let (loaded, report) = load_model(&checkpoint_file(dir.path(), 7), None, &Device::Cpu, Precision::F32, 999).unwrap();
    assert!(!report.fresh_decoder);
    assert_eq!(loaded.config, tiny_config());
    assert_same_weights(&loaded, &model, "checkpoint vs trained model");
    // And an older one is not the final model.
    let (older, _) = load_model(&checkpoint_file(dir.path(), 6), None, &Device::Cpu, Precision::F32, 999).unwrap();
    assert_ne!(param_bits(&older), param_bits(&model));
}

#[test]
fn cancel_stops_after_the_step_and_leaves_a_resumable_checkpoint() {
    let loader = loader(32); // 4 batches an epoch
    let dir = TempDir::new("abort");
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(8), checkpoint_dir: Some(dir.path().into()), ..r });

    let mut model = tiny_model(51);
    let cancel = AtomicBool::new(false);
    let mut steps = Vec::new();
    let mut checkpoints = Vec::new();
    let summary = pretrain(
        &mut model,
        &loader,
        &config,
        None,
        &Group::single(),
        &mut |e| match e {
            TrainEvent::Step { step, .. } => {
                steps.push(step);
                if step == 3 {
                    cancel.store(true, Ordering::SeqCst);
                }
            }
            TrainEvent::Checkpoint { step, path } => checkpoints.push((step, path)),
            _ => {}
        },
        &cancel,
    )
    .unwrap();
    assert!(summary.aborted);
    assert_eq!(summary.steps, 3);
    assert_eq!(steps, vec![1, 2, 3], "no step after the cancel");
    let ckpt = checkpoint_file(dir.path(), 3);
    assert!(ckpt.is_file());
    assert_eq!(checkpoints, vec![(3, ckpt.clone())]);
    assert_eq!(summary.last_checkpoint, Some(ckpt.clone()));
    let (saved, _) = load_model(&ckpt, None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert_same_weights(&saved, &model, "abort checkpoint vs model");

    // Resuming the aborted run finishes exactly as a run that was never stopped.
    let mut resumed = tiny_model(51);
    let (s, _) = run(&mut resumed, &loader, &config, Some(&ckpt)).unwrap();
    assert_eq!(s.steps, 8);
    assert!(!s.aborted);
    let mut straight = tiny_model(51);
    run(&mut straight, &loader, &with_recipe(&config, |r| Recipe { checkpoint_dir: None, ..r }), None).unwrap();
    assert_same_weights(&resumed, &straight, "aborted + resumed vs straight");

    // A cancel that arrives with the last step does not make a finished run "aborted".
    let mut last = tiny_model(51);
    let cancel = AtomicBool::new(false);
    let short = with_recipe(&config, |r| Recipe { max_steps: Some(3), checkpoint_dir: None, ..r });
    let summary = pretrain(
        &mut last,
        &loader,
        &short,
        None,
        &Group::single(),
        &mut |e| {
            if let TrainEvent::Step { step: 3, .. } = e {
                cancel.store(true, Ordering::SeqCst)
            }
        },
        &cancel,
    )
    .unwrap();
    assert_eq!(summary.steps, 3);
    assert!(!summary.aborted);
}

#[test]
fn non_finite_loss_stops_with_the_step_and_last_checkpoint() {
    let n = 32;
    let poisoned = |which: &dyn Fn(usize) -> bool| -> Arc<dyn Dataset> {
        Arc::new(Faulty { inner: dataset(n, 77), bad: (0..n).map(which).collect(), fault: Fault::NanPixel })
    };

    // Every image has a NaN: step 1 fails, and there is no checkpoint to name.
    let dir = TempDir::new("nan-fresh");
    let mut model = tiny_model(61);
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(5), checkpoint_every: 1, checkpoint_dir: Some(dir.path().into()), ..r });
    let err = run(&mut model, &loader_with(poisoned(&|_| true), 5, true), &config, None).unwrap_err();
    assert_eq!(err.code, ErrorCode::NonFiniteLoss, "{err}");
    assert!(names_step(&err.message, 1), "message should name step 1: {}", err.message);
    assert!(!err.message.contains(".safetensors"), "no checkpoint exists: {}", err.message);
    assert!(dir.entries().is_empty(), "nothing may be written: {:?}", dir.entries());

    // Only the second batch (in dataset order) is bad: step 1 trains and is saved,
    // step 2 fails and names that checkpoint.
    let dir = TempDir::new("nan-second");
    let mut model = tiny_model(61);
    let config = with_recipe(&config, |r| Recipe { checkpoint_dir: Some(dir.path().into()), ..r });
    let err = run(&mut model, &loader_with(poisoned(&|i| (BATCH..2 * BATCH).contains(&i)), 5, false), &config, None).unwrap_err();
    assert_eq!(err.code, ErrorCode::NonFiniteLoss, "{err}");
    assert!(names_step(&err.message, 2), "message should name step 2: {}", err.message);
    let first = checkpoint_file(dir.path(), 1);
    assert!(err.message.contains(&first.display().to_string()), "message should name {}: {}", first.display(), err.message);
    assert_eq!(dir.entries(), vec!["checkpoint-00000001.safetensors".to_string()]);

    // Resuming a good checkpoint onto bad data: the error names the next step and the
    // checkpoint, and the checkpoint folder is left exactly as it was.
    let dir = TempDir::new("nan-resume");
    let mut good = tiny_model(61);
    let config = with_recipe(&config, |r| Recipe { max_steps: Some(2), checkpoint_dir: Some(dir.path().into()), ..r });
    run(&mut good, &loader_with(Arc::new(dataset(n, 77)), 5, true), &config, None).unwrap();
    let saved = checkpoint_file(dir.path(), 2);
    let before_names = dir.entries();
    let before_bytes = std::fs::read(&saved).unwrap();

    let mut resumed = tiny_model(61);
    let more = with_recipe(&config, |r| Recipe { max_steps: Some(6), ..r });
    let err = run(&mut resumed, &loader_with(poisoned(&|_| true), 5, true), &more, Some(dir.path())).unwrap_err();
    assert_eq!(err.code, ErrorCode::NonFiniteLoss, "{err}");
    assert!(names_step(&err.message, 3), "message should name step 3: {}", err.message);
    assert!(err.message.contains(&saved.display().to_string()), "message should name {}: {}", saved.display(), err.message);
    assert_eq!(dir.entries(), before_names, "no checkpoint may be written or removed");
    assert_eq!(std::fs::read(&saved).unwrap(), before_bytes, "the last good checkpoint must be intact");
    // The failed step left the weights as they were restored.
    assert_same_weights(&resumed, &good, "weights after the failed step");
}

/// Checks one run's events against what its settings imply.
fn check_events(n_images: usize, accum_iter: usize, epochs: f64, max_steps: Option<u64>, checkpoint_every: u64) {
    let what = format!("{n_images} images, accum {accum_iter}, {epochs} epochs, max {max_steps:?}, every {checkpoint_every}");
    let loader = loader(n_images);
    let dir = TempDir::new("events");
    let config = with_recipe(&base_config(), |r| Recipe {
        accum_iter,
        epochs,
        max_steps,
        checkpoint_every,
        keep_last: 2,
        lr: None,
        blr: 1e-3,
        min_lr: 1e-6,
        warmup_epochs: 1.0,
        checkpoint_dir: Some(dir.path().into()),
        ..r
    });
    let batches = n_images / BATCH;
    let steps_per_epoch = (batches / accum_iter) as u64;
    let total = ((steps_per_epoch as f64 * epochs).round() as u64).min(max_steps.unwrap_or(u64::MAX));
    let peak = 1e-3 * (BATCH * accum_iter) as f64 / 256.0;

    let mut model = tiny_model(71);
    let cancel = AtomicBool::new(false);
    let mut events = Vec::new();
    let summary = pretrain(
        &mut model,
        &loader,
        &config,
        None,
        &Group::single(),
        &mut |e| {
            if let TrainEvent::Checkpoint { path, .. } = &e {
                assert!(path.is_file(), "checkpoint event names a missing file {}", path.display());
            }
            events.push(e);
        },
        &cancel,
    )
    .unwrap();

    let steps = step_events(&events);
    assert_eq!(steps.len() as u64, total, "{what}");
    for (k, &(epoch, step, total_steps, loss, lr)) in steps.iter().enumerate() {
        assert_eq!(step, k as u64 + 1, "{what}: steps count up by one");
        assert_eq!(total_steps, total, "{what}");
        assert!(loss.is_finite() && loss > 0.0, "{what}: loss {loss}");
        let e = (step - 1) / steps_per_epoch;
        assert_eq!(epoch as u64, e, "{what}: epoch of step {step}");
        // The rate is set at the step's first micro-batch: epoch + batch / batches.
        let first_batch = ((step - 1) % steps_per_epoch) as usize * accum_iter;
        let want = published_lr(peak, 1e-6, 1.0, epochs, e as f64 + first_batch as f64 / batches as f64);
        assert!(lr.is_finite() && close(lr, want, 1e-9), "{what}: lr at step {step} is {lr}, want {want}");
    }

    let completed = (total / steps_per_epoch) as usize;
    let epoch_ends: Vec<(usize, f64)> =
        events.iter().filter_map(|e| if let TrainEvent::EpochEnd { epoch, mean_loss } = e { Some((*epoch, *mean_loss)) } else { None }).collect();
    assert_eq!(epoch_ends.iter().map(|e| e.0).collect::<Vec<_>>(), (0..completed).collect::<Vec<_>>(), "{what}: one EpochEnd per completed epoch");
    for &(epoch, mean_loss) in &epoch_ends {
        let losses: Vec<f64> = steps.iter().filter(|s| s.0 == epoch).map(|s| s.3).collect();
        assert_eq!(losses.len() as u64, steps_per_epoch);
        let want = losses.iter().sum::<f64>() / losses.len() as f64;
        assert!(close(mean_loss, want, 1e-12), "{what}: epoch {epoch} mean {mean_loss}, want {want}");
    }
    // Each EpochEnd follows the epoch's last step.
    for (i, e) in events.iter().enumerate() {
        if let TrainEvent::EpochEnd { epoch, .. } = e {
            let previous = events[..i].iter().rev().find_map(|e| if let TrainEvent::Step { step, .. } = e { Some(*step) } else { None });
            assert_eq!(previous, Some((*epoch as u64 + 1) * steps_per_epoch), "{what}");
        }
    }

    // Checkpoints every `checkpoint_every` steps and at the end, named by step.
    let mut want_ckpt: Vec<u64> = (1..=total).filter(|s| checkpoint_every > 0 && s % checkpoint_every == 0).collect();
    if want_ckpt.last() != Some(&total) {
        want_ckpt.push(total);
    }
    let ckpts: Vec<(u64, PathBuf)> =
        events.iter().filter_map(|e| if let TrainEvent::Checkpoint { step, path } = e { Some((*step, path.clone())) } else { None }).collect();
    assert_eq!(ckpts.iter().map(|c| c.0).collect::<Vec<_>>(), want_ckpt, "{what}");
    for (step, path) in &ckpts {
        assert_eq!(path, &checkpoint_file(dir.path(), *step), "{what}");
    }
    let kept: Vec<PathBuf> = want_ckpt.iter().rev().take(2).rev().map(|&s| checkpoint_file(dir.path(), s)).collect();
    assert_eq!(list_checkpoints(dir.path()), kept, "{what}");

    assert_eq!(summary.steps, total, "{what}");
    assert_eq!(summary.epochs_completed, completed, "{what}");
    assert_eq!(summary.images_seen, total * (accum_iter * BATCH) as u64, "{what}");
    assert_eq!(summary.final_loss.to_bits(), steps.last().unwrap().3.to_bits(), "{what}");
    assert_eq!(summary.last_checkpoint, Some(checkpoint_file(dir.path(), total)), "{what}");
    assert!(!summary.aborted);
    assert_eq!(summary.skipped_images, 0);
}

#[test]
fn events_describe_the_run() {
    // 5 batches, accum 2: 2 steps an epoch, 3 epochs, all of them.
    check_events(40, 2, 3.0, None, 2);
    // Stopped by max_steps mid-epoch 2.
    check_events(40, 2, 3.0, Some(5), 2);
    // No accumulation, 4 batches an epoch, stopped mid-epoch 1; checkpoints only at the end.
    check_events(32, 1, 3.0, Some(6), 0);
    // Fractional epochs: 2.5 of 2 steps end after step 5, mid-epoch 2, where the
    // schedule ends; 1.6 of 4 steps round to 6.
    check_events(40, 2, 2.5, None, 2);
    check_events(32, 1, 1.6, None, 0);
}

/// Resuming from a training checkpoint the model cannot take: a weight missing, a
/// weight of another shape, another model's config. Each is a coded error naming the
/// problem, and the model comes back whole and as it was.
#[test]
fn resume_refuses_a_checkpoint_that_does_not_fit() {
    let dir = TempDir::new("bad-resume");
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(1), checkpoint_dir: Some(dir.path().into()), ..r });
    run(&mut tiny_model(95), &loader(32), &config, None).unwrap();
    let state = read_state_dict(&checkpoint_file(dir.path(), 1)).unwrap();
    let write = |name: &str, tensors: &std::collections::BTreeMap<String, Tensor>| {
        let path = dir.path().join(name);
        std::fs::write(&path, safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(state.metadata.clone())).unwrap()).unwrap();
        path
    };
    let mut missing = state.tensors.clone();
    missing.remove("blocks.0.attn.qkv.weight");
    let mut reshaped = state.tensors.clone();
    reshaped.insert("norm.weight".to_string(), Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap());
    let more = with_recipe(&config, |r| Recipe { max_steps: Some(2), checkpoint_dir: None, ..r });
    for (file, code, named) in [("missing.safetensors", ErrorCode::CheckpointKeys, "blocks.0.attn.qkv.weight"), ("reshaped.safetensors", ErrorCode::CheckpointShape, "norm.weight")] {
        let path = write(file, if code == ErrorCode::CheckpointKeys { &missing } else { &reshaped });
        let mut model = tiny_model(96);
        let before = param_bits(&model);
        let err = run(&mut model, &loader(32), &more, Some(&path)).unwrap_err();
        assert_eq!(err.code, code, "{file}: {err}");
        assert!(err.message.contains(named), "{file}: the message should name {named}: {}", err.message);
        assert_eq!(param_bits(&model), before, "{file}: the model must come back as it was");
    }
    let other = MaeConfig { depth: tiny_config().depth + 1, ..tiny_config() };
    let mut model = MaskedAutoencoder::new(other, &Device::Cpu, Precision::F32, 97).unwrap();
    let before = param_bits(&model);
    let err = run(&mut model, &loader(32), &more, Some(&checkpoint_file(dir.path(), 1))).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig, "{err}");
    assert!(err.message.contains("another config"), "{}", err.message);
    assert_eq!(param_bits(&model), before, "the model must come back as it was");
}

/// Resuming onto a loader with no batches left in the checkpoint's epoch (another
/// dataset or batch size: fewer batches an epoch than the checkpoint had consumed, or
/// exactly as many) must end, with an error or a defined continuation, rather than
/// loop forever or panic.
#[test]
fn resume_onto_a_shorter_epoch_returns() {
    // 40 images: 5 batches an epoch. Checkpoints at step 3 (batch 3 of epoch 0) and
    // step 2 (batch 2); 16 images give 2 batches an epoch.
    for stop in [3u64, 2] {
        let dir = TempDir::new("shorter");
        let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(stop), checkpoint_dir: Some(dir.path().into()), ..r });
        run(&mut tiny_model(91), &loader(40), &config, None).unwrap();
        let from = checkpoint_file(dir.path(), stop);
        assert!(from.is_file());

        let (tx, rx) = std::sync::mpsc::channel();
        let config = with_recipe(&config, |r| Recipe { max_steps: Some(stop + 3), checkpoint_dir: None, ..r });
        std::thread::spawn(move || {
            let mut model = tiny_model(91);
            let result = run(&mut model, &loader(16), &config, Some(&from)).map(|(s, _)| s.steps);
            let _ = tx.send(result);
        });
        // The run itself takes well under a second.
        match rx.recv_timeout(std::time::Duration::from_secs(20)) {
            Ok(Ok(steps)) => assert!(steps > stop && steps <= stop + 3, "checkpoint at step {stop}: resumed run reports {steps} steps"),
            Ok(Err(e)) => assert!(matches!(e.code, ErrorCode::InvalidArgument | ErrorCode::InvalidConfig), "unexpected error {e}"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("checkpoint at step {stop}: pretrain did not return within 20 s (endless loop)")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("checkpoint at step {stop}: pretrain panicked"),
        }
    }
}

// ---------------------------------------------------------------- failures and refusals

/// The names of `path`'s tensors that hold a NaN or an infinity.
fn non_finite_tensors(path: &Path) -> Vec<String> {
    let state = read_state_dict(path).unwrap();
    state.tensors.iter().filter(|(_, t)| host(t).iter().any(|v| !v.is_finite())).map(|(name, _)| name.clone()).collect()
}

/// A learning rate far too high blows the run up within a few steps, whether the first
/// non-finite value would be a loss, a gradient or the result of the update itself. The
/// step that would make something non-finite must stop the run before its update: every
/// checkpoint written is finite, the error names the last one, and the model holds its
/// weights (or its initial ones if none was written). On the engine, the reference
/// model (candle's autograd) and in bf16.
#[test]
fn a_divergence_stops_before_the_update_and_leaves_finite_checkpoints() {
    let loader = loader(32);
    for (path, precision, reference) in [("engine", Precision::F32, false), ("reference", Precision::F32, true), ("bf16", Precision::Bf16, false)] {
        for lr in [1e3, 1e6, 1e39] {
            let what = format!("{path}, lr {lr:e}");
            let dir = TempDir::new("diverge");
            let mut model = MaskedAutoencoder::new(tiny_config(), &Device::Cpu, precision, 13).unwrap();
            model.set_reference_only(reference);
            let initial = param_bits(&model);
            let config = with_recipe(&base_config(), |r| Recipe { lr: Some(lr), warmup_epochs: 0.0, epochs: 50.0, checkpoint_every: 1, checkpoint_dir: Some(dir.path().into()), ..r });
            let err = run(&mut model, &loader, &config, None).unwrap_err();
            assert_eq!(err.code, ErrorCode::NonFiniteLoss, "{what}: {err}");
            for checkpoint in list_checkpoints(dir.path()) {
                assert_eq!(non_finite_tensors(&checkpoint), Vec::<String>::new(), "{what}: {} holds non-finite values", checkpoint.display());
            }
            match list_checkpoints(dir.path()).pop() {
                Some(last) => {
                    assert!(err.message.ends_with(&format!("the last good checkpoint is {}", last.display())), "{what}: {}", err.message);
                    let (saved, _) = load_model(&last, None, &Device::Cpu, precision, 0).unwrap();
                    assert_same_weights(&model, &saved, &format!("{what}: the model after the error vs the last good checkpoint"));
                }
                None => {
                    assert!(err.message.contains("no checkpoint had been written"), "{what}: {}", err.message);
                    assert_eq!(param_bits(&model), initial, "{what}: the model after the error vs its initial weights");
                }
            }
        }
    }
}

/// A run that trained well and then blows up (here: resumed with an absurd learning
/// rate) stops at its first bad step, naming the checkpoint before it and leaving the
/// folder as it was; resumed from there with the good rate, it ends exactly where a run
/// that never went wrong does.
#[test]
fn the_last_good_checkpoint_resumes_exactly() {
    let loader = loader(32);
    for (path, precision, reference) in [("engine", Precision::F32, false), ("reference", Precision::F32, true), ("bf16", Precision::Bf16, false)] {
        let new_model = || {
            let mut model = MaskedAutoencoder::new(tiny_config(), &Device::Cpu, precision, 14).unwrap();
            model.set_reference_only(reference);
            model
        };
        let dir = TempDir::new("last-good");
        let good = with_recipe(&base_config(), |r| Recipe { max_steps: Some(3), checkpoint_every: 1, checkpoint_dir: Some(dir.path().into()), ..r });
        run(&mut new_model(), &loader, &good, None).unwrap();
        let last_good = checkpoint_file(dir.path(), 3);
        let before = (dir.entries(), std::fs::read(&last_good).unwrap());

        let mut diverged = new_model();
        let absurd = with_recipe(&good, |r| Recipe { lr: Some(1e39), max_steps: Some(6), ..r });
        let err = run(&mut diverged, &loader, &absurd, Some(dir.path())).unwrap_err();
        assert_eq!(err.code, ErrorCode::NonFiniteLoss, "{path}: {err}");
        assert!(names_step(&err.message, 4) && err.message.ends_with(&last_good.display().to_string()), "{path}: {}", err.message);
        assert_eq!((dir.entries(), std::fs::read(&last_good).unwrap()), before, "{path}: the folder must be left as it was");
        let (saved, _) = load_model(&last_good, None, &Device::Cpu, precision, 0).unwrap();
        assert_same_weights(&diverged, &saved, &format!("{path}: the model after the error"));

        let mut resumed = new_model();
        let (summary, _) = run(&mut resumed, &loader, &with_recipe(&good, |r| Recipe { max_steps: Some(5), ..r }), Some(&last_good)).unwrap();
        assert_eq!(summary.steps, 5, "{path}");
        let mut straight = new_model();
        run(&mut straight, &loader, &with_recipe(&good, |r| Recipe { max_steps: Some(5), checkpoint_dir: None, ..r }), None).unwrap();
        assert_same_weights(&resumed, &straight, &format!("{path}: resumed from the last good checkpoint vs straight"));
    }
}

/// The same run twice writes the same checkpoint bytes (the metadata used to come out in
/// hash-map order, which changes from run to run), with the metadata keys sorted.
#[test]
fn equal_runs_write_byte_identical_checkpoints() {
    let dir = TempDir::new("bytes");
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(2), checkpoint_every: 1, checkpoint_dir: Some(dir.path().into()), ..r });
    let read_all = || list_checkpoints(dir.path()).iter().map(|p| std::fs::read(p).unwrap()).collect::<Vec<_>>();
    run(&mut tiny_model(23), &loader(32), &config, None).unwrap();
    let first = read_all();
    assert_eq!(first.len(), 2);
    for path in list_checkpoints(dir.path()) {
        std::fs::remove_file(path).unwrap();
    }
    for _ in 0..3 {
        run(&mut tiny_model(23), &loader(32), &config, None).unwrap();
        assert!(read_all() == first, "a second equal run wrote other bytes");
    }
    let bytes = &first[1];
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(header_len % 8, 0);
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let keys: Vec<&String> = header["__metadata__"].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["config", "optimizer_step", "pretrain_config", "train_state"]);
    let text = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    let at = |key: &str| text.find(&format!("\"{key}\"")).unwrap();
    assert!(at("config") < at("optimizer_step") && at("optimizer_step") < at("pretrain_config") && at("pretrain_config") < at("train_state"), "metadata keys out of order: {text}");
}

/// A checkpoint folder that cannot be written to (here a path under a file) is an
/// `Io` error naming it before the first step: nothing trains, the weights are as
/// they were.
#[test]
fn an_unwritable_checkpoint_folder_fails_before_the_first_step() {
    let dir = TempDir::new("unwritable");
    let file = dir.write("plain-file", b"not a folder");
    let target = file.join("checkpoints");
    let mut model = tiny_model(17);
    let before = param_bits(&model);
    let mut events = Vec::new();
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(3), checkpoint_dir: Some(target.clone()), ..r });
    let err = pretrain(&mut model, &loader(32), &config, None, &Group::single(), &mut |e| events.push(e), &AtomicBool::new(false)).unwrap_err();
    assert_eq!(err.code, ErrorCode::Io, "{err}");
    assert!(err.message.contains(&target.display().to_string()), "the message should name {}: {}", target.display(), err.message);
    assert!(events.is_empty(), "no step may run: {events:?}");
    assert_eq!(param_bits(&model), before);
    assert_eq!(dir.entries(), vec!["plain-file".to_string()], "no probe may be left behind");

    // A writable one is created and left with no probe file in it.
    let fresh = dir.join("new/checkpoints");
    let config = with_recipe(&config, |r| Recipe { max_steps: Some(1), checkpoint_dir: Some(fresh.clone()), ..r });
    run(&mut model, &loader(32), &config, None).unwrap();
    let names: Vec<String> = std::fs::read_dir(&fresh).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["checkpoint-00000001.safetensors".to_string()]);
}

/// A process killed while writing a checkpoint leaves `.<name>.<pid>….tmp` behind. The
/// next run in the folder (a resume, or a fresh one) removes those whose writer is
/// gone, in the writer's naming with or without a per-save counter after the pid, and
/// leaves a live writer's, other temporary files and everything else alone.
#[test]
fn stale_checkpoint_temporaries_of_dead_writers_are_removed() {
    let dir = TempDir::new("stale");
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(2), checkpoint_dir: Some(dir.path().into()), ..r });
    run(&mut tiny_model(19), &loader(32), &config, None).unwrap();
    // A process that has exited: its id names no live process any more.
    let mut child = std::process::Command::new("sh").arg("-c").arg("exit 0").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let live = std::process::id();
    let stale = [format!(".checkpoint-00000003.safetensors.{dead}.tmp"), format!(".checkpoint-00000004.safetensors.{dead}.17.tmp")];
    let kept = [
        format!(".checkpoint-00000003.safetensors.{live}.2.tmp"),
        format!(".model.safetensors.{dead}.tmp"),
        format!(".checkpoint-latest.safetensors.{dead}.tmp"),
        ".checkpoint-00000003.safetensors.writer.tmp".to_string(),
        format!("checkpoint-00000003.safetensors.{dead}.tmp"),
        "notes.txt".to_string(),
    ];
    for name in stale.iter().chain(&kept) {
        dir.write(name, b"partial");
    }
    let resumed = with_recipe(&config, |r| Recipe { max_steps: Some(3), ..r });
    run(&mut tiny_model(19), &loader(32), &resumed, Some(dir.path())).unwrap();
    let mut want: Vec<String> = kept.to_vec();
    want.extend((2..=3).map(|s| format!("checkpoint-{s:08}.safetensors")));
    want.sort();
    assert_eq!(dir.entries(), want);

    // A fresh run into the folder cleans up too.
    dir.write(&stale[0], b"partial");
    run(&mut tiny_model(19), &loader(32), &with_recipe(&config, |r| Recipe { max_steps: Some(1), keep_last: 5, ..r }), None).unwrap();
    assert!(!dir.join(&stale[0]).exists(), "{} should be gone", stale[0]);
}

/// A step whose images were all unreadable has nothing to learn from: with
/// `skip_corrupt` the run stops with an argument error naming the step, the dataset and
/// the count, before any update or checkpoint. A step with some readable images trains.
#[test]
fn a_step_without_readable_images_is_an_error() {
    let n = 32;
    let unreadable = |which: &dyn Fn(usize) -> bool| -> Arc<dyn Dataset> { Arc::new(Faulty { inner: dataset(n, 29), bad: (0..n).map(which).collect(), fault: Fault::Unreadable }) };
    let skipping = |data: Arc<dyn Dataset>| {
        let options = LoaderOptions { batch_size: BATCH, seed: 5, shuffle: false, drop_last: true, workers: 1, prefetch: 2, skip_corrupt: true, shard: Shard::default() };
        Loader::new(data, augment(), options).unwrap()
    };
    for (what, which, step) in [("all unreadable", &(|_| true) as &dyn Fn(usize) -> bool, 1), ("the third batch unreadable", &|i| (2 * BATCH..3 * BATCH).contains(&i), 3)] {
        let dir = TempDir::new("unreadable");
        let mut model = tiny_model(29);
        let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(4), checkpoint_dir: Some(dir.path().into()), ..r });
        let mut steps = Vec::new();
        let err = pretrain(&mut model, &skipping(unreadable(which)), &config, None, &Group::single(), &mut |e| steps.extend(step_events(&[e])), &AtomicBool::new(false)).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{what}: {err}");
        assert!(names_step(&err.message, step), "{what}: the message should name step {step}: {}", err.message);
        for part in ["faulty in-memory", &format!("all {BATCH} images"), "item"] {
            assert!(err.message.contains(part), "{what}: the message should say {part:?}: {}", err.message);
        }
        assert_eq!(steps.len() as u64, step - 1, "{what}: steps before the empty one train");
        assert!(dir.entries().is_empty(), "{what}: no checkpoint: {:?}", dir.entries());
    }

    // Half of each batch unreadable: every step still has images, and trains on them.
    let mut model = tiny_model(29);
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(4), ..r });
    let (summary, _) = run(&mut model, &skipping(unreadable(&|i| i % 2 == 0)), &config, None).unwrap();
    assert_eq!((summary.steps, summary.skipped_images, summary.images_seen), (4, 16, 16));

    // Fewer images than one batch: no step at all, said plainly.
    let err = run(&mut tiny_model(29), &loader(BATCH - 1), &config, None).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
    assert!(err.message.contains("0 full batches of 8"), "{}", err.message);
}

/// A resumed run must keep the batch size, accumIter and seed the checkpoint was
/// written with (they fix which images its steps saw and come next): each change is an
/// argument error naming the setting and both values, with the weights left alone. The
/// schedule may change (a lower learning rate, more epochs).
#[test]
fn resume_refuses_another_batch_size_accum_iter_or_seed() {
    let dir = TempDir::new("resume-settings");
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(2), checkpoint_dir: Some(dir.path().into()), ..r });
    run(&mut tiny_model(37), &loader(32), &config, None).unwrap();
    let more = with_recipe(&config, |r| Recipe { max_steps: Some(4), checkpoint_dir: None, ..r });
    let half_batch = {
        let options = LoaderOptions { batch_size: BATCH / 2, seed: 5, shuffle: true, drop_last: true, workers: 1, prefetch: 2, skip_corrupt: false, shard: Shard::default() };
        Loader::new(Arc::new(dataset(32, 1234)), augment(), options).unwrap()
    };
    let cases = [
        ("batchSize", &half_batch, more.clone(), "batchSize 4", "batchSize 8"),
        ("accumIter", &loader(32), with_recipe(&more, |r| Recipe { accum_iter: 2, ..r }), "accumIter 2", "accumIter 1"),
        ("seed", &loader(32), with_recipe(&more, |r| Recipe { seed: 4, ..r }), "seed 4", "seed 3"),
    ];
    for (field, loader, changed, now, saved) in cases {
        let mut model = tiny_model(38);
        let before = param_bits(&model);
        let err = run(&mut model, loader, &changed, Some(dir.path())).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument, "{field}: {err}");
        for part in [now, saved, "checkpoint-00000002.safetensors", "resume with"] {
            assert!(err.message.contains(part), "{field}: the message should say {part:?}: {}", err.message);
        }
        assert_eq!(param_bits(&model), before, "{field}: the weights must be left alone");
    }
    let lower = with_recipe(&more, |r| Recipe { lr: Some(1e-4), epochs: 20.0, ..r });
    let (summary, _) = run(&mut tiny_model(38), &loader(32), &lower, Some(dir.path())).unwrap();
    assert_eq!(summary.steps, 4);
}

/// A cancel already set when the run starts ends it, aborted, before its first step: no
/// step, no event, no checkpoint, the weights as they were (or as resumed).
#[test]
fn a_run_cancelled_before_its_first_step_trains_and_writes_nothing() {
    let dir = TempDir::new("cancelled");
    let config = with_recipe(&base_config(), |r| Recipe { max_steps: Some(2), checkpoint_dir: Some(dir.path().into()), ..r });
    let cancel = AtomicBool::new(true);
    let mut model = tiny_model(43);
    let before = param_bits(&model);
    let mut events = Vec::new();
    let summary = pretrain(&mut model, &loader(32), &config, None, &Group::single(), &mut |e| events.push(e), &cancel).unwrap();
    assert!(summary.aborted);
    assert_eq!((summary.steps, summary.images_seen, summary.last_checkpoint.clone()), (0, 0, None));
    assert!(events.is_empty(), "{events:?}");
    assert!(dir.entries().is_empty(), "nothing may be written: {:?}", dir.entries());
    assert_eq!(param_bits(&model), before);

    // Resumed, it stops where the checkpoint left off, with the checkpoint's weights.
    let mut first = tiny_model(44);
    run(&mut first, &loader(32), &config, None).unwrap();
    let written = dir.entries();
    let summary = pretrain(&mut model, &loader(32), &with_recipe(&config, |r| Recipe { max_steps: Some(4), ..r }), Some(dir.path()), &Group::single(), &mut |e| events.push(e), &cancel).unwrap();
    assert!(summary.aborted);
    assert_eq!((summary.steps, summary.last_checkpoint), (2, Some(checkpoint_file(dir.path(), 2))));
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(dir.entries(), written);
    assert_same_weights(&model, &first, "resumed and stopped");
}

// ---------------------------------------------------------------- the PCA target

pub(crate) fn tiny_pca_model(seed: u64) -> MaskedAutoencoder {
    // Patches of 48 values, 8 coefficients.
    MaskedAutoencoder::new(MaeConfig { target: Target::Pca { components: 8 }, ..tiny_config() }, &Device::Cpu, Precision::F32, seed).unwrap()
}

fn basis_bits(model: &MaskedAutoencoder) -> (Vec<u32>, Vec<u32>) {
    let basis = model.pca_basis().expect("a basis");
    (bits(&basis.mean), bits(&basis.components))
}

#[test]
fn pca_pretraining_lowers_the_loss_and_resumes_with_its_basis() {
    let loader = loader(32);
    let dir = TempDir::new("pca");
    let config = with_recipe(&base_config(), |r| Recipe { epochs: 6.0, checkpoint_dir: Some(dir.path().into()), ..r });
    let mut straight = tiny_pca_model(8);
    let (s, events) = run(&mut straight, &loader, &config, None).unwrap();
    assert_eq!(s.steps, 24);
    let fitted: Vec<_> = events.iter().filter_map(|e| if let TrainEvent::PcaBasis { components, images, patches, .. } = e { Some((*components, *images, *patches)) } else { None }).collect();
    assert_eq!(fitted, vec![(8, 32, 32 * 16)], "one basis, fitted on the epoch's 32 images of 16 patches");
    let losses: Vec<f64> = step_events(&events).iter().map(|e| e.3).collect();
    let (first, last) = (losses[..4].iter().sum::<f64>() / 4.0, losses[20..].iter().sum::<f64>() / 4.0);
    assert!(last < 0.8 * first, "the loss falls: first steps {first}, last {last}");

    // The checkpoints hold the basis; a model loaded from one predicts coefficients of it.
    let last_checkpoint = s.last_checkpoint.unwrap();
    let state = read_state_dict(&last_checkpoint).unwrap();
    assert_eq!((state.tensors["pca_mean"].dims(), state.tensors["pca_components"].dims()), (&[48][..], &[8, 48][..]));
    let (loaded, _) = load_model(&last_checkpoint, None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(loaded.config.target, Target::Pca { components: 8 });
    assert_eq!(basis_bits(&loaded), basis_bits(&straight));

    // Resuming a fresh model takes the checkpoint's basis (no new fit) and goes on exactly.
    let split_dir = TempDir::new("pca-split");
    let split = with_recipe(&config, |r| Recipe { max_steps: Some(12), checkpoint_dir: Some(split_dir.path().into()), ..r });
    let mut first = tiny_pca_model(8);
    run(&mut first, &loader, &split, None).unwrap();
    let mut resumed = tiny_pca_model(99);
    let (s, resumed_events) = run(&mut resumed, &loader, &with_recipe(&split, |r| Recipe { max_steps: None, ..r }), Some(split_dir.path())).unwrap();
    assert_eq!(s.steps, 24);
    assert!(!resumed_events.iter().any(|e| matches!(e, TrainEvent::PcaBasis { .. })), "a resumed run keeps the checkpoint's basis");
    assert_eq!(basis_bits(&resumed), basis_bits(&straight));
    assert_same_weights(&resumed, &straight, "pca resume");

    // A model with another basis may not resume from it.
    let mut other = tiny_pca_model(8);
    let (mean, components) = (Tensor::zeros(48, candle_core::DType::F32, &Device::Cpu).unwrap(), Tensor::eye(48, candle_core::DType::F32, &Device::Cpu).unwrap().narrow(0, 0, 8).unwrap());
    other.set_pca_basis(&mean, &components).unwrap();
    let e = run(&mut other, &loader, &with_recipe(&split, |r| Recipe { max_steps: None, ..r }), Some(split_dir.path())).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig, "{}", e.message);
    assert!(e.message.contains("another PCA basis"), "{}", e.message);
}
