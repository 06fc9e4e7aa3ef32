//! `sprig inspect`: a model's config, tensors, metadata and KV-cache size.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use sprig_engine::{open_model_file, registry, LoadOptions};
use sprig_import::QuantChoice;

#[derive(Args)]
pub struct InspectArgs {
    file: PathBuf,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Also print KV-cache bytes per layer kind at this context length.
    #[arg(long)]
    kv: Option<usize>,
    /// Also print what the model needs in memory with one session (at --kv tokens, or its own context), and
    /// what this system has available.
    #[arg(long)]
    memory: bool,
    /// How the KV cache stores keys and values (for --kv and --memory).
    #[arg(long = "kv-type", value_enum, default_value = "f32")]
    kv_type: crate::args::KvArg,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let path = registry::resolve(&a.file, &mut |s| eprintln!("sprig: {s}"))?;
    let f = open_model_file(&path, &LoadOptions { tokenizer: a.tokenizer.clone(), quant: QuantChoice::Keep })?;
    let c = &f.config;
    println!("architecture: {}", c.arch);
    println!("config: {}", serde_json::to_string(c)?);
    println!("file bytes: {}", f.file_bytes());
    println!("bits per weight: {:.3}", f.bits_per_weight());
    println!("\n{:<40} {:>6} {:>16} {:>12} {:>6}", "tensor", "type", "shape", "bytes", "rows");
    let mut total = 0;
    for (name, e) in f.entries() {
        let rows = e.layout().map_or("", |l| l.name());
        println!("{:<40} {:>6} {:>16} {:>12} {:>6}", name, e.type_name(), format!("{:?}", e.shape()), e.bytes(), rows);
        total += e.bytes();
    }
    println!("{:<40} {:>6} {:>16} {:>12}", "total", "", "", total);
    println!("\nmetadata:");
    for (k, v) in &f.metadata {
        let shown: String = if v.len() > 120 {
            format!("{}... ({} bytes)", &v[..v.floor_char_boundary(120)], v.len())
        } else {
            v.clone()
        };
        println!("  {k}: {}", shown.replace('\n', "\\n"));
    }
    if a.memory {
        let need = sprig_engine::memory::MemoryNeed::of(&f, a.kv.unwrap_or(0), a.kv_type.0);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!("\nmemory with one session of {} tokens:", a.kv.unwrap_or(c.max_seq_len));
        println!("  weights (mapped): {:.1} MiB", mib(need.weights));
        let with_head = if c.mtp.is_some() { ", MTP head's included" } else { "" };
        println!("  KV cache ({}{with_head}):    {:.1} MiB", a.kv_type.0.name(), mib(need.kv_cache));
        println!("  scratch:          {:.1} MiB", mib(need.scratch));
        println!("  total:            {:.1} MiB", mib(need.total()));
        match sprig_engine::memory::available() {
            Some(av) => println!("  available now:    {:.1} MiB", mib(av)),
            None => println!("  available now:    unknown"),
        }
    }
    if let Some(ctx) = a.kv {
        let layout = sprig_backend::KvLayout::for_model(c, ctx).with_dtype(a.kv_type.0);
        let per = layout.bytes_per_layer(ctx);
        let global_all = layout.bytes_per_position() as usize * ctx * c.n_layers;
        println!("\nKV cache at {ctx} tokens ({}):", a.kv_type.0.name());
        let (mut g, mut s, mut ng, mut ns) = (0, 0, 0, 0);
        for (l, b) in per.iter().enumerate() {
            if layout.windows[l].is_some() {
                s += b;
                ns += 1
            } else {
                g += b;
                ng += 1
            }
        }
        println!("  global layers: {ng}, {g} bytes");
        println!("  sliding-window layers: {ns}, {s} bytes");
        println!(
            "  total: {} bytes ({:.3} of an all-global model's {global_all})",
            g + s,
            (g + s) as f64 / global_all as f64
        );
    }
    Ok(())
}

