//! The engine: a thread that owns the model and the KV cache and runs the step loop; a
//! cloneable handle to submit requests, abort them and read counters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::EngineError;
use crate::kv_cache::{KvCache, KvDtype, KvLayout, Q8_GROUP};
use crate::model::{Model, SeqChunk};
use crate::prefix_cache::{self, BlockHash};
use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::{schedule, RequestState, Schedulable, SchedulerConfig};
use crate::tokenizer::IncrementalDecoder;

mod connector;
mod migrate;
mod placement;
use connector::Lease;
pub use connector::{HeldKv, KvConnector, LoadTarget, RemoteFirst, RemoteKv, SavedBlock};
use migrate::PendingPark;
pub use migrate::{LiveState, Migration, Parked, RequestInfo};
pub use placement::{ComputePriority, CpuList};
use tokio::sync::oneshot;

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
    /// Per layer, each block's K bytes then V bytes, blocks in position order.
    pub layers: Vec<Vec<u8>>,
    /// Tokens already generated remotely (the producer's first token).
    pub generated: Vec<u32>,
    /// The sampler after those tokens (RNG state travels with the request).
    pub sampler: Sampler,
}

struct Held {
    since: Instant,
    blocks: Vec<u32>,
    n_tokens: usize,
    generated: Vec<u32>,
    sampler: Sampler,
}

/// Producer: finished requests' KV waiting for its reader, shared with the engine's handles
/// so that a reader's lease never waits for the engine thread to finish a step (a long
/// prefill step would otherwise delay every pull by up to its length).
#[derive(Default)]
struct Holds {
    map: std::sync::Mutex<std::collections::HashMap<String, Held>>,
    /// Held blocks lent to readers, until they come back.
    lent: AtomicUsize,
}

impl Holds {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Held>> {
        // A panic while holding the lock cannot leave the map half-updated: every critical
        // section is a single insert, remove or scan.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn blocks(&self) -> usize {
        self.map().values().map(|h| h.blocks.len()).sum::<usize>()
            + self.lent.load(Ordering::Relaxed)
    }
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

enum Command {
    Add(Box<Seq>, Option<Box<KvImport>>),
    AddRemote(Box<Seq>, RemoteKv),
    /// A connector finished (or failed) loading a request's KV into its lent blocks.
    Loaded {
        id: String,
        blocks: Vec<u32>,
        result: Box<Result<RemoteFirst, String>>,
    },
    /// A reader gave back a held request's blocks.
    Returned(String, Vec<u32>),
    /// The last handle is gone: finish what runs, then stop.
    Stop,
    Abort(String),
    ReleaseHeld(String),
    Export(String, mpsc::Sender<Result<KvImport, EngineError>>),
    Park(PendingPark),
    Unpark(String, bool),
    Adopt(
        Box<Migration>,
        oneshot::Sender<Result<UnboundedReceiver<Event>, EngineError>>,
    ),
    List(oneshot::Sender<Vec<RequestInfo>>),
}

/// A cloneable handle to a running engine; the engine stops when every handle is dropped.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Command>,
    _stop: Arc<StopOnDrop>,
    stats: Arc<EngineStats>,
    holds: Arc<Holds>,
    kv_mem: Arc<crate::kv_cache::Memory>,
    model: Arc<Model>,
    max_model_len: usize,
    max_waiting: usize,
    layout: KvLayout,
    prefix_identity: Arc<str>,
}

/// Tells the engine thread to stop when the last handle is dropped (the thread keeps a
/// sender of its own for returning leases, so the channel alone never disconnects).
struct StopOnDrop(mpsc::Sender<Command>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Command::Stop);
    }
}

struct Seq {
    id: String,
    prompt_len: usize,
    tokens: Vec<u32>,
    num_computed: usize,
    blocks: Vec<u32>,
    params: SamplingParams,
    sampler: Sampler,
    return_logits: bool,
    hold: bool,
    state: RequestState,
    tx: UnboundedSender<Event>,
    detok: IncrementalDecoder,
    text: String,
    sent: usize,
    arrived: Instant,
    first_scheduled: Option<Instant>,
    /// Prefix caching: the hash root (identity and salt), the hashes of full blocks so far,
    /// how many of its blocks are registered, and the tokens the cache gave it.
    cache: SeqCache,
}

struct SeqCache {
    /// `None`: this request's blocks are never shared (e.g. it came by migration, without
    /// its salt).
    root: Option<BlockHash>,
    block_size: usize,
    hashes: Vec<BlockHash>,
    registered: usize,
    cached_tokens: Option<usize>,
}

impl SeqCache {
    fn new(root: Option<BlockHash>, block_size: usize) -> Self {
        Self {
            root,
            block_size,
            hashes: Vec::new(),
            registered: 0,
            cached_tokens: None,
        }
    }
}

