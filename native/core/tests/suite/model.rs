//! Behaviour of the core that needs no fixtures: the sin-cos table, patchify,
//! the three masking strategies, the loss, forward shapes, gradients, input
//! validation and configuration. Expected values are computed in the tests from
//! the published formulas, never copied from a run of the code under test.

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use vit_mae_core::masking::{self, MaskPlan, MaskSampler};
use vit_mae_core::pos_embed::sincos_2d_with_cls;
use vit_mae_core::{ConfigPatch, ErrorCode, HostTensor, Precision, MaeConfig, MaskOptions, MaskedAutoencoder, Masking, Target};

// ---------------------------------------------------------------- helpers

use vit_mae_core::config::preset as config;

/// 32x32 RGB, patch 4 (8x8 grid), two thin blocks each side.
fn small_config() -> MaeConfig {
    config(32, 4, 3, 16, 2, 2, 8, 1, 2, false)
}

fn model(config: MaeConfig, seed: u64) -> MaskedAutoencoder {
    MaskedAutoencoder::new(config, &Device::Cpu, Precision::F32, seed).expect("valid config")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn random_values(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn random_tensor(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_vec(random_values(rng, len), shape, &Device::Cpu).unwrap()
}

fn err_code<T>(r: vit_mae_core::Result<T>) -> ErrorCode {
    match r {
        Ok(_) => panic!("expected an error, got Ok"),
        Err(e) => e.code,
    }
}

/// floor(L * (1 - ratio)) in exact integer arithmetic, the ratio given in percent.
fn expected_keep(num_patches: usize, ratio_percent: usize) -> usize {
    num_patches * (100 - ratio_percent) / 100
}

/// The invariants every mask plan must satisfy.
fn check_plan(plan: &MaskPlan, batch: usize, num_patches: usize, len_keep: usize) {
    assert_eq!(plan.len_keep, len_keep, "len_keep");
    assert_eq!(plan.ids_shuffle.len(), batch, "one shuffle per sample");
    let restore = plan.ids_restore();
    let mask = plan.mask();
    assert_eq!(restore.len(), batch);
    assert_eq!(mask.len(), batch);
    for n in 0..batch {
        let shuffle = &plan.ids_shuffle[n];
        assert_eq!(shuffle.len(), num_patches, "sample {n}: shuffle length");
        let mut sorted = shuffle.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..num_patches as u32).collect::<Vec<_>>(), "sample {n}: ids_shuffle is not a permutation");
        assert_eq!(restore[n].len(), num_patches);
        for (pos, &patch) in shuffle.iter().enumerate() {
            assert_eq!(restore[n][patch as usize] as usize, pos, "sample {n}: ids_restore does not invert ids_shuffle");
        }
        assert_eq!(mask[n].len(), num_patches);
        assert!(mask[n].iter().all(|&m| m == 0.0 || m == 1.0), "sample {n}: mask is not 0/1");
        let removed = mask[n].iter().filter(|&&m| m == 1.0).count();
        assert_eq!(removed, num_patches - len_keep, "sample {n}: number of removed patches");
        // The first len_keep of the shuffle are exactly the visible ones.
        for (pos, &patch) in shuffle.iter().enumerate() {
            let want = if pos < len_keep { 0.0 } else { 1.0 };
            assert_eq!(mask[n][patch as usize], want, "sample {n}: patch {patch} at shuffled position {pos}");
        }
    }
}

/// Number of 4-neighbour pairs of which one patch is removed and the other kept
/// (the length of the boundary between removed and visible regions).
fn boundary_edges(mask: &[f32], g: usize) -> usize {
    let mut edges = 0;
    for r in 0..g {
        for c in 0..g {
            let here = mask[r * g + c];
            if c + 1 < g && mask[r * g + c + 1] != here {
                edges += 1;
            }
            if r + 1 < g && mask[(r + 1) * g + c] != here {
                edges += 1;
            }
        }
    }
    edges
}

// ---------------------------------------------------------------- sin-cos table

/// The published 1-D embedding of `pos` for width `half` (= dim/2):
/// `[sin(pos*omega_0..), cos(pos*omega_0..)]`, omega_i = 1/10000^(i/(dim/4)).
fn published_1d(half: usize, pos: f64) -> Vec<f64> {
    let quarter = half / 2;
    let omega: Vec<f64> = (0..quarter).map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64)).collect();
    omega.iter().map(|o| (pos * o).sin()).chain(omega.iter().map(|o| (pos * o).cos())).collect()
}

