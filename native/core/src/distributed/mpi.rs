//! The MPI library, opened at run time: its search, the two ABIs, initialisation once per
//! process, non-blocking operations and `MPI_Finalize` at exit.

use crate::error::{Error, ErrorCode, Result};
use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use std::ffi::{c_char, c_int, c_void};
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Where to get an MPI library, said by every error that finds none.
const INSTALL_HINT: &str = "install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev) or MPICH \
     (apt-get install mpich libmpich12), or set VIT_MAE_MPI_LIBRARY to the path of an MPI library";

/// The libraries tried when `VIT_MAE_MPI_LIBRARY` is unset: Open MPI 4 and 5, MPICH (and
/// the MPICH-ABI libraries of Intel MPI, MVAPICH, Cray), then whatever `libmpi.so` is.
const OPEN_MPI_NAMES: [&str; 1] = ["libmpi.so.40"];
const MPICH_NAMES: [&str; 2] = ["libmpi.so.12", "libmpich.so.12"];
const FALLBACK_NAME: &str = "libmpi.so";

/// `MPI_THREAD_SERIALIZED` and `MPI_THREAD_MULTIPLE`: the same in both ABIs (mpi.h: an
/// enum from `MPI_THREAD_SINGLE` = 0 in Open MPI, `#define`s 0 to 3 in MPICH).
const THREAD_SERIALIZED: c_int = 2;
const THREAD_MULTIPLE: c_int = 3;
const THREAD_LEVELS: [&str; 4] = ["MPI_THREAD_SINGLE", "MPI_THREAD_FUNNELED", "MPI_THREAD_SERIALIZED", "MPI_THREAD_MULTIPLE"];
/// `MPI_SUCCESS` in both.
const SUCCESS: c_int = 0;
/// Longer than `MPI_MAX_ERROR_STRING` in both (Open MPI 256, MPICH 512).
const ERROR_STRING_CAPACITY: usize = 1024;

/// The element types vit-mae reduces (everything else moves as bytes).
#[derive(Clone, Copy, Debug)]
pub(super) enum Element {
    F32,
    F64,
}

/// The reductions vit-mae uses.
#[derive(Clone, Copy, Debug)]
pub(super) enum Reduction {
    Sum,
    Max,
}

/// An MPI call that returned an error code.
#[derive(Debug)]
pub(super) struct MpiError {
    pub function: &'static str,
    pub code: c_int,
}

type MpiResult<T> = std::result::Result<T, MpiError>;

fn check(function: &'static str, code: c_int) -> MpiResult<()> {
    if code == SUCCESS {
        Ok(())
    } else {
        Err(MpiError { function, code })
    }
}

/// What differs between the two ABIs: the C type of a handle and of a request, the
/// predefined handles and two sentinel pointers. Everything else is written once.
///
/// | constant              | Open MPI (`openmpi/include/mpi.h`) | MPICH (`mpich/mpi.h`) |
/// |-----------------------|-----------------------------------|-----------------------|
/// | `MPI_Comm` etc.       | pointer to a library object       | `int`                 |
/// | `MPI_Request`         | pointer                           | `int`                 |
/// | `MPI_COMM_WORLD`      | `&ompi_mpi_comm_world`            | `0x44000000`          |
/// | `MPI_BYTE`            | `&ompi_mpi_byte`                  | `0x4c00010d`          |
/// | `MPI_FLOAT`           | `&ompi_mpi_float`                 | `0x4c00040a`          |
/// | `MPI_DOUBLE`          | `&ompi_mpi_double`                | `0x4c00080b`          |
/// | `MPI_SUM`             | `&ompi_mpi_op_sum`                | `0x58000003`          |
/// | `MPI_MAX`             | `&ompi_mpi_op_max`                | `0x58000001`          |
/// | `MPI_ERRORS_RETURN`   | `&ompi_mpi_errors_return`         | `0x54000001`          |
/// | `MPI_IN_PLACE`        | `(void *) 1`                      | `(void *) -1`         |
/// | `MPI_STATUS_IGNORE`   | `(MPI_Status *) 0`                | `(MPI_Status *) 1`    |
///
/// Checked against Open MPI 4.1.4's and MPICH 4.0.2's headers (Debian 12).
trait Abi: 'static {
    /// `MPI_Comm`, `MPI_Datatype`, `MPI_Op` and `MPI_Errhandler`.
    type Handle: Copy;
    /// `MPI_Request`.
    type Request: Copy;
    const NAME: &'static str;
    const IN_PLACE: *mut c_void;
    const STATUS_IGNORE: *mut c_void;

    /// The predefined handle that Open MPI exports as the object `open_mpi_symbol` and
    /// MPICH defines as the integer `mpich_value`.
    fn predefined(library: &Library, open_mpi_symbol: &str, mpich_value: u32) -> std::result::Result<Self::Handle, String>;
}

