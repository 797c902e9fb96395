//! Pictures of reconstructions, like the paper's Figure 2.

use crate::error::{Error, ErrorCode, Result};
use candle_core::Tensor;

/// A PNG grid (the file's bytes), one row per image and one column per tensor
/// `[N, C, H, W]` (for a reconstruction: masked | reconstruction | reconstruction +
/// visible | original). Pixels are mapped back with `mean` and `std` (per channel) and each
/// image is enlarged to at least 128 pixels.
pub fn reconstruction_grid_png(columns: [&Tensor; 4], mean: &[f32], std: &[f32]) -> Result<Vec<u8>> {
    let dims = columns[3].dims();
    if dims.len() != 4 || dims.contains(&0) || columns.iter().any(|t| t.dims() != dims) {
        let shapes: Vec<&[usize]> = columns.iter().map(|t| t.dims()).collect();
        crate::bail!(InvalidShape, "every column of the grid must be [N, C, H, W] of one shape, no side empty, got {shapes:?}");
    }
    let (n, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
    if mean.len() != c || std.len() != c {
        crate::bail!(InvalidArgument, "mean and std need {c} values (one per channel)");
    }
    let scale = (128 / h.max(w)).max(1);
    let gap = 2;
    let (cell_w, cell_h) = (w * scale, h * scale);
    let width = columns.len() * cell_w + (columns.len() + 1) * gap;
    let height = n * cell_h + (n + 1) * gap;
    let mut canvas = image::RgbImage::from_pixel(width as u32, height as u32, image::Rgb([255, 255, 255]));
    for (col, images) in columns.iter().enumerate() {
        let values = images.flatten_all()?.to_vec1::<f32>()?;
        for row in 0..n {
            let (x0, y0) = (gap + col * (cell_w + gap), gap + row * (cell_h + gap));
            for y in 0..cell_h {
                for x in 0..cell_w {
                    let mut rgb = [0u8; 3];
                    for (k, out) in rgb.iter_mut().enumerate() {
                        let ch = if c == 1 { 0 } else { k.min(c - 1) };
                        let v = values[((row * c + ch) * h + y / scale) * w + x / scale] * std[ch] + mean[ch];
                        *out = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                    }
                    canvas.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(rgb));
                }
            }
        }
    }
    let mut bytes = Vec::new();
    canvas
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::new(ErrorCode::Internal, format!("cannot encode PNG: {e}")))?;
    Ok(bytes)
}
