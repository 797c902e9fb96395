//! Process groups over MPI. The `rank_*` tests are scenarios that act only as ranks of a
//! job: this test binary launched by `mpirun` (or directly, for a single process) with
//! `VIT_MAE_MPI_SCENARIO` naming them; elsewhere they return at once. The other tests
//! launch them and check what every rank printed, how the job ended and how long it took.
//!
//! They need Open MPI's `mpirun` (Debian/Ubuntu: `apt-get install openmpi-bin
//! libopenmpi-dev`). `VIT_MAE_TEST_MPIRUN` names another launcher, such as MPICH's
//! `mpiexec.hydra` (with `VIT_MAE_MPI_LIBRARY` unset, MPICH's library is found first
//! under it).
//!
//! The all-reduce benchmark is run by hand:
//! `VIT_MAE_MPI_SCENARIO=rank_all_reduce_benchmark mpirun -np 2 <suite binary> --exact distributed::rank_all_reduce_benchmark --nocapture`.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vit_mae_core::candle_core::{self, Device, Tensor};
use vit_mae_core::distributed::nccl::{self, Nccl, UniqueId};
use vit_mae_core::distributed::{Distributed, FlatBuffer, Group, CHUNK_BYTES, DEFAULT_TIMEOUT};
use vit_mae_core::ErrorCode;

const SCENARIO: &str = "VIT_MAE_MPI_SCENARIO";

/// Whether this process is a rank of scenario `name`.
pub(crate) fn acting_as(name: &str) -> bool {
    std::env::var(SCENARIO).as_deref() == Ok(name)
}

/// Milliseconds since the epoch: ranks' and the launcher's times on one clock.
fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// How a launched job ended.
pub(crate) struct Job {
    /// `None` when it was still running at its time limit (and was killed).
    pub(crate) status: Option<ExitStatus>,
    pub(crate) output: String,
    pub(crate) elapsed: Duration,
    ended_ms: u128,
}

impl Job {
    pub(crate) fn describe(&self) -> String {
        let status = match self.status {
            None => "still running at its time limit".to_string(),
            Some(status) => match status.signal() {
                Some(signal) => format!("killed by signal {signal}"),
                None => format!("exit code {}", status.code().unwrap_or(-1)),
            },
        };
        format!("{status} after {:.1} s; its output:\n{}", self.elapsed.as_secs_f64(), self.output)
    }

    pub(crate) fn succeeded(&self) -> bool {
        self.status.is_some_and(|status| status.success())
    }

    /// The value of `key=` on rank `rank`'s lines (`rank R: key=value`).
    pub(crate) fn value(&self, rank: usize, key: &str) -> Option<String> {
        let prefix = format!("rank {rank}: {key}=");
        self.output.lines().find_map(|line| line.find(&prefix).map(|at| line[at + prefix.len()..].to_string()))
    }

    pub(crate) fn said(&self, rank: usize, key: &str) -> String {
        self.value(rank, key).unwrap_or_else(|| panic!("rank {rank} did not print {key}; the job ended with {}", self.describe()))
    }
}

/// Runs `command` until it ends or `limit` passes, then stops it and the processes it
/// started (SIGTERM, which mpirun passes on to its ranks, then SIGKILL to its process group).
fn run(mut command: Command, limit: Duration, label: &str) -> Job {
    let log_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("distributed-{label}-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).unwrap();
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?} could not start: {e}"));
    let pid = child.id() as i32;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > limit {
            // SAFETY: signals the process this test started (its own process group).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            std::thread::sleep(Duration::from_secs(5));
            // SAFETY: signals that process group, whatever is left of it.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (elapsed, ended_ms) = (start.elapsed(), now_ms());
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    Job { status, output, elapsed, ended_ms }
}

/// The launcher: `$VIT_MAE_TEST_MPIRUN`, else `mpirun`, and whether it is Open MPI's.
fn launcher() -> (String, bool) {
    let program = std::env::var("VIT_MAE_TEST_MPIRUN").unwrap_or_else(|_| "mpirun".to_string());
    let version = Command::new(&program).arg("--version").output().unwrap_or_else(|e| {
        panic!("{program} could not be run ({e}): the distributed tests need Open MPI's mpirun (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)")
    });
    let text = format!("{}{}", String::from_utf8_lossy(&version.stdout), String::from_utf8_lossy(&version.stderr));
    (program, text.contains("Open MPI") || text.contains("OpenRTE"))
}

/// What the launcher does when a rank dies.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum OnDeath {
    /// Its default: end the job.
    EndTheJob,
    /// Let the other ranks run on (Open MPI's `--enable-recovery`, hydra's
    /// `-disable-auto-cleanup`), as `srun` does unless configured to kill the step.
    KeepTheOthers,
}

