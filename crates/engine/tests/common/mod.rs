#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use splitserve_engine::{
    Engine, EngineConfig, Event, FinishReason, KvTransfer, Model, Request, SamplingParams,
};

/// The real default model, loaded once per test binary (fetched if not cached).
pub fn real_model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| {
        let path = splitserve_engine::model_file::default_model(false).expect("default model");
        Arc::new(Model::load(&path).expect("load default model"))
    })
    .clone()
}

/// An engine over the real model.
pub fn engine(cfg: EngineConfig) -> Engine {
    Engine::start(real_model(), cfg, None).expect("engine")
}

/// A request that returns its logits (for bit-level comparisons).
pub fn request(id: &str, prompt: &[u32], params: &SamplingParams, kv: KvTransfer) -> Request {
    Request {
        id: id.into(),
        prompt: prompt.to_vec(),
        params: params.clone(),
        return_logits: true,
        kv,
        cache_salt: None,

        resumed: 0,
    }
}

/// Writes a fresh tiny model under a unique name (tests run in parallel).
pub fn tiny_model_path(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("splitserve-test-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(name);
    splitserve_engine::synthetic::write_tiny_model(&p, &Default::default())
        .expect("write tiny model");
    p
}

/// What one request produced: tokens, a hash of each step's logits bits, finish reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub tokens: Vec<u32>,
    pub logit_hashes: Vec<u64>,
    pub text: String,
    pub reason: FinishReason,
    /// Prompt tokens the prefix cache gave it.
    pub cached_tokens: usize,
}

pub fn hash_bits(v: &[f32]) -> u64 {
    let mut h = DefaultHasher::new();
    for x in v {
        x.to_bits().hash(&mut h);
    }
    h.finish()
}

pub fn submit(
    engine: &Engine,
    id: &str,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    engine
        .submit(Request {
            id: id.into(),
            prompt,
            params,
            return_logits: true,
            kv: KvTransfer::None,
            cache_salt: None,

            resumed: 0,
        })
        .expect("submit")
}

pub fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Output {
    let mut out = Output {
        tokens: vec![],
        logit_hashes: vec![],
        text: String::new(),
        reason: FinishReason::Abort,
        cached_tokens: 0,
    };
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => {
                out.tokens.push(t.token);
                out.text.push_str(&t.text);
                if let Some(l) = t.logits {
                    out.logit_hashes.push(hash_bits(&l));
                }
            }
            Event::Finished(f) => {
                assert!(f.error.is_none(), "engine error: {:?}", f.error);
                out.reason = f.reason;
                out.cached_tokens = f.cached_tokens;
                break;
            }
        }
    }
    out
}

/// Runs all prompts at once on a fresh engine with `cfg`; outputs in prompt order.
pub fn run_all(
    model: &Arc<Model>,
    cfg: EngineConfig,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> (Vec<Output>, Engine) {
    let engine = Engine::start(model.clone(), cfg, None).expect("engine");
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| submit(&engine, &format!("r{i}"), p.clone(), params.clone()))
        .collect();
    let outs = rxs.into_iter().map(collect).collect();
    (outs, engine)
}

/// Each prompt alone on a fresh engine with `cfg`; outputs in prompt order.
pub fn solo(cfg: &EngineConfig, prompts: &[Vec<u32>], params: &SamplingParams) -> Vec<Output> {
    let m = real_model();
    prompts
        .iter()
        .map(|p| {
            run_all(&m, cfg.clone(), std::slice::from_ref(p), params)
                .0
                .remove(0)
        })
        .collect()
}

/// Waits (bounded) until the engine's free-block count is back to its total.
pub fn wait_all_free(engine: &Engine) -> splitserve_engine::StatsSnapshot {
    wait_stats(engine, |s| {
        s.free_blocks == s.total_blocks && s.running == 0 && s.waiting == 0
    })
}

/// The engine publishes its counters at the end of each loop turn, after the events of
/// that turn went out: waits (up to 10 s) until they say `done`, and returns the last seen.
pub fn wait_stats(
    engine: &Engine,
    done: impl Fn(&splitserve_engine::StatsSnapshot) -> bool,
) -> splitserve_engine::StatsSnapshot {
    for _ in 0..1000 {
        let s = engine.stats();
        if done(&s) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    engine.stats()
}

/// Counts tokens until the request finishes.
pub fn collect_plain(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> usize {
    let mut n = 0;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(_) => n += 1,
            Event::Finished(_) => break,
        }
    }
    n
}

/// Asserts that each output equals its reference: tokens and logits bits.
pub fn assert_same(reference: &[Output], got: &[Output], what: &str) {
    for (i, (a, b)) in reference.iter().zip(got).enumerate() {
        assert_eq!(a.tokens, b.tokens, "{what}: tokens of request {i}");
        assert_eq!(
            a.logit_hashes, b.logit_hashes,
            "{what}: logits bits of request {i}"
        );
    }
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// Runs `prompt` on `a`, moves it to `b` after `n` tokens, and returns what its client saw.
pub fn migrated(
    a: &Engine,
    b: &Engine,
    prompt: &[u32],
    params: &SamplingParams,
    n: usize,
) -> Output {
    let rx = a
        .submit(request("m", prompt, params, KvTransfer::None))
        .expect("submit");
    let parked = block_on(a.park(&["m"], n)).expect("park");
    assert_eq!(
        parked.migration.state.generated(),
        n,
        "parked exactly at {n}"
    );
    move_parked(a, b, "m", parked, rx)
}

/// `b` adopts request `id` parked on `a`, `a` lets it go, and its client (`rx`, the source's
/// channel) reads it to the end.
pub fn move_parked(
    a: &Engine,
    b: &Engine,
    id: &str,
    parked: splitserve_engine::Parked,
    rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Output {
    let mut from_b = block_on(b.adopt(parked.migration)).expect("adopt");
    a.commit_parked(id);
    // What the server's relay does: the target's events go to the source's client channel.
    let events = parked.events;
    let relay = std::thread::spawn(move || {
        while let Some(ev) = from_b.blocking_recv() {
            if events.send(ev).is_err() {
                break;
            }
        }
    });
    let out = collect(rx);
    relay.join().expect("relay");
    out
}
