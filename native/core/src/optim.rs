//! The optimizers of the published recipes (AdamW for pre-training and
//! fine-tuning, LARS for linear probing), their parameter groups, and the
//! learning-rate schedule.

use crate::checkpoint::Stored;
use crate::error::Result;
use crate::ops::{cpu_slice, cpu_slice_mut};
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// An optimizer over candle tensors: one update from gradients in parameter order.
pub trait Optimizer: OptimizerState {
    /// One update with `grads` given in parameter order, at base learning rate `lr`.
    fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()>;
    /// Whether that update would leave every parameter and buffer finite; changes nothing.
    fn step_stays_finite(&self, grads: &[Tensor], lr: f64) -> Result<bool>;
}

/// Whether tensors are all finite: the sum of `t - t`, which is 0 where `t` is finite and
/// NaN elsewhere, over every tensor added, kept on the device and read once.
#[derive(Default)]
struct FiniteCheck(Option<Tensor>);

impl FiniteCheck {
    #[allow(clippy::eq_op)] // `t - t` is the test: NaN exactly where `t` is not finite
    fn add(&mut self, t: &Tensor) -> Result<()> {
        let zeros = (t - t)?.sum_all()?.to_dtype(DType::F32)?;
        self.0 = Some(match self.0.take() {
            Some(sum) => (sum + zeros)?,
            None => zeros,
        });
        Ok(())
    }

    fn all_finite(self) -> Result<bool> {
        Ok(self.0.map_or(Ok(0.0), |sum| sum.to_scalar::<f32>())? == 0.0)
    }
}

/// What checkpoints need of an optimizer: its step count and buffers.
pub trait OptimizerState: Send {
    /// Updates taken (restored on resume).
    fn steps_taken(&self) -> u64;
    fn set_steps_taken(&mut self, steps: u64);
    /// Buffers by key (`<kind>.<param>`), for checkpoints. These are the live
    /// buffers, which the next step may update in place: write them out before it.
    fn state(&self) -> Vec<(String, Stored<'_>)>;
    /// Restores every buffer from `tensors` (keyed as `state` gives them).
    fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()>;
}

/// How one parameter is optimised: whether weight decay applies, and the factor on
/// the learning rate (layer-wise decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamGroup {
    pub decays: bool,
    pub lr_scale: f64,
}

/// The groups of `util/lr_decay.py`'s `param_groups_lrd` for a ViT of `depth` blocks:
/// layer 0 is the patch embedding, cls token and position embedding, block `i` is
/// layer `i + 1`, everything after is layer `depth + 1`; the scale is
/// `layer_decay^(depth + 1 - layer)`. 1-D parameters, `cls_token` and `pos_embed` do
/// not decay (`no_weight_decay()` of timm's ViT).
pub fn layer_decay_groups(params: &[(String, Var)], depth: usize, layer_decay: f64) -> Vec<ParamGroup> {
    let num_layers = depth + 1;
    params
        .iter()
        .map(|(name, var)| {
            let name = name.as_str();
            let layer = if name == "cls_token" || name == "pos_embed" || name.starts_with("patch_embed") {
                0
            } else if let Some(rest) = name.strip_prefix("blocks.") {
                rest.split('.').next().and_then(|i| i.parse::<usize>().ok()).map_or(num_layers, |i| i + 1)
            } else {
                num_layers
            };
            let decays = !(var.rank() == 1 || name == "cls_token" || name == "pos_embed");
            ParamGroup { decays, lr_scale: layer_decay.powi((num_layers - layer) as i32) }
        })
        .collect()
}

pub(crate) fn missing_state(kind: &str, name: &str) -> crate::error::Error {
    crate::error::Error::new(crate::error::ErrorCode::CheckpointKeys, format!("checkpoint lacks the optimizer state {kind} of {name}"))
}

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
    group: ParamGroup,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

