//! The PCA target of the paper's Table 1d: "perform PCA on the patch space and use the
//! largest PCA coefficients (96 here) as the target". The basis is fitted once, in f64,
//! on a sample of training patches; the symmetric eigensolver is Householder
//! tridiagonalisation followed by the implicit QL algorithm (as EISPACK's `tred2` and
//! `tql2`).

use crate::bail;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// A fitted basis: the patches' mean `[d]` and the `k` leading principal axes `[k, d]`
/// (orthonormal rows, largest variance first, each signed so that its entry of largest
/// magnitude, the first of equals, is positive), in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct PcaFit {
    pub mean: Vec<f64>,
    pub components: Vec<f64>,
    /// Every eigenvalue of the patches' covariance (divided by the patch count), largest first.
    pub variances: Vec<f64>,
    /// The patches the fit saw.
    pub patches: usize,
}

impl PcaFit {
    /// The fraction of the patches' variance the `k` kept components hold (1 when the
    /// patches do not vary at all: nothing is lost).
    pub fn kept_variance(&self) -> f64 {
        let k = self.components.len() / self.mean.len();
        let total: f64 = self.variances.iter().map(|v| v.max(0.0)).sum();
        if total == 0.0 {
            return 1.0;
        }
        self.variances[..k].iter().map(|v| v.max(0.0)).sum::<f64>() / total
    }
}

/// The first and second moments of patch vectors of `dim` values, summed in f64.
pub struct PatchMoments {
    dim: usize,
    count: usize,
    sum: Vec<f64>,
    /// `sum of x x^T`, `[dim, dim]`.
    outer: Tensor,
}

impl PatchMoments {
    pub fn new(dim: usize) -> Result<Self> {
        Ok(PatchMoments { dim, count: 0, sum: vec![0.0; dim], outer: Tensor::zeros((dim, dim), DType::F64, &Device::Cpu)? })
    }

    /// Patches seen so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Adds rows of `dim` values.
    pub fn add_rows(&mut self, rows: &[f32]) -> Result<()> {
        if !rows.len().is_multiple_of(self.dim) {
            bail!(Internal, "{} values are not whole patches of {}", rows.len(), self.dim);
        }
        let m = rows.len() / self.dim;
        if m == 0 {
            return Ok(());
        }
        let values: Vec<f64> = rows.iter().map(|&v| v as f64).collect();
        for row in values.chunks(self.dim) {
            self.sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        let x = Tensor::from_vec(values, (m, self.dim), &Device::Cpu)?;
        self.outer = (&self.outer + x.t()?.matmul(&x)?)?;
        self.count += m;
        Ok(())
    }

    /// Adds every patch of images `[n, c, side, side]` (patches of `p x p`), each
    /// flattened in `patchify`'s (i, j, c) order.
    pub fn add_images(&mut self, images: &[f32], n: usize, c: usize, side: usize, p: usize) -> Result<()> {
        self.add_rows(&patchify(images, n, c, side, p))
    }

    /// The mean and the `k` leading principal axes of the patches seen.
    pub fn fit(&self, k: usize) -> Result<PcaFit> {
        let d = self.dim;
        if self.count == 0 {
            bail!(InvalidArgument, "a PCA basis needs at least one patch");
        }
        if !(1..=d).contains(&k) {
            bail!(InvalidConfig, "pcaComponents must be from 1 to {d}, got {k}");
        }
        let n = self.count as f64;
        let mean: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let outer = self.outer.flatten_all()?.to_vec1::<f64>()?;
        // Covariance = E[x x^T] - mean mean^T, symmetrised against rounding.
        let mut cov = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                let second = 0.5 * (outer[i * d + j] + outer[j * d + i]) / n;
                cov[i * d + j] = second - mean[i] * mean[j];
            }
        }
        let (variances, axes) = symmetric_eigen(&cov, d)?;
        let mut components = axes[..k * d].to_vec();
        for row in components.chunks_mut(d) {
            orient(row);
        }
        Ok(PcaFit { mean, components, variances, patches: self.count })
    }
}

/// Rows `[n * L, p*p*c]` of images `[n, c, side, side]`, each patch in (i, j, c) order.
pub fn patchify(images: &[f32], n: usize, c: usize, side: usize, p: usize) -> Vec<f32> {
    let g = side / p;
    let mut rows = Vec::with_capacity(images.len());
    for image in images.chunks(c * side * side).take(n) {
        for gi in 0..g {
            for gj in 0..g {
                for i in 0..p {
                    for j in 0..p {
                        for ch in 0..c {
                            rows.push(image[ch * side * side + (gi * p + i) * side + gj * p + j]);
                        }
                    }
                }
            }
        }
    }
    rows
}