#[test]
fn sincos_cls_row_is_zero_and_shape_is_right() {
    for (dim, grid) in [(8, 2), (16, 3), (48, 8), (768, 14)] {
        let table = sincos_2d_with_cls(dim, grid);
        assert_eq!(table.len(), (1 + grid * grid) * dim, "dim {dim} grid {grid}");
        assert!(table[..dim].iter().all(|&v| v == 0.0), "cls row must be zero (dim {dim})");
        assert!(table.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn sincos_dim8_grid2_by_hand() {
    // dim 8: each half has 4 entries, dim/4 = 2 frequencies: omega_0 = 1, omega_1 = 1/10000^(1/2) = 0.01.
    let table = sincos_2d_with_cls(8, 2);
    let row = |h: f64, w: f64| -> [f64; 8] {
        [
            w.sin(),
            (w * 0.01).sin(),
            w.cos(),
            (w * 0.01).cos(),
            h.sin(),
            (h * 0.01).sin(),
            h.cos(),
            (h * 0.01).cos(),
        ]
    };
    // Patch index 1 + h*grid + w.
    let expected: Vec<f64> = [[0.0; 8], row(0.0, 0.0), row(0.0, 1.0), row(1.0, 0.0), row(1.0, 1.0)].concat();
    assert_eq!(table.len(), expected.len());
    for (i, (got, want)) in table.iter().zip(&expected).enumerate() {
        assert!((*got as f64 - want).abs() < 1e-6, "entry {i} (row {}, col {}): got {got}, want {want}", i / 8, i % 8);
    }
    // Literal spot checks: patch (h=0, w=1) starts with sin(1), its second half is [0, 0, 1, 1].
    let p01 = &table[2 * 8..3 * 8];
    assert!((p01[0] - 0.841_470_96).abs() < 1e-6);
    assert!((p01[2] - 0.540_302_3).abs() < 1e-6);
    assert_eq!(&p01[4..], &[0.0, 0.0, 1.0, 1.0]);
    // Patch (h=1, w=0): the first half is the zero position, the second sin(1)...
    let p10 = &table[3 * 8..4 * 8];
    assert_eq!(&p10[..4], &[0.0, 0.0, 1.0, 1.0]);
    assert!((p10[4] - 0.841_470_96).abs() < 1e-6);
    assert!((p10[5] - 0.009_999_833).abs() < 1e-6);
}

#[test]
fn sincos_matches_published_formula() {
    for (dim, grid) in [(16, 3), (32, 4), (48, 8), (128, 14)] {
        let table = sincos_2d_with_cls(dim, grid);
        for h in 0..grid {
            for w in 0..grid {
                let want: Vec<f64> = [published_1d(dim / 2, w as f64), published_1d(dim / 2, h as f64)].concat();
                let got = &table[(1 + h * grid + w) * dim..][..dim];
                for (k, (g, wv)) in got.iter().zip(&want).enumerate() {
                    assert!((*g as f64 - wv).abs() < 1e-6, "dim {dim} grid {grid} (h {h}, w {w})[{k}]: got {g}, want {wv}");
                }
            }
        }
    }
}

#[test]
fn model_buffers_are_the_sincos_tables() {
    let c = small_config();
    let m = model(c.clone(), 1);
    let [(n0, pos), (n1, dec)] = m.buffers()[..] else { panic!("a pixel-target model has the two position tables alone") };
    assert_eq!((n0, n1), ("pos_embed", "decoder_pos_embed"));
    assert_eq!(pos.dims(), &[1, 1 + c.num_patches(), c.embed_dim]);
    assert_eq!(dec.dims(), &[1, 1 + c.num_patches(), c.decoder_embed_dim]);
    assert_eq!(values(pos), sincos_2d_with_cls(c.embed_dim, c.grid_size()));
    assert_eq!(values(dec), sincos_2d_with_cls(c.decoder_embed_dim, c.grid_size()));
}

// ---------------------------------------------------------------- patchify

#[test]
fn patchify_unpatchify_round_trip() {
    let c = small_config();
    let m = model(c.clone(), 0);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let imgs = random_tensor(&mut rng, &[2, 3, 32, 32]);
    let patches = m.patchify(&imgs).unwrap();
    assert_eq!(patches.dims(), &[2, c.num_patches(), c.patch_dim()]);
    let back = m.unpatchify(&patches).unwrap();
    assert_eq!(back.dims(), imgs.dims());
    let a: Vec<u32> = values(&imgs).iter().map(|v| v.to_bits()).collect();
    let b: Vec<u32> = values(&back).iter().map(|v| v.to_bits()).collect();
    assert_eq!(a, b, "unpatchify(patchify(x)) must be x exactly");
}

#[test]
fn patchify_uses_published_nhwpqc_order() {
    let c = small_config();
    let m = model(c.clone(), 0);
    let (n, ch, s, p) = (2, c.in_chans, c.img_size, c.patch_size);
    let g = s / p;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let data = random_values(&mut rng, n * ch * s * s);
    let imgs = Tensor::from_vec(data.clone(), (n, ch, s, s), &Device::Cpu).unwrap();
    let patches = values(&m.patchify(&imgs).unwrap());
    let l = g * g;
    let d = p * p * ch;
    for b in 0..n {
        for cc in 0..ch {
            for y in 0..s {
                for x in 0..s {
                    let (i, a) = (y / p, y % p);
                    let (j, bb) = (x / p, x % p);
                    let pixel = data[((b * ch + cc) * s + y) * s + x];
                    let patch = i * g + j;
                    let pos = (a * p + bb) * ch + cc;
                    assert_eq!(patches[(b * l + patch) * d + pos], pixel, "image {b} pixel (c {cc}, y {y}, x {x})");
                }
            }
        }
    }
}

#[test]
fn unpatchify_rejects_non_square_patch_count() {
    let m = model(small_config(), 0);
    let x = Tensor::zeros((1, 10, m.config.patch_dim()), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(err_code(m.unpatchify(&x)), ErrorCode::InvalidShape);
}

// ---------------------------------------------------------------- masking

const RATIOS: [(f64, usize); 5] = [(0.0, 0), (0.25, 25), (0.5, 50), (0.75, 75), (0.9, 90)];
const GRIDS: [usize; 4] = [4, 7, 8, 14];

/// `n` block masks drawn one after the other from `rng`.
fn block(rng: &mut ChaCha8Rng, n: usize, g: usize, ratio: f64) -> vit_mae_core::Result<MaskPlan> {
    Ok(MaskSampler::new(Masking::Block, g, ratio)?.batch(rng, n))
}

/// `n` grid masks (which draw nothing).
fn grid(n: usize, g: usize, ratio: f64) -> vit_mae_core::Result<MaskPlan> {
    Ok(MaskSampler::new(Masking::Grid, g, ratio)?.batch(&mut ChaCha8Rng::seed_from_u64(0), n))
}

/// A batch's masks drawn from one generator are, sample by sample, those drawn from
/// generators of their own in the same states: one way of masking a sample, whether
/// the model's generator masks a whole batch or training masks each image on its own.
/// Random masking draws exactly the published noise and keeps its smallest values.
#[test]
fn masks_drawn_per_sample_are_those_of_a_batch() {
    for masking in [Masking::Random, Masking::Block, Masking::Grid] {
        for g in [4, 8, 14] {
            let sampler = MaskSampler::new(masking, g, 0.75).unwrap();
            let seeds = [3u64, 1, 4, 1, 5];
            let per_sample = sampler.per_sample(seeds.map(ChaCha8Rng::seed_from_u64));
            check_plan(&per_sample, seeds.len(), g * g, sampler.len_keep());
            for (row, &seed) in per_sample.ids_shuffle.iter().zip(&seeds) {
                assert_eq!(*row, sampler.batch(&mut ChaCha8Rng::seed_from_u64(seed), 1).ids_shuffle[0], "{masking:?} grid {g} seed {seed}");
            }
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let batch = sampler.batch(&mut rng.clone(), 4);
            let one_by_one: Vec<Vec<u32>> = (0..4).map(|_| sampler.sample_order(&mut rng)).collect();
            assert_eq!(batch.ids_shuffle, one_by_one, "{masking:?} grid {g}");
            if masking == Masking::Random {
                let from_noise = masking::random_from_noise(&masking::uniform_noise(&mut ChaCha8Rng::seed_from_u64(9), 4, g * g), 0.75).unwrap();
                assert_eq!(batch, from_noise, "grid {g}: random masks are the argsort of torch.rand's noise");
            }
            if masking != Masking::Grid {
                assert_ne!(per_sample.ids_shuffle[0], per_sample.ids_shuffle[1], "{masking:?} grid {g}: other generators, other masks");
            }
        }
    }
}

#[test]
fn random_masking_invariants_and_len_keep() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    for g in GRIDS {
        let l = g * g;
        for (ratio, percent) in RATIOS {
            let noise = masking::uniform_noise(&mut rng, 3, l);
            assert_eq!(noise.len(), 3);
            assert!(noise.iter().all(|r| r.len() == l && r.iter().all(|v| (0.0..1.0).contains(v))));
            let plan = masking::random_from_noise(&noise, ratio).unwrap();
            check_plan(&plan, 3, l, expected_keep(l, percent));
        }
    }
}

#[test]
fn random_masking_keeps_the_smallest_noise() {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    for g in GRIDS {
        let l = g * g;
        for (ratio, percent) in RATIOS {
            let noise = masking::uniform_noise(&mut rng, 4, l);
            let plan = masking::random_from_noise(&noise, ratio).unwrap();
            let keep = expected_keep(l, percent);
            let mask = plan.mask();
            for (n, row) in noise.iter().enumerate() {
                let mut order: Vec<usize> = (0..l).collect();
                order.sort_by(|&a, &b| row[a].partial_cmp(&row[b]).unwrap());
                let want: BTreeSet<usize> = order[..keep].iter().copied().collect();
                let got: BTreeSet<usize> = (0..l).filter(|&i| mask[n][i] == 0.0).collect();
                assert_eq!(got, want, "grid {g} ratio {ratio} sample {n}: kept patches are not the smallest-noise ones");
                // The visible patches come first in increasing noise, as argsort gives them.
                let visible = &plan.ids_shuffle[n][..keep];
                assert!(visible.windows(2).all(|w| row[w[0] as usize] <= row[w[1] as usize]));
            }
        }
    }
}

#[test]
fn random_masking_hand_example() {
    // Noise [0.5, 0.1, 0.9, 0.3] at ratio 0.5: keep patches 1 and 3.
    let plan = masking::random_from_noise(&[vec![0.5, 0.1, 0.9, 0.3]], 0.5).unwrap();
    assert_eq!(plan.len_keep, 2);
    assert_eq!(plan.ids_shuffle, vec![vec![1, 3, 0, 2]]);
    assert_eq!(plan.ids_restore(), vec![vec![2, 0, 3, 1]]);
    assert_eq!(plan.mask(), vec![vec![1.0, 0.0, 1.0, 0.0]]);
}

#[test]
fn block_masking_invariants_and_len_keep() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    for g in GRIDS {
        let l = g * g;
        for (ratio, percent) in RATIOS {
            let plan = block(&mut rng, 5, g, ratio).unwrap();
            check_plan(&plan, 5, l, expected_keep(l, percent));
        }
    }
}

#[test]
fn grid_masking_keeps_even_rows_and_columns() {
    for g in [2, 4, 8, 14] {
        let l = g * g;
        let plan = grid(3, g, 0.75).unwrap();
        check_plan(&plan, 3, l, l / 4);
        let want: BTreeSet<usize> = (0..l).filter(|&i| (i / g) % 2 == 0 && (i % g) % 2 == 0).collect();
        for (n, mask) in plan.mask().iter().enumerate() {
            let kept: BTreeSet<usize> = (0..l).filter(|&i| mask[i] == 0.0).collect();
            assert_eq!(kept, want, "grid {g} sample {n}");
        }
    }
}

#[test]
fn grid_masking_rejects_other_ratios_and_odd_grids() {
    for ratio in [0.0, 0.5, 0.7, 0.8, 0.9, 1.0, -0.75] {
        assert_eq!(err_code(grid(1, 8, ratio)), ErrorCode::InvalidMaskRatio, "ratio {ratio}");
    }
    for g in [1, 3, 7, 15] {
        assert_eq!(err_code(grid(1, g, 0.75)), ErrorCode::InvalidArgument, "grid {g}");
    }
}

#[test]
fn block_masking_is_blockier_than_random() {
    let g = 14;
    let l = g * g;
    let samples = 64;
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let block = block(&mut rng, samples, g, 0.75).unwrap();
    let random = masking::random_from_noise(&masking::uniform_noise(&mut rng, samples, l), 0.75).unwrap();
    let mean_edges = |plan: &MaskPlan| plan.mask().iter().map(|m| boundary_edges(m, g)).sum::<usize>() as f64 / samples as f64;
    let (b, r) = (mean_edges(&block), mean_edges(&random));
    eprintln!("mean removed/visible boundary over {samples} masks: block {b}, random {r}");
    // For random masking the expected boundary is (#edges) * 2 * P(removed) * P(kept),
    // without replacement: 364 * 2 * (147/196) * (49/195) ~ 137.
    let edges = (2 * g * (g - 1)) as f64;
    let removed = (l - expected_keep(l, 75)) as f64;
    let analytic = edges * 2.0 * removed / l as f64 * (l as f64 - removed) / (l as f64 - 1.0);
    assert!((r - analytic).abs() < 0.1 * analytic, "random masking boundary {r} far from its expectation {analytic}");
    // Blocks leave a much shorter boundary between removed and visible regions.
    assert!(b < 0.75 * r, "block masking is not blockier than random: boundary {b} vs {r}");
}

#[test]
fn mask_ratio_outside_unit_interval_is_rejected() {
    let noise = vec![vec![0.1f32, 0.2, 0.3, 0.4]];
    for ratio in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY, -f64::INFINITY] {
        assert_eq!(err_code(masking::random_from_noise(&noise, ratio)), ErrorCode::InvalidMaskRatio, "random, ratio {ratio}");
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(err_code(block(&mut rng, 1, 4, ratio)), ErrorCode::InvalidMaskRatio, "block, ratio {ratio}");
        assert_eq!(err_code(masking::check_mask_ratio(ratio)), ErrorCode::InvalidMaskRatio);
    }
    let m = model(small_config(), 0);
    for masking in [Masking::Random, Masking::Block, Masking::Grid] {
        for ratio in [-0.1, 1.0, 2.0, f64::NAN] {
            let options = MaskOptions { mask_ratio: ratio, masking, noise: None };
            assert_eq!(err_code(m.mask_plan(2, &options)), ErrorCode::InvalidMaskRatio, "{masking:?} ratio {ratio}");
        }
    }
}

#[test]
fn non_finite_noise_is_rejected() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let noise = vec![vec![0.1, 0.2, 0.3, 0.4], vec![0.1, bad, 0.3, 0.4]];
        assert_eq!(err_code(masking::random_from_noise(&noise, 0.5)), ErrorCode::InvalidNoise, "noise value {bad}");
    }
    let m = model(small_config(), 0);
    let l = m.config.num_patches();
    let mut data = vec![0.5f32; 2 * l];
    data[l + 3] = f32::NAN;
    let options = MaskOptions { mask_ratio: 0.75, masking: Masking::Random, noise: Some(HostTensor::new(data, vec![2, l]).unwrap()) };
    assert_eq!(err_code(m.mask_plan(2, &options)), ErrorCode::InvalidNoise);
}