/// This test binary as `processes` ranks of scenario `name`, under the launcher.
fn launch(name: &str, processes: usize, on_death: OnDeath, limit: Duration) -> Job {
    launch_test("distributed", name, &[], processes, on_death, limit)
}

/// This test binary as `processes` ranks of scenario `module::name`, with `env` set.
pub(crate) fn launch_test(module: &str, name: &str, env: &[(&str, &str)], processes: usize, on_death: OnDeath, limit: Duration) -> Job {
    // One job at a time: mpiruns started together can collide on their session
    // folders, and ranks of two jobs sharing the cores would stretch the timeouts.
    static ONE_JOB: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_job = ONE_JOB.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (program, open_mpi) = launcher();
    let mut command = Command::new(program);
    if open_mpi {
        // Root in CI containers; more ranks than cores on small machines.
        command.args(["--allow-run-as-root", "--oversubscribe"]);
    }
    if on_death == OnDeath::KeepTheOthers {
        command.arg(if open_mpi { "--enable-recovery" } else { "-disable-auto-cleanup" });
    }
    command.args(["-n", &processes.to_string()]);
    command.arg(std::env::current_exe().unwrap()).args(["--exact", &format!("{module}::{name}"), "--nocapture", "--test-threads=1"]);
    command.env(SCENARIO, name).env_remove("VIT_MAE_MPI_LIBRARY").envs(env.iter().copied());
    run(command, limit, name)
}

/// This test binary as one process of scenario `name`, without a launcher.
fn alone(name: &str, env: &[(&str, &str)]) -> Job {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args(["--exact", &format!("distributed::{name}"), "--nocapture", "--test-threads=1"]).env(SCENARIO, name);
    command.envs(env.iter().copied());
    run(command, Duration::from_secs(60), name)
}

// ---------------------------------------------------------------- one process, no MPI

#[test]
fn a_single_group_is_rank_0_of_1_and_its_collectives_move_nothing() {
    assert_eq!(Distributed::parse("auto").unwrap(), Distributed::Auto);
    assert_eq!(Distributed::parse("mpi").unwrap(), Distributed::Mpi);
    assert_eq!(Distributed::parse("none").unwrap(), Distributed::None);
    let e = Distributed::parse("nccl").unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("'auto', 'mpi' or 'none', got 'nccl'"), "{}", e.message);

    // This process was not started by a launcher, so 'auto' trains alone.
    for group in [Group::single(), Group::join(Distributed::None, DEFAULT_TIMEOUT).unwrap(), Group::join(Distributed::Auto, DEFAULT_TIMEOUT).unwrap()] {
        assert_eq!((group.rank(), group.size(), group.local_rank(), group.backend()), (0, 1, 0, "none"));
        let mut values = vec![1.5f32, -2.0];
        group.all_reduce_sum_f32(&mut values, "a sum").unwrap();
        assert_eq!(values, [1.5, -2.0]);
        let mut values = vec![3.0f64];
        group.all_reduce_sum_f64(&mut values, "a sum").unwrap();
        group.all_reduce_max_f64(&mut values, "a max").unwrap();
        assert_eq!(values, [3.0]);
        let mut bytes = *b"abc";
        group.broadcast(&mut bytes, 0, "a broadcast").unwrap();
        assert_eq!(&bytes, b"abc");
        assert_eq!(group.all_gather(b"mine", "a gather").unwrap(), vec![b"mine".to_vec()]);
        let mut received = [0u8; 2];
        group.exchange(b"xy", 0, &mut received, "an exchange with itself").unwrap();
        assert_eq!(&received, b"xy");
        group.barrier("a barrier").unwrap();

        let e = group.broadcast(&mut bytes, 1, "the broadcast of the seed").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert_eq!(e.message, "the broadcast of the seed: root 1 is not a rank of this group of 1");
        let e = group.exchange(b"xy", 0, &mut [0u8; 3], "the halo exchange").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("2 to send and room for 3"), "{}", e.message);
    }
    let e = Group::join(Distributed::Mpi, Duration::ZERO).unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("timeout must be longer than 0 s"), "{}", e.message);
}

