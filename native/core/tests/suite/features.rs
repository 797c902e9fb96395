//! Dense features (Tables 4-5, through ViTDet): which blocks `layers` names, the maps'
//! layout (a block's output tokens, the cls token dropped), the engine against the
//! reference model at the model's image size and at others, the maps and the published
//! position-embedding interpolation at other image sizes against PyTorch (test/fixtures/dense_features.py), and the
//! parameter-free simple feature pyramid.

use crate::common::{bits, fixtures, host, test_device, SplitMix};
// img 8, patch 4 (a 2x2 grid), embed 16, 2 heads.
use crate::finetune::mae_config;
use candle_core::{Device, Tensor};
use vit_mae_core::classifier::{resize_pos_embed, ClassifierConfig, Trainable, VitClassifier};
use vit_mae_core::engine::{Grid, MaeEngine, Mode, VitEngine, VitMode};
use vit_mae_core::features::{check_images, resolve_layers, simple_pyramid, tokens_to_map};
use vit_mae_core::masking::MaskPlan;
use vit_mae_core::{load_model, ErrorCode, HostTensor, MaskOptions, MaskedAutoencoder, Masking, Precision};

fn mae(depth: usize, reference_only: bool) -> MaskedAutoencoder {
    let mut model = MaskedAutoencoder::new(mae_config(depth), &Device::Cpu, Precision::F32, 5).unwrap();
    model.set_reference_only(reference_only);
    model
}

fn images(n: usize, h: usize, w: usize, seed: u64) -> Tensor {
    Tensor::from_vec(SplitMix(seed).values(n * 3 * h * w, -1.0, 1.0), (n, 3, h, w), &Device::Cpu).unwrap()
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    for (i, (g, w)) in host(got).iter().zip(host(want)).enumerate() {
        assert!((g - w).abs() <= tol, "{what}: value {i} is {g}, want {w}");
    }
}

#[test]
fn layers_name_blocks_from_the_start_or_the_end() {
    assert_eq!(resolve_layers(&[-1], 4).unwrap(), [3]);
    assert_eq!(resolve_layers(&[0, -4, 2, 2], 4).unwrap(), [0, 0, 2, 2]);
    for bad in [&[4][..], &[-5], &[]] {
        assert_eq!(resolve_layers(bad, 4).unwrap_err().code, ErrorCode::InvalidArgument, "{bad:?}");
    }
}

#[test]
fn images_need_sides_that_are_multiples_of_the_patch() {
    let ok = |shape: &[usize]| check_images(&HostTensor::new(vec![0.5; shape.iter().product()], shape.to_vec()).unwrap(), 3, 4);
    ok(&[2, 3, 8, 12]).unwrap();
    ok(&[1, 3, 4, 4]).unwrap();
    for bad in [&[1, 3, 8, 10][..], &[1, 1, 8, 8], &[0, 3, 8, 8], &[3, 8, 8], &[1, 3, 0, 8]] {
        let e = ok(bad).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidShape, "{bad:?}");
        assert!(e.message.contains("multiples of the patch size 4"), "{}", e.message);
    }
}

/// LayerNorm without affine parameters over each `[D]` vector at (n, i, j) of a map.
fn normalised_tokens(map: &Tensor) -> Vec<Vec<f64>> {
    let (n, d, gh, gw) = map.dims4().unwrap();
    let v = host(map);
    let mut tokens = Vec::new();
    for b in 0..n {
        for p in 0..gh * gw {
            let x: Vec<f64> = (0..d).map(|c| v[(b * d + c) * gh * gw + p]).collect();
            let mean = x.iter().sum::<f64>() / d as f64;
            let var = x.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / d as f64;
            tokens.push(x.iter().map(|t| (t - mean) / (var + 1e-6).sqrt()).collect());
        }
    }
    tokens
}

#[test]
fn the_last_map_is_the_last_blocks_patch_tokens_in_raster_order() {
    // A fresh model's final norm is the identity affine, so the encoder's output
    // (`latent`, cls first, patches in place when nothing is removed and the noise
    // keeps their order) is the plain LayerNorm of the last block's tokens.
    for reference_only in [true, false] {
        let model = mae(2, reference_only);
        let imgs = images(2, 8, 8, 1);
        let maps = model.feature_maps(&imgs, &[1]).unwrap();
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].dims(), [2, 16, 2, 2]);
        let noise = HostTensor::new((0..8).map(|i| (i % 4) as f32).collect(), vec![2, 4]).unwrap();
        let out = model.forward(&imgs, &MaskOptions { mask_ratio: 0.0, masking: Masking::Random, noise: Some(noise) }).unwrap();
        let latent = host(&out.latent);
        for (t, token) in normalised_tokens(&maps[0]).iter().enumerate() {
            let (b, p) = (t / 4, t % 4);
            for (c, v) in token.iter().enumerate() {
                let want = latent[(b * 5 + 1 + p) * 16 + c];
                assert!((v - want).abs() < 1e-4, "engine {}: image {b} patch {p} channel {c}: {v} vs {want}", !reference_only);
            }
        }
    }
}

