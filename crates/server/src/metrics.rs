//! Prometheus metrics, named in vLLM's style with our own prefix.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use splitserve_engine::{Engine, StepInfo};

pub const PREFIX: &str = "splitserve:";

pub struct Metrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    free_blocks: IntGauge,
    total_blocks: IntGauge,
    free_window_slots: IntGauge,
    total_window_slots: IntGauge,
    usage: prometheus::Gauge,
    prompt_tokens_computed: IntGauge,
    preemptions: IntGauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    prefix_cache_queries: IntCounter,
    prefix_cache_hits: IntCounter,
    /// Two scrapes at once must not both add the same engine-side increment.
    catch_up: std::sync::Mutex<()>,
    pub request_success: IntCounterVec,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue: Histogram,
    pub prefill_step: Histogram,
    pub decode_step: Histogram,
    held_blocks: IntGauge,
    pub kv_bytes_sent: IntCounter,
    pub kv_bytes_received: IntCounter,
    pub kv_transfers_in_flight: IntGauge,
    pub kv_transfer: Histogram,
    /// Stored KV blocks not used (`missing`, `truncated`, `corrupt`, `foreign`) and saves
    /// dropped or failed, by connector and reason.
    pub kv_store_misses: IntCounterVec,
    /// Store connectors' blocks and bytes loaded and saved, by connector.
    pub kv_store_loaded_blocks: IntCounterVec,
    pub kv_store_loaded_bytes: IntCounterVec,
    pub kv_store_saved_blocks: IntCounterVec,
    pub kv_store_saved_bytes: IntCounterVec,
    /// Migrations out of this engine by result (`ok`, `refused`, `failed`).
    pub migrations: IntCounterVec,
    pub migration_bytes: IntCounter,
    pub migration: Histogram,
}

fn by_connector(name: &str, help: &str) -> IntCounterVec {
    IntCounterVec::new(Opts::new(format!("{PREFIX}{name}"), help), &["connector"])
        .expect("valid counter")
}

fn hist(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(
        HistogramOpts::new(format!("{PREFIX}{name}"), help).buckets(buckets.to_vec()),
    )
    .expect("valid histogram")
}

// 2.5 ms steps from 5 to 30 ms, 5 ms steps to 60 ms: decode steps and inter-token gaps live
// there, and a tail target (say p99 within 1.2× of p50) needs that resolution.
const LAT: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025, 0.0275, 0.03,
    0.035, 0.04, 0.045, 0.05, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