#[test]
fn block_masks_are_reproducible_from_the_seed() {
    for g in [7, 14] {
        let a = block(&mut ChaCha8Rng::seed_from_u64(5), 4, g, 0.75).unwrap();
        let b = block(&mut ChaCha8Rng::seed_from_u64(5), 4, g, 0.75).unwrap();
        let c = block(&mut ChaCha8Rng::seed_from_u64(6), 4, g, 0.75).unwrap();
        assert_eq!(a.mask(), b.mask(), "grid {g}: same seed, different block masks");
        assert_ne!(a.mask(), c.mask(), "grid {g}: different seeds gave the same block masks");
    }
    // Through the model: the mask stream derives from the model's seed.
    let options = MaskOptions { mask_ratio: 0.75, masking: Masking::Block, noise: None };
    let p1 = model(small_config(), 9).mask_plan(3, &options).unwrap();
    let p2 = model(small_config(), 9).mask_plan(3, &options).unwrap();
    assert_eq!(p1, p2);
    check_plan(&p1, 3, 64, 16);
}

#[test]
fn masking_names_parse() {
    assert_eq!(Masking::parse("random").unwrap(), Masking::Random);
    assert_eq!(Masking::parse("block").unwrap(), Masking::Block);
    assert_eq!(Masking::parse("grid").unwrap(), Masking::Grid);
    assert_eq!(err_code(Masking::parse("Random")), ErrorCode::InvalidArgument);
    assert_eq!(err_code(Masking::parse("")), ErrorCode::InvalidArgument);
}

// ---------------------------------------------------------------- loss