struct OpenMpi;
struct Mpich;

impl Abi for OpenMpi {
    type Handle = *mut c_void;
    type Request = *mut c_void;
    const NAME: &'static str = "Open MPI";
    const IN_PLACE: *mut c_void = std::ptr::without_provenance_mut(1);
    const STATUS_IGNORE: *mut c_void = std::ptr::null_mut();

    fn predefined(library: &Library, open_mpi_symbol: &str, _: u32) -> std::result::Result<*mut c_void, String> {
        // SAFETY: the symbol is a data object; only its address is taken, which is what
        // Open MPI's mpi.h makes the handle (`OMPI_PREDEFINED_GLOBAL`).
        unsafe { library.get::<*mut c_void>(open_mpi_symbol) }.map(|symbol| *symbol).map_err(|_| format!("it has no {open_mpi_symbol}"))
    }
}

impl Abi for Mpich {
    type Handle = c_int;
    type Request = c_int;
    const NAME: &'static str = "MPICH";
    const IN_PLACE: *mut c_void = std::ptr::without_provenance_mut(usize::MAX);
    const STATUS_IGNORE: *mut c_void = std::ptr::without_provenance_mut(1);

    fn predefined(_: &Library, _: &str, mpich_value: u32) -> std::result::Result<c_int, String> {
        // MPICH's handles are the bit patterns of its hexadecimal constants, as C reads them.
        Ok(mpich_value as c_int)
    }
}

/// The predefined handles vit-mae uses, from the table above.
struct Handles<H> {
    world: H,
    byte: H,
    float: H,
    double: H,
    sum: H,
    max: H,
    errors_return: H,
}

impl<H> Handles<H> {
    fn load<A: Abi<Handle = H>>(library: &Library) -> std::result::Result<Self, String> {
        Ok(Handles {
            world: A::predefined(library, "ompi_mpi_comm_world", 0x4400_0000)?,
            byte: A::predefined(library, "ompi_mpi_byte", 0x4c00_010d)?,
            float: A::predefined(library, "ompi_mpi_float", 0x4c00_040a)?,
            double: A::predefined(library, "ompi_mpi_double", 0x4c00_080b)?,
            sum: A::predefined(library, "ompi_mpi_op_sum", 0x5800_0003)?,
            max: A::predefined(library, "ompi_mpi_op_max", 0x5800_0001)?,
            errors_return: A::predefined(library, "ompi_mpi_errors_return", 0x5400_0001)?,
        })
    }
}

/// The MPI functions vit-mae calls, typed by the ABI's handles (mpi.h's prototypes).
struct Functions<A: Abi> {
    initialized: unsafe extern "C" fn(*mut c_int) -> c_int,
    init_thread: unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char, c_int, *mut c_int) -> c_int,
    query_thread: unsafe extern "C" fn(*mut c_int) -> c_int,
    finalized: unsafe extern "C" fn(*mut c_int) -> c_int,
    finalize: unsafe extern "C" fn() -> c_int,
    error_string: unsafe extern "C" fn(c_int, *mut c_char, *mut c_int) -> c_int,
    comm_rank: unsafe extern "C" fn(A::Handle, *mut c_int) -> c_int,
    comm_size: unsafe extern "C" fn(A::Handle, *mut c_int) -> c_int,
    comm_set_errhandler: unsafe extern "C" fn(A::Handle, A::Handle) -> c_int,
    iallreduce: unsafe extern "C" fn(*const c_void, *mut c_void, c_int, A::Handle, A::Handle, A::Handle, *mut A::Request) -> c_int,
    ibcast: unsafe extern "C" fn(*mut c_void, c_int, A::Handle, c_int, A::Handle, *mut A::Request) -> c_int,
    #[allow(clippy::type_complexity)]
    iallgatherv: unsafe extern "C" fn(
        *const c_void,
        c_int,
        A::Handle,
        *mut c_void,
        *const c_int,
        *const c_int,
        A::Handle,
        A::Handle,
        *mut A::Request,
    ) -> c_int,
    isend: unsafe extern "C" fn(*const c_void, c_int, A::Handle, c_int, c_int, A::Handle, *mut A::Request) -> c_int,
    irecv: unsafe extern "C" fn(*mut c_void, c_int, A::Handle, c_int, c_int, A::Handle, *mut A::Request) -> c_int,
    ibarrier: unsafe extern "C" fn(A::Handle, *mut A::Request) -> c_int,
    test: unsafe extern "C" fn(*mut A::Request, *mut c_int, *mut c_void) -> c_int,
}