#[test]
fn the_engine_gives_the_reference_models_maps() {
    let imgs = images(3, 8, 8, 2);
    let layers = [0, 2, -1, 0];
    let resolved = resolve_layers(&layers, 3).unwrap();
    let (engine, reference) = (mae(3, false), mae(3, true));
    assert!(engine.uses_engine());
    let (got, want) = (engine.feature_maps(&imgs, &resolved).unwrap(), reference.feature_maps(&imgs, &resolved).unwrap());
    assert_eq!(got.len(), 4);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(g, w, 1e-5, &format!("MAE map {i}"));
    }
    assert_eq!(bits(&got[0]), bits(&got[3]), "a block asked for twice");
    assert_ne!(bits(&got[0]), bits(&got[1]), "different blocks");

    let config = ClassifierConfig::from_encoder(&mae_config(3), 5, true, false);
    let classifier = VitClassifier::from_encoder(&engine, config, 3).unwrap();
    let mut reference = VitClassifier::from_encoder(&engine, ClassifierConfig::from_encoder(&mae_config(3), 5, true, false), 3).unwrap();
    reference.set_reference_only(true);
    let (got, want) = (classifier.feature_maps(&imgs, &resolved).unwrap(), reference.feature_maps(&imgs, &resolved).unwrap());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(g, w, 1e-5, &format!("classifier map {i}"));
    }
    // The classifier starts from the MAE's encoder: the same maps.
    let mae_maps = engine.feature_maps(&imgs, &resolved).unwrap();
    for (i, (g, w)) in got.iter().zip(&mae_maps).enumerate() {
        assert_close(g, w, 1e-5, &format!("classifier vs MAE map {i}"));
    }
}

#[test]
fn the_engine_gives_the_reference_models_maps_at_other_sizes() {
    // Wider, taller, smaller and larger than the model's 2x2 grid, then its own again
    // (each size a plan of its own, the cached one replaced).
    let layers = resolve_layers(&[1, 0], 2).unwrap();
    let (engine, reference) = (mae(2, false), mae(2, true));
    let config = ClassifierConfig::from_encoder(&mae_config(2), 5, true, false);
    let classifier = VitClassifier::from_encoder(&engine, config.clone(), 3).unwrap();
    let mut classifier_reference = VitClassifier::from_encoder(&engine, config, 3).unwrap();
    classifier_reference.set_reference_only(true);
    for (seed, (h, w)) in [(12, 16), (20, 8), (4, 4), (4, 12), (16, 16), (8, 8)].into_iter().enumerate() {
        let imgs = images(2, h, w, 10 + seed as u64);
        let want = reference.feature_maps(&imgs, &layers).unwrap();
        for (who, got) in [("MAE", engine.feature_maps(&imgs, &layers).unwrap()), ("classifier", classifier.feature_maps(&imgs, &layers).unwrap())] {
            for (i, (g, w_)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.dims(), [2, 16, h / 4, w / 4]);
                assert_close(g, w_, 1e-5, &format!("{who} map {i} at {h}x{w}"));
            }
        }
        let other = classifier_reference.feature_maps(&imgs, &layers).unwrap();
        assert_close(&other[0], &want[0], 1e-5, &format!("reference classifier at {h}x{w}"));
    }
}

#[test]
fn an_engine_plan_at_another_grid_runs_the_encoder_alone() {
    // The plan itself, without the model's dispatch: a 3x5 grid's block outputs are the
    // reference model's, cls row included.
    let model = mae(2, true);
    let grid = Grid { h: 3, w: 5 };
    let mut plan = MaeEngine::at_grid(&model.config, 2, 15, Mode::Encode, grid).unwrap();
    plan.load_from(&model).unwrap();
    let imgs = images(2, 12, 20, 7);
    let outputs = plan.block_outputs(&host(&imgs).iter().map(|&v| v as f32).collect::<Vec<_>>(), &MaskPlan::keep_all(2, 15), &[1]).unwrap();
    let map = tokens_to_map(&Tensor::from_vec(outputs[0].clone(), (2, 16, 16), &Device::Cpu).unwrap(), 3, 5).unwrap();
    assert_close(&map, &model.feature_maps(&imgs, &[1]).unwrap()[0], 1e-5, "3x5 plan");
    // Training and the decoder need the model's own grid.
    for mode in [Mode::Train, Mode::Forward] {
        assert_eq!(MaeEngine::at_grid(&model.config, 2, 15, mode, grid).err().unwrap().code, ErrorCode::Internal, "{mode:?}");
    }
    let config = ClassifierConfig::from_encoder(&mae_config(2), 5, true, false);
    let trained = VitMode::Grad { trainable: Trainable::All, train: true, drop_path: 0.0 };
    assert_eq!(VitEngine::at_grid(&config, 2, trained, grid).err().unwrap().code, ErrorCode::Internal);
}

