//! NCCL, opened at run time, for the collectives of tensors on NVIDIA GPUs: the library's
//! search, the C ABI vit-mae calls, the exchange of a communicator's unique id over MPI
//! (as llm.c and Horovod do) and, in CUDA builds, the communicator itself.
//!
//! **Opened only when asked for.** As MPI, nothing links to NCCL: it is `dlopen`ed when a
//! group of several ranks trains on CUDA, from `VIT_MAE_NCCL_LIBRARY` if set, else
//! `libnccl.so.2` as the dynamic loader finds it (`LD_LIBRARY_PATH`, the system's
//! libraries), else the `nvidia/nccl/lib` folder of the site-packages of the active Python
//! environment (`VIRTUAL_ENV`, `CONDA_PREFIX`), where `pip install nvidia-nccl-cu13` puts
//! it. None loading fails with `E_DISTRIBUTED` naming what was tried and how to get one.
//!
//! **No hang forever.** Communicators are non-blocking (`ncclCommInitRankConfig` with
//! `blocking = 0`): joining and every collective return at once, and the caller polls
//! `ncclCommGetAsyncError` (and, for a collective, a CUDA event recorded after it) until
//! it completes or the group's timeout passes; then the communicator is aborted
//! (`ncclCommAbort` stops its kernels and frees it without waiting for the peers) and
//! every later call fails at once.

use super::Group;
use crate::error::{Error, ErrorCode, Result};
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The variable that names the NCCL library to open.
pub const LIBRARY_VARIABLE: &str = "VIT_MAE_NCCL_LIBRARY";
/// NCCL 2's soname.
const SONAME: &str = "libnccl.so.2";
/// Where to get NCCL, said by every error that finds none.
const INSTALL_HINT: &str = "install NCCL for CUDA 13 (pip install nvidia-nccl-cu13, in the Python environment that is active \
     when training starts, or NVIDIA's libnccl2 package), or set VIT_MAE_NCCL_LIBRARY to the path of libnccl.so.2";

/// `NCCL_VERSION(2, 14, 0)`: the first NCCL with `ncclCommInitRankConfig` and non-blocking
/// communicators (and `ncclAvg`, from 2.10).
const OLDEST_VERSION: c_int = 21400;

/// `ncclUniqueId` (nccl.h: `typedef struct { char internal[NCCL_UNIQUE_ID_BYTES]; }`,
/// `NCCL_UNIQUE_ID_BYTES` 128): what every rank passes to `ncclCommInitRank*` to join one
/// communicator. Passed by value.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct UniqueId(pub [u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

/// `ncclResult_t` (nccl.h: `ncclSuccess` 0 ... `ncclInProgress` 7).
type NcclResult = c_int;
const SUCCESS: NcclResult = 0;
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const IN_PROGRESS: NcclResult = 7;

/// `ncclComm_t`: a pointer to NCCL's opaque `struct ncclComm`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
type Comm = *mut std::ffi::c_void;

/// The NCCL functions vit-mae calls, with nccl.h's prototypes (`ncclDataType_t` and
/// `ncclRedOp_t` are C enums: `int`; `cudaStream_t` is a pointer). The communicator's are
/// called only by CUDA builds.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Functions {
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank_config: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int, *mut ConfigV21400) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(Comm, *mut NcclResult) -> NcclResult,
    comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    all_reduce: unsafe extern "C" fn(*const u8, *mut u8, usize, c_int, c_int, Comm, *mut std::ffi::c_void) -> NcclResult,
    broadcast: unsafe extern "C" fn(*const u8, *mut u8, usize, c_int, c_int, Comm, *mut std::ffi::c_void) -> NcclResult,
}

/// This process's NCCL library.
pub struct Nccl {
    functions: Functions,
    /// The path or name it was opened by.
    pub library: String,
    /// `ncclGetVersion`'s code: 22306 for 2.23.6.
    pub version: c_int,
}

static NCCL: OnceLock<Result<Nccl>> = OnceLock::new();

