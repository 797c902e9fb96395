//! Data-parallel process groups: N processes started by `mpirun` or `srun`, each training on
//! its shard, averaging gradients with MPI collectives on the CPU, or with NCCL on the GPUs
//! when every rank trains on CUDA (`nccl.rs`, `flat.rs`; NCCL's unique id goes over MPI).
//!
//! **MPI is opened at run time.** Neither `npm install` nor a single-process user needs
//! MPI, so nothing links to it: [`Group::join`] `dlopen`s the library only when
//! distributed training is asked for — `VIT_MAE_MPI_LIBRARY` if set, else `libmpi.so.40`
//! (Open MPI 4 and 5), `libmpi.so.12` and `libmpich.so.12` (MPICH and its ABI: Intel MPI,
//! MVAPICH, Cray; tried first under MPICH's launcher), then `libmpi.so` — and fails with
//! `E_DISTRIBUTED` naming what it tried and the packages that provide one. The library is
//! opened `RTLD_NOW | RTLD_GLOBAL`: Open MPI's plugins, which `MPI_Init` `dlopen`s,
//! resolve symbols of libmpi and its libraries, which a build whose plugins do not link
//! them (older releases, some packagings) finds only in the global scope. Debian's 4.1
//! works either way; a library opened `RTLD_LOCAL`, as Node opens its addons, would not
//! serve every build.
//!
//! **Two ABIs, one code.** Open MPI's handles point to objects it exports, MPICH's are
//! integer constants; the `Abi` trait in `mpi.rs` holds that table (verified against both
//! headers) and the function pointers are typed by it. Which ABI is read from the library:
//! Open MPI exports `ompi_mpi_comm_world`.
//!
//! **Once per process.** MPI is initialised by the first join (`MPI_Init_thread`, asking
//! for `MPI_THREAD_MULTIPLE`; less than `MPI_THREAD_SERIALIZED` is refused, as training
//! runs on a worker thread) and finalized at exit (`atexit`) when this process initialised
//! it. Every MPI call is made under one mutex, so calls never overlap whatever the thread
//! level. The first join also gathers every rank's host name to find the local rank (the
//! index among the ranks on the same machine, to pick a GPU): the same on every launcher,
//! without trusting variables a launcher run inside another leaves behind, and without
//! `MPI_Comm_split_type`, which blocks. So the first join is collective: every rank calls
//! it.
//!
//! **No hang forever.** Every operation is non-blocking (`MPI_Iallreduce`, `MPI_Ibcast`,
//! `MPI_Iallgatherv`, `MPI_Isend`/`MPI_Irecv`, `MPI_Ibarrier`), polled with `MPI_Test`
//! and a sleep that grows to 200 µs (a waiting rank uses no core; MPICH moves a large
//! message only while it is tested, and longer sleeps slowed it), until it completes or the
//! group's timeout passes without it completing (a large buffer moves in chunks, each
//! given the timeout). Then, as on an MPI error (`MPI_ERRORS_RETURN` is set on
//! `MPI_COMM_WORLD`, so errors come back instead of aborting), the call fails with
//! `E_DISTRIBUTED` naming the operation (`what`), the rank, the world size and the
//! timeout, and the group is broken: every later call fails at once, and `MPI_Finalize`
//! is skipped at exit (it synchronises with the other ranks, which may be gone).
//!
//! **MPI is only handed memory it may keep.** An operation that timed out is still
//! posted: a late peer, or a transfer it had set up, may still write into its buffer. So
//! operations run in a staging buffer of at most [`CHUNK_BYTES`], copied in and out,
//! which is leaked, never freed, if an operation fails; the caller's slices are never
//! handed to MPI. The chunks also keep every count within
//! MPI's C `int`.
//!
//! Collectives must be called by every rank of the group in the same order, with the same
//! lengths (all-gather excepted) and the same root.

mod agreement;
mod flat;
pub(crate) mod launch;
mod mpi;
pub mod nccl;