impl Schedulable for Seq {
    fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
    fn num_computed(&self) -> usize {
        self.num_computed
    }
    fn blocks(&mut self) -> &mut Vec<u32> {
        &mut self.blocks
    }
    fn set_state(&mut self, s: RequestState) {
        self.state = s;
    }
    fn reset_computed(&mut self) {
        self.num_computed = 0;
        self.cache.registered = 0;
    }
    fn block_hashes(&mut self) -> &[BlockHash] {
        let c = &mut self.cache;
        match &c.root {
            Some(root) => {
                prefix_cache::extend(root, &self.tokens, c.block_size, &mut c.hashes);
                &c.hashes
            }
            None => &[],
        }
    }
    fn set_cached(&mut self, tokens: usize) {
        self.num_computed = tokens;
        self.cache.cached_tokens.get_or_insert(tokens);
    }
}

impl Seq {
    fn completion_tokens(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

static SEED_COUNTER: AtomicU64 = AtomicU64::new(0);

fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ SEED_COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Engine {
    /// Starts the engine thread.
    pub fn start(
        model: Arc<Model>,
        cfg: EngineConfig,
        on_step: Option<StepHook>,
    ) -> Result<Self, EngineError> {
        Self::start_with(model, cfg, on_step, None)
    }

    /// Starts the engine thread with a KV connector for requests whose KV waits remotely.
    pub fn start_with(
        model: Arc<Model>,
        cfg: EngineConfig,
        on_step: Option<StepHook>,
        connector: Option<Arc<dyn KvConnector>>,
    ) -> Result<Self, EngineError> {
        let capacity = cfg.num_blocks * cfg.block_size;
        let max_model_len = cfg
            .max_model_len
            .unwrap_or_else(|| model.config.context_length.min(capacity));
        let bad = |setting, reason: String| Err(EngineError::BadConfig { setting, reason });
        if cfg.block_size == 0 || cfg.num_blocks == 0 {
            return bad(
                "block_size",
                "block size and pool size must be positive".into(),
            );
        }
        if cfg.kv_dtype == KvDtype::Q8_0 && !model.config.head_dim.is_multiple_of(Q8_GROUP) {
            return bad(
                "kv_cache_dtype",
                format!(
                    "q8_0 stores groups of {Q8_GROUP} values; this model's head_dim {} is not a multiple",
                    model.config.head_dim
                ),
            );
        }
        if max_model_len > model.max_positions() {
            return bad(
                "max_model_len",
                format!(
                    "{max_model_len} exceeds the model's context length {}",
                    model.max_positions()
                ),
            );
        }
        if max_model_len > capacity {
            return bad(
                "max_model_len",
                format!("{max_model_len} tokens do not fit in the KV pool ({} blocks of {} = {capacity} tokens)", cfg.num_blocks, cfg.block_size),
            );
        }
        if cfg.max_num_batched_tokens == 0 || cfg.max_num_seqs == 0 {
            return bad(
                "max_num_batched_tokens",
                "budget and max_num_seqs must be positive".into(),
            );
        }
        let layout = KvLayout::for_model(&model.config, cfg.block_size, cfg.kv_dtype);
        let stats = Arc::new(EngineStats::default());
        stats.free_blocks.store(cfg.num_blocks, Ordering::Relaxed);
        stats.total_blocks.store(cfg.num_blocks, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let cpus = cfg.cpu_bind.0.clone();
        if let Some(allowed) = placement::allowed_cpus() {
            if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
                return bad(
                    "cpu_bind",
                    format!(
                        "CPU {c} is not one this process may use (it may use {})",
                        CpuList(allowed)
                    ),
                );
            }
        }
        // A class or binding of our own needs threads of our own (0: rayon's count).
        let prio = cfg.compute_priority;
        let pool = if cfg.threads.is_some() || prio != ComputePriority::Normal || !cpus.is_empty() {
            let warned = Arc::new(std::sync::Once::new());
            let n = cfg.threads.unwrap_or(cpus.len());
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .start_handler(move |i| {
                        let mut failed = Vec::new();
                        if let Some(&c) = cpus.get(i % cpus.len().max(1)) {
                            if let Err(e) = placement::bind(c) {
                                failed.push(format!("binding to CPU {c}: {e}"));
                            }
                        }
                        if let Err(e) = placement::apply_priority(prio) {
                            failed.push(format!("priority {prio}: {e}"));
                        }
                        if !failed.is_empty() {
                            warned.call_once(|| {
                                tracing::warn!(problems = %failed.join("; "), "compute threads not placed as asked; the OS places them");
                            });
                        }
                    })
                    .build()
                    .map_err(|e| EngineError::Internal(e.to_string()))?,
            )
        } else {
            None
        };
        let holds = Arc::new(Holds::default());
        let mut core = Core {
            model: model.clone(),
            cache: {
                let mut c = KvCache::new(layout, cfg.num_blocks);
                c.set_prefix_caching(cfg.enable_prefix_caching);
                c
            },
            sched: SchedulerConfig {
                max_num_seqs: cfg.max_num_seqs,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                enable_chunked_prefill: cfg.enable_chunked_prefill,
                long_prefill_token_threshold: cfg.long_prefill_token_threshold,
                max_long_partial_prefills: cfg.max_long_partial_prefills,
                block_size: cfg.block_size,
            },
            running: Vec::new(),
            waiting: VecDeque::new(),
            stats: stats.clone(),
            max_model_len,
            on_step,
            holds: holds.clone(),
            hold_timeout: cfg.kv_hold_timeout,
            load_failure: cfg.kv_load_failure_policy,
            parked: Default::default(),
            pending_parks: Vec::new(),
            connector,
            back: tx.clone(),
            remote_waiting: VecDeque::new(),
            loading: Default::default(),
            stopping: false,
        };
        let kv_mem = core.cache.mem.clone();
        std::thread::Builder::new()
            .name("splitserve-engine".into())
            .spawn(move || match pool {
                Some(p) => p.install(|| core.run(rx)),
                None => core.run(rx),
            })
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let prefix_identity: Arc<str> = if cfg.prefix_cache_identity.is_empty() {
            format!("{:?} {:?}", model.config, layout).into()
        } else {
            cfg.prefix_cache_identity.as_str().into()
        };
        Ok(Self {
            _stop: Arc::new(StopOnDrop(tx.clone())),
            tx,
            stats,
            holds,
            kv_mem,
            model,
            max_model_len,
            max_waiting: cfg.max_waiting,
            layout,
            prefix_identity,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    /// Checks a request without submitting it.
    pub fn validate(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        params.validate()?;
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadTokenId { id, vocab });
        }
        if prompt.len() + params.max_tokens > self.max_model_len {
            return Err(EngineError::TooLong {
                prompt_tokens: prompt.len(),
                max_tokens: params.max_tokens,
                max_model_len: self.max_model_len,
            });
        }
        Ok(())
    }

    /// Queues a request; its tokens arrive on the returned channel. Dropping the receiver
    /// aborts the request and frees its blocks.
    pub fn submit(&self, req: Request) -> Result<UnboundedReceiver<Event>, EngineError> {
        if req.resumed > 0
            && (req.resumed >= req.prompt.len() || req.resumed >= req.params.max_tokens)
        {
            return Err(EngineError::BadParam {
                param: "resume_tokens",
                reason: format!(
                    "{} output tokens to resume from: fewer than the prompt's {} tokens and than max_tokens {} are needed",
                    req.resumed,
                    req.prompt.len(),
                    req.params.max_tokens
                ),
            });
        }
        self.validate(&req.prompt[..req.prompt.len() - req.resumed], &req.params)?;
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadTokenId { id, vocab });
        }
        let waiting = self.stats.waiting.load(Ordering::Relaxed);
        if waiting >= self.max_waiting {
            return Err(EngineError::Overloaded { waiting });
        }
        let (tx, rx) = unbounded_channel();
        let seed = req.params.seed.unwrap_or_else(fresh_seed);
        let prompt_len = req.prompt.len() - req.resumed;
        let mut sampler = Sampler::new(seed);
        if req.params.temperature > 0.0 {
            // One draw per sampled token (greedy draws none).
            sampler.skip(req.resumed as u64);
        }
        let mut seq = Seq {
            id: req.id,
            prompt_len,
            tokens: req.prompt,
            num_computed: 0,
            blocks: Vec::new(),
            sampler,
            params: req.params,
            return_logits: req.return_logits,
            hold: matches!(req.kv, KvTransfer::Hold),
            state: RequestState::Waiting,
            tx,
            detok: IncrementalDecoder::default(),
            text: String::new(),
            sent: 0,
            arrived: Instant::now(),
            first_scheduled: None,
            cache: SeqCache::new(
                Some(prefix_cache::root(
                    &self.prefix_identity,
                    req.cache_salt.as_deref(),
                )),
                self.layout.block_size,
            ),
        };
        if req.resumed > 0 {
            // The text so far, decoded step by step as the interrupted run did, so that the
            // next deltas are the ones it would have sent.
            let tok = &self.model.tokenizer;
            for n in 1..=req.resumed {
                let delta = seq.detok.step(tok, &seq.tokens[prompt_len..prompt_len + n]);
                seq.text.push_str(&delta);
            }
            seq.sent = seq.text.len();
        }
        // Counted here so that a burst of submissions sees the queue grow at once.
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let cmd = match req.kv {
            KvTransfer::Import(i) => Command::Add(Box::new(seq), Some(i)),
            KvTransfer::Remote(r) => Command::AddRemote(Box::new(seq), r),
            _ => Command::Add(Box::new(seq), None),
        };
        self.tx.send(cmd).map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    /// Takes the KV a finished `Hold` request left behind; its blocks are freed.
    pub fn export_held(&self, id: &str) -> Result<KvImport, EngineError> {
        self.ask_blocking(|tx| Command::Export(id.to_string(), tx))?
    }

    /// Lends the KV a finished `Hold` request left behind to a reader, without copying;
    /// dropping the returned [`HeldKv`] frees its blocks.
    pub fn lease_held(&self, id: &str) -> Result<HeldKv, EngineError> {
        // Counted as lent before the map's lock is released, so the held-blocks gauge (map
        // plus lent) never misses them in between.
        let mut map = self.holds.map();
        let h = map
            .remove(id)
            .ok_or_else(|| EngineError::KvMismatch(format!("no KV held for request {id}")))?;
        self.holds.lent.fetch_add(h.blocks.len(), Ordering::Relaxed);
        drop(map);
        let lease = Lease::new(
            self.kv_mem.clone(),
            h.blocks,
            id.to_string(),
            self.tx.clone(),
        );
        Ok(HeldKv::new(lease, h.n_tokens, h.generated, h.sampler))
    }

    /// Sends a command carrying a reply channel and waits for the answer (blocking).
    fn ask_blocking<T>(
        &self,
        cmd: impl FnOnce(mpsc::Sender<T>) -> Command,
    ) -> Result<T, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.tx.send(cmd(tx)).map_err(|_| EngineError::Stopped)?;
        rx.recv().map_err(|_| EngineError::Stopped)
    }

