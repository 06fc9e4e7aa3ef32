//! The Kotlin library (the whole `android/sprig/src/main` source set: the binding `Sprig.kt` and the Flow
//! adapter `SprigFlow.kt`) compiled with Kotlin 2.4 and run on the host JVM against the host-built libsprig:
//! the JNI layer and the coroutine surface exercised for real (golden text, streaming, cancellation, misuse,
//! chat, Flow collection/cancellation/backpressure/concurrency, resident memory over load/unload cycles).
//!
//! The compiler is the npm package `kotlin-compiler` (the JetBrains distribution, which also carries
//! kotlinx-coroutines): `scripts/test.sh` fetches it into `$SPRIG_CACHE/tools` and sets `SPRIG_KOTLIN_HOME`.

use std::path::PathBuf;
use std::process::Command;

mod common;

/// The Kotlin distribution: `SPRIG_KOTLIN_HOME`, else where scripts/test.sh caches it.
fn kotlin_home() -> PathBuf {
    match std::env::var_os("SPRIG_KOTLIN_HOME") {
        Some(h) => PathBuf::from(h),
        None => sprig_engine::registry::cache_dir().join("tools/kotlin-compiler-2.4.20"),
    }
}

#[test]
fn kotlin_library_on_the_host_jvm() {
    let home = kotlin_home();
    let kotlinc = home.join("bin/kotlinc-jvm");
    let coroutines = home.join("lib/kotlinx-coroutines-core-jvm.jar");
    assert!(
        kotlinc.exists() && coroutines.exists(),
        "no Kotlin compiler at {} (scripts/test.sh fetches it: `npm pack kotlin-compiler@2.4.20`)",
        home.display()
    );
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../../android/sprig/src");
    let kotlin_files = |dir: &str| -> Vec<PathBuf> {
        let dir = src.join(dir).join("kotlin/dev/sprig");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "kt"))
            .collect();
        v.sort();
        v
    };
    let (main, host) = (kotlin_files("main"), kotlin_files("hostTest"));
    assert!(main.iter().any(|p| p.ends_with("SprigFlow.kt")), "{main:?}");
    let tmp = std::env::temp_dir().join(format!("sprig-jvm-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let jar = tmp.join("host-test.jar");
    let out = Command::new(&kotlinc)
        .args(&main)
        .args(&host)
        .arg("-cp")
        .arg(&coroutines)
        .args(["-Werror", "-include-runtime", "-d"])
        .arg(&jar)
        .output()
        .expect("running kotlinc-jvm");
    assert!(out.status.success(), "kotlinc failed:\n{}", String::from_utf8_lossy(&out.stderr));

    let m = common::fixtures().join("stories260K");
    let classpath = std::env::join_paths([&jar, &coroutines]).unwrap();
    // The teacher the escalation checks talk to (a stub endpoint on 127.0.0.1).
    let teacher = sprig_tests::teacher_stub::Stub::start(None);
    // A fixed, pre-touched heap: the RSS check measures native memory, not the heap growing.
    let run = Command::new("java")
        .args(["-Xms64m", "-Xmx64m", "-XX:+AlwaysPreTouch"])
        .arg(format!("-Djava.library.path={}", common::lib_dir().display()))
        .arg("-cp")
        .arg(&classpath)
        .arg("dev.sprig.HostTestKt")
        .arg(m.join("stories260K.bin"))
        .arg(m.join("tok512.bin"))
        .arg(m.join("golden_once_upon_a_time_steps256.txt"))
        .arg(common::chat_model(&tmp))
        .arg(teacher.url())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "JVM test failed ({:?}):\n{stdout}\n{stderr}", run.status);
    assert!(stdout.contains("flow checks done") && stdout.contains("all JVM checks passed"), "{stdout}");
    eprintln!("{stdout}");
    let _ = std::fs::remove_dir_all(&tmp);
}
