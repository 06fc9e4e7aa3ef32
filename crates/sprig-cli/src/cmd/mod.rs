//! One module per command: its arguments and what it does.

pub mod agent_trace;
pub mod bench;
pub mod chat;
pub mod escalation;
pub mod convert;
pub mod devices;
pub mod distill;
pub mod eval;
pub mod gen;
pub mod inspect;
pub mod registry;
pub mod run;
#[cfg(feature = "server")]
pub mod serve;
pub mod structured_bench;