#[test]
fn the_position_embedding_resizes_as_pytorch_does() {
    let text = std::fs::read_to_string(fixtures().join("pos-embed-resize.json")).unwrap();
    let case: serde_json::Value = serde_json::from_str(&text).unwrap();
    let floats = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    let table = Tensor::from_vec(floats(&case["table"]), (1, 17, 3), &Device::Cpu).unwrap();
    assert_eq!(bits(&resize_pos_embed(&table, 4, 4).unwrap()), bits(&table), "the table's own grid: itself");
    for resized in case["resized"].as_array().unwrap() {
        let (h, w) = (resized["height"].as_u64().unwrap() as usize, resized["width"].as_u64().unwrap() as usize);
        let want = Tensor::from_vec(floats(&resized["table"]), (1, 1 + h * w, 3), &Device::Cpu).unwrap();
        assert_close(&resize_pos_embed(&table, h, w).unwrap(), &want, 1e-6, &format!("4x4 -> {h}x{w}"));
    }
}

#[test]
fn the_maps_match_pytorch_at_the_models_size_and_at_another() {
    // mae-tiny (32x32, patch 4) over a 32x32 and a 24x40 image, every block, as
    // test/fixtures/dense_features.py computes them with the published code; on the
    // device VIT_MAE_TEST_DEVICE names (bench/gpu.sh runs it on CUDA, where only the
    // reference model runs).
    let device = test_device();
    let case = candle_core::safetensors::load(fixtures().join("mae-tiny.features.safetensors"), &device).unwrap();
    for reference_only in [false, true] {
        let (mut model, _) = load_model(&fixtures().join("mae-tiny.weights.safetensors"), None, &device, Precision::F32, 0).unwrap();
        model.set_reference_only(reference_only);
        for (imgs, maps) in [("imgs", "maps"), ("imgs_other", "maps_other")] {
            let got = model.feature_maps(&case[imgs], &[0, 1]).unwrap();
            for (i, map) in got.iter().enumerate() {
                assert_close(map, &case[&format!("{maps}.{i}")], 1e-4, &format!("{maps}.{i}, engine {}", !reference_only));
            }
        }
    }
}

#[test]
fn other_image_sizes_use_the_resized_position_embedding() {
    let model = mae(2, false);
    // 12x16 images: a 3x4 grid, on the reference model with the table resized from 2x2.
    let imgs = images(2, 12, 16, 3);
    let maps = model.feature_maps(&imgs, &[0, 1]).unwrap();
    assert_eq!(maps[1].dims(), [2, 16, 3, 4]);
    // A classifier made for 12x12 resizes the table the same way at its start (as the
    // published fine-tuning does) and runs its own size on the engine: the same maps.
    let square = images(1, 12, 12, 4);
    let config = ClassifierConfig { img_size: 12, ..ClassifierConfig::from_encoder(&mae_config(2), 5, true, false) };
    let classifier = VitClassifier::from_encoder(&model, config, 3).unwrap();
    assert!(classifier.uses_engine());
    let (got, want) = (classifier.feature_maps(&square, &[0, 1]).unwrap(), model.feature_maps(&square, &[0, 1]).unwrap());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.dims(), [1, 16, 3, 3]);
        assert_close(g, w, 1e-5, &format!("12x12 map {i}"));
    }
    // The 8x8 classifier run at 12x12 (the reference model) gives them too.
    let at_eight = VitClassifier::from_encoder(&model, ClassifierConfig::from_encoder(&mae_config(2), 5, true, false), 3).unwrap();
    assert_close(&at_eight.feature_maps(&square, &[1]).unwrap()[0], &want[1], 1e-5, "8x8 classifier at 12x12");
}

#[test]
fn the_simple_pyramid_resamples_the_map_without_parameters() {
    // On the device VIT_MAE_TEST_DEVICE names (bench/gpu.sh runs it on CUDA).
    let device = test_device();
    // One channel, 2x2: [[1, 2], [3, 4]].
    let map = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (1, 1, 2, 2), &device).unwrap();
    let [x4, x2, x1, half] = simple_pyramid(&map).unwrap();
    assert_eq!(x4.dims(), [1, 1, 8, 8]);
    assert_eq!(x2.dims(), [1, 1, 4, 4]);
    assert_eq!(bits(&x1), bits(&map));
    assert_eq!(half.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [4.0]);
    let nearest = |t: &Tensor, scale: usize| {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let side = 2 * scale;
        for (i, value) in v.iter().enumerate() {
            let (y, x) = (i / side / scale, i % side / scale);
            assert_eq!(*value, [1.0, 2.0, 3.0, 4.0][y * 2 + x], "x{scale} at {i}");
        }
    };
    nearest(&x4, 4);
    nearest(&x2, 2);

    // Two channels, 3x5: the max-pool floors odd sides (to 1x2), per channel.
    let values: Vec<f32> = (0..30).map(|i| if i < 15 { i as f32 } else { -(i as f32) }).collect();
    let map = Tensor::from_vec(values, (1, 2, 3, 5), &device).unwrap();
    let [x4, _, _, half] = simple_pyramid(&map).unwrap();
    assert_eq!(x4.dims(), [1, 2, 12, 20]);
    assert_eq!(half.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [6.0, 8.0, -15.0, -17.0]);

    let thin = Tensor::zeros((1, 1, 1, 4), candle_core::DType::F32, &device).unwrap();
    assert_eq!(simple_pyramid(&thin).unwrap_err().code, ErrorCode::InvalidShape);
}
