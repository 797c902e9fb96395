//! The f32 GEMM behind the engine. Products go to a BLAS sgemm when the build linked one
//! (see `build.rs`), chosen once at run time ([`gemm_library`]):
//! - Intel oneMKL on Intel CPUs: the GEMM PyTorch runs on there. On a Sapphire Rapids
//!   Xeon the bench measured 246 GFLOP/s for PyTorch's MKL at 1024^3 against 144 for
//!   Debian's OpenBLAS 0.3.21. This workplace's machines set `OPENBLAS_CORETYPE=Haswell`,
//!   which holds OpenBLAS to its AVX2 kernels; if that one did too, OpenBLAS's own
//!   AVX-512 choice on that Xeon is unmeasured.
//! - OpenBLAS elsewhere. On an AMD EPYC (Zen 5, bench/RESULTS.md, 2026-12-03) it beats
//!   MKL on every shape of the bench's `gemm` row: with its own kernel choice
//!   (Cooperlake, AVX-512) it runs a linear layer's products at 1.9-2.1x PyTorch's MKL,
//!   and held to its AVX2 kernels at 1.2x, where our own MKL runs at 0.84-1.09x.
//!
//! `VIT_MAE_GEMM=mkl|openblas|gemm` overrides the choice. A BLAS runs on one thread
//! per call; a large product is split into row blocks over rayon's threads, so no second
//! thread pool competes with rayon's for the cores. The engine's attention runs its small
//! per-(image, head) products through BLAS on the calling thread too: unlike the gemm
//! crate, which allocates a flag vector per product, it leaves a step free of allocations.
//!
//! The gemm crate does the rest: strides BLAS cannot take, and builds without a BLAS.

use crate::engine::rows::SharedMut;
use rayon::prelude::*;
use std::sync::OnceLock;

/// How many threads one product may use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Threads {
    /// Every rayon thread: one large product.
    All,
    /// The calling thread, on BLAS where linked: one row block of a product that the
    /// caller splits over rayon's threads itself (the engine's linear layers), or one
    /// of many small products run in parallel (the engine's attention).
    Serial,
}

/// A library that products can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Library {
    Mkl,
    OpenBlas,
    /// The gemm crate, in every build.
    GemmCrate,
}

impl Library {
    /// The libraries this build linked, the gemm crate last.
    pub(crate) const LINKED: &'static [Library] = &[
        #[cfg(mkl)]
        Library::Mkl,
        #[cfg(openblas)]
        Library::OpenBlas,
        Library::GemmCrate,
    ];

    fn name(self) -> &'static str {
        match self {
            Library::Mkl => "mkl",
            Library::OpenBlas => "openblas",
            Library::GemmCrate => "gemm",
        }
    }

    /// The linked library `VIT_MAE_GEMM` calls `name`.
    fn named(name: &std::ffi::OsStr) -> Option<Library> {
        Library::LINKED.iter().copied().find(|l| name == l.name())
    }

    /// The `requested` library (`VIT_MAE_GEMM`) if this build linked it; else MKL on
    /// Intel CPUs and OpenBLAS elsewhere, where linked.
    fn choose(requested: Option<&std::ffi::OsStr>, intel: bool) -> Library {
        if let Some(name) = requested {
            match Library::named(name) {
                Some(library) => return library,
                None => eprintln!(
                    "vit-mae: VIT_MAE_GEMM={name:?} is not one of this build's GEMM libraries ({}); choosing one for this CPU",
                    gemm_libraries().join(", ")
                ),
            }
        }
        let preferred: &[Library] = if intel { &[Library::Mkl, Library::OpenBlas] } else { &[Library::OpenBlas, Library::Mkl] };
        preferred.iter().copied().find(|l| Library::LINKED.contains(l)).unwrap_or(Library::GemmCrate)
    }

    /// The library every product of this process runs on.
    pub(crate) fn chosen() -> Library {
        static CHOSEN: OnceLock<Library> = OnceLock::new();
        *CHOSEN.get_or_init(|| Library::choose(std::env::var_os("VIT_MAE_GEMM").as_deref(), intel_cpu()))
    }
}

fn intel_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: every x86-64 CPU has CPUID, and leaf 0 (the vendor string) always exists.
        // (Newer Rust declares `__cpuid` safe; the block keeps older ones building.)
        #[allow(unused_unsafe)]
        let leaf = unsafe { std::arch::x86_64::__cpuid(0) };
        [leaf.ebx, leaf.edx, leaf.ecx].map(u32::to_le_bytes).concat() == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Which library the products run on: `"mkl"`, `"openblas"` or `"gemm"` (the gemm crate).