impl Metrics {
    pub fn new() -> Self {
        let g = |n: &str, h: &str| IntGauge::new(format!("{PREFIX}{n}"), h).expect("valid gauge");
        let c =
            |n: &str, h: &str| IntCounter::new(format!("{PREFIX}{n}"), h).expect("valid counter");
        let m = Self {
            registry: Registry::new(),
            running: g("num_requests_running", "Requests in the running batch."),
            waiting: g("num_requests_waiting", "Requests waiting to be scheduled."),
            free_blocks: g("kv_cache_free_blocks", "Free KV cache blocks."),
            total_blocks: g("kv_cache_total_blocks", "KV cache blocks in the pool."),
            free_window_slots: g(
                "kv_cache_free_window_slots",
                "Free slots for sliding-window layers' KV (0 without such layers).",
            ),
            total_window_slots: g(
                "kv_cache_total_window_slots",
                "Slots for sliding-window layers' KV in the pool.",
            ),
            usage: prometheus::Gauge::new(
                format!("{PREFIX}kv_cache_usage_perc"),
                "KV cache usage fraction (1 = full).",
            )
            .expect("valid gauge"),
            prompt_tokens_computed: g(
                "prompt_tokens_computed",
                "Prompt tokens this engine computed itself (not pulled from a peer).",
            ),
            preemptions: g("num_preemptions", "Requests preempted so far."),
            prompt_tokens: c("prompt_tokens_total", "Prompt tokens of requests received."),
            generation_tokens: c("generation_tokens_total", "Tokens generated."),
            prefix_cache_queries: c(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            ),
            prefix_cache_hits: c(
                "prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
            ),
            catch_up: std::sync::Mutex::new(()),
            request_success: IntCounterVec::new(
                Opts::new(
                    format!("{PREFIX}request_success_total"),
                    "Finished requests by finish reason.",
                ),
                &["finished_reason"],
            )
            .expect("valid counter"),
            ttft: hist("time_to_first_token_seconds", "Time to first token.", LAT),
            itl: hist(
                "inter_token_latency_seconds",
                "Time between consecutive output tokens.",
                LAT,
            ),
            e2e: hist(
                "e2e_request_latency_seconds",
                "End-to-end request latency.",
                LAT,
            ),
            queue: hist(
                "request_queue_time_seconds",
                "Time waiting before the first step.",
                LAT,
            ),
            prefill_step: hist(
                "prefill_step_seconds",
                "Duration of steps that computed prompt tokens.",
                LAT,
            ),
            decode_step: hist("decode_step_seconds", "Duration of decode-only steps.", LAT),
            held_blocks: g(
                "kv_held_blocks",
                "KV blocks held for remote readers (producer role).",
            ),
            kv_bytes_sent: c(
                "kv_transfer_bytes_sent_total",
                "KV bytes served to consumers.",
            ),
            kv_bytes_received: c(
                "kv_transfer_bytes_received_total",
                "KV bytes pulled from producers.",
            ),
            kv_transfers_in_flight: g("kv_transfers_in_flight", "KV pulls under way."),
            kv_transfer: hist(
                "kv_transfer_seconds",
                "Duration of one request's KV transfer (handshake to last layer).",
                LAT,
            ),
            kv_store_misses: IntCounterVec::new(
                Opts::new(
                    format!("{PREFIX}kv_store_misses_total"),
                    "Stored KV blocks a load did not use, and saves dropped or failed.",
                ),
                &["connector", "reason"],
            )
            .expect("valid counter"),
            kv_store_loaded_blocks: by_connector(
                "kv_store_loaded_blocks_total",
                "KV blocks loaded from a store.",
            ),
            kv_store_loaded_bytes: by_connector(
                "kv_store_loaded_bytes_total",
                "KV bytes loaded from a store.",
            ),
            kv_store_saved_blocks: by_connector(
                "kv_store_saved_blocks_total",
                "KV blocks saved to a store.",
            ),
            kv_store_saved_bytes: by_connector(
                "kv_store_saved_bytes_total",
                "Bytes saved to a store (block files, headers included).",
            ),
            migrations: IntCounterVec::new(
                Opts::new(
                    format!("{PREFIX}migrations_total"),
                    "Live requests migrated out of this engine, by result.",
                ),
                &["result"],
            )
            .expect("valid counter"),
            migration_bytes: c(
                "migration_bytes_total",
                "Bytes (state and KV) of live requests migrated out.",
            ),
            migration: hist(
                "migration_seconds",
                "Pause of one migrated request: parked to accepted by the target.",
                LAT,
            ),
        };
        let r = &m.registry;
        let _ = r.register(Box::new(m.running.clone()));
        let _ = r.register(Box::new(m.waiting.clone()));
        let _ = r.register(Box::new(m.free_blocks.clone()));
        let _ = r.register(Box::new(m.total_blocks.clone()));
        let _ = r.register(Box::new(m.free_window_slots.clone()));
        let _ = r.register(Box::new(m.total_window_slots.clone()));
        let _ = r.register(Box::new(m.usage.clone()));
        let _ = r.register(Box::new(m.prompt_tokens_computed.clone()));
        let _ = r.register(Box::new(m.preemptions.clone()));
        let _ = r.register(Box::new(m.prompt_tokens.clone()));
        let _ = r.register(Box::new(m.generation_tokens.clone()));
        let _ = r.register(Box::new(m.prefix_cache_queries.clone()));
        let _ = r.register(Box::new(m.prefix_cache_hits.clone()));
        let _ = r.register(Box::new(m.request_success.clone()));
        let _ = r.register(Box::new(m.held_blocks.clone()));
        let _ = r.register(Box::new(m.kv_bytes_sent.clone()));
        let _ = r.register(Box::new(m.kv_bytes_received.clone()));
        let _ = r.register(Box::new(m.kv_transfers_in_flight.clone()));
        let _ = r.register(Box::new(m.kv_store_misses.clone()));
        for c in [
            &m.kv_store_loaded_blocks,
            &m.kv_store_loaded_bytes,
            &m.kv_store_saved_blocks,
            &m.kv_store_saved_bytes,
        ] {
            let _ = r.register(Box::new(c.clone()));
        }
        let _ = r.register(Box::new(m.migrations.clone()));
        let _ = r.register(Box::new(m.migration_bytes.clone()));
        for h in [
            &m.ttft,
            &m.itl,
            &m.e2e,
            &m.queue,
            &m.prefill_step,
            &m.decode_step,
            &m.kv_transfer,
            &m.migration,
        ] {
            let _ = r.register(Box::new(h.clone()));
        }
        m
    }

    /// Registers an extra collector (e.g. a KV connector's counters).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        let _ = self.registry.register(c);
    }

    pub fn observe_step(&self, s: StepInfo) {
        let secs = s.duration.as_secs_f64();
        if s.prefill_tokens > 0 {
            self.prefill_step.observe(secs);
        } else {
            self.decode_step.observe(secs);
        }
    }

    /// Prometheus text format, gauges refreshed from the engine.
    pub fn render(&self, engine: &Engine) -> String {
        let s = engine.stats();
        self.running.set(s.running as i64);
        self.waiting.set(s.waiting as i64);
        self.free_blocks.set(s.free_blocks as i64);
        self.total_blocks.set(s.total_blocks as i64);
        self.free_window_slots.set(s.free_window_slots as i64);
        self.total_window_slots.set(s.total_window_slots as i64);
        self.usage
            .set(1.0 - s.free_blocks as f64 / s.total_blocks.max(1) as f64);
        self.prompt_tokens_computed
            .set(s.prompt_tokens_computed as i64);
        self.preemptions.set(s.preemptions as i64);
        self.held_blocks.set(s.held_blocks as i64);
        // Counters that live in the engine: add what it counted since the last scrape.
        let _one = self.catch_up.lock().unwrap_or_else(|e| e.into_inner());
        for (c, v) in [
            (&self.prefix_cache_queries, s.prefix_cache_queries),
            (&self.prefix_cache_hits, s.prefix_cache_hits),
        ] {
            c.inc_by(v.saturating_sub(c.get()));
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
