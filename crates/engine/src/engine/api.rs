//! The engine's public types: its settings, a request and how its KV arrives, the events a
//! request's stream carries, and the counters a handle reads.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ComputePriority, CpuList, RemoteKv};
use crate::error::EngineError;
use crate::kv_cache::{KvDtype, KvLayout};
use crate::sampler::{Sampler, SamplingParams};

/// Engine settings (vLLM flag names in the CLI).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    pub kv_dtype: KvDtype,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_chunked_prefill: bool,
    /// Cap per step on the chunk of a prompt longer than this (0: none).
    pub long_prefill_token_threshold: usize,
    /// Prompts over the threshold prefilled at once (at least 1).
    pub max_long_partial_prefills: usize,
    /// `None`: the model's context length, capped by the pool's capacity.
    pub max_model_len: Option<usize>,
    /// Requests allowed to wait before new ones are refused as overloaded.
    pub max_waiting: usize,
    /// Worker threads for this engine's kernels (`None`: one per CPU of `cpu_bind`, else
    /// rayon's default).
    pub threads: Option<usize>,
    /// Scheduling class of those threads.
    pub compute_priority: ComputePriority,
    /// CPUs for those threads, one each in turn (empty: wherever the OS puts them).
    pub cpu_bind: CpuList,
    /// How long a producer holds a finished request's blocks for a consumer to take.
    pub kv_hold_timeout: Duration,
    /// What a failed KV load does to its request (consumer role).
    pub kv_load_failure_policy: LoadFailurePolicy,
    /// Reuse the KV of cached full blocks for prompts that start with the same tokens.
    pub enable_prefix_caching: bool,
    /// What block hashes are rooted in: the model fingerprint (empty: the model's shape and
    /// the KV layout, enough within one process; set it to the file's fingerprint wherever
    /// hashes meet another process's).
    pub prefix_cache_identity: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 2048,
            kv_dtype: KvDtype::F16,
            max_num_seqs: 16,
            max_num_batched_tokens: 512,
            enable_chunked_prefill: true,
            long_prefill_token_threshold: 0,
            max_long_partial_prefills: 1,
            max_model_len: None,
            max_waiting: 256,
            threads: None,
            compute_priority: ComputePriority::Normal,
            cpu_bind: CpuList::default(),
            kv_hold_timeout: Duration::from_secs(30),
            kv_load_failure_policy: LoadFailurePolicy::Fail,
            enable_prefix_caching: true,
            prefix_cache_identity: String::new(),
        }
    }
}

/// What a failed KV load does to its request (vLLM's `kv_load_failure_policy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadFailurePolicy {
    /// The request fails with the connector's error.
    #[default]
    Fail,
    /// The engine computes the prompt itself, as if no KV had been offered.
    Recompute,
}

/// A request for the engine: token ids in, tokens out.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Return the full logits vector with every token (tests of the invariance).
    pub return_logits: bool,
    /// Whether its KV leaves for, or arrives from, another engine.
    pub kv: KvTransfer,
    /// Requests share cached prefix blocks only with requests of the same salt (vLLM's
    /// `cache_salt`: tenants that must not observe each other's cache give different ones).
    pub cache_salt: Option<String>,
    /// The last this many tokens of `prompt` are this request's output so far (it continues
    /// a run that stopped elsewhere): they count as completion tokens, are not sent again,
    /// and a seeded sampler continues from that position, so the rest equals an
    /// uninterrupted run.
    pub resumed: usize,
}

/// The KV side of disaggregation, as the engine sees it.
#[derive(Debug, Clone)]
pub enum KvTransfer {
    None,
    /// Producer: when the request finishes, hold its blocks for [`Engine::export_held`].
    Hold,
    /// Consumer: the prompt's KV computed elsewhere; prefill never runs here.
    Import(Box<KvImport>),
    /// Consumer: the prompt's KV waits remotely; the engine's connector loads it into the
    /// request's blocks (WAITING_FOR_REMOTE_KVS) while other requests keep stepping.
    Remote(RemoteKv),
}

/// A request's KV and sampling state as it leaves one engine for another.
#[derive(Debug, Clone)]
pub struct KvImport {
    pub layout: KvLayout,
    /// Tokens whose K and V are in `layers` (the prompt).
    pub n_tokens: usize,
    /// Per layer, each block's K bytes then V bytes, blocks in position order (a windowed
    /// layer's only from the block its window starts at: `KvLayout::layer_blocks`).
    pub layers: Vec<Vec<u8>>,
    /// Tokens already generated remotely (the producer's first token).
    pub generated: Vec<u32>,
    /// The sampler after those tokens (RNG state travels with the request).
    pub sampler: Sampler,
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// One generated token.
#[derive(Debug, Clone)]
pub struct TokenOut {
    pub token: u32,
    /// New text (may be empty while a multi-byte character is incomplete).
    pub text: String,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
    pub logits: Option<Vec<f32>>,
}

/// The end of a request.
#[derive(Debug, Clone)]
pub struct Finished {
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Time spent waiting before the first step that computed it.
    pub queue_time: Duration,
    /// Set when the engine failed (the reason is then `Abort`).
    pub error: Option<EngineError>,
    /// Prompt tokens whose KV came from the prefix cache when it was first scheduled.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone)]
pub enum Event {
    Token(TokenOut),
    Finished(Finished),
}

/// Counters shared with the handle (read by metrics and the router).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub free_blocks: AtomicUsize,
    pub total_blocks: AtomicUsize,
    /// Slots for the windowed layers' values (0 and 0 without such layers).
    pub free_window_slots: AtomicUsize,
    pub total_window_slots: AtomicUsize,
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub prompt_tokens_computed: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub steps: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and of those the tokens found.
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    /// Failed KV loads whose requests were computed here instead.
    pub load_failures_recomputed: AtomicU64,
}

/// A point-in-time copy of [`EngineStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub free_blocks: usize,
    pub total_blocks: usize,
    pub free_window_slots: usize,
    pub total_window_slots: usize,
    pub running: usize,
    pub waiting: usize,
    pub prompt_tokens_computed: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    pub steps: u64,
    pub held_blocks: usize,
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    pub load_failures_recomputed: u64,
}

/// Timing of one step, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    pub duration: Duration,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
}

pub type StepHook = Arc<dyn Fn(StepInfo) + Send + Sync>;
