//! The CPU implementation of the engine's kernels: the plan's buffers as three `Vec<f32>`,
//! GEMMs through `sgemm` (OpenBLAS when linked), everything else as row kernels over
//! rayon's threads. Every reduction is split the same way whatever the scheduling, so a
//! step gives the same bits every time (resumed runs continue exactly).

use super::rows::*;
use super::{check_disjoint, AdamWRange, AdamWStep, Arena, Epilogue, Grid, Kernels, LarsRange, MseShape, MseTarget, Slot, Source};
use crate::sgemm::{sgemm, Library, Threads};
use rayon::prelude::*;

/// A slot that stands for an absent tensor: empty, so it overlaps nothing.
pub(crate) const NONE: Slot = Slot { arena: Arena::Acts, offset: 0, len: 0 };

/// Rows per task of a linear layer's row blocks: each block packs the weight itself, so
/// blocks are kept tall.
const MIN_BLOCK_ROWS: usize = 64;

/// Values per task of elementwise passes and reductions.
const CHUNK: usize = 1 << 14;

pub struct CpuKernels {
    params: Vec<f32>,
    grads: Vec<f32>,
    acts: Vec<f32>,
    /// Per-thread scratch of the attention backward (`tokens^2` each), grown on first use.
    attention_scratch: Vec<f32>,
    /// Per-chunk partial sums of reductions, grown on first use.
    partials: Vec<f64>,
}

impl CpuKernels {
    /// Zeroed buffers of the given lengths (gradients have the parameters' length).
    pub fn new(params: usize, acts: usize) -> Self {
        CpuKernels { params: vec![0.0; params], grads: vec![0.0; params], acts: vec![0.0; acts], attention_scratch: Vec::new(), partials: Vec::new() }
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    pub fn grads(&self) -> &[f32] {
        &self.grads
    }

    pub fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }

    /// The parameters alone; every other buffer is freed.
    pub fn into_params(self) -> Vec<f32> {
        self.params
    }

    /// Moves `other`'s parameters and gradients into this one (plans of one config).
    pub fn take_weights_from(&mut self, other: &mut CpuKernels) {
        assert_eq!(self.params.len(), other.params.len(), "plans of one config");
        std::mem::swap(&mut self.params, &mut other.params);
        std::mem::swap(&mut self.grads, &mut other.grads);
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        4 * (self.params.len() + self.grads.len() + self.acts.len() + self.attention_scratch.len()) + 8 * self.partials.len()
    }

    fn arena(&self, arena: Arena) -> &[f32] {
        match arena {
            Arena::Params => &self.params,
            Arena::Grads => &self.grads,
            Arena::Acts => &self.acts,
        }
    }

    fn view(&self, s: Slot) -> &[f32] {
        &self.arena(s.arena)[s.offset..s.offset + s.len]
    }

    /// Shared views of `ins` and mutable views of `outs`, all borrowed from `self`.
    /// Panics when a slot lies outside its arena or an output overlaps another slot.
    fn views<const I: usize, const O: usize>(&mut self, ins: [Slot; I], outs: [Slot; O]) -> ([&[f32]; I], [&mut [f32]; O]) {
        check_disjoint(&ins, &outs);
        let lens = [self.params.len(), self.grads.len(), self.acts.len()];
        let index = |a: Arena| match a {
            Arena::Params => 0,
            Arena::Grads => 1,
            Arena::Acts => 2,
        };
        for s in ins.iter().chain(&outs) {
            assert!(s.offset + s.len <= lens[index(s.arena)], "{s:?} lies outside its arena of {}", lens[index(s.arena)]);
        }
        let bases = [self.params.as_mut_ptr(), self.grads.as_mut_ptr(), self.acts.as_mut_ptr()];
        // SAFETY: every slot lies inside its arena (checked above), and `&mut self` is held
        // for the views' lifetime, so nothing else reaches the buffers meanwhile. Outputs
        // overlap neither each other nor any input (check_disjoint), so each mutable view
        // is the only view of its values; inputs may share values, being read only.
        let ins = ins.map(|s| unsafe { std::slice::from_raw_parts(bases[index(s.arena)].add(s.offset) as *const f32, s.len) });
        // SAFETY: as above.
        let outs = outs.map(|s| unsafe { std::slice::from_raw_parts_mut(bases[index(s.arena)].add(s.offset), s.len) });
        (ins, outs)
    }
}

/// Splits `rows` into blocks for rayon's threads: `(rows per block, blocks)`.
fn row_blocks(rows: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads();
    let blocks = (rows / MIN_BLOCK_ROWS).clamp(1, 2 * threads);
    let per = rows.div_ceil(blocks).max(1);
    (per, rows.div_ceil(per))
}