    /// As [`Engine::ask_blocking`], awaiting the answer.
    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(cmd(tx)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Aborts a request, or releases the KV still held for it (producer role).
    pub fn abort(&self, id: &str) {
        let _ = self.tx.send(Command::Abort(id.to_string()));
    }

    /// Releases the KV held for `id` (producer role); a running request is not touched.
    pub fn release_held(&self, id: &str) {
        let _ = self.tx.send(Command::ReleaseHeld(id.to_string()));
    }

    /// Takes the request (the first of `ids` that is live) out of scheduling at the first
    /// step boundary where it has generated at least `after_tokens` tokens, and returns a
    /// copy of it to send elsewhere. Follow with [`Engine::commit_parked`] or
    /// [`Engine::resume_parked`] with its id (`Parked::migration.state.id`).
    pub async fn park(&self, ids: &[&str], after_tokens: usize) -> Result<Parked, EngineError> {
        let ids = ids.iter().map(|s| s.to_string()).collect();
        self.ask(|reply| {
            Command::Park(PendingPark {
                ids,
                after_tokens,
                reply,
            })
        })
        .await?
    }

    /// The parked request continues elsewhere: free its blocks here.
    pub fn commit_parked(&self, id: &str) {
        let _ = self.tx.send(Command::Unpark(id.to_string(), true));
    }

    /// The parked request could not move: schedule it here again.
    pub fn resume_parked(&self, id: &str) {
        let _ = self.tx.send(Command::Unpark(id.to_string(), false));
    }

    /// Continues a request migrated from another engine; its further events arrive on the
    /// returned channel.
    pub async fn adopt(&self, m: Migration) -> Result<UnboundedReceiver<Event>, EngineError> {
        self.ask(|reply| Command::Adopt(Box::new(m), reply)).await?
    }

    /// Requests running, waiting or parked.
    pub async fn requests(&self) -> Result<Vec<RequestInfo>, EngineError> {
        self.ask(Command::List).await
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        StatsSnapshot {
            free_blocks: s.free_blocks.load(Ordering::Relaxed),
            total_blocks: s.total_blocks.load(Ordering::Relaxed),
            running: s.running.load(Ordering::Relaxed),
            waiting: s.waiting.load(Ordering::Relaxed),
            prompt_tokens_computed: s.prompt_tokens_computed.load(Ordering::Relaxed),
            generated_tokens: s.generated_tokens.load(Ordering::Relaxed),
            preemptions: s.preemptions.load(Ordering::Relaxed),
            steps: s.steps.load(Ordering::Relaxed),
            // Read from the holds themselves: a hold exists before its request's last event
            // is sent, while the published counters lag until the step ends.
            held_blocks: self.holds.blocks(),
            prefix_cache_queries: s.prefix_cache_queries.load(Ordering::Relaxed),
            prefix_cache_hits: s.prefix_cache_hits.load(Ordering::Relaxed),
            load_failures_recomputed: s.load_failures_recomputed.load(Ordering::Relaxed),
        }
    }
}

struct Core {
    model: Arc<Model>,
    cache: KvCache,
    sched: SchedulerConfig,
    running: Vec<Seq>,
    waiting: VecDeque<Seq>,
    stats: Arc<EngineStats>,
    max_model_len: usize,
    on_step: Option<StepHook>,
    holds: Arc<Holds>,
    hold_timeout: Duration,
    load_failure: LoadFailurePolicy,
    /// Requests taken out of scheduling while they migrate; `true` if they were running.
    parked: std::collections::HashMap<String, (Seq, bool)>,
    pending_parks: Vec<PendingPark>,
    connector: Option<Arc<dyn KvConnector>>,
    /// For leases to send their blocks back.
    back: mpsc::Sender<Command>,
    /// Requests whose KV waits remotely, before their blocks are allocated.
    remote_waiting: VecDeque<(Seq, RemoteKv)>,
    /// WAITING_FOR_REMOTE_KVS: blocks lent to the connector; the tokens being loaded.
    loading: std::collections::HashMap<String, (Seq, usize)>,
    stopping: bool,
}

impl Core {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                if self.stopping
                    && self.loading.is_empty()
                    && self.holds.lent.load(Ordering::Relaxed) == 0
                {
                    return;
                }
                // While blocks are held, wake up to expire them even if nothing arrives.
                let wait = if self.holds.map().is_empty() {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_millis(100)
                };
                match rx.recv_timeout(wait) {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.expire_held();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if self.running.is_empty() && self.waiting.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            // After queued exports are served: a pull that arrived during a long step wins.
            self.expire_held();
            self.start_loads();
            self.drop_disconnected();
            self.step();
            if !self.pending_parks.is_empty() {
                self.serve_parks();
            }
            self.publish();
        }
    }