#[test]
fn groups_are_shared_across_threads() {
    fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<Group>();
    let group = Arc::new(Group::single());
    let worker = Arc::clone(&group);
    std::thread::spawn(move || worker.barrier("a barrier on a worker thread")).join().unwrap().unwrap();
}

// ---------------------------------------------------------------- a missing library

#[test]
fn rank_join_without_a_usable_library() {
    if !acting_as("rank_join_without_a_usable_library") {
        return;
    }
    let library = std::env::var("VIT_MAE_MPI_LIBRARY").unwrap();
    let e = Group::join(Distributed::Mpi, DEFAULT_TIMEOUT).unwrap_err();
    println!("rank 0: error={e}");
    assert_eq!(e.code, ErrorCode::Distributed);
    for needed in [library.as_str(), "apt-get install openmpi-bin libopenmpi-dev", "libmpich12", "VIT_MAE_MPI_LIBRARY"] {
        assert!(e.message.contains(needed), "the message lacks {needed}: {}", e.message);
    }
    // The outcome is kept: MPI could not be initialised again anyway.
    assert_eq!(Group::join(Distributed::Mpi, DEFAULT_TIMEOUT).unwrap_err().message, e.message);
    println!("rank 0: done=yes");
}

#[test]
fn a_missing_or_foreign_mpi_library_is_named_with_the_packages_that_provide_one() {
    let cases = [
        ("/nonexistent/libmpi.so.40", "VIT_MAE_MPI_LIBRARY=/nonexistent/libmpi.so.40 could not be loaded (/nonexistent/libmpi.so.40: cannot open shared object file: No such file or directory); install Open MPI"),
        // A shared library that is no MPI.
        ("libm.so.6", "libm.so.6 is not an MPI-3 library: it has no MPI_Initialized; install Open MPI"),
    ];
    for (library, message) in cases {
        let job = alone("rank_join_without_a_usable_library", &[("VIT_MAE_MPI_LIBRARY", library)]);
        assert!(job.succeeded() && job.said(0, "done") == "yes", "{}", job.describe());
        assert!(job.said(0, "error").starts_with(&format!("E_DISTRIBUTED: {message}")), "{}", job.describe());
    }
}

// ---------------------------------------------------------------- two ranks

/// `n` f32 values that rank `rank` contributes: small integers, so sums are exact.
fn contribution(rank: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| ((rank + 1) * (i % 1000)) as f32).collect()
}