/// Reference loss in f64: patchify by the published index formula, optional
/// per-patch normalisation with the unbiased variance, squared error averaged
/// over each patch, then averaged over the removed patches.
#[allow(clippy::too_many_arguments)]
fn reference_loss(imgs: &[f32], n: usize, c: usize, s: usize, p: usize, pred: &[f32], mask: &[f32], norm_pix: bool) -> f64 {
    let g = s / p;
    let l = g * g;
    let d = p * p * c;
    let (mut num, mut den) = (0f64, 0f64);
    for b in 0..n {
        for i in 0..g {
            for j in 0..g {
                let patch = i * g + j;
                let mut target = vec![0f64; d];
                for a in 0..p {
                    for bb in 0..p {
                        for cc in 0..c {
                            target[(a * p + bb) * c + cc] = imgs[((b * c + cc) * s + i * p + a) * s + j * p + bb] as f64;
                        }
                    }
                }
                if norm_pix {
                    let mean = target.iter().sum::<f64>() / d as f64;
                    let var = target.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / (d as f64 - 1.0);
                    for t in &mut target {
                        *t = (*t - mean) / (var + 1e-6).sqrt();
                    }
                }
                let per: f64 =
                    target.iter().enumerate().map(|(k, t)| (pred[(b * l + patch) * d + k] as f64 - t).powi(2)).sum::<f64>() / d as f64;
                let m = mask[b * l + patch] as f64;
                num += per * m;
                den += m;
            }
        }
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

/// 4x4 grey images, patch 2: four patches of four pixels.
fn loss_model(norm_pix: bool) -> MaskedAutoencoder {
    model(config(4, 2, 1, 8, 1, 2, 8, 1, 2, norm_pix), 0)
}

#[test]
fn loss_literal_case() {
    // Pixels 0..16 of one 4x4 image; pred all zero; patches 0 and 3 removed.
    // Patch 0 = [0, 1, 4, 5] -> mean square 42/4 = 10.5;
    // patch 3 = [10, 11, 14, 15] -> 642/4 = 160.5; loss = (10.5 + 160.5) / 2 = 85.5.
    let imgs = Tensor::from_vec((0..16).map(|v| v as f32).collect::<Vec<_>>(), (1, 1, 4, 4), &Device::Cpu).unwrap();
    let pred = Tensor::zeros((1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(vec![1f32, 0.0, 0.0, 1.0], (1, 4), &Device::Cpu).unwrap();
    let loss = scalar(&loss_model(false).forward_loss(&imgs, &pred, &mask).unwrap());
    assert!((loss - 85.5).abs() < 1e-4, "loss {loss}, want 85.5");

    // normPixLoss: every patch is [x, x+1, x+4, x+5]: deviations ±1.5, ±2.5, unbiased
    // variance 17/3; with pred 0 the per-patch loss is (17/4) / (17/3 + 1e-6) ~ 0.75
    // (a biased variance would give 1.0).
    let var = 17.0 / 3.0;
    let want = (17.0 / 4.0) / (var + 1e-6);
    let loss = scalar(&loss_model(true).forward_loss(&imgs, &pred, &mask).unwrap());
    assert!((loss as f64 - want).abs() < 1e-5, "normpix loss {loss}, want {want}");
}

#[test]
fn loss_matches_reference_random_case() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    for norm_pix in [false, true] {
        let (n, c, s, p) = (2, 3, 8, 2);
        let m = model(config(s, p, c, 8, 1, 2, 8, 1, 2, norm_pix), 0);
        let l = (s / p) * (s / p);
        let d = p * p * c;
        let imgs = random_values(&mut rng, n * c * s * s);
        let pred = random_values(&mut rng, n * l * d);
        let mask: Vec<f32> = (0..n * l).map(|_| if rng.random_bool(0.6) { 1.0 } else { 0.0 }).collect();
        assert!(mask.contains(&1.0));
        let want = reference_loss(&imgs, n, c, s, p, &pred, &mask, norm_pix);
        let got = scalar(
            &m.forward_loss(
                &Tensor::from_vec(imgs.clone(), (n, c, s, s), &Device::Cpu).unwrap(),
                &Tensor::from_vec(pred.clone(), (n, l, d), &Device::Cpu).unwrap(),
                &Tensor::from_vec(mask.clone(), (n, l), &Device::Cpu).unwrap(),
            )
            .unwrap(),
        ) as f64;
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "norm_pix {norm_pix}: loss {got}, want {want}");
    }
}

#[test]
fn visible_patches_do_not_contribute_to_the_loss() {
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    for norm_pix in [false, true] {
        let m = loss_model(norm_pix);
        let imgs = random_tensor(&mut rng, &[2, 1, 4, 4]);
        let mask_v = vec![1f32, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        let mask = Tensor::from_vec(mask_v.clone(), (2, 4), &Device::Cpu).unwrap();
        let pred_v = random_values(&mut rng, 2 * 4 * 4);
        let mut wild = pred_v.clone();
        for (patch, &mv) in mask_v.iter().enumerate() {
            if mv == 0.0 {
                for k in 0..4 {
                    wild[patch * 4 + k] = 1e3 * (k as f32 + 1.0);
                }
            }
        }
        let a = scalar(&m.forward_loss(&imgs, &Tensor::from_vec(pred_v, (2, 4, 4), &Device::Cpu).unwrap(), &mask).unwrap());
        let b = scalar(&m.forward_loss(&imgs, &Tensor::from_vec(wild, (2, 4, 4), &Device::Cpu).unwrap(), &mask).unwrap());
        assert!(a.is_finite() && a > 0.0);
        assert_eq!(a, b, "norm_pix {norm_pix}: changing visible patches' predictions changed the loss");
    }
}

#[test]
fn loss_with_nothing_removed_is_zero() {
    let mut rng = ChaCha8Rng::seed_from_u64(33);
    for norm_pix in [false, true] {
        let m = loss_model(norm_pix);
        let imgs = random_tensor(&mut rng, &[2, 1, 4, 4]);
        let pred = random_tensor(&mut rng, &[2, 4, 4]);
        let mask = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let loss = scalar(&m.forward_loss(&imgs, &pred, &mask).unwrap());
        assert_eq!(loss, 0.0, "norm_pix {norm_pix}: loss with an all-zero mask must be 0, not NaN");
    }
}

// ---------------------------------------------------------------- forward

fn imgs_for(c: &MaeConfig, n: usize, seed: u64) -> Tensor {
    random_tensor(&mut ChaCha8Rng::seed_from_u64(seed), &[n, c.in_chans, c.img_size, c.img_size])
}

#[test]
fn forward_shapes_and_consistency() {
    let c = small_config();
    let m = model(c.clone(), 3);
    let l = c.num_patches();
    for (ratio, percent, masking) in
        [(0.75, 75, Masking::Random), (0.0, 0, Masking::Random), (0.5, 50, Masking::Block), (0.75, 75, Masking::Grid)]
    {
        let n = 2;
        let out = m.forward(&imgs_for(&c, n, 4), &MaskOptions { mask_ratio: ratio, masking, noise: None }).unwrap();
        let keep = expected_keep(l, percent);
        assert_eq!(out.pred.dims(), &[n, l, c.patch_dim()], "{masking:?}");
        assert_eq!(out.mask.dims(), &[n, l]);
        assert_eq!(out.ids_restore.dims(), &[n, l]);
        assert_eq!(out.latent.dims(), &[n, 1 + keep, c.embed_dim]);
        assert_eq!(out.loss.dims(), &[] as &[usize]);
        assert!(scalar(&out.loss).is_finite());
        assert!(values(&out.pred).iter().all(|v| v.is_finite()));
        let mask = values(&out.mask);
        let restore = values(&out.ids_restore);
        for b in 0..n {
            let row = &restore[b * l..(b + 1) * l];
            let mut sorted: Vec<usize> = row.iter().map(|&v| v as usize).collect();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..l).collect::<Vec<_>>(), "ids_restore row {b} is not a permutation");
            for k in 0..l {
                let want = if (row[k] as usize) < keep { 0.0 } else { 1.0 };
                assert_eq!(mask[b * l + k], want, "mask and ids_restore disagree at ({b}, {k})");
            }
            assert_eq!(mask[b * l..(b + 1) * l].iter().filter(|&&v| v == 1.0).count(), l - keep);
        }
    }
}

#[test]
fn forward_uses_given_noise() {
    let c = small_config();
    let m = model(c.clone(), 3);
    let l = c.num_patches();
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let noise = masking::uniform_noise(&mut rng, 2, l);
    let host = HostTensor::new(noise.concat(), vec![2, l]).unwrap();
    let out = m.forward(&imgs_for(&c, 2, 5), &MaskOptions { mask_ratio: 0.75, masking: Masking::Random, noise: Some(host) }).unwrap();
    let want = masking::random_from_noise(&noise, 0.75).unwrap().mask().concat();
    assert_eq!(values(&out.mask), want);
}

#[test]
fn random_masks_reproducible_per_seed() {
    let c = small_config();
    let imgs = imgs_for(&c, 4, 6);
    let first_mask = |seed: u64| {
        let out = model(c.clone(), seed).forward(&imgs, &MaskOptions::default()).unwrap();
        (values(&out.mask), scalar(&out.loss))
    };
    let (a, la) = first_mask(100);
    let (b, lb) = first_mask(100);
    let (d, _) = first_mask(101);
    assert_eq!(a, b, "same seed, different first mask");
    assert_eq!(la.to_bits(), lb.to_bits(), "same seed, different loss");
    assert_ne!(a, d, "different seeds, same first mask");
    assert_eq!(a.iter().filter(|&&v| v == 1.0).count(), 4 * (64 - 16));
}

#[test]
fn same_seed_gives_same_weights_and_different_seed_does_not() {
    let a = model(small_config(), 7);
    let b = model(small_config(), 7);
    let d = model(small_config(), 8);
    let mut any_diff = false;
    for (((na, va), (nb, vb)), (nd, vd)) in a.params().iter().zip(b.params()).zip(d.params()) {
        assert_eq!(na, nb);
        assert_eq!(na, nd);
        assert_eq!(values(va.as_tensor()), values(vb.as_tensor()), "{na}");
        any_diff |= values(va.as_tensor()) != values(vd.as_tensor());
    }
    assert!(any_diff);
}

// ---------------------------------------------------------------- gradients

#[test]
fn gradients_one_per_parameter_with_its_shape() {
    let c = small_config();
    let m = model(c.clone(), 12);
    let imgs = imgs_for(&c, 2, 7);
    let (loss, grads) = m.loss_and_gradients(&imgs, &MaskOptions::default()).unwrap();
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert_eq!(grads.len(), m.params().len());
    for ((gname, grad), (pname, var)) in grads.iter().zip(m.params()) {
        assert_eq!(gname, pname, "gradients must come in parameter order");
        assert_eq!(grad.dims(), var.dims(), "{gname}: gradient shape");
        assert!(values(grad).iter().all(|v| v.is_finite()), "{gname}: non-finite gradient");
    }
    // Every parameter takes part in a pass that removes patches.
    for name in ["decoder_pred.bias", "mask_token", "patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight"] {
        let g = &grads.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no gradient for {name}")).1;
        assert!(values(g).iter().any(|&v| v != 0.0), "{name}: gradient is all zero");
    }
    // Parameter names are unique and include the published ones.
    let names: BTreeSet<&str> = m.params().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), m.params().len());
    for name in ["cls_token", "mask_token", "norm.weight", "decoder_norm.bias", "blocks.1.mlp.fc2.weight", "decoder_blocks.0.attn.proj.bias"] {
        assert!(names.contains(name), "missing parameter {name}");
    }
    assert!(!names.contains("pos_embed") && !names.contains("decoder_pos_embed"), "position embeddings are fixed");
}