impl Nccl {
    /// The process's NCCL, opened by the first call (the outcome, success or not, is kept).
    pub fn get() -> Result<&'static Nccl> {
        NCCL.get_or_init(|| {
            let explicit = std::env::var(LIBRARY_VARIABLE).ok().filter(|path| !path.is_empty());
            let environments = ["VIRTUAL_ENV", "CONDA_PREFIX"].into_iter().filter_map(|name| std::env::var_os(name).map(PathBuf::from));
            let names = candidates(explicit.clone(), &environments.collect::<Vec<_>>());
            Nccl::open(&names, explicit.is_some())
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// Opens the first of `names` that loads (`RTLD_LOCAL`: nothing else resolves symbols
    /// against NCCL), which must have every function vit-mae calls.
    pub fn open(names: &[String], explicit: bool) -> Result<Nccl> {
        let variable = explicit.then_some(LIBRARY_VARIABLE);
        let (library, name) = super::open_first(names, RTLD_NOW | RTLD_LOCAL, variable, "training on several GPUs needs NCCL", INSTALL_HINT)?;
        Nccl::recognise(library, &name)
    }

    fn recognise(library: Library, name: &str) -> Result<Nccl> {
        let not_nccl = |why: String| Error::new(ErrorCode::Distributed, format!("{name} is not an NCCL library of version 2.14 or later: {why}; {INSTALL_HINT}"));
        fn get<T: Copy>(library: &Library, symbol: &str) -> std::result::Result<T, String> {
            // SAFETY: each field of `Functions` has the type of nccl.h's prototype of the
            // function of that name.
            unsafe { library.get::<T>(symbol) }.map(|function| *function).map_err(|_| format!("it has no {symbol}"))
        }
        let load = || -> std::result::Result<Functions, String> {
            Ok(Functions {
                get_version: get(&library, "ncclGetVersion")?,
                get_error_string: get(&library, "ncclGetErrorString")?,
                get_unique_id: get(&library, "ncclGetUniqueId")?,
                comm_init_rank_config: get(&library, "ncclCommInitRankConfig")?,
                comm_get_async_error: get(&library, "ncclCommGetAsyncError")?,
                comm_abort: get(&library, "ncclCommAbort")?,
                all_reduce: get(&library, "ncclAllReduce")?,
                broadcast: get(&library, "ncclBroadcast")?,
            })
        };
        let functions = load().map_err(not_nccl)?;
        let mut version: c_int = 0;
        // SAFETY: ncclGetVersion writes one int; it may be called before anything else.
        let status = unsafe { (functions.get_version)(&mut version) };
        if status != SUCCESS || version < OLDEST_VERSION {
            return Err(not_nccl(format!("ncclGetVersion returned {status} and version code {version}")));
        }
        // The functions point into the library: it stays loaded for the process.
        std::mem::forget(library);
        Ok(Nccl { functions, library: name.to_string(), version })
    }

    /// `ncclGetErrorString`'s text for `code`, and the code.
    fn error_string(&self, code: NcclResult) -> String {
        // SAFETY: NCCL returns a pointer to a static NUL-terminated string for any code.
        let text = unsafe { (self.functions.get_error_string)(code) };
        if text.is_null() {
            return format!("NCCL error {code}");
        }
        // SAFETY: non-null, static and NUL-terminated (above).
        format!("{} (NCCL error {code})", unsafe { CStr::from_ptr(text) }.to_string_lossy())
    }

    /// A fresh unique id (`ncclGetUniqueId`): rank 0's, for the others to join. It needs no
    /// GPU: it starts NCCL's bootstrap listener on a network interface of this machine.
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId([0; 128]);
        // SAFETY: ncclGetUniqueId writes one ncclUniqueId (128 bytes, `UniqueId`'s layout).
        let status = unsafe { (self.functions.get_unique_id)(&mut id) };
        if status != SUCCESS {
            return Err(Error::new(ErrorCode::Distributed, format!("ncclGetUniqueId ({}) failed: {}", self.library, self.error_string(status))));
        }
        Ok(id)
    }
}

/// Which libraries to try: `explicit` alone when set, else the soname as the dynamic loader
/// finds it, then the `nvidia/nccl/lib` folder of each Python environment's site-packages
/// (`lib/python3.*/site-packages`, as pip lays it out).
pub fn candidates(explicit: Option<String>, environments: &[PathBuf]) -> Vec<String> {
    if let Some(path) = explicit {
        return vec![path];
    }
    let mut names = vec![SONAME.to_string()];
    for environment in environments {
        let Ok(entries) = std::fs::read_dir(environment.join("lib")) else { continue };
        let mut pythons: Vec<PathBuf> =
            entries.flatten().map(|entry| entry.path()).filter(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("python3"))).collect();
        pythons.sort();
        for python in pythons {
            let library = python.join("site-packages/nvidia/nccl/lib").join(SONAME);
            if library.is_file() {
                names.push(library.to_string_lossy().into_owned());
            }
        }
    }
    names
}