#[test]
fn rank_collectives() {
    if !acting_as("rank_collectives") {
        return;
    }
    // Joined on one thread, used on another, as the binding's jobs do.
    let group = Arc::new(std::thread::spawn(|| Group::join(Distributed::Auto, Duration::from_secs(30)).unwrap()).join().unwrap());
    let (rank, size) = (group.rank(), group.size());
    println!("rank {rank}: joined={size} {} local_rank={}", group.backend(), group.local_rank());
    assert_eq!((size, group.backend()), (2, "mpi"));
    if let Ok(launcher_rank) = std::env::var("OMPI_COMM_WORLD_RANK").or_else(|_| std::env::var("PMI_RANK")) {
        assert_eq!(launcher_rank, rank.to_string());
    }
    // Both ranks run on this machine.
    assert_eq!(group.local_rank(), rank);
    if let Ok(local) = std::env::var("OMPI_COMM_WORLD_LOCAL_RANK") {
        assert_eq!(local, group.local_rank().to_string());
    }
    let worker = Arc::clone(&group);
    std::thread::spawn(move || collectives(&worker)).join().unwrap();
    println!("rank {rank}: done=yes");
}

fn collectives(group: &Group) {
    let (rank, size) = (group.rank(), group.size());
    let peer = 1 - rank;

    // More than one chunk of f32.
    let n = CHUNK_BYTES / 4 + 1000;
    let mut gradients = contribution(rank, n);
    group.all_reduce_sum_f32(&mut gradients, "the gradient all-reduce").unwrap();
    let contributions: Vec<Vec<f32>> = (0..size).map(|r| contribution(r, 1000)).collect();
    let want: Vec<f32> = (0..n).map(|i| contributions.iter().map(|values| values[i % 1000]).sum()).collect();
    assert!(gradients == want, "the f32 sum differs from the sum of both ranks' values");

    let mut losses = [rank as f64 + 0.25, 1e10 * (rank + 1) as f64];
    group.all_reduce_sum_f64(&mut losses, "the loss sum").unwrap();
    assert_eq!(losses, [1.5, 3e10]);
    let mut norms = [rank as f64, -(rank as f64), 7.0];
    group.all_reduce_max_f64(&mut norms, "the norm max").unwrap();
    assert_eq!(norms, [1.0, 0.0, 7.0]);

    // From rank 1, more than one chunk.
    let pattern = |i: usize| (i * 7 + 3) as u8;
    let mut seed = if rank == 1 { (0..CHUNK_BYTES + 7).map(pattern).collect() } else { vec![0u8; CHUNK_BYTES + 7] };
    group.broadcast(&mut seed, 1, "the broadcast of the seed").unwrap();
    assert!(seed.iter().enumerate().all(|(i, &b)| b == pattern(i)), "the broadcast differs from rank 1's bytes");

    // Unequal lengths, one past a round's share of the staging buffer, and an empty one.
    let lengths = [3, CHUNK_BYTES / 2 + 5];
    let mine: Vec<u8> = (0..lengths[rank]).map(|i| (i + rank) as u8).collect();
    let gathered = group.all_gather(&mine, "the gather of shard sizes").unwrap();
    assert_eq!(gathered.len(), size);
    for (r, bytes) in gathered.iter().enumerate() {
        assert!(*bytes == (0..lengths[r]).map(|i| (i + r) as u8).collect::<Vec<_>>(), "rank {r}'s gathered bytes differ");
    }
    let mine = if rank == 0 { Vec::new() } else { b"nccl-id".to_vec() };
    assert_eq!(group.all_gather(&mine, "the gather of ids").unwrap(), vec![Vec::new(), b"nccl-id".to_vec()]);

    // A pairwise swap, small and past half a chunk.
    for length in [1000, CHUNK_BYTES / 2 + 3] {
        let send: Vec<u8> = (0..length).map(|i| (i % 251) as u8 ^ rank as u8).collect();
        let mut received = vec![0u8; length];
        group.exchange(&send, peer, &mut received, "the exchange").unwrap();
        assert!(received.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8 ^ peer as u8), "the exchange received other bytes");
    }

    // Argument errors are found before MPI is called, and leave the group usable.
    let e = group.broadcast(&mut [0u8; 4], 2, "the broadcast of the seed").unwrap_err();
    assert_eq!((e.code, e.message.as_str()), (ErrorCode::InvalidArgument, "the broadcast of the seed: root 2 is not a rank of this group of 2"));
    group.barrier("the last barrier").unwrap();
}

