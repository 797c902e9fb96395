//! A native model shared by JS and the threads that work on it. Calls read it
//! concurrently; a training run has it to itself from the moment `pretrain` or
//! `finetune` returns its job until the job's last event, and every other call on the
//! model meanwhile fails at once with `E_BUSY` (none waits, and none sees weights
//! halfway through a step). The getters answer from facts fixed when the model was made.

use std::sync::atomic::{AtomicBool, Ordering};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
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
pub(crate) trait Model: Send + Sync + 'static {
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
    /// `None` once disposed.
    model: RwLock<Option<M>>,
    training: AtomicBool,
    disposed: AtomicBool,
    pub facts: Facts,
}

pub(crate) type Shared<M> = Arc<Cell<M>>;

fn error(code: ErrorCode, message: String) -> vit_mae_core::Error {
    vit_mae_core::Error::new(code, message)
}

/// A model read by a call.
pub(crate) struct Ref<'a, M>(RwLockReadGuard<'a, Option<M>>);

impl<M> Deref for Ref<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        self.0.as_ref().expect("a Ref is made only over a model that is there")
    }
}

/// A model held by its training run.
pub(crate) struct RefMut<'a, M>(RwLockWriteGuard<'a, Option<M>>);

impl<M> Deref for RefMut<'_, M> {
    type Target = M;
    fn deref(&self) -> &M {
        self.0.as_ref().expect("a RefMut is made only over a model that is there")
    }
}

impl<M> DerefMut for RefMut<'_, M> {
    fn deref_mut(&mut self) -> &mut M {
        self.0.as_mut().expect("a RefMut is made only over a model that is there")
    }
}

impl<M: Model> Cell<M> {
    pub fn new(model: M) -> Shared<M> {
        Arc::new(Cell { facts: model.facts(), model: RwLock::new(Some(model)), training: AtomicBool::new(false), disposed: AtomicBool::new(false) })
    }

    fn busy() -> vit_mae_core::Error {
        error(ErrorCode::Busy, format!("the {} is training: wait for its run to finish (or abort it) before using it", M::KIND))
    }

    fn disposed() -> vit_mae_core::Error {
        error(ErrorCode::Disposed, format!("the {} was disposed: its weights are freed", M::KIND))
    }

    fn poisoned() -> vit_mae_core::Error {
        error(ErrorCode::Internal, format!("{} lock poisoned by an earlier failure", M::KIND))
    }

    /// The model for a call that reads it; refused while it trains and once disposed.
    pub fn read(&self) -> vit_mae_core::Result<Ref<'_, M>> {
        if self.disposed.load(Ordering::SeqCst) {
            return Err(Self::disposed());
        }
        if self.training.load(Ordering::SeqCst) {
            return Err(Self::busy());
        }
        let guard = self.model.read().map_err(|_| Self::poisoned())?;
        if guard.is_none() {
            return Err(Self::disposed());
        }
        Ok(Ref(guard))
    }

    /// Claims the model for a training run, refused if one is under way or it was
    /// disposed. Every other call is refused from now until the claim is dropped.
    pub fn claim(self: &Arc<Self>) -> vit_mae_core::Result<Claim<M>> {
        if self.disposed.load(Ordering::SeqCst) {
            return Err(Self::disposed());
        }
        if self.training.swap(true, Ordering::SeqCst) {
            return Err(Self::busy());
        }
        Ok(Claim { cell: self.clone() })
    }

    /// Frees the weights: at once, or, if calls already computing are reading them, as
    /// soon as they finish (on a thread of its own, so JS never waits). Every call that
    /// has not started reading is refused with `E_DISPOSED`; the getters still answer.
    /// Refused while the model trains; a second dispose does nothing.
    pub fn dispose(self: &Arc<Self>) -> vit_mae_core::Result<()> {
        if self.training.load(Ordering::SeqCst) {
            return Err(Self::busy());
        }
        if self.disposed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let free = |slot: &mut Option<M>| {
            drop(slot.take());
            vit_mae_core::release_freed_memory();
        };
        match self.model.try_write() {
            Ok(mut slot) => free(&mut slot),
            Err(TryLockError::Poisoned(e)) => free(&mut e.into_inner()),
            Err(TryLockError::WouldBlock) => {
                let cell = self.clone();
                std::thread::Builder::new()
                    .name("vit-mae-dispose".into())
                    .spawn(move || free(&mut cell.model.write().unwrap_or_else(|e| e.into_inner())))
                    .map_err(|e| error(ErrorCode::Internal, format!("cannot start a thread to free the weights: {e}")))?;
            }
        }
        Ok(())
    }
}

/// A training run's hold on a model; dropping it (also when the run panics) lets other
/// calls in again.
pub(crate) struct Claim<M> {
    cell: Shared<M>,
}

impl<M: Model> Claim<M> {
    /// The model, exclusively: waits only for calls that had started before the claim.
    pub fn model(&self) -> vit_mae_core::Result<RefMut<'_, M>> {
        let guard = self.cell.model.write().map_err(|_| Cell::<M>::poisoned())?;
        if guard.is_none() {
            return Err(Cell::<M>::disposed());
        }
        Ok(RefMut(guard))
    }
}

impl<M> Drop for Claim<M> {
    fn drop(&mut self) {
        self.cell.training.store(false, Ordering::SeqCst);
    }
}