impl<A: Abi> Functions<A> {
    fn load(library: &Library) -> std::result::Result<Self, String> {
        fn get<T: Copy>(library: &Library, name: &str) -> std::result::Result<T, String> {
            // SAFETY: each field's type is the prototype of the function of that name in
            // mpi.h, with the handle types of the ABI the library was recognised as.
            unsafe { library.get::<T>(name) }.map(|symbol| *symbol).map_err(|_| format!("it has no {name}"))
        }
        Ok(Functions {
            initialized: get(library, "MPI_Initialized")?,
            init_thread: get(library, "MPI_Init_thread")?,
            query_thread: get(library, "MPI_Query_thread")?,
            finalized: get(library, "MPI_Finalized")?,
            finalize: get(library, "MPI_Finalize")?,
            error_string: get(library, "MPI_Error_string")?,
            comm_rank: get(library, "MPI_Comm_rank")?,
            comm_size: get(library, "MPI_Comm_size")?,
            comm_set_errhandler: get(library, "MPI_Comm_set_errhandler")?,
            iallreduce: get(library, "MPI_Iallreduce")?,
            ibcast: get(library, "MPI_Ibcast")?,
            iallgatherv: get(library, "MPI_Iallgatherv")?,
            isend: get(library, "MPI_Isend")?,
            irecv: get(library, "MPI_Irecv")?,
            ibarrier: get(library, "MPI_Ibarrier")?,
            test: get(library, "MPI_Test")?,
        })
    }
}

/// MPI's operations, whatever the ABI. The `start_*` functions start a non-blocking
/// operation; `test` says whether every operation started since the last completion has
/// completed. Each takes `&mut self`: the caller serializes every MPI call.
pub(super) trait Operations: Send {
    fn abi(&self) -> &'static str;
    /// Initialises MPI (unless something else in the process did) and sets
    /// `MPI_ERRORS_RETURN` on `MPI_COMM_WORLD`; returns whether this call initialised MPI,
    /// and the thread level it provides.
    fn initialise(&mut self) -> MpiResult<(bool, c_int)>;
    fn rank_and_size(&mut self) -> MpiResult<(usize, usize)>;
    /// # Safety
    /// `buffer` stays valid and untouched until `test` says the operation completed, or
    /// forever if it never does.
    unsafe fn start_all_reduce(&mut self, buffer: &mut [u8], element: Element, reduction: Reduction) -> MpiResult<()>;
    /// # Safety
    /// As [`Operations::start_all_reduce`].
    unsafe fn start_broadcast(&mut self, buffer: &mut [u8], root: usize) -> MpiResult<()>;
    /// Gathers `counts[r]` bytes from rank `r` at `displacements[r]` of `buffer`, in place:
    /// this rank's bytes are already there.
    /// # Safety
    /// As [`Operations::start_all_reduce`], for `buffer`, `counts` and `displacements`.
    unsafe fn start_all_gather(&mut self, buffer: &mut [u8], counts: &[c_int], displacements: &[c_int]) -> MpiResult<()>;
    /// # Safety
    /// As [`Operations::start_all_reduce`], for both buffers.
    unsafe fn start_exchange(&mut self, send: &[u8], receive: &mut [u8], peer: usize) -> MpiResult<()>;
    fn start_barrier(&mut self) -> MpiResult<()>;
    fn test(&mut self) -> MpiResult<bool>;
    fn error_string(&self, code: c_int) -> String;
    fn finalize(&mut self) -> MpiResult<()>;
}

