//! A native model shared by JS and the threads that work on it. Calls read it
//! concurrently; a training run has it to itself from the moment `pretrain` or
//! `finetune` returns its job until the job's last event, and every other call on the
//! model meanwhile fails at once with `E_BUSY` (none waits, and none sees weights
//! halfway through a step). The getters answer from facts fixed when the model was made.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use vit_mae_core::{ErrorCode, MaskedAutoencoder, VitClassifier};

/// What the getters report; a model's config, parameters and device never change.
pub(crate) struct Facts {
    pub config_json: String,
    pub parameter_count: f64,
    pub device: String,
    pub precision: String,
    pub shapes: Vec<(String, Vec<u32>)>,
}

/// A model the binding holds: its facts, for the getters.
pub(crate) trait Model {
    /// "model" or "classifier", for messages.
    const KIND: &'static str;
    fn facts(&self) -> Facts;
}

fn facts(config_json: serde_json::Result<String>, params: &[(String, vit_mae_core::candle_core::Var)], device: &vit_mae_core::candle_core::Device, precision: vit_mae_core::Precision) -> Facts {
    Facts {
        config_json: config_json.unwrap_or_default(),
        parameter_count: params.iter().map(|(_, v)| v.elem_count()).sum::<usize>() as f64,
        device: vit_mae_core::device::device_name(device),
        precision: precision.name().to_string(),
        shapes: params.iter().map(|(name, var)| (name.clone(), var.dims().iter().map(|&d| d as u32).collect())).collect(),
    }
}

impl Model for MaskedAutoencoder {
    const KIND: &'static str = "model";
    fn facts(&self) -> Facts {
        facts(serde_json::to_string(&self.config), self.params(), self.device(), self.precision())
    }
}

impl Model for VitClassifier {
    const KIND: &'static str = "classifier";
    fn facts(&self) -> Facts {
        facts(serde_json::to_string(&self.config), self.params(), self.device(), self.precision())
    }
}

/// The getters' form of `Facts::shapes`.
pub(crate) fn named_shapes(facts: &Facts) -> Vec<crate::NativeNamedShape> {
    facts.shapes.iter().map(|(name, shape)| crate::NativeNamedShape { name: name.clone(), shape: shape.clone() }).collect()
}

pub(crate) struct Cell<M> {
    model: RwLock<M>,
    training: AtomicBool,
    pub facts: Facts,
}

pub(crate) type Shared<M> = Arc<Cell<M>>;

fn error(code: ErrorCode, message: String) -> vit_mae_core::Error {
    vit_mae_core::Error::new(code, message)
}

impl<M: Model> Cell<M> {
    pub fn new(model: M) -> Shared<M> {
        Arc::new(Cell { facts: model.facts(), model: RwLock::new(model), training: AtomicBool::new(false) })
    }

    fn busy() -> vit_mae_core::Error {
        error(ErrorCode::Busy, format!("the {} is training: wait for its run to finish (or abort it) before using it", M::KIND))
    }

    /// The model for a call that reads it; refused while it trains.
    pub fn read(&self) -> vit_mae_core::Result<RwLockReadGuard<'_, M>> {
        if self.training.load(Ordering::SeqCst) {
            return Err(Self::busy());
        }
        self.model.read().map_err(|_| error(ErrorCode::Internal, format!("{} lock poisoned by an earlier failure", M::KIND)))
    }

    /// Claims the model for a training run, refused if one is under way. Every other call
    /// is refused from now until the claim is dropped.
    pub fn claim(self: &Arc<Self>) -> vit_mae_core::Result<Claim<M>> {
        if self.training.swap(true, Ordering::SeqCst) {
            return Err(Self::busy());
        }
        Ok(Claim { cell: self.clone() })
    }
}

/// A training run's hold on a model; dropping it (also when the run panics) lets other
/// calls in again.
pub(crate) struct Claim<M> {
    cell: Shared<M>,
}

impl<M: Model> Claim<M> {
    /// The model, exclusively: waits only for calls that had started before the claim.
    pub fn model(&self) -> vit_mae_core::Result<RwLockWriteGuard<'_, M>> {
        self.cell.model.write().map_err(|_| error(ErrorCode::Internal, format!("{} lock poisoned by an earlier failure", M::KIND)))
    }
}

impl<M> Drop for Claim<M> {
    fn drop(&mut self) {
        self.cell.training.store(false, Ordering::SeqCst);
    }
}
