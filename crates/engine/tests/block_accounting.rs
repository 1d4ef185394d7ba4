//! Blocks return to the free count after every request: finished, preempted, aborted by id,
//! or dropped by its client. Runs on the tiny synthetic model (fast).

mod common;

use std::sync::Arc;

use splitserve_engine::{Engine, EngineConfig, Event, KvTransfer, Model, Request, SamplingParams};

fn engine(num_blocks: usize) -> Engine {
    let model = Arc::new(Model::load(&common::tiny_model_path("acct.gguf")).expect("tiny model"));
    Engine::start(
        model,
        EngineConfig {
            block_size: 4,
            num_blocks,
            max_model_len: Some(64),
            max_num_seqs: 8,
            ..EngineConfig::default()
        },
        None,
    )
    .expect("engine")
}

fn req(id: &str, len: usize, max_tokens: usize) -> Request {
    Request {
        id: id.into(),
        prompt: (0..len as u32).map(|i| 3 + i % 200).collect(),
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        },
        return_logits: false,
        kv: KvTransfer::None,
        cache_salt: None,

        resumed: 0,
    }
}

#[test]
fn finished_preempted_and_cancelled_requests_return_their_blocks() {
    let e = engine(24);
    assert_eq!(e.stats().free_blocks, 24);
    // 8 requests of 10 + 30 tokens need 10 blocks each: far more than 24, so the
    // scheduler must preempt; every one still finishes with all its tokens.
    let rxs: Vec<_> = (0..8)
        .map(|i| e.submit(req(&format!("r{i}"), 10, 30)).expect("submit"))
        .collect();
    for rx in rxs {
        let out = common::collect_plain(rx);
        assert_eq!(out, 30);
    }
    let s = common::wait_all_free(&e);
    assert_eq!(s.free_blocks, 24);
    assert!(s.preemptions > 0, "{s:?}");

    // Aborted by id mid-way.
    let mut rx = e.submit(req("abort-me", 10, 50)).expect("submit");
    let first = rx.blocking_recv();
    assert!(matches!(first, Some(Event::Token(_))));
    e.abort("abort-me");
    let mut finished = None;
    while let Some(ev) = rx.blocking_recv() {
        if let Event::Finished(f) = ev {
            finished = Some(f.reason);
        }
    }
    assert_eq!(finished, Some(splitserve_engine::FinishReason::Abort));
    assert_eq!(common::wait_all_free(&e).free_blocks, 24);

    // Client went away: the receiver is dropped while the request runs or waits.
    for i in 0..4 {
        let mut rx = e.submit(req(&format!("gone{i}"), 12, 50)).expect("submit");
        if i % 2 == 0 {
            let _ = rx.blocking_recv();
        }
        drop(rx);
    }
    let s = common::wait_all_free(&e);
    assert_eq!(s.free_blocks, 24, "{s:?}");
}

#[test]
fn requests_too_long_for_the_context_are_refused() {
    let e = engine(24);
    let err = e
        .submit(req("long", 60, 10))
        .expect_err("over max_model_len");
    assert!(err.to_string().contains("64"), "{err}");
    let err = e.submit(req("empty", 0, 10)).expect_err("empty");
    assert_eq!(err, splitserve_engine::EngineError::EmptyPrompt);
    let mut r = req("bad-id", 3, 1);
    r.prompt[1] = 10_000_000;
    assert!(matches!(
        e.submit(r),
        Err(splitserve_engine::EngineError::BadTokenId { .. })
    ));
    assert_eq!(e.stats().free_blocks, 24);
}