/// Signs an axis so that its entry of largest magnitude (the first of equals) is positive:
/// an eigenvector is only defined up to sign, and the basis must be reproducible.
pub fn orient(axis: &mut [f64]) {
    let largest = axis.iter().enumerate().fold(0, |best, (i, v)| if v.abs() > axis[best].abs() { i } else { best });
    if axis.get(largest).is_some_and(|&v| v < 0.0) {
        axis.iter_mut().for_each(|v| *v = -*v);
    }
}

/// The eigen-decomposition of the symmetric `n x n` matrix `a` (row-major; only its
/// lower triangle is read): eigenvalues largest first, and the unit eigenvectors as the
/// rows of an `n x n` matrix in the same order. Householder reduction to tridiagonal
/// form, then the QL algorithm with implicit shifts, both accumulating the rotations.
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != n * n {
        bail!(Internal, "a {n}x{n} matrix needs {} values, got {}", n * n, a.len());
    }
    if let Some(bad) = a.iter().find(|v| !v.is_finite()) {
        bail!(InvalidInput, "the matrix to decompose must be finite, but holds {bad}");
    }
    if n == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    // v[i][j]: row i, column j; the lower triangle mirrored so that v is symmetric.
    let mut v: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| if j <= i { a[i * n + j] } else { a[j * n + i] }).collect()).collect();
    let (mut d, mut e) = (vec![0.0; n], vec![0.0; n]);
    tridiagonalise(&mut v, &mut d, &mut e);
    ql_implicit(&mut v, &mut d, &mut e)?;
    // The eigenvectors are v's columns; order them by falling eigenvalue.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&x, &y| d[y].total_cmp(&d[x]));
    let values = order.iter().map(|&i| d[i]).collect();
    let vectors = order.iter().flat_map(|&i| v.iter().map(move |row| row[i])).collect();
    Ok((values, vectors))
}

/// Householder reduction of the symmetric `v` to a tridiagonal matrix of diagonal `d` and
/// subdiagonal `e[1..]`, leaving in `v` the orthogonal transformation that does it.
fn tridiagonalise(v: &mut [Vec<f64>], d: &mut [f64], e: &mut [f64]) {
    let n = d.len();
    d.copy_from_slice(&v[n - 1]);
    for i in (1..n).rev() {
        // Scaled to avoid under- and overflow.
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[i - 1][j];
                v[i][j] = 0.0;
                v[j][i] = 0.0;
            }
        } else {
            // The Householder vector.
            for dk in &mut d[..i] {
                *dk /= scale;
                h += *dk * *dk;
            }
            let mut f = d[i - 1];
            let mut g = if f > 0.0 { -h.sqrt() } else { h.sqrt() };
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].fill(0.0);
            // The similarity transformation on the remaining columns.
            for j in 0..i {
                f = d[j];
                v[j][i] = f;
                g = e[j] + v[j][j] * f;
                for k in j + 1..i {
                    g += v[k][j] * d[k];
                    e[k] += v[k][j] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[k][j] -= f * e[k] + g * d[k];
                }
                d[j] = v[i - 1][j];
                v[i][j] = 0.0;
            }
        }
        d[i] = h;
    }
    // Accumulate the transformations.
    for i in 0..n - 1 {
        v[n - 1][i] = v[i][i];
        v[i][i] = 1.0;
        let h = d[i + 1];
        if h != 0.0 {
            for k in 0..=i {
                d[k] = v[k][i + 1] / h;
            }
            for j in 0..=i {
                let g: f64 = (0..=i).map(|k| v[k][i + 1] * v[k][j]).sum();
                for k in 0..=i {
                    v[k][j] -= g * d[k];
                }
            }
        }
        for row in v.iter_mut().take(i + 1) {
            row[i + 1] = 0.0;
        }
    }
    for j in 0..n {
        d[j] = v[n - 1][j];
        v[n - 1][j] = 0.0;
    }
    v[n - 1][n - 1] = 1.0;
    e[0] = 0.0;
}

