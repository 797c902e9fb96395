//! Batches of augmented images, decoded by worker threads ahead of the trainer.
//!
//! Reproducibility does not depend on scheduling: an epoch's order is a permutation
//! drawn from `(seed, epoch)` alone and each item's augmentation from `(seed, epoch,
//! dataset index)` alone, workers fill fixed slots, and batches are handed out in
//! order. So a batch is the same for any worker count, timing or starting batch.
//!
//! A loader can serve one shard of the data, as PyTorch's `DistributedSampler` does
//! for data-parallel training: every rank draws the same epoch order and batches its
//! own positions of it, while an item's augmentation stays keyed by its dataset index,
//! so it does not depend on which rank loads it.

use super::{below, stream_rng, Augment, Dataset, AUGMENT_STREAM, ORDER_STREAM};
use crate::bail;
use crate::error::{Error, ErrorCode, Result};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// How the loader batches, orders and parallelises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderOptions {
    /// Items per batch (the last batch of an epoch may be smaller unless `drop_last`).
    pub batch_size: usize,
    /// Seeds the epoch orders and every item's augmentation.
    pub seed: u64,
    /// A fresh permutation every epoch when true; dataset order when false.
    pub shuffle: bool,
    /// Leave out an epoch's final incomplete batch (as the published pre-training).
    pub drop_last: bool,
    /// Decode-and-augment threads, at least 1.
    pub workers: usize,
    /// Batches that may be ready (or in progress) ahead of the one being consumed, at
    /// least 1. Bounds memory: about `prefetch` batches of pixels are held.
    pub prefetch: usize,
    /// Leave items whose `Dataset::get` fails out of their batch (listing them in
    /// `Batch::skipped`) instead of ending the epoch with an error.
    pub skip_corrupt: bool,
    /// The part of every epoch this loader batches (all of it by default).
    pub shard: Shard,
}

/// Rank `rank` of `ranks` data-parallel processes, each batching every `ranks`-th
/// position of the epoch order from position `rank` on (`order[rank::ranks]`), as
/// PyTorch's `DistributedSampler`. With `drop_last` (training) the order is first
/// padded to a multiple of `ranks` by repeating its first items, so that every rank
/// takes as many steps; without it (evaluation) it is not, so that the ranks together
/// see every item exactly once (their shards differ in length by at most one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank, below `ranks`.
    pub rank: usize,
    /// The number of processes sharing the data, at least 1.
    pub ranks: usize,
}

impl Default for Shard {
    /// The whole epoch: rank 0 of 1.
    fn default() -> Self {
        Shard { rank: 0, ranks: 1 }
    }
}

impl Default for LoaderOptions {
    /// Pre-training defaults: batch 64, seed 0, shuffled, last batch dropped, one
    /// worker, two batches ahead, corrupt items fail.
    fn default() -> Self {
        LoaderOptions {
            batch_size: 64,
            seed: 0,
            shuffle: true,
            drop_last: true,
            workers: 1,
            prefetch: 2,
            skip_corrupt: false,
            shard: Shard::default(),
        }
    }
}

/// Refuses (`E_OUT_OF_MEMORY`) options whose pixels in flight cannot be allocated: up
/// to `prefetch + 1` batches of `[batch, C, S, S]`, and each worker's padded image.
/// Sizes counted in 128 bits, as a side of 2^32 squared overflows 64.
fn check_memory(augment: &Augment, options: &LoaderOptions) -> Result<()> {
    let (c, side) = (augment.channels as u128, augment.img_size as u128);
    let batch = (options.batch_size as u128).saturating_mul(c).saturating_mul(side).saturating_mul(side).saturating_mul(4);
    let batches = (options.prefetch as u128).saturating_add(1).saturating_mul(batch);
    let pad = augment.pad_to.map_or(0, |p| p as u128);
    let padded = (options.workers as u128).saturating_mul(c).saturating_mul(pad).saturating_mul(pad).saturating_mul(4);
    crate::memory::check(batches.saturating_add(padded), |bytes| {
        format!(
            "the data loader needs {bytes} for {} batches of {} images of {}x{side}x{side} ahead{}",
            options.prefetch + 1,
            options.batch_size,
            augment.channels,
            if pad > 0 { format!(" and {} images padded to {pad}x{pad}", options.workers) } else { String::new() }
        )
    })
}

