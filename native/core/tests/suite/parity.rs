//! Parity with the PyTorch reference fixtures: the repository's own (`test/fixtures`),
//! and those of an independent implementation in `../shared/fixtures` (or
//! VIT_MAE_FIXTURES) when present. Every case, in every checkpoint format it has, in f32
//! and bf16, on the CPU or the device named by VIT_MAE_TEST_DEVICE.

use candle_core::{Device, Tensor};
use crate::common::{dirs_with, test_device};
use std::path::Path;
use std::collections::HashMap;
use vit_mae_core::classifier::load_classifier;
use vit_mae_core::pca::PatchMoments;
use vit_mae_core::{load_model, ConfigPatch, HostTensor, MaskOptions, Masking, Precision};

struct Case {
    tensors: HashMap<String, Tensor>,
    mask_ratio: f64,
    config: ConfigPatch,
}

fn read_case(dir: &Path, name: &str) -> Case {
    let path = dir.join(format!("{name}.case.safetensors"));
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

/// How closely a run in `precision` must match the fixtures.
struct Tolerance {
    precision: Precision,
    /// Outputs: f32 elementwise (absolute or relative), bf16 relative to the tensor's
    /// largest magnitude.
    outputs: f32,
    /// Relative to each gradient's largest magnitude.
    gradients: f32,
}

/// The fixtures' own tolerances for a correct f32 implementation (their README).
const F32: Tolerance = Tolerance { precision: Precision::F32, outputs: 1e-4, gradients: 1e-3 };

/// bf16 products keep 8 significant bits (relative rounding 2^-9 = 0.2%), and the
/// errors of a dozen rounded products and their backward add up: outputs within 1%,
/// gradients within 2% of each tensor's largest magnitude (measured on the CPU: 0.7%
/// and 1.1% at most).
const BF16: Tolerance = Tolerance { precision: Precision::Bf16, outputs: 1e-2, gradients: 2e-2 };

impl Tolerance {
    fn check_output(&self, name: &str, got: &Tensor, want: &Tensor) {
        match self.precision {
            Precision::F32 => assert_close(name, got, want, self.outputs),
            Precision::Bf16 => assert_grad_close(name, got, want, self.outputs),
        }
    }

    /// f32: absolute, as the fixtures' README; bf16: relative.
    fn check_loss(&self, got: f32, want: &Tensor) {
        let want = values(want)[0];
        let bound = match self.precision {
            Precision::F32 => self.outputs,
            Precision::Bf16 => self.outputs * want.abs(),
        };
        assert!((got - want).abs() <= bound, "loss: got {got}, want {want}");
    }
}

/// `.pth` files hold only the state dict, whose shapes do not tell the head
/// counts of these tiny models: those loads get the config explicitly.
fn check_case(name: &str, checkpoint: &str) {
    check_case_within(name, checkpoint, &F32);
}

fn check_case_within(name: &str, checkpoint: &str, tol: &Tolerance) {
    for dir in dirs_with(name) {
        check_case_in(&dir, name, checkpoint, tol);
    }
}

fn check_case_in(dir: &Path, name: &str, checkpoint: &str, tol: &Tolerance) {
    let case = read_case(dir, name);
    let explicit = checkpoint.ends_with(".pth").then_some(&case.config);
    let (model, report) = load_model(&dir.join(checkpoint), explicit, &test_device(), tol.precision, 0).unwrap();
    assert!(!report.fresh_decoder);
    // f32 on the CPU runs on the engine; bf16 and CUDA on the reference model.
    assert_eq!(model.uses_engine(), model.device().is_cpu() && tol.precision == Precision::F32);
    let imgs = &case.tensors["imgs"].to_device(model.device()).unwrap();
    let options = MaskOptions {
        mask_ratio: case.mask_ratio,
        masking: Masking::Random,
        noise: Some(HostTensor::from_tensor(&case.tensors["noise"]).unwrap()),
    };
    if model.uses_engine() {
        // The reference model, the tests' second oracle, matches the fixtures as well.
        let plan = model.mask_plan(imgs.dim(0).unwrap(), &options).unwrap();
        let out = model.forward_with_plan(imgs, &plan).unwrap();
        tol.check_loss(out.loss.to_scalar::<f32>().unwrap(), &case.tensors["loss"]);
        tol.check_output("reference pred", &out.pred, &case.tensors["pred"]);
        for (param, grad) in model.gradients(&out).unwrap() {
            assert_grad_close(&format!("reference {param}"), &grad, &case.tensors[&format!("grad.{param}")], tol.gradients);
        }
    }
    let out = model.forward(imgs, &options).unwrap();
    tol.check_loss(out.loss.to_scalar::<f32>().unwrap(), &case.tensors["loss"]);
    tol.check_output("pred", &out.pred, &case.tensors["pred"]);
    assert_close("mask", &out.mask, &case.tensors["mask"], 0.0);
    tol.check_output("latent", &out.latent, &case.tensors["latent"]);

    let (loss, grads) = model.loss_and_gradients(imgs, &options).unwrap();
    tol.check_loss(loss, &case.tensors["loss"]);
    let expected: Vec<&String> = case.tensors.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(grads.len(), expected.len(), "one gradient per trainable parameter");
    for (param, grad) in &grads {
        assert_eq!(grad.dtype(), candle_core::DType::F32, "{param}: gradients of the f32 master weights are f32");
        let want = case.tensors.get(&format!("grad.{param}")).unwrap_or_else(|| panic!("no fixture gradient for {param}"));
        assert_grad_close(param, grad, want, tol.gradients);
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

/// One channel, patch 7, five heads, mask ratio 0.6.
#[test]
fn mae_one_channel_patch7_in_every_format() {
    for checkpoint in ["mae-1ch-p7.weights.safetensors", "mae-1ch-p7.pth", "mae-1ch-p7.hf"] {
        check_case("mae-1ch-p7", checkpoint);
    }
}

#[test]
fn mae_one_channel_patch7_normpix_in_every_format() {
    for checkpoint in ["mae-1ch-p7-normpix.weights.safetensors", "mae-1ch-p7-normpix.pth", "mae-1ch-p7-normpix.hf"] {
        check_case("mae-1ch-p7-normpix", checkpoint);
    }
}

/// An encoder-only checkpoint (as the published `mae_pretrain_vit_*.pth`): it loads with
/// a fresh decoder, and the encoder gives the reference latent.
#[test]
fn encoder_only_checkpoint_gives_the_reference_latent() {
    for dir in dirs_with("mae-encoder-only") {
        let case = read_case(&dir, "mae-encoder-only");
        for checkpoint in ["mae-encoder-only.weights.safetensors", "mae-encoder-only.pth"] {
            let explicit = checkpoint.ends_with(".pth").then_some(&case.config);
            let (model, report) = load_model(&dir.join(checkpoint), explicit, &test_device(), Precision::F32, 0).unwrap();
            assert!(report.fresh_decoder, "{checkpoint}: the decoder must be fresh");
            let options = MaskOptions { mask_ratio: case.mask_ratio, masking: Masking::Random, noise: Some(HostTensor::from_tensor(&case.tensors["noise"]).unwrap()) };
            let out = model.forward(&case.tensors["imgs"].to_device(model.device()).unwrap(), &options).unwrap();
            assert_close("mask", &out.mask, &case.tensors["mask"], 0.0);
            F32.check_output("latent", &out.latent, &case.tensors["latent"]);
        }
    }
}

/// The PCA target (the paper's Table 1d): the checkpoints hold the basis the reference
/// fitted (`pca_mean`, `pca_components`), and the model predicts 10 coefficients a patch.
#[test]
fn mae_tiny_pca_in_both_formats() {
    for checkpoint in ["mae-tiny-pca.weights.safetensors", "mae-tiny-pca.pth"] {
        check_case("mae-tiny-pca", checkpoint);
    }
}

#[test]
fn mae_tiny_pca_bf16() {
    check_case_within("mae-tiny-pca", "mae-tiny-pca.weights.safetensors", &BF16);
}

/// The basis fitted here on the case's `pca_sample` is the reference's (torch.linalg.eigh of
/// the patches' covariance): the mean, and every axis up to its sign.
#[test]
fn pca_basis_fit_matches_the_reference() {
    for dir in dirs_with("mae-tiny-pca") {
        let case = read_case(&dir, "mae-tiny-pca");
        let config = case.config.complete().unwrap();
        let k = config.target.pca_components().expect("a PCA case");
        let stored = candle_core::safetensors::load(dir.join("mae-tiny-pca.weights.safetensors"), &Device::Cpu).unwrap();
        let sample = &case.tensors["pca_sample"];
        let n = sample.dim(0).unwrap();
        let mut moments = PatchMoments::new(config.patch_dim()).unwrap();
        moments.add_images(&values(sample), n, config.in_chans, config.img_size, config.patch_size).unwrap();
        let fit = moments.fit(k).unwrap();
        assert_eq!(fit.patches, n * config.num_patches());
        let d = config.patch_dim();
        for (i, (got, want)) in fit.mean.iter().zip(values(&stored["pca_mean"])).enumerate() {
            assert!((got - want as f64).abs() <= 1e-6, "pca_mean[{i}]: {got} against {want}");
        }
        let want = values(&stored["pca_components"]);
        for (axis, (got, want)) in fit.components.chunks(d).zip(want.chunks(d)).enumerate() {
            let dot: f64 = got.iter().zip(want).map(|(a, b)| a * *b as f64).sum();
            let sign = dot.signum();
            for (q, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((sign * g - *w as f64).abs() <= 1e-5, "axis {axis}[{q}]: {g} against {w} (up to sign)");
            }
        }
        assert!(fit.kept_variance() > 0.0 && fit.kept_variance() < 1.0);
    }
}

#[test]
fn sincos_table_matches_the_published_one() {
    for (dir, name) in ["mae-tiny", "mae-tiny-normpix", "mae-1ch-p7"].into_iter().flat_map(|name| dirs_with(name).into_iter().map(move |d| (d, name))) {
        let stored = candle_core::safetensors::load(dir.join(format!("{name}.weights.safetensors")), &Device::Cpu).unwrap();
        let model = vit_mae_core::MaskedAutoencoder::new(
            vit_mae_core::checkpoint::checkpoint_config(&dir.join(format!("{name}.weights.safetensors"))).unwrap(),
            &Device::Cpu,
            Precision::F32,
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
    check_classifier_case_within(name, checkpoint, &F32);
}

fn check_classifier_case_within(name: &str, checkpoint: &str, tol: &Tolerance) {
    for dir in dirs_with(name) {
        check_classifier_case_in(&dir, name, checkpoint, tol);
    }
}

fn check_classifier_case_in(dir: &Path, name: &str, checkpoint: &str, tol: &Tolerance) {
    let path = dir.join(format!("{name}.case.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {} missing: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["config"]).unwrap();
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    // `.pth` holds no config and a 48-wide encoder is no preset: give the head count.
    let explicit = checkpoint.ends_with(".pth").then(|| serde_json::json!({ "numHeads": config["num_heads"] }));
    let (classifier, _) = load_classifier(&dir.join(checkpoint), explicit.as_ref(), &test_device(), tol.precision, 0).unwrap();
    assert_eq!(classifier.config.global_pool, config["global_pool"].as_bool().unwrap());
    assert_eq!(classifier.uses_engine(), classifier.device().is_cpu() && tol.precision == Precision::F32);
    let imgs = &tensors["imgs"].to_device(classifier.device()).unwrap();
    if classifier.uses_engine() {
        // The reference model matches the fixtures as well.
        let reference = classifier.forward_mode(imgs, &mut vit_mae_core::classifier::ForwardMode::eval()).unwrap();
        tol.check_output("reference logits", &reference, &tensors["logits"]);
    }
    tol.check_output("logits", &classifier.forward(imgs).unwrap(), &tensors["logits"]);

    let labels: Vec<i64> = tensors["labels"].to_vec1::<i64>().unwrap();
    let smoothing = config["smoothing"].as_f64().unwrap();
    let (loss, grads) = classifier.loss_and_gradients(imgs, &labels, smoothing).unwrap();
    tol.check_loss(loss, &tensors["loss"]);
    let expected: Vec<&String> = tensors.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(grads.len(), expected.len(), "one gradient per trainable parameter");
    for (param, grad) in &grads {
        let want = tensors.get(&format!("grad.{param}")).unwrap_or_else(|| panic!("no fixture gradient for {param}"));
        assert_grad_close(param, grad, want, tol.gradients);
    }
}

#[test]
fn vit_cls_tiny_safetensors() {
    check_classifier_case("vit-cls-tiny", "vit-cls-tiny.weights.safetensors");
}

/// cls-token pooling with the final `norm`, one channel, patch 7, five heads.
#[test]
fn vit_cls_token_pooling() {
    check_classifier_case("vit-cls-token", "vit-cls-token.weights.safetensors");
    check_classifier_case("vit-cls-token", "vit-cls-token.pth");
}

/// The linear probe's head: BatchNorm (running statistics) before the linear layer.
#[test]
fn vit_linear_probe_head() {
    check_classifier_case("vit-linprobe", "vit-linprobe.weights.safetensors");
    check_classifier_case("vit-linprobe", "vit-linprobe.pth");
}

#[test]
fn vit_cls_tiny_pth() {
    check_classifier_case("vit-cls-tiny", "vit-cls-tiny.pth");
}

#[test]
fn mae_tiny_bf16() {
    check_case_within("mae-tiny", "mae-tiny.weights.safetensors", &BF16);
}

#[test]
fn mae_tiny_normpix_bf16() {
    check_case_within("mae-tiny-normpix", "mae-tiny-normpix.weights.safetensors", &BF16);
}

#[test]
fn vit_cls_tiny_bf16() {
    check_classifier_case_within("vit-cls-tiny", "vit-cls-tiny.weights.safetensors", &BF16);
}

/// bf16 really rounds the products: the same forward pass differs from f32's, by
/// about bf16's precision and no more than the tolerance.
#[test]
fn bf16_rounds_the_products() {
    let dir = crate::common::fixtures();
    let case = read_case(&dir, "mae-tiny");
    let path = dir.join("mae-tiny.weights.safetensors");
    let options = MaskOptions { mask_ratio: case.mask_ratio, masking: Masking::Random, noise: Some(HostTensor::from_tensor(&case.tensors["noise"]).unwrap()) };
    let pred = |precision| {
        let (model, _) = load_model(&path, None, &test_device(), precision, 0).unwrap();
        assert_eq!(model.precision(), precision);
        values(&model.forward(&case.tensors["imgs"].to_device(model.device()).unwrap(), &options).unwrap().pred)
    };
    let (f32s, bf16s) = (pred(Precision::F32), pred(Precision::Bf16));
    let scale = f32s.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_diff = f32s.iter().zip(&bf16s).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(max_diff > 1e-4 * scale, "bf16 output equals f32's: the products did not run in bf16");
    assert!(max_diff < BF16.outputs * scale, "bf16 output {max_diff} from f32's (scale {scale})");
}
