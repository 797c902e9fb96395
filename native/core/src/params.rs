//! Trainable parameters, created in the published order with the published
//! initialisation, and kept under their published names.

use crate::device::Precision;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// How a parameter starts out (`_init_weights` of the published model).
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Zeros,
    Ones,
    /// `xavier_uniform_`: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)).
    XavierUniform { fan_in: usize, fan_out: usize },
    /// `normal_(std=...)`.
    Normal { std: f64 },
    /// U(-bound, bound), PyTorch's default for a conv bias: bound = 1/sqrt(fan_in).
    Uniform { bound: f64 },
    /// timm's `trunc_normal_(std=...)`: normal, redrawn outside the absolute bounds [-2, 2].
    TruncNormal { std: f64 },
}

impl Init {
    fn values(self, rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        match self {
            Init::Zeros => vec![0.0; len],
            Init::Ones => vec![1.0; len],
            Init::XavierUniform { fan_in, fan_out } => {
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                (0..len).map(|_| rng.random_range(-bound..bound) as f32).collect()
            }
            Init::Normal { std } => {
                let normal = Normal::new(0.0, std).expect("std is positive");
                (0..len).map(|_| normal.sample(rng) as f32).collect()
            }
            Init::Uniform { bound } => (0..len).map(|_| rng.random_range(-bound..bound) as f32).collect(),
            Init::TruncNormal { std } => {
                let normal = Normal::new(0.0, std).expect("std is positive");
                (0..len)
                    .map(|_| loop {
                        let v: f64 = normal.sample(rng);
                        if (-2.0..=2.0).contains(&v) {
                            break v as f32;
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The values of the parameters a builder creates, given name and shape.
pub type Values<'a> = Box<dyn FnMut(&str, &[usize]) -> Result<Vec<f32>> + 'a>;

/// Where a builder's parameter values come from.
enum Source<'a> {
    /// Drawn by each parameter's `Init` from one generator, in creation order.
    Init(ChaCha8Rng),
    /// Given (weights coming back from a training engine); the `Init` is not used.
    Given(Values<'a>),
    /// None: every parameter is empty (shape `[0]`), for a model whose weights are
    /// held elsewhere for a while.
    Hollow,
}

/// Creates parameters one by one and records them, in order, by name.
/// Parameters are always f32; `precision` tells the modules what to compute in.
pub struct ParamBuilder<'a> {
    source: Source<'a>,
    device: Device,
    precision: Precision,
    params: Vec<(String, Var)>,
}

impl<'a> ParamBuilder<'a> {
    pub fn new(rng: ChaCha8Rng, device: Device, precision: Precision) -> Self {
        ParamBuilder { source: Source::Init(rng), device, precision, params: Vec::new() }
    }

    /// A builder whose parameters take the values `values` gives for their name and shape.
    pub fn given(values: Values<'a>, device: Device, precision: Precision) -> Self {
        ParamBuilder { source: Source::Given(values), device, precision, params: Vec::new() }
    }

    /// A builder whose parameters are all empty.
    pub fn hollow(device: Device, precision: Precision) -> Self {
        ParamBuilder { source: Source::Hollow, device, precision, params: Vec::new() }
    }

    /// The dtype the modules being built run their matrix products in.
    pub fn compute_dtype(&self) -> DType {
        self.precision.compute_dtype()
    }

    /// A new trainable parameter; the returned tensor is the variable itself, so
    /// gradients and in-place updates reach the module that holds it.
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let (values, shape) = match &mut self.source {
            Source::Init(rng) => (init.values(rng, shape.iter().product()), shape),
            Source::Given(values) => (values(name, shape)?, shape),
            Source::Hollow => (Vec::new(), &[0][..]),
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, &self.device)?)?;
        let tensor = var.as_tensor().clone();
        self.params.push((name.to_string(), var));
        Ok(tensor)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn finish(self) -> Vec<(String, Var)> {
        self.params
    }
}
