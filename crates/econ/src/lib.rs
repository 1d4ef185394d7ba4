//! The economics of disaggregation: KV freight per prompt, transfer time per link, and the
//! decision whether splitting prefill from decode pays. Needs only model shapes.

pub mod cli;
pub mod decision;
pub mod link;
pub mod shape;

pub use cli::{run, EconArgs, EconHooks};
pub use shape::{ModelShape, Window};

#[derive(Debug, thiserror::Error)]
pub enum EconError {
    #[error("unknown {kind} {name:?}; known: {known}")]
    UnknownPreset {
        kind: &'static str,
        name: String,
        known: String,
    },
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Hook(String),
}
