//! The GPU backend of a build without the `wgpu` feature (candle's dummy-backend idea): the same names as
//! `sprig_wgpu`'s, so the engine, the CLI and the FFI carry no `cfg` of their own. Opening it fails with a
//! clear error; its types are uninhabited, so none of its ops can ever run.

use std::sync::Arc;

use sprig_backend::{
    Activation, AdapterInfo, AttentionParams, Backend, BackendError, ExpertWeights, KvLayout, MoeParams, MoeUsage, Result,
    RopeParams, Unary,
};
use sprig_format::ModelFile;

/// No value of this type exists.
pub enum Never {}

/// None: this build reaches no GPU.
pub fn adapters() -> Vec<AdapterInfo> {
    Vec::new()
}

#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {}

pub struct WgpuBackend {
    never: Never,
}

impl WgpuBackend {
    pub fn new(_opts: WgpuOptions) -> Result<Self> {
        Err(BackendError::DeviceUnavailable(
            "this build has no GPU backend (rebuild with the `wgpu` cargo feature)".into(),
        ))
    }
    pub fn is_software(&self) -> bool {
        match self.never {}
    }
    pub fn adapter(&self) -> &str {
        match self.never {}
    }
}

impl Backend for WgpuBackend {
    type Tensor = Never;
    type Weight = Never;
    type KvCache = Never;
    type MoeState = Never;

    fn name(&self) -> String {
        match self.never {}
    }
    fn load_weight(&self, _: &Arc<ModelFile>, _: &str) -> Result<Never> {
        match self.never {}
    }
    fn weight_shape(&self, w: &Never) -> (usize, usize) {
        match *w {}
    }
    fn tensor(&self) -> Never {
        match self.never {}
    }
    fn shape(&self, t: &Never) -> (usize, usize) {
        match *t {}
    }
    fn upload(&self, _: &[f32], _: usize, _: usize, t: &mut Never) -> Result<()> {
        match *t {}
    }
    fn download(&self, t: &Never, _: &mut Vec<f32>) -> Result<()> {
        match *t {}
    }
    fn rows(&self, x: &Never, _: usize, _: usize, _: &mut Never) -> Result<()> {
        match *x {}
    }
    fn set_rows(&self, x: &mut Never, _: usize, _: &Never) -> Result<()> {
        match *x {}
    }
    fn embed(&self, w: &Never, _: &[u32], _: f32, _: &mut Never) -> Result<()> {
        match *w {}
    }
    fn rms_norm(&self, x: &Never, _: &Never, _: f32, _: &mut Never) -> Result<()> {
        match *x {}
    }
    fn linear(&self, x: &Never, _: &Never, _: Option<&Never>, _: &mut Never) -> Result<()> {
        match *x {}
    }
    fn rope(&self, x: &mut Never, _: usize, _: &RopeParams) -> Result<()> {
        match *x {}
    }
    fn attention(
        &self,
        q: &Never,
        _: &Never,
        _: &Never,
        _: &mut Never,
        _: usize,
        _: usize,
        _: &AttentionParams,
        _: &mut Never,
    ) -> Result<()> {
        match *q {}
    }
    fn add(&self, x: &mut Never, _: &Never) -> Result<()> {
        match *x {}
    }
    fn mul(&self, x: &mut Never, _: &Never) -> Result<()> {
        match *x {}
    }
    fn map(&self, x: &mut Never, _: Unary) -> Result<()> {
        match *x {}
    }
    fn glu(&self, g: &Never, _: &Never, _: Activation, _: &mut Never) -> Result<()> {
        match *g {}
    }
    fn moe(
        &self,
        x: &Never,
        _: &Never,
        _: &ExpertWeights<'_, Never>,
        _: &MoeParams,
        _: &mut Never,
        _: &mut Never,
    ) -> Result<()> {
        match *x {}
    }
    fn moe_state(&self, _: &MoeParams) -> Result<Never> {
        match self.never {}
    }
    fn moe_usage(&self, s: &Never) -> Result<MoeUsage> {
        match *s {}
    }
    fn kv_cache(&self, _: &KvLayout) -> Result<Never> {
        match self.never {}
    }
    fn kv_read(&self, c: &Never, _: usize, _: std::ops::Range<usize>, _: &mut Vec<f32>, _: &mut Vec<f32>) -> Result<()> {
        match *c {}
    }
    fn kv_write(&self, c: &mut Never, _: usize, _: usize, _: &[f32], _: &[f32]) -> Result<()> {
        match *c {}
    }
}