    fn publish(&self) {
        let s = &self.stats;
        s.free_blocks
            .store(self.cache.num_free(), Ordering::Relaxed);
        s.running.store(self.running.len(), Ordering::Relaxed);
        s.waiting.store(
            self.waiting.len() + self.remote_waiting.len() + self.loading.len(),
            Ordering::Relaxed,
        );
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(seq, None) => {
                self.waiting.push_back(*seq);
            }
            Command::Add(seq, Some(import)) => self.import(*seq, *import),
            Command::AddRemote(seq, remote) => match &self.connector {
                Some(_) => self.remote_waiting.push_back((*seq, remote)),
                None => {
                    let e = EngineError::KvTransfer("this engine has no KV connector".into());
                    self.finish(*seq, FinishReason::Abort, Some(e));
                }
            },
            Command::Loaded { id, blocks, result } => self.loaded(id, blocks, *result),
            Command::Returned(id, mut blocks) => {
                tracing::debug!(id = %id, blocks = blocks.len(), "held KV read; blocks freed");
                let n = blocks.len();
                let _ = self
                    .holds
                    .lent
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                        Some(l.saturating_sub(n))
                    });
                self.cache.release(&mut blocks);
            }
            Command::Stop => self.stopping = true,
            Command::Export(id, reply) => {
                let _ = reply.send(self.export(&id));
            }
            Command::Park(p) => {
                self.pending_parks.push(p);
                self.serve_parks();
            }
            Command::Unpark(id, commit) => self.unpark(&id, commit),
            Command::Adopt(m, reply) => {
                let r = self.adopt(*m);
                let _ = reply.send(r);
            }
            Command::List(reply) => {
                let _ = reply.send(self.list());
            }
            Command::ReleaseHeld(id) => {
                if let Some(mut h) = self.take_held(&id) {
                    self.cache.release(&mut h.blocks);
                }
            }
            Command::Abort(id) => {
                if let Some(i) = self.running.iter().position(|s| s.id == id) {
                    let s = self.running.remove(i);
                    self.finish(s, FinishReason::Abort, None);
                } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
                    if let Some(s) = self.waiting.remove(i) {
                        self.finish(s, FinishReason::Abort, None);
                    }
                } else if let Some(mut h) = self.take_held(&id) {
                    // The consumer gave up on this request's KV.
                    self.cache.release(&mut h.blocks);
                } else if let Some(i) = self.remote_waiting.iter().position(|(s, _)| s.id == id) {
                    if let Some((s, remote)) = self.remote_waiting.remove(i) {
                        self.release_remote(remote);
                        self.finish(s, FinishReason::Abort, None);
                    }
                } else if let Some((s, _)) = self.loading.remove(&id) {
                    // Its blocks come back when the connector ends the load.
                    self.finish(s, FinishReason::Abort, None);
                }
            }
        }
        self.publish();
    }

    fn drop_disconnected(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].tx.is_closed() {
                let s = self.running.remove(i);
                tracing::debug!(id = %s.id, "client went away; aborting");
                self.finish(s, FinishReason::Abort, None);
            } else {
                i += 1;
            }
        }
        let mut keep = VecDeque::with_capacity(self.waiting.len());
        while let Some(s) = self.waiting.pop_front() {
            if s.tx.is_closed() {
                self.finish(s, FinishReason::Abort, None);
            } else {
                keep.push_back(s);
            }
        }
        self.waiting = keep;
        let mut keep = VecDeque::with_capacity(self.remote_waiting.len());
        while let Some((s, remote)) = self.remote_waiting.pop_front() {
            if s.tx.is_closed() {
                self.release_remote(remote);
                self.finish(s, FinishReason::Abort, None);
            } else {
                keep.push_back((s, remote));
            }
        }
        self.remote_waiting = keep;
    }

    fn release_remote(&self, remote: RemoteKv) {
        if let Some(c) = &self.connector {
            c.release(remote);
        }
    }

    /// Allocates blocks for requests whose KV waits remotely, in arrival order, and lends
    /// them to the connector; a request that does not fit yet waits for free blocks.
    fn start_loads(&mut self) {
        if self.remote_waiting.is_empty() {
            return;
        }
        let Some(conn) = self.connector.clone() else {
            return;
        };
        while let Some((s, remote)) = self.remote_waiting.front() {
            let n = conn.remote_tokens(remote, s.prompt_len).min(s.prompt_len);
            if n == 0 {
                // Nothing to load: computed here like any request.
                if let Some((s, remote)) = self.remote_waiting.pop_front() {
                    self.release_remote(remote);
                    self.waiting.push_back(s);
                }
                continue;
            }
            // Blocks this engine has cached already are not loaded again; at least one block
            // always is (as a local prompt computes at least its last token).
            let bs = self.cache.layout.block_size;
            let hit = match self.remote_waiting.front_mut() {
                Some((s, _)) if self.cache.prefix_caching() => {
                    self.cache.cached_prefix(s.block_hashes(), n)
                }
                _ => Vec::new(),
            };
            let Some(blocks) = self.cache.take(&hit, n.div_ceil(bs) - hit.len()) else {
                break;
            };
            let Some((mut s, remote)) = self.remote_waiting.pop_front() else {
                break;
            };
            self.stats
                .prefix_cache_queries
                .fetch_add(n as u64, Ordering::Relaxed);
            self.stats
                .prefix_cache_hits
                .fetch_add((hit.len() * bs) as u64, Ordering::Relaxed);
            s.cache.cached_tokens.get_or_insert(hit.len() * bs);
            s.state = RequestState::WaitingForRemoteKvs;
            let first = hit.len();
            s.blocks = hit;
            let target = LoadTarget::new(self.lease(blocks, &s.id), n, first);
            self.loading.insert(s.id.clone(), (s, n));
            conn.start_load(remote, target);
        }
        self.publish();
    }

    /// A load ended: the request continues from its KV, or fails with the connector's error.
    fn loaded(&mut self, id: String, mut blocks: Vec<u32>, result: Result<RemoteFirst, String>) {
        let Some((mut s, n)) = self.loading.remove(&id) else {
            // Aborted while loading.
            self.cache.release(&mut blocks);
            return;
        };
        let first = match result {
            Ok(f) => f,
            Err(e) => {
                self.cache.release(&mut blocks);
                if self.load_failure == LoadFailurePolicy::Recompute {
                    tracing::warn!(id = %s.id, error = %e, "KV load failed; computing the prompt here instead");
                    self.stats
                        .load_failures_recomputed
                        .fetch_add(1, Ordering::Relaxed);
                    // From scratch, as a new request: the scheduler looks up the cache again.
                    self.cache.release(&mut s.blocks);
                    s.num_computed = 0;
                    s.state = RequestState::Waiting;
                    self.waiting.push_front(s);
                    return;
                }
                return self.finish(s, FinishReason::Abort, Some(EngineError::KvTransfer(e)));
            }
        };
        // The blocks found in the prefix cache, then the loaded ones.
        s.blocks.extend(blocks);
        s.state = RequestState::Waiting;
        if s.params.logprobs.is_some() {
            // The producer's first token comes without its logprobs: recompute the last
            // prompt position here, whose sampler draws the same token (greedy or seeded).
            return self.resume_from_kv(s, n, Vec::new(), None);
        }
        self.resume_from_kv(s, n, first.generated, first.sampler);
    }

    /// `blocks` of request `id`, lent out; they come back through the command channel.
    fn lease(&self, blocks: Vec<u32>, id: &str) -> Lease {
        Lease::new(
            self.cache.mem.clone(),
            blocks,
            id.to_string(),
            self.back.clone(),
        )
    }

    /// Removes `id`'s held KV (the map's lock is released on return).
    fn take_held(&self, id: &str) -> Option<Held> {
        self.holds.map().remove(id)
    }

    /// Frees blocks no consumer came for within the hold timeout.
    fn expire_held(&mut self) {
        let timeout = self.hold_timeout;
        let expired: Vec<(String, Held)> = {
            let mut map = self.holds.map();
            if map.is_empty() {
                return;
            }
            map.extract_if(|_, h| h.since.elapsed() >= timeout)
                .collect()
        };
        if expired.is_empty() {
            return;
        }
        for (id, mut h) in expired {
            tracing::warn!(id = %id, blocks = h.blocks.len(), "KV hold timed out; freeing blocks");
            self.cache.release(&mut h.blocks);
        }
        self.publish();
    }

    /// Places imported KV into fresh blocks; the request then decodes from there.
    fn import(&mut self, mut s: Seq, i: KvImport) {
        let ours = self.cache.layout;
        let fail =
            |core: &mut Self, s: Seq, e: EngineError| core.finish(s, FinishReason::Abort, Some(e));
        if i.layout != ours {
            let e = EngineError::KvMismatch(format!(
                "imported layout {:?} differs from ours {:?}",
                i.layout, ours
            ));
            return fail(self, s, e);
        }
        let n_blocks = i.n_tokens.div_ceil(ours.block_size);
        let per_block = ours.layer_block_bytes();
        if i.n_tokens != s.prompt_len
            || i.layers.len() != ours.n_layer
            || i.layers.iter().any(|l| l.len() != n_blocks * per_block)
        {
            let e = EngineError::KvMismatch(format!(
                "imported KV for {} tokens in {} layers does not fit a {}-token prompt",
                i.n_tokens,
                i.layers.len(),
                s.prompt_len
            ));
            return fail(self, s, e);
        }
        let Some(blocks) = self.cache.allocate(n_blocks) else {
            let e = EngineError::Overloaded {
                waiting: self.waiting.len(),
            };
            return fail(self, s, e);
        };
        for (layer, bytes) in i.layers.iter().enumerate() {
            for (b, chunk) in blocks.iter().zip(bytes.chunks_exact(per_block)) {
                self.cache.set_block_bytes(layer, *b, chunk);
            }
        }
        s.blocks = blocks;
        self.resume_from_kv(s, i.n_tokens, i.generated, Some(i.sampler));
    }

    /// `s` has the KV of its first `n` tokens in its blocks, and `generated` tokens were
    /// sampled remotely: queue it to continue from there.
    fn resume_from_kv(
        &mut self,
        mut s: Seq,
        n: usize,
        generated: Vec<u32>,
        sampler: Option<Sampler>,
    ) {
        if generated.is_empty() {
            // No first token came with the KV (vLLM's proxy contract): recompute the last
            // prompt position here; the request's own sampler draws the first token.
            s.num_computed = n.min(s.prompt_len - 1);
            self.waiting.push_back(s);
            return;
        }
        s.num_computed = n;
        s.tokens.extend_from_slice(&generated);
        if let Some(sm) = sampler {
            s.sampler = sm;
        }
        // The imported first token is output too: the client sees it from this engine.
        let mut text = Some(
            s.detok
                .step(&self.model.tokenizer, &s.tokens[s.prompt_len..]),
        );
        s.text = text.clone().unwrap_or_default();
        s.sent = s.text.len();
        for &t in &generated {
            let out = TokenOut {
                token: t,
                text: text.take().unwrap_or_default(),
                logprob: None,
                top_logprobs: vec![],
                logits: None,
            };
            let _ = s.tx.send(Event::Token(out));
        }
        let eos = self.model.tokenizer.eos_id();
        let ended = generated.iter().any(|&t| {
            (Some(t) == eos && !s.params.ignore_eos) || s.params.stop_token_ids.contains(&t)
        });
        if ended {
            return self.finish(s, FinishReason::Stop, None);
        }
        if s.completion_tokens() >= s.params.max_tokens {
            return self.finish(s, FinishReason::Length, None);
        }
        self.waiting.push_back(s);
    }

    fn export(&mut self, id: &str) -> Result<KvImport, EngineError> {
        let mut h = self
            .take_held(id)
            .ok_or_else(|| EngineError::KvMismatch(format!("no KV held for request {id}")))?;
        let layout = self.cache.layout;
        let layers = (0..layout.n_layer)
            .map(|l| {
                let mut out = Vec::new();
                for &b in &h.blocks {
                    self.cache.block_bytes(l, b, &mut out);
                }
                out
            })
            .collect();
        self.cache.release(&mut h.blocks);
        Ok(KvImport {
            layout,
            n_tokens: h.n_tokens,
            layers,
            generated: h.generated,
            sampler: h.sampler,
        })
    }

    fn finish(&mut self, mut s: Seq, reason: FinishReason, error: Option<EngineError>) {
        if s.hold && reason != FinishReason::Abort {
            // Only the prompt's blocks travel; the first token is sent as a token id.
            let n_tokens = s.prompt_len;
            let keep = n_tokens.div_ceil(self.cache.layout.block_size);
            let mut extra = s.blocks.split_off(keep.min(s.blocks.len()));
            self.cache.release(&mut extra);
            let old = self.holds.map().insert(
                s.id.clone(),
                Held {
                    since: Instant::now(),
                    blocks: std::mem::take(&mut s.blocks),
                    n_tokens,
                    generated: s.tokens[s.prompt_len..].to_vec(),
                    sampler: s.sampler.clone(),
                },
            );
            if let Some(mut o) = old {
                // A second request under the same id: the older hold can never be pulled.
                tracing::warn!(id = %s.id, "request id reused while its KV was held; freeing the older hold");
                self.cache.release(&mut o.blocks);
            }
        }
        self.cache.release(&mut s.blocks);
        let queue_time = s
            .first_scheduled
            .map(|t| t.duration_since(s.arrived))
            .unwrap_or_default();
        let _ = s.tx.send(Event::Finished(Finished {
            reason,
            prompt_tokens: s.prompt_len,
            completion_tokens: s.completion_tokens(),
            queue_time,
            error,
            cached_tokens: s.cache.cached_tokens.unwrap_or(0),
        }));
    }

    fn step(&mut self) {
        let plan = schedule(
            &self.sched,
            &mut self.cache,
            &mut self.running,
            &mut self.waiting,
        );
        self.stats
            .preemptions
            .fetch_add(plan.preempted as u64, Ordering::Relaxed);
        self.stats
            .prefix_cache_queries
            .fetch_add(plan.cache_queries as u64, Ordering::Relaxed);
        self.stats
            .prefix_cache_hits
            .fetch_add(plan.cache_hits as u64, Ordering::Relaxed);
        if plan.items.is_empty() {
            return;
        }
        let t0 = Instant::now();
        // Per-step trace (RUST_LOG=splitserve::step=trace): a step whose CPU time is near
        // its wall time was slow on its own, not preempted.
        let traced = tracing::enabled!(target: "splitserve::step", tracing::Level::TRACE);
        let cpu0 = traced.then(placement::thread_cpu_time).flatten();
        let (mut prefill_tokens, mut decode_tokens) = (0, 0);
        let mut prompt_computed = 0u64;
        let chunks: Vec<SeqChunk<'_>> = plan
            .items
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                let start = s.num_computed;
                prompt_computed += s.prompt_len.saturating_sub(start).min(n) as u64;
                if n == 1 && start >= s.prompt_len {
                    decode_tokens += 1;
                } else {
                    prefill_tokens += n;
                }
                SeqChunk {
                    tokens: &s.tokens[start..start + n],
                    start,
                    table: &s.blocks,
                    logits: start + n == s.tokens.len(),
                }
            })
            .collect();
        let result = self.model.forward(&mut self.cache, &chunks);
        drop(chunks);
        let now = Instant::now();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .prompt_tokens_computed
            .fetch_add(prompt_computed, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "step failed; aborting its requests");
                let mut idx: Vec<usize> = plan.items.iter().map(|&(i, _)| i).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let s = self.running.remove(i);
                    self.finish(s, FinishReason::Abort, Some(e.clone()));
                }
                return;
            }
        };
        let mut done = Vec::new();
        for (&(i, n), lg) in plan.items.iter().zip(logits) {
            let s = &mut self.running[i];
            s.first_scheduled.get_or_insert(now);
            s.num_computed += n;
            if self.cache.prefix_caching() {
                // Blocks whose every token is now computed can serve later prompts.
                let full = s.num_computed / self.cache.layout.block_size;
                if full > s.cache.registered {
                    s.block_hashes();
                    let saver = self.connector.as_ref().filter(|c| c.wants_saves());
                    for j in s.cache.registered..full.min(s.cache.hashes.len()) {
                        let new = self.cache.register(s.cache.hashes[j], s.blocks[j]);
                        if let Some(c) = saver.filter(|_| new) {
                            c.save_block(
                                &s.cache.hashes[j],
                                SavedBlock::new(&self.cache.mem, s.blocks[j]),
                            );
                        }
                    }
                    s.cache.registered = full;
                }
            }
            let Some(lg) = lg else { continue };
            if let Some(reason) = self.sample_into(i, lg) {
                done.push((i, reason));
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, reason) in done {
            let s = self.running.remove(i);
            self.finish(s, reason, None);
        }
        let duration = t0.elapsed();
        if traced {
            let cpu = cpu0
                .zip(placement::thread_cpu_time())
                .map(|(a, b)| b.saturating_sub(a));
            tracing::trace!(
                target: "splitserve::step",
                wall_us = duration.as_micros() as u64,
                cpu_us = cpu.map(|c| c.as_micros() as u64),
                prefill_tokens,
                decode_tokens,
                running = self.running.len(),
            );
        }
        if let Some(hook) = &self.on_step {
            hook(StepInfo {
                duration,
                prefill_tokens,
                decode_tokens,
            });
        }
    }

    /// Samples the next token of running request `i`; returns a finish reason if it ended.
    fn sample_into(&mut self, i: usize, logits: Vec<f32>) -> Option<FinishReason> {
        let tok = &self.model.tokenizer;
        let eos = tok.eos_id();
        let s = &mut self.running[i];
        let mut banned = Vec::new();
        if s.completion_tokens() < s.params.min_tokens {
            banned.extend(eos.filter(|_| !s.params.ignore_eos));
            banned.extend_from_slice(&s.params.stop_token_ids);
        }
        let sampled = s.sampler.sample(&logits, &s.params, &banned);
        let t = sampled.token;
        s.tokens.push(t);
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let is_eos = Some(t) == eos && !s.params.ignore_eos;
        let is_stop_id = s.params.stop_token_ids.contains(&t);
        let mut reason = None;
        let mut text = String::new();
        if is_eos || is_stop_id {
            reason = Some(FinishReason::Stop);
        } else {
            let delta = s.detok.step(tok, &s.tokens[s.prompt_len..]);
            s.text.push_str(&delta);
            // A stop string ends the text just before it (OpenAI semantics).
            let from = s
                .sent
                .saturating_sub(s.params.stop.iter().map(|x| x.len()).max().unwrap_or(0));
            let hit = s
                .params
                .stop
                .iter()
                .filter(|x| !x.is_empty())
                .filter_map(|x| s.text[from..].find(x.as_str()).map(|p| p + from))
                .min();
            let end = match hit {
                Some(p) => {
                    reason = Some(FinishReason::Stop);
                    p.max(s.sent)
                }
                None => s.text.len(),
            };
            text = s.text[s.sent..end].to_string();
            s.sent = end;
        }
        if reason.is_none()
            && (s.completion_tokens() >= s.params.max_tokens
                || s.tokens.len() >= self.max_model_len)
        {
            reason = Some(FinishReason::Length);
        }
        let out = TokenOut {
            token: t,
            text,
            logprob: s.params.logprobs.map(|_| sampled.logprob),
            top_logprobs: sampled.top,
            logits: s.return_logits.then_some(logits),
        };
        let _ = s.tx.send(Event::Token(out));
        reason
    }
}