/// One batch of model inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `[n, C, S, S]`, normalised.
    pub images: Vec<f32>,
    /// `[n, C, S, S]`. `n` is below the batch size for an epoch's last batch (without
    /// `drop_last`) or when items were skipped, and can be 0 when every item of the batch
    /// was skipped: the trainer then skips the batch but still counts it, so that batch
    /// numbers (and resuming) stay aligned with the epoch.
    pub shape: [usize; 4],
    /// The class of each image; empty when the dataset is unlabelled.
    pub labels: Vec<i64>,
    /// The dataset index of each image.
    pub indices: Vec<usize>,
    /// Items of this batch left out because they could not be decoded: dataset index
    /// and the error's message (which names the file).
    pub skipped: Vec<(usize, String)>,
}

/// Batches of a dataset, epoch by epoch.
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    augment: Arc<Augment>,
    options: LoaderOptions,
}

impl Loader {
    /// Validates the options and the augmentation; the dataset must not be empty.
    pub fn new(dataset: Arc<dyn Dataset>, augment: Augment, options: LoaderOptions) -> Result<Loader> {
        if options.batch_size == 0 {
            bail!(InvalidArgument, "batchSize must be at least 1");
        }
        if options.workers == 0 {
            bail!(InvalidArgument, "workers must be at least 1");
        }
        if options.prefetch == 0 {
            bail!(InvalidArgument, "prefetch must be at least 1");
        }
        let Shard { rank, ranks } = options.shard;
        if ranks == 0 {
            bail!(InvalidArgument, "ranks must be at least 1");
        }
        if rank >= ranks {
            bail!(InvalidArgument, "rank must be below ranks ({ranks}), got {rank}");
        }
        augment.validate()?;
        check_memory(&augment, &options)?;
        if dataset.is_empty() {
            bail!(InvalidArgument, "dataset {} is empty", dataset.describe());
        }
        Ok(Loader { dataset, augment: Arc::new(augment), options })
    }

    /// This loader's data and options serving `shard` instead: for a process that learns
    /// its rank only once it has joined its group.
    pub fn sharded(&self, shard: Shard) -> Result<Loader> {
        let options = LoaderOptions { shard, ..self.options.clone() };
        Loader::new(self.dataset.clone(), (*self.augment).clone(), options)
    }

    /// The length of an epoch's order before it is sharded: the dataset's, padded under
    /// `drop_last` to a multiple of `ranks` (see [`Shard`]).
    fn padded_len(&self) -> usize {
        let (len, ranks) = (self.dataset.len(), self.options.shard.ranks);
        if self.options.drop_last {
            len.div_ceil(ranks) * ranks
        } else {
            len
        }
    }

    /// Items of an epoch in this loader's shard: the padded order's positions `rank,
    /// rank + ranks, ...`.
    fn shard_len(&self) -> usize {
        let Shard { rank, ranks } = self.options.shard;
        self.padded_len().saturating_sub(rank).div_ceil(ranks)
    }

    /// Batches in every epoch: the shard's items over `batch_size`, rounded down with
    /// `drop_last` and up without.
    pub fn batches_per_epoch(&self) -> usize {
        let (len, size) = (self.shard_len(), self.options.batch_size);
        if self.options.drop_last {
            len / size
        } else {
            len.div_ceil(size)
        }
    }

    /// Items an epoch yields (fewer than the shard holds under `drop_last`).
    pub fn images_per_epoch(&self) -> usize {
        if self.options.drop_last {
            self.batches_per_epoch() * self.options.batch_size
        } else {
            self.shard_len()
        }
    }

    /// Which shard of the data this loader serves.
    pub fn shard(&self) -> Shard {
        self.options.shard
    }

    /// Items per (full) batch.
    pub fn batch_size(&self) -> usize {
        self.options.batch_size
    }

    /// What the dataset is, for messages (its folder or file, and size).
    pub fn describe(&self) -> String {
        self.dataset.describe()
    }

