//! AdamW and the learning-rate schedule of the published pre-training recipe.

use crate::error::Result;
use candle_core::{Tensor, Var};

/// Whether a parameter is exempt from weight decay: 1-D parameters (norms,
/// biases) and anything named `*.bias`, as timm's `add_weight_decay` (used by
/// `main_pretrain.py`). The cls and mask tokens are 3-D and do decay.
pub fn decays(name: &str, shape: &[usize]) -> bool {
    !(shape.len() <= 1 || name.ends_with(".bias"))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The published pre-training values: betas (0.9, 0.95), weight decay 0.05.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 }
    }
}

/// `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments) over named
/// parameters with per-parameter weight-decay groups.
pub struct AdamW {
    pub config: AdamWConfig,
    /// (name, parameter, decays, first moment, second moment)
    slots: Vec<Slot>,
    /// Optimizer steps taken.
    pub step: u64,
}

struct Slot {
    name: String,
    var: Var,
    decays: bool,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl AdamW {
    pub fn new(params: &[(String, Var)], config: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    decays: decays(name, var.dims()),
                    exp_avg: var.zeros_like()?,
                    exp_avg_sq: var.zeros_like()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { config, slots, step: 0 })
    }

    /// Names of the parameters in the decay and no-decay groups.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let decay = self.slots.iter().filter(|s| s.decays).map(|s| s.name.as_str()).collect();
        let no_decay = self.slots.iter().filter(|s| !s.decays).map(|s| s.name.as_str()).collect();
        (decay, no_decay)
    }

    /// One update with `grads` given in parameter order.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - beta2.powi(self.step as i32);
        let step_size = lr / bias_correction1;
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let mut param = slot.var.as_tensor().clone();
            if slot.decays && weight_decay != 0.0 {
                param = (param * (1.0 - lr * weight_decay))?;
            }
            slot.exp_avg = ((&slot.exp_avg * beta1)? + (grad * (1.0 - beta1))?)?;
            slot.exp_avg_sq = ((&slot.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let denom = ((slot.exp_avg_sq.sqrt()? / bias_correction2.sqrt())? + eps)?;
            let update = (slot.exp_avg.div(&denom)? * step_size)?;
            slot.var.set(&(param - update)?)?;
        }
        Ok(())
    }

    /// The moments by name, for checkpoints: `(name, exp_avg, exp_avg_sq)`.
    pub fn state(&self) -> impl Iterator<Item = (&str, &Tensor, &Tensor)> {
        self.slots.iter().map(|s| (s.name.as_str(), &s.exp_avg, &s.exp_avg_sq))
    }

    /// Restores the moments of parameter `name`.
    pub fn set_state(&mut self, name: &str, exp_avg: Tensor, exp_avg_sq: Tensor) -> Result<()> {
        let Some(slot) = self.slots.iter_mut().find(|s| s.name == name) else {
            crate::bail!(CheckpointKeys, "optimizer state for unknown parameter {name}");
        };
        if exp_avg.dims() != slot.var.dims() || exp_avg_sq.dims() != slot.var.dims() {
            crate::bail!(CheckpointShape, "optimizer state for {name} has the wrong shape");
        }
        let device = slot.var.device().clone();
        slot.exp_avg = exp_avg.to_device(&device)?;
        slot.exp_avg_sq = exp_avg_sq.to_device(&device)?;
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Linear warm-up to `lr`, then a half-cycle cosine to `min_lr` (`util/lr_sched.py`).
/// `epoch` is fractional: `epoch + step_in_epoch / steps_per_epoch`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub epochs: f64,
}

impl LrSchedule {
    pub fn at(&self, epoch: f64) -> f64 {
        if epoch < self.warmup_epochs {
            self.lr * epoch / self.warmup_epochs
        } else {
            let progress = (epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs);
            self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}
