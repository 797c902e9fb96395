//! The settings every training run has, whatever it trains: the optimizer, the
//! learning-rate schedule, checkpointing and the seed. `main_pretrain.py` and
//! `main_finetune.py` take the same arguments for them; only their defaults differ.

use crate::bail;
use crate::error::{Error, ErrorCode, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The shared part of `PretrainConfig` and `FinetuneConfig`, flattened into each (its
/// fields are top-level camelCase keys of their JSON, as before it was shared).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recipe {
    /// Length of the schedule; a fraction trains the nearest whole number of steps.
    pub epochs: f64,
    pub accum_iter: usize,
    /// Base learning rate: `lr = blr * effective_batch / 256`.
    pub blr: f64,
    /// Absolute learning rate; overrides `blr` when set.
    pub lr: Option<f64>,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Clip the global gradient norm to this value.
    pub clip_grad: Option<f64>,
    /// Seeds the recipe's own randomness (pre-training's masks, fine-tuning's drop
    /// path and mixing); the data order and augmentation have the loader's seed.
    pub seed: u64,
    /// Stop once this many optimizer steps have been taken in total.
    pub max_steps: Option<u64>,
    /// Folder for checkpoints; none are written without it.
    pub checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every this many optimizer steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Keep this many most recent checkpoints.
    pub keep_last: usize,
}

impl Recipe {
    pub fn validate(&self) -> Result<()> {
        if !(self.epochs.is_finite() && self.epochs > 0.0) {
            bail!(InvalidArgument, "epochs must be a positive number, got {}", self.epochs);
        }
        if self.accum_iter == 0 {
            bail!(InvalidArgument, "accumIter must be positive");
        }
        for (name, value) in [("blr", Some(self.blr)), ("lr", self.lr), ("minLr", Some(self.min_lr)), ("weightDecay", Some(self.weight_decay))] {
            if let Some(v) = value {
                if !(v.is_finite() && v >= 0.0) {
                    bail!(InvalidArgument, "{name} must be a non-negative number, got {v}");
                }
            }
        }
        // A warm-up as long as the run or longer is allowed: the rate then rises
        // linearly throughout, as the published schedule gives.
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0) {
            bail!(InvalidArgument, "warmupEpochs must be a non-negative number, got {}", self.warmup_epochs);
        }
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!(InvalidArgument, "{name} must be in [0, 1), got {beta}");
            }
        }
        if let Some(c) = self.clip_grad {
            if !(c.is_finite() && c > 0.0) {
                bail!(InvalidArgument, "clipGrad must be positive, got {c}");
            }
        }
        if self.keep_last == 0 {
            bail!(InvalidArgument, "keepLast must be at least 1");
        }
        Ok(())
    }

    /// The peak learning rate for a per-step batch of `batch_size`.
    pub fn peak_lr(&self, batch_size: usize) -> f64 {
        self.lr.unwrap_or(self.blr * (batch_size * self.accum_iter) as f64 / 256.0)
    }
}

/// `defaults` with the fields of the JSON object `options` (camelCase) on top; a null
/// keeps the default. A key that is not a field of `T` is refused rather than ignored,
/// so a misspelt option cannot silently train with the default. The fields are the
/// keys `defaults` serialises to: serde's `deny_unknown_fields` does not work with the
/// flattened `Recipe`. `what` names the options in messages ("pre-training").
pub(crate) fn from_json<T: Serialize + DeserializeOwned>(defaults: &T, options: &serde_json::Value, what: &str) -> Result<T> {
    let Some(options) = options.as_object() else {
        bail!(InvalidArgument, "{what} options must be an object, got {options}");
    };
    let mut merged = serde_json::to_value(defaults).map_err(|e| Error::new(ErrorCode::Internal, e.to_string()))?;
    let Some(fields) = merged.as_object_mut() else {
        bail!(Internal, "{what} options do not serialise to an object");
    };
    for (key, value) in options {
        if !fields.contains_key(key) {
            let known: Vec<&String> = fields.keys().collect();
            bail!(InvalidArgument, "unknown {what} option '{key}'; known options: {known:?}");
        }
        if !value.is_null() {
            fields.insert(key.clone(), value.clone());
        }
    }
    serde_json::from_value(merged).map_err(|e| Error::new(ErrorCode::InvalidArgument, format!("invalid {what} options: {e}")))
}

