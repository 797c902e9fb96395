//! The fused ops on CUDA: the kernels of `kernels.cu` (compiled to PTX by build.rs) behind
//! [`crate::ops`]'s LayerNorm and bias + GELU ops (their `cuda_fwd`, and their `bwd` on CUDA
//! tensors) and [`crate::optim`]'s AdamW update. The kernels take contiguous, non-empty
//! tensors; `ops` and `optim` route anything else to the composed forms.

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::cuda::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
/// The name candle caches the loaded PTX module under (per device).
const MODULE: &str = "vit-mae-kernels";

/// Threads per block of the row kernels (a warp per row, so 8 rows a block) and of the
/// elementwise kernels.
const BLOCK: u32 = 256;
const WARP: u32 = 32;
/// `COL_ROWS` of kernels.cu: the column kernels' blocks are `WARP x COL_ROWS` threads.
const COL_ROWS: u32 = 8;
/// Blocks a column kernel's grid aims for (about 8 per SM of a large GPU); the more
/// chunks of rows, the more partial sums to add up after.
const COLUMN_BLOCKS: usize = 1024;

/// Launches kernel `$name` of kernels.cu on `$dev`'s stream with the given arguments
/// (references: device buffers and views, scalars).
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, MODULE, PTX)?;
        let mut builder = func.builder();
        $(builder.arg($arg);)+
        // SAFETY: the arguments are the kernel's parameters in kernels.cu, in order and of
        // their types; the callers check that the buffers hold what the kernel reads and writes.
        unsafe { builder.launch($cfg) }.w()?;
    }};
}

/// The CUDA storage of a tensor.
fn cuda_storage<'a>(storage: &'a Storage, op: &str) -> Result<&'a CudaStorage> {
    match storage {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("{op}: the CUDA kernel was given a tensor on another device"),
    }
}

/// The range of a contiguous, non-empty tensor's values in its storage.
fn contiguous_range(layout: &Layout, op: &str) -> Result<std::ops::Range<usize>> {
    match layout.contiguous_offsets() {
        Some((start, end)) if start < end => Ok(start..end),
        Some(_) => bail!("{op}: the CUDA kernel takes non-empty tensors"),
        None => bail!("{op}: the CUDA kernel takes contiguous tensors"),
    }
}

/// The values of a contiguous, non-empty tensor of `T`s.
fn view<'a, T: CudaDType>(storage: &'a CudaStorage, layout: &Layout, op: &str) -> Result<CudaView<'a, T>> {
    Ok(storage.as_cuda_slice::<T>()?.slice(contiguous_range(layout, op)?))
}

/// The number of rows of a tensor of `shape` whose last dimension must be `d`, and `d`,
/// as the kernels' `int`s.
fn rows_of(shape: &Shape, d: usize, op: &str) -> Result<(i32, i32)> {
    if shape.dims().last() != Some(&d) || d == 0 {
        bail!("{op}: input {shape:?} does not end in the parameters' {d}");
    }
    let rows = shape.elem_count() / d;
    match (i32::try_from(rows), i32::try_from(d)) {
        (Ok(rows), Ok(d)) if rows > 0 => Ok((rows, d)),
        _ => bail!("{op}: input {shape:?} is too large for the CUDA kernel"),
    }
}

fn alloc<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller launches a kernel that writes all `len` values before they are read.
    unsafe { dev.alloc::<T>(len) }
}

fn tensor<T: CudaDType>(values: CudaSlice<T>, dev: &CudaDevice, shape: &Shape) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(values, dev.clone())), shape.clone(), BackpropOp::none(), false)
}

/// A warp per row, 8 rows per block.
fn row_config(rows: i32) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows as u32).div_ceil(BLOCK / WARP), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The grid of a column kernel over `rows x d`: tiles of 32 columns by chunks of rows.
/// Returns the config, the number of chunks and the rows per chunk.
fn column_config(rows: i32, d: i32) -> (LaunchConfig, usize, i32) {
    let (rows, tiles) = (rows as usize, (d as usize).div_ceil(WARP as usize));
    let chunks = COLUMN_BLOCKS.div_ceil(tiles).clamp(1, rows.div_ceil(COL_ROWS as usize));
    let rows_per_chunk = rows.div_ceil(chunks);
    let chunks = rows.div_ceil(rows_per_chunk);
    let cfg = LaunchConfig { grid_dim: (tiles as u32, chunks as u32, 1), block_dim: (WARP, COL_ROWS, 1), shared_mem_bytes: 0 };
    (cfg, chunks, rows_per_chunk as i32)
}

