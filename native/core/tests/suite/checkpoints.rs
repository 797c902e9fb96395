//! Saving and loading checkpoints: round trips, encoder-only checkpoints and the
//! error codes for every way a checkpoint can be wrong. Fixtures come from
//! `../shared/fixtures` (override with VIT_MAE_FIXTURES).

use candle_core::{DType, Device, Tensor};
use crate::common::pth::{pth_bytes, state_dict_pickle, write_pth, write_state_dict, Pickle, Storage, View};
use crate::common::{bits, fixtures, TempDir};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use vit_mae_core::checkpoint::CheckpointFormat;
use vit_mae_core::{load_model, read_state_dict, save_model, ConfigPatch, Precision, ErrorCode, HostTensor, MaeConfig, MaskOptions, MaskedAutoencoder, Masking, Target};

/// A fixture's tensors and its `__metadata__`.
fn read_fixture(name: &str) -> (BTreeMap<String, Tensor>, HashMap<String, String>) {
    let path = fixtures().join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap().into_iter().collect();
    (tensors, metadata)
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>, metadata: Option<HashMap<String, String>>) {
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), metadata).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn load_err(path: &Path, explicit: Option<&ConfigPatch>) -> vit_mae_core::Error {
    match load_model(path, explicit, &Device::Cpu, Precision::F32, 0) {
        Ok(_) => panic!("loading {} should fail", path.display()),
        Err(e) => e,
    }
}

fn is_decoder_key(name: &str) -> bool {
    name == "mask_token" || name.starts_with("decoder_")
}

fn round_trip_config() -> MaeConfig {
    // Widths and ratios that no preset has, so nothing can be guessed from presets.
    MaeConfig {
        img_size: 24,
        patch_size: 4,
        in_chans: 2,
        embed_dim: 20,
        depth: 2,
        num_heads: 5,
        decoder_embed_dim: 12,
        decoder_depth: 1,
        decoder_num_heads: 3,
        mlp_ratio: 3.0,
        target: Target::NormPixels,
        layer_norm_eps: 1e-5,
        encoder_mask_token: false,
    }
}

// ---------------------------------------------------------------- round trip

#[test]
fn save_load_round_trip_is_bit_exact() {
    let dir = TempDir::new("roundtrip");
    let config = round_trip_config();
    let model = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, 77).unwrap();
    let path = dir.join("model.safetensors");
    save_model(&model, &path).unwrap();
    assert_eq!(dir.entries(), vec!["model.safetensors".to_string()], "a temporary file was left behind");

    // A different seed for the loaded model, so equal weights come from the file.
    let (loaded, report) = load_model(&path, None, &Device::Cpu, Precision::F32, 12345).unwrap();
    assert_eq!(report.format, CheckpointFormat::Safetensors);
    assert!(!report.fresh_decoder);
    assert_eq!(loaded.config, config);
    assert_eq!(loaded.params().len(), model.params().len());
    for ((na, va), (nb, vb)) in model.params().iter().zip(loaded.params()) {
        assert_eq!(na, nb);
        assert_eq!(va.dims(), vb.dims(), "{na}");
        assert_eq!(bits(va.as_tensor()), bits(vb.as_tensor()), "{na} differs after the round trip");
    }
    for ((na, ta), (nb, tb)) in model.buffers().iter().zip(loaded.buffers().iter()) {
        assert_eq!(na, nb);
        assert_eq!(bits(ta), bits(tb), "{na} differs after the round trip");
    }
    // Sanity: a model from another seed does differ, so the comparison above means something.
    let other = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, 12345).unwrap();
    assert_ne!(bits(other.params()[0].1.as_tensor()), bits(model.params()[0].1.as_tensor()));

    // Same outputs for the same input and noise.
    let l = config.num_patches();
    let imgs = Tensor::rand(0f32, 1.0, (2, config.in_chans, config.img_size, config.img_size), &Device::Cpu).unwrap();
    let noise: Vec<f32> = (0..2 * l).map(|i| ((i * 37 % 101) as f32) / 101.0).collect();
    let options =
        MaskOptions { mask_ratio: 0.75, masking: Masking::Random, noise: Some(HostTensor::new(noise, vec![2, l]).unwrap()) };
    let a = model.forward(&imgs, &options).unwrap().loss.to_scalar::<f32>().unwrap();
    let b = loaded.forward(&imgs, &options).unwrap().loss.to_scalar::<f32>().unwrap();
    assert_eq!(a.to_bits(), b.to_bits());

    // The file's metadata holds the config as JSON.
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().expect("saved file has __metadata__");
    let json: serde_json::Value = serde_json::from_str(&metadata["config"]).expect("metadata config is JSON");
    assert_eq!(json["embed_dim"], 20);
    assert_eq!(json["num_heads"], 5);
    assert_eq!(json["decoder_num_heads"], 3);
    assert_eq!(json["norm_pix_loss"], true);
    assert_eq!(ConfigPatch::from_json(&json, true).unwrap().complete().unwrap(), config);

    // Every parameter and both tables are in the file under their published names.
    let stored = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    assert_eq!(stored.len(), model.params().len() + 2);
    assert!(stored.contains_key("pos_embed") && stored.contains_key("decoder_pos_embed"));
    assert!(stored.contains_key("blocks.1.attn.qkv.weight") && stored.contains_key("decoder_pred.bias"));
}

#[test]
fn save_overwrites_and_leaves_no_temporary_file() {
    let dir = TempDir::new("overwrite");
    let path = dir.join("m.safetensors");
    let config = round_trip_config();
    let first = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, 1).unwrap();
    let second = MaskedAutoencoder::new(config, &Device::Cpu, Precision::F32, 2).unwrap();
    save_model(&first, &path).unwrap();
    save_model(&second, &path).unwrap();
    assert_eq!(dir.entries(), vec!["m.safetensors".to_string()]);
    let (loaded, _) = load_model(&path, None, &Device::Cpu, Precision::F32, 0).unwrap();
    for ((n, a), (_, b)) in second.params().iter().zip(loaded.params()) {
        assert_eq!(bits(a.as_tensor()), bits(b.as_tensor()), "{n}: the second save did not replace the first");
    }
}