pub fn gemm_library() -> &'static str {
    Library::chosen().name()
}

/// The kernels OpenBLAS chose for this CPU (or that `OPENBLAS_CORETYPE` forced), as it
/// names them, in a build that linked it.
pub fn openblas_core() -> Option<String> {
    blas::openblas_core()
}

/// The libraries this build can run products on, as `VIT_MAE_GEMM` names them.
pub fn gemm_libraries() -> Vec<&'static str> {
    Library::LINKED.iter().map(|l| l.name()).collect()
}

/// One training step's three products of a linear layer from `inputs` to `outputs`
/// features over `rows` rows, laid out as the engine's: `y = x w^T`, `dx = y w` (`y`
/// standing in for the output's gradient) and `dw += y^T x`, on `library` over every
/// rayon thread. For the benchmark of the GEMM libraries (bench/bench.rs), which times
/// it on the model's shapes; the buffers are the caller's, so repeated calls allocate
/// nothing.
#[allow(clippy::too_many_arguments)]
pub fn linear_products(library: &str, rows: usize, inputs: usize, outputs: usize, x: &[f32], w: &[f32], y: &mut [f32], dx: &mut [f32], dw: &mut [f32]) -> crate::Result<()> {
    use crate::{Error, ErrorCode};
    let Some(library) = Library::named(library.as_ref()) else {
        return Err(Error::new(ErrorCode::InvalidArgument, format!("GEMM library {library:?} is not one of this build's ({})", gemm_libraries().join(", "))));
    };
    let lengths = [(x.len(), rows * inputs, "x"), (w.len(), outputs * inputs, "w"), (y.len(), rows * outputs, "y"), (dx.len(), rows * inputs, "dx"), (dw.len(), outputs * inputs, "dw")];
    if let Some((got, want, name)) = lengths.into_iter().find(|(got, want, _)| got != want) {
        return Err(Error::new(ErrorCode::InvalidShape, format!("{name} has {got} elements, a {rows} x {inputs} -> {outputs} layer needs {want}")));
    }
    // SAFETY: every operand is contiguous with the extents checked above, and each output
    // is a `&mut` that no operand can alias.
    unsafe {
        sgemm(library, Threads::All, rows, outputs, inputs, y.as_mut_ptr(), outputs, x.as_ptr(), inputs, 1, w.as_ptr(), 1, inputs, 1.0, false);
        sgemm(library, Threads::All, rows, inputs, outputs, dx.as_mut_ptr(), inputs, y.as_ptr(), outputs, 1, w.as_ptr(), inputs, 1, 1.0, false);
        sgemm(library, Threads::All, outputs, inputs, rows, dw.as_mut_ptr(), inputs, y.as_ptr(), 1, outputs, x.as_ptr(), inputs, 1, 1.0, true);
    }
    Ok(())
}

/// `dst (m x n, row stride dst_rs, unit column stride) = scale * lhs (m x k) rhs (k x n)`
/// on `library` (the engine passes [`Library::chosen`]), or `dst += ...` when
/// `accumulate`. Strides are in elements; without `accumulate` `dst` is overwritten,
/// never read.
///
/// # Safety
/// Every pointer must be valid for the extents its strides and sizes reach, and `dst`
/// must not overlap the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    library: Library,
    threads: Threads,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
    scale: f32,
    accumulate: bool,
) {
    match (threads, blas::Plan::new(library, m, n, k, lhs_rs, lhs_cs, rhs_rs, rhs_cs, dst_rs)) {
        (Threads::Serial, Some(plan)) => plan.run(m, n, scale, accumulate, lhs, rhs, dst),
        (Threads::All, Some(plan)) => {
            // Row blocks; for a short product (a weight gradient with few output features),
            // column blocks instead, as each block packs the other operand whole.
            let threads = rayon::current_num_threads();
            let row_parts = threads.min(m / blas::MIN_ROWS_PER_PART).max(1);
            let col_parts = threads.min(n / blas::MIN_ROWS_PER_PART).max(1);
            let (lhs, rhs, dst) = (SharedMut(lhs as *mut f32), SharedMut(rhs as *mut f32), SharedMut(dst));
            // Blocks as a parallel iterator, not spawned jobs: rayon boxes every spawn, and a
            // training step must not allocate.
            if row_parts > 1 {
                let rows = m.div_ceil(row_parts);
                (0..m.div_ceil(rows)).into_par_iter().for_each(|block| {
                    let (lhs, rhs, dst, start) = (lhs, rhs, dst, block * rows);
                    // SAFETY: row block `start..` of lhs and dst; the blocks are disjoint.
                    unsafe { plan.run(rows.min(m - start), n, scale, accumulate, lhs.0.add(start * lhs_rs), rhs.0, dst.0.add(start * dst_rs)) };
                });
            } else if col_parts > 1 {
                let cols = n.div_ceil(col_parts);
                (0..n.div_ceil(cols)).into_par_iter().for_each(|block| {
                    let (lhs, rhs, dst, start) = (lhs, rhs, dst, block * cols);
                    // SAFETY: column block `start..` of rhs and dst; the blocks are disjoint.
                    unsafe { plan.run(m, cols.min(n - start), scale, accumulate, lhs.0, rhs.0.add(start * rhs_cs), dst.0.add(start)) };
                });
            } else {
                plan.run(m, n, scale, accumulate, lhs.0, rhs.0, dst.0);
            }
        }
        // The gemm crate, which takes any strides.
        (_, None) => {
            let parallelism = match (threads, rayon::current_num_threads()) {
                (Threads::Serial, _) | (_, 1) => gemm::Parallelism::None,
                (Threads::All, n) => gemm::Parallelism::Rayon(n),
            };
            gemm::gemm(m, n, k, dst, 1, dst_rs as isize, accumulate, lhs, lhs_cs as isize, lhs_rs as isize, rhs, rhs_cs as isize, rhs_rs as isize, if accumulate { 1.0 } else { 0.0 }, scale, false, false, false, parallelism);
        }
    }
}

