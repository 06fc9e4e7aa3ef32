//! Quantization for sprig: the native block schemes, the error-minimising quantizer, decoding of GGUF
//! block types, and the CPU integer dot-product kernels (scalar, AVX2, AVX-512 VNNI, NEON) that the
//! CPU backend runs straight from the memory-mapped weights.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod activation;
pub mod ggml;
pub mod kernels;
pub mod quantize;
pub mod scheme;

pub use activation::QuantizedActivations;
pub use scheme::{QMatrix, Scheme, BLOCK};