#[test]
fn two_ranks_join_and_every_collective_gives_the_reduced_values() {
    let job = launch("rank_collectives", 2, OnDeath::EndTheJob, Duration::from_secs(240));
    // A clean exit of mpirun also says that both ranks ran MPI_Finalize at exit.
    assert!(job.succeeded(), "{}", job.describe());
    for rank in 0..2 {
        assert_eq!(job.said(rank, "joined"), format!("2 mpi local_rank={rank}"), "{}", job.describe());
        assert_eq!(job.said(rank, "done"), "yes", "{}", job.describe());
    }
}

#[test]
fn rank_mpi_alone() {
    if !acting_as("rank_mpi_alone") {
        return;
    }
    let group = Group::join(Distributed::Mpi, Duration::from_secs(30)).unwrap();
    assert_eq!((group.rank(), group.size(), group.local_rank(), group.backend()), (0, 1, 0, "mpi"));
    let mut values = [2.5f64];
    group.all_reduce_sum_f64(&mut values, "a sum").unwrap();
    assert_eq!(values, [2.5]);
    assert_eq!(group.all_gather(b"only", "a gather").unwrap(), vec![b"only".to_vec()]);
    let mut received = [0u8; 3];
    group.exchange(b"abc", 0, &mut received, "an exchange with itself").unwrap();
    assert_eq!(&received, b"abc");
    println!("rank 0: done=yes");
}

#[test]
fn mpi_is_used_when_asked_for_even_by_a_single_process() {
    let job = launch("rank_mpi_alone", 1, OnDeath::EndTheJob, Duration::from_secs(120));
    assert!(job.succeeded() && job.said(0, "done") == "yes", "under the launcher: {}", job.describe());
    // A singleton: MPI without a launcher.
    let job = alone("rank_mpi_alone", &[]);
    assert!(job.succeeded() && job.said(0, "done") == "yes", "without a launcher: {}", job.describe());
}

// ---------------------------------------------------------------- NCCL and flat buffers

#[test]
fn rank_nccl_without_a_usable_library() {
    if !acting_as("rank_nccl_without_a_usable_library") {
        return;
    }
    let e = Nccl::get().err().expect("no usable NCCL");
    println!("rank 0: error={e}");
    // The outcome is kept.
    assert_eq!(Nccl::get().err().expect("still none").message, e.message);
    println!("rank 0: done=yes");
}

#[test]
fn a_missing_or_foreign_nccl_library_is_named_with_the_package_that_provides_one() {
    let cases = [
        ("/nonexistent/libnccl.so.2", "VIT_MAE_NCCL_LIBRARY=/nonexistent/libnccl.so.2 could not be loaded (/nonexistent/libnccl.so.2: cannot open shared object file: No such file or directory); install NCCL"),
        // A shared library that is no NCCL.
        ("libm.so.6", "libm.so.6 is not an NCCL library of version 2.14 or later: it has no ncclGetVersion; install NCCL"),
    ];
    for (library, message) in cases {
        let job = alone("rank_nccl_without_a_usable_library", &[(nccl::LIBRARY_VARIABLE, library)]);
        assert!(job.succeeded() && job.said(0, "done") == "yes", "{}", job.describe());
        let error = job.said(0, "error");
        assert!(error.starts_with(&format!("E_DISTRIBUTED: {message}")), "{}", job.describe());
        for needed in ["pip install nvidia-nccl-cu13", "libnccl.so.2", "VIT_MAE_NCCL_LIBRARY"] {
            assert!(error.contains(needed), "the message lacks {needed}: {error}");
        }
    }
}

/// Rank 0's id from NCCL when it can be opened (it needs no GPU), else from a stand-in.
fn generated_id(rank: usize) -> (std::result::Result<UniqueId, vit_mae_core::Error>, String) {
    match Nccl::get() {
        Ok(nccl) => (nccl.unique_id(), format!("ncclGetUniqueId of {} (version code {})", nccl.library, nccl.version)),
        Err(why) => {
            let stamp = now_ms().to_le_bytes();
            let id = UniqueId(std::array::from_fn(|i| stamp[i % stamp.len()] ^ (i as u8) ^ (rank as u8 + 1)));
            (Ok(id), format!("a stand-in, since {why}"))
        }
    }
}