/// Adds the column sums of `g` (`rows x d`) into `acc`, each task owning a range of
/// columns, so no partial sums are needed and the order is fixed.
fn add_column_sums(g: &[f32], d: usize, acc: &mut [f32]) {
    let cols = (CHUNK / (g.len() / d.max(1)).max(1)).clamp(16, d.max(16));
    acc.par_chunks_mut(cols).enumerate().for_each(|(c, acc)| {
        let start = c * cols;
        for row in g.chunks(d) {
            let width = acc.len();
            acc.iter_mut().zip(&row[start..start + width]).for_each(|(a, v)| *a += v);
        }
    });
}

impl Kernels for CpuKernels {
    fn upload(&mut self, dst: Slot, values: &[f32]) {
        let ([], [out]) = self.views([], [dst]);
        out.copy_from_slice(values);
    }

    fn download(&self, src: Slot) -> Vec<f32> {
        self.view(src).to_vec()
    }

    fn fill(&mut self, dst: Slot, value: f32) {
        let ([], [out]) = self.views([], [dst]);
        out.par_chunks_mut(CHUNK).for_each(|c| c.fill(value));
    }

    fn linear(&mut self, x: Slot, w: Slot, b: Slot, residual: Option<Slot>, y: Slot, rows: usize, k: usize, n: usize, epilogue: Epilogue) {
        let gelu = match epilogue {
            Epilogue::None => NONE,
            Epilogue::Gelu { y } => y,
        };
        let ([x, w, b, res], [y, gelu_out]) = self.views([x, w, b, residual.unwrap_or(NONE)], [y, gelu]);
        assert!(x.len() == rows * k && w.len() == n * k && b.len() == n && y.len() == rows * n);
        assert!(gelu_out.is_empty() || gelu_out.len() == y.len());
        let (per, _) = row_blocks(rows);
        let gelu_out = SharedMut(if gelu_out.is_empty() { std::ptr::null_mut() } else { gelu_out.as_mut_ptr() });
        y.par_chunks_mut(per * n).enumerate().for_each(|(i, yb)| {
            let gelu_out = gelu_out;
            let start = i * per;
            let block_rows = yb.len() / n;
            // Bias (plus the residual) first; the product is added onto it.
            for (r, yr) in yb.chunks_mut(n).enumerate() {
                if res.is_empty() {
                    yr.copy_from_slice(b);
                } else {
                    let rr = &res[(start + r) * n..][..n];
                    yr.iter_mut().zip(rr).zip(b).for_each(|((y, &r), &b)| *y = r + b);
                }
            }
            // SAFETY: x's rows start..start+block_rows (k wide), w (n x k, read as its
            // transpose) and this block of y (block_rows x n) are valid and contiguous, and
            // y overlaps neither (checked by `views`).
            unsafe { sgemm(Library::chosen(), Threads::Serial, block_rows, n, k, yb.as_mut_ptr(), n, x[start * k..].as_ptr(), k, 1, w.as_ptr(), 1, k, 1.0, true) };
            if !gelu_out.0.is_null() {
                // SAFETY: the same block of the GELU output, which has y's length; blocks
                // are disjoint and the output overlaps no input (checked by `views`).
                let g = unsafe { std::slice::from_raw_parts_mut(gelu_out.0.add(start * n), yb.len()) };
                gelu_rows(yb, g);
            }
        });
    }

    fn linear_backward(&mut self, dy: Slot, x: Slot, w: Slot, dx: Option<Slot>, accumulate_dx: bool, dw_db: Option<(Slot, Slot)>, rows: usize, k: usize, n: usize) {
        let (dw, db) = dw_db.unwrap_or((NONE, NONE));
        let ([dy, x, w], [dx, dw, db]) = self.views([dy, x, w], [dx.unwrap_or(NONE), dw, db]);
        assert!(dy.len() == rows * n && x.len() == rows * k && w.len() == n * k);
        if !dx.is_empty() {
            assert_eq!(dx.len(), rows * k);
            // SAFETY: dy is rows x n, w is n x k, dx is rows x k, all contiguous; dx
            // overlaps neither (checked by `views`).
            unsafe { sgemm(Library::chosen(), Threads::All, rows, k, n, dx.as_mut_ptr(), k, dy.as_ptr(), n, 1, w.as_ptr(), k, 1, 1.0, accumulate_dx) };
        }
        if !dw.is_empty() {
            assert!(dw.len() == n * k && db.len() == n);
            // SAFETY: dw (n x k) += dy^T (dy read through transposed strides) x; extents
            // follow from the asserted lengths.
            unsafe { sgemm(Library::chosen(), Threads::All, n, k, rows, dw.as_mut_ptr(), k, dy.as_ptr(), 1, n, x.as_ptr(), k, 1, 1.0, true) };
            add_column_sums(dy, n, db);
        }
    }

