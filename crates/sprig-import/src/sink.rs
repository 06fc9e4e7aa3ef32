//! Where importers put tensors: applies the user's quantization choice uniformly.

use half::{bf16, f16};
use sprig_format::ContainerWriter;
use sprig_quant::ggml::{self, GgmlType};
use sprig_quant::quantize::{quantize, quantize_with_importance};
use sprig_quant::Scheme;

/// `--quant` of `sprig convert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantChoice {
    /// Keep the source's precision: float tensors stay float, GGUF quantized tensors map to native schemes.
    Keep,
    F16,
    Q4,
    Q4A,
    Q8,
    /// int4 with GGUF's reference Q4_0 algorithm (absmax, no search); for measuring what the search buys.
    Q4Absmax,
}

impl QuantChoice {
    pub const ALL: [QuantChoice; 6] = [
        QuantChoice::Keep,
        QuantChoice::F16,
        QuantChoice::Q4,
        QuantChoice::Q4A,
        QuantChoice::Q8,
        QuantChoice::Q4Absmax,
    ];
    /// The name `--quant` takes.
    pub fn name(self) -> &'static str {
        match self {
            QuantChoice::Keep => "keep",
            QuantChoice::F16 => "f16",
            QuantChoice::Q4 => "q4",
            QuantChoice::Q4A => "q4a",
            QuantChoice::Q8 => "q8",
            QuantChoice::Q4Absmax => "q4-absmax",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|q| q.name() == s)
    }
    fn scheme(self) -> Option<Scheme> {
        match self {
            QuantChoice::Q4 => Some(Scheme::Q4),
            QuantChoice::Q4A => Some(Scheme::Q4A),
            QuantChoice::Q8 => Some(Scheme::Q8),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorLoss {
    pub name: String,
    pub from: String,
    pub to: String,
    /// Relative RMS error of the stored weights against the source's.
    pub rel_rms_error: f64,
}

/// Per-weight input importance (mean squared activation per input feature), from calibration.
pub type Importance = std::collections::HashMap<String, Vec<f32>>;

pub(crate) struct Sink<'a> {
    pub writer: ContainerWriter,
    pub quant: QuantChoice,
    pub losses: Vec<TensorLoss>,
    pub importance: Option<&'a Importance>,
}

impl Sink<'_> {
    /// The choice that applies to tensor `name`: the int4 choices store the embedding and output as int8; MoE
    /// routers (and Qwen-MoE's shared-expert gate) stay in float: they are tiny, and an error in them flips
    /// which experts run.
    fn quant_for(&self, name: &str) -> QuantChoice {
        if name.contains("ffn_gate_inp") {
            return QuantChoice::Keep;
        }
        let head = name == "token_embd.weight" || name == "output.weight";
        match self.quant {
            QuantChoice::Q4 | QuantChoice::Q4A | QuantChoice::Q4Absmax if head => QuantChoice::Q8,
            q => q,
        }
    }

    /// Adds an f32 tensor: 2-D matrices follow the quant choice, vectors stay f32. With the int4 choices the
    /// embedding and output matrices are stored as int8 (as llama.cpp keeps them at 6-8 bits in its 4-bit
    /// files): they are a small share of the bytes of any but the tiniest model and carry most of the error.
    pub fn add_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) {
        let matrix = shape.len() == 2;
        match (matrix, self.quant_for(name)) {
            (true, QuantChoice::Q4Absmax) => {
                self.writer.add_quant(name, &sprig_quant::quantize::quantize_absmax_q4(data, shape[0], shape[1]))
            }
            (true, QuantChoice::F16) => {
                let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
                self.writer.add_f16(name, shape, &h)
            }
            (true, q) if q.scheme().is_some() => {
                let imp =
                    self.importance.and_then(|m| m.get(name)).filter(|v| v.len() == shape[1]).map(|v| v.as_slice());
                self.writer
                    .add_quant(name, &quantize_with_importance(data, shape[0], shape[1], q.scheme().unwrap(), imp))
            }
            _ => self.writer.add_f32(name, shape, data),
        }
    }

    /// Adds a GGUF tensor given in its own type (rows x cols, row-major).
    pub fn add_ggml(&mut self, name: &str, ty: GgmlType, shape: &[usize], data: &[u8]) {
        let n: usize = shape.iter().product();
        let keep = self.quant == QuantChoice::Keep;
        match ty {
            GgmlType::F16 if keep => self.writer.add_f16(name, shape, bytemuck::cast_slice(&to_aligned::<f16>(data))),
            GgmlType::BF16 if keep => {
                self.writer.add_bf16(name, shape, bytemuck::cast_slice(&to_aligned::<bf16>(data)))
            }
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let mut f = vec![0.0; n];
                ggml::dequantize(ty, data, &mut f);
                self.add_f32(name, shape, &f)
            }
            _ if keep && shape.len() == 2 => {
                let m = ggml::to_native(ty, data, shape[0], shape[1]).expect("quantized type");
                if let Some(e) = m.rel_rms_error {
                    self.losses.push(TensorLoss {
                        name: name.into(),
                        from: ty.name().into(),
                        to: m.matrix.scheme.unwrap().name().into(),
                        rel_rms_error: e,
                    });
                }
                self.writer.add_quant(name, &m.matrix)
            }
            _ => {
                // Requantizing (or a quantized vector): go through f32 and report the loss against the source.
                let mut f = vec![0.0; n];
                ggml::dequantize(ty, data, &mut f);
                self.add_f32(name, shape, &f);
                let scheme = self.quant_for(name).scheme();
                if let (Some(s), 2) = (scheme, shape.len()) {
                    let back = quantize(&f, shape[0], shape[1], s).view().dequantize();
                    self.losses.push(TensorLoss {
                        name: name.into(),
                        from: ty.name().into(),
                        to: s.name().into(),
                        rel_rms_error: ggml::rel_rms(&f, &back),
                    });
                }
            }
        }
    }
}

fn to_aligned<T: bytemuck::Pod + bytemuck::Zeroable>(bytes: &[u8]) -> Vec<T> {
    let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
    bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
    v
}