impl Slot {
    /// The parameter and the moments after update number `t` with `grad`, computed with
    /// composed ops beside the current ones: `(param, exp_avg, exp_avg_sq)`.
    fn updated(&self, grad: &Tensor, config: &AdamWConfig, t: u64, update: &ParamUpdate) -> Result<(Tensor, Tensor, Tensor)> {
        let AdamWConfig { beta1, beta2, eps, .. } = *config;
        let exp_avg = ((&self.exp_avg * beta1)? + (grad * (1.0 - beta1))?)?;
        let exp_avg_sq = ((&self.exp_avg_sq * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
        let denom = ((exp_avg_sq.sqrt()? / (1.0 - beta2.powi(t as i32)).sqrt())? + eps)?;
        let step = (exp_avg.div(&denom)? * update.step_size as f64)?;
        let param = ((self.var.as_tensor() * update.decay_factor as f64)? - step)?;
        Ok((param, exp_avg, exp_avg_sq))
    }
}

impl AdamW {
    /// The pre-training groups: decay as `decays` says, one learning rate.
    pub fn new(params: &[(String, Var)], config: AdamWConfig) -> Result<Self> {
        let groups = params.iter().map(|(name, var)| ParamGroup { decays: decays(name, var.dims()), lr_scale: 1.0 }).collect();
        Self::with_groups(params, groups, config)
    }

    /// One group per parameter, in the same order.
    pub fn with_groups(params: &[(String, Var)], groups: Vec<ParamGroup>, config: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .zip(groups)
            .map(|((name, var), group)| {
                Ok(Slot { name: name.clone(), var: var.clone(), group, exp_avg: var.zeros_like()?, exp_avg_sq: var.zeros_like()? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { config, slots, step: 0 })
    }

    /// Names of the parameters in the decay and no-decay groups.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let decay = self.slots.iter().filter(|s| s.group.decays).map(|s| s.name.as_str()).collect();
        let no_decay = self.slots.iter().filter(|s| !s.group.decays).map(|s| s.name.as_str()).collect();
        (decay, no_decay)
    }

    /// One update with `grads` given in parameter order. On the CPU the moments and
    /// the parameter are updated in place, three passes over memory and no
    /// allocation; on CUDA (f32) likewise, in one kernel per parameter; elsewhere the
    /// same arithmetic as composed tensor ops.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig { beta1, beta2, .. } = self.config;
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let update = ParamUpdate::new(&self.config, self.step, lr, slot.group);
            let param = slot.var.as_tensor();
            if param.device().is_cpu() && param.dtype() == DType::F32 {
                let grad = grad.contiguous()?;
                slot.exp_avg.inplace_op2(&grad, &MomentUpdate { beta: beta1 as f32, square: false })?;
                slot.exp_avg_sq.inplace_op2(&grad, &MomentUpdate { beta: beta2 as f32, square: true })?;
                param.inplace_op3(&slot.exp_avg, &slot.exp_avg_sq, &update)?;
                continue;
            }
            #[cfg(feature = "cuda")]
            if param.device().is_cuda()
                && param.elem_count() > 0
                && [param.dtype(), grad.dtype(), slot.exp_avg.dtype(), slot.exp_avg_sq.dtype()].iter().all(|&d| d == DType::F32)
            {
                let fused = FusedAdamW { grad: grad.contiguous()?, beta1: beta1 as f32, beta2: beta2 as f32, update };
                param.inplace_op3(&slot.exp_avg, &slot.exp_avg_sq, &fused)?;
                continue;
            }
            let (param, exp_avg, exp_avg_sq) = slot.updated(grad, &self.config, self.step, &update)?;
            (slot.exp_avg, slot.exp_avg_sq) = (exp_avg, exp_avg_sq);
            slot.var.set(&param)?;
        }
        Ok(())
    }

    /// Whether [`AdamW::step`] would leave every parameter and moment finite; changes
    /// nothing. Computed with the composed ops of its portable path.
    pub fn step_stays_finite(&self, grads: &[Tensor], lr: f64) -> Result<bool> {
        let mut check = FiniteCheck::default();
        let t = self.step + 1;
        for (slot, grad) in self.slots.iter().zip(grads) {
            let (param, exp_avg, exp_avg_sq) = slot.updated(grad, &self.config, t, &ParamUpdate::new(&self.config, t, lr, slot.group))?;
            for updated in [&param, &exp_avg, &exp_avg_sq] {
                check.add(updated)?;
            }
        }
        check.all_finite()
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
        // Copies: the CPU update writes into these buffers in place.
        slot.exp_avg = exp_avg.to_device(&device)?.copy()?;
        slot.exp_avg_sq = exp_avg_sq.to_device(&device)?.copy()?;
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        AdamW::step(self, grads, lr)
    }

    fn step_stays_finite(&self, grads: &[Tensor], lr: f64) -> Result<bool> {
        AdamW::step_stays_finite(self, grads, lr)
    }
}

impl OptimizerState for AdamW {
    fn steps_taken(&self) -> u64 {
        self.step
    }

    fn set_steps_taken(&mut self, steps: u64) {
        self.step = steps;
    }

    fn state(&self) -> Vec<(String, Stored<'_>)> {
        AdamW::state(self)
            .flat_map(|(name, m, v)| [(format!("exp_avg.{name}"), Stored::Tensor(m.clone())), (format!("exp_avg_sq.{name}"), Stored::Tensor(v.clone()))])
            .collect()
    }

    fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
        for name in names {
            let get = |kind: &str| tensors.get(&format!("{kind}.{name}")).cloned().ok_or_else(|| missing_state(kind, &name));
            self.set_state(&name, get("exp_avg")?, get("exp_avg_sq")?)?;
        }
        Ok(())
    }
}

/// Elements per parallel chunk of the in-place updates.
const CHUNK: usize = 1 << 14;

/// An Adam moment in place: `m = beta * m + (1 - beta) * g` (`g * g` when `square`).
struct MomentUpdate {
    beta: f32,
    square: bool,
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(&self, moment: &mut CpuStorage, moment_l: &Layout, grad: &CpuStorage, grad_l: &Layout) -> candle_core::Result<()> {
        let (moment, grad) = (cpu_slice_mut(moment, moment_l)?, cpu_slice(grad, grad_l)?);
        let (beta, rest) = (self.beta, 1.0 - self.beta);
        moment.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)).for_each(|(m, g)| {
            if self.square {
                m.iter_mut().zip(g).for_each(|(m, &g)| *m = *m * beta + g * g * rest);
            } else {
                m.iter_mut().zip(g).for_each(|(m, &g)| *m = *m * beta + g * rest);
            }
        });
        Ok(())
    }
}

