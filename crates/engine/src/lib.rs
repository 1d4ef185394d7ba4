//! splitserve's engine: a Llama-family GGUF model over a paged KV cache, with continuous
//! batching and chunked prefill, batch- and chunk-invariant to the bit.
//!
//! Public surface: load a [`Model`], start an [`Engine`], submit [`Request`]s and read
//! [`Event`]s. Everything else is private.

mod engine;
mod error;
mod gguf;
mod kernels;
mod kv_cache;
mod model;
pub mod model_file;
pub mod prefix_cache;
mod sampler;
mod scheduler;
mod spm;
pub mod synthetic;
mod tokenizer;

pub use engine::{
    ComputePriority, CpuList, Engine, EngineConfig, EngineStats, Event, FinishReason, Finished,
    HeldKv, KvConnector, KvImport, KvTransfer, LiveState, LoadFailurePolicy, LoadTarget, Migration,
    Parked, RemoteFirst, RemoteKv, Request, RequestInfo, SavedBlock, StatsSnapshot, StepHook,
    StepInfo, TokenOut,
};
pub use error::{EngineError, FetchError, GgufError};
pub use gguf::{inspect, ModelConfig, SlidingWindow};
pub use kernels::quant::int8_peak;
pub use kv_cache::{KvDtype, KvLayout, PageMapping};
pub use model::{LoadOptions, Model};
pub use sampler::{argmax, Sampler, SamplingParams};
pub use scheduler::RequestState;
pub use tokenizer::{load_tokenizer, ChatMessage, IncrementalDecoder, Tokenizer};
