//! Picking the device a model runs on (`--device cpu|gpu|auto` in the CLI, `SPRIG_DEVICE_*` in the C/JNI
//! API) and an engine/session whose backend was chosen at run time.

use std::sync::Arc;

use sprig_backend::cpu::CpuBackend;
use sprig_format::ModelFile;

use crate::{ChatMessage, ContextPolicy, Engine, GenerationStats, PrefixCacheStats, Result, SamplingParams, Session};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// The GPU backend on the default adapter (any adapter, software ones such as lavapipe included).
    Gpu,
    /// A hardware GPU when the build has the GPU backend and one is present, else the CPU.
    Auto,
}

impl DeviceChoice {
    pub const ALL: [DeviceChoice; 3] = [DeviceChoice::Cpu, DeviceChoice::Gpu, DeviceChoice::Auto];
    pub fn name(self) -> &'static str {
        match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Gpu => "gpu",
            DeviceChoice::Auto => "auto",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }
}

/// This machine's CPU as the engine sees it (`sprig devices`).
pub struct CpuInfo {
    pub model: String,
    pub physical_cores: usize,
    /// Kernel ISAs this CPU can run, best first.
    pub isas: Vec<&'static str>,
    /// `SPRIG_CPU`, when it forces one.
    pub forced: Option<String>,
}

pub fn cpu_info() -> CpuInfo {
    CpuInfo {
        model: crate::kernel_cache::cpu_model(),
        physical_cores: default_threads(),
        isas: sprig_quant::kernels::Isa::available().iter().map(|i| i.name()).collect(),
        forced: std::env::var("SPRIG_CPU").ok().filter(|s| !s.is_empty()),
    }
}

/// Threads a CPU engine uses when asked for 0: one per physical core.
pub fn default_threads() -> usize {
    sprig_backend::cpu::physical_cores()
}

/// Measures every candidate CPU kernel on `file` afresh (rewriting the cached pick) and describes the result,
/// for `sprig bench --kernels`.
pub fn remeasure_kernels(file: &Arc<ModelFile>, threads: usize, log: &mut dyn FnMut(&str)) -> Result<Vec<String>> {
    let mut b = CpuBackend::new(threads)?;
    crate::kernel_cache::choose(&mut b, file, Some(&crate::registry::cache_dir()), true, log);
    Ok(crate::kernel_cache::describe(b.kernel_selection()))
}

/// Whether this build carries the GPU backend.
pub const GPU_BACKEND: bool = cfg!(feature = "wgpu");

// The one place the `wgpu` feature is looked at: a build without it gets a stub with the same names whose
// constructor fails ("built without GPU support").
#[cfg(feature = "wgpu")]
use sprig_wgpu as gpu;
#[cfg(not(feature = "wgpu"))]
use crate::gpu_stub as gpu;

/// The GPU backend of this build (the stub when it has none).
pub type GpuBackend = gpu::WgpuBackend;

pub use sprig_backend::AdapterInfo;

/// The GPU adapters the GPU backend can reach (none in a build without it).
pub fn gpu_adapters() -> Vec<AdapterInfo> {
    gpu::adapters()
}

/// An engine on the CPU or the GPU backend.
pub enum AnyEngine {
    Cpu(Arc<Engine<CpuBackend>>),
    Gpu(Arc<Engine<GpuBackend>>),
}

