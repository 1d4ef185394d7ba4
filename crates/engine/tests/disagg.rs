//! Prefill on one engine, decode on another: the KV crosses as bytes and the continuation
//! is token- and logit-identical to one colocated engine. In process, at the engine's API;
//! the TCP side channel and the HTTP roles are tested in `kv/tests/tcp.rs` and
//! `cli/tests/pd.rs`.

mod common;

use common::{collect, engine, hash_bits, request};
use splitserve_engine::{
    Engine, EngineConfig, EngineError, Event, KvDtype, KvTransfer, SamplingParams,
};

/// Producer prefills and samples the first token; consumer imports the KV and continues.
fn disaggregated(
    prompt: &[u32],
    params: &SamplingParams,
    p: &Engine,
    d: &Engine,
) -> Result<common::Output, EngineError> {
    let first = SamplingParams {
        max_tokens: 1,
        ..params.clone()
    };
    let out = collect(
        p.submit(request("pd", prompt, &first, KvTransfer::Hold))
            .expect("submit"),
    );
    assert_eq!(out.tokens.len(), 1);
    let kv = p.export_held("pd")?;
    assert_eq!(kv.generated, out.tokens);
    let mut rx = d
        .submit(request(
            "pd",
            prompt,
            params,
            KvTransfer::Import(Box::new(kv)),
        ))
        .expect("submit");
    let mut o = common::Output {
        tokens: vec![],
        logit_hashes: out.logit_hashes.clone(),
        text: String::new(),
        reason: splitserve_engine::FinishReason::Abort,
        cached_tokens: 0,
    };
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => {
                o.tokens.push(t.token);
                o.text.push_str(&t.text);
                if let Some(l) = t.logits {
                    o.logit_hashes.push(hash_bits(&l));
                }
            }
            Event::Finished(f) => {
                if let Some(e) = f.error {
                    return Err(e);
                }
                o.reason = f.reason;
                break;
            }
        }
    }
    Ok(o)
}

#[test]
fn disaggregated_equals_colocated_and_frees_everything() {
    let m = common::real_model();
    let long = "The KV cache of a prompt is what crosses the link between engines. ".repeat(110);
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "def fibonacci(n):",
        long.as_str(),
    ]
    .iter()
    .map(|t| m.tokenizer.encode(t).expect("encode"))
    .collect();
    assert!(prompts[2].len() > 1500, "{}", prompts[2].len());
    for dtype in [KvDtype::F16, KvDtype::Q8_0] {
        pd_matches_colocated(&prompts, dtype);
    }
}

fn pd_matches_colocated(prompts: &[Vec<u32>], dtype: KvDtype) {
    let cfg = EngineConfig {
        kv_dtype: dtype,
        ..EngineConfig::default()
    };
    let colo = engine(cfg.clone());
    let p = engine(cfg.clone());
    let d = engine(cfg);
    for params in [
        SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(24)
        },
        SamplingParams {
            ignore_eos: true,
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(5),
            ..SamplingParams::greedy(24)
        },
    ] {
        for prompt in prompts {
            let reference = collect(
                colo.submit(request("c", prompt, &params, KvTransfer::None))
                    .expect("submit"),
            );
            let before = d.stats().prompt_tokens_computed;
            let got = disaggregated(prompt, &params, &p, &d).expect("pd run");
            assert_eq!(
                got.tokens,
                reference.tokens,
                "{dtype} tokens, prompt of {}",
                prompt.len()
            );
            assert_eq!(
                got.logit_hashes, reference.logit_hashes,
                "{dtype} logits bits"
            );
            assert_eq!(got.text, reference.text);
            assert_eq!(
                d.stats().prompt_tokens_computed,
                before,
                "the consumer computed no prompt token"
            );
        }
    }
    for e in [&p, &d] {
        let s = common::wait_all_free(e);
        assert_eq!(s.free_blocks, s.total_blocks);
    }
}

#[test]
fn mismatched_consumer_refuses_the_kv() {
    let m = common::real_model();
    let prompt = m.tokenizer.encode("Hello there").expect("encode");
    let p = engine(EngineConfig::default());
    for cfg in [
        EngineConfig {
            block_size: 32,
            ..EngineConfig::default()
        },
        EngineConfig {
            kv_dtype: KvDtype::F32,
            ..EngineConfig::default()
        },
        EngineConfig {
            kv_dtype: KvDtype::Q8_0,
            ..EngineConfig::default()
        },
    ] {
        let d = engine(cfg);
        let e =
            disaggregated(&prompt, &SamplingParams::greedy(4), &p, &d).expect_err("must refuse");
        assert!(
            matches!(&e, EngineError::KvMismatch(m) if m.contains("layout")),
            "{e}"
        );
        assert_eq!(
            common::wait_all_free(&d).free_blocks,
            d.stats().total_blocks
        );
    }
    assert!(matches!(
        p.export_held("nothing"),
        Err(EngineError::KvMismatch(_))
    ));
    assert_eq!(
        common::wait_all_free(&p).free_blocks,
        p.stats().total_blocks
    );
}

#[test]
fn held_blocks_are_freed_after_the_hold_timeout() {
    let m = common::real_model();
    let prompt = m.tokenizer.encode(&"word ".repeat(100)).expect("encode");
    let p = engine(EngineConfig {
        kv_hold_timeout: std::time::Duration::from_secs(2),
        ..EngineConfig::default()
    });
    let total = p.stats().total_blocks;
    let out = collect(
        p.submit(request(
            "held",
            &prompt,
            &SamplingParams::greedy(1),
            KvTransfer::Hold,
        ))
        .expect("submit"),
    );
    assert_eq!(out.tokens.len(), 1);
    // The hold exists when the request's last event is sent (read from the holds, not from
    // counters published at the end of a step); it can only have expired if this thread
    // slept for the whole 2 s timeout.
    let t0 = std::time::Instant::now();
    assert_eq!(
        p.stats().held_blocks,
        prompt.len().div_ceil(16),
        "the prompt's blocks are held"
    );
    assert!(p.stats().free_blocks < total, "held blocks are not free");
    while p.stats().free_blocks != total && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        p.stats().free_blocks,
        total,
        "freed once the hold timed out"
    );
    assert_eq!(p.stats().held_blocks, 0);
    assert!(
        p.export_held("held").is_err(),
        "expired KV can no longer be taken"
    );
}
