//! Picking the device a model runs on (`--device cpu|gpu|auto` in the CLI, `SPRIG_DEVICE_*` in the C/JNI
//! API) and an engine/session whose backend was chosen at run time.

use std::sync::Arc;

use sprig_backend::cpu::CpuBackend;
use sprig_format::ModelFile;

use crate::{ChatMessage, Engine, GenerationStats, Result, SamplingParams, Session};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// The GPU backend on the default adapter (any adapter, software ones such as lavapipe included).
    Gpu,
    /// A hardware GPU when the build has the GPU backend and one is present, else the CPU.
    Auto,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Self::Cpu),
            "gpu" => Some(Self::Gpu),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }
}

/// Whether this build carries the GPU backend.
pub const GPU_BACKEND: bool = cfg!(feature = "wgpu");

/// One adapter as `sprig devices` lists it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

/// The GPU adapters the GPU backend can reach (none in a build without it).
pub fn gpu_adapters() -> Vec<DeviceInfo> {
    #[cfg(feature = "wgpu")]
    {
        sprig_wgpu::adapters()
            .into_iter()
            .map(|a| DeviceInfo { name: a.name, backend: a.backend, device_type: a.device_type, driver: a.driver })
            .collect()
    }
    #[cfg(not(feature = "wgpu"))]
    Vec::new()
}

/// An engine on the CPU or the GPU backend.
pub enum AnyEngine {
    Cpu(Arc<Engine<CpuBackend>>),
    #[cfg(feature = "wgpu")]
    Gpu(Arc<Engine<sprig_wgpu::WgpuBackend>>),
}

/// Runs `$body` with `$e` bound to the `Arc<Engine<_>>` inside an [`AnyEngine`] (the body is compiled once
/// per backend). Defined per sprig-engine's own `wgpu` feature, so callers need no feature of their own.
#[cfg(feature = "wgpu")]
#[macro_export]
macro_rules! with_engine {
    ($any:expr, |$e:ident| $body:expr) => {
        match $any {
            $crate::device::AnyEngine::Cpu($e) => $body,
            $crate::device::AnyEngine::Gpu($e) => $body,
        }
    };
}

/// Runs `$body` with `$e` bound to the `Arc<Engine<_>>` inside an [`AnyEngine`].
#[cfg(not(feature = "wgpu"))]
#[macro_export]
macro_rules! with_engine {
    ($any:expr, |$e:ident| $body:expr) => {
        match $any {
            $crate::device::AnyEngine::Cpu($e) => $body,
        }
    };
}

impl AnyEngine {
    /// Builds the engine for `file` on the chosen device. `threads` sizes the CPU pool (0 = physical cores).
    /// `log` receives a line when `Auto` falls back to the CPU.
    pub fn new(file: Arc<ModelFile>, device: DeviceChoice, threads: usize, log: &mut dyn FnMut(&str)) -> Result<Self> {
        let cpu = |file: Arc<ModelFile>, log: &mut dyn FnMut(&str)| -> Result<AnyEngine> {
            let mut b = CpuBackend::new(threads)?;
            // Kernels per shape class, measured at the first load on this machine and cached.
            crate::kernel_cache::choose(&mut b, &file, Some(&crate::registry::cache_dir()), false, log);
            Ok(AnyEngine::Cpu(Arc::new(Engine::new(Arc::new(b), file)?)))
        };
        match device {
            DeviceChoice::Cpu => cpu(file, log),
            #[cfg(feature = "wgpu")]
            DeviceChoice::Gpu => {
                let b = sprig_wgpu::WgpuBackend::new(Default::default())?;
                Ok(AnyEngine::Gpu(Arc::new(Engine::new(Arc::new(b), file)?)))
            }
            #[cfg(not(feature = "wgpu"))]
            DeviceChoice::Gpu => Err(crate::EngineError::Backend(sprig_backend::BackendError::Device(
                "this build has no GPU backend (rebuild with the `wgpu` cargo feature)".into(),
            ))),
            DeviceChoice::Auto => {
                #[cfg(feature = "wgpu")]
                {
                    let hw = gpu_adapters().into_iter().find(|a| a.device_type != "Cpu");
                    match hw {
                        Some(_) => match sprig_wgpu::WgpuBackend::new(Default::default()) {
                            Ok(b) if !b.is_software() => {
                                return Ok(AnyEngine::Gpu(Arc::new(Engine::new(Arc::new(b), file)?)))
                            }
                            Ok(b) => log(&format!(
                                "device auto: the default adapter is a software one ({}); using the CPU",
                                b.adapter()
                            )),
                            Err(e) => log(&format!("device auto: {e}; using the CPU")),
                        },
                        None => log("device auto: no hardware GPU adapter; using the CPU"),
                    }
                }
                #[cfg(not(feature = "wgpu"))]
                log("device auto: this build has no GPU backend; using the CPU");
                cpu(file, log)
            }
        }
    }

    pub fn backend_name(&self) -> String {
        use sprig_backend::Backend;
        with_engine!(self, |e| e.model.backend.name())
    }

    pub fn context_length(&self) -> usize {
        with_engine!(self, |e| e.model.config.max_seq_len)
    }

    pub fn new_session(&self, max_context: usize) -> Result<AnySession> {
        Ok(match self {
            AnyEngine::Cpu(e) => AnySession::Cpu(Session::new(e.clone(), max_context)?),
            #[cfg(feature = "wgpu")]
            AnyEngine::Gpu(e) => AnySession::Gpu(Session::new(e.clone(), max_context)?),
        })
    }
}

/// A [`Session`] on either backend.
pub enum AnySession {
    Cpu(Session<CpuBackend>),
    #[cfg(feature = "wgpu")]
    Gpu(Session<sprig_wgpu::WgpuBackend>),
}

macro_rules! with_session {
    ($any:expr, |$s:ident| $body:expr) => {
        match $any {
            AnySession::Cpu($s) => $body,
            #[cfg(feature = "wgpu")]
            AnySession::Gpu($s) => $body,
        }
    };
}

impl AnySession {
    pub fn reset(&mut self) -> Result<()> {
        with_session!(self, |s| s.reset())
    }
    pub fn generate(
        &mut self,
        text: &str,
        parse_special: bool,
        params: &SamplingParams,
        max_new: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        with_session!(self, |s| s.generate(text, parse_special, params, max_new, on_text))
    }
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        params: &SamplingParams,
        max_new: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        with_session!(self, |s| s.chat(messages, params, max_new, on_text))
    }
    pub fn has_chat_template(&self) -> bool {
        with_session!(self, |s| s.engine.template.is_some())
    }
    /// Positions the session's KV cache holds.
    pub fn position(&self) -> usize {
        with_session!(self, |s| s.state.pos)
    }
}
