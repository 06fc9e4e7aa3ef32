//! Helpers of the CLI test files: run the `sprig` binary, find the committed fixtures (tests/data).
#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::process::Command;

pub fn sprig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sprig"))
}

pub fn fixture(p: &str) -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../../tests/data").join(p)
}

pub fn run_ok(args: &[&str]) -> (String, String) {
    let out = sprig().args(args).output().unwrap();
    let (so, se) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "sprig {args:?} failed: {se}");
    (so, se)
}

/// Fails with exit code 1 and exactly one line on stderr, no backtrace.
pub fn run_err(args: &[&str]) -> String {
    let out = sprig().args(args).env("RUST_BACKTRACE", "1").output().unwrap();
    let se = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "sprig {args:?}: {se}");
    assert_eq!(se.trim_end().lines().count(), 1, "one line expected: {se}");
    assert!(se.starts_with("sprig: error: ") && !se.contains("panicked") && !se.contains("backtrace"), "{se}");
    se
}
