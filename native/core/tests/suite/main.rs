//! The core's integration tests, as one test binary: linking each file as a binary of its
//! own (with the release profile's LTO) took most of `npm test`'s compile time. The
//! allocation count stays apart (`tests/allocations.rs`), as it needs a process in which
//! no other test allocates.

#[path = "../common/mod.rs"]
mod common;

mod checkpoints;
mod data;
mod data_parallel;
mod distributed;
mod engine;
mod errors;
mod features;
mod finetune;
mod fuzz;
mod model;
mod parity;
mod train;