/// An MPI library of ABI `A`, initialised.
struct Mpi<A: Abi> {
    functions: Functions<A>,
    handles: Handles<A::Handle>,
    /// The requests of the operation in flight, until they complete.
    pending: Vec<A::Request>,
    _abi: PhantomData<A>,
}

// SAFETY: the handles are the addresses of Open MPI's predefined objects (never freed) or
// MPICH's integers, and the requests are MPI's; MPI was initialised with at least
// MPI_THREAD_SERIALIZED, so any thread may call it, one at a time: `&mut self` on every
// call that reaches MPI, behind the process's one mutex (`World::state`).
unsafe impl<A: Abi> Send for Mpi<A> {}

/// A count or displacement, a C int: the callers' chunks are never larger
/// (`super::CHUNK_BYTES`).
fn count(bytes: usize, element_size: usize) -> c_int {
    c_int::try_from(bytes / element_size).expect("chunks hold at most i32::MAX bytes")
}

impl<A: Abi> Mpi<A> {
    fn start(&mut self, function: &'static str, call: impl FnOnce(*mut A::Request) -> c_int) -> MpiResult<()> {
        let mut request = MaybeUninit::<A::Request>::uninit();
        check(function, call(request.as_mut_ptr()))?;
        // SAFETY: MPI wrote the request on success.
        self.pending.push(unsafe { request.assume_init() });
        Ok(())
    }
}

