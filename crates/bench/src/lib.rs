//! Benchmarks: a load generator for OpenAI-compatible servers and its statistics.

pub mod load;
pub mod plot;
pub mod stats;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad benchmark configuration: {0}")]
    Config(String),
    #[error("HTTP: {0}")]
    Http(String),
}
