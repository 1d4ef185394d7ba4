//! Live migration between two engines in one process: a request parked after 1, 17 or 63
//! tokens and continued elsewhere produces exactly the tokens, text and logits bits of an
//! uninterrupted run; a target without room refuses and the source finishes the request.

mod common;

use common::{block_on, collect, engine, migrated, request};
use splitserve_engine::{
    EngineConfig, EngineError, Event, FinishReason, KvTransfer, Request, SamplingParams,
};

#[test]
fn migrated_requests_continue_token_identical() {
    let m = common::real_model();
    let prompt = m
        .tokenizer
        .encode("Write a short story about a lighthouse keeper who finds a message in a bottle.")
        .expect("encode");
    let reference_engine = engine(EngineConfig::default());
    let a = engine(EngineConfig::default());
    let b = engine(EngineConfig::default());
    for params in [
        SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(72)
        },
        SamplingParams {
            ignore_eos: true,
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(11),
            ..SamplingParams::greedy(72)
        },
    ] {
        let reference = collect(
            reference_engine
                .submit(request("r", &prompt, &params, KvTransfer::None))
                .expect("submit"),
        );
        assert_eq!(reference.tokens.len(), 72);
        for n in [1, 17, 63] {
            let before_b = b.stats().prompt_tokens_computed;
            let got = migrated(&a, &b, &prompt, &params, n);
            assert_eq!(got.tokens, reference.tokens, "tokens, moved after {n}");
            assert_eq!(got.text, reference.text, "text, moved after {n}");
            assert_eq!(got.logit_hashes, reference.logit_hashes, "logits bits");
            assert_eq!(got.reason, FinishReason::Length);
            assert_eq!(
                b.stats().prompt_tokens_computed,
                before_b,
                "the target recomputed no prompt token"
            );
        }
    }
    for e in [&a, &b] {
        let s = common::wait_all_free(e);
        assert_eq!(s.free_blocks, s.total_blocks);
    }
}

#[test]
fn a_full_target_refuses_and_the_source_finishes() {
    let m = common::real_model();
    let prompt = m
        .tokenizer
        .encode("List the planets of the solar system in order.")
        .expect("encode");
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(40)
    };
    let a = engine(EngineConfig::default());
    let full = engine(EngineConfig {
        num_blocks: 11,
        ..EngineConfig::default()
    });
    // Fill the target: a held prompt of 150 tokens keeps 10 of its 11 blocks.
    let filler: Vec<u32> = (0..150).map(|i| 1000 + i).collect();
    let mut rx = full
        .submit(Request {
            id: "filler".into(),
            prompt: filler,
            params: SamplingParams::greedy(1),
            return_logits: false,
            kv: KvTransfer::Hold,
            cache_salt: None,

            resumed: 0,
        })
        .expect("submit filler");
    while let Some(ev) = rx.blocking_recv() {
        if matches!(ev, Event::Finished(_)) {
            break;
        }
    }
    let reference = collect(
        a.submit(request("r", &prompt, &params, KvTransfer::None))
            .expect("submit"),
    );

    let rx = a
        .submit(request("m", &prompt, &params, KvTransfer::None))
        .expect("submit");
    let parked = block_on(a.park(&["m"], 17)).expect("park");
    let needed = (prompt.len() + 17 + 1).div_ceil(16);
    let err = block_on(full.adopt(parked.migration)).expect_err("refused");
    assert_eq!(err, EngineError::NoFreeBlocks { needed, free: 1 });
    a.resume_parked("m");
    let got = collect(rx);
    assert_eq!(got.tokens, reference.tokens);
    assert_eq!(got.text, reference.text);
    assert_eq!(got.logit_hashes, reference.logit_hashes);
    let s = common::wait_all_free(&a);
    assert_eq!(s.free_blocks, s.total_blocks);
    // Unknown ids are named.
    assert_eq!(
        block_on(a.park(&["nope"], 0)).err(),
        Some(EngineError::NotFound("nope".into()))
    );
}
