//! Error types of the engine layer: one enum per concern, variants carry what a reader needs.

use std::path::PathBuf;

/// A GGUF file that cannot be used as a model.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot open model file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, magic: Vec<u8> },
    #[error("{path}: malformed GGUF header: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: tensor {name} has type {ggml_type}, which the kernels do not run (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K do); --allow-f32-weights runs it expanded to f32, slowly")]
    UnsupportedTensorType {
        path: PathBuf,
        name: String,
        ggml_type: String,
    },
    #[error("{path}: missing tensor {name}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "{path} is truncated: tensor {name} needs bytes up to offset {needed}, file has {size}"
    )]
    Truncated {
        path: PathBuf,
        name: String,
        needed: u64,
        size: u64,
    },
    #[error("{path}: missing metadata key {key}")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("{path}: metadata key {key} is invalid: {reason}")]
    BadMetadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: unsupported architecture {arch:?} (supported: llama, gemma3)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: cannot build tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
}

/// Fetching the default model failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed with {status}: {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read wheel {path}: {reason}")]
    Wheel { path: PathBuf, reason: String },
    #[error("{path}: sha256 is {found}, expected {expected}")]
    Checksum {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

/// Why the engine refuses or fails a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("this model's maximum context length is {max_model_len} tokens, but the request has {prompt_tokens} prompt tokens and asks for {max_tokens} more")]
    TooLong {
        prompt_tokens: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    BadTokenId { id: u32, vocab: usize },
    #[error("invalid sampling parameter {param}: {reason}")]
    BadParam { param: &'static str, reason: String },
    #[error("invalid engine setting {setting}: {reason}")]
    BadConfig {
        setting: &'static str,
        reason: String,
    },
    #[error("the waiting queue is full ({waiting} requests waiting)")]
    Overloaded { waiting: usize },
    #[error("request id {0} is already in use")]
    DuplicateId(String),
    #[error("no running request has id {0}")]
    NotFound(String),
    #[error("not enough free KV blocks: the request needs {needed}, {free} are free")]
    NoFreeBlocks { needed: usize, free: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("KV transfer refused: {0}")]
    KvMismatch(String),
    #[error("{0}")]
    KvTransfer(String),
    #[error("internal engine error: {0}")]
    Internal(String),
}