impl<A: Abi> Operations for Mpi<A> {
    fn abi(&self) -> &'static str {
        A::NAME
    }

    fn initialise(&mut self) -> MpiResult<(bool, c_int)> {
        let f = &self.functions;
        let (mut initialized, mut provided) = (0, 0);
        // SAFETY: MPI_Initialized and MPI_Query_thread may be called at any time, and
        // MPI_Init_thread once (this runs once per process, in `World::get`), with null
        // argc and argv as MPI-2 allows.
        unsafe {
            check("MPI_Initialized", (f.initialized)(&mut initialized))?;
            if initialized == 0 {
                check("MPI_Init_thread", (f.init_thread)(std::ptr::null_mut(), std::ptr::null_mut(), THREAD_MULTIPLE, &mut provided))?;
            } else {
                check("MPI_Query_thread", (f.query_thread)(&mut provided))?;
            }
            check("MPI_Comm_set_errhandler", (f.comm_set_errhandler)(self.handles.world, self.handles.errors_return))?;
        }
        Ok((initialized == 0, provided))
    }

    fn rank_and_size(&mut self) -> MpiResult<(usize, usize)> {
        let (mut rank, mut size) = (0, 0);
        // SAFETY: MPI is initialised; each call writes one int.
        unsafe {
            check("MPI_Comm_rank", (self.functions.comm_rank)(self.handles.world, &mut rank))?;
            check("MPI_Comm_size", (self.functions.comm_size)(self.handles.world, &mut size))?;
        }
        Ok((rank as usize, size as usize))
    }

    unsafe fn start_all_reduce(&mut self, buffer: &mut [u8], element: Element, reduction: Reduction) -> MpiResult<()> {
        let (datatype, element_size) = match element {
            Element::F32 => (self.handles.float, 4),
            Element::F64 => (self.handles.double, 8),
        };
        let op = match reduction {
            Reduction::Sum => self.handles.sum,
            Reduction::Max => self.handles.max,
        };
        let (f, world, count) = (self.functions.iallreduce, self.handles.world, count(buffer.len(), element_size));
        // SAFETY: in place on `buffer`, which the caller keeps valid until completion.
        self.start("MPI_Iallreduce", |request| unsafe { f(A::IN_PLACE, buffer.as_mut_ptr().cast(), count, datatype, op, world, request) })
    }

    unsafe fn start_broadcast(&mut self, buffer: &mut [u8], root: usize) -> MpiResult<()> {
        let (f, world, byte) = (self.functions.ibcast, self.handles.world, self.handles.byte);
        let (count, root) = (count(buffer.len(), 1), root as c_int);
        // SAFETY: `buffer` stays valid until completion (the caller's contract).
        self.start("MPI_Ibcast", |request| unsafe { f(buffer.as_mut_ptr().cast(), count, byte, root, world, request) })
    }

    unsafe fn start_all_gather(&mut self, buffer: &mut [u8], counts: &[c_int], displacements: &[c_int]) -> MpiResult<()> {
        let (f, world, byte) = (self.functions.iallgatherv, self.handles.world, self.handles.byte);
        // SAFETY: in place (send arguments ignored); `buffer`, `counts` and
        // `displacements` (one per rank) stay valid until completion (the caller's contract).
        self.start("MPI_Iallgatherv", |request| unsafe {
            f(A::IN_PLACE, 0, byte, buffer.as_mut_ptr().cast(), counts.as_ptr(), displacements.as_ptr(), byte, world, request)
        })
    }

    unsafe fn start_exchange(&mut self, send: &[u8], receive: &mut [u8], peer: usize) -> MpiResult<()> {
        // One tag: MPI keeps the order of messages between two ranks, so successive
        // exchanges with a peer match in order.
        const TAG: c_int = 0;
        let (world, byte, peer) = (self.handles.world, self.handles.byte, peer as c_int);
        let (irecv, isend) = (self.functions.irecv, self.functions.isend);
        // SAFETY: both buffers stay valid until completion (the caller's contract).
        self.start("MPI_Irecv", |request| unsafe { irecv(receive.as_mut_ptr().cast(), count(receive.len(), 1), byte, peer, TAG, world, request) })?;
        self.start("MPI_Isend", |request| unsafe { isend(send.as_ptr().cast(), count(send.len(), 1), byte, peer, TAG, world, request) })
    }

    fn start_barrier(&mut self) -> MpiResult<()> {
        let (f, world) = (self.functions.ibarrier, self.handles.world);
        // SAFETY: no buffer; MPI writes the request.
        self.start("MPI_Ibarrier", |request| unsafe { f(world, request) })
    }

    fn test(&mut self) -> MpiResult<bool> {
        let test = self.functions.test;
        let mut first_error = None;
        self.pending.retain_mut(|request| {
            let mut done: c_int = 0;
            // SAFETY: a request MPI returned that has not completed (completed ones leave
            // `pending`); MPI writes the flag and ignores the status.
            match check("MPI_Test", unsafe { test(request, &mut done, A::STATUS_IGNORE) }) {
                Ok(()) => done == 0,
                Err(e) => {
                    first_error.get_or_insert(e);
                    true
                }
            }
        });
        match first_error {
            Some(e) => Err(e),
            None => Ok(self.pending.is_empty()),
        }
    }

    fn error_string(&self, code: c_int) -> String {
        let mut text = [0 as c_char; ERROR_STRING_CAPACITY];
        let mut length: c_int = 0;
        // SAFETY: MPI writes at most MPI_MAX_ERROR_STRING (< the capacity) characters.
        let status = unsafe { (self.functions.error_string)(code, text.as_mut_ptr(), &mut length) };
        if status != SUCCESS {
            return format!("MPI error {code}");
        }
        let bytes: Vec<u8> = text[..(length.max(0) as usize).min(ERROR_STRING_CAPACITY)].iter().map(|&c| c as u8).collect();
        format!("{} (MPI error {code})", String::from_utf8_lossy(&bytes).trim())
    }

    fn finalize(&mut self) -> MpiResult<()> {
        let mut finalized: c_int = 0;
        // SAFETY: both are legal after MPI_Init; MPI_Finalize runs at most once (checked).
        unsafe {
            check("MPI_Finalized", (self.functions.finalized)(&mut finalized))?;
            if finalized == 0 {
                check("MPI_Finalize", (self.functions.finalize)())?;
            }
        }
        Ok(())
    }
}

/// Which library to open: `VIT_MAE_MPI_LIBRARY`, else the usual names, MPICH's first when
/// the launcher is MPICH's (both may be installed).
fn candidates(explicit: Option<String>, prefer_mpich: bool) -> Vec<String> {
    if let Some(path) = explicit {
        return vec![path];
    }
    let (first, second): (&[&str], &[&str]) = if prefer_mpich { (&MPICH_NAMES, &OPEN_MPI_NAMES) } else { (&OPEN_MPI_NAMES, &MPICH_NAMES) };
    first.iter().chain(second).chain([&FALLBACK_NAME]).map(|name| name.to_string()).collect()
}

