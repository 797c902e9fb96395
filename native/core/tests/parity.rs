//! Parity with the PyTorch reference fixtures in `../shared/fixtures`
//! (override with VIT_MAE_FIXTURES): every MAE case, in all three checkpoint formats.

mod common;

use candle_core::{Device, Tensor};
use common::fixtures;
use std::collections::HashMap;
use vit_mae_core::classifier::load_classifier;
use vit_mae_core::{load_model, ConfigPatch, HostTensor, MaskOptions, Masking};

struct Case {
    tensors: HashMap<String, Tensor>,
    mask_ratio: f64,
    config: ConfigPatch,
}

fn read_case(name: &str) -> Case {
    let path = fixtures().join(format!("{name}.case.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["config"]).unwrap();
    Case {
        tensors: candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap(),
        mask_ratio: config["mask_ratio"].as_f64().unwrap(),
        config: ConfigPatch::from_json(&config, false).unwrap(),
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Within `tol` absolute or relative, elementwise.
fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    for (i, (g, w)) in values(got).iter().zip(values(want)).enumerate() {
        let err = (g - w).abs();
        assert!(err <= tol || err <= tol * w.abs(), "{name}[{i}]: got {g}, want {w}");
    }
}

/// Within `tol` of the expected tensor's largest magnitude.
fn assert_grad_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let want = values(want);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{name}: the fixture's gradient is all zero");
    for (i, (g, w)) in values(got).iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "{name}[{i}]: got {g}, want {w} (scale {scale})");
    }
}

/// `.pth` files hold only the state dict, whose shapes do not tell the head
/// counts of these tiny models: those loads get the config explicitly.
fn check_case(name: &str, checkpoint: &str) {
    let case = read_case(name);
    let explicit = checkpoint.ends_with(".pth").then_some(&case.config);
    let (model, report) = load_model(&fixtures().join(checkpoint), explicit, &Device::Cpu, 0).unwrap();
    assert!(!report.fresh_decoder);
    let imgs = &case.tensors["imgs"];
    let options = MaskOptions {
        mask_ratio: case.mask_ratio,
        masking: Masking::Random,
        noise: Some(HostTensor::from_tensor(&case.tensors["noise"]).unwrap()),
    };
    let out = model.forward(imgs, &options).unwrap();
    assert_close("loss", &out.loss.reshape(1).unwrap(), &case.tensors["loss"], 1e-4);
    assert_close("pred", &out.pred, &case.tensors["pred"], 1e-4);
    assert_close("mask", &out.mask, &case.tensors["mask"], 1e-4);
    assert_close("latent", &out.latent, &case.tensors["latent"], 1e-4);

    let (loss, grads) = model.loss_and_gradients(imgs, &options).unwrap();
    assert!((loss - values(&case.tensors["loss"])[0]).abs() <= 1e-4);
    let expected: Vec<&String> = case.tensors.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(grads.len(), expected.len(), "one gradient per trainable parameter");
    for (param, grad) in &grads {
        let want = case.tensors.get(&format!("grad.{param}")).unwrap_or_else(|| panic!("no fixture gradient for {param}"));
        assert_grad_close(param, grad, want, 1e-3);
    }
}

#[test]
fn mae_tiny_safetensors() {
    check_case("mae-tiny", "mae-tiny.weights.safetensors");
}

#[test]
fn mae_tiny_pth() {
    check_case("mae-tiny", "mae-tiny.pth");
}

#[test]
fn mae_tiny_hugging_face() {
    check_case("mae-tiny", "mae-tiny.hf");
}

#[test]
fn mae_tiny_normpix_safetensors() {
    check_case("mae-tiny-normpix", "mae-tiny-normpix.weights.safetensors");
}

#[test]
fn mae_tiny_normpix_pth() {
    check_case("mae-tiny-normpix", "mae-tiny-normpix.pth");
}

#[test]
fn mae_tiny_normpix_hugging_face() {
    check_case("mae-tiny-normpix", "mae-tiny-normpix.hf");
}

#[test]
fn sincos_table_matches_the_published_one() {
    for name in ["mae-tiny", "mae-tiny-normpix"] {
        let stored = candle_core::safetensors::load(fixtures().join(format!("{name}.weights.safetensors")), &Device::Cpu).unwrap();
        let model = vit_mae_core::MaskedAutoencoder::new(
            vit_mae_core::checkpoint::checkpoint_config(&fixtures().join(format!("{name}.weights.safetensors"))).unwrap(),
            &Device::Cpu,
            0,
        )
        .unwrap();
        for (key, table) in model.buffers() {
            assert_close(key, table, &stored[key], 1e-6);
        }
    }
}

/// A classifier case: logits, the label-smoothed loss and every gradient.
fn check_classifier_case(name: &str, checkpoint: &str) {
    let path = fixtures().join(format!("{name}.case.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["config"]).unwrap();
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    // `.pth` holds no config and a 48-wide encoder is no preset: give the head count.
    let explicit = checkpoint.ends_with(".pth").then(|| serde_json::json!({ "numHeads": config["num_heads"] }));
    let (classifier, _) = load_classifier(&fixtures().join(checkpoint), explicit.as_ref(), &Device::Cpu, 0).unwrap();
    assert_eq!(classifier.config.global_pool, config["global_pool"].as_bool().unwrap());
    let imgs = &tensors["imgs"];
    assert_close("logits", &classifier.forward(imgs).unwrap(), &tensors["logits"], 1e-4);

    let labels: Vec<i64> = tensors["labels"].to_vec1::<i64>().unwrap();
    let smoothing = config["smoothing"].as_f64().unwrap();
    let (loss, grads) = classifier.loss_and_gradients(imgs, &labels, smoothing).unwrap();
    assert!((loss - values(&tensors["loss"])[0]).abs() <= 1e-4, "loss {loss}");
    let expected: Vec<&String> = tensors.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(grads.len(), expected.len(), "one gradient per trainable parameter");
    for (param, grad) in &grads {
        let want = tensors.get(&format!("grad.{param}")).unwrap_or_else(|| panic!("no fixture gradient for {param}"));
        assert_grad_close(param, grad, want, 1e-3);
    }
}

#[test]
fn vit_cls_tiny_safetensors() {
    check_classifier_case("vit-cls-tiny", "vit-cls-tiny.weights.safetensors");
}

#[test]
fn vit_cls_tiny_pth() {
    check_classifier_case("vit-cls-tiny", "vit-cls-tiny.pth");
}