    fn gelu_backward(&mut self, h: Slot, d: Slot) {
        let ([h], [d]) = self.views([h], [d]);
        d.par_chunks_mut(CHUNK).zip(h.par_chunks(CHUNK)).for_each(|(d, h)| gelu_grad_rows(h, d));
    }

    fn scaled_add(&mut self, base: Option<Slot>, x: Slot, scales: Slot, out: Slot, rows_per_scale: usize, d: usize) {
        let ([base, x, scales], [out]) = self.views([base.unwrap_or(NONE), x, scales], [out]);
        assert!(x.len() == out.len() && (base.is_empty() || base.len() == out.len()) && scales.len() * rows_per_scale * d == out.len());
        out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
            let s = scales[r / rows_per_scale];
            let xr = &x[r * d..][..d];
            if base.is_empty() {
                o.iter_mut().zip(xr).for_each(|(o, &x)| *o = s * x);
            } else {
                o.iter_mut().zip(xr).zip(&base[r * d..][..d]).for_each(|((o, &x), &b)| *o = b + s * x);
            }
        });
    }

    fn add_row_sums(&mut self, x: Slot, acc: Slot, rows: usize, d: usize) {
        let ([x], [acc]) = self.views([x], [acc]);
        assert!(x.len() == rows * d && acc.len() == d);
        add_column_sums(x, d, acc);
    }

    fn pool(&mut self, x: Slot, out: Slot, batch: usize, tokens: usize, d: usize, mean: bool) {
        let ([x], [out]) = self.views([x], [out]);
        assert!(x.len() == batch * tokens * d && out.len() == batch * d);
        out.par_chunks_mut(d).enumerate().for_each(|(n, o)| {
            let image = &x[n * tokens * d..][..tokens * d];
            if mean {
                o.fill(0.0);
                for t in 1..tokens {
                    o.iter_mut().zip(&image[t * d..][..d]).for_each(|(o, v)| *o += v);
                }
                let inv = 1.0 / (tokens - 1) as f32;
                o.iter_mut().for_each(|o| *o *= inv);
            } else {
                o.copy_from_slice(&image[..d]);
            }
        });
    }

    fn pool_backward(&mut self, dout: Slot, dx: Slot, batch: usize, tokens: usize, d: usize, mean: bool) {
        let ([dout], [dx]) = self.views([dout], [dx]);
        assert!(dx.len() == batch * tokens * d && dout.len() == batch * d);
        let inv = 1.0 / (tokens - 1).max(1) as f32;
        dx.par_chunks_mut(tokens * d).enumerate().for_each(|(n, image)| {
            let g = &dout[n * d..][..d];
            if mean {
                image[..d].fill(0.0);
                for row in image[d..].chunks_mut(d) {
                    row.iter_mut().zip(g).for_each(|(r, &g)| *r = g * inv);
                }
            } else {
                image[..d].copy_from_slice(g);
                image[d..].fill(0.0);
            }
        });
    }

    fn batch_norm(&mut self, x: Slot, y: Slot, stats: Slot, running: Option<(Slot, Slot)>, n: usize, d: usize, eps: f32) {
        let (rm, rv) = running.unwrap_or((NONE, NONE));
        let ([x, rm, rv], [y, stats]) = self.views([x, rm, rv], [y, stats]);
        assert!(x.len() == n * d && y.len() == n * d);
        let (mean, var): (&[f32], &[f32]) = if rm.is_empty() {
            assert_eq!(stats.len(), 2 * d);
            let (mean, var) = stats.split_at_mut(d);
            for j in 0..d {
                let m = (0..n).map(|i| x[i * d + j] as f64).sum::<f64>() / n as f64;
                let v = (0..n).map(|i| (x[i * d + j] as f64 - m).powi(2)).sum::<f64>() / n as f64;
                (mean[j], var[j]) = (m as f32, v as f32);
            }
            (mean, var)
        } else {
            (rm, rv)
        };
        for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
            for j in 0..d {
                yr[j] = (xr[j] - mean[j]) / (var[j] + eps).sqrt();
            }
        }
    }

    fn batch_norm_backward(&mut self, dy: Slot, x: Slot, stats: Slot, running_var: Option<Slot>, dx: Slot, n: usize, d: usize, eps: f32) {
        let ([dy, x, stats, rv], [dx]) = self.views([dy, x, stats, running_var.unwrap_or(NONE)], [dx]);
        assert!(dy.len() == n * d && dx.len() == n * d);
        if !rv.is_empty() {
            for (dxr, gr) in dx.chunks_mut(d).zip(dy.chunks(d)) {
                for j in 0..d {
                    dxr[j] = gr[j] / (rv[j] + eps).sqrt();
                }
            }
            return;
        }
        let (mean, var) = stats.split_at(d);
        for j in 0..d {
            let rstd = 1.0 / (var[j] + eps).sqrt();
            let xhat = |i: usize| (x[i * d + j] - mean[j]) * rstd;
            let mean_g = (0..n).map(|i| dy[i * d + j]).sum::<f32>() / n as f32;
            let mean_gx = (0..n).map(|i| dy[i * d + j] * xhat(i)).sum::<f32>() / n as f32;
            for i in 0..n {
                dx[i * d + j] = rstd * (dy[i * d + j] - mean_g - xhat(i) * mean_gx);
            }
        }
    }

    fn cross_entropy(&mut self, logits: Slot, targets: &[f32], dlogits: Option<Slot>, n: usize, k: usize, grad_scale: f32) -> f32 {
        let ([logits], [dlogits]) = self.views([logits], [dlogits.unwrap_or(NONE)]);
        assert!(logits.len() == n * k && targets.len() == n * k && (dlogits.is_empty() || dlogits.len() == n * k));
        let mut total = 0f64;
        for i in 0..n {
            let z = &logits[i * k..][..k];
            let t = &targets[i * k..][..k];
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum_exp: f32 = z.iter().map(|&v| (v - max).exp()).sum();
            let lse = max + sum_exp.ln();
            total -= z.iter().zip(t).map(|(&z, &t)| (t * (z - lse)) as f64).sum::<f64>();
            if !dlogits.is_empty() {
                let sum_t: f32 = t.iter().sum();
                let scale = grad_scale / n as f32;
                for j in 0..k {
                    dlogits[i * k + j] = scale * ((z[j] - lse).exp() * sum_t - t[j]);
                }
            }
        }
        (total / n as f64) as f32
    }

    fn lars(&mut self, mu: &mut [f32], ranges: &[LarsRange], lr: f32, weight_decay: f32, momentum: f32, trust_coefficient: f32) {
        assert_eq!(mu.len(), self.params.len());
        let (params, grads) = (&mut self.params, &self.grads);
        for r in ranges {
            let (p, g, m) = (&mut params[r.offset..r.offset + r.len], &grads[r.offset..r.offset + r.len], &mut mu[r.offset..r.offset + r.len]);
            let (wd, trust) = lars_factors(p, g, r.matrix, weight_decay, trust_coefficient);
            for i in 0..p.len() {
                (p[i], m[i]) = lars_element(p[i], m[i], g[i], lr, wd, momentum, trust);
            }
        }
    }

    fn lars_stays_finite(&self, mu: &[f32], ranges: &[LarsRange], lr: f32, weight_decay: f32, momentum: f32, trust_coefficient: f32) -> bool {
        assert_eq!(mu.len(), self.params.len());
        ranges.iter().all(|r| {
            let (p, g, m) = (&self.params[r.offset..r.offset + r.len], &self.grads[r.offset..r.offset + r.len], &mu[r.offset..r.offset + r.len]);
            let (wd, trust) = lars_factors(p, g, r.matrix, weight_decay, trust_coefficient);
            (0..p.len()).all(|i| {
                let (p, m) = lars_element(p[i], m[i], g[i], lr, wd, momentum, trust);
                p.is_finite() && m.is_finite()
            })
        })
    }

    fn layer_norm(&mut self, x: Slot, w: Slot, b: Slot, y: Slot, stats: Slot, rows: usize, d: usize, eps: f32) {
        let ([x, w, b], [y, stats]) = self.views([x, w, b], [y, stats]);
        assert!(x.len() == rows * d && y.len() == rows * d && stats.len() == 2 * rows);
        let (mean, rstd) = stats.split_at_mut(rows);
        let per = rows_per_task(d);
        y.par_chunks_mut(per * d)
            .zip(x.par_chunks(per * d))
            .zip(mean.par_chunks_mut(per).zip(rstd.par_chunks_mut(per)))
            .for_each(|((y, x), (m, r))| layer_norm_stats_rows(x, w, b, y, m, r, eps));
    }

    fn layer_norm_backward(&mut self, dy: Slot, x: Slot, w: Slot, stats: Slot, dx: Slot, dw: Slot, db: Slot, rows: usize, d: usize) {
        let ([dy, x, w, stats], [dx, dw, db]) = self.views([dy, x, w, stats], [dx, dw, db]);
        let (mean, rstd) = stats.split_at(rows);
        let per = rows_per_task(d);
        // The input gradient by rows; the parameter gradients by columns, so that each
        // sum has one fixed order.
        dx.par_chunks_mut(per * d).zip(x.par_chunks(per * d).zip(dy.par_chunks(per * d))).zip(mean.par_chunks(per).zip(rstd.par_chunks(per))).for_each(
            |((dx, (x, g)), (m, r))| layer_norm_dx_rows(x, w, g, m, r, dx),
        );
        let cols = 16usize;
        dw.par_chunks_mut(cols).zip(db.par_chunks_mut(cols)).enumerate().for_each(|(c, (dw, db))| {
            let start = c * cols;
            for r in 0..rows {
                let (xr, gr) = (&x[r * d + start..][..dw.len()], &dy[r * d + start..][..dw.len()]);
                for i in 0..dw.len() {
                    dw[i] += gr[i] * (xr[i] - mean[r]) * rstd[r];
                    db[i] += gr[i];
                }
            }
        });
    }

    fn attention(&mut self, qkv: Slot, out: Slot, probs: Option<Slot>, batch: usize, tokens: usize, dim: usize, heads: usize) {
        let t = tokens;
        let hd = dim / heads;
        let scale = (hd as f32).powf(-0.5);
        let threads = rayon::current_num_threads();
        if self.attention_scratch.len() < t * t * threads {
            self.attention_scratch = vec![0.0; t * t * threads];
        }
        let scratch = SharedMut(self.attention_scratch.as_mut_ptr());
        let ([qkv], [out, probs]) = self.views([qkv], [out, probs.unwrap_or(NONE)]);
        assert!(qkv.len() == batch * t * 3 * dim && out.len() == batch * t * dim);
        let keep = !probs.is_empty();
        let (dst, probs_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(probs.as_mut_ptr()));
        (0..batch * heads).into_par_iter().for_each(|task| {
            let (bi, h) = (task / heads, task % heads);
            let (dst, probs_ptr, scratch) = (dst, probs_ptr, scratch);
            // SAFETY: each (image, head) task writes only its own t x t block of `probs`
            // (or its thread's block of the scratch, which no other task uses while it
            // runs: tasks run one at a time on a thread) and its own hd columns of `out`;
            // q, k, v are read through strides inside `qkv`, whose length is asserted.
            unsafe {
                let p = if keep {
                    std::slice::from_raw_parts_mut(probs_ptr.0.add(task * t * t), t * t)
                } else {
                    let thread = rayon::current_thread_index().unwrap_or(0);
                    std::slice::from_raw_parts_mut(scratch.0.add(thread * t * t), t * t)
                };
                let base = qkv.as_ptr().add(bi * t * 3 * dim + h * hd);
                sgemm(Library::chosen(), Threads::Serial, t, t, hd, p.as_mut_ptr(), t, base, 3 * dim, 1, base.add(dim), 1, 3 * dim, scale, false);
                for row in p.chunks_mut(t) {
                    softmax_row_in_place(row);
                }
                sgemm(Library::chosen(), Threads::Serial, t, hd, t, dst.0.add(bi * t * dim + h * hd), dim, p.as_ptr(), t, 1, base.add(2 * dim), 3 * dim, 1, 1.0, false);
            }
        });
    }

    fn attention_backward(&mut self, dout: Slot, qkv: Slot, probs: Slot, dqkv: Slot, batch: usize, tokens: usize, dim: usize, heads: usize) {
        let t = tokens;
        let hd = dim / heads;
        let scale = (hd as f32).powf(-0.5);
        let threads = rayon::current_num_threads();
        if self.attention_scratch.len() < t * t * threads {
            self.attention_scratch = vec![0.0; t * t * threads];
        }
        let scratch = SharedMut(self.attention_scratch.as_mut_ptr());
        let ([dout, qkv, probs], [dqkv]) = self.views([dout, qkv, probs], [dqkv]);
        assert!(qkv.len() == batch * t * 3 * dim && dqkv.len() == qkv.len() && dout.len() == batch * t * dim && probs.len() == batch * heads * t * t);
        let dst = SharedMut(dqkv.as_mut_ptr());
        (0..batch * heads).into_par_iter().for_each(|task| {
            let (bi, h) = (task / heads, task % heads);
            let (dst, scratch) = (dst, scratch);
            let p = &probs[task * t * t..][..t * t];
            // SAFETY: each task writes only its own q, k and v columns of `dqkv` and its
            // thread's block of the scratch (tasks run one at a time on a thread); reads
            // stay inside the asserted lengths.
            unsafe {
                let thread = rayon::current_thread_index().unwrap_or(0);
                let ds = std::slice::from_raw_parts_mut(scratch.0.add(thread * t * t), t * t);
                let base = qkv.as_ptr().add(bi * t * 3 * dim + h * hd);
                let (q, k, v) = (base, base.add(dim), base.add(2 * dim));
                let dbase = dst.0.add(bi * t * 3 * dim + h * hd);
                let d_o = dout.as_ptr().add(bi * t * dim + h * hd);
                // dv = p^T do
                sgemm(Library::chosen(), Threads::Serial, t, hd, t, dbase.add(2 * dim), 3 * dim, p.as_ptr(), 1, t, d_o, dim, 1, 1.0, false);
                // dp = do v^T, then ds = p * (dp - rowsum(dp * p)) * scale in place
                sgemm(Library::chosen(), Threads::Serial, t, t, hd, ds.as_mut_ptr(), t, d_o, dim, 1, v, 1, 3 * dim, 1.0, false);
                for (dsr, pr) in ds.chunks_mut(t).zip(p.chunks(t)) {
                    let dot = lane_sum(t, |j| dsr[j] * pr[j]);
                    dsr.iter_mut().zip(pr).for_each(|(d, &p)| *d = p * (*d - dot) * scale);
                }
                // dq = ds k, dk = ds^T q
                sgemm(Library::chosen(), Threads::Serial, t, hd, t, dbase, 3 * dim, ds.as_ptr(), t, 1, k, 3 * dim, 1, 1.0, false);
                sgemm(Library::chosen(), Threads::Serial, t, hd, t, dbase.add(dim), 3 * dim, ds.as_ptr(), 1, t, q, 3 * dim, 1, 1.0, false);
            }
        });
    }

    fn patch_rows(&mut self, imgs: Slot, patches: &[u32], per_image: usize, out: Slot, c: usize, p: usize, grid: Grid) {
        let ([imgs], [out]) = self.views([imgs], [out]);
        let (height, width, row_len) = (grid.h * p, grid.w * p, c * p * p);
        let plane = height * width;
        assert!(out.len() == patches.len() * row_len && patches.len() % per_image == 0);
        out.par_chunks_mut(row_len).zip(patches.par_iter()).enumerate().for_each(|(r, (row, &patch))| {
            let image = &imgs[(r / per_image) * c * plane..][..c * plane];
            let (gi, gj) = (patch as usize / grid.w, patch as usize % grid.w);
            for ch in 0..c {
                for i in 0..p {
                    let src = &image[ch * plane + (gi * p + i) * width + gj * p..][..p];
                    row[(ch * p + i) * p..][..p].copy_from_slice(src);
                }
            }
        });
    }

    fn gather_rows(&mut self, src: Slot, index: &[Source], tokens: [Slot; 2], add: Option<(Slot, &[u32])>, out: Slot, d: usize) {
        let (add_slot, positions) = add.unwrap_or((NONE, &[]));
        let ([src, token0, token1, add], [out]) = self.views([src, tokens[0], tokens[1], add_slot], [out]);
        assert!(out.len() == index.len() * d && (positions.is_empty() || positions.len() == index.len()));
        out.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            match index[i] {
                Source::Row(r) => row.copy_from_slice(&src[r as usize * d..][..d]),
                Source::Token(0) => row.copy_from_slice(token0),
                Source::Token(_) => row.copy_from_slice(token1),
            }
            if !positions.is_empty() {
                row.iter_mut().zip(&add[positions[i] as usize * d..][..d]).for_each(|(r, a)| *r += a);
            }
        });
    }

    fn scatter_rows(&mut self, dout: Slot, index: &[Source], dsrc: Slot, dtokens: [Slot; 2], d: usize) {
        let ([dout], [dsrc, dtoken0, dtoken1]) = self.views([dout], [dsrc, dtokens[0], dtokens[1]]);
        assert_eq!(dout.len(), index.len() * d);
        let src_rows = dsrc.len() / d;
        let dst = SharedMut(dsrc.as_mut_ptr());
        (0..index.len()).into_par_iter().with_min_len(64).for_each(|i| {
            if let Source::Row(r) = index[i] {
                let r = r as usize;
                assert!(r < src_rows);
                let dst = dst;
                // SAFETY: row `r` is inside `dsrc` (asserted), and each source row is the
                // target of at most one index (gathers read each source row once), so no
                // two tasks write the same row.
                unsafe { std::slice::from_raw_parts_mut(dst.0.add(r * d), d) }.copy_from_slice(&dout[i * d..][..d]);
            }
        });
        // A token's gradient: the sum over every row it filled, in one fixed order.
        for (i, s) in index.iter().enumerate() {
            let acc: &mut [f32] = match s {
                Source::Row(_) => continue,
                Source::Token(0) => dtoken0,
                Source::Token(_) => dtoken1,
            };
            acc.iter_mut().zip(&dout[i * d..][..d]).for_each(|(a, v)| *a += v);
        }
    }

    fn masked_mse(&mut self, imgs: Slot, pred: Slot, mask: &[f32], dpred: Option<Slot>, shape: MseShape, grad_scale: f32) -> f32 {
        let MseShape { batch, channels: c, patch: p, grid: g, rows_per_image, target } = shape;
        let (l, width, side) = (g * g, p * p * c, g * p);
        // Values per row of `pred`: the patch's, or its PCA coefficients.
        let (pred_width, basis) = match target {
            MseTarget::Pca { mean, components, k } => (k, [mean, components]),
            MseTarget::Pixels | MseTarget::NormPixels => (width, [NONE, NONE]),
        };
        let norm_pix = matches!(target, MseTarget::NormPixels);
        assert_eq!(mask.len(), batch * l);
        let denom = mask.iter().map(|&m| m as f64).sum::<f64>().max(1.0);
        let mut partials = std::mem::take(&mut self.partials);
        if partials.len() < batch {
            partials = vec![0.0; batch];
        }
        let ([imgs, pred, basis_mean, basis_components], [dpred]) = self.views([imgs, pred, basis[0], basis[1]], [dpred.unwrap_or(NONE)]);
        assert!(pred.len() == batch * rows_per_image * pred_width && (dpred.is_empty() || dpred.len() == pred.len()));
        assert!(basis_mean.is_empty() || (basis_mean.len() == width && basis_components.len() == pred_width * width));
        let dpred = SharedMut(if dpred.is_empty() { std::ptr::null_mut() } else { dpred.as_mut_ptr() });
        let coef = (2.0 / pred_width as f64 / denom) as f32 * grad_scale;
        partials[..batch].par_iter_mut().enumerate().for_each(|(n, image_loss)| {
            let dpred = dpred;
            // SAFETY: image n's rows of dpred, which only this task writes (dpred has
            // pred's length, asserted, and overlaps no input: checked by `views`).
            let mut dimage = (!dpred.0.is_null()).then(|| unsafe { std::slice::from_raw_parts_mut(dpred.0.add(n * rows_per_image * pred_width), rows_per_image * pred_width) });
            if let Some(di) = dimage.as_deref_mut() {
                di.fill(0.0);
            }
            let image = &imgs[n * c * side * side..][..c * side * side];
            *image_loss = 0.0;
            for j in 0..l {
                let m = mask[n * l + j];
                if m == 0.0 {
                    continue;
                }
                let row = &pred[(n * rows_per_image + 1 + j) * pred_width..][..pred_width];
                let (gi, gj) = (j / g, j % g);
                // The pixels in (i, j, c) order, as `patchify`.
                let value = |q: usize| {
                    let (i, rest) = (q / (p * c), q % (p * c));
                    let (jj, ch) = (rest / c, rest % c);
                    image[ch * side * side + (gi * p + i) * side + gj * p + jj]
                };
                let (mean, inv_std) = if norm_pix {
                    let mean = (0..width).map(|q| value(q) as f64).sum::<f64>() / width as f64;
                    let var = (0..width).map(|q| (value(q) as f64 - mean).powi(2)).sum::<f64>() / (width as f64 - 1.0);
                    (mean as f32, (1.0 / (var + 1e-6).sqrt()) as f32)
                } else {
                    (0.0, 1.0)
                };
                let target = |q: usize| {
                    if basis_mean.is_empty() {
                        return (value(q) - mean) * inv_std;
                    }
                    let axis = &basis_components[q * width..][..width];
                    (0..width).map(|x| (value(x) - basis_mean[x]) as f64 * axis[x] as f64).sum::<f64>() as f32
                };
                let mut sum = 0f64;
                for q in 0..pred_width {
                    let diff = row[q] - target(q);
                    sum += diff as f64 * diff as f64;
                    if let Some(di) = dimage.as_deref_mut() {
                        di[(1 + j) * pred_width + q] = coef * m * diff;
                    }
                }
                *image_loss += sum / pred_width as f64 * m as f64;
            }
        });
        let loss = (partials[..batch].iter().sum::<f64>() / denom) as f32;
        self.partials = partials;
        loss
    }

    fn norm(&mut self, x: Slot) -> f64 {
        let mut partials = std::mem::take(&mut self.partials);
        let chunks = x.len.div_ceil(CHUNK);
        if partials.len() < chunks {
            partials = vec![0.0; chunks];
        }
        let x = self.view(x);
        // Fixed chunks, summed in order: the same bits whatever the scheduling.
        x.par_chunks(CHUNK).zip(partials[..chunks].par_iter_mut()).for_each(|(c, s)| *s = c.iter().map(|&v| v as f64 * v as f64).sum::<f64>());
        let total = partials[..chunks].iter().sum::<f64>().sqrt();
        self.partials = partials;
        total
    }

    fn scale(&mut self, x: Slot, factor: f32) {
        let ([], [x]) = self.views([], [x]);
        x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
    }

    fn adamw(&mut self, m: &mut [f32], v: &mut [f32], ranges: &[AdamWRange], step: AdamWStep) {
        assert!(m.len() == self.params.len() && v.len() == self.params.len());
        let (params, grads) = (&mut self.params, &self.grads);
        // One pass per parameter over its four ranges, with torch's arithmetic:
        // m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
        // p = p * decay - step_size * m / (sqrt(v) / sqrt(bc2) + eps).
        let mut rest: (&mut [f32], &mut [f32], &mut [f32], &[f32]) = (params.as_mut_slice(), m, v, grads.as_slice());
        let mut at = 0;
        for r in ranges {
            assert!(r.offset >= at, "AdamW ranges must be in order");
            let skip = r.offset - at;
            let (p, m, v, g) = rest;
            let (_, p) = p.split_at_mut(skip);
            let (_, m) = m.split_at_mut(skip);
            let (_, v) = v.split_at_mut(skip);
            let (_, g) = g.split_at(skip);
            let (p0, p) = p.split_at_mut(r.len);
            let (m0, m) = m.split_at_mut(r.len);
            let (v0, v) = v.split_at_mut(r.len);
            let (g0, g) = g.split_at(r.len);
            rest = (p, m, v, g);
            at = r.offset + r.len;
            p0.par_chunks_mut(CHUNK).zip(m0.par_chunks_mut(CHUNK)).zip(v0.par_chunks_mut(CHUNK).zip(g0.par_chunks(CHUNK))).for_each(|((p, m), (v, g))| {
                for i in 0..p.len() {
                    (p[i], m[i], v[i]) = adamw_element(p[i], m[i], v[i], g[i], r, &step);
                }
            });
        }
    }

    fn adamw_stays_finite(&self, m: &[f32], v: &[f32], ranges: &[AdamWRange], step: AdamWStep) -> bool {
        assert!(m.len() == self.params.len() && v.len() == self.params.len());
        ranges.iter().all(|r| {
            let span = r.offset..r.offset + r.len;
            let (p, g, m, v) = (&self.params[span.clone()], &self.grads[span.clone()], &m[span.clone()], &v[span]);
            p.par_chunks(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))).all(|((p, m), (v, g))| {
                (0..p.len()).all(|i| {
                    let (p, m, v) = adamw_element(p[i], m[i], v[i], g[i], r, &step);
                    p.is_finite() && m.is_finite() && v.is_finite()
                })
            })
        })
    }
}