/// Opens the first of `names` that loads, with global symbol visibility, for Open MPI's
/// plugins (see the module documentation).
pub(super) fn open(names: &[String], explicit: bool) -> Result<(Library, String)> {
    let variable = explicit.then_some("VIT_MAE_MPI_LIBRARY");
    super::open_first(names, RTLD_NOW | RTLD_GLOBAL, variable, "distributed training needs an MPI library", INSTALL_HINT)
}

/// The library's ABI: Open MPI exports its predefined objects, MPICH-ABI libraries do not.
fn recognise(library: Library, name: &str) -> Result<Box<dyn Operations>> {
    // SAFETY: only the symbol's presence is checked.
    let open_mpi = unsafe { library.get::<*mut c_void>("ompi_mpi_comm_world") }.is_ok();
    let loaded = if open_mpi { load::<OpenMpi>(library) } else { load::<Mpich>(library) };
    loaded.map_err(|why| Error::new(ErrorCode::Distributed, format!("{name} is not an MPI-3 library: {why}; {INSTALL_HINT}")))
}

fn load<A: Abi>(library: Library) -> std::result::Result<Box<dyn Operations>, String> {
    let functions = Functions::<A>::load(&library)?;
    let handles = Handles::load::<A>(&library)?;
    // The functions and handles point into the library: it stays loaded for the process.
    std::mem::forget(library);
    Ok(Box::new(Mpi { functions, handles, pending: Vec::new(), _abi: PhantomData::<A> }))
}

/// The memory every operation runs in: the only memory MPI is handed (see
/// `State::break_down`).
#[derive(Default)]
pub(super) struct Staging {
    /// f64 for the alignment of every element type.
    words: Vec<f64>,
    /// An all-gather's count and displacement of each rank.
    counts: Vec<c_int>,
    displacements: Vec<c_int>,
}

impl Staging {
    /// The first `bytes` bytes of the staging memory (grown as needed).
    pub fn bytes(&mut self, bytes: usize) -> &mut [u8] {
        let words = bytes.div_ceil(8);
        if self.words.len() < words {
            self.words.resize(words, 0.0);
        }
        &mut bytemuck::cast_slice_mut(&mut self.words)[..bytes]
    }

    /// Room for an all-gather of `counts[r]` bytes from each rank `r`, one after another:
    /// the bytes, the counts and the displacements.
    pub fn all_gather(&mut self, counts: &[usize]) -> (&mut [u8], &[c_int], &[c_int]) {
        let total: usize = counts.iter().sum();
        self.counts = counts.iter().map(|&bytes| count(bytes, 1)).collect();
        self.displacements = counts.iter().scan(0, |offset, &bytes| Some(count(std::mem::replace(offset, *offset + bytes), 1))).collect();
        self.bytes(total);
        let Staging { words, counts, displacements } = self;
        (&mut bytemuck::cast_slice_mut(words)[..total], counts, displacements)
    }
}

/// The state of this process's MPI, behind one mutex: every MPI call after
/// initialisation is made with it held, so calls never overlap, whatever thread level
/// the library provides (vit-mae never needs two at once).
pub(super) struct State {
    pub operations: Box<dyn Operations>,
    pub staging: Staging,
    /// Why no collective may run any more (a failed one, or a library unfit for threads).
    pub unusable: Option<String>,
    /// This process initialised MPI, and nothing has made `MPI_Finalize` unsafe since.
    finalize_at_exit: bool,
    /// Which node each rank runs on, found once (`super::local_rank`).
    pub local_rank: Option<usize>,
}

/// This process's MPI: the library, initialised once, and its rank in `MPI_COMM_WORLD`.
pub(super) struct World {
    pub library: String,
    pub rank: usize,
    pub size: usize,
    state: Mutex<State>,
}

static WORLD: OnceLock<Result<World>> = OnceLock::new();

