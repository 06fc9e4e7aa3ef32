//! The memory budget as sessions come and go (`SprigModelOptions.memory_budget_mb`): the prefix cache and then
//! the longest-idle sessions give way (trimmed: their conversation continues) before a new session or a request
//! is refused with `OUT_OF_MEMORY`. Calls the exported functions in-process, on a synthetic model whose KV cache
//! is large next to its weights.

use std::ffi::{c_char, c_void, CString};

use sprig::*;
use sprig_import::synth::{write_gguf, Arch, SynthSpec};

const MIB: u64 = 1 << 20;

struct Model(*mut SprigModel);

fn load(path: &CString, budget_mb: u32) -> Result<Model, SprigStatus> {
    let mut opts = sprig_model_options_default();
    opts.memory_budget_mb = budget_mb;
    opts.threads = 1;
    let mut m = std::ptr::null_mut();
    // SAFETY: a valid NUL-terminated path, options and out pointer.
    match unsafe { sprig_model_load(path.as_ptr(), &opts, &mut m) } {
        SprigStatus::Ok => Ok(Model(m)),
        s => Err(s),
    }
}

fn session(m: &Model) -> Result<*mut SprigSession, SprigStatus> {
    let mut s = std::ptr::null_mut();
    // SAFETY: a live model handle and a writable out pointer.
    match unsafe { sprig_session_new(m.0, &mut s) } {
        SprigStatus::Ok => Ok(s),
        st => Err(st),
    }
}

/// Runs `prompt` and one generated token; the positions the session then holds.
fn fill(s: *mut SprigSession, prompt: &str) -> u32 {
    fill_with(s, prompt, None, std::ptr::null_mut())
}

fn fill_with(s: *mut SprigSession, prompt: &str, cb: SprigTokenCallback, user: *mut c_void) -> u32 {
    let mut p = sprig_sampling_params_default();
    p.max_tokens = 1;
    let prompt = CString::new(prompt).unwrap();
    let mut r = SprigGenerateResult::default();
    // SAFETY: a live session, valid strings and params, a callback valid for the call.
    let st = unsafe { sprig_session_generate(s, prompt.as_ptr(), &p, cb, user, &mut r) };
    assert_eq!(st, SprigStatus::Ok, "{}", last_error());
    r.prompt_tokens + r.cached_tokens + r.generated_tokens
}

fn trim(s: *mut SprigSession) -> u64 {
    let mut bytes = 0;
    // SAFETY: a live session and a writable out pointer.
    assert_eq!(unsafe { sprig_session_trim(s, &mut bytes) }, SprigStatus::Ok);
    bytes
}

fn last_error() -> String {
    // SAFETY: sprig_last_error returns a NUL-terminated string valid until the next call on this thread.
    unsafe { std::ffi::CStr::from_ptr(sprig_last_error()) }.to_string_lossy().into_owned()
}

/// While a session generates, a new one is refused: the generating one may fill its whole KV cache.
unsafe extern "C" fn open_another(_text: *const c_char, _len: usize, user: *mut c_void) -> bool {
    // SAFETY: `user` is the (model, status) pair the test handed in, alive during the call.
    let (m, status) = unsafe { &mut *user.cast::<(*mut SprigModel, Option<SprigStatus>)>() };
    let mut s = std::ptr::null_mut();
    // SAFETY: a live model handle and a writable out pointer.
    let st = unsafe { sprig_session_new(*m, &mut s) };
    if st == SprigStatus::Ok {
        sprig_session_free(s);
    }
    *status = Some(st);
    true
}

#[test]
fn idle_sessions_give_way_to_new_ones_under_the_budget() {
    let dir = std::env::temp_dir().join(format!("sprig-budget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wide.gguf");
    // 8 KiB of f32 K/V per position (4 layers × 256 wide × K and V), 8192 positions: 64 MiB per session.
    let spec = SynthSpec { dim: 256, n_layers: 4, n_heads: 4, n_kv_heads: 4, hidden_dim: 256, context: 8192, ..SynthSpec::tiny(Arch::Llama) };
    write_gguf(&spec, &path).unwrap();
    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    let file = sprig_engine::open_model_file(&path, &Default::default()).unwrap();
    let need = sprig_engine::memory::MemoryNeed::of(&file, 0, sprig_backend::KvDtype::F32);
    let per_position = need.kv_cache / 8192;
    assert_eq!(per_position, 8192);

    // Two prompts of ~2 MiB of K/V each (measured on a model without a budget).
    let text = |c: char| std::iter::repeat_n(format!("{c}{c} ab cd ef "), 40).collect::<String>();
    let free = load(&c_path, 0).unwrap();
    let probe = session(&free).unwrap();
    let positions = fill(probe, &text('x'));
    sprig_session_free(probe);
    sprig_model_free(free.0);
    let held = positions as u64 * per_position;
    // The budget leaves room, beside the weights, scratch and one whole KV cache, for one session's prompt
    // and not two.
    let budget_mb = need.total().div_ceil(MIB) + held.div_ceil(MIB);
    let slack = budget_mb * MIB - need.total();
    assert!(held <= slack && 2 * held > slack, "{held} held, {slack} of room: pick other prompt lengths");

    let m = load(&c_path, budget_mb as u32).unwrap();
    let a = session(&m).unwrap();
    fill(a, &text('x'));
    let b = session(&m).unwrap();
    fill(b, &text('y'));
    // A third session: the prefix cache is not enough, `a` (idle longest) is trimmed; `b` keeps its cache.
    let c = session(&m).unwrap_or_else(|s| panic!("third session: {s:?}: {}", last_error()));
    assert_eq!(trim(a), 0, "the longest idle session was trimmed");
    // `a` continues its conversation (its own request trims `b` or the prefix cache as needed).
    fill(a, " and more");
    // While `c` generates, a fourth session is refused: `c` may fill its whole cache.
    let mut user: (*mut SprigModel, Option<SprigStatus>) = (m.0, None);
    fill_with(c, &text('z'), Some(open_another), (&mut user as *mut (*mut SprigModel, Option<SprigStatus>)).cast());
    assert_eq!(user.1, Some(SprigStatus::OutOfMemory), "a session beside a generating one");
    assert!(trim(b) > 0 || trim(c) > 0, "a session that was not trimmed holds its cache");
    for s in [a, b, c] {
        sprig_session_free(s);
    }
    sprig_model_free(m.0);
    let _ = std::fs::remove_dir_all(dir);
}