/// The QL algorithm with implicit shifts on the tridiagonal matrix (`d`, `e[1..]`) that
/// `tridiagonalise` left, rotating `v` along: `d` becomes the eigenvalues and `v`'s
/// columns their eigenvectors.
fn ql_implicit(v: &mut [Vec<f64>], d: &mut [f64], e: &mut [f64]) -> Result<()> {
    let n = d.len();
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1 = 0f64;
    let eps = f64::EPSILON;
    for l in 0..n {
        // Find a negligible subdiagonal element (e[n - 1] is 0, so there is one).
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let m = (l..n).find(|&m| e[m].abs() <= eps * tst1).unwrap_or(n - 1);
        if m > l {
            let mut iterations = 0;
            loop {
                iterations += 1;
                // Far beyond the handful an eigenvalue takes: only a NaN gets here.
                if iterations > 64 {
                    bail!(Internal, "the symmetric eigensolver did not converge");
                }
                // The implicit shift.
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in &mut d[l + 2..n] {
                    *di -= h;
                }
                f += h;
                // The implicit QL transformation.
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    for row in v.iter_mut() {
                        h = row[i + 1];
                        row[i + 1] = s * row[i] + c * h;
                        row[i] = c * row[i] - s * h;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a` rebuilt from its decomposition, and how far the eigenvectors are from orthonormal.
    fn check_decomposition(a: &[f64], n: usize, tol: f64) -> (Vec<f64>, Vec<f64>) {
        let (values, vectors) = symmetric_eigen(a, n).unwrap();
        let scale = a.iter().fold(1f64, |m, v| m.max(v.abs()));
        for i in 0..n {
            for j in 0..n {
                let rebuilt: f64 = (0..n).map(|k| vectors[k * n + i] * values[k] * vectors[k * n + j]).sum();
                assert!((rebuilt - a[i * n + j]).abs() <= tol * scale, "A[{i}][{j}]: rebuilt {rebuilt}, was {}", a[i * n + j]);
                let dot: f64 = (0..n).map(|k| vectors[i * n + k] * vectors[j * n + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() <= tol, "eigenvectors {i} and {j}: dot {dot}");
            }
        }
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "eigenvalues not falling: {values:?}");
        (values, vectors)
    }

    #[test]
    fn diagonal_matrix_gives_its_diagonal_and_the_unit_vectors() {
        let a = [3.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 7.0];
        let (values, vectors) = check_decomposition(&a, 3, 1e-14);
        assert_eq!(values, vec![7.0, 3.0, -1.0]);
        for (row, axis) in vectors.chunks(3).zip([2, 0, 1]) {
            assert_eq!(row[axis].abs(), 1.0, "{row:?}");
        }
    }

    #[test]
    fn two_by_two_has_its_known_eigenpairs() {
        // [[2, 1], [1, 2]]: 3 along (1, 1), 1 along (1, -1).
        let (values, vectors) = check_decomposition(&[2.0, 1.0, 1.0, 2.0], 2, 1e-14);
        assert!((values[0] - 3.0).abs() < 1e-14 && (values[1] - 1.0).abs() < 1e-14, "{values:?}");
        let h = 0.5f64.sqrt();
        assert!((vectors[0].abs() - h).abs() < 1e-14 && (vectors[0] - vectors[1]).abs() < 1e-14, "{vectors:?}");
        assert!((vectors[2] + vectors[3]).abs() < 1e-14, "{vectors:?}");
    }

    #[test]
    fn second_difference_matrix_has_the_closed_form_eigenvalues() {
        // tridiag(-1, 2, -1) of size n: 2 - 2 cos(j pi / (n + 1)), j = 1..n, with
        // eigenvectors sin(i j pi / (n + 1)).
        let n = 12;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = 2.0;
            if i + 1 < n {
                a[i * n + i + 1] = -1.0;
                a[(i + 1) * n + i] = -1.0;
            }
        }
        let (values, vectors) = check_decomposition(&a, n, 1e-12);
        let angle = std::f64::consts::PI / (n + 1) as f64;
        for (rank, value) in values.iter().enumerate() {
            let j = n - rank;
            assert!((value - (2.0 - 2.0 * (j as f64 * angle).cos())).abs() < 1e-12, "eigenvalue {rank}: {value}");
            let norm = (2.0 / (n + 1) as f64).sqrt();
            let want: Vec<f64> = (1..=n).map(|i| norm * ((i * j) as f64 * angle).sin()).collect();
            let sign = if vectors[rank * n] * want[0] < 0.0 { -1.0 } else { 1.0 };
            for (got, w) in vectors[rank * n..][..n].iter().zip(&want) {
                assert!((sign * got - w).abs() < 1e-10, "eigenvector {rank}: {got} vs {w}");
            }
        }
    }

    #[test]
    fn random_symmetric_matrices_are_rebuilt_from_their_decomposition() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for n in [1, 2, 5, 17, 48] {
            let mut a = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..=i {
                    let x = next();
                    a[i * n + j] = x;
                    a[j * n + i] = x;
                }
            }
            let (values, _) = check_decomposition(&a, n, 1e-12);
            let trace: f64 = (0..n).map(|i| a[i * n + i]).sum();
            assert!((values.iter().sum::<f64>() - trace).abs() < 1e-12, "n {n}: the eigenvalues must sum to the trace");
        }
    }

    #[test]
    fn repeated_eigenvalues_and_a_zero_matrix_decompose() {
        check_decomposition(&[0.0; 16], 4, 1e-15);
        // 2 I + 1 1^T: eigenvalue 2 + 4 once and 2 three times.
        let a: Vec<f64> = (0..16).map(|i| if i % 5 == 0 { 3.0 } else { 1.0 }).collect();
        let (values, _) = check_decomposition(&a, 4, 1e-13);
        assert!((values[0] - 6.0).abs() < 1e-13 && values[1..].iter().all(|v| (v - 2.0).abs() < 1e-13), "{values:?}");
    }

    #[test]
    fn non_finite_matrices_are_refused() {
        let e = symmetric_eigen(&[1.0, f64::NAN, f64::NAN, 1.0], 2).unwrap_err();
        assert_eq!(e.code, crate::error::ErrorCode::InvalidInput);
    }

    #[test]
    fn orient_makes_the_largest_entry_positive() {
        let mut axis = [0.1, -0.7, 0.7];
        orient(&mut axis);
        assert_eq!(axis, [-0.1, 0.7, -0.7], "the first of equal magnitudes decides");
        let mut axis = [0.0, 0.6, -0.8];
        orient(&mut axis);
        assert_eq!(axis, [0.0, -0.6, 0.8]);
    }

    #[test]
    fn fit_finds_the_planted_axes_of_patches() {
        // Patches spread 3 along (1, 1, 0, 0)/sqrt2, 1 along (0, 0, 1, 0), nothing else,
        // around the mean (1, 2, 3, 4).
        let h = 0.5f32.sqrt();
        let mut rows = Vec::new();
        for (a, b) in [(3.0f32, 1.0f32), (-3.0, 1.0), (3.0, -1.0), (-3.0, -1.0)] {
            rows.extend([1.0 + a * h, 2.0 + a * h, 3.0 + b, 4.0]);
        }
        let mut moments = PatchMoments::new(4).unwrap();
        moments.add_rows(&rows[..8]).unwrap();
        moments.add_rows(&rows[8..]).unwrap();
        assert_eq!(moments.count(), 4);
        let fit = moments.fit(2).unwrap();
        for (got, want) in fit.mean.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((got - want).abs() < 1e-6, "mean {:?}", fit.mean);
        }
        let want = [h as f64, h as f64, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        for (got, want) in fit.components.iter().zip(want) {
            assert!((got - want).abs() < 1e-6, "components {:?}", fit.components);
        }
        assert!((fit.variances[0] - 9.0).abs() < 1e-5 && (fit.variances[1] - 1.0).abs() < 1e-5, "{:?}", fit.variances);
        assert!((fit.kept_variance() - 1.0).abs() < 1e-12);
        assert!((moments.fit(1).unwrap().kept_variance() - 0.9).abs() < 1e-6);
    }

    #[test]
    fn patchify_orders_each_patch_row_column_channel() {
        // One 2-channel 4x4 image of patch 2: value = 100 c + 10 y + x.
        let image: Vec<f32> = (0..2).flat_map(|c| (0..4).flat_map(move |y| (0..4).map(move |x| (100 * c + 10 * y + x) as f32))).collect();
        let rows = patchify(&image, 1, 2, 4, 2);
        // Patch 1 (top right): (y, x) = (0, 2), (0, 3), (1, 2), (1, 3), channels inside.
        assert_eq!(&rows[8..16], &[2.0, 102.0, 3.0, 103.0, 12.0, 112.0, 13.0, 113.0]);
    }
}
