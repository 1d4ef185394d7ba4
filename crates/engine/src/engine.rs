//! The engine: a thread that owns the model and the KV cache and runs the step loop; a
//! cloneable handle to submit requests, abort them and read counters.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::EngineError;
use crate::kv_cache::{KvCache, KvDtype, KvLayout, Q8_GROUP};
use crate::model::Model;
use crate::prefix_cache::{self, BlockHash};
use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::{RequestState, Schedulable, SchedulerConfig};
use crate::tokenizer::IncrementalDecoder;

mod api;
mod connector;
mod holds;
mod migrate;
mod placement;
mod step;
mod transfer;
pub use api::{
    EngineConfig, EngineStats, Event, FinishReason, Finished, KvImport, KvTransfer,
    LoadFailurePolicy, Request, StatsSnapshot, StepHook, StepInfo, TokenOut,
};
use connector::Lease;
pub use connector::{HeldKv, KvConnector, LoadTarget, RemoteFirst, RemoteKv, SavedBlock};
use holds::Holds;
use migrate::PendingPark;
pub use migrate::{LiveState, Migration, Parked, RequestInfo};
pub use placement::{ComputePriority, CpuList};
use tokio::sync::oneshot;

enum Command {
    Add(Box<Seq>, Option<Box<KvImport>>),
    AddRemote(Box<Seq>, RemoteKv),
    /// A connector finished (or failed) loading a request's KV into its lent blocks.
    Loaded {
        id: String,
        blocks: Vec<u32>,
        /// The first of `blocks` given slots in the windowed layers.
        local_from: usize,
        result: Box<Result<RemoteFirst, String>>,
    },
    /// A reader gave back a held request's blocks (and the first whose slots it held).
    Returned(String, Vec<u32>, usize),
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
    /// The first of `blocks` whose windowed layers' slots it holds.
    local_from: usize,
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
    fn local_from(&mut self) -> &mut usize {
        &mut self.local_from
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

/// Slots for the windowed layers' values: what the running requests' windows and a step's
/// new blocks can reach at once, and no more than the pool's blocks. A request keeps about
/// `window / block_size + 1` blocks in those layers however long it grows.
fn window_slots(layout: &KvLayout, cfg: &EngineConfig, max_model_len: usize) -> usize {
    let Some(per_request) = layout.window_blocks() else {
        return 0;
    };
    let bs = cfg.block_size.max(1);
    // Without chunked prefill a prompt longer than the budget runs whole in one step.
    let step = if cfg.enable_chunked_prefill {
        cfg.max_num_batched_tokens
    } else {
        cfg.max_num_batched_tokens.max(max_model_len)
    };
    cfg.max_num_seqs
        .saturating_mul(per_request)
        .saturating_add(step.div_ceil(bs))
        .min(cfg.num_blocks)
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
        let num_slots = window_slots(&layout, &cfg, max_model_len);
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
                let mut c = KvCache::new(layout, cfg.num_blocks, num_slots);
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
        if let Some((free, total)) = core.cache.slot_counts() {
            stats.free_window_slots.store(free, Ordering::Relaxed);
            stats.total_window_slots.store(total, Ordering::Relaxed);
        }
        tracing::info!(
            blocks = cfg.num_blocks,
            window_slots = num_slots,
            mib = core.cache.bytes() >> 20,
            transparent_huge_pages = crate::kv_cache::huge_page_mode(),
            "KV pool allocated"
        );
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
            local_from: 0,
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

    /// The KV pool as (address, bytes) regions, each layer's K then V: what a transport
    /// that reads blocks in place (NIXL) registers once.
    pub fn kv_regions(&self) -> Vec<(usize, usize)> {
        self.kv_mem.regions()
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
            (h.blocks, h.local_from),
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
            free_window_slots: s.free_window_slots.load(Ordering::Relaxed),
            total_window_slots: s.total_window_slots.load(Ordering::Relaxed),
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
            .store(self.cache.num_free_blocks(), Ordering::Relaxed);
        if let Some((free, _)) = self.cache.slot_counts() {
            s.free_window_slots.store(free, Ordering::Relaxed);
        }
        s.running.store(self.running.len(), Ordering::Relaxed);
        s.waiting.store(
            self.waiting.len() + self.remote_waiting.len() + self.loading.len(),
            Ordering::Relaxed,
        );
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            // Ids name requests to abort, load into and migrate: two live under one id would
            // let one client's abort or KV land on another's request.
            Command::Add(seq, _) if self.is_live(&seq.id) => {
                let e = EngineError::DuplicateId(seq.id.clone());
                self.finish(*seq, FinishReason::Abort, Some(e));
            }
            Command::AddRemote(seq, remote) if self.is_live(&seq.id) => {
                self.release_remote(remote);
                let e = EngineError::DuplicateId(seq.id.clone());
                self.finish(*seq, FinishReason::Abort, Some(e));
            }
            Command::Add(seq, None) => {
                let bs = self.cache.layout.block_size;
                let lookup = self.cache.prefix_caching()
                    && seq.prompt_len > bs
                    && self.connector.as_ref().is_some_and(|c| c.looks_up());
                if lookup {
                    // A store connector may have the prompt's first blocks.
                    let remote = RemoteKv::new(connector::StoreLookup);
                    self.remote_waiting.push_back((*seq, remote));
                } else {
                    self.waiting.push_back(*seq);
                }
            }
            Command::Add(seq, Some(import)) => self.import(*seq, *import),
            Command::AddRemote(seq, remote) => match &self.connector {
                Some(_) => self.remote_waiting.push_back((*seq, remote)),
                None => {
                    let e = EngineError::KvTransfer("this engine has no KV connector".into());
                    self.finish(*seq, FinishReason::Abort, Some(e));
                }
            },
            Command::Loaded {
                id,
                blocks,
                local_from,
                result,
            } => self.loaded(id, (blocks, local_from), *result),
            Command::Returned(id, mut blocks, local_from) => {
                tracing::debug!(id = %id, blocks = blocks.len(), "held KV read; blocks freed");
                let n = blocks.len();
                let _ = self
                    .holds
                    .lent
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                        Some(l.saturating_sub(n))
                    });
                self.cache.release(&mut blocks, local_from);
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
                    self.cache.release(&mut h.blocks, h.local_from);
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
                    self.cache.release(&mut h.blocks, h.local_from);
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

    /// Whether a request under `id` is queued, loading, running or parked.
    fn is_live(&self, id: &str) -> bool {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .any(|s| s.id == id)
            || self.remote_waiting.iter().any(|(s, _)| s.id == id)
            || self.loading.contains_key(id)
            || self.parked.contains_key(id)
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
}