#[test]
fn save_into_missing_folder_is_an_io_error() {
    let dir = TempDir::new("nofolder");
    let model = MaskedAutoencoder::new(round_trip_config(), &Device::Cpu, Precision::F32, 0).unwrap();
    let e = save_model(&model, &dir.join("absent/model.safetensors")).unwrap_err();
    assert_eq!(e.code, ErrorCode::Io);
    assert_eq!(dir.entries(), Vec::<String>::new(), "a failed save left files behind");
}

// ---------------------------------------------------------------- encoder only

#[test]
fn encoder_only_checkpoint_gets_a_fresh_decoder() {
    let dir = TempDir::new("encoder");
    let (tensors, metadata) = read_fixture("mae-tiny.weights.safetensors");
    let encoder: BTreeMap<String, Tensor> = tensors.iter().filter(|(k, _)| !is_decoder_key(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    assert!(encoder.len() < tensors.len() && encoder.contains_key("blocks.0.attn.qkv.weight"));
    let path = dir.join("encoder.safetensors");
    write_safetensors(&path, &encoder, Some(metadata));

    let (model, report) = load_model(&path, None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert!(report.fresh_decoder, "an encoder-only checkpoint must report a fresh decoder");
    assert_eq!(model.config.embed_dim, 48);
    assert_eq!(model.config.decoder_embed_dim, 32);
    let mut checked = 0;
    for (name, var) in model.params() {
        if let Some(want) = encoder.get(name) {
            assert_eq!(bits(var.as_tensor()), bits(want), "{name}");
            checked += 1;
        } else {
            assert!(is_decoder_key(name), "{name} is not a decoder parameter but was not in the checkpoint");
        }
    }
    assert_eq!(checked, encoder.len() - 1, "every encoder parameter (all but pos_embed) loaded");
    assert_eq!(bits(model.buffers()[0].1), bits(&encoder["pos_embed"]));
    // The fresh decoder is not the fixture's.
    let fresh = &model.params().iter().find(|(n, _)| n == "decoder_pred.weight").unwrap().1;
    assert_ne!(bits(fresh.as_tensor()), bits(&tensors["decoder_pred.weight"]));
    // And the model runs.
    let imgs = Tensor::rand(0f32, 1.0, (1, 3, 32, 32), &Device::Cpu).unwrap();
    let out = model.forward(&imgs, &MaskOptions::default()).unwrap();
    assert!(out.loss.to_scalar::<f32>().unwrap().is_finite());
}

/// Every parameter and fixed table of `model` is, bit for bit, the tensor of its name.
fn assert_holds(model: &MaskedAutoencoder, tensors: &BTreeMap<String, Tensor>) {
    for (name, var) in model.params() {
        assert_eq!(bits(var.as_tensor()), bits(&tensors[name]), "{name}");
    }
    for (name, t) in model.buffers() {
        assert_eq!(bits(t), bits(&tensors[name]), "{name}");
    }
}

#[test]
fn full_fixture_loads_bit_exact() {
    let (tensors, _) = read_fixture("mae-tiny.weights.safetensors");
    let (model, report) = load_model(&fixtures().join("mae-tiny.weights.safetensors"), None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert!(!report.fresh_decoder);
    assert_holds(&model, &tensors);
}

// ---------------------------------------------------------------- errors

#[test]
fn missing_file_is_not_found() {
    let dir = TempDir::new("missing");
    for name in ["nothing.safetensors", "nothing.pth", "nothing.hf"] {
        let e = load_err(&dir.join(name), None);
        assert_eq!(e.code, ErrorCode::CheckpointNotFound, "{name}: {e}");
    }
}

#[test]
fn truncated_files_are_corrupt() {
    let dir = TempDir::new("truncated");
    for fixture in ["mae-tiny.weights.safetensors", "mae-tiny.pth", "mae-tiny-normpix.weights.safetensors", "mae-tiny-normpix.pth"] {
        let bytes = std::fs::read(fixtures().join(fixture)).unwrap();
        for (label, cut) in [("half", bytes.len() / 2), ("minus-one", bytes.len() - 1), ("ten", 10), ("one", 1)] {
            let path = dir.join(&format!("{label}-{fixture}"));
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = load_err(&path, None);
            assert_eq!(e.code, ErrorCode::CheckpointCorrupt, "{fixture} cut to {cut} bytes: {e}");
        }
    }
}

#[test]
fn garbage_and_empty_files_are_corrupt() {
    let dir = TempDir::new("garbage");
    let mut state = 0x1234_5678_9abc_def0u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let mut zip_like = b"PK\x03\x04".to_vec();
    zip_like.extend_from_slice(&garbage);
    // A header length that points past the end, then JSON that is not a header.
    let mut bad_header = 20u64.to_le_bytes().to_vec();
    bad_header.extend_from_slice(b"{\"a\": 1}            ");
    let cases: [(&str, Vec<u8>); 5] = [
        ("garbage.safetensors", garbage.clone()),
        ("garbage.pth", zip_like),
        ("empty.safetensors", Vec::new()),
        ("text.safetensors", b"this is not a checkpoint\n".to_vec()),
        ("header.safetensors", bad_header),
    ];
    for (name, bytes) in cases {
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let e = load_err(&path, None);
        assert_eq!(e.code, ErrorCode::CheckpointCorrupt, "{name}: {e}");
    }
}

#[test]
fn unknown_key_is_named() {
    let dir = TempDir::new("unknown");
    let (mut tensors, metadata) = read_fixture("mae-tiny.weights.safetensors");
    tensors.insert("head.weight".to_string(), Tensor::zeros((10, 48), candle_core::DType::F32, &Device::Cpu).unwrap());
    let path = dir.join("extra.safetensors");
    write_safetensors(&path, &tensors, Some(metadata));
    let e = load_err(&path, None);
    assert_eq!(e.code, ErrorCode::CheckpointKeys, "{e}");
    assert!(e.message.contains("head.weight"), "the message should name the key: {}", e.message);
}

#[test]
fn missing_encoder_key_is_named() {
    let dir = TempDir::new("missingkey");
    for key in ["blocks.1.mlp.fc2.bias", "norm.weight", "patch_embed.proj.bias", "cls_token"] {
        let (mut tensors, metadata) = read_fixture("mae-tiny.weights.safetensors");
        assert!(tensors.remove(key).is_some());
        let path = dir.join(&format!("without-{key}.safetensors"));
        write_safetensors(&path, &tensors, Some(metadata));
        let e = load_err(&path, None);
        assert_eq!(e.code, ErrorCode::CheckpointKeys, "without {key}: {e}");
        assert!(e.message.contains(key), "the message should name {key}: {}", e.message);
    }
}

#[test]
fn missing_decoder_key_with_other_decoder_keys_is_named() {
    // Part of a decoder is not an encoder-only checkpoint.
    let dir = TempDir::new("missingdec");
    let (mut tensors, metadata) = read_fixture("mae-tiny.weights.safetensors");
    tensors.remove("decoder_blocks.1.attn.qkv.weight");
    let path = dir.join("partial-decoder.safetensors");
    write_safetensors(&path, &tensors, Some(metadata));
    let e = load_err(&path, None);
    assert_eq!(e.code, ErrorCode::CheckpointKeys, "{e}");
    assert!(e.message.contains("decoder_blocks.1.attn.qkv.weight"), "{}", e.message);
}

#[test]
fn explicit_config_contradicting_shapes() {
    let fixture = fixtures().join("mae-tiny.weights.safetensors");
    // One block more than the checkpoint has: its keys are missing.
    let deeper = ConfigPatch { depth: Some(3), ..Default::default() };
    let e = load_err(&fixture, Some(&deeper));
    assert_eq!(e.code, ErrorCode::CheckpointKeys, "{e}");
    assert!(e.message.contains("blocks.2."), "{}", e.message);
    // One block fewer: the checkpoint has keys the model does not.
    let shallower = ConfigPatch { depth: Some(1), ..Default::default() };
    let e = load_err(&fixture, Some(&shallower));
    assert_eq!(e.code, ErrorCode::CheckpointKeys, "{e}");
    assert!(e.message.contains("blocks.1."), "{}", e.message);
    // Another width (with a head count it divides): shapes differ.
    let wider = ConfigPatch { embed_dim: Some(64), num_heads: Some(4), ..Default::default() };
    let e = load_err(&fixture, Some(&wider));
    assert_eq!(e.code, ErrorCode::CheckpointShape, "{e}");
    // A width the checkpoint's head count does not divide: a config error, not a panic.
    let bad = ConfigPatch { embed_dim: Some(64), ..Default::default() };
    let e = load_err(&fixture, Some(&bad));
    assert_eq!(e.code, ErrorCode::InvalidConfig, "{e}");
    // Another image size: the stored position table no longer fits.
    let bigger = ConfigPatch { img_size: Some(64), ..Default::default() };
    let e = load_err(&fixture, Some(&bigger));
    assert_eq!(e.code, ErrorCode::CheckpointShape, "{e}");
    assert!(e.message.contains("pos_embed"), "{}", e.message);
    // The same applies to the .pth with an otherwise complete explicit config.
    let case_config = ConfigPatch {
        img_size: Some(32),
        patch_size: Some(4),
        in_chans: Some(3),
        embed_dim: Some(48),
        depth: Some(3),
        num_heads: Some(3),
        decoder_embed_dim: Some(32),
        decoder_depth: Some(2),
        decoder_num_heads: Some(4),
        ..Default::default()
    };
    let e = load_err(&fixtures().join("mae-tiny.pth"), Some(&case_config));
    assert_eq!(e.code, ErrorCode::CheckpointKeys, "{e}");
}

#[test]
fn hugging_face_folder_without_config_is_not_found() {
    let dir = TempDir::new("hf");
    let folder = dir.join("model.hf");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(fixtures().join("mae-tiny.hf/model.safetensors"), folder.join("model.safetensors")).unwrap();
    let e = load_err(&folder, None);
    assert_eq!(e.code, ErrorCode::CheckpointNotFound, "{e}");
    assert!(e.message.contains("config.json"), "{}", e.message);

    // And without the weights.
    let folder = dir.join("config-only.hf");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(fixtures().join("mae-tiny.hf/config.json"), folder.join("config.json")).unwrap();
    let e = load_err(&folder, None);
    assert_eq!(e.code, ErrorCode::CheckpointNotFound, "{e}");
    assert!(e.message.contains("model.safetensors"), "{}", e.message);

    // A config.json that is not JSON.
    let folder = dir.join("bad-config.hf");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(fixtures().join("mae-tiny.hf/model.safetensors"), folder.join("model.safetensors")).unwrap();
    std::fs::write(folder.join("config.json"), b"{ not json").unwrap();
    let e = load_err(&folder, None);
    assert_eq!(e.code, ErrorCode::CheckpointCorrupt, "{e}");
}

/// The tiny Hugging Face folder as Transformers saves a `ViTMAEModel`: the encoder alone,
/// its keys without `ViTMAEForPreTraining`'s `vit.` prefix, and the config as Transformers
/// 5.25 writes it (with fields not read, at values this MAE follows).
fn hugging_face_encoder_only(dir: &TempDir) -> std::path::PathBuf {
    let folder = dir.join("encoder.hf");
    std::fs::create_dir(&folder).unwrap();
    let (tensors, _) = read_fixture("mae-tiny.hf/model.safetensors");
    let encoder = tensors.into_iter().filter_map(|(k, t)| Some((k.strip_prefix("vit.")?.to_string(), t))).collect();
    write_safetensors(&folder.join("model.safetensors"), &encoder, None);
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("mae-tiny.hf/config.json")).unwrap()).unwrap();
    let transformers = serde_json::json!({
        "architectures": ["ViTMAEModel"], "dtype": "float32", "transformers_version": "5.25.0", "initializer_range": 0.02,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "mask_ratio": 0.75,
    });
    config.as_object_mut().unwrap().extend(transformers.as_object().unwrap().clone());
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    folder
}

#[test]
fn hugging_face_encoder_only_folder_gets_a_fresh_decoder() {
    let dir = TempDir::new("hf-encoder");
    let (model, report) = load_model(&hugging_face_encoder_only(&dir), None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(report.format, CheckpointFormat::HuggingFace);
    assert!(report.fresh_decoder, "a ViTMAEModel folder must report a fresh decoder");
    assert!(report.ignored_config_fields.is_empty(), "{:?}", report.ignored_config_fields);
    let (full, _) = load_model(&fixtures().join("mae-tiny.hf"), None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(model.config, full.config);
    let mut checked = 0;
    for (name, var) in model.params().iter().filter(|(name, _)| !is_decoder_key(name)) {
        let want = full.params().iter().find(|(n, _)| n == name).map(|(_, v)| bits(v.as_tensor()));
        assert_eq!(Some(bits(var.as_tensor())), want, "{name}");
        checked += 1;
    }
    assert!(checked > 10, "only {checked} encoder parameters compared");
}

#[test]
fn hugging_face_config_fields_not_followed_are_reported() {
    let dir = TempDir::new("hf-ignored");
    let folder = hugging_face_with_config(&dir, "extra.hf", |c| {
        c["mask_ratio"] = 0.6.into();
        c["hidden_dropout_prob"] = 0.1.into();
        c["attention_probs_dropout_prob"] = 0.0.into();
        c["initializer_range"] = 0.01.into();
        c["transformers_version"] = "5.25.0".into();
        c["a_newer_field"] = true.into();
    });
    let (_, report) = load_model(&folder, None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(report.ignored_config_fields, ["a_newer_field", "hidden_dropout_prob", "mask_ratio"]);
    let (_, report) = load_model(&fixtures().join("mae-tiny.hf"), None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert!(report.ignored_config_fields.is_empty(), "{:?}", report.ignored_config_fields);

    // Fields that would change what the model computes are refused, not listed.
    let relu = hugging_face_with_config(&dir, "relu.hf", |c| c["hidden_act"] = "relu".into());
    let no_bias = hugging_face_with_config(&dir, "no-qkv-bias.hf", |c| c["qkv_bias"] = false.into());
    for (path, field) in [(relu, "hidden_act"), (no_bias, "qkv_bias")] {
        let e = load_err(&path, None);
        assert_eq!(e.code, ErrorCode::InvalidConfig, "{e}");
        assert!(e.message.contains(field), "{}", e.message);
    }
}

#[test]
fn pth_without_config_needs_head_counts() {
    for name in ["mae-tiny.pth", "mae-tiny-normpix.pth"] {
        let e = load_err(&fixtures().join(name), None);
        assert_eq!(e.code, ErrorCode::InvalidConfig, "{name}: {e}");
        assert!(e.message.contains("numHeads"), "{name}: the message should mention numHeads: {}", e.message);
    }
    // With only the head counts given, the rest comes from the shapes.
    let heads = ConfigPatch { num_heads: Some(3), decoder_num_heads: Some(4), ..Default::default() };
    let (model, report) = load_model(&fixtures().join("mae-tiny.pth"), Some(&heads), &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(report.format, CheckpointFormat::Pth);
    assert!(!report.fresh_decoder);
    let c = &model.config;
    assert_eq!(
        (c.img_size, c.patch_size, c.in_chans, c.embed_dim, c.depth, c.decoder_embed_dim, c.decoder_depth, c.mlp_ratio),
        (32, 4, 3, 48, 2, 32, 2, 4.0)
    );
}

#[test]
fn encoder_mask_token_survives_save_and_load() {
    let config = MaeConfig { encoder_mask_token: true, ..round_trip_config() };
    let model = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, 4).unwrap();
    let dir = TempDir::new("encoder-mask-token");
    let path = dir.join("model.safetensors");
    save_model(&model, &path).unwrap();
    let (loaded, _) = load_model(&path, None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(loaded.config, config);
    let token = |m: &MaskedAutoencoder| m.params().iter().find(|(n, _)| n == "encoder_mask_token").map(|(_, v)| bits(v.as_tensor()));
    assert_eq!(token(&loaded), token(&model));
    assert!(token(&model).is_some());
}

// ---------------------------------------------------------------- oversized configs

/// The tiny fixture rewritten with its `__metadata__.config` changed by `edit`.
fn fixture_with_config(dir: &TempDir, name: &str, keep: impl Fn(&str) -> bool, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let (tensors, mut metadata) = read_fixture("mae-tiny.weights.safetensors");
    let mut config: serde_json::Value = serde_json::from_str(&metadata["config"]).unwrap();
    edit(&mut config);
    metadata.insert("config".to_string(), config.to_string());
    let path = dir.join(name);
    write_safetensors(&path, &tensors.into_iter().filter(|(k, _)| keep(k)).collect(), Some(metadata));
    path
}

/// A copy of the tiny Hugging Face folder with `config.json` changed by `edit`.
fn hugging_face_with_config(dir: &TempDir, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let folder = dir.join(name);
    std::fs::create_dir(&folder).unwrap();
    let source = fixtures().join("mae-tiny.hf");
    std::fs::copy(source.join("model.safetensors"), folder.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(folder.join("config.json"), config.to_string()).unwrap();
    folder
}

#[test]
fn a_config_that_contradicts_the_tensors_is_refused_before_the_model_is_built() {
    // Each of these configs describes a model of hundreds of terabytes: building it
    // first aborted the process. The tensors are the tiny model's, so the load fails on
    // the first shape they contradict, having allocated nothing of the config's size.
    let dir = TempDir::new("contradicting");
    let metadata = fixture_with_config(&dir, "wide.safetensors", |_| true, |c| c["embed_dim"] = 3_000_000.into());
    let hf_wide = hugging_face_with_config(&dir, "hf-wide", |c| {
        c["hidden_size"] = 3_000_000.into();
        c["intermediate_size"] = 12_000_000.into();
    });
    let hf_decoder = hugging_face_with_config(&dir, "hf-decoder", |c| {
        c["decoder_hidden_size"] = 2_000_000.into();
        c["decoder_intermediate_size"] = 8_000_000.into();
    });
    for (path, first) in [(&metadata, "cls_token"), (&hf_wide, "cls_token"), (&hf_decoder, "decoder_blocks.0")] {
        let e = load_err(path, None);
        assert_eq!(e.code, ErrorCode::CheckpointShape, "{}: {e}", path.display());
        assert!(e.message.contains(first), "{}: the message should name {first}: {}", path.display(), e.message);
    }
}

// ---------------------------------------------------------------- crafted files

fn read_err(path: &Path) -> vit_mae_core::Error {
    match read_state_dict(path) {
        Ok(_) => panic!("reading {} should fail", path.display()),
        Err(e) => e,
    }
}

fn assert_corrupt(e: &vit_mae_core::Error, needles: &[&str]) {
    assert_eq!(e.code, ErrorCode::CheckpointCorrupt, "{e}");
    for needle in needles {
        assert!(e.message.contains(needle), "the message should say {needle:?}: {}", e.message);
    }
}

/// mae-tiny's head counts, which a `.pth` does not hold.
fn mae_tiny_heads() -> ConfigPatch {
    ConfigPatch { num_heads: Some(3), decoder_num_heads: Some(4), ..Default::default() }
}

/// Every tensor as a view of one shared storage, as `torch.save` keeps slices of one
/// buffer: a gap before each, offsets > 0, and matrices stored column-major (strides
/// `[1, rows]`, as a transposed tensor is).
fn shared_storage_state_dict(tensors: &BTreeMap<String, Tensor>) -> (Vec<(String, View)>, Storage) {
    let mut data = Vec::new();
    let mut views = Vec::new();
    for (name, t) in tensors {
        data.extend([f32::NAN; 3]);
        let offset = data.len() as i64;
        let sizes: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
        let view = if let [rows, _] = sizes[..] {
            data.extend(t.t().unwrap().contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            View { storage: 0, offset, sizes, strides: vec![1, rows] }
        } else {
            data.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            View { offset, ..View::contiguous(0, &sizes) }
        };
        views.push((name.clone(), view));
    }
    (views, Storage::f32("0", &data))
}

fn write_views(path: &Path, views: &[(String, View)], storages: &[Storage]) {
    let named: Vec<(&str, View)> = views.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
    write_state_dict(path, &named, storages);
}

#[test]
fn pth_views_of_one_storage_load_bit_exact() {
    // A tensor with storage_offset > 0 used to be refused ("needs 960 bytes but its
    // storage has 384": the offset was multiplied by the element size twice), and a
    // non-contiguous one could not be read.
    let dir = TempDir::new("pth-views");
    let (tensors, _) = read_fixture("mae-tiny.weights.safetensors");
    let (views, storage) = shared_storage_state_dict(&tensors);
    assert!(views.iter().any(|(_, v)| v.strides == [1, v.sizes[0]] && v.sizes[1] > 1), "some view is transposed");
    let path = dir.join("views.pth");
    write_views(&path, &views, &[storage]);
    let (model, report) = load_model(&path, Some(&mae_tiny_heads()), &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(report.format, CheckpointFormat::Pth);
    assert_holds(&model, &tensors);
}

#[test]
fn pth_views_read_the_elements_their_strides_select() {
    let dir = TempDir::new("pth-strides");
    let values: Vec<f32> = (0..200).map(|i| i as f32).collect();
    let view = View { storage: 0, offset: 37, sizes: vec![3, 2, 2], strides: vec![40, 7, 2] };
    let broadcast = View { storage: 0, offset: 5, sizes: vec![2, 3], strides: vec![0, 1] };
    let path = dir.join("strided.pth");
    write_state_dict(&path, &[("strided", view), ("broadcast", broadcast), ("empty", View::contiguous(0, &[0, 4]))], &[Storage::f32("0", &values)]);
    let state = read_state_dict(&path).unwrap();
    let expected: Vec<f32> = (0..3).flat_map(|i| (0..2).flat_map(move |j| (0..2).map(move |k| (37 + 40 * i + 7 * j + 2 * k) as f32))).collect();
    assert_eq!(state.tensors["strided"].dims(), [3, 2, 2]);
    assert_eq!(state.tensors["strided"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
    assert_eq!(state.tensors["broadcast"].to_vec2::<f32>().unwrap(), [[5.0, 6.0, 7.0], [5.0, 6.0, 7.0]]);
    assert_eq!(state.tensors["empty"].dims(), [0, 4]);
}

#[test]
fn pth_tensor_geometry_outside_its_storage_is_named() {
    // Such a tensor used to be passed over, so that the load failed with "lacks keys".
    let dir = TempDir::new("pth-geometry");
    let (tensors, _) = read_fixture("mae-tiny.weights.safetensors");
    let name = "blocks.0.norm1.weight";
    let cases = [
        ("past-end", View { storage: 0, offset: 1, sizes: vec![48], strides: vec![1] }, "reaches past the end of its storage"),
        ("strides", View { storage: 0, offset: 0, sizes: vec![48], strides: vec![1, 1] }, "has 1 sizes but 2 strides"),
        ("negative", View { storage: 0, offset: -4, sizes: vec![48], strides: vec![1] }, "negative offset, size or stride"),
        ("huge", View { storage: 0, offset: 0, sizes: vec![1 << 40, 1 << 30], strides: vec![0, 0] }, "more elements than the"),
    ];
    for (label, bad, problem) in cases {
        let mut storages = vec![Storage::f32("0", &[0.0; 48])];
        let mut views = vec![(name.to_string(), bad)];
        for (other, t) in tensors.iter().filter(|(n, _)| *n != name) {
            storages.push(Storage::f32(&storages.len().to_string(), &t.flatten_all().unwrap().to_vec1::<f32>().unwrap()));
            let sizes: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
            views.push((other.clone(), View::contiguous(storages.len() - 1, &sizes)));
        }
        let path = dir.join(&format!("{label}.pth"));
        write_views(&path, &views, &storages);
        assert_corrupt(&load_err(&path, Some(&mae_tiny_heads())), &[name, problem]);
    }
}

#[test]
fn a_config_the_tensors_allow_but_memory_does_not_is_out_of_memory() {
    // An encoder-only file does not hold the decoder its config describes: a decoder of
    // 2e6 wide blocks, whose parameters alone pass the 47-bit address space.
    let dir = TempDir::new("decoder-oom");
    let path = fixture_with_config(&dir, "encoder.safetensors", |k| !is_decoder_key(k), |c| {
        c["decoder_embed_dim"] = 2_000_000.into();
        c["decoder_num_heads"] = 4.into();
    });
    let e = load_err(&path, None);
    assert_eq!(e.code, ErrorCode::OutOfMemory, "{e}");
    assert!(e.message.contains("the model needs 384 TB"), "the message should give the size: {}", e.message);
}

#[test]
fn concurrent_saves_to_one_path_each_write_a_whole_file() {
    // Every save has a temporary file of its own: none fails for want of the one another
    // renamed away, and the file is always one model or the other, never a mix.
    let dir = TempDir::new("concurrent");
    let path = dir.join("m.safetensors");
    let models: Vec<MaskedAutoencoder> = (1..=2).map(|seed| MaskedAutoencoder::new(round_trip_config(), &Device::Cpu, Precision::F32, seed).unwrap()).collect();
    let expected: Vec<Vec<u8>> = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let alone = dir.join(&format!("alone-{i}.safetensors"));
            save_model(m, &alone).unwrap();
            let bytes = std::fs::read(&alone).unwrap();
            std::fs::remove_file(&alone).unwrap();
            bytes
        })
        .collect();
    std::thread::scope(|scope| {
        let savers: Vec<_> = (0..16).map(|i| scope.spawn({
            let (model, path) = (&models[i % 2], &path);
            move || (0..4).map(|_| save_model(model, path)).collect::<Vec<_>>()
        })).collect();
        for saver in savers {
            for result in saver.join().unwrap() {
                result.unwrap();
            }
        }
    });
    let written = std::fs::read(&path).unwrap();
    assert!(expected.contains(&written), "the file is neither model ({} bytes)", written.len());
    assert_eq!(dir.entries(), vec!["m.safetensors".to_string()], "temporary files were left behind");
}

#[test]
fn pth_storage_aliases_cannot_multiply_memory() {
    // Every alias of a storage used to be read in full before the keys were checked:
    // 3000 keys viewing one 4 MB storage took many gigabytes.
    let dir = TempDir::new("pth-aliases");
    let storage_len = 1 << 18;
    let aliases: Vec<String> = (0..100).map(|i| format!("alias.{i}")).collect();
    let path = dir.join("aliases.pth");
    let views: Vec<(String, View)> = aliases.iter().map(|n| (n.clone(), View::contiguous(0, &[storage_len]))).collect();
    write_views(&path, &views, &[Storage::f32("0", &vec![0.5; storage_len as usize])]);
    assert_corrupt(&read_err(&path), &["more than the", "views of one storage overlap"]);

    // A model load checks the names first, so the same aliases beside a whole model are
    // unknown keys, found before any tensor is read.
    let (tensors, _) = read_fixture("mae-tiny.weights.safetensors");
    let (mut views, model_storage) = shared_storage_state_dict(&tensors);
    views.extend(aliases.iter().map(|n| (n.clone(), View::contiguous(1, &[storage_len]))));
    let path = dir.join("model-and-aliases.pth");
    write_views(&path, &views, &[model_storage, Storage::f32("1", &vec![0.5; storage_len as usize])]);
    let e = load_err(&path, Some(&mae_tiny_heads()));
    assert_eq!(e.code, ErrorCode::CheckpointKeys, "{e}");
    assert!(e.message.contains("alias.0"), "{}", e.message);
}

#[test]
fn deeply_nested_pickle_is_refused_without_recursion() {
    // 300,000 nested one-element tuples (a 300 KB file) overflowed the stack of the
    // recursive unpickler used before and killed the process.
    let dir = TempDir::new("pth-nested");
    let mut pickle = Pickle::new();
    pickle.op(b")").op(&vec![0x85; 300_000]).op(b".");
    let path = dir.join("nested.pth");
    write_pth(&path, &pickle.to_vec(), &[]);
    assert_corrupt(&load_err(&path, None), &["objects nest deeper than 64 levels"]);
}

#[test]
fn pickle_limits_and_foreign_globals_are_named() {
    let dir = TempDir::new("pth-limits");
    let repeat = |op: &[u8], n: usize| op.repeat(n);
    let cases: [(&str, Vec<u8>, &str); 7] = [
        ("marks", repeat(b"(", 65), "MARKs nest deeper than 64 levels"),
        ("stack", repeat(b"N", (1 << 16) + 1), "stack grows past 65536 entries"),
        ("memo", [b")".to_vec(), repeat(&[0x94], (1 << 20) + 1)].concat(), "memo grows past 1048576 entries"),
        ("objects", [b"]".to_vec(), repeat(b"Na", 1 << 20)].concat(), "more than 1048576 objects"),
        ("global", b"cos\nsystem\n".to_vec(), "the Python global os.system"),
        ("opcode", b"I12\n".to_vec(), "opcode 0x49"),
        ("memo-get", b"h\x07".to_vec(), "memo entry 7, which was never stored"),
    ];
    for (label, body, needle) in cases {
        let mut pickle = Pickle::new();
        pickle.op(&body).op(b".");
        let path = dir.join(&format!("{label}.pth"));
        write_pth(&path, &pickle.to_vec(), &[]);
        assert_corrupt(&read_err(&path), &[needle]);
    }
}

#[test]
fn devices_and_fifos_are_refused_before_they_are_opened() {
    // /dev/zero used to be read forever, and opening a FIFO blocked.
    let dir = TempDir::new("special-files");
    assert_corrupt(&load_err(Path::new("/dev/zero"), None), &["/dev/zero is a character device, not a checkpoint file"]);
    let fifo = dir.join("pipe.pth");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    assert_corrupt(&load_err(&fifo, None), &["pipe.pth is a FIFO, not a checkpoint file"]);

    let hf = fixtures().join("mae-tiny.hf");
    let folder = dir.join("zero-config.hf");
    std::fs::create_dir(&folder).unwrap();
    std::os::unix::fs::symlink("/dev/zero", folder.join("config.json")).unwrap();
    std::fs::copy(hf.join("model.safetensors"), folder.join("model.safetensors")).unwrap();
    assert_corrupt(&load_err(&folder, None), &["config.json is a character device"]);
    let folder = dir.join("fifo-weights.hf");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(hf.join("config.json"), folder.join("config.json")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(folder.join("model.safetensors")).status().unwrap().success());
    assert_corrupt(&load_err(&folder, None), &["model.safetensors is a FIFO"]);
}

#[test]
fn declared_sizes_must_fit_the_file() {
    let dir = TempDir::new("declared-sizes");
    // A safetensors header length far past the end of the file.
    let mut huge_header = (u64::MAX / 2).to_le_bytes().to_vec();
    huge_header.extend_from_slice(b"{\"a\": 1}");
    let path = dir.join("huge-header.safetensors");
    std::fs::write(&path, huge_header).unwrap();
    assert_corrupt(&load_err(&path, None), &["header declares 9223372036854775807 bytes but only 8 follow"]);

    // A Hugging Face config.json far larger than any real one.
    let folder = dir.join("big-config.hf");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(fixtures().join("mae-tiny.hf/model.safetensors"), folder.join("model.safetensors")).unwrap();
    std::fs::write(folder.join("config.json"), format!("{{{}}}", " ".repeat(2 << 20))).unwrap();
    assert_corrupt(&load_err(&folder, None), &["config.json", "a Hugging Face config.json is a few kilobytes"]);

    // A .pth whose data.pkl declares a gigabyte (in both of the zip's records of it).
    let mut pth = pth_bytes(&state_dict_pickle(&[("w", View::contiguous(0, &[4]))], &[Storage::f32("0", &[1.0; 4])], true), &[Storage::f32("0", &[1.0; 4])]);
    let name = b"archive/data.pkl";
    for (signature, sizes_at, name_at) in [(b"PK\x03\x04", 18, 30), (b"PK\x01\x02", 20, 46)] {
        let at = (0..pth.len() - name_at - name.len())
            .find(|&i| pth[i..].starts_with(signature) && pth[i + name_at..].starts_with(name))
            .expect("the zip has a record of data.pkl");
        for field in [sizes_at, sizes_at + 4] {
            pth[at + field..at + field + 4].copy_from_slice(&(1u32 << 30).to_le_bytes());
        }
    }
    let path = dir.join("huge-pickle.pth");
    std::fs::write(&path, pth).unwrap();
    assert_corrupt(&load_err(&path, None), &["data.pkl declares 1073741824 bytes, more than the file holds"]);
}

#[test]
fn files_that_are_not_checkpoints_say_what_they_are_not() {
    // Both used to report a safetensors "header too large".
    let dir = TempDir::new("not-checkpoints");
    let mut legacy = vec![0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    legacy.extend_from_slice(b".\x80\x02M\xe9\x03.");
    let path = dir.join("legacy.pth");
    std::fs::write(&path, legacy).unwrap();
    assert_corrupt(&load_err(&path, None), &["legacy format of PyTorch before 1.6", "save it again with a current torch.save"]);
    let mut rng = crate::common::SplitMix(7);
    let random: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    let path = dir.join("random.bin");
    std::fs::write(&path, random).unwrap();
    assert_corrupt(&load_err(&path, None), &["is not a safetensors file, a zip PyTorch checkpoint or a Hugging Face folder"]);
}

#[test]
fn hugging_face_tensor_of_the_wrong_shape_is_a_shape_error() {
    // q, k and v of different shapes could not be stacked, which was reported as E_INTERNAL.
    let dir = TempDir::new("hf-shape");
    let folder = dir.join("model.hf");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(fixtures().join("mae-tiny.hf/config.json"), folder.join("config.json")).unwrap();
    let (mut tensors, _) = read_fixture("mae-tiny.hf/model.safetensors");
    let key = "vit.encoder.layer.0.attention.attention.key.weight";
    assert_eq!(tensors[key].dims(), [48, 48]);
    tensors.insert(key.to_string(), Tensor::zeros((48, 40), candle_core::DType::F32, &Device::Cpu).unwrap());
    write_safetensors(&folder.join("model.safetensors"), &tensors, None);
    let e = load_err(&folder, None);
    assert_eq!(e.code, ErrorCode::CheckpointShape, "{e}");
    for needle in [key, "[48, 40]", "[48, 48]", "blocks.0.attn.qkv.weight"] {
        assert!(e.message.contains(needle), "the message should say {needle:?}: {}", e.message);
    }
}

#[test]
fn floating_point_weights_are_converted_and_reported() {
    let dir = TempDir::new("dtypes");
    let (mut tensors, metadata) = read_fixture("mae-tiny.weights.safetensors");
    let stored = [("cls_token", DType::F64), ("norm.weight", DType::BF16), ("patch_embed.proj.weight", DType::F16)];
    for (name, dtype) in stored {
        tensors.insert(name.to_string(), tensors[name].to_dtype(dtype).unwrap());
    }
    let path = dir.join("mixed.safetensors");
    write_safetensors(&path, &tensors, Some(metadata));
    let (model, report) = load_model(&path, None, &Device::Cpu, Precision::F32, 0).unwrap();
    let converted: Vec<(&str, DType)> = report.converted.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    assert_eq!(converted, stored, "every converted tensor, by name");
    for (name, var) in model.params() {
        assert_eq!(bits(var.as_tensor()), bits(&tensors[name].to_dtype(DType::F32).unwrap()), "{name}");
    }

    // The same from a .pth holding a HalfStorage.
    let half = safetensors::View::data(&tensors["patch_embed.proj.weight"]).to_vec();
    let mut storages = vec![Storage { key: "0".to_string(), class: "HalfStorage", element_size: 2, bytes: half }];
    let mut views = vec![("patch_embed.proj.weight".to_string(), View::contiguous(0, &[48, 3, 4, 4]))];
    for (name, t) in tensors.iter().filter(|(n, _)| *n != "patch_embed.proj.weight") {
        storages.push(Storage::f32(&storages.len().to_string(), &t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()));
        views.push((name.clone(), View::contiguous(storages.len() - 1, &t.dims().iter().map(|&d| d as i64).collect::<Vec<_>>())));
    }
    let path = dir.join("half.pth");
    write_views(&path, &views, &storages);
    let (model, report) = load_model(&path, Some(&mae_tiny_heads()), &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(report.converted, BTreeMap::from([("patch_embed.proj.weight".to_string(), DType::F16)]));
    let loaded = &model.params().iter().find(|(n, _)| n == "patch_embed.proj.weight").unwrap().1;
    assert_eq!(bits(loaded.as_tensor()), bits(&tensors["patch_embed.proj.weight"].to_dtype(DType::F32).unwrap()));

    // An all-f32 checkpoint reports nothing.
    let (_, report) = load_model(&fixtures().join("mae-tiny.weights.safetensors"), None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert!(report.converted.is_empty());
}

#[test]
fn integer_weights_are_refused_but_batch_norm_counts_are_read() {
    // Integer weights used to be converted to f32 without a word.
    let dir = TempDir::new("int-weights");
    let name = "blocks.0.norm1.weight";
    for dtype in [DType::I64, DType::U8, DType::U32] {
        let (mut tensors, metadata) = read_fixture("mae-tiny.weights.safetensors");
        tensors.insert(name.to_string(), tensors[name].to_dtype(dtype).unwrap());
        let path = dir.join(&format!("{}.safetensors", dtype.as_str()));
        write_safetensors(&path, &tensors, Some(metadata));
        assert_corrupt(&load_err(&path, None), &[name, &format!("stored as {}", dtype.as_str()), "must be floating-point"]);
    }
    let path = dir.join("long.pth");
    let storage = Storage { key: "0".to_string(), class: "LongStorage", element_size: 8, bytes: vec![0; 48 * 8] };
    write_state_dict(&path, &[(name, View::contiguous(0, &[48]))], &[storage]);
    assert_corrupt(&read_err(&path), &[name, "stored as i64"]);
    let path = dir.join("bool.pth");
    let storage = Storage { key: "0".to_string(), class: "BoolStorage", element_size: 1, bytes: vec![1; 48] };
    write_state_dict(&path, &[(name, View::contiguous(0, &[48]))], &[storage]);
    assert_corrupt(&read_err(&path), &[name, "stored as BoolStorage"]);

    // PyTorch's BatchNorm keeps its step count as int64: read, and not a conversion.
    let state = read_state_dict(&fixtures().join("vit-linprobe.pth")).unwrap();
    assert_eq!(state.tensors["head.0.num_batches_tracked"].dims(), [0usize; 0]);
    assert!(state.converted.is_empty(), "{:?}", state.converted);
}

// ---------------------------------------------------------------- the PCA target

#[test]
fn pca_basis_round_trips_and_is_optional_but_whole() {
    let dir = TempDir::new("pca");
    let config = MaeConfig { target: Target::Pca { components: 5 }, ..round_trip_config() };
    let d = config.patch_dim();
    let mut model = MaskedAutoencoder::new(config.clone(), &Device::Cpu, Precision::F32, 3).unwrap();

    // Saved before a basis was fitted: loads without one.
    let bare = dir.join("bare.safetensors");
    save_model(&model, &bare).unwrap();
    assert!(!read_state_dict(&bare).unwrap().tensors.contains_key("pca_mean"));
    let (loaded, _) = load_model(&bare, None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(loaded.config, config);
    assert!(loaded.pca_basis().is_none());

    let mean = Tensor::arange(0f32, d as f32, &Device::Cpu).unwrap();
    let axes = Tensor::eye(d, candle_core::DType::F32, &Device::Cpu).unwrap().narrow(0, 2, 5).unwrap();
    model.set_pca_basis(&mean, &axes).unwrap();
    let path = dir.join("pca.safetensors");
    save_model(&model, &path).unwrap();
    let state = read_state_dict(&path).unwrap();
    assert_eq!(bits(&state.tensors["pca_mean"]), bits(&mean));
    assert_eq!(bits(&state.tensors["pca_components"]), bits(&axes));
    let json = state.config.as_ref().unwrap().known();
    assert_eq!((json["target"].clone(), json["pcaComponents"].clone()), (serde_json::json!("pca"), serde_json::json!(5)));
    let (loaded, _) = load_model(&path, None, &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(loaded.config, config);
    let basis = loaded.pca_basis().expect("the basis is loaded");
    assert_eq!((bits(&basis.mean), bits(&basis.components)), (bits(&mean), bits(&axes)));

    // The shapes tell a PCA target without the metadata: a state dict alone (as a .pth holds).
    let tensors: Vec<(String, vit_mae_core::checkpoint::Stored)> = state.tensors.iter().map(|(n, t)| (n.clone(), vit_mae_core::checkpoint::Stored::Tensor(t.clone()))).collect();
    let plain = dir.join("plain.safetensors");
    let explicit = ConfigPatch::from_json(&serde_json::json!({"numHeads": 5, "decoderNumHeads": 3, "layerNormEps": 1e-5, "mlpRatio": 3.0}), true).unwrap();
    vit_mae_core::checkpoint::save_tensors(tensors, serde_json::json!({}), Default::default(), &plain).unwrap();
    let (inferred, _) = load_model(&plain, Some(&explicit), &Device::Cpu, Precision::F32, 0).unwrap();
    assert_eq!(inferred.config, config);
    // Explicit fields that say "not normalised pixels" or "pca" keep what the file tells.
    for target in [serde_json::json!({"normPixLoss": false}), serde_json::json!({"target": "pca"}), serde_json::json!({"target": "pca", "normPixLoss": false})] {
        let mut fields = explicit.known();
        fields.extend(target.as_object().unwrap().clone());
        let explicit = ConfigPatch::from_json(&serde_json::Value::Object(fields), true).unwrap();
        for file in [&plain, &path] {
            let (loaded, _) = load_model(file, Some(&explicit), &Device::Cpu, Precision::F32, 0).unwrap_or_else(|e| panic!("{target} over {}: {e}", file.display()));
            assert_eq!(loaded.config, config, "{target} over {}", file.display());
        }
    }

    // Half a basis, or a basis for a pixel target, is refused.
    let half = dir.join("half.safetensors");
    let without_axes = state.tensors.iter().filter(|(n, _)| *n != "pca_components").map(|(n, t)| (n.clone(), vit_mae_core::checkpoint::Stored::Tensor(t.clone()))).collect();
    vit_mae_core::checkpoint::save_tensors(without_axes, config.to_published_json(), Default::default(), &half).unwrap();
    let e = load_model(&half, None, &Device::Cpu, Precision::F32, 0).err().unwrap();
    assert_eq!(e.code, ErrorCode::CheckpointKeys, "{}", e.message);
    assert!(e.message.contains("pca_mean") && e.message.contains("pca_components"), "{}", e.message);
    let pixels = ConfigPatch::from_json(&serde_json::json!({"target": "pixels"}), true).unwrap();
    let e = load_model(&path, Some(&pixels), &Device::Cpu, Precision::F32, 0).err().unwrap();
    assert!(matches!(e.code, ErrorCode::CheckpointKeys | ErrorCode::CheckpointShape), "{:?}: {}", e.code, e.message);
}
