//! Where tensors live. The model code only ever sees a `candle_core::Device`;
//! this module is the one place that turns a user's choice into one.

use crate::bail;
use crate::distributed::launch;
use crate::error::Result;
use candle_core::{DType, Device};

/// A user's device choice: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    /// `cuda`: this process's GPU (see [`DeviceSpec::resolve`]).
    AnyCuda,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::AnyCuda),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(DeviceSpec::Cuda(ordinal)),
                _ => bail!(InvalidArgument, "unknown device '{s}': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
            },
        }
    }

    /// The device to run on. `Auto` falls back to the CPU when no GPU works. `Auto` and
    /// `AnyCuda` take GPU 0, or, in a process an MPI launcher started, the GPU of its
    /// local rank (modulo the GPUs it sees), so the ranks on a machine share its GPUs
    /// one each, as `LOCAL_RANK` does for PyTorch.
    pub fn resolve(self) -> Result<Device> {
        let this_process_gpu = || launch::local_rank(|name| std::env::var(name).ok()).map_or(0, |local| local % cuda_device_count().max(1));
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => Ok(cuda_device(this_process_gpu()).unwrap_or(Device::Cpu)),
            DeviceSpec::AnyCuda => cuda_device(this_process_gpu()),
            DeviceSpec::Cuda(ordinal) => cuda_device(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        crate::error::Error::new(crate::error::ErrorCode::InvalidArgument, format!("CUDA device {ordinal} is not usable: {e}"))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    bail!(InvalidArgument, "this build of vit-mae has no CUDA support; use device 'cpu' or 'auto'")
}

/// The GPUs this process sees (0 when CUDA does not work).
#[cfg(feature = "cuda")]
fn cuda_device_count() -> usize {
    candle_core::cuda::cudarc::driver::CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device_count() -> usize {
    0
}

/// The arithmetic a model computes in. Parameters, gradients and optimizer state
/// are f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    /// Mixed precision as PyTorch's bf16 autocast: linear layers and attention's
    /// products run in bf16 on bf16 copies of the weights; the residual stream,
    /// LayerNorm, softmax and the loss stay f32.
    Bf16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => bail!(InvalidArgument, "unknown precision '{s}': expected 'f32' or 'bf16'"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The dtype of matrix products.
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// Lets f32 matrix products on CUDA use TF32 tensor cores (10-bit mantissa inputs,
/// f32 accumulation), for the whole process as PyTorch's
/// `torch.backends.cuda.matmul.allow_tf32`. Off by default; no effect on the CPU.
pub fn set_allow_tf32(allow: bool) {
    candle_core::cuda::set_gemm_reduced_precision_f32(allow);
}

/// A short name for the device, as users write it.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".to_string(),
        },
        _ => format!("{:?}", device.location()),
    }
}
