//! The checked-in C header must be what cbindgen generates from the current source.

use std::path::PathBuf;

#[test]
fn checked_in_header_is_up_to_date() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("run by cargo"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen")
        .write(&mut generated);
    let path = crate_dir.join("include/sprig.h");
    if std::env::var_os("SPRIG_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "include/sprig.h is stale: run `SPRIG_BLESS=1 cargo test -p sprig-ffi --test header` and commit it"
    );
}
