use std::time::Instant;
use vit_mae_core::candle_core::{Device, Tensor, D};
fn t(name: &str, f: impl Fn() -> vit_mae_core::candle_core::Result<Tensor>) {
    let _ = f().unwrap();
    let s = Instant::now();
    for _ in 0..5 { let _ = f().unwrap(); }
    println!("{name}: {:.2} ms", s.elapsed().as_secs_f64() * 200.0);
}
fn main() -> vit_mae_core::Result<()> {
    let d = Device::Cpu;
    let (b, n, c, h) = (8usize, 197usize, 768usize, 12usize);
    let x = Tensor::randn(0f32, 1f32, (b, n, c), &d)?;
    let w = Tensor::randn(0f32, 1f32, (3 * c, c), &d)?;
    let bias = Tensor::randn(0f32, 1f32, 3 * c, &d)?;
    let ln_w = Tensor::ones(c, vit_mae_core::candle_core::DType::F32, &d)?;
    let ln_b = Tensor::zeros(c, vit_mae_core::candle_core::DType::F32, &d)?;
    t("layer_norm", || vit_mae_core::ops::layer_norm(&x, &ln_w, &ln_b, 1e-6));
    t("qkv matmul", || x.reshape((b * n, c))?.matmul(&w.t()?));
    let qkv0 = x.reshape((b * n, c))?.matmul(&w.t()?)?;
    t("bias add", || qkv0.broadcast_add(&bias));
    let qkv = qkv0.broadcast_add(&bias)?.reshape((b, n, 3, h, c / h))?.permute((2, 0, 3, 1, 4))?;
    t("q,k,v contiguous", || { let _ = qkv.get(0)?.contiguous()?; let _ = qkv.get(1)?.contiguous()?; qkv.get(2)?.contiguous() });
    let q = qkv.get(0)?.contiguous()?; let k = qkv.get(1)?.contiguous()?; let v = qkv.get(2)?.contiguous()?;
    t("q k^T", || q.matmul(&k.t()?));
    let s = q.matmul(&k.t()?)?;
    t("softmax", || vit_mae_core::ops::softmax_last_dim(&s, 0.125));
    let p = vit_mae_core::ops::softmax_last_dim(&s, 0.125)?;
    t("p v", || p.matmul(&v));
    let o = p.matmul(&v)?;
    t("transpose reshape", || o.transpose(1, 2)?.reshape((b, n, c)));
    t("residual add", || &x + &x);
    let h1 = Tensor::randn(0f32, 1f32, (b * n, 4 * c), &d)?;
    let b1 = Tensor::randn(0f32, 1f32, 4 * c, &d)?;
    t("bias gelu 4c", || vit_mae_core::ops::bias_gelu(&h1, &b1));
    t("sum bias grad 4c", || h1.sum_keepdim(0));
    let _ = D::Minus1;
    Ok(())
}