impl World {
    /// The process's MPI, loaded and initialised by the first call. MPI can be initialised
    /// once per process, so the outcome, success or not, is kept.
    pub fn get(explicit: Option<String>, prefer_mpich: bool) -> Result<&'static World> {
        WORLD.get_or_init(|| World::start(explicit, prefer_mpich)).as_ref().map_err(Clone::clone)
    }

    fn start(explicit: Option<String>, prefer_mpich: bool) -> Result<World> {
        let names = candidates(explicit.clone(), prefer_mpich);
        let (library, name) = open(&names, explicit.is_some())?;
        let mut operations = recognise(library, &name)?;
        let failed = |e: MpiError| Error::new(ErrorCode::Distributed, format!("{name}: {} failed with MPI error {}", e.function, e.code));
        let (initialised_here, provided) = operations.initialise().map_err(failed)?;
        if initialised_here {
            // SAFETY: registers a function that takes no arguments, locks a static and
            // calls MPI_Finalize; it runs at exit() (Node's process.exit and normal end, a
            // Rust main's return) before libraries are unloaded.
            if unsafe { libc::atexit(finalize_at_exit) } != 0 {
                return Err(Error::new(ErrorCode::Distributed, "could not register MPI_Finalize to run at exit"));
            }
        }
        let (rank, size) = operations.rank_and_size().map_err(failed)?;
        let unusable = (provided < THREAD_SERIALIZED).then(|| {
            format!(
                "{name} ({}) provides only {}, and vit-mae calls MPI from its training thread: it needs MPI_THREAD_SERIALIZED or \
                 MPI_THREAD_MULTIPLE (an MPI library built with thread support)",
                operations.abi(),
                THREAD_LEVELS.get(provided as usize).unwrap_or(&"an unknown thread level")
            )
        });
        let state = State { operations, staging: Staging::default(), unusable, finalize_at_exit: initialised_here, local_rank: None };
        Ok(World { library: name, rank, size, state: Mutex::new(state) })
    }

    /// The state, locked. A panic while it was held left no MPI call half made (each
    /// returns before the lock is released), so a poisoned lock is still usable.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// After a failed operation: MPI may still read or write the staging memory (a late
    /// peer, an RDMA transfer already set up), so it is never freed or reused; and
    /// `MPI_Finalize` could wait forever for ranks that are gone, so it is not called.
    pub fn break_down(&mut self, why: String) {
        std::mem::forget(std::mem::take(&mut self.staging));
        self.unusable = Some(why);
        self.finalize_at_exit = false;
    }
}

/// Runs at exit when this process initialised MPI: Open MPI's mpirun reports a rank that
/// exits without `MPI_Finalize` as failed. Skipped when a collective failed (the peers may
/// be gone, and MPI_Finalize synchronises with them) or when another thread is in a
/// collective at exit (MPI forbids finalizing then).
extern "C" fn finalize_at_exit() {
    let Some(Ok(world)) = WORLD.get() else { return };
    let mut state = match world.state.try_lock() {
        Ok(state) => state,
        Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    if std::mem::take(&mut state.finalize_at_exit) {
        state.unusable = Some("MPI was finalized as the process exits".to_string());
        // An error here cannot be reported: the process is exiting.
        let _ = state.operations.finalize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_mpi_is_tried_first_unless_the_launcher_is_mpich_s() {
        assert_eq!(candidates(None, false), ["libmpi.so.40", "libmpi.so.12", "libmpich.so.12", "libmpi.so"]);
        assert_eq!(candidates(None, true), ["libmpi.so.12", "libmpich.so.12", "libmpi.so.40", "libmpi.so"]);
        assert_eq!(candidates(Some("/opt/mpi/lib/libmpi.so".into()), true), ["/opt/mpi/lib/libmpi.so"]);
    }

    #[test]
    fn no_library_found_names_every_one_tried_and_where_to_get_one() {
        let names = ["libvit-mae-absent-mpi.so.40".to_string(), "libvit-mae-absent-mpich.so.12".to_string()];
        let e = open(&names, false).expect_err("no such library");
        assert_eq!(e.code, ErrorCode::Distributed);
        assert!(
            e.message.starts_with(
                "distributed training needs an MPI library, and none of libvit-mae-absent-mpi.so.40, libvit-mae-absent-mpich.so.12 could be loaded \
                 (libvit-mae-absent-mpi.so.40: cannot open shared object file: No such file or directory; libvit-mae-absent-mpich.so.12: cannot open"
            ),
            "{}",
            e.message
        );
        assert!(e.message.ends_with(INSTALL_HINT), "{}", e.message);
    }
}