#[test]
fn gradients_with_nothing_removed_are_zero() {
    let c = small_config();
    let m = model(c.clone(), 13);
    let imgs = imgs_for(&c, 2, 8);
    let (loss, grads) = m.loss_and_gradients(&imgs, &MaskOptions { mask_ratio: 0.0, masking: Masking::Random, noise: None }).unwrap();
    assert_eq!(loss, 0.0);
    assert_eq!(grads.len(), m.params().len());
    for ((gname, grad), (pname, var)) in grads.iter().zip(m.params()) {
        assert_eq!(gname, pname);
        assert_eq!(grad.dims(), var.dims(), "{gname}");
        assert!(values(grad).iter().all(|&v| v == 0.0), "{gname}: gradient not zero with nothing removed");
    }
}

// ---------------------------------------------------------------- input validation

#[test]
fn images_of_the_wrong_shape_are_rejected() {
    let c = small_config(); // [N, 3, 32, 32]
    let m = model(c, 0);
    let bad_shapes: [Vec<usize>; 7] =
        [vec![3, 32, 32], vec![1, 1, 32, 32], vec![1, 3, 16, 16], vec![1, 3, 32, 16], vec![0, 3, 32, 32], vec![1, 1, 3, 32, 32], vec![]];
    for shape in bad_shapes {
        let len: usize = shape.iter().product();
        let imgs = HostTensor { data: vec![0.0; len], shape: shape.clone() };
        assert_eq!(err_code(m.images_to_tensor(&imgs)), ErrorCode::InvalidShape, "shape {shape:?}");
    }
    // Data whose length does not match the shape.
    assert_eq!(err_code(HostTensor::new(vec![0.0; 10], vec![1, 3, 32, 32])), ErrorCode::InvalidShape);
    let lying = HostTensor { data: vec![0.0; 10], shape: vec![1, 3, 32, 32] };
    assert_eq!(err_code(m.images_to_tensor(&lying)), ErrorCode::InvalidShape);
    // The right shape is accepted.
    let ok = HostTensor::new(vec![0.5; 2 * 3 * 32 * 32], vec![2, 3, 32, 32]).unwrap();
    assert_eq!(m.images_to_tensor(&ok).unwrap().dims(), &[2, 3, 32, 32]);
}

#[test]
fn noise_of_the_wrong_shape_or_for_other_maskings_is_rejected() {
    let c = small_config();
    let m = model(c.clone(), 0);
    let l = c.num_patches();
    let imgs = imgs_for(&c, 2, 9);
    for shape in [vec![2, l - 1], vec![1, l], vec![2 * l], vec![2, l, 1], vec![3, l]] {
        let len: usize = shape.iter().product();
        let noise = HostTensor::new(vec![0.5; len], shape.clone()).unwrap();
        let options = MaskOptions { mask_ratio: 0.75, masking: Masking::Random, noise: Some(noise) };
        assert_eq!(err_code(m.forward(&imgs, &options)), ErrorCode::InvalidNoise, "noise shape {shape:?}");
    }
    for masking in [Masking::Block, Masking::Grid] {
        let noise = HostTensor::new(vec![0.5; 2 * l], vec![2, l]).unwrap();
        let options = MaskOptions { mask_ratio: 0.75, masking, noise: Some(noise) };
        assert_eq!(err_code(m.forward(&imgs, &options)), ErrorCode::InvalidNoise, "{masking:?} with noise");
        assert_eq!(err_code(m.loss_and_gradients(&imgs, &options)), ErrorCode::InvalidNoise);
    }
}

// ---------------------------------------------------------------- config

#[test]
fn published_presets() {
    let base = MaeConfig::preset("mae_vit_base_patch16").unwrap();
    assert_eq!((base.img_size, base.patch_size, base.in_chans), (224, 16, 3));
    assert_eq!((base.embed_dim, base.depth, base.num_heads), (768, 12, 12));
    assert_eq!((base.decoder_embed_dim, base.decoder_depth, base.decoder_num_heads), (512, 8, 16));
    let large = MaeConfig::preset("mae_vit_large_patch16").unwrap();
    assert_eq!((large.img_size, large.patch_size), (224, 16));
    assert_eq!((large.embed_dim, large.depth, large.num_heads), (1024, 24, 16));
    assert_eq!((large.decoder_embed_dim, large.decoder_depth, large.decoder_num_heads), (512, 8, 16));
    let huge = MaeConfig::preset("mae_vit_huge_patch14").unwrap();
    assert_eq!((huge.img_size, huge.patch_size), (224, 14));
    assert_eq!((huge.embed_dim, huge.depth, huge.num_heads), (1280, 32, 16));
    assert_eq!((huge.decoder_embed_dim, huge.decoder_depth, huge.decoder_num_heads), (512, 8, 16));
    for c in [&base, &large, &huge] {
        assert_eq!(c.mlp_ratio, 4.0);
        assert_eq!(c.layer_norm_eps, 1e-6);
        assert_eq!(c.target, Target::Pixels);
        c.validate().unwrap();
    }
    for (name, c) in vit_mae_core::PRESETS.iter() {
        c.validate().unwrap_or_else(|e| panic!("preset {name} invalid: {e}"));
    }
    assert_eq!(err_code(MaeConfig::preset("mae_vit_gigantic")), ErrorCode::InvalidConfig);
}

/// Trainable parameters of the published architecture, counted from its modules.
fn hand_parameter_count(c: &MaeConfig) -> usize {
    let block = |d: usize, hidden: usize| {
        2 * d // norm1
            + (d * 3 * d + 3 * d) // qkv
            + (d * d + d) // proj
            + 2 * d // norm2
            + (d * hidden + hidden) // fc1
            + (hidden * d + d) // fc2
    };
    let (d, dd, p, ch) = (c.embed_dim, c.decoder_embed_dim, c.patch_size, c.in_chans);
    let encoder = (d * ch * p * p + d) + d + c.depth * block(d, 4 * d) + 2 * d;
    let decoder = (d * dd + dd) + dd + c.decoder_depth * block(dd, 4 * dd) + 2 * dd + (dd * p * p * ch + p * p * ch);
    encoder + decoder
}

#[test]
fn base_parameter_count() {
    let c = MaeConfig::preset("mae_vit_base_patch16").unwrap();
    let hand = hand_parameter_count(&c);
    let m = model(c.clone(), 0);
    assert_eq!(m.parameter_count(), hand);
    assert_eq!(m.parameter_count(), m.params().iter().map(|(_, v)| v.elem_count()).sum::<usize>());
    // The published 111,907,840 counts every nn.Parameter of MaskedAutoencoderViT,
    // including the two fixed (requires_grad=False) sin-cos tables [1, 197, 768]
    // and [1, 197, 512]; the trainable parameters are the rest.
    let tables = (1 + c.num_patches()) * (c.embed_dim + c.decoder_embed_dim);
    assert_eq!(tables, 252_160);
    assert_eq!(hand + tables, 111_907_840);
    assert_eq!(m.parameter_count(), 111_655_680);
}

#[test]
fn small_parameter_count_matches_the_architecture() {
    for c in [small_config(), config(16, 4, 1, 8, 3, 2, 12, 2, 3, true)] {
        let m = model(c.clone(), 0);
        assert_eq!(m.parameter_count(), hand_parameter_count(&c));
    }
}

