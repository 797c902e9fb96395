//! Row kernels of the engine's CPU implementation: exp, erf, GELU and LayerNorm over
//! rows, compiled twice (baseline x86-64 and AVX2+FMA) and picked at run time.

/// Whether this CPU has AVX2 and FMA. The shipped binary targets baseline x86-64;
/// the kernels below are compiled a second time for AVX2+FMA and picked at run time.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Defines `$name` calling `$generic` through an AVX2+FMA build of it when the CPU
/// has those, else the baseline build.
macro_rules! dispatch {
    ($(#[$meta:meta])* fn $name:ident / $avx2:ident = $generic:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) $(-> $ret)? {
            $generic($($arg),*)
        }

        $(#[$meta])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the CPU supports the features the function was compiled for.
                return unsafe { $avx2($($arg),*) };
            }
            $generic($($arg),*)
        }
    };
}

/// `e^x` in f32 (relative error below 3e-7) in plain arithmetic that vectorises:
/// x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial, times 2^n.
/// Inputs are clamped to [-87.3, 88] (the callers pass values <= 0).
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits, so
    // n and 2^n come from bit operations that vectorise (an `as i32` cast does not: Rust
    // saturates it lane by lane).
    const ROUNDER: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    // ln 2 split in two so that n * ln2 is exact enough.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits((shifted.to_bits().wrapping_sub(ROUNDER.to_bits()).wrapping_add(127)) << 23)
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), vectorisable.
#[inline(always)]
pub(crate) fn fast_erf(x: f32) -> f32 {
    erf_given_exp(x, fast_exp(-x * x))
}

/// erf(x) as [`fast_erf`] computes it, given `exp_neg_x2 = e^(-x^2)`, which GELU's
/// derivative needs as well.
#[inline(always)]
pub(crate) fn erf_given_exp(x: f32, exp_neg_x2: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * exp_neg_x2).copysign(x)
}

/// Rows per parallel task: enough work to be worth a thread hop.
pub(crate) fn rows_per_task(dim: usize) -> usize {
    (16384 / dim.max(1)).max(1)
}

/// The sum of `f(i)` for `i` in `0..n`, in eight partial sums so that it vectorises (a
/// single running sum is a serial chain the compiler may not reorder). Callers index
/// slices of length `n`, so that the bounds checks fold away.
#[inline(always)]
pub(crate) fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    for c in 0..n / 8 {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += f(c * 8 + j);
        }
    }
    let tail: f32 = (n - n % 8..n).map(&f).sum();
    acc.iter().sum::<f32>() + tail
}

/// Mean and 1/std of one row.
#[inline(always)]
pub(crate) fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len();
    let mean = lane_sum(d, |i| row[i]) / d as f32;
    let var = lane_sum(d, |i| (row[i] - mean) * (row[i] - mean)) / d as f32;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `y = gelu(h)` (exact erf), elementwise.
#[inline(always)]
pub(crate) fn gelu_rows_generic(h: &[f32], y: &mut [f32]) {
    for (y, &v) in y.iter_mut().zip(h) {
        *y = 0.5 * v * (1.0 + fast_erf(v * FRAC_1_SQRT_2));
    }
}

dispatch!(fn gelu_rows / gelu_rows_avx2 = gelu_rows_generic(h: &[f32], y: &mut [f32]));

/// `d *= gelu'(h)`, elementwise.
#[inline(always)]
pub(crate) fn gelu_grad_rows_generic(h: &[f32], d: &mut [f32]) {
    for (d, &v) in d.iter_mut().zip(h) {
        let z = v * FRAC_1_SQRT_2;
        // gelu'(v) = Phi(v) + v phi(v); phi and erf share e^(-v^2 / 2).
        let gauss = fast_exp(-z * z);
        *d *= 0.5 * (1.0 + erf_given_exp(z, gauss)) + v * FRAC_1_SQRT_2PI * gauss;
    }
}

dispatch!(fn gelu_grad_rows / gelu_grad_rows_avx2 = gelu_grad_rows_generic(h: &[f32], d: &mut [f32]));