/// Runs `$body` with `$e` bound to the `Arc<Engine<_>>` inside an [`AnyEngine`] (the body is compiled once
/// per backend).
#[macro_export]
macro_rules! with_engine {
    ($any:expr, |$e:ident| $body:expr) => {
        match $any {
            $crate::device::AnyEngine::Cpu($e) => $body,
            $crate::device::AnyEngine::Gpu($e) => $body,
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
        let gpu = |file: Arc<ModelFile>| -> Result<AnyEngine> {
            let b = GpuBackend::new(Default::default())?;
            Ok(AnyEngine::Gpu(Arc::new(Engine::new(Arc::new(b), file)?)))
        };
        match device {
            DeviceChoice::Cpu => cpu(file, log),
            DeviceChoice::Gpu => gpu(file),
            DeviceChoice::Auto => {
                if !GPU_BACKEND {
                    log("device auto: this build has no GPU backend; using the CPU");
                    return cpu(file, log);
                }
                if !gpu_adapters().iter().any(|a| a.device_type != "Cpu") {
                    log("device auto: no hardware GPU adapter; using the CPU");
                    return cpu(file, log);
                }
                match GpuBackend::new(Default::default()) {
                    Ok(b) if !b.is_software() => Ok(AnyEngine::Gpu(Arc::new(Engine::new(Arc::new(b), file)?))),
                    Ok(b) => {
                        log(&format!(
                            "device auto: the default adapter is a software one ({}); using the CPU",
                            b.adapter()
                        ));
                        cpu(file, log)
                    }
                    Err(e) => {
                        log(&format!("device auto: {e}; using the CPU"));
                        cpu(file, log)
                    }
                }
            }
        }
    }

    /// The CPU kernel choice and why, or the GPU backend's name: what `sprig run -v` reports.
    pub fn describe(&self) -> Vec<String> {
        match self {
            AnyEngine::Cpu(c) => crate::kernel_cache::describe(c.model.backend.kernel_selection()),
            AnyEngine::Gpu(_) => vec![self.backend_name()],
        }
    }

    /// `cpu` or `gpu`: where the model runs (what `Auto` chose).
    pub fn device(&self) -> DeviceChoice {
        match self {
            AnyEngine::Cpu(_) => DeviceChoice::Cpu,
            AnyEngine::Gpu(_) => DeviceChoice::Gpu,
        }
    }

    pub fn backend_name(&self) -> String {
        use sprig_backend::Backend;
        with_engine!(self, |e| e.model.backend.name())
    }

    pub fn context_length(&self) -> usize {
        with_engine!(self, |e| e.model.config.max_seq_len)
    }

    /// What the prefix cache shared by this engine's sessions holds and saved.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        with_engine!(self, |e| e.prefix_cache.stats())
    }

    /// How sessions made from now on store their KV cache.
    pub fn set_kv_dtype(&self, dtype: sprig_backend::KvDtype) {
        with_engine!(self, |e| e.model.set_kv_dtype(dtype))
    }

    /// Evicts prefix-cache blocks until it holds at most `bytes` (its budget stays).
    pub fn shrink_prefix_cache(&self, bytes: usize) {
        with_engine!(self, |e| e.prefix_cache.shrink_to(bytes))
    }

    /// The prefix cache's byte budget (0 turns it off).
    pub fn set_prefix_cache_budget(&self, bytes: usize) {
        with_engine!(self, |e| e.prefix_cache.set_budget(bytes))
    }

    /// A draft model drafting for `target` (checked: the same tokenizer), with its own KV cache of `ctx`.
    /// Whether the model has a multi-token-prediction head to draft with.
    pub fn has_mtp(&self) -> bool {
        with_engine!(self, |e| e.model.has_mtp())
    }

    pub fn drafter_for(&self, target: &AnyEngine, ctx: usize) -> Result<Box<dyn crate::speculative::Drafter>> {
        with_engine!(self, |d| with_engine!(target, |t| {
            Ok(Box::new(crate::speculative::DraftModel::new(d.clone(), &**t, ctx)?) as Box<dyn crate::speculative::Drafter>)
        }))
    }

    pub fn new_session(&self, max_context: usize) -> Result<AnySession> {
        Ok(match self {
            AnyEngine::Cpu(e) => AnySession::Cpu(Session::new(e.clone(), max_context)?),
            AnyEngine::Gpu(e) => AnySession::Gpu(Session::new(e.clone(), max_context)?),
        })
    }
}

/// A [`Session`] on either backend (few and long-lived: the variants' size difference does not matter).
#[allow(clippy::large_enum_variant)]
pub enum AnySession {
    Cpu(Session<CpuBackend>),
    Gpu(Session<GpuBackend>),
}

macro_rules! with_session {
    ($any:expr, |$s:ident| $body:expr) => {
        match $any {
            AnySession::Cpu($s) => $body,
            AnySession::Gpu($s) => $body,
        }
    };
}