/// The BLAS libraries' sgemm, as `cblas_sgemm` (OpenBLAS) and Fortran `sgemm` (MKL).
mod blas {
    use super::Library;
    use std::ffi::{c_char, c_int};

    #[cfg(openblas)]
    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;
    /// Row blocks are at least this tall, so that each block's own packing of the
    /// right-hand side stays small beside its product.
    pub const MIN_ROWS_PER_PART: usize = 64;

    #[cfg(openblas)]
    extern "C" {
        fn cblas_sgemm(
            order: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        fn openblas_set_num_threads(num_threads: c_int);
    }

    #[cfg(mkl)]
    extern "C" {
        /// Column-major, every argument by reference (MKL's Fortran interface, which
        /// OpenBLAS, exporting only `sgemm_`, does not define).
        fn sgemm(
            trans_a: *const c_char,
            trans_b: *const c_char,
            m: *const c_int,
            n: *const c_int,
            k: *const c_int,
            alpha: *const f32,
            a: *const f32,
            lda: *const c_int,
            b: *const f32,
            ldb: *const c_int,
            beta: *const f32,
            c: *mut f32,
            ldc: *const c_int,
        );
        #[link_name = "MKL_CBWR_Set"]
        fn mkl_cbwr_set(settings: c_int) -> c_int;
    }

    /// One product as BLAS takes it (row-major, each operand transposed or not, leading
    /// dimensions); the row and column counts are given per call.
    #[derive(Clone, Copy)]
    pub struct Plan {
        library: Library,
        k: c_int,
        trans_a: c_int,
        lda: c_int,
        trans_b: c_int,
        ldb: c_int,
        ldc: c_int,
    }

    /// How BLAS reads a `rows x cols` operand with these strides: `None` when neither
    /// stride is 1 (the gemm crate takes those) or a size does not fit its integers.
    fn operand(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<(c_int, c_int)> {
        let (trans, ld, min_ld) = if cs == 1 { (NO_TRANS, rs, cols) } else if rs == 1 { (TRANS, cs, rows) } else { return None };
        (ld >= min_ld.max(1)).then_some(())?;
        Some((trans, c_int::try_from(ld).ok()?))
    }

    pub fn openblas_core() -> Option<String> {
        #[cfg(openblas)]
        {
            extern "C" {
                fn openblas_get_corename() -> *const c_char;
            }
            // SAFETY: OpenBLAS returns a static NUL-terminated name (or null).
            let name = unsafe { openblas_get_corename() };
            // SAFETY: checked non-null; the name lives as long as the library.
            return (!name.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned());
        }
        #[cfg(not(openblas))]
        None
    }

    /// Sets a library up once per process before its first product.
    fn prepare(library: Library) {
        match library {
            #[cfg(openblas)]
            Library::OpenBlas => {
                static OPENBLAS: std::sync::Once = std::sync::Once::new();
                // SAFETY: sets OpenBLAS's thread count; its own pool stays idle from then on.
                OPENBLAS.call_once(|| unsafe { openblas_set_num_threads(1) })
            }
            // Strict conditional numerical reproducibility: bit-identical products
            // whatever the operands' alignment, which bit-exact resume needs (MKL_CBWR_AUTO
            // | MKL_CBWR_STRICT of mkl_types.h).
            #[cfg(mkl)]
            Library::Mkl => {
                static MKL: std::sync::Once = std::sync::Once::new();
                MKL.call_once(|| {
                    // SAFETY: MKL's documented service call, made before any of its products.
                    let status = unsafe { mkl_cbwr_set(2 | 0x10000) };
                    if status != 0 {
                        eprintln!("vit-mae: MKL refused strict reproducibility (status {status}); products may differ with alignment");
                    }
                })
            }
            _ => {}
        }
    }

    impl Plan {
        /// `None` for the gemm crate or a library this build did not link, or when BLAS
        /// cannot take these strides or sizes.
        #[allow(clippy::too_many_arguments)]
        pub fn new(library: Library, m: usize, n: usize, k: usize, lhs_rs: usize, lhs_cs: usize, rhs_rs: usize, rhs_cs: usize, dst_rs: usize) -> Option<Plan> {
            (library != Library::GemmCrate && Library::LINKED.contains(&library)).then_some(())?;
            let (trans_a, lda) = operand(m, k, lhs_rs, lhs_cs)?;
            let (trans_b, ldb) = operand(k, n, rhs_rs, rhs_cs)?;
            c_int::try_from(m).ok()?;
            (dst_rs >= n.max(1)).then_some(())?;
            c_int::try_from(n).ok()?;
            prepare(library);
            Some(Plan { library, k: k.try_into().ok()?, trans_a, lda, trans_b, ldb, ldc: dst_rs.try_into().ok()? })
        }

        /// # Safety
        /// As [`super::sgemm`], for `m` rows and `n` columns (at most the planned counts).
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn run(&self, m: usize, n: usize, scale: f32, accumulate: bool, lhs: *const f32, rhs: *const f32, dst: *mut f32) {
            if m == 0 || n == 0 {
                return;
            }
            let (m, n, beta) = (m as c_int, n as c_int, if accumulate { 1.0f32 } else { 0.0 });
            match self.library {
                #[cfg(openblas)]
                Library::OpenBlas => cblas_sgemm(ROW_MAJOR, self.trans_a, self.trans_b, m, n, self.k, scale, lhs, self.lda, rhs, self.ldb, beta, dst, self.ldc),
                // Row-major dst = lhs rhs is column-major dst^T = rhs^T lhs^T: the same
                // buffers with the operands swapped.
                #[cfg(mkl)]
                Library::Mkl => {
                    let trans = |t: c_int| if t == TRANS { b"T".as_ptr() } else { b"N".as_ptr() } as *const c_char;
                    sgemm(trans(self.trans_b), trans(self.trans_a), &n, &m, &self.k, &scale, rhs, &self.ldb, lhs, &self.lda, &beta, dst, &self.ldc);
                }
                _ => unreachable!("Plan::new makes no plan for {:?}", self.library),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dst = scale * lhs rhs` by definition, in f64.
    #[allow(clippy::too_many_arguments)]
    fn naive(m: usize, n: usize, k: usize, lhs: &[f32], lhs_rs: usize, lhs_cs: usize, rhs: &[f32], rhs_rs: usize, rhs_cs: usize, scale: f32) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k).map(|p| lhs[i * lhs_rs + p * lhs_cs] as f64 * rhs[p * rhs_rs + j * rhs_cs] as f64).sum();
                out[i * n + j] = (sum * scale as f64) as f32;
            }
        }
        out
    }

    #[test]
    fn every_layout_and_split_matches_the_definition() {
        let values = |len: usize, seed: usize| (0..len).map(|i| (((i + seed) * 7919) % 199) as f32 / 50.0 - 2.0).collect::<Vec<f32>>();
        // (m, n, k): one row, a split into row blocks, into column blocks, an empty inner dimension.
        for &(m, n, k) in &[(1, 5, 3), (300, 37, 19), (40, 301, 19), (130, 64, 0), (7, 1, 9)] {
            let (lhs, rhs) = (values(m * k, 1), values(k * n, 2));
            // row-major and transposed views of each operand
            let lhs_t: Vec<f32> = (0..k * m).map(|i| lhs[(i % m) * k + i / m]).collect();
            let rhs_t: Vec<f32> = (0..n * k).map(|i| rhs[(i % k) * n + i / k]).collect();
            let product = naive(m, n, k, &lhs, k, 1, &rhs, n, 1, 0.5);
            let start = values(m * n, 3);
            for (&library, threads) in Library::LINKED.iter().flat_map(|l| [(l, Threads::All), (l, Threads::Serial)]) {
                for (a, a_rs, a_cs) in [(&lhs, k, 1), (&lhs_t, 1, m)] {
                    for (b, b_rs, b_cs) in [(&rhs, n, 1), (&rhs_t, 1, k)] {
                        for accumulate in [false, true] {
                            // Overwriting must not read the output: it starts as NaN.
                            let mut got = if accumulate { start.clone() } else { vec![f32::NAN; m * n] };
                            // SAFETY: the strides describe the buffers above.
                            unsafe { sgemm(library, threads, m, n, k, got.as_mut_ptr(), n, a.as_ptr(), a_rs, a_cs, b.as_ptr(), b_rs, b_cs, 0.5, accumulate) };
                            for ((g, p), s) in got.iter().zip(&product).zip(&start) {
                                let w = if accumulate { p + s } else { *p };
                                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{m}x{n}x{k} {library:?} {threads:?} accumulate {accumulate} strides ({a_rs},{a_cs}) ({b_rs},{b_cs}): {g} vs {w}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_cpu_vendor_and_the_override_choose_the_library() {
        use std::ffi::OsStr;
        let linked = |l: Library| Library::LINKED.contains(&l);
        let blas_for = |first: Library, second: Library| if linked(first) { first } else if linked(second) { second } else { Library::GemmCrate };
        assert_eq!(Library::choose(None, true), blas_for(Library::Mkl, Library::OpenBlas));
        assert_eq!(Library::choose(None, false), blas_for(Library::OpenBlas, Library::Mkl));
        for &library in Library::LINKED {
            for intel in [false, true] {
                assert_eq!(Library::choose(Some(OsStr::new(library.name())), intel), library);
            }
        }
        // An unknown name falls back to the CPU's choice (with a warning).
        assert_eq!(Library::choose(Some(OsStr::new("cublas")), false), Library::choose(None, false));
        assert!(gemm_libraries().contains(&gemm_library()));
    }

    #[test]
    fn linear_products_are_the_layers_three_products_and_check_their_buffers() {
        let (rows, inputs, outputs) = (70, 5, 3);
        let x: Vec<f32> = (0..rows * inputs).map(|i| (i % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..outputs * inputs).map(|i| (i % 5) as f32 - 2.0).collect();
        let y_want = naive(rows, outputs, inputs, &x, inputs, 1, &w, 1, inputs, 1.0);
        let dx_want = naive(rows, inputs, outputs, &y_want, outputs, 1, &w, inputs, 1, 1.0);
        let dw_want = naive(outputs, inputs, rows, &y_want, 1, outputs, &x, inputs, 1, 1.0);
        for library in gemm_libraries() {
            let (mut y, mut dx, mut dw) = (vec![0f32; rows * outputs], vec![0f32; rows * inputs], vec![0f32; outputs * inputs]);
            linear_products(library, rows, inputs, outputs, &x, &w, &mut y, &mut dx, &mut dw).unwrap();
            assert_eq!((&y, &dx, &dw), (&y_want, &dx_want, &dw_want), "{library}");
            let error = linear_products(library, rows, inputs, outputs, &x, &w, &mut y, &mut dx, &mut dw[1..]).unwrap_err();
            assert!(error.to_string().contains("dw has 14 elements") && error.to_string().contains("needs 15"), "{error}");
        }
        let error = linear_products("cublas", rows, inputs, outputs, &x, &w, &mut vec![0.0; rows * outputs], &mut vec![0.0; rows * inputs], &mut vec![0.0; outputs * inputs]).unwrap_err();
        assert!(error.to_string().contains("\"cublas\" is not one of this build's"), "{error}");
    }

    #[test]
    fn products_run_concurrently_from_many_threads() {
        use rayon::prelude::*;
        let (m, n, k) = (200, 40, 33);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 - 3.0).collect();
        let want = naive(m, n, k, &lhs, k, 1, &rhs, n, 1, 1.0);
        for &library in Library::LINKED {
            (0..64).into_par_iter().for_each(|_| {
                let mut got = vec![0f32; m * n];
                // SAFETY: contiguous row-major operands.
                unsafe { sgemm(library, Threads::All, m, n, k, got.as_mut_ptr(), n, lhs.as_ptr(), k, 1, rhs.as_ptr(), n, 1, 1.0, false) };
                assert_eq!(got, want, "{library:?}");
            });
        }
    }
}