/// LayerNorm of each row of `w.len()` values, keeping each row's mean and rstd.
#[inline(always)]
pub(crate) fn layer_norm_stats_rows_generic(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], eps: f32) {
    let d = w.len();
    for (((yr, xr), m), r) in y.chunks_mut(d).zip(x.chunks(d)).zip(mean.iter_mut()).zip(rstd.iter_mut()) {
        let (mu, rs) = row_stats(xr, eps);
        (*m, *r) = (mu, rs);
        for (((y, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
            *y = (x - mu) * rs * w + b;
        }
    }
}

dispatch!(fn layer_norm_stats_rows / layer_norm_stats_rows_avx2 = layer_norm_stats_rows_generic(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], mean: &mut [f32], rstd: &mut [f32], eps: f32));

/// LayerNorm's input gradient for each row from its kept mean and rstd, added into `dx`:
/// `rstd * (w g - mean(w g) - xhat * mean(w g xhat))` (the parameter gradients are
/// summed by columns separately).
#[inline(always)]
pub(crate) fn layer_norm_dx_rows_generic(x: &[f32], w: &[f32], g: &[f32], mean: &[f32], rstd: &[f32], dx: &mut [f32]) {
    let d = w.len();
    for ((((dxr, xr), gr), &mu), &rs) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)).zip(mean).zip(rstd) {
        let (w, gr, xr) = (&w[..d], &gr[..d], &xr[..d]);
        let mean_wg = lane_sum(d, |i| w[i] * gr[i]) / d as f32;
        let mean_wg_xhat = lane_sum(d, |i| w[i] * gr[i] * (xr[i] - mu) * rs) / d as f32;
        for (i, dx) in dxr.iter_mut().enumerate() {
            let xhat = (xr[i] - mu) * rs;
            *dx += rs * (w[i] * gr[i] - mean_wg - xhat * mean_wg_xhat);
        }
    }
}

dispatch!(fn layer_norm_dx_rows / layer_norm_dx_rows_avx2 = layer_norm_dx_rows_generic(x: &[f32], w: &[f32], g: &[f32], mean: &[f32], rstd: &[f32], dx: &mut [f32]));

pub(crate) const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
pub(crate) const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// A pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub(crate) *mut f32);
// SAFETY: a plain address; the tasks that share it write disjoint ranges, which each
// use site states.
unsafe impl Send for SharedMut {}
// SAFETY: as for Send.
unsafe impl Sync for SharedMut {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        for i in -4000..=4000 {
            let x = i as f32 * 0.02;
            let (e, want) = (fast_exp(x), x.exp());
            assert!((e - want).abs() <= 3e-7 * want, "exp({x}) = {e}, want {want}");
            let (f, want) = (fast_erf(x), libm::erff(x));
            assert!((f - want).abs() <= 3e-7, "erf({x}) = {f}, want {want}");
        }
        assert_eq!(fast_exp(-200.0), fast_exp(-87.3));
        assert!(fast_exp(100.0).is_finite());
    }

    #[test]
    fn dispatched_kernels_match_the_baseline_build() {
        let d = 37;
        let x: Vec<f32> = (0..5 * d).map(|i| ((i * 7919) % 101) as f32 / 25.0 - 2.0).collect();
        let b: Vec<f32> = (0..d).map(|i| i as f32 / d as f32 - 0.5).collect();
        let close = |a: &[f32], b: &[f32], tol: f32| a.iter().zip(b).all(|(a, b)| (a - b).abs() < tol);
        let (mut y1, mut y2) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        gelu_rows(&x, &mut y1);
        gelu_rows_generic(&x, &mut y2);
        assert!(close(&y1, &y2, 1e-6));
        let exact = |v: f32| 0.5 * v * (1.0 + libm::erff(v * FRAC_1_SQRT_2));
        assert!(y2.iter().zip(&x).all(|(y, &v)| (y - exact(v)).abs() < 1e-6));
        let (mut g1, mut g2) = (b.repeat(5), b.repeat(5));
        gelu_grad_rows(&x, &mut g1);
        gelu_grad_rows_generic(&x, &mut g2);
        assert!(close(&g1, &g2, 1e-5));
        let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 / d as f32).collect();
        let (mut m1, mut m2, mut r1, mut r2) = (vec![0f32; 5], vec![0f32; 5], vec![0f32; 5], vec![0f32; 5]);
        layer_norm_stats_rows(&x, &w, &b, &mut y1, &mut m1, &mut r1, 1e-6);
        layer_norm_stats_rows_generic(&x, &w, &b, &mut y2, &mut m2, &mut r2, 1e-6);
        assert!(close(&y1, &y2, 1e-5) && close(&m1, &m2, 1e-6) && close(&r1, &r2, 1e-5));
        let (mut dx1, mut dx2) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        layer_norm_dx_rows(&x, &w, &g1, &m1, &r1, &mut dx1);
        layer_norm_dx_rows_generic(&x, &w, &g1, &m1, &r1, &mut dx2);
        assert!(close(&dx1, &dx2, 1e-5));
    }
}