#[cfg(test)]
mod tests {
    use crate::error::ErrorCode;
    use crate::finetune::{FinetuneConfig, Protocol};
    use crate::train::PretrainConfig;
    use serde_json::{json, Value};

    /// The recipe JSON of a training checkpoint's `pretrain_config` as the code before
    /// the shared `Recipe` wrote it (`serde_json::to_string(&PretrainConfig::default())`).
    const PRETRAIN_DEFAULTS: &str = r#"{"epochs":400.0,"accumIter":1,"blr":0.00015,"lr":null,"minLr":0.0,"warmupEpochs":40.0,"weightDecay":0.05,"beta1":0.9,"beta2":0.95,"clipGrad":null,"maskRatio":0.75,"masking":"random","seed":0,"maxSteps":null,"checkpointDir":null,"checkpointEvery":0,"keepLast":3}"#;

    /// `finetune_config` as the code before the shared `Recipe` wrote it, per protocol.
    fn finetune_defaults(protocol: Protocol) -> &'static str {
        match protocol {
            Protocol::Finetune => r#"{"protocol":"finetune","partialBlocks":0,"epochs":50.0,"accumIter":1,"blr":0.001,"lr":null,"minLr":1e-6,"warmupEpochs":5.0,"weightDecay":0.05,"layerDecay":0.75,"beta1":0.9,"beta2":0.999,"clipGrad":null,"dropPath":0.1,"smoothing":0.1,"mixup":0.0,"cutmix":0.0,"mixupProb":1.0,"mixupSwitchProb":0.5,"seed":0,"maxSteps":null,"checkpointDir":null,"checkpointEvery":0,"keepLast":3}"#,
            Protocol::Partial => r#"{"protocol":"partial","partialBlocks":0,"epochs":50.0,"accumIter":1,"blr":0.001,"lr":null,"minLr":1e-6,"warmupEpochs":5.0,"weightDecay":0.05,"layerDecay":1.0,"beta1":0.9,"beta2":0.999,"clipGrad":null,"dropPath":0.1,"smoothing":0.1,"mixup":0.0,"cutmix":0.0,"mixupProb":1.0,"mixupSwitchProb":0.5,"seed":0,"maxSteps":null,"checkpointDir":null,"checkpointEvery":0,"keepLast":3}"#,
            Protocol::Linprobe => r#"{"protocol":"linprobe","partialBlocks":0,"epochs":90.0,"accumIter":1,"blr":0.1,"lr":null,"minLr":0.0,"warmupEpochs":10.0,"weightDecay":0.0,"layerDecay":1.0,"beta1":0.9,"beta2":0.999,"clipGrad":null,"dropPath":0.0,"smoothing":0.0,"mixup":0.0,"cutmix":0.0,"mixupProb":1.0,"mixupSwitchProb":0.5,"seed":0,"maxSteps":null,"checkpointDir":null,"checkpointEvery":0,"keepLast":3}"#,
        }
    }

    const PROTOCOLS: [Protocol; 3] = [Protocol::Finetune, Protocol::Partial, Protocol::Linprobe];

    #[test]
    fn defaults_and_their_json_are_unchanged() {
        let old: Value = serde_json::from_str(PRETRAIN_DEFAULTS).unwrap();
        assert_eq!(serde_json::to_value(PretrainConfig::default()).unwrap(), old, "pre-training");
        for protocol in PROTOCOLS {
            let old: Value = serde_json::from_str(finetune_defaults(protocol)).unwrap();
            assert_eq!(serde_json::to_value(FinetuneConfig::defaults(protocol)).unwrap(), old, "{protocol:?}");
        }
    }

    #[test]
    fn older_checkpoint_recipes_load() {
        let old: Value = serde_json::from_str(PRETRAIN_DEFAULTS).unwrap();
        assert_eq!(serde_json::from_value::<PretrainConfig>(old.clone()).unwrap(), PretrainConfig::default());
        assert_eq!(PretrainConfig::from_json(&old).unwrap(), PretrainConfig::default());
        for protocol in PROTOCOLS {
            let old: Value = serde_json::from_str(finetune_defaults(protocol)).unwrap();
            assert_eq!(serde_json::from_value::<FinetuneConfig>(old.clone()).unwrap(), FinetuneConfig::defaults(protocol), "{protocol:?}");
            assert_eq!(FinetuneConfig::from_json(&old).unwrap(), FinetuneConfig::defaults(protocol), "{protocol:?}");
        }
        // Checkpoints from before fractional epochs wrote them as integers.
        let mut old: Value = serde_json::from_str(PRETRAIN_DEFAULTS).unwrap();
        old["epochs"] = json!(400);
        old["checkpointDir"] = json!("runs/pretrain/checkpoints");
        let config = serde_json::from_value::<PretrainConfig>(old).unwrap();
        assert_eq!((config.recipe.epochs, config.recipe.checkpoint_dir.unwrap().to_str()), (400.0, Some("runs/pretrain/checkpoints")));
        let mut old: Value = serde_json::from_str(finetune_defaults(Protocol::Linprobe)).unwrap();
        old["epochs"] = json!(90);
        assert_eq!(serde_json::from_value::<FinetuneConfig>(old).unwrap(), FinetuneConfig::defaults(Protocol::Linprobe));
    }

    #[test]
    fn both_configs_refuse_an_unknown_key_and_name_it() {
        // Each config's own fields are unknown to the other.
        for (key, value) in [("epoch", json!(3)), ("layerDecay", json!(0.5)), ("lr_", Value::Null)] {
            let err = PretrainConfig::from_json(&json!({ key: value })).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
            assert!(err.message.contains(&format!("unknown pre-training option '{key}'")), "{err}");
        }
        for (key, value) in [("epoch", json!(3)), ("maskRatio", json!(0.5)), ("lr_", Value::Null)] {
            let err = FinetuneConfig::from_json(&json!({ "protocol": "finetune", key: value })).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{err}");
            assert!(err.message.contains(&format!("unknown fine-tuning option '{key}'")), "{err}");
        }
    }

    #[test]
    fn a_bad_shared_value_fails_alike_in_both_configs() {
        for (key, value, message) in [
            ("epochs", json!(0), "epochs must be a positive number, got 0"),
            ("accumIter", json!(0), "accumIter must be positive"),
            ("blr", json!(-1e-3), "blr must be a non-negative number, got -0.001"),
            ("lr", json!(-1), "lr must be a non-negative number, got -1"),
            ("minLr", json!(-1), "minLr must be a non-negative number, got -1"),
            ("weightDecay", json!(-0.05), "weightDecay must be a non-negative number, got -0.05"),
            ("warmupEpochs", json!(-1), "warmupEpochs must be a non-negative number, got -1"),
            ("beta1", json!(1.0), "beta1 must be in [0, 1), got 1"),
            ("beta2", json!(-0.1), "beta2 must be in [0, 1), got -0.1"),
            ("clipGrad", json!(0), "clipGrad must be positive, got 0"),
            ("keepLast", json!(0), "keepLast must be at least 1"),
        ] {
            let pretrain = PretrainConfig::from_json(&json!({ key: value })).unwrap_err();
            assert_eq!((pretrain.code, pretrain.message.as_str()), (ErrorCode::InvalidArgument, message), "pre-training {key}");
            for protocol in PROTOCOLS {
                let finetune = FinetuneConfig::from_json(&json!({ "protocol": protocol, key: value })).unwrap_err();
                assert_eq!((finetune.code, finetune.message.as_str()), (ErrorCode::InvalidArgument, message), "{protocol:?} {key}");
            }
        }
    }
}