#[test]
fn config_patch_spellings_and_strictness() {
    let camel = serde_json::json!({
        "imgSize": 32, "patchSize": 4, "inChans": 3, "embedDim": 48, "depth": 2, "numHeads": 3,
        "decoderEmbedDim": 32, "decoderDepth": 2, "decoderNumHeads": 4, "mlpRatio": 2.0,
        "normPixLoss": true, "layerNormEps": 1e-5
    });
    let snake = serde_json::json!({
        "img_size": 32, "patch_size": 4, "in_chans": 3, "embed_dim": 48, "depth": 2, "num_heads": 3,
        "decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 4, "mlp_ratio": 2.0,
        "norm_pix_loss": true, "layer_norm_eps": 1e-5
    });
    let want = MaeConfig {
        img_size: 32,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 48,
        depth: 2,
        num_heads: 3,
        decoder_embed_dim: 32,
        decoder_depth: 2,
        decoder_num_heads: 4,
        mlp_ratio: 2.0,
        target: Target::NormPixels,
        layer_norm_eps: 1e-5,
        encoder_mask_token: false,
    };
    for (label, json) in [("camel", &camel), ("snake", &snake)] {
        for strict in [true, false] {
            let patch = ConfigPatch::from_json(json, strict).unwrap_or_else(|e| panic!("{label} strict={strict}: {e}"));
            assert_eq!(patch.complete().unwrap(), want, "{label} strict={strict}");
        }
    }
    // Mixed spellings in one object.
    let mixed = serde_json::json!({"imgSize": 32, "patch_size": 4});
    let patch = ConfigPatch::from_json(&mixed, true).unwrap();
    assert_eq!((patch.img_size, patch.patch_size), (Some(32), Some(4)));

    // Unknown keys: an error when strict, ignored otherwise.
    let mut unknown = camel.clone();
    unknown["embedDimension"] = serde_json::json!(64);
    let e = ConfigPatch::from_json(&unknown, true).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(e.message.contains("embedDimension"), "message should name the unknown key: {}", e.message);
    assert_eq!(ConfigPatch::from_json(&unknown, false).unwrap().complete().unwrap(), want);

    // Not an object, wrong value types.
    assert_eq!(err_code(ConfigPatch::from_json(&serde_json::json!([1, 2]), true)), ErrorCode::InvalidConfig);
    assert_eq!(err_code(ConfigPatch::from_json(&serde_json::json!({"imgSize": "big"}), true)), ErrorCode::InvalidConfig);
    assert_eq!(err_code(ConfigPatch::from_json(&serde_json::json!({"depth": -1}), false)), ErrorCode::InvalidConfig);

    // Missing required fields; defaults for the optional ones.
    let partial = serde_json::json!({"imgSize": 32, "patchSize": 4});
    let e = ConfigPatch::from_json(&partial, true).unwrap().complete().unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(e.message.contains("numHeads"), "{}", e.message);
    let required = serde_json::json!({
        "imgSize": 32, "patchSize": 4, "inChans": 3, "embedDim": 48, "depth": 2, "numHeads": 3,
        "decoderEmbedDim": 32, "decoderDepth": 2, "decoderNumHeads": 4
    });
    let c = ConfigPatch::from_json(&required, true).unwrap().complete().unwrap();
    assert_eq!((c.mlp_ratio, c.target, c.layer_norm_eps), (4.0, Target::Pixels, 1e-6));
}

#[test]
fn validate_rejects_inconsistent_configs() {
    let good = small_config();
    good.validate().unwrap();
    let cases: Vec<(&str, MaeConfig)> = vec![
        ("embedDim not divisible by numHeads", MaeConfig { embed_dim: 48, num_heads: 5, ..good.clone() }),
        ("decoderEmbedDim not divisible by decoderNumHeads", MaeConfig { decoder_embed_dim: 12, decoder_num_heads: 5, ..good.clone() }),
        ("imgSize not a multiple of patchSize", MaeConfig { img_size: 30, ..good.clone() }),
        ("zero depth", MaeConfig { depth: 0, ..good.clone() }),
        ("zero patch", MaeConfig { patch_size: 0, ..good.clone() }),
        ("zero heads", MaeConfig { num_heads: 0, ..good.clone() }),
        ("embedDim not a multiple of 4", MaeConfig { embed_dim: 18, num_heads: 2, ..good.clone() }),
        ("negative mlpRatio", MaeConfig { mlp_ratio: -1.0, ..good.clone() }),
        ("NaN mlpRatio", MaeConfig { mlp_ratio: f64::NAN, ..good.clone() }),
        ("zero eps", MaeConfig { layer_norm_eps: 0.0, ..good.clone() }),
    ];
    for (label, c) in cases {
        assert_eq!(err_code(c.validate()), ErrorCode::InvalidConfig, "{label}");
        assert_eq!(err_code(MaskedAutoencoder::new(c, &Device::Cpu, Precision::F32, 0)), ErrorCode::InvalidConfig, "{label} (model)");
    }
    let e = MaeConfig { embed_dim: 48, num_heads: 5, ..good.clone() }.validate().unwrap_err();
    assert!(e.message.contains("embedDim") && e.message.contains("numHeads"), "{}", e.message);
    let e = MaeConfig { img_size: 30, ..good }.validate().unwrap_err();
    assert!(e.message.contains("imgSize") && e.message.contains("patchSize"), "{}", e.message);
}

#[test]
fn parameter_shapes_are_the_models_own() {
    let configs = [small_config(), MaeConfig { encoder_mask_token: true, mlp_ratio: 3.0, ..small_config() }, MaeConfig::preset("mae_vit_tiny_patch8_64").unwrap()];
    for c in configs {
        let m = model(c.clone(), 0);
        let params: Vec<(String, Vec<usize>)> = m.params().iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect();
        assert_eq!(c.parameter_shapes(), params);
        let buffers: Vec<(String, Vec<usize>)> = m.buffers().iter().map(|(n, t)| (n.to_string(), t.dims().to_vec())).collect();
        assert_eq!(c.buffer_shapes().to_vec(), buffers);
    }
}

#[test]
fn sizes_out_of_range_are_config_errors() {
    let tiny = MaeConfig::preset("mae_vit_tiny_patch16").unwrap();
    let cases = [
        ("depth", MaeConfig { depth: 1_000_000, ..tiny.clone() }),
        ("decoderDepth", MaeConfig { decoder_depth: 1025, ..tiny.clone() }),
        ("embedDim", MaeConfig { embed_dim: 1 << 33, num_heads: 1, ..tiny.clone() }),
        ("mlpRatio", MaeConfig { mlp_ratio: 1e300, ..tiny.clone() }),
        ("patchSize", MaeConfig { img_size: 70_000, patch_size: 70_000, ..tiny.clone() }),
    ];
    for (field, c) in cases {
        let e = c.validate().unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig, "{field}: {e}");
        assert!(e.message.contains(field), "the message should name {field}: {}", e.message);
        assert_eq!(err_code(MaskedAutoencoder::new(c, &Device::Cpu, Precision::F32, 0)), ErrorCode::InvalidConfig, "{field} (model)");
    }
}

#[test]
fn configs_too_large_for_memory_are_refused_before_anything_is_allocated() {
    // Valid configs whose parameters, or one image's attention scores, need more than
    // the 47-bit address space: no machine holds them, and building one aborted the process.
    let tiny = MaeConfig::preset("mae_vit_tiny_patch16").unwrap();
    let cases = [
        ("embedDim 1e6", MaeConfig { embed_dim: 1_000_000, num_heads: 8, ..tiny.clone() }, "needs 576 TB for its parameters"),
        ("imgSize 1e6", MaeConfig { img_size: 1_000_000, ..tiny.clone() }, "the model needs"),
        ("decoderEmbedDim 2e6", MaeConfig { decoder_embed_dim: 2_000_000, ..tiny.clone() }, "the model needs"),
    ];
    for (label, c, says) in cases {
        c.validate().unwrap_or_else(|e| panic!("{label} is a valid config: {e}"));
        let e = MaskedAutoencoder::new(c, &Device::Cpu, Precision::F32, 0).err().unwrap_or_else(|| panic!("{label} was built"));
        assert_eq!(e.code, ErrorCode::OutOfMemory, "{label}: {e}");
        assert!(e.message.contains(says) && e.message.contains("more than the"), "{label}: {}", e.message);
    }
    tiny.check_memory().unwrap();
}

