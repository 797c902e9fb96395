//! Images as applications hold them (paths, encoded bytes, raw pixels) made into model
//! inputs off the JS thread.

use crate::training::{augment_of, NativeLoaderOptions};
use crate::{guarded, Coded, CodedTask, NativeTensor};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use std::path::PathBuf;
use vit_mae_core::data::{preprocess, ImageInput};
use vit_mae_core::{ErrorCode, HostTensor};

/// One image: `path`; or `bytes` of an encoded file; or `bytes` of raw interleaved 8-bit
/// pixels with `width`, `height` and `channels`.
#[napi(object)]
pub struct NativeImageInput {
    pub path: Option<String>,
    pub bytes: Option<Uint8Array>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub channels: Option<u32>,
}

impl NativeImageInput {
    /// Copies the bytes out of JS memory, which the task cannot touch off the JS thread.
    fn to_core(&self, index: usize) -> vit_mae_core::Result<ImageInput> {
        match (&self.path, &self.bytes, self.width, self.height, self.channels) {
            (Some(path), None, None, None, None) => Ok(ImageInput::Path(PathBuf::from(path))),
            (None, Some(bytes), None, None, None) => Ok(ImageInput::Encoded(bytes.to_vec())),
            (None, Some(bytes), Some(width), Some(height), Some(channels)) => {
                Ok(ImageInput::Pixels { data: bytes.to_vec(), width: width as usize, height: height as usize, channels: channels as usize })
            }
            _ => Err(vit_mae_core::Error::new(ErrorCode::InvalidImage, format!("image {index}: not a path, encoded bytes, or raw pixels with width, height and channels"))),
        }
    }
}

/// `[N, channels, imgSize, imgSize]`: each image decoded as the dataset loader decodes a
/// file and transformed as `transform` (deterministic) says.
#[napi(ts_return_type = "Promise<NativeTensor>")]
pub fn preprocess_images(images: Vec<NativeImageInput>, transform: NativeLoaderOptions, img_size: u32, channels: u32) -> Result<AsyncTask<Coded<PreprocessTask>>, ErrorCode> {
    let inputs = guarded(|| images.iter().enumerate().map(|(i, image)| image.to_core(i)).collect())?;
    let augment = guarded(|| augment_of(&transform, img_size as usize, channels as usize))?;
    Ok(AsyncTask::new(Coded(PreprocessTask { inputs: Some(inputs), augment })))
}

pub struct PreprocessTask {
    inputs: Option<Vec<ImageInput>>,
    augment: vit_mae_core::data::Augment,
}

impl CodedTask for PreprocessTask {
    type Output = HostTensor;
    type JsValue = NativeTensor;

    fn compute(&mut self) -> Result<HostTensor, ErrorCode> {
        guarded(|| {
            let inputs = self.inputs.take().unwrap_or_default();
            let n = inputs.len();
            let data = preprocess(inputs, &self.augment)?;
            let side = self.augment.img_size;
            HostTensor::new(data, vec![n, self.augment.channels, side, side])
        })
    }

    fn resolve(&mut self, _env: Env, output: HostTensor) -> Result<NativeTensor> {
        Ok(NativeTensor::from_host(output))
    }
}