/// Rank 0's unique id on every rank: rank 0 calls `generate` (`Nccl::unique_id`, or a
/// stand-in in tests) and broadcasts the 128 bytes over MPI. Collective. When `generate`
/// fails, every rank fails (naming rank 0's error) instead of waiting for the bytes.
pub fn exchange_unique_id(group: &Group, generate: impl FnOnce() -> Result<UniqueId>) -> Result<UniqueId> {
    let generated = if group.rank() == 0 { generate() } else { Ok(UniqueId([0; 128])) };
    let mut id = group.agree(generated, "generating the NCCL unique id")?;
    group.broadcast(&mut id.0, 0, "the broadcast of the NCCL unique id")?;
    Ok(id)
}

/// `ncclConfig_t` as NCCL 2.14 declared it (`ncclConfig_v21400`: size, magic, version,
/// blocking). Later NCCLs copy `size` bytes of it over their defaults and reset every field
/// added after the `version` it states, so this prefix serves them all.
#[repr(C)]
struct ConfigV21400 {
    size: usize,
    magic: std::ffi::c_uint,
    version: std::ffi::c_uint,
    blocking: c_int,
}

#[cfg(feature = "cuda")]
pub(super) use communicator::Communicator;

/// The communicator of the ranks' GPUs (CUDA builds).
#[cfg(feature = "cuda")]
mod communicator {
    use super::*;
    use crate::distributed::flat::FlatBuffer;
    use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr};
    use candle_core::cuda_backend::CudaDevice;
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// `ncclFloat32` (nccl.h's `ncclDataType_t`) and `ncclAvg` (`ncclRedOp_t`).
    const FLOAT32: c_int = 7;
    const AVERAGE: c_int = 4;

    impl ConfigV21400 {
        /// NCCL 2.14's `NCCL_CONFIG_INITIALIZER`, with `blocking = 0`.
        fn non_blocking() -> Self {
            // NCCL_API_MAGIC.
            const MAGIC: std::ffi::c_uint = 0xcafe_beef;
            ConfigV21400 { size: std::mem::size_of::<Self>(), magic: MAGIC, version: OLDEST_VERSION as std::ffi::c_uint, blocking: 0 }
        }
    }

    /// One rank's member of the communicator of every rank's GPU, on one CUDA device.
    pub struct Communicator {
        nccl: &'static Nccl,
        /// The CUDA device's ordinal.
        ordinal: usize,
        state: Mutex<State>,
    }

    struct State {
        /// Null once aborted.
        comm: Comm,
        /// Why no collective may run any more.
        broken: Option<String>,
    }

    // SAFETY: `comm` is NCCL's handle, which any thread may use, one call at a time: every
    // call is made with the state's mutex held.
    unsafe impl Send for State {}

    /// The communicators of this process, one per device, kept for the process as MPI is:
    /// joining is collective and costly, and each job of the binding has a group of its own.
    static COMMUNICATORS: Mutex<Vec<Arc<Communicator>>> = Mutex::new(Vec::new());

    impl Communicator {
        /// This process's communicator on `device`, joined by the first call: every rank
        /// opens NCCL, rank 0's unique id goes to all over MPI, and every rank joins on its
        /// device. Collective; when a rank fails, every rank does.
        pub fn get(group: &Group, device: &CudaDevice) -> Result<Arc<Communicator>> {
            let mut communicators = COMMUNICATORS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let ordinal = device.cuda_stream().context().ordinal();
            if let Some(communicator) = communicators.iter().find(|communicator| communicator.ordinal == ordinal) {
                return Ok(Arc::clone(communicator));
            }
            let nccl = group.agree(Nccl::get(), "opening NCCL")?;
            let id = exchange_unique_id(group, || nccl.unique_id())?;
            let communicator = Arc::new(group.agree(Communicator::join(nccl, id, group, device), "joining the NCCL communicator")?);
            communicators.push(Arc::clone(&communicator));
            Ok(communicator)
        }

        fn join(nccl: &'static Nccl, id: UniqueId, group: &Group, device: &CudaDevice) -> Result<Communicator> {
            let stream = device.cuda_stream();
            // NCCL joins on the calling thread's current device: candle's.
            stream.context().bind_to_thread().map_err(|e| cuda_error("binding the CUDA context before joining NCCL", e))?;
            let mut comm: Comm = std::ptr::null_mut();
            let mut config = ConfigV21400::non_blocking();
            let (size, rank) = (group.size() as c_int, group.rank() as c_int);
            // SAFETY: NCCL writes the handle; the id is passed by value, the config read
            // during the call (`size` bytes of it, NCCL 2.14's layout).
            let status = unsafe { (nccl.functions.comm_init_rank_config)(&mut comm, size, id, rank, &mut config) };
            let communicator = Communicator { nccl, ordinal: stream.context().ordinal(), state: Mutex::new(State { comm, broken: None }) };
            communicator.finish(group, "joining the NCCL communicator", status, None)?;
            Ok(communicator)
        }

        /// Replaces `flat` by its mean over the ranks, in place on the device, on candle's
        /// stream: one `ncclAllReduce` with `ncclAvg`. Collective.
        pub fn all_reduce_mean(&self, flat: &FlatBuffer, group: &Group, what: &str) -> Result<()> {
            self.in_place(flat, group, what, |nccl, buffer, count, comm, stream| {
                // SAFETY: in place on `count` f32 of device memory that stays allocated
                // until the operation completes (`in_place`); the stream is candle's.
                unsafe { (nccl.functions.all_reduce)(buffer, buffer, count, FLOAT32, AVERAGE, comm, stream) }
            })
        }

        /// Copies `root`'s `flat` into every rank's, in place on the device. Collective.
        pub fn broadcast(&self, flat: &FlatBuffer, root: usize, group: &Group, what: &str) -> Result<()> {
            self.in_place(flat, group, what, |nccl, buffer, count, comm, stream| {
                // SAFETY: as `all_reduce_mean`'s; root is a rank of the group (checked by
                // the caller).
                unsafe { (nccl.functions.broadcast)(buffer, buffer, count, FLOAT32, root as c_int, comm, stream) }
            })
        }

        /// Starts `operation` on `flat`'s device memory on candle's stream and waits until the
        /// GPU has done it (the training loop reads the gradients' norm next anyway).
        fn in_place(
            &self,
            flat: &FlatBuffer,
            group: &Group,
            what: &str,
            operation: impl FnOnce(&Nccl, *mut u8, usize, Comm, *mut c_void) -> NcclResult,
        ) -> Result<()> {
            let tensor = flat.tensor();
            let (storage, layout) = tensor.storage_and_layout();
            let candle_core::Storage::Cuda(storage) = &*storage else {
                return Err(Error::new(ErrorCode::Internal, format!("{what}: NCCL was given a tensor on {:?}", tensor.device())));
            };
            let stream: Arc<CudaStream> = storage.device.cuda_stream();
            // The flat buffer is contiguous (packed) and its own: nothing else reads or
            // writes this memory while NCCL does, and it outlives the wait below.
            let (base, _record_use) = storage.as_cuda_slice::<f32>()?.device_ptr(&stream);
            let buffer = (base as usize + layout.start_offset() * std::mem::size_of::<f32>()) as *mut u8;
            let status = {
                let state = self.lock();
                if let Some(why) = &state.broken {
                    return Err(Error::new(ErrorCode::Distributed, format!("rank {} of {}: {what} cannot run: {why}", group.rank(), group.size())));
                }
                stream.context().bind_to_thread().map_err(|e| cuda_error(what, e))?;
                operation(self.nccl, buffer, tensor.elem_count(), state.comm, stream.cu_stream() as *mut c_void)
            };
            self.finish(group, what, status, Some(&stream))
        }

        fn lock(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
        }

        /// Waits until the call that returned `status` has completed: NCCL's state of the
        /// communicator is no longer in progress and, for a collective, the GPU has run
        /// it (an event recorded on `stream` after it). An error, or the group's timeout
        /// passing first, aborts the communicator.
        fn finish(&self, group: &Group, what: &str, status: NcclResult, stream: Option<&CudaStream>) -> Result<()> {
            let mut state = self.lock();
            let outcome = self.wait(&state, status, stream, group.timeout());
            outcome.map_err(|why| {
                // SAFETY: a handle NCCL returned, aborted once (then null): ncclCommAbort
                // stops its kernels and frees it without waiting for the other ranks.
                if !state.comm.is_null() {
                    unsafe { (self.nccl.functions.comm_abort)(state.comm) };
                    state.comm = std::ptr::null_mut();
                }
                let message = format!("{what} failed: {why}");
                state.broken = Some(format!("the NCCL communicator was aborted since {message}"));
                Error::new(ErrorCode::Distributed, format!("rank {} of {}: {message}", group.rank(), group.size()))
            })
        }

        fn wait(&self, state: &State, status: NcclResult, stream: Option<&CudaStream>, timeout: Duration) -> std::result::Result<(), String> {
            if status != SUCCESS && status != IN_PROGRESS {
                return Err(self.nccl.error_string(status));
            }
            let async_state = || {
                let mut result = IN_PROGRESS;
                // SAFETY: a live handle (not aborted: callers check `broken` first, and
                // abort happens under the same lock); NCCL writes one ncclResult_t.
                let status = unsafe { (self.nccl.functions.comm_get_async_error)(state.comm, &mut result) };
                match (status, result) {
                    (SUCCESS, SUCCESS) => Ok(true),
                    (SUCCESS, IN_PROGRESS) => Ok(false),
                    (SUCCESS, error) => Err(self.nccl.error_string(error)),
                    (error, _) => Err(format!("ncclCommGetAsyncError returned {}", self.nccl.error_string(error))),
                }
            };
            let timed_out = || {
                format!(
                    "it did not complete within {}: another rank died, failed outside a collective, or is far behind; the timeout is distributedTimeout",
                    super::super::seconds(timeout)
                )
            };
            // Enqueued (a non-blocking communicator may still be launching it)...
            if !super::super::poll_until(timeout, async_state)? {
                return Err(timed_out());
            }
            let Some(stream) = stream else { return Ok(()) };
            // ... and run by the GPU, unless the communicator reports an error first.
            let done = stream.record_event(None).map_err(|e| format!("cuEventRecord failed: {e}"))?;
            let ran = || -> std::result::Result<bool, String> { Ok(async_state()? && done.try_is_complete().map_err(|e| format!("cuEventQuery failed: {e}"))?) };
            if !super::super::poll_until(timeout, ran)? {
                return Err(timed_out());
            }
            Ok(())
        }
    }

    impl Drop for Communicator {
        fn drop(&mut self) {
            let state = self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
            if !state.comm.is_null() {
                // SAFETY: a live handle, freed once. Abort, not destroy: it never waits for
                // the other ranks (a communicator is dropped when joining failed somewhere).
                unsafe { (self.nccl.functions.comm_abort)(state.comm) };
            }
        }
    }

    fn cuda_error(what: &str, e: impl std::fmt::Display) -> Error {
        Error::new(ErrorCode::Distributed, format!("{what}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_alone_else_the_soname_then_each_environment_s_wheel() {
        assert_eq!(candidates(Some("/opt/nccl/lib/libnccl.so.2".into()), &[PathBuf::from("/nonexistent")]), ["/opt/nccl/lib/libnccl.so.2"]);
        let environment = std::env::temp_dir().join(format!("vit-mae-nccl-candidates-{}", std::process::id()));
        let wheel = environment.join("lib/python3.12/site-packages/nvidia/nccl/lib");
        std::fs::create_dir_all(&wheel).unwrap();
        std::fs::create_dir_all(environment.join("lib/python3.11/site-packages")).unwrap();
        std::fs::write(wheel.join(SONAME), b"").unwrap();
        let found = candidates(None, &[PathBuf::from("/nonexistent"), environment.clone()]);
        std::fs::remove_dir_all(&environment).unwrap();
        assert_eq!(found, [SONAME.to_string(), wheel.join(SONAME).to_string_lossy().into_owned()]);
    }

    #[test]
    fn no_library_found_names_every_one_tried_and_the_wheel_that_provides_one() {
        let names = ["libvit-mae-absent-nccl.so.2".to_string(), "/nonexistent/nvidia/nccl/lib/libnccl.so.2".to_string()];
        let e = Nccl::open(&names, false).err().expect("no such library");
        assert_eq!(e.code, ErrorCode::Distributed);
        assert!(
            e.message.starts_with(
                "training on several GPUs needs NCCL, and none of libvit-mae-absent-nccl.so.2, /nonexistent/nvidia/nccl/lib/libnccl.so.2 \
                 could be loaded (libvit-mae-absent-nccl.so.2: cannot open shared object file"
            ),
            "{}",
            e.message
        );
        assert!(e.message.ends_with(INSTALL_HINT), "{}", e.message);
    }

    #[test]
    fn a_unique_id_is_nccl_s_128_bytes() {
        assert_eq!(std::mem::size_of::<UniqueId>(), 128);
        assert_eq!(std::mem::size_of::<ConfigV21400>(), 24);
        let mut bytes = [0u8; 128];
        bytes[0] = 0xab;
        assert_eq!(format!("{:?}", UniqueId(bytes)), format!("ab{}", "00".repeat(127)));
    }
}
