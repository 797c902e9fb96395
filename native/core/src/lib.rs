//! vit-mae-core: ViT-MAE ("Masked Autoencoders Are Scalable Vision Learners",
//! He et al. 2021) on candle, numerically matching the published PyTorch code.
//! Pure Rust; the Node binding lives in a crate of its own.

pub mod checkpoint;
pub mod classifier;
pub mod config;
#[cfg(feature = "cuda")] mod cuda;
pub mod data;
pub mod device;
pub mod distributed;
pub mod engine;
pub mod error;
pub mod features;
pub mod finetune;
pub mod masking;
pub mod memory;
pub mod mixup;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod params;
pub mod pca;
mod pth;
pub mod pos_embed;
pub mod recipe;
mod sgemm;
pub mod train;
pub mod visualize;

use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "mimalloc")]
type Allocator = mimalloc::MiMalloc;
#[cfg(not(feature = "mimalloc"))]
type Allocator = std::alloc::System;

#[global_allocator]
static ALLOCATOR: Counting<Allocator> = Counting(Allocator {});
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// The global allocator, counting the allocations it serves (one relaxed atomic add
/// each): the engine's promise that a step allocates nothing is checked with it.
struct Counting<A>(A);

// SAFETY: every call is forwarded unchanged to the wrapped allocator, which upholds the
// `GlobalAlloc` contract; the counter has no effect on the memory handed out.
unsafe impl<A: std::alloc::GlobalAlloc> std::alloc::GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        self.0.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        self.0.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        self.0.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        self.0.dealloc(ptr, layout)
    }
}

/// How many allocations (and reallocations) the process has made so far, on every thread.
pub fn allocation_count() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// mimalloc hands freed memory back to the OS 10 ms after it is freed. A training
/// step frees and reallocates the same large buffers, some only in the next step, so
/// every step page-faulted them back in and the kernel zeroed them again (224k page
/// faults per `base` step). A 10-second delay keeps them across steps (8k faults per
/// step) and still returns the memory soon after training stops. Set when the
/// library is loaded, unless the user chose `MIMALLOC_PURGE_DELAY`.
#[cfg(all(feature = "mimalloc", target_os = "linux"))]
#[used]
#[link_section = ".init_array"]
static SET_PURGE_DELAY: extern "C" fn() = {
    extern "C" fn set_purge_delay() {
        /// `mi_option_purge_delay` in mimalloc.h (the same index in v2 and v3).
        const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        const PURGE_DELAY_MS: std::ffi::c_long = 10_000;
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: sets one integer option; runs while the library loads.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
        }
    }
    set_purge_delay
};

/// Hands the memory freed so far back to the OS now rather than after the purge
/// delay: for a run that has just freed what it will not allocate again (a model's
/// weights, moved into a training engine).
pub fn release_freed_memory() {
    #[cfg(feature = "mimalloc")]
    // SAFETY: `mi_collect` only frees pages that hold no live allocation.
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
}

pub use candle_core;
pub use checkpoint::{load_model, read_state_dict, save_model, CheckpointFormat, LoadReport};
pub use config::{ConfigPatch, MaeConfig, Target, PRESETS};
pub use sgemm::{gemm_libraries, gemm_library, linear_products, openblas_core};
pub use device::{DeviceSpec, Precision};
pub use error::{Error, ErrorCode, Result};
pub use masking::{MaskPlan, Masking};
pub use classifier::{ClassifierConfig, VitClassifier};
pub use model::{ForwardOutput, HostTensor, MaskOptions, MaskedAutoencoder, Pool, Reconstruction};

#[cfg(all(test, feature = "mimalloc", target_os = "linux"))]
mod tests {
    #[test]
    fn mimalloc_purge_delay_is_set_on_load() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reads one integer option.
            assert_eq!(unsafe { libmimalloc_sys::mi_option_get(15) }, 10_000);
        }
    }
}