#[test]
fn norm_pix_loss_needs_patches_of_two_values_or_more() {
    // One value per patch has no unbiased variance: the loss would be NaN whatever the weights.
    let e = config(4, 1, 1, 8, 1, 2, 8, 1, 2, true).validate().unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig);
    assert!(e.message.contains("normPixLoss"), "{}", e.message);
    config(4, 1, 1, 8, 1, 2, 8, 1, 2, false).validate().unwrap();
    // Three channels give 1x1 patches three values: a finite loss, as published.
    let three = config(4, 1, 3, 8, 1, 2, 8, 1, 2, true);
    let out = model(three.clone(), 0).forward(&imgs_for(&three, 2, 0), &MaskOptions::default()).unwrap();
    assert!(scalar(&out.loss).is_finite());
}

#[test]
fn non_finite_pixels_are_refused_with_their_index() {
    let c = small_config();
    let m = model(c.clone(), 0);
    let (n, ch, s) = (2, c.in_chans, c.img_size);
    let at = [1, ch - 1, 2, 3];
    let flat = ((at[0] * ch + at[1]) * s + at[2]) * s + at[3];
    for (value, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf"), (f32::NEG_INFINITY, "-inf")] {
        let mut data = vec![0.5f32; n * ch * s * s];
        data[flat] = value;
        data[flat + 1] = f32::NAN; // only the first is named
        let e = m.images_to_tensor(&HostTensor::new(data, vec![n, ch, s, s]).unwrap()).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidInput, "{shown}: {e}");
        assert!(e.message.contains(&format!("value {flat} (at {at:?}) is {shown}")), "{}", e.message);
    }
}

#[test]
fn a_shape_whose_size_overflows_is_not_the_empty_shape() {
    // 2^32 x 2^32 wraps to 0 in 64 bits: it must not pass for the length of no data.
    let e = HostTensor::new(Vec::new(), vec![1 << 32, 1 << 32]).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidShape);
    assert!(e.message.contains("more than can be addressed"), "{}", e.message);
    HostTensor::new(Vec::new(), vec![1 << 32, 0]).unwrap();
}

#[test]
fn config_published_json_round_trips() {
    let c = MaeConfig { mlp_ratio: 3.0, target: Target::NormPixels, layer_norm_eps: 1e-5, ..small_config() };
    let json = c.to_published_json();
    assert_eq!(json["embed_dim"], 16);
    assert_eq!(json["decoder_num_heads"], 2);
    assert_eq!(ConfigPatch::from_json(&json, true).unwrap().complete().unwrap(), c);
}

#[test]
fn grid_masking_rejects_nan_ratio() {
    // NaN is not 0.75; the public sampler must not accept it (the model's
    // mask_plan checks the ratio first, but MaskSampler is public on its own).
    assert_eq!(err_code(grid(1, 8, f64::NAN)), ErrorCode::InvalidMaskRatio);
}

#[test]
fn ragged_noise_rows_are_rejected() {
    // Noise is [N, L]: rows of different lengths cannot give a valid MaskPlan
    // (every ids_shuffle row must be a permutation of the same 0..L).
    let ragged = vec![vec![0.1f32, 0.2, 0.3, 0.4], vec![0.1, 0.2, 0.3]];
    assert_eq!(err_code(masking::random_from_noise(&ragged, 0.5)), ErrorCode::InvalidNoise);
}

// ------------------------------------------------ encoder with mask tokens (Table 1c)

#[test]
fn encoder_mask_token_mode_hides_removed_patches_and_trains_its_token() {
    let c = MaeConfig { encoder_mask_token: true, ..small_config() };
    let m = model(c.clone(), 3);
    let (n, l, p) = (2, c.num_patches(), c.patch_size);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let noise = masking::uniform_noise(&mut rng, n, l);
    let plan = masking::random_from_noise(&noise, 0.75).unwrap();
    let options = MaskOptions { mask_ratio: 0.75, masking: Masking::Random, noise: Some(HostTensor::new(noise.concat(), vec![n, l]).unwrap()) };
    let imgs = imgs_for(&c, n, 7);
    let out = m.forward(&imgs, &options).unwrap();
    // Every patch goes through the encoder.
    assert_eq!(out.latent.dims(), &[n, 1 + l, c.embed_dim]);

    // Repainting a patch changes the latent only where the patch is visible.
    let mask = plan.mask();
    let (removed, visible) = (mask[0].iter().position(|&v| v == 1.0).unwrap(), mask[0].iter().position(|&v| v == 0.0).unwrap());
    let g = c.grid_size();
    let repaint = |patch: usize| {
        let mut v = values(&imgs);
        let (row, col) = (patch / g, patch % g);
        for ch in 0..c.in_chans {
            for i in 0..p {
                for j in 0..p {
                    v[(ch * c.img_size + row * p + i) * c.img_size + col * p + j] += 1.0;
                }
            }
        }
        let repainted = Tensor::from_vec(v, imgs.dims(), &Device::Cpu).unwrap();
        values(&m.forward(&repainted, &options).unwrap().latent)
    };
    let latent = values(&out.latent);
    assert_eq!(repaint(removed), latent, "a removed patch's pixels reached the encoder");
    assert_ne!(repaint(visible), latent);

    // The encoder's token is trained; the decoder's, which it replaces, is unused.
    let (_, grads) = m.loss_and_gradients(&imgs, &options).unwrap();
    let grad = |name: &str| values(&grads.iter().find(|(n, _)| n == name).unwrap().1);
    assert!(grad("encoder_mask_token").iter().any(|&v| v != 0.0));
    assert!(grad("mask_token").iter().all(|&v| v == 0.0));
    assert_eq!(grads.len(), m.params().len());

    // The default model has no such parameter.
    assert!(model(small_config(), 3).params().iter().all(|(name, _)| name != "encoder_mask_token"));
}

// ------------------------------------------------------------------ the PCA target

/// `small_config` (patches of 4x4x3 = 48 values) with the fields of `json` on top.
fn patched(json: serde_json::Value) -> vit_mae_core::Result<MaeConfig> {
    ConfigPatch::from_json(&json, true)?.apply_to(&small_config())
}

#[test]
fn target_and_norm_pix_loss_name_one_choice() {
    let target = |json| patched(json).map(|c| c.target);
    assert_eq!(target(serde_json::json!({})).unwrap(), Target::Pixels);
    assert_eq!(target(serde_json::json!({"target": "normPixels"})).unwrap(), Target::NormPixels);
    assert_eq!(target(serde_json::json!({"normPixLoss": true})).unwrap(), Target::NormPixels);
    assert_eq!(target(serde_json::json!({"norm_pix_loss": true, "target": "normPixels"})).unwrap(), Target::NormPixels);
    assert_eq!(target(serde_json::json!({"normPixLoss": false, "target": "pixels"})).unwrap(), Target::Pixels);
    // The default is an eighth of a patch's 48 values; the paper's 96 of 768 for ViT-B.
    assert_eq!(target(serde_json::json!({"target": "pca"})).unwrap(), Target::Pca { components: 6 });
    assert_eq!(target(serde_json::json!({"target": "pca", "normPixLoss": false, "pcaComponents": 48})).unwrap(), Target::Pca { components: 48 });
    assert_eq!(target(serde_json::json!({"target": "pca", "pca_components": 1})).unwrap(), Target::Pca { components: 1 });
    let base = MaeConfig::preset("mae_vit_base_patch16").unwrap();
    let pca = ConfigPatch::from_json(&serde_json::json!({"target": "pca"}), true).unwrap().apply_to(&base).unwrap();
    assert_eq!((pca.target, pca.pred_dim()), (Target::Pca { components: 96 }, 96));
    // normPixLoss false over a PCA config keeps it (it only says "not normalised pixels").
    let over_pca = ConfigPatch::from_json(&serde_json::json!({"normPixLoss": false}), true).unwrap().apply_to(&pca).unwrap();
    assert_eq!(over_pca.target, Target::Pca { components: 96 });

    for (json, needle) in [
        (serde_json::json!({"target": "pixels", "normPixLoss": true}), "contradicts"),
        (serde_json::json!({"target": "normPixels", "normPixLoss": false}), "contradicts"),
        (serde_json::json!({"target": "pca", "normPixLoss": true}), "contradicts"),
        (serde_json::json!({"pcaComponents": 4}), "applies only to target 'pca'"),
        (serde_json::json!({"target": "normPixels", "pcaComponents": 4}), "applies only to target 'pca'"),
        (serde_json::json!({"target": "pca", "pcaComponents": 0}), "pcaComponents must be an integer from 1 to the 48"),
        (serde_json::json!({"target": "pca", "pcaComponents": 49}), "pcaComponents must be an integer from 1 to the 48"),
        (serde_json::json!({"target": "raw"}), "unknown variant"),
    ] {
        let e = patched(json.clone()).and_then(|c| c.validate().map(|()| c)).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig, "{json}");
        assert!(e.message.contains(needle), "{json}: {}", e.message);
    }
}

