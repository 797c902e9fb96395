//! Fixed 2-D sin-cos position embeddings, as `util/pos_embed.py` computes them
//! (float64 arithmetic, then cast to float32).

/// The table `[1 + grid*grid, dim]` row-major, with a zero first row for the cls token.
/// The first half of each row encodes the patch's column, the second half its row
/// (the published code's `np.meshgrid(grid_w, grid_h)` order).
pub fn sincos_2d_with_cls(dim: usize, grid_size: usize) -> Vec<f32> {
    let half = dim / 2;
    let mut table = vec![0f32; (1 + grid_size * grid_size) * dim];
    for row in 0..grid_size {
        for col in 0..grid_size {
            let out = &mut table[(1 + row * grid_size + col) * dim..][..dim];
            sincos_1d(half, col as f64, &mut out[..half]);
            sincos_1d(half, row as f64, &mut out[half..]);
        }
    }
    table
}

/// `[sin(pos * omega), cos(pos * omega)]` with `omega_i = 1 / 10000^(i / (dim/2))`.
fn sincos_1d(dim: usize, pos: f64, out: &mut [f32]) {
    let quarter = dim / 2;
    for i in 0..quarter {
        let omega = 1.0 / 10000f64.powf(i as f64 / quarter as f64);
        out[i] = (pos * omega).sin() as f32;
        out[quarter + i] = (pos * omega).cos() as f32;
    }
}