#[test]
fn rank_nccl_unique_id() {
    if !acting_as("rank_nccl_unique_id") {
        return;
    }
    let group = Group::join(Distributed::Auto, Duration::from_secs(30)).unwrap();
    let rank = group.rank();
    let mut generated = false;
    let id = nccl::exchange_unique_id(&group, || {
        generated = true;
        let (id, source) = generated_id(rank);
        println!("rank {rank}: source={source}");
        id
    })
    .unwrap();
    println!("rank {rank}: generated={}", if generated { "yes" } else { "no" });
    println!("rank {rank}: id={id:?}");

    // Rank 0 failing to make one fails both ranks, neither waiting for the bytes.
    let e = nccl::exchange_unique_id(&group, || Err(vit_mae_core::Error::new(ErrorCode::Distributed, "ncclGetUniqueId failed: no network interface"))).unwrap_err();
    println!("rank {rank}: error={e}");
    group.barrier("the last barrier").unwrap();
    println!("rank {rank}: done=yes");
}

#[test]
fn two_ranks_end_with_rank_0_s_nccl_unique_id() {
    let job = launch("rank_nccl_unique_id", 2, OnDeath::EndTheJob, Duration::from_secs(120));
    assert!(job.succeeded(), "{}", job.describe());
    println!("rank 0's id came from {}", job.said(0, "source"));
    assert_eq!((job.said(0, "generated"), job.said(1, "generated")), ("yes".to_string(), "no".to_string()), "{}", job.describe());
    let id = job.said(0, "id");
    assert_eq!(id.len(), 256, "{}", job.describe());
    assert_ne!(id, "0".repeat(256), "{}", job.describe());
    assert_eq!(job.said(1, "id"), id, "{}", job.describe());
    assert_eq!(job.said(0, "error"), "E_DISTRIBUTED: ncclGetUniqueId failed: no network interface");
    assert_eq!(job.said(1, "error"), "E_DISTRIBUTED: rank 0 of 2 failed (generating the NCCL unique id): ncclGetUniqueId failed: no network interface");
    for rank in 0..2 {
        assert_eq!(job.said(rank, "done"), "yes", "{}", job.describe());
    }
}

#[test]
fn rank_flat_buffers() {
    if !acting_as("rank_flat_buffers") {
        return;
    }
    let group = Group::join(Distributed::Auto, Duration::from_secs(30)).unwrap();
    let rank = group.rank() as f32;
    // Off CUDA the group moves tensors with MPI through the host.
    group.prepare_for(&Device::Cpu).unwrap();
    let device = Device::Cpu;
    let tensors = [
        Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &device).unwrap().affine(1.0, f64::from(rank)).unwrap(),
        Tensor::new(&[10f32 * (rank + 1.0)], &device).unwrap().to_dtype(candle_core::DType::BF16).unwrap(),
    ];
    let mut flat = FlatBuffer::pack(&tensors).unwrap();
    group.all_reduce_mean(&mut flat, "the gradient all-reduce").unwrap();
    let mean = flat.unpack(&tensors).unwrap();
    println!("rank {}: mean={:?} {:?}", group.rank(), mean[0].to_vec2::<f32>().unwrap(), mean[1].to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap());

    let mut flat = FlatBuffer::pack(&tensors).unwrap();
    group.broadcast_flat(&mut flat, 1, "the broadcast of the initial weights").unwrap();
    let broadcast = flat.unpack(&tensors).unwrap();
    println!("rank {}: broadcast={:?} {:?}", group.rank(), broadcast[0].to_vec2::<f32>().unwrap(), broadcast[1].to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap());
    println!("rank {}: done=yes", group.rank());
}

