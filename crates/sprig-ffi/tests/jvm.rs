//! The Kotlin binding (android/sprig/src/main/kotlin/dev/sprig/Sprig.kt) compiled with the host's kotlinc and
//! run on the host JVM against the host-built libsprig: the JNI layer exercised for real (golden text,
//! streaming, cancellation, misuse, chat, RSS over 100 load/unload cycles). Needs `kotlinc` and `java`
//! (Debian: `apt-get install kotlin`, which scripts/test.sh does).

use std::path::PathBuf;
use std::process::Command;

mod common;

#[test]
fn kotlin_binding_on_the_host_jvm() {
    let android = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../android/sprig/src");
    let tmp = std::env::temp_dir().join(format!("sprig-jvm-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let jar = tmp.join("host-test.jar");
    let out = Command::new("kotlinc")
        .arg(android.join("main/kotlin/dev/sprig/Sprig.kt"))
        .arg(android.join("hostTest/kotlin/dev/sprig/HostTest.kt"))
        .args(["-include-runtime", "-nowarn", "-d"])
        .arg(&jar)
        .output()
        .expect("kotlinc not found: install Debian's `kotlin` package (scripts/test.sh does)");
    assert!(out.status.success(), "kotlinc failed:\n{}", String::from_utf8_lossy(&out.stderr));

    let m = common::fixtures().join("stories260K");
    let run = Command::new("java")
        .arg(format!("-Djava.library.path={}", common::lib_dir().display()))
        .arg("-cp")
        .arg(&jar)
        .arg("dev.sprig.HostTestKt")
        .arg(m.join("stories260K.bin"))
        .arg(m.join("tok512.bin"))
        .arg(m.join("golden_once_upon_a_time_steps256.txt"))
        .arg(common::chat_model(&tmp))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "JVM test failed ({:?}):\n{stdout}\n{stderr}", run.status);
    assert!(stdout.contains("all JVM checks passed"), "{stdout}");
    eprintln!("{stdout}");
    let _ = std::fs::remove_dir_all(&tmp);
}