use crate::error::{Error, ErrorCode, Result};
use launch::{Launch, Launcher};
use mpi::{Element, MpiError, Operations, Reduction, Staging, World};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use flat::FlatBuffer;

/// The timeout of a group joined without one: long enough for a step's imbalance (a rank
/// writing a checkpoint or loading a slow batch while the others wait in the next
/// collective), short enough that a dead rank is noticed within minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The most bytes one MPI operation moves: the size of the staging buffer, allocated by
/// the first large collective and kept for the process. Far below `i32::MAX`, so any
/// count fits MPI's `int`; a multiple of 8, so chunks hold whole elements.
pub const CHUNK_BYTES: usize = 64 << 20;
const _: () = assert!(CHUNK_BYTES <= i32::MAX as usize && CHUNK_BYTES.is_multiple_of(8));

/// The first and the longest pause between two tests of an operation in flight.
const FIRST_PAUSE: Duration = Duration::from_micros(10);
const LONGEST_PAUSE: Duration = Duration::from_micros(200);

/// How to train: `'auto'` joins the MPI job this process was launched in (by `mpirun` or
/// `srun`, with more than one process), else trains alone; `'mpi'` always uses MPI, even
/// as a single process; `'none'` never does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distributed {
    Auto,
    Mpi,
    None,
}

impl Distributed {
    pub fn parse(name: &str) -> Result<Distributed> {
        match name {
            "auto" => Ok(Distributed::Auto),
            "mpi" => Ok(Distributed::Mpi),
            "none" => Ok(Distributed::None),
            other => Err(Error::new(ErrorCode::InvalidArgument, format!("distributed must be 'auto', 'mpi' or 'none', got '{other}'"))),
        }
    }
}

/// This process's place among the processes training together, and their collectives.
/// Shared by `Arc` across threads; calls are serialized inside.
pub struct Group {
    rank: usize,
    size: usize,
    local_rank: usize,
    timeout: Duration,
    /// `None` for a group of one, whose collectives move nothing.
    world: Option<&'static World>,
    /// The communicator of the ranks' GPUs, once every rank has said that it trains on
    /// one (`Group::prepare_for`).
    #[cfg(feature = "cuda")]
    gpus: std::sync::OnceLock<std::sync::Arc<nccl::Communicator>>,
}

/// Why an operation did not complete.
enum Failure {
    Mpi(MpiError),
    TimedOut,
}

impl From<MpiError> for Failure {
    fn from(e: MpiError) -> Self {
        Failure::Mpi(e)
    }
}

