//! Compiles `tests/c/api_test.c` with the system C compiler against the checked-in header, links it with the
//! host-built `libsprig.so`, and runs it on stories260K (golden text) and a generated chat model; the C program
//! also exercises every error path of the API, and escalation against a stub teacher endpoint.

use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{chat_model, fixtures, lib_dir};

#[test]
fn c_program_runs_the_golden_text_and_every_error_path() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"));
    let tmp = std::env::temp_dir().join(format!("sprig-c-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let exe = tmp.join("api_test");
    let lib = lib_dir();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-D_DEFAULT_SOURCE", "-o"])
        .arg(&exe)
        .arg(crate_dir.join("tests/c/api_test.c"))
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lsprig", "-lpthread", "-lm"])
        .output()
        .unwrap_or_else(|e| panic!("running {cc}: {e}"));
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));

    // The teacher the escalation checks talk to (a stub endpoint on 127.0.0.1).
    let teacher = sprig_tests::teacher_stub::Stub::start(None);
    let m = fixtures().join("stories260K");
    let run = Command::new(&exe)
        .arg(m.join("stories260K.bin"))
        .arg(m.join("tok512.bin"))
        .arg(m.join("golden_once_upon_a_time_steps256.txt"))
        .arg(chat_model(&tmp))
        .arg(teacher.url())
        // `cargo test` puts its own target/debug/deps on LD_LIBRARY_PATH, which beats the program's RUNPATH: that
        // libsprig.so may be one built with other features (e.g. `wgpu`). Load the one linked against.
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "C API test failed ({:?}):\n{stderr}", run.status);
    assert!(String::from_utf8_lossy(&run.stdout).contains("all C API checks passed"));
    let _ = std::fs::remove_dir_all(&tmp);
}