#[test]
fn pca_config_json_names_its_target_and_pixel_configs_stay_as_they_were() {
    let pca = MaeConfig { target: Target::Pca { components: 7 }, ..small_config() };
    let camel = serde_json::to_value(&pca).unwrap();
    assert_eq!((camel["target"].clone(), camel["pcaComponents"].clone(), camel["normPixLoss"].clone()), (serde_json::json!("pca"), serde_json::json!(7), serde_json::json!(false)));
    assert_eq!(ConfigPatch::from_json(&camel, true).unwrap().complete().unwrap(), pca);
    let published = pca.to_published_json();
    assert_eq!((published["target"].clone(), published["pca_components"].clone()), (serde_json::json!("pca"), serde_json::json!(7)));
    assert_eq!(ConfigPatch::from_json(&published, true).unwrap().complete().unwrap(), pca);
    for target in [Target::Pixels, Target::NormPixels] {
        let c = MaeConfig { target, ..small_config() };
        let camel = serde_json::to_value(&c).unwrap();
        assert!(camel.get("target").is_none() && camel.get("pcaComponents").is_none(), "{camel}");
        assert_eq!(camel["normPixLoss"], target == Target::NormPixels);
        assert!(c.to_published_json().get("target").is_none());
    }
    // The decoder predicts the coefficients, and the basis is a fixed tensor.
    assert!(pca.parameter_shapes().contains(&("decoder_pred.weight".to_string(), vec![7, 8])));
    let buffers = pca.buffer_shapes();
    assert_eq!(&buffers[2..], &[("pca_mean".to_string(), vec![48]), ("pca_components".to_string(), vec![7, 48])]);
}

/// A model of `small_config` with a PCA target of `k` coefficients and a basis fitted on
/// random images.
fn pca_model(k: usize, seed: u64) -> MaskedAutoencoder {
    let c = MaeConfig { target: Target::Pca { components: k }, ..small_config() };
    let mut m = model(c.clone(), seed);
    let mut moments = vit_mae_core::pca::PatchMoments::new(c.patch_dim()).unwrap();
    moments.add_images(&random_images(&c, 6, seed + 1), 6, c.in_chans, c.img_size, c.patch_size).unwrap();
    let fit = moments.fit(k).unwrap();
    let mean = Tensor::new(fit.mean.iter().map(|&v| v as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let axes = Tensor::new(fit.components.iter().map(|&v| v as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap().reshape((k, c.patch_dim())).unwrap();
    m.set_pca_basis(&mean, &axes).unwrap();
    m
}

fn random_images(c: &MaeConfig, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * c.in_chans * c.img_size * c.img_size).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

#[test]
fn pca_model_without_a_basis_says_how_to_get_one() {
    let c = MaeConfig { target: Target::Pca { components: 6 }, ..small_config() };
    for reference_only in [false, true] {
        let mut m = model(c.clone(), 0);
        m.set_reference_only(reference_only);
        assert!(m.pca_basis().is_none());
        let imgs = Tensor::from_vec(random_images(&c, 2, 3), (2, 3, 32, 32), &Device::Cpu).unwrap();
        for e in [m.forward(&imgs, &MaskOptions::default()).err().unwrap(), m.loss_and_gradients(&imgs, &MaskOptions::default()).err().unwrap(), m.reconstruct(&imgs, &MaskOptions::default()).err().unwrap()] {
            assert_eq!(e.code, ErrorCode::InvalidConfig, "reference only {reference_only}: {}", e.message);
            assert!(e.message.contains("no PCA basis"), "{}", e.message);
        }
        // The encoder alone needs no basis.
        assert_eq!(m.embed(&imgs, vit_mae_core::Pool::Mean).unwrap().dims(), &[2, 16]);
    }
    // A basis of the wrong shape, or for a pixel target, is refused.
    let mut m = model(c.clone(), 0);
    let e = m.set_pca_basis(&Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap(), &Tensor::zeros((5, 48), DType::F32, &Device::Cpu).unwrap()).unwrap_err();
    assert_eq!(e.code, ErrorCode::CheckpointShape, "{}", e.message);
    let mut pixels = model(small_config(), 0);
    let e = pixels.set_pca_basis(&Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap(), &Tensor::zeros((6, 48), DType::F32, &Device::Cpu).unwrap()).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidConfig, "{}", e.message);
}

#[test]
fn pca_loss_is_the_mse_of_the_coefficients_on_removed_patches() {
    let m = pca_model(6, 4);
    let c = m.config.clone();
    let imgs_host = random_images(&c, 2, 8);
    let imgs = Tensor::from_vec(imgs_host.clone(), (2, 3, 32, 32), &Device::Cpu).unwrap();
    let out = m.forward(&imgs, &MaskOptions::default()).unwrap();
    assert_eq!(out.pred.dims(), &[2, 64, 6]);
    // By hand, in f64: each patch's coefficients on the basis, against pred.
    let basis = m.pca_basis().unwrap();
    let (mean, axes) = (values(&basis.mean), values(&basis.components));
    let patches = vit_mae_core::pca::patchify(&imgs_host, 2, 3, 32, 4);
    let (pred, mask) = (values(&out.pred), values(&out.mask));
    let (mut total, mut removed) = (0f64, 0f64);
    for (row, patch) in patches.chunks(48).enumerate() {
        let err: f64 = (0..6)
            .map(|j| {
                let coef: f64 = (0..48).map(|q| (patch[q] - mean[q]) as f64 * axes[j * 48 + q] as f64).sum();
                (pred[row * 6 + j] as f64 - coef).powi(2)
            })
            .sum::<f64>()
            / 6.0;
        total += err * mask[row] as f64;
        removed += mask[row] as f64;
    }
    let want = total / removed;
    let got = out.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "loss {got}, want {want}");
}

#[test]
fn pca_reconstructions_are_pixels_through_the_basis() {
    let m = pca_model(48, 2);
    let imgs = Tensor::from_vec(random_images(&m.config, 2, 5), (2, 3, 32, 32), &Device::Cpu).unwrap();
    // Fixed noise: both passes remove the same patches, so they predict alike.
    let noise = HostTensor::new(random_images(&MaeConfig { in_chans: 1, img_size: 8, ..m.config.clone() }, 2, 6), vec![2, 64]).unwrap();
    let options = MaskOptions { noise: Some(noise), ..MaskOptions::default() };
    let r = m.reconstruct(&imgs, &options).unwrap();
    for t in [&r.masked, &r.reconstruction, &r.pasted] {
        assert_eq!(t.dims(), &[2, 3, 32, 32]);
    }
    // coef @ components + mean, unpatchified.
    let basis = m.pca_basis().unwrap();
    let pred = m.forward(&imgs, &options).unwrap().pred;
    assert_eq!(pred.dims(), &[2, 64, 48]);
    let want = m.unpatchify(&basis.patches(&pred).unwrap()).unwrap();
    let worst = values(&r.reconstruction).iter().zip(values(&want)).fold(0f32, |w, (a, b)| w.max((a - b).abs()));
    assert!(worst < 1e-5, "reconstruction against coef @ components + mean: largest difference {worst}");
    // With all 48 components the basis is complete: pixels -> coefficients -> pixels is the identity.
    let patches = m.patchify(&imgs).unwrap();
    let back = basis.patches(&basis.coefficients(&patches).unwrap()).unwrap();
    let worst = values(&back).iter().zip(values(&patches)).fold(0f32, |w, (a, b)| w.max((a - b).abs()));
    assert!(worst < 1e-4, "round trip through a complete basis: largest difference {worst}");
}
