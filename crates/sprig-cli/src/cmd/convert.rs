//! `sprig convert`: a foreign checkpoint into a native file.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use sprig_engine::{with_engine, AnyEngine};
use sprig_format::ModelFile;
use sprig_import::QuantChoice;

use crate::args::{ConvertQuantArg, DeviceArg};

#[derive(Args)]
pub struct ConvertArgs {
    /// Source: llama2.c .bin, .gguf, or Hugging Face directory.
    input: PathBuf,
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// auto | keep | q4 | q4a | q8 | f16 | q4-absmax. auto: a quantized GGUF keeps its precision (re-quantizing
    /// it is an explicit choice); float sources (HF, llama2.c, f32/f16 GGUF) become q4.
    #[arg(long, value_enum, default_value = "auto")]
    quant: ConvertQuantArg,
    /// llama2.c tokenizer.bin.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Calibration text: run the unquantized model over it and weight the quantizer's error by each input
    /// feature's activation energy (activation-aware quantization).
    #[arg(long)]
    calibrate: Option<PathBuf>,
    /// Chunks of 256 tokens of the calibration text to use.
    #[arg(long, default_value_t = 16)]
    calibrate_chunks: usize,
    /// Device the calibration runs on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

/// `--quant auto` of convert: keep a GGUF whose weights are already quantized, else q4.
fn auto_quant(input: &std::path::Path) -> QuantChoice {
    use sprig_quant::ggml::GgmlType;
    let quantized = input.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        && sprig_import::gguf::GgufFile::open(input)
            .is_ok_and(|g| g.tensors.iter().any(|t| !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)));
    if quantized {
        QuantChoice::Keep
    } else {
        QuantChoice::Q4
    }
}

pub fn run(a: ConvertArgs) -> Result<()> {
    let quant = a.quant.0.unwrap_or_else(|| auto_quant(&a.input));
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors").unwrap().progress_chars("=> "),
    );
    let importance = match &a.calibrate {
        Some(text_path) => {
            let text =
                std::fs::read_to_string(text_path).with_context(|| format!("reading {}", text_path.display()))?;
            eprintln!("sprig: calibrating on {}", text_path.display());
            let reference = sprig_import::import(&a.input, a.tokenizer.as_deref(), QuantChoice::Keep, &mut |_, _| {})?;
            let file = Arc::new(ModelFile::from_bytes(&reference.writer.to_bytes())?);
            let e = AnyEngine::new(file, a.device.0, 0, &mut |s| eprintln!("sprig: {s}"))?;
            Some(with_engine!(&e, |e| sprig_engine::calibrate::calibrate(&**e, &text, 256, a.calibrate_chunks))?)
        }
        None => None,
    };
    bar.set_message(format!("converting {}", a.input.display()));
    let opts = sprig_import::ImportOptions { quant, importance: importance.as_ref() };
    let imported = sprig_import::import_with(&a.input, a.tokenizer.as_deref(), &opts, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .with_context(|| format!("converting {}", a.input.display()))?;
    bar.finish_and_clear();
    for l in &imported.losses {
        eprintln!("sprig: {} {} -> {}: relative RMS error {:.2e}", l.name, l.from, l.to, l.rel_rms_error);
    }
    if !imported.losses.is_empty() {
        let worst = imported.losses.iter().map(|l| l.rel_rms_error).fold(0.0, f64::max);
        eprintln!(
            "sprig: {} tensors were not carried over exactly (worst relative RMS error {:.2e})",
            imported.losses.len(),
            worst
        );
    }
    imported.writer.write(&a.output)?;
    // Re-open to validate what was written.
    let f = ModelFile::open(&a.output)?;
    eprintln!(
        "sprig: wrote {} ({:.1} MB, {:.2} bits per weight)",
        a.output.display(),
        f.file_bytes() as f64 / 1e6,
        f.bits_per_weight()
    );
    Ok(())
}

