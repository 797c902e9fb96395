//! vit-mae-core: ViT-MAE ("Masked Autoencoders Are Scalable Vision Learners",
//! He et al. 2021) on candle, numerically matching the published PyTorch code.
//! Pure Rust; the Node binding lives in a crate of its own.

pub mod checkpoint;
pub mod classifier;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod finetune;
pub mod masking;
pub mod mixup;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod params;
pub mod pos_embed;
pub mod train;
pub mod visualize;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use candle_core;
pub use checkpoint::{load_model, read_state_dict, save_model, CheckpointFormat, LoadReport};
pub use config::{ConfigPatch, MaeConfig, PRESETS};
pub use device::DeviceSpec;
pub use error::{Error, ErrorCode, Result};
pub use masking::{MaskPlan, Masking};
pub use classifier::{ClassifierConfig, VitClassifier};
pub use model::{ForwardOutput, HostTensor, MaskOptions, MaskedAutoencoder, Pool, Reconstruction};
