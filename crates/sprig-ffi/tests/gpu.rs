//! `SPRIG_DEVICE_GPU` / `SPRIG_DEVICE_AUTO` through the C ABI in a build with the GPU backend
//! (`--features wgpu`); without a GPU the adapter is Mesa's lavapipe. Calls the exported functions in-process.
#![cfg(feature = "wgpu")]

use std::ffi::{c_char, c_void, CString};
use std::path::PathBuf;

use sprig::*;

fn fixture(p: &str) -> CString {
    let path =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../../tests/data").join(p);
    CString::new(path.to_str().unwrap()).unwrap()
}

unsafe extern "C" fn collect(text: *const c_char, len: usize, user: *mut c_void) -> bool {
    // SAFETY: the library passes `len` valid bytes; `user` is the String the test handed in.
    unsafe {
        let bytes = std::slice::from_raw_parts(text.cast::<u8>(), len);
        (*user.cast::<String>()).push_str(std::str::from_utf8(bytes).unwrap());
    }
    true
}

#[test]
fn gpu_device_runs_the_golden_text() {
    let (model, tok) = (fixture("stories260K/stories260K.bin"), fixture("stories260K/tok512.bin"));
    let golden_path = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"))
        .join("../../tests/data/stories260K/golden_once_upon_a_time_steps256.txt");
    let golden = std::fs::read_to_string(golden_path).unwrap();
    let mut opts = sprig_model_options_default();
    opts.tokenizer_path = tok.as_ptr();
    opts.device = SPRIG_DEVICE_GPU;
    let mut m = std::ptr::null_mut();
    // SAFETY: valid NUL-terminated strings, options and out pointer.
    assert_eq!(unsafe { sprig_model_load(model.as_ptr(), &opts, &mut m) }, SprigStatus::Ok);
    let mut device = 99;
    // SAFETY: live handle, writable out pointer.
    assert_eq!(unsafe { sprig_model_device(m, &mut device) }, SprigStatus::Ok);
    assert_eq!(device, SPRIG_DEVICE_GPU);
    let mut s = std::ptr::null_mut();
    // SAFETY: live handle, writable out pointer.
    assert_eq!(unsafe { sprig_session_new(m, &mut s) }, SprigStatus::Ok);
    let mut params = sprig_sampling_params_default();
    params.temperature = 0.0;
    params.max_tokens = 252;
    let mut text = String::new();
    let prompt = CString::new("Once upon a time").unwrap();
    // SAFETY: live session, valid prompt/params, a callback that matches the contract and its user data.
    let st = unsafe {
        sprig_session_generate(
            s,
            prompt.as_ptr(),
            &params,
            Some(collect),
            (&mut text as *mut String).cast(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(st, SprigStatus::Ok);
    assert_eq!(format!("Once upon a time{text}").trim_end(), golden.trim_end());
    assert_eq!(sprig_session_free(s), SprigStatus::Ok);
    assert_eq!(sprig_model_free(m), SprigStatus::Ok);

    // AUTO on a machine whose only adapter is a software one resolves to the CPU; with a real GPU to the GPU.
    opts.device = SPRIG_DEVICE_AUTO;
    // SAFETY: as above.
    assert_eq!(unsafe { sprig_model_load(model.as_ptr(), &opts, &mut m) }, SprigStatus::Ok);
    // SAFETY: as above.
    assert_eq!(unsafe { sprig_model_device(m, &mut device) }, SprigStatus::Ok);
    assert!(device == SPRIG_DEVICE_CPU || device == SPRIG_DEVICE_GPU);
    assert_eq!(sprig_model_free(m), SprigStatus::Ok);
}