/// Calls `done` until it says yes (`true`), with pauses that grow to [`LONGEST_PAUSE`];
/// `false` when `timeout` passes first.
fn poll_until<E>(timeout: Duration, mut done: impl FnMut() -> std::result::Result<bool, E>) -> std::result::Result<bool, E> {
    let start = Instant::now();
    let mut pause = FIRST_PAUSE;
    while !done()? {
        if start.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
    Ok(true)
}

/// Polls the operations in flight until they complete, or fails when `timeout` passes.
fn wait(operations: &mut dyn Operations, timeout: Duration) -> std::result::Result<(), Failure> {
    if poll_until(timeout, || operations.test())? {
        Ok(())
    } else {
        Err(Failure::TimedOut)
    }
}

/// Opens the first of `names` (MPI's or NCCL's libraries) that loads with `flags`, or fails
/// naming what was tried (only the library `variable` named, when one did), that it is
/// needed (`needed`) and how to get one (`hint`).
fn open_first(names: &[String], flags: std::ffi::c_int, variable: Option<&str>, needed: &str, hint: &str) -> Result<(libloading::os::unix::Library, String)> {
    let mut failures = Vec::new();
    for name in names {
        // SAFETY: loading runs the library's initialisers: MPI's and NCCL's are sound to
        // run once, and a path the user named is theirs to vouch for.
        match unsafe { libloading::os::unix::Library::open(Some(name.as_str()), flags) } {
            Ok(library) => return Ok((library, name.clone())),
            // libloading's error says "dlopen failed"; its source is dlerror's text.
            Err(e) => failures.push(std::error::Error::source(&e).map_or_else(|| e.to_string(), |source| source.to_string())),
        }
    }
    let message = match variable {
        Some(variable) => format!("{variable}={} could not be loaded ({}); {hint}", names[0], failures[0]),
        None => format!("{needed}, and none of {} could be loaded ({}); {hint}", names.join(", "), failures.join("; ")),
    };
    Err(Error::new(ErrorCode::Distributed, message))
}

fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

/// This machine, as ranks on the same one see it: the host name and the kernel's boot id.
fn node_name() -> String {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most the buffer's length.
    let host = if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0 {
        String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
    } else {
        String::new()
    };
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{host}/{}", boot.trim())
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .field("backend", &self.backend())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Group {
    fn new(rank: usize, size: usize, timeout: Duration, world: Option<&'static World>) -> Group {
        Group {
            rank,
            size,
            local_rank: 0,
            timeout,
            world,
            #[cfg(feature = "cuda")]
            gpus: std::sync::OnceLock::new(),
        }
    }

    /// Rank 0 of 1, without MPI.
    pub fn single() -> Group {
        Group::new(0, 1, DEFAULT_TIMEOUT, None)
    }

    /// Joins the processes training together (see [`Distributed`]); every collective
    /// waits at most `timeout` for the other ranks. The first join in a process is
    /// collective under MPI: every rank calls it. After a collective failed, MPI in this
    /// process is unusable and joining fails.
    pub fn join(kind: Distributed, timeout: Duration) -> Result<Group> {
        if timeout.is_zero() {
            return Err(Error::new(ErrorCode::InvalidArgument, "the distributed timeout must be longer than 0 s"));
        }
        let launch = match kind {
            Distributed::None => return Ok(Group::single()),
            Distributed::Auto | Distributed::Mpi => launch::detect(|name| std::env::var(name).ok())?,
        };
        if kind == Distributed::Auto && !launch.is_some_and(|launch| launch.is_parallel()) {
            return Ok(Group::single());
        }
        let library = std::env::var("VIT_MAE_MPI_LIBRARY").ok().filter(|path| !path.is_empty());
        let world = World::get(library, launch.is_some_and(|launch| launch.launcher == Launcher::Pmi))?;
        if let Some(Launch { launcher, size: Some(launched) }) = launch {
            if launched != world.size {
                return Err(Error::new(
                    ErrorCode::Distributed,
                    format!(
                        "{} started {launched} processes, but {} sees {} in MPI_COMM_WORLD: the launcher is not of that MPI \
                         (set VIT_MAE_MPI_LIBRARY to the library of the MPI whose launcher you use)",
                        launcher.describe(),
                        world.library,
                        world.size
                    ),
                ));
            }
        }
        if let Some(why) = &world.lock().unusable {
            return Err(Error::new(ErrorCode::Distributed, format!("rank {} of {}: cannot join: {why}", world.rank, world.size)));
        }
        let mut group = Group::new(world.rank, world.size, timeout, Some(world));
        group.local_rank = group.find_local_rank(world)?;
        Ok(group)
    }

    /// This process's index among the ranks on its machine, gathered by the first join
    /// (joins on other threads wait for it: a second gather would find no partner).
    fn find_local_rank(&self, world: &World) -> Result<usize> {
        static FINDING: Mutex<()> = Mutex::new(());
        let _finding = FINDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(local_rank) = world.lock().local_rank {
            return Ok(local_rank);
        }
        let node = node_name();
        let nodes = self.all_gather(node.as_bytes(), "the exchange of host names that finds the local rank")?;
        let local_rank = nodes[..self.rank].iter().filter(|other| other[..] == *node.as_bytes()).count();
        world.lock().local_rank = Some(local_rank);
        Ok(local_rank)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The index of this process among those on the same machine: the GPU to use.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// How long a collective waits for the other ranks.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `"mpi"`, or `"none"` for a group of one.
    pub fn backend(&self) -> &'static str {
        if self.world.is_some() {
            "mpi"
        } else {
            "none"
        }
    }

    /// Sums `buffer` over the ranks, in place.
    pub fn all_reduce_sum_f32(&self, buffer: &mut [f32], what: &str) -> Result<()> {
        self.all_reduce(buffer, Element::F32, Reduction::Sum, what)
    }

    /// Sums `buffer` over the ranks, in place.
    pub fn all_reduce_sum_f64(&self, buffer: &mut [f64], what: &str) -> Result<()> {
        self.all_reduce(buffer, Element::F64, Reduction::Sum, what)
    }

    /// The element-wise maximum of `buffer` over the ranks, in place.
    pub fn all_reduce_max_f64(&self, buffer: &mut [f64], what: &str) -> Result<()> {
        self.all_reduce(buffer, Element::F64, Reduction::Max, what)
    }

    fn all_reduce<T: bytemuck::Pod>(&self, buffer: &mut [T], element: Element, reduction: Reduction, what: &str) -> Result<()> {
        self.collective(what, |operations, staging, timeout| {
            for chunk in bytemuck::cast_slice_mut::<T, u8>(buffer).chunks_mut(CHUNK_BYTES) {
                let area = staging.bytes(chunk.len());
                area.copy_from_slice(chunk);
                // SAFETY: staging memory, kept until the operation completes (leaked if not).
                unsafe { operations.start_all_reduce(area, element, reduction) }?;
                wait(operations, timeout)?;
                chunk.copy_from_slice(area);
            }
            Ok(())
        })
        .map(|done| done.unwrap_or(()))
    }

    /// Copies `root`'s `buffer` into every rank's (all of the same length).
    pub fn broadcast(&self, buffer: &mut [u8], root: usize, what: &str) -> Result<()> {
        self.check_rank(root, "root", what)?;
        let rank = self.rank;
        self.collective(what, |operations, staging, timeout| {
            for chunk in buffer.chunks_mut(CHUNK_BYTES) {
                let area = staging.bytes(chunk.len());
                if rank == root {
                    area.copy_from_slice(chunk);
                }
                // SAFETY: staging memory, kept until the operation completes (leaked if not).
                unsafe { operations.start_broadcast(area, root) }?;
                wait(operations, timeout)?;
                chunk.copy_from_slice(area);
            }
            Ok(())
        })
        .map(|done| done.unwrap_or(()))
    }

    /// Every rank's bytes, in rank order; the lengths may differ. The lengths are gathered
    /// first, then the bytes, each rank sending at most `CHUNK_BYTES / size` per round.
    pub fn all_gather(&self, mine: &[u8], what: &str) -> Result<Vec<Vec<u8>>> {
        let (rank, size) = (self.rank, self.size);
        self.collective(what, |operations, staging, timeout| {
            let mut round = |operations: &mut dyn Operations, counts: &[usize], part: &[u8]| -> std::result::Result<Vec<Vec<u8>>, Failure> {
                let (bytes, mpi_counts, displacements) = staging.all_gather(counts);
                let at = displacements[rank] as usize;
                bytes[at..at + part.len()].copy_from_slice(part);
                // SAFETY: staging memory, kept until the operation completes (leaked if not).
                unsafe { operations.start_all_gather(bytes, mpi_counts, displacements) }?;
                wait(operations, timeout)?;
                Ok(counts.iter().zip(displacements).map(|(&count, &at)| bytes[at as usize..][..count].to_vec()).collect())
            };
            let lengths: Vec<usize> = round(operations, &vec![8; size], &(mine.len() as u64).to_le_bytes())?
                .iter()
                .map(|length| u64::from_le_bytes(length[..].try_into().expect("8 bytes")) as usize)
                .collect();
            let share = CHUNK_BYTES / size;
            let mut gathered: Vec<Vec<u8>> = lengths.iter().map(|&length| Vec::with_capacity(length)).collect();
            for start in (0..lengths.iter().copied().max().unwrap_or(0)).step_by(share) {
                let counts: Vec<usize> = lengths.iter().map(|&length| length.saturating_sub(start).min(share)).collect();
                let parts = round(operations, &counts, &mine[start.min(mine.len())..][..counts[rank]])?;
                for (all, part) in gathered.iter_mut().zip(parts) {
                    all.extend_from_slice(&part);
                }
            }
            Ok(gathered)
        })
        .map(|gathered| gathered.unwrap_or_else(|| vec![mine.to_vec()]))
    }

    /// Sends `send` to `peer` and receives `peer`'s into `receive` (both ranks call it, with
    /// the same length).
    pub fn exchange(&self, send: &[u8], peer: usize, receive: &mut [u8], what: &str) -> Result<()> {
        self.check_rank(peer, "peer", what)?;
        if send.len() != receive.len() {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("{what}: an exchange sends and receives as many bytes, got {} to send and room for {}", send.len(), receive.len()),
            ));
        }
        let done = self.collective(what, |operations, staging, timeout| {
            for (outgoing, incoming) in send.chunks(CHUNK_BYTES / 2).zip(receive.chunks_mut(CHUNK_BYTES / 2)) {
                let (sent, received) = staging.bytes(2 * outgoing.len()).split_at_mut(outgoing.len());
                sent.copy_from_slice(outgoing);
                // SAFETY: staging memory, kept until the operations complete (leaked if not).
                unsafe { operations.start_exchange(sent, received, peer) }?;
                wait(operations, timeout)?;
                incoming.copy_from_slice(received);
            }
            Ok(())
        })?;
        if done.is_none() {
            receive.copy_from_slice(send);
        }
        Ok(())
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self, what: &str) -> Result<()> {
        self.collective(what, |operations, _, timeout| {
            operations.start_barrier()?;
            wait(operations, timeout)
        })
        .map(|done| done.unwrap_or(()))
    }

    fn check_rank(&self, rank: usize, role: &str, what: &str) -> Result<()> {
        if rank < self.size {
            Ok(())
        } else {
            Err(Error::new(ErrorCode::InvalidArgument, format!("{what}: {role} {rank} is not a rank of this group of {}", self.size)))
        }
    }

    /// Runs `operation` with MPI to itself, or returns `None` in a group of one. A failure
    /// breaks the group.
    fn collective<T>(
        &self,
        what: &str,
        operation: impl FnOnce(&mut dyn Operations, &mut Staging, Duration) -> std::result::Result<T, Failure>,
    ) -> Result<Option<T>> {
        let Some(world) = self.world else { return Ok(None) };
        let who = format!("rank {} of {}", self.rank, self.size);
        let mut state = world.lock();
        if let Some(why) = &state.unusable {
            return Err(Error::new(ErrorCode::Distributed, format!("{who}: {what} cannot run: {why}")));
        }
        let state = &mut *state;
        match operation(state.operations.as_mut(), &mut state.staging, self.timeout) {
            Ok(result) => Ok(Some(result)),
            Err(failure) => {
                let message = match failure {
                    Failure::TimedOut => format!(
                        "{what} did not complete within {}: another rank died, failed outside a collective, or is far behind; \
                         the timeout is distributedTimeout",
                        seconds(self.timeout)
                    ),
                    Failure::Mpi(e) => format!("{what} failed: {} returned {}", e.function, state.operations.error_string(e.code)),
                };
                state.break_down(format!("the process group is broken since {message}"));
                Err(Error::new(ErrorCode::Distributed, format!("{who}: {message}")))
            }
        }
    }
}
