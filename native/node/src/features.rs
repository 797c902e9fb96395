//! Dense features of either model's encoder (`featureMaps`), as one task type.

use crate::cell::{Model, Shared};
use crate::{guarded, host_tensor, CodedTask, NativeTensor};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use vit_mae_core::features::{dense_features, DenseFeatures, FeatureMaps};
use vit_mae_core::{ErrorCode, HostTensor};

/// The maps `[N, D, H/p, W/p]` of the requested blocks, and the pyramid (scales 4, 2, 1
/// and 1/2 of the last map) when asked for.
#[napi(object)]
pub struct NativeFeatureMaps {
    pub maps: Vec<NativeTensor>,
    pub pyramid: Option<Vec<NativeTensor>>,
}

pub struct FeatureMapsTask<M> {
    model: Shared<M>,
    images: HostTensor,
    layers: Vec<i64>,
    pyramid: bool,
}

/// The task of `featureMaps` on `model`; a malformed tensor is refused at once.
pub(crate) fn feature_maps_task<M>(model: &Shared<M>, images: Float32Array, shape: Vec<u32>, layers: Vec<i64>, pyramid: bool) -> Result<AsyncTask<crate::Coded<FeatureMapsTask<M>>>, ErrorCode>
where
    M: Model + DenseFeatures,
{
    let images = guarded(|| host_tensor(&images, &shape))?;
    Ok(AsyncTask::new(crate::Coded(FeatureMapsTask { model: model.clone(), images, layers, pyramid })))
}

type HostMaps = (Vec<HostTensor>, Option<Vec<HostTensor>>);

impl<M: Model + DenseFeatures> CodedTask for FeatureMapsTask<M> {
    type Output = HostMaps;
    type JsValue = NativeFeatureMaps;

    fn compute(&mut self) -> Result<HostMaps, ErrorCode> {
        guarded(|| {
            let FeatureMaps { maps, pyramid } = dense_features(&*self.model.read()?, &self.images, &self.layers, self.pyramid)?;
            let host = |maps: &[vit_mae_core::candle_core::Tensor]| maps.iter().map(HostTensor::from_tensor).collect::<vit_mae_core::Result<Vec<_>>>();
            Ok((host(&maps)?, pyramid.map(|levels| host(&levels)).transpose()?))
        })
    }

    fn resolve(&mut self, _env: Env, (maps, pyramid): HostMaps) -> Result<NativeFeatureMaps> {
        let native = |maps: Vec<HostTensor>| maps.into_iter().map(NativeTensor::from_host).collect();
        Ok(NativeFeatureMaps { maps: native(maps), pyramid: pyramid.map(native) })
    }
}