/// `torch.optim.AdamW`'s parameter update in place:
/// `p = p * decay_factor - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)`.
#[derive(Clone, Copy)]
struct ParamUpdate {
    decay_factor: f32,
    step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
}

impl ParamUpdate {
    /// The constants of update number `t` at base learning rate `lr` for a parameter of `group`.
    fn new(config: &AdamWConfig, t: u64, lr: f64, group: ParamGroup) -> Self {
        let lr = lr * group.lr_scale;
        ParamUpdate {
            decay_factor: if group.decays { 1.0 - lr * config.weight_decay } else { 1.0 } as f32,
            step_size: (lr / (1.0 - config.beta1.powi(t as i32))) as f32,
            bias_correction2_sqrt: (1.0 - config.beta2.powi(t as i32)).sqrt() as f32,
            eps: config.eps as f32,
        }
    }
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(&self, param: &mut CpuStorage, param_l: &Layout, m: &CpuStorage, m_l: &Layout, v: &CpuStorage, v_l: &Layout) -> candle_core::Result<()> {
        let param = cpu_slice_mut(param, param_l)?;
        let (m, v) = (cpu_slice(m, m_l)?, cpu_slice(v, v_l)?);
        let ParamUpdate { decay_factor, step_size, bias_correction2_sqrt, eps } = *self;
        param.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((p, m), v)| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                *p = *p * decay_factor - step_size * (m / (v.sqrt() / bias_correction2_sqrt + eps));
            }
        });
        Ok(())
    }
}

/// The whole AdamW update of one f32 parameter on CUDA, in one kernel: the moments (this
/// op's sources, which the kernel updates in place as well) as [`MomentUpdate`], then the
/// parameter as [`ParamUpdate`], with the same arithmetic.
#[cfg(feature = "cuda")]
struct FusedAdamW {
    grad: Tensor,
    beta1: f32,
    beta2: f32,
    update: ParamUpdate,
}