/// Runs a request of the session in `slot` through its engine's shared batch ([`Engine::generate_together`]),
/// with the other sessions of the model generating at the same time. The session leaves `slot` while it runs
/// and comes back; were it lost (the batch thread failing, sprig's bug), a fresh session of the same model
/// takes its place and the error is returned.
pub fn generate_together(
    slot: &mut Option<AnySession>,
    prompt: crate::Prompt,
    params: SamplingParams,
    max_new: usize,
    cancel: Arc<std::sync::atomic::AtomicBool>,
    on_text: impl FnMut(&str) -> bool,
    on_logprob: Option<&mut dyn FnMut(&crate::TokenLogprob)>,
) -> Result<GenerationStats> {
    fn run<B: sprig_backend::Backend>(
        s: Session<B>,
        put: impl FnOnce(Session<B>) -> AnySession,
        slot: &mut Option<AnySession>,
        job: (crate::Prompt, SamplingParams, usize, Arc<std::sync::atomic::AtomicBool>),
        on_text: impl FnMut(&str) -> bool,
        on_logprob: Option<&mut dyn FnMut(&crate::TokenLogprob)>,
    ) -> Result<GenerationStats> {
        let (engine, ctx) = (s.engine.clone(), s.max_context());
        let (back, r) = engine.generate_together(s, job.0, job.1, job.2, job.3, on_text, on_logprob);
        let back = match back {
            Some(s) => s,
            None => Session::new(engine, ctx)?,
        };
        *slot = Some(put(back));
        r
    }
    let job = (prompt, params, max_new, cancel);
    match slot.take() {
        Some(AnySession::Cpu(s)) => run(s, AnySession::Cpu, slot, job, on_text, on_logprob),
        Some(AnySession::Gpu(s)) => run(s, AnySession::Gpu, slot, job, on_text, on_logprob),
        None => Err(crate::EngineError::Eval("the session is not there (a request on it failed)".into())),
    }
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
    /// See [`Session::chat_with_tools`].
    pub fn chat_with_tools(
        &mut self,
        messages: &[ChatMessage],
        tools: Option<&crate::Tools>,
        params: &SamplingParams,
        max_new: usize,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerationStats> {
        with_session!(self, |s| s.chat_with_tools(messages, tools, params, max_new, on_text))
    }
    /// See [`Session::trim`].
    pub fn trim(&mut self) -> Result<u64> {
        with_session!(self, |s| s.trim())
    }
    /// See [`Session::kv_resident_bytes`].
    pub fn kv_resident_bytes(&self) -> u64 {
        with_session!(self, |s| s.kv_resident_bytes())
    }
    /// The engine the session runs on.
    pub fn engine(&self) -> AnyEngine {
        match self {
            AnySession::Cpu(s) => AnyEngine::Cpu(s.engine.clone()),
            AnySession::Gpu(s) => AnyEngine::Gpu(s.engine.clone()),
        }
    }
    /// See [`Session::set_speculation`].
    pub fn set_speculation(&mut self, spec: Option<crate::speculative::Speculation>) {
        with_session!(self, |s| s.set_speculation(spec))
    }
    /// The session's speculative decoding figures so far (`None`: it does not speculate).
    pub fn speculation_stats(&self) -> Option<crate::speculative::SpecStats> {
        with_session!(self, |s| s.speculation().map(|x| x.stats()))
    }
    /// See [`Session::set_context_policy`].
    pub fn set_context_policy(&mut self, policy: ContextPolicy, keep: usize) {
        with_session!(self, |s| s.set_context_policy(policy, keep))
    }
    /// See [`Session::record_reply`].
    pub fn record_reply(&mut self, messages: &[ChatMessage], reply: &str) {
        with_session!(self, |s| s.record_reply(messages, reply))
    }
    pub fn has_chat_template(&self) -> bool {
        with_session!(self, |s| s.engine.template.is_some())
    }
    /// Positions the session's KV cache holds.
    pub fn position(&self) -> usize {
        with_session!(self, |s| s.state.pos)
    }
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        with_session!(self, |s| s.save(path))
    }
    pub fn load(&mut self, path: &std::path::Path) -> Result<()> {
        with_session!(self, |s| s.load(path))
    }
}