#[test]
fn two_ranks_average_and_broadcast_flat_buffers_of_tensors() {
    let job = launch("rank_flat_buffers", 2, OnDeath::EndTheJob, Duration::from_secs(120));
    assert!(job.succeeded(), "{}", job.describe());
    for rank in 0..2 {
        assert_eq!(job.said(rank, "mean"), "[[1.5, 2.5, 3.5], [4.5, 5.5, 6.5]] [15.0]", "{}", job.describe());
        assert_eq!(job.said(rank, "broadcast"), "[[2.0, 3.0, 4.0], [5.0, 6.0, 7.0]] [20.0]", "{}", job.describe());
        assert_eq!(job.said(rank, "done"), "yes", "{}", job.describe());
    }
}

// ---------------------------------------------------------------- faults

const SHORT_TIMEOUT: Duration = Duration::from_secs(2);

#[test]
fn rank_skips_a_collective() {
    if !acting_as("rank_skips_a_collective") {
        return;
    }
    let group = Group::join(Distributed::Auto, SHORT_TIMEOUT).unwrap();
    let rank = group.rank();
    group.barrier("the first barrier").unwrap();
    if rank == 1 {
        // Never reaches the all-reduce: rank 0 must give up on its own.
        std::thread::sleep(SHORT_TIMEOUT + Duration::from_secs(10));
        return;
    }
    let start = Instant::now();
    let e = group.all_reduce_sum_f32(&mut [1.0; 16], "the gradient all-reduce of step 7").unwrap_err();
    println!("rank 0: waited_ms={}", start.elapsed().as_millis());
    println!("rank 0: error={e}");
    assert_eq!(e.code, ErrorCode::Distributed);
    let start = Instant::now();
    let later = group.barrier("the barrier of step 8").unwrap_err();
    println!("rank 0: later_ms={}", start.elapsed().as_millis());
    println!("rank 0: later={later}");
    assert_eq!(later.code, ErrorCode::Distributed);
    let rejoin = Group::join(Distributed::Auto, SHORT_TIMEOUT).unwrap_err();
    println!("rank 0: rejoin={rejoin}");
    println!("rank 0: done=yes");
}

#[test]
fn a_collective_that_another_rank_skips_fails_after_the_timeout_and_breaks_the_group() {
    let job = launch("rank_skips_a_collective", 2, OnDeath::EndTheJob, Duration::from_secs(120));
    let waited: u128 = job.said(0, "waited_ms").parse().unwrap();
    let timeout = SHORT_TIMEOUT.as_millis();
    assert!(waited >= timeout && waited < timeout + 1000, "rank 0 gave up after {waited} ms, for a timeout of {timeout} ms");
    assert_eq!(
        job.said(0, "error"),
        "E_DISTRIBUTED: rank 0 of 2: the gradient all-reduce of step 7 did not complete within 2 s: another rank died, failed outside \
         a collective, or is far behind; the timeout is distributedTimeout"
    );
    let later: u128 = job.said(0, "later_ms").parse().unwrap();
    assert!(later < 500, "a call on a broken group took {later} ms");
    let message = job.said(0, "later");
    assert!(
        message.starts_with("E_DISTRIBUTED: rank 0 of 2: the barrier of step 8 cannot run: the process group is broken since the gradient all-reduce of step 7 did not complete within 2 s"),
        "{message}"
    );
    assert!(
        job.said(0, "rejoin").starts_with("E_DISTRIBUTED: rank 0 of 2: cannot join: the process group is broken since the gradient all-reduce of step 7"),
        "{}",
        job.describe()
    );
    assert_eq!(job.said(0, "done"), "yes");
    // Rank 0 left without MPI_Finalize (its peer may be gone), while rank 1 still slept:
    // Open MPI's mpirun then ends rank 1 and exits 1, hydra's mpiexec ends it too.
    assert!(job.status.is_some(), "{}", job.describe());
    println!("{}", job.describe());
}