    /// The dataset indices of `epoch` in the order this loader batches them: every
    /// `ranks`-th position, from `rank` on, of the epoch's order (see [`Shard`]), which is
    /// a Fisher-Yates permutation from the `(seed, epoch)` stream when shuffling, else
    /// `0..len`, padded under `drop_last` to a multiple of `ranks` by repeating its first
    /// items (cyclically, should the padding outnumber them, as PyTorch).
    pub fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let len = self.dataset.len();
        let mut order: Vec<usize> = (0..len).collect();
        if self.options.shuffle {
            let mut rng = stream_rng(self.options.seed, epoch as u64, ORDER_STREAM, 0);
            for i in (1..order.len()).rev() {
                let j = below(&mut rng, i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        let Shard { rank, ranks } = self.options.shard;
        (rank..self.padded_len()).step_by(ranks).map(|position| order[position % len]).collect()
    }

    /// Batches of `epoch`, starting at batch `start_batch` (for exact resume), produced by
    /// `workers` threads with up to `prefetch` batches ready ahead; dropping the iterator
    /// stops the workers promptly (each finishes at most the item it is on). The
    /// iterator ends after the first `Err`. A `start_batch` at or past
    /// `batches_per_epoch()` gives no batches.
    pub fn epoch(&self, epoch: usize, start_batch: usize) -> EpochBatches {
        let end_batch = self.batches_per_epoch();
        let end_item = self.images_per_epoch();
        let start_batch = start_batch.min(end_batch);
        let shared = Arc::new(Shared {
            dataset: self.dataset.clone(),
            augment: self.augment.clone(),
            order: self.epoch_order(epoch),
            seed: self.options.seed,
            epoch: epoch as u64,
            batch_size: self.options.batch_size,
            prefetch: self.options.prefetch,
            skip_corrupt: self.options.skip_corrupt,
            end_item,
            state: Mutex::new(State {
                next_item: start_batch * self.options.batch_size,
                consumer_batch: start_batch,
                pending: HashMap::new(),
                ready: BTreeMap::new(),
                stop: false,
                failure: None,
            }),
            changed: Condvar::new(),
        });
        let mut workers = Vec::new();
        if start_batch < end_batch {
            for w in 0..self.options.workers {
                let worker_shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("mae-loader-{w}"))
                    .spawn(move || run_worker(&worker_shared));
                match spawned {
                    Ok(handle) => workers.push(handle),
                    // Fewer workers only slow the epoch down; none at all must not hang it.
                    Err(e) if workers.is_empty() => {
                        shared.lock().failure =
                            Some(Error::new(ErrorCode::Io, format!("cannot start a loader thread: {e}")));
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        EpochBatches { shared, workers, end_batch, finished: start_batch >= end_batch }
    }
}

/// The batches of one epoch, in order. Dropping it stops and joins its threads.
pub struct EpochBatches {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    end_batch: usize,
    finished: bool,
}

impl Iterator for EpochBatches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.finished {
            return None;
        }
        let mut state = self.shared.lock();
        loop {
            let wanted = state.consumer_batch;
            if let Some(result) = state.ready.remove(&wanted) {
                state.consumer_batch += 1;
                if result.is_err() {
                    state.stop = true;
                    self.finished = true;
                }
                // Frees a prefetch slot for the workers.
                self.shared.changed.notify_all();
                return Some(result);
            }
            if state.consumer_batch >= self.end_batch {
                self.finished = true;
                return None;
            }
            if let Some(failure) = state.failure.take() {
                state.stop = true;
                self.finished = true;
                self.shared.changed.notify_all();
                return Some(Err(failure));
            }
            state = self.shared.wait(state);
        }
    }
}

impl Drop for EpochBatches {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        for handle in self.workers.drain(..) {
            // A worker's own panics are caught and reported through the state.
            let _ = handle.join();
        }
    }
}

/// What the workers and the consumer share for one epoch.
struct Shared {
    dataset: Arc<dyn Dataset>,
    augment: Arc<Augment>,
    order: Vec<usize>,
    seed: u64,
    epoch: u64,
    batch_size: usize,
    prefetch: usize,
    skip_corrupt: bool,
    /// Position in `order` after the epoch's last batched item.
    end_item: usize,
    state: Mutex<State>,
    /// Signalled when a batch becomes ready, the consumer advances, or work stops.
    changed: Condvar,
}

struct State {
    /// Next position in `order` for a worker to take.
    next_item: usize,
    /// The batch the consumer takes next; workers stay within `prefetch` batches of it.
    consumer_batch: usize,
    /// Batches with items still being loaded, by batch number.
    pending: HashMap<usize, Pending>,
    /// Complete batches not yet taken.
    ready: BTreeMap<usize, Result<Batch>>,
    stop: bool,
    /// An error outside any one item (a worker died, no thread could start).
    failure: Option<Error>,
}

/// A batch's items in batch order, filled as workers finish them.
struct Pending {
    slots: Vec<Option<Item>>,
    remaining: usize,
}

/// One loaded, skipped or failed item.
enum Item {
    Loaded { index: usize, pixels: Vec<f32>, label: Option<i64> },
    Skipped { index: usize, message: String },
    Failed(Error),
}

impl Shared {
    /// Locks the state. Nothing panics while holding the lock, but should something
    /// still poison it the state remains consistent, so it is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn batch_items(&self, batch: usize) -> usize {
        self.end_item.min((batch + 1) * self.batch_size) - batch * self.batch_size
    }

    /// Decodes and augments the item at `position` of the epoch order; panics in the
    /// dataset or augmentation become errors naming the item.
    fn load(&self, position: usize) -> Item {
        let index = self.order[position];
        let attempt = catch_unwind(AssertUnwindSafe(|| {
            let raw = match self.dataset.get(index) {
                Ok(raw) => raw,
                Err(e) if self.skip_corrupt => return Item::Skipped { index, message: e.message },
                Err(e) => return Item::Failed(Error::new(e.code, format!("dataset item {index}: {}", e.message))),
            };
            let mut rng = stream_rng(self.seed, self.epoch, AUGMENT_STREAM, index as u64);
            match self.augment.apply(&raw, &mut rng) {
                Ok(pixels) => Item::Loaded { index, pixels, label: self.dataset.label(index) },
                Err(e) => Item::Failed(Error::new(
                    e.code,
                    format!("dataset item {index}: augmentation failed: {}", e.message),
                )),
            }
        }));
        attempt.unwrap_or_else(|payload| {
            Item::Failed(Error::new(
                ErrorCode::Internal,
                format!("dataset item {index}: panicked while loading: {}", panic_message(payload.as_ref())),
            ))
        })
    }

    /// Joins a batch's items, in slot order. The first failed item fails the batch.
    fn assemble(&self, slots: Vec<Option<Item>>) -> Result<Batch> {
        let augment = &self.augment;
        let item_len = augment.channels * augment.img_size * augment.img_size;
        let mut batch = Batch {
            images: Vec::with_capacity(slots.len() * item_len),
            shape: [0, augment.channels, augment.img_size, augment.img_size],
            labels: Vec::with_capacity(slots.len()),
            indices: Vec::with_capacity(slots.len()),
            skipped: Vec::new(),
        };
        let mut labelled = true;
        for item in slots.into_iter().flatten() {
            match item {
                Item::Loaded { index, pixels, label } => {
                    batch.images.extend_from_slice(&pixels);
                    batch.indices.push(index);
                    match label {
                        Some(label) => batch.labels.push(label),
                        None => labelled = false,
                    }
                }
                Item::Skipped { index, message } => batch.skipped.push((index, message)),
                Item::Failed(e) => return Err(e),
            }
        }
        if !labelled {
            batch.labels.clear();
        }
        batch.shape[0] = batch.indices.len();
        Ok(batch)
    }
}

/// Reports a worker that dies despite the per-item `catch_unwind` (a bug in the loader
/// itself), so that the consumer gets an error instead of waiting forever.
struct DeathNotice<'a>(&'a Shared);

