//! The f32 GEMM behind the engine. Products go to OpenBLAS's sgemm
//! when the build found a static OpenBLAS to link (see `build.rs`): on this model's
//! shapes it is 5-35% faster than the gemm crate, and a training step 7% (`tiny`) to
//! 15% (`base`) faster. OpenBLAS runs on one thread per call; a large product is split
//! into row blocks over rayon's threads, so no second thread pool competes with rayon's
//! for the cores. The engine's attention runs its small per-(image, head) products
//! through OpenBLAS on the calling thread too: unlike the gemm crate, which allocates a
//! flag vector per product, it leaves a step free of allocations.
//!
//! The gemm crate does the rest: strides BLAS cannot take, and builds without OpenBLAS.

#[cfg(openblas)]
use crate::engine::rows::SharedMut;
#[cfg(openblas)]
use rayon::prelude::*;

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

/// Which library the products run on: `"openblas"` or `"gemm"` (the gemm crate, in a
/// build without OpenBLAS).
pub fn gemm_library() -> &'static str {
    if cfg!(openblas) { "openblas" } else { "gemm" }
}

/// `dst (m x n, row stride dst_rs, unit column stride) = scale * lhs (m x k) rhs (k x n)`,
/// or `dst += ...` when `accumulate`. Strides are in elements; without `accumulate`
/// `dst` is overwritten, never read.
///
/// # Safety
/// Every pointer must be valid for the extents its strides and sizes reach, and `dst`
/// must not overlap the operands.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
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
    #[cfg(openblas)]
    if let (Threads::Serial, Some(plan)) = (threads, openblas::Plan::new(m, n, k, lhs_rs, lhs_cs, rhs_rs, rhs_cs, dst_rs)) {
        plan.run(m, n, scale, accumulate, lhs, rhs, dst);
        return;
    }
    #[cfg(openblas)]
    if let (Threads::All, Some(plan)) = (threads, openblas::Plan::new(m, n, k, lhs_rs, lhs_cs, rhs_rs, rhs_cs, dst_rs)) {
        // Row blocks; for a short product (a weight gradient with few output features),
        // column blocks instead, as each block packs the other operand whole.
        let threads = rayon::current_num_threads();
        let row_parts = threads.min(m / openblas::MIN_ROWS_PER_PART).max(1);
        let col_parts = threads.min(n / openblas::MIN_ROWS_PER_PART).max(1);
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
        return;
    }
    // The gemm crate, which takes any strides.
    let parallelism = match (threads, rayon::current_num_threads()) {
        (Threads::Serial, _) | (_, 1) => gemm::Parallelism::None,
        (Threads::All, n) => gemm::Parallelism::Rayon(n),
    };
    gemm::gemm(m, n, k, dst, 1, dst_rs as isize, accumulate, lhs, lhs_cs as isize, lhs_rs as isize, rhs, rhs_cs as isize, rhs_rs as isize, if accumulate { 1.0 } else { 0.0 }, scale, false, false, false, parallelism);
}

#[cfg(openblas)]
mod openblas {
    use std::ffi::c_int;

    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;
    /// Row blocks are at least this tall, so that each block's own packing of the
    /// right-hand side stays small beside its product.
    pub const MIN_ROWS_PER_PART: usize = 64;

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

    /// One product as `cblas_sgemm` takes it (row-major, each operand transposed or
    /// not, leading dimensions); the row and column counts are given per call.
    #[derive(Clone, Copy)]
    pub struct Plan {
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

    impl Plan {
        #[allow(clippy::too_many_arguments)]
        pub fn new(m: usize, n: usize, k: usize, lhs_rs: usize, lhs_cs: usize, rhs_rs: usize, rhs_cs: usize, dst_rs: usize) -> Option<Plan> {
            let (trans_a, lda) = operand(m, k, lhs_rs, lhs_cs)?;
            let (trans_b, ldb) = operand(k, n, rhs_rs, rhs_cs)?;
            c_int::try_from(m).ok()?;
            (dst_rs >= n.max(1)).then_some(())?;
            c_int::try_from(n).ok()?;
            Some(Plan { k: k.try_into().ok()?, trans_a, lda, trans_b, ldb, ldc: dst_rs.try_into().ok()? })
        }

        /// # Safety
        /// As [`super::sgemm`], for `m` rows and `n` columns (at most the planned counts).
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn run(&self, m: usize, n: usize, scale: f32, accumulate: bool, lhs: *const f32, rhs: *const f32, dst: *mut f32) {
            static SINGLE_THREADED: std::sync::Once = std::sync::Once::new();
            // SAFETY: sets OpenBLAS's thread count; its own pool stays idle from then on.
            SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
            if m == 0 || n == 0 {
                return;
            }
            cblas_sgemm(ROW_MAJOR, self.trans_a, self.trans_b, m as c_int, n as c_int, self.k, scale, lhs, self.lda, rhs, self.ldb, if accumulate { 1.0 } else { 0.0 }, dst, self.ldc);
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
            for threads in [Threads::All, Threads::Serial] {
                for (a, a_rs, a_cs) in [(&lhs, k, 1), (&lhs_t, 1, m)] {
                    for (b, b_rs, b_cs) in [(&rhs, n, 1), (&rhs_t, 1, k)] {
                        for accumulate in [false, true] {
                            // Overwriting must not read the output: it starts as NaN.
                            let mut got = if accumulate { start.clone() } else { vec![f32::NAN; m * n] };
                            // SAFETY: the strides describe the buffers above.
                            unsafe { sgemm(threads, m, n, k, got.as_mut_ptr(), n, a.as_ptr(), a_rs, a_cs, b.as_ptr(), b_rs, b_cs, 0.5, accumulate) };
                            for ((g, p), s) in got.iter().zip(&product).zip(&start) {
                                let w = if accumulate { p + s } else { *p };
                                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{m}x{n}x{k} {threads:?} accumulate {accumulate} strides ({a_rs},{a_cs}) ({b_rs},{b_cs}): {g} vs {w}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn products_run_concurrently_from_many_threads() {
        use rayon::prelude::*;
        let (m, n, k) = (200, 40, 33);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 - 6.0).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 - 3.0).collect();
        let want = naive(m, n, k, &lhs, k, 1, &rhs, n, 1, 1.0);
        (0..64).into_par_iter().for_each(|_| {
            let mut got = vec![0f32; m * n];
            // SAFETY: contiguous row-major operands.
            unsafe { sgemm(Threads::All, m, n, k, got.as_mut_ptr(), n, lhs.as_ptr(), k, 1, rhs.as_ptr(), n, 1, 1.0, false) };
            assert_eq!(got, want);
        });
    }
}
