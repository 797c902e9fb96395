//! Where tensors live. The model code only ever sees a `candle_core::Device`;
//! this module is the one place that turns a user's choice into one.

use crate::bail;
use crate::error::Result;
use candle_core::Device;

/// A user's device choice: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(DeviceSpec::Cuda(ordinal)),
                _ => bail!(InvalidArgument, "unknown device '{s}': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
            },
        }
    }

    /// The device to run on. `Auto` falls back to the CPU when no GPU works.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Auto => Ok(cuda_device(0).unwrap_or(Device::Cpu)),
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
