//! Tensors that move between ranks as one flat f32 buffer: a step's gradients (one
//! all-reduce per step) and the initial weights (one broadcast). Packing copies them, in
//! order, into a fresh contiguous tensor on their device; unpacking cuts it back into
//! tensors of their shapes and dtypes. The reductions run in f32 whatever the tensors'
//! dtype (bf16 gradients are summed without bf16's rounding at each rank).
//!
//! On GPUs (CUDA builds, every rank's tensors on CUDA) they move with NCCL, in place in
//! device memory on candle's stream; otherwise with MPI through a host copy.

use super::Group;
use crate::error::{Error, ErrorCode, Result};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// Where each of tensors of `sizes` elements lies in their flat buffer, one after another.
pub fn ranges(sizes: impl IntoIterator<Item = usize>) -> Vec<Range<usize>> {
    sizes
        .into_iter()
        .scan(0, |start, size| {
            let range = *start..*start + size;
            *start = range.end;
            Some(range)
        })
        .collect()
}

/// Tensors packed into one buffer. Its tensor is its own, shared with no other (see
/// [`FlatBuffer::pack`]), so a collective may write into its device memory in place.
pub struct FlatBuffer {
    tensor: Tensor,
}

impl FlatBuffer {
    /// `tensors` (at least one, all on one device) flattened to f32 and concatenated.
    pub fn pack<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> Result<FlatBuffer> {
        let parts = tensors.into_iter().map(|t| t.flatten_all()?.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?;
        // `cat` of one tensor returns that tensor, which may share its storage with the
        // caller's (an f32 tensor is flattened and converted without a copy): copy it.
        let tensor = match parts.as_slice() {
            [only] => only.copy()?,
            _ => Tensor::cat(&parts, 0)?,
        };
        Ok(FlatBuffer { tensor })
    }

    /// The packed tensor: rank 1, f32, contiguous.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Replaces the contents by `values` (as many, on the same device).
    pub(super) fn replace(&mut self, values: Vec<f32>) -> Result<()> {
        self.tensor = Tensor::from_vec(values, self.tensor.shape(), self.tensor.device())?;
        Ok(())
    }

    /// The buffer cut back into tensors of the shapes and dtypes of `like`, the tensors it
    /// was packed from (or others of their shapes, in the same order).
    pub fn unpack<'a>(self, like: impl IntoIterator<Item = &'a Tensor>) -> Result<Vec<Tensor>> {
        let like: Vec<&Tensor> = like.into_iter().collect();
        let ranges = ranges(like.iter().map(|t| t.elem_count()));
        let packed = self.tensor.elem_count();
        if ranges.last().map_or(0, |range| range.end) != packed {
            return Err(Error::new(
                ErrorCode::Internal,
                format!("a flat buffer of {packed} values cannot be unpacked into tensors of {} values", ranges.last().map_or(0, |range| range.end)),
            ));
        }
        like.iter()
            .zip(ranges)
            .map(|(t, range)| Ok(self.tensor.narrow(0, range.start, range.len())?.reshape(t.shape())?.to_dtype(t.dtype())?))
            .collect()
    }
}

impl Group {
    /// Chooses how this group moves tensors on `device`: every rank calls it (the training
    /// tasks, as they broadcast the initial weights), and when every rank's tensors are on
    /// CUDA in a CUDA build, with several ranks, it joins (once per process and device) the
    /// NCCL communicator that [`Group::all_reduce_mean`] and [`Group::broadcast_flat`]
    /// then use. Otherwise, or alone, nothing: MPI through the host.
    pub fn prepare_for(&self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.size() > 1 && self.gpus.get().is_none() {
            let [on_cuda] = self.agree_sum(Ok([f64::from(u8::from(device.is_cuda()))]), "counting the ranks that train on CUDA")?;
            if let (Device::Cuda(device), true) = (device, on_cuda as usize == self.size()) {
                let communicator = super::nccl::Communicator::get(self, device)?;
                self.gpus.get_or_init(|| communicator);
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Ok(())
    }

    /// How this group moves tensors: `"nccl"` once prepared for CUDA, else [`Group::backend`].
    pub fn tensor_backend(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if self.gpus.get().is_some() {
            return "nccl";
        }
        self.backend()
    }

    /// Replaces `flat` by its mean over the ranks. Collective.
    pub fn all_reduce_mean(&self, flat: &mut FlatBuffer, what: &str) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if let Some(gpus) = self.gpus.get().filter(|_| flat.tensor().device().is_cuda()) {
            return gpus.all_reduce_mean(flat, self, what);
        }
        let mut values = flat.tensor().to_vec1::<f32>()?;
        self.all_reduce_sum_f32(&mut values, what)?;
        let scale = 1.0 / self.size() as f32;
        values.iter_mut().for_each(|value| *value *= scale);
        flat.replace(values)
    }

    /// Copies `root`'s `flat` into every rank's. Collective.
    pub fn broadcast_flat(&self, flat: &mut FlatBuffer, root: usize, what: &str) -> Result<()> {
        self.check_rank(root, "root", what)?;
        if self.size() == 1 {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        if let Some(gpus) = self.gpus.get().filter(|_| flat.tensor().device().is_cuda()) {
            return gpus.broadcast(flat, root, self, what);
        }
        let mut values = flat.tensor().to_vec1::<f32>()?;
        self.broadcast(bytemuck::cast_slice_mut(&mut values), root, what)?;
        flat.replace(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ranges_follow_one_another_with_each_tensor_s_size() {
        assert_eq!(ranges([3, 0, 5, 1]), [0..3, 3..3, 3..8, 8..9]);
        assert!(ranges([]).is_empty());
    }

    #[test]
    fn unpacking_gives_back_the_packed_tensors_in_their_shapes_and_dtypes() {
        let device = Device::Cpu;
        let tensors = [
            Tensor::arange(0f32, 12.0, &device).unwrap().reshape((3, 4)).unwrap(),
            Tensor::new(&[7.5f32], &device).unwrap(),
            Tensor::arange(0f32, 6.0, &device).unwrap().reshape((2, 3)).unwrap().t().unwrap().to_dtype(DType::BF16).unwrap(),
        ];
        let flat = FlatBuffer::pack(&tensors).unwrap();
        assert_eq!(flat.tensor().dims(), [12 + 1 + 6]);
        assert_eq!(flat.tensor().dtype(), DType::F32);
        let values = flat.tensor().to_vec1::<f32>().unwrap();
        assert_eq!(values[..13], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 7.5]);
        // The transposed tensor is packed in its logical order.
        assert_eq!(values[13..], [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);

        let unpacked = flat.unpack(&tensors).unwrap();
        for (back, original) in unpacked.iter().zip(&tensors) {
            assert_eq!((back.dims(), back.dtype()), (original.dims(), original.dtype()));
            let difference = (back.to_dtype(DType::F32).unwrap() - original.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
            assert_eq!(difference.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn one_tensor_is_copied_not_shared() {
        let original = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let flat = FlatBuffer::pack([&original]).unwrap();
        let (packed, _) = flat.tensor().storage_and_layout();
        let (own, _) = original.storage_and_layout();
        assert!(!std::ptr::eq(&*packed, &*own), "the flat buffer shares the tensor's storage");
    }

    #[test]
    fn a_buffer_of_another_size_is_refused() {
        let tensors = [Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()];
        let other = [Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap()];
        let e = FlatBuffer::pack(&tensors).unwrap().unpack(&other).unwrap_err();
        assert!(e.message.contains("a flat buffer of 2 values cannot be unpacked into tensors of 3 values"), "{}", e.message);
    }
}
