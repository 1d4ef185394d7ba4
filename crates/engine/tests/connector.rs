//! The engine's side of the KV connector, driven by a connector whose loads end when the
//! test says so. A request waiting for remote KV (WAITING_FOR_REMOTE_KVS) has its blocks
//! allocated and lent while the engine keeps stepping other requests; once its KV is in,
//! it continues token-identically to a colocated run; a failed load ends it with the
//! connector's error; an abort during a load frees the blocks when the load ends.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{collect, request};
use splitserve_engine::{
    Engine, EngineConfig, EngineError, Event, FinishReason, KvConnector, KvImport, KvTransfer,
    LoadTarget, RemoteFirst, RemoteKv, SamplingParams,
};

#[derive(Default)]
struct Manual {
    loads: Mutex<Vec<LoadTarget>>,
}

impl KvConnector for Manual {
    fn remote_tokens(&self, _: &RemoteKv, prompt_len: usize) -> usize {
        prompt_len
    }
    fn start_load(&self, _: RemoteKv, target: LoadTarget) {
        self.loads.lock().expect("lock").push(target);
    }
    fn release(&self, _: RemoteKv) {}
}

impl Manual {
    /// Waits (bounded) for the engine to start a load, and takes it.
    fn next_load(&self) -> LoadTarget {
        for _ in 0..1000 {
            if let Some(t) = self.loads.lock().expect("lock").pop() {
                return t;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no load started");
    }
}

/// An engine whose connector is `conn`.
fn consumer(conn: &Arc<Manual>) -> Engine {
    Engine::start_with(
        common::real_model(),
        EngineConfig::default(),
        None,
        Some(conn.clone() as Arc<dyn KvConnector>),
    )
    .expect("engine")
}

fn remote() -> KvTransfer {
    KvTransfer::Remote(RemoteKv::new(()))
}

/// Writes a producer's exported KV into the lent blocks, as a transport would.
fn fill(target: &mut LoadTarget, kv: &KvImport) {
    let lay = target.layout();
    let per_block = lay.layer_block_bytes();
    for (layer, bytes) in kv.layers.iter().enumerate() {
        for i in 0..target.n_blocks() {
            let at = target.first_block() + i;
            let src = &bytes[at * per_block..(at + 1) * per_block];
            let [k, v] = target.block_mut(layer, i);
            let half = k.len();
            k.copy_from_slice(&src[..half]);
            v.copy_from_slice(&src[half..]);
        }
    }
}

#[test]
fn loads_run_beside_decoding_and_continue_identically() {
    let m = common::real_model();
    let prompt = m
        .tokenizer
        .encode("A remote prefill computed this prompt's KV on another engine.")
        .expect("encode");
    let params = SamplingParams {
        ignore_eos: true,
        temperature: 0.8,
        seed: Some(9),
        ..SamplingParams::greedy(24)
    };
    let colo = Engine::start(m.clone(), EngineConfig::default(), None).expect("engine");
    let reference = collect(
        colo.submit(request("c", &prompt, &params, KvTransfer::None))
            .expect("submit"),
    );
    let p = Engine::start(m.clone(), EngineConfig::default(), None).expect("engine");
    let first = collect(
        p.submit(request(
            "r",
            &prompt,
            &SamplingParams {
                max_tokens: 1,
                ..params.clone()
            },
            KvTransfer::Hold,
        ))
        .expect("submit"),
    );
    let kv = p.export_held("r").expect("held");

    let conn = Arc::new(Manual::default());
    let d = consumer(&conn);
    let total = d.stats().total_blocks;
    let mut rx = d
        .submit(request("r", &prompt, &params, remote()))
        .expect("submit");
    let mut target = conn.next_load();
    assert_eq!(target.n_tokens(), prompt.len());
    assert_eq!(target.n_blocks(), prompt.len().div_ceil(16));
    let s = common::wait_stats(&d, |s| s.free_blocks < total);
    assert_eq!(s.free_blocks, total - target.n_blocks(), "blocks lent");
    assert_eq!((s.waiting, s.running), (1, 0));

    // While the load is out, another request runs start to finish.
    let other = collect(
        d.submit(request(
            "o",
            &prompt[..5],
            &SamplingParams::greedy(12),
            KvTransfer::None,
        ))
        .expect("submit"),
    );
    assert_eq!(other.tokens.len(), 12);
    assert!(
        rx.try_recv().is_err(),
        "nothing for the loading request yet"
    );

    fill(&mut target, &kv);
    target.finish(Ok(RemoteFirst {
        generated: first.tokens.clone(),
        sampler: Some(kv.sampler.clone()),
        loaded_tokens: None,
    }));
    let got = collect(rx);
    assert_eq!(got.tokens, reference.tokens);
    assert_eq!(got.text, reference.text);
    assert_eq!(
        got.logit_hashes[..],
        reference.logit_hashes[1..],
        "logits bits of every token computed here"
    );
    let s = common::wait_all_free(&d);
    assert_eq!(s.free_blocks, total);
}

/// The request ends, aborted, with the connector's `message`.
fn expect_load_failure(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>, message: &str) {
    match rx.blocking_recv() {
        Some(Event::Finished(f)) => {
            assert_eq!(f.reason, FinishReason::Abort);
            assert_eq!(f.error, Some(EngineError::KvTransfer(message.into())));
        }
        other => panic!("expected the failure, got {other:?}"),
    }
}

#[test]
fn failed_and_aborted_loads_free_their_blocks() {
    let m = common::real_model();
    let prompt = m.tokenizer.encode("Hello there, engine.").expect("encode");
    let conn = Arc::new(Manual::default());
    let d = consumer(&conn);
    let params = SamplingParams::greedy(4);

    // A failed load ends the request with the connector's message.
    let mut rx = d
        .submit(request("f", &prompt, &params, remote()))
        .expect("submit");
    conn.next_load()
        .finish(Err("producer 127.0.0.1:1 went away".into()));
    expect_load_failure(&mut rx, "producer 127.0.0.1:1 went away");
    common::wait_all_free(&d);

    // Aborted during its load: finished at once; blocks come back when the load ends.
    let mut rx = d
        .submit(request("a", &prompt, &params, remote()))
        .expect("submit");
    let target = conn.next_load();
    d.abort("a");
    match rx.blocking_recv() {
        Some(Event::Finished(f)) => assert_eq!(f.reason, FinishReason::Abort),
        other => panic!("expected the abort, got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(50));
    let s = d.stats();
    assert!(s.free_blocks < s.total_blocks, "still lent");
    drop(target);
    let s = common::wait_all_free(&d);
    assert_eq!(s.free_blocks, s.total_blocks);
}

/// A transport that may still be writing into the lent blocks (a NIXL read that never
/// ended) fails the load but keeps them: the request ends with the message, the blocks stay
/// counted as used (never handed to another request), and the engine goes on serving.
#[test]
fn blocks_of_a_load_that_may_still_land_are_quarantined() {
    let m = common::real_model();
    let prompt = m.tokenizer.encode("Hello there, engine.").expect("encode");
    let blocks = prompt.len().div_ceil(16);
    let conn = Arc::new(Manual::default());
    let d = consumer(&conn);
    let total = d.stats().total_blocks;
    let params = SamplingParams::greedy(4);
    let mut rx = d
        .submit(request("q", &prompt, &params, remote()))
        .expect("submit");
    let target = conn.next_load();
    assert_eq!(target.n_blocks(), blocks);
    target.fail_keeping_blocks("a read into these blocks did not end".into());
    expect_load_failure(&mut rx, "a read into these blocks did not end");
    let s = common::wait_stats(&d, |s| s.running == 0 && s.waiting == 0);
    assert_eq!(s.free_blocks, total - blocks);
    // Still serving, from the rest of the pool.
    let out = collect(
        d.submit(request("after", &prompt, &params, KvTransfer::None))
            .expect("submit"),
    );
    assert_eq!(out.tokens.len(), 4);
    let s = common::wait_stats(&d, |s| s.running == 0 && s.waiting == 0);
    assert_eq!(s.free_blocks, total - blocks);
}

#[test]
fn a_failed_load_is_recomputed_under_the_recompute_policy() {
    let m = common::real_model();
    let prompt = m
        .tokenizer
        .encode("The producer died before this prompt's KV arrived.")
        .expect("encode");
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(8)
    };
    let colo = Engine::start(m.clone(), EngineConfig::default(), None).expect("engine");
    let reference = collect(
        colo.submit(request("c", &prompt, &params, KvTransfer::None))
            .expect("submit"),
    );
    let conn = Arc::new(Manual::default());
    let d = Engine::start_with(
        m,
        EngineConfig {
            kv_load_failure_policy: splitserve_engine::LoadFailurePolicy::Recompute,
            ..EngineConfig::default()
        },
        None,
        Some(conn.clone() as Arc<dyn KvConnector>),
    )
    .expect("engine");
    let rx = d
        .submit(request("r", &prompt, &params, remote()))
        .expect("submit");
    conn.next_load()
        .finish(Err("producer 127.0.0.1:1 went away".into()));
    let got = collect(rx);
    assert_eq!(got.tokens, reference.tokens);
    assert_eq!(got.logit_hashes, reference.logit_hashes, "logits bits");
    let s = common::wait_all_free(&d);
    assert_eq!(s.load_failures_recomputed, 1);
    assert_eq!(s.prompt_tokens_computed, prompt.len() as u64);
    assert_eq!(s.free_blocks, s.total_blocks);
}

/// Keeps every block the engine offers, as a store connector would.
#[derive(Default)]
struct Store {
    saved: Mutex<Vec<([u8; 32], Vec<u8>)>>,
}

impl KvConnector for Store {
    fn remote_tokens(&self, _: &RemoteKv, _: usize) -> usize {
        0
    }
    fn start_load(&self, _: RemoteKv, target: LoadTarget) {
        target.finish(Err("a store loads nothing here".into()));
    }
    fn release(&self, _: RemoteKv) {}
    fn wants_saves(&self) -> bool {
        true
    }
    fn save_block(&self, hash: &[u8; 32], block: splitserve_engine::SavedBlock<'_>) {
        let mut bytes = Vec::new();
        for layer in 0..block.layout().n_layer {
            for part in block.layer(layer) {
                bytes.extend_from_slice(part);
            }
        }
        self.saved.lock().expect("lock").push((*hash, bytes));
    }
}

#[test]
fn full_blocks_are_offered_for_saving_once_by_their_hash() {
    let m = common::real_model();
    let prompt = m
        .tokenizer
        .encode(&"Blocks are saved by the hash of their tokens. ".repeat(4))
        .expect("encode");
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(20)
    };
    let run = |budget: usize| {
        let store = Arc::new(Store::default());
        let e = Engine::start_with(
            m.clone(),
            EngineConfig {
                max_num_batched_tokens: budget,
                prefix_cache_identity: "the model's fingerprint".into(),
                ..EngineConfig::default()
            },
            None,
            Some(store.clone() as Arc<dyn KvConnector>),
        )
        .expect("engine");
        let out = collect(
            e.submit(request("s", &prompt, &params, KvTransfer::None))
                .expect("submit"),
        );
        // The same prompt again: its blocks are cached, nothing new to save but what
        // its own generated tokens fill.
        let again = collect(
            e.submit(request("s2", &prompt, &params, KvTransfer::None))
                .expect("submit"),
        );
        assert_eq!(again.tokens, out.tokens);
        let layout = e.kv_layout();
        let saved = std::mem::take(&mut *store.saved.lock().expect("lock"));
        (saved, layout, out.tokens)
    };
    let (saved, layout, tokens) = run(512);
    // Every full block of prompt + generated tokens whose KV was computed (the last
    // token's is not), once, under the hash the prefix cache gives it.
    let all: Vec<u32> = [&prompt[..], &tokens[..]].concat();
    let computed = all.len() - 1;
    let root = splitserve_engine::prefix_cache::root("the model's fingerprint", None);
    let mut hashes = Vec::new();
    splitserve_engine::prefix_cache::extend(&root, &all[..computed], 16, &mut hashes);
    let got: Vec<[u8; 32]> = saved.iter().map(|(h, _)| *h).collect();
    assert_eq!(got, hashes);
    assert!(saved.iter().all(|(_, b)| b.len() == layout.block_bytes()));
    // Computed in chunks of 7, the same blocks hold the same bytes.
    let (chunked, _, _) = run(7);
    assert_eq!(chunked, saved);
}