#[cfg(feature = "cuda")]
impl InplaceOp3 for FusedAdamW {
    fn name(&self) -> &'static str {
        "adamw-fused"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("adamw-fused runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        param: &mut candle_core::CudaStorage,
        param_l: &Layout,
        m: &candle_core::CudaStorage,
        m_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let ParamUpdate { decay_factor, step_size, bias_correction2_sqrt, eps } = self.update;
        let args = crate::cuda::AdamWArgs { beta1: self.beta1, beta2: self.beta2, decay_factor, step_size, bias_correction2_sqrt, eps };
        crate::cuda::adamw(param, param_l, &self.grad, m, m_l, v, v_l, args)
    }
}

/// `util/lars.py`: SGD with momentum whose update of each matrix is scaled by the
/// trust ratio `trust_coefficient * |w| / |g + wd * w|`; 1-D parameters get neither
/// weight decay nor the ratio.
pub struct Lars {
    pub weight_decay: f64,
    pub momentum: f64,
    pub trust_coefficient: f64,
    slots: Vec<(String, Var, Tensor)>,
    steps: u64,
}

impl Lars {
    /// The published linear-probe settings: momentum 0.9, trust coefficient 0.001.
    pub fn new(params: &[(String, Var)], weight_decay: f64) -> Result<Self> {
        let slots = params.iter().map(|(n, v)| Ok((n.clone(), v.clone(), v.zeros_like()?))).collect::<Result<Vec<_>>>()?;
        Ok(Lars { weight_decay, momentum: 0.9, trust_coefficient: 0.001, slots, steps: 0 })
    }
}

impl Lars {
    /// A parameter and its momentum after an update with `grad`: `(param, mu)`.
    fn updated(&self, param: &Tensor, mu: &Tensor, grad: &Tensor, lr: f64) -> Result<(Tensor, Tensor)> {
        let mut dp = grad.clone();
        if param.rank() > 1 {
            dp = (dp + (param * self.weight_decay)?)?;
            let param_norm = param.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
            let update_norm = dp.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
            if param_norm > 0.0 && update_norm > 0.0 {
                dp = (dp * (self.trust_coefficient * param_norm / update_norm))?;
            }
        }
        let mu = ((mu * self.momentum)? + dp)?;
        Ok(((param - (&mu * lr)?)?, mu))
    }
}

impl Optimizer for Lars {
    fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.steps += 1;
        for (i, grad) in grads.iter().enumerate().take(self.slots.len()) {
            let (_, var, mu) = &self.slots[i];
            let (param, mu) = self.updated(var.as_tensor(), mu, grad, lr)?;
            var.set(&param)?;
            self.slots[i].2 = mu;
        }
        Ok(())
    }

    fn step_stays_finite(&self, grads: &[Tensor], lr: f64) -> Result<bool> {
        let mut check = FiniteCheck::default();
        for ((_, var, mu), grad) in self.slots.iter().zip(grads) {
            let (param, mu) = self.updated(var.as_tensor(), mu, grad, lr)?;
            check.add(&param)?;
            check.add(&mu)?;
        }
        check.all_finite()
    }
}

impl OptimizerState for Lars {
    fn steps_taken(&self) -> u64 {
        self.steps
    }

    fn set_steps_taken(&mut self, steps: u64) {
        self.steps = steps;
    }

    fn state(&self) -> Vec<(String, Stored<'_>)> {
        self.slots.iter().map(|(name, _, mu)| (format!("momentum.{name}"), Stored::Tensor(mu.clone()))).collect()
    }

    fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var, mu) in &mut self.slots {
            let t = tensors.get(&format!("momentum.{name}")).ok_or_else(|| missing_state("momentum", name))?;
            if t.dims() != var.dims() {
                crate::bail!(CheckpointShape, "optimizer state for {name} has the wrong shape");
            }
            *mu = t.to_device(var.device())?;
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    clip_to_norm(grads, norm, max_norm)?;
    Ok(norm)
}

/// [`clip_grad_norm`] given the gradients' global norm `norm`.
pub fn clip_to_norm(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    if let Some(scale) = clip_factor(norm, max_norm) {
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(())
}

/// The factor `clip_grad_norm_` scales gradients of global norm `norm` by, when it
/// scales them: `max_norm / (norm + 1e-6)` below 1.
pub(crate) fn clip_factor(norm: f64, max_norm: f64) -> Option<f64> {
    let scale = max_norm / (norm + 1e-6);
    (scale < 1.0).then_some(scale)
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