/// `out[col] = sum over chunks of partial[chunk * d + col]`, a thread per column.
fn sum_partials(dev: &CudaDevice, partial: &CudaView<'_, f32>, out: &mut CudaSlice<f32>, chunks: usize, d: i32) -> Result<()> {
    let chunks = chunks as i32;
    let cfg = LaunchConfig { grid_dim: ((d as u32).div_ceil(BLOCK), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    launch!(dev, "vm_sum_partials_f32", cfg, partial, out, &chunks, &d);
    Ok(())
}

/// LayerNormOp's forward pass: `x` f32 rows of `d`, `w` and `b` f32 of `d`.
pub(crate) fn layer_norm_fwd(x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout, b: &CudaStorage, bl: &Layout, eps: f32) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "layer_norm";
    let dev = &x.device;
    let (xv, wv, bv) = (view::<f32>(x, xl, OP)?, view::<f32>(w, wl, OP)?, view::<f32>(b, bl, OP)?);
    if bv.len() != wv.len() {
        bail!("{OP}: weight of {} and bias of {}", wv.len(), bv.len());
    }
    let (rows, d) = rows_of(xl.shape(), wv.len(), OP)?;
    let mut y = alloc::<f32>(dev, xv.len())?;
    launch!(dev, "vm_layer_norm_fwd_f32", row_config(rows), &xv, &wv, &bv, &mut y, &rows, &d, &eps);
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
}

/// LayerNormOp's backward pass on CUDA tensors: `(dx, dweight, dbias)`.
pub(crate) fn layer_norm_bwd(x: &Tensor, w: &Tensor, grad: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "layer_norm backward";
    let (x, w, g) = (x.contiguous()?, w.contiguous()?, grad.to_dtype(DType::F32)?.contiguous()?);
    if g.shape() != x.shape() {
        bail!("{OP}: gradient {:?} for input {:?}", g.shape(), x.shape());
    }
    let ((xs, xl), (ws, wl), (gs, gl)) = (x.storage_and_layout(), w.storage_and_layout(), g.storage_and_layout());
    let (xs, ws, gs) = (cuda_storage(&xs, OP)?, cuda_storage(&ws, OP)?, cuda_storage(&gs, OP)?);
    let dev = &xs.device;
    let (xv, wv, gv) = (view::<f32>(xs, xl, OP)?, view::<f32>(ws, wl, OP)?, view::<f32>(gs, gl, OP)?);
    let (rows, d) = rows_of(xl.shape(), wv.len(), OP)?;
    let mut dx = alloc::<f32>(dev, xv.len())?;
    let mut stats = alloc::<f32>(dev, 2 * rows as usize)?;
    launch!(dev, "vm_layer_norm_bwd_dx_f32", row_config(rows), &xv, &wv, &gv, &mut dx, &mut stats, &rows, &d, &eps);
    let (cfg, chunks, rows_per_chunk) = column_config(rows, d);
    let mut partial = alloc::<f32>(dev, 2 * chunks * d as usize)?;
    launch!(dev, "vm_layer_norm_bwd_dwdb_f32", cfg, &xv, &gv, &stats, &mut partial, &rows, &d, &rows_per_chunk);
    let (mut dw, mut db) = (alloc::<f32>(dev, d as usize)?, alloc::<f32>(dev, d as usize)?);
    let split = chunks * d as usize;
    sum_partials(dev, &partial.slice(..split), &mut dw, chunks, d)?;
    sum_partials(dev, &partial.slice(split..), &mut db, chunks, d)?;
    Ok((tensor(dx, dev, x.shape()), tensor(dw, dev, w.shape()), tensor(db, dev, w.shape())))
}

/// BiasGeluOp's forward pass: `x` f32 or bf16 rows of `d`, `b` f32 of `d`; the output of
/// `x`'s dtype.
pub(crate) fn bias_gelu_fwd(x: &CudaStorage, xl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
    const OP: &str = "bias_gelu";
    let dev = &x.device;
    let bv = view::<f32>(b, bl, OP)?;
    let (rows, d) = rows_of(xl.shape(), bv.len(), OP)?;
    // A row per block (grid-stride over the rows), its columns across the block's threads.
    let threads = (d as u32).next_multiple_of(WARP).min(BLOCK);
    let cfg = LaunchConfig { grid_dim: ((rows as u32).min(1 << 20), 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let y = match &x.slice {
        CudaStorageSlice::F32(_) => {
            let xv = view::<f32>(x, xl, OP)?;
            let mut y = alloc::<f32>(dev, xv.len())?;
            launch!(dev, "vm_bias_gelu_fwd_f32", cfg, &xv, &bv, &mut y, &rows, &d);
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }
        CudaStorageSlice::BF16(s) => {
            let xv = s.slice(contiguous_range(xl, OP)?);
            let mut y = alloc_like(dev, s, xv.len())?;
            launch!(dev, "vm_bias_gelu_fwd_bf16", cfg, &xv, &bv, &mut y, &rows, &d);
            CudaStorage::wrap_cuda_slice(y, dev.clone())
        }
        _ => bail!("{OP}: the CUDA kernel takes f32 or bf16 input, not {:?}", x.dtype()),
    };
    Ok((y, xl.shape().clone()))
}

/// A buffer of `len` elements of the type of `_like`'s (bf16's type is only named through
/// the storage's variant: candle does not re-export `half`).
fn alloc_like<T: DeviceRepr>(dev: &CudaDevice, _like: &CudaSlice<T>, len: usize) -> Result<CudaSlice<T>> {
    alloc::<T>(dev, len)
}

/// BiasGeluOp's backward pass on CUDA tensors: `(dx, dbias)`, `dx` of `x`'s dtype, `dbias`
/// f32, summed from the f32 `dx` before it is rounded to `x`'s dtype.
pub(crate) fn bias_gelu_bwd(x: &Tensor, b: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)> {
    const OP: &str = "bias_gelu backward";
    let (x, b, g) = (x.contiguous()?, b.contiguous()?, grad.to_dtype(x.dtype())?.contiguous()?);
    if g.shape() != x.shape() {
        bail!("{OP}: gradient {:?} for input {:?}", g.shape(), x.shape());
    }
    let ((xs, xl), (bs, bl), (gs, gl)) = (x.storage_and_layout(), b.storage_and_layout(), g.storage_and_layout());
    let (xs, bs, gs) = (cuda_storage(&xs, OP)?, cuda_storage(&bs, OP)?, cuda_storage(&gs, OP)?);
    let dev = &xs.device;
    let bv = view::<f32>(bs, bl, OP)?;
    let (rows, d) = rows_of(xl.shape(), bv.len(), OP)?;
    let (cfg, chunks, rows_per_chunk) = column_config(rows, d);
    let mut partial = alloc::<f32>(dev, chunks * d as usize)?;
    let dx = match (&xs.slice, &gs.slice) {
        (CudaStorageSlice::F32(_), CudaStorageSlice::F32(_)) => {
            let (xv, gv) = (view::<f32>(xs, xl, OP)?, view::<f32>(gs, gl, OP)?);
            let mut dx = alloc::<f32>(dev, xv.len())?;
            launch!(dev, "vm_bias_gelu_bwd_f32", cfg, &xv, &bv, &gv, &mut dx, &mut partial, &rows, &d, &rows_per_chunk);
            tensor(dx, dev, x.shape())
        }
        (CudaStorageSlice::BF16(xsl), CudaStorageSlice::BF16(gsl)) => {
            let (xv, gv) = (xsl.slice(contiguous_range(xl, OP)?), gsl.slice(contiguous_range(gl, OP)?));
            let mut dx = alloc_like(dev, xsl, xv.len())?;
            launch!(dev, "vm_bias_gelu_bwd_bf16", cfg, &xv, &bv, &gv, &mut dx, &mut partial, &rows, &d, &rows_per_chunk);
            tensor(dx, dev, x.shape())
        }
        _ => bail!("{OP}: the CUDA kernel takes f32 or bf16 input, not {:?}", x.dtype()),
    };
    let mut db = alloc::<f32>(dev, d as usize)?;
    sum_partials(dev, &partial.slice(..), &mut db, chunks, d)?;
    Ok((dx, tensor(db, dev, b.shape())))
}

/// The hyper-parameters of one AdamW update (optim.rs's, as f32).
#[derive(Clone, Copy)]
pub(crate) struct AdamWArgs {
    pub beta1: f32,
    pub beta2: f32,
    pub decay_factor: f32,
    pub step_size: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
}

/// The AdamW update of one f32 parameter in one kernel: the moments `m` and `v` in place
/// (written through these shared storages: the optimizer owns them, and candle runs the
/// kernels of a device in order on one stream) and then the parameter.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw(param: &mut CudaStorage, pl: &Layout, grad: &Tensor, m: &CudaStorage, ml: &Layout, v: &CudaStorage, vl: &Layout, a: AdamWArgs) -> Result<()> {
    const OP: &str = "adamw";
    let dev = param.device.clone();
    let (gs, gl) = grad.storage_and_layout();
    let gs = cuda_storage(&gs, OP)?;
    let (gv, mv, vv) = (view::<f32>(gs, gl, OP)?, view::<f32>(m, ml, OP)?, view::<f32>(v, vl, OP)?);
    let range = contiguous_range(pl, OP)?;
    let n = range.len();
    if gv.len() != n || mv.len() != n || vv.len() != n {
        bail!("{OP}: parameter of {n}, gradient of {}, moments of {} and {}", gv.len(), mv.len(), vv.len());
    }
    let mut pv = param.as_cuda_slice_mut::<f32>()?.slice_mut(range);
    let blocks = (n as u64).div_ceil(BLOCK as u64).min(4096) as u32;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
    let n = n as u64;
    launch!(dev, "vm_adamw_f32", cfg, &mut pv, &gv, &mv, &vv, &n, &a.beta1, &a.beta2, &a.decay_factor, &a.step_size, &a.bias_correction2_sqrt, &a.eps);
    Ok(())
}