/// One value's AdamW update with torch's arithmetic: `m = b1 m + (1 - b1) g`,
/// `v = b2 v + (1 - b2) g^2`, `p = p * decay - step_size * m / (sqrt(v) / sqrt(bc2) + eps)`;
/// the new `(p, m, v)`.
#[inline(always)]
fn adamw_element(p: f32, m: f32, v: f32, g: f32, range: &AdamWRange, step: &AdamWStep) -> (f32, f32, f32) {
    let AdamWStep { beta1, beta2, eps, bias_correction2_sqrt } = *step;
    let m = m * beta1 + g * (1.0 - beta1);
    let v = v * beta2 + g * g * (1.0 - beta2);
    (p * range.decay_factor - range.step_size * (m / (v.sqrt() / bias_correction2_sqrt + eps)), m, v)
}

/// A LARS parameter's weight decay and trust ratio (`util/lars.py`): for a matrix,
/// `weight_decay` and `trust_coefficient * |p| / |g + wd p|`; for a 1-D parameter, neither.
fn lars_factors(p: &[f32], g: &[f32], matrix: bool, weight_decay: f32, trust_coefficient: f32) -> (f32, f32) {
    if !matrix {
        return (0.0, 1.0);
    }
    let p_norm = p.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    let u_norm = p.iter().zip(g).map(|(&p, &g)| ((g + weight_decay * p) as f64).powi(2)).sum::<f64>().sqrt();
    (weight_decay, if p_norm > 0.0 && u_norm > 0.0 { (trust_coefficient as f64 * p_norm / u_norm) as f32 } else { 1.0 })
}

/// One value's LARS update: `mu = momentum mu + (g + wd p) trust`, `p -= lr mu`; the new `(p, mu)`.
#[inline(always)]
fn lars_element(p: f32, mu: f32, g: f32, lr: f32, wd: f32, momentum: f32, trust: f32) -> (f32, f32) {
    let mu = mu * momentum + (g + wd * p) * trust;
    (p - lr * mu, mu)
}

/// Softmax of one row in place (the scale is already applied).
#[inline(always)]
fn softmax_row_in_place(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    row.iter_mut().for_each(|v| *v = fast_exp(*v - max));
    let inv = 1.0 / row.iter().sum::<f32>();
    row.iter_mut().for_each(|v| *v *= inv);
}