impl Drop for DeathNotice<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.lock();
            state.failure = Some(Error::new(ErrorCode::Internal, "a data loader thread panicked"));
            self.0.changed.notify_all();
        }
    }
}

fn run_worker(shared: &Shared) {
    let _notice = DeathNotice(shared);
    loop {
        let (position, batch) = {
            let mut state = shared.lock();
            loop {
                if state.stop || state.next_item >= shared.end_item {
                    return;
                }
                let batch = state.next_item / shared.batch_size;
                if batch < state.consumer_batch + shared.prefetch {
                    state.next_item += 1;
                    break (state.next_item - 1, batch);
                }
                state = shared.wait(state);
            }
        };
        let item = shared.load(position);
        let complete = {
            let mut state = shared.lock();
            let pending = state.pending.entry(batch).or_insert_with(|| {
                let n = shared.batch_items(batch);
                Pending { slots: (0..n).map(|_| None).collect(), remaining: n }
            });
            pending.slots[position - batch * shared.batch_size] = Some(item);
            pending.remaining -= 1;
            if pending.remaining == 0 {
                state.pending.remove(&batch)
            } else {
                None
            }
        };
        // The last item's worker assembles the batch, off the consumer's thread.
        if let Some(pending) = complete {
            let result = shared.assemble(pending.slots);
            shared.lock().ready.insert(batch, result);
            shared.changed.notify_all();
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}