const KILL_TIMEOUT: Duration = Duration::from_secs(3);

#[test]
fn rank_killed_in_a_collective() {
    if !acting_as("rank_killed_in_a_collective") {
        return;
    }
    let group = Group::join(Distributed::Auto, KILL_TIMEOUT).unwrap();
    let rank = group.rank();
    let mut gradients = vec![1.0f32; 4 << 20];
    for step in 0.. {
        if rank == 1 && step == 5 {
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(2));
                println!("rank 1: killed_at_ms={}", now_ms());
                // SAFETY: signals this process.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            });
        }
        if let Err(e) = group.all_reduce_sum_f32(&mut gradients, &format!("the gradient all-reduce of step {step}")) {
            println!("rank {rank}: failed_at_ms={}", now_ms());
            println!("rank {rank}: error={e}");
            return;
        }
    }
}

#[test]
fn a_rank_killed_in_a_collective_ends_the_job_within_the_timeout() {
    let timeout = KILL_TIMEOUT.as_millis();
    // Open MPI's mpirun ends the job itself: it sends the survivor SIGCONT at once,
    // SIGTERM a second later and SIGKILL a second after that, and exits 137.
    let job = launch("rank_killed_in_a_collective", 2, OnDeath::EndTheJob, Duration::from_secs(120));
    println!("the launcher's default: {}", job.describe());
    let killed: u128 = job.said(1, "killed_at_ms").parse().unwrap();
    assert!(job.status.is_some() && !job.succeeded(), "{}", job.describe());
    assert!(job.ended_ms - killed < timeout + 3000, "the job ended {} ms after rank 1 was killed: {}", job.ended_ms - killed, job.describe());

    // Left running, the survivor gives up on its own when the timeout passes. (MPICH over
    // UCX aborts it at once instead: UCX's shared-memory copy from the dead rank fails
    // fatally, inside MPI_Test, beyond any MPI error handler.)
    let job = launch("rank_killed_in_a_collective", 2, OnDeath::KeepTheOthers, Duration::from_secs(120));
    println!("survivors kept: {}", job.describe());
    let killed: u128 = job.said(1, "killed_at_ms").parse().unwrap();
    assert!(job.ended_ms - killed < timeout + 3000, "the job ended {} ms after rank 1 was killed: {}", job.ended_ms - killed, job.describe());
    let failed = job.value(0, "failed_at_ms");
    assert!(failed.is_some() || !launcher().1, "under Open MPI the survivor reports the timeout itself: {}", job.describe());
    if let Some(failed) = failed {
        let failed: u128 = failed.parse().unwrap();
        assert!(failed + 2000 > killed + timeout && failed < killed + timeout + 1000, "rank 0 failed {} ms after rank 1 was killed", failed - killed);
        let error = job.said(0, "error");
        assert!(
            error.starts_with("E_DISTRIBUTED: rank 0 of 2: the gradient all-reduce of step 5 did not complete within 3 s: another rank died"),
            "{}",
            job.describe()
        );
    }
}

// ---------------------------------------------------------------- by hand

/// Times an all-reduce of 100 MB of f32 (see the module's documentation).
#[test]
fn rank_all_reduce_benchmark() {
    if !acting_as("rank_all_reduce_benchmark") {
        return;
    }
    let group = Group::join(Distributed::Auto, DEFAULT_TIMEOUT).unwrap();
    let mut gradients = vec![1.0f32; 25_000_000];
    let mut times = Vec::new();
    for step in 0..6 {
        group.barrier("the barrier before a timed all-reduce").unwrap();
        let start = Instant::now();
        group.all_reduce_sum_f32(&mut gradients, "the timed all-reduce").unwrap();
        if step > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "rank {}: all-reduce of 100 MB f32 over {} ranks: median {:.1} ms, fastest {:.1} ms ({:.2} GB/s of buffer)",
        group.rank(),
        group.size(),
        median * 1e3,
        times[0] * 1e3,
        0.1 / median
    );
}
