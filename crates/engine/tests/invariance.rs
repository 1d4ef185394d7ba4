//! Invariant (docs/design.md): a request's logits are bit-identical whether it runs alone,
//! batched with up to 15 others of different lengths, prefilled whole or in chunks of any
//! size, or preempted and recomputed; greedy tokens are therefore identical too.

mod common;

use common::{assert_same, run_all, wait_all_free, Output};

/// Each prompt alone on a default engine.
fn solo(prompts: &[Vec<u32>], params: &SamplingParams) -> Vec<Output> {
    common::solo(&EngineConfig::default(), prompts, params)
}
use splitserve_engine::{EngineConfig, SamplingParams};

const N_TOKENS: usize = 64;

fn prompts(n: usize) -> Vec<Vec<u32>> {
    let m = common::real_model();
    let base =
        "Disaggregated serving splits prefill and decode across engines so that long prompts \
                do not stall running streams. The KV cache of each prompt crosses a link. ";
    (0..n)
        .map(|i| {
            let text = format!(
                "{} Question {i}: {}",
                base.repeat(i % 5),
                [
                    "What is 2+2?",
                    "Name a color.",
                    "Write a haiku about the sea.",
                    "def fibonacci(n):"
                ][i % 4]
            );
            m.tokenizer.encode(&text).expect("encode")
        })
        .collect()
}

#[test]
fn batched_chunked_and_preempted_runs_match_solo_runs() {
    let m = common::real_model();
    let ps = prompts(16);
    let lens: Vec<usize> = ps.iter().map(|p| p.len()).collect();
    assert!(
        lens.iter().max() > lens.iter().min(),
        "prompts of different lengths: {lens:?}"
    );
    let greedy = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(N_TOKENS)
    };
    let reference = solo(&ps, &greedy);
    for r in &reference {
        assert_eq!(r.tokens.len(), N_TOKENS);
        assert_eq!(r.logit_hashes.len(), N_TOKENS);
    }

    // All 16 at once: batched decode, prefills sharing steps.
    let (batched, e) = run_all(&m, EngineConfig::default(), &ps, &greedy);
    assert_same(&reference, &batched, "16 batched");
    let s = wait_all_free(&e);
    assert_eq!(s.free_blocks, s.total_blocks);
    // They shared steps: alone, each takes at least N_TOKENS steps (16 x 64 in all); here
    // a few prefill steps more than one request's decode.
    assert!(
        s.steps <= (N_TOKENS + 16) as u64,
        "16 batched requests took {} steps",
        s.steps
    );

    // Chunked prefill with odd budgets (chunks of 1 row take the padded path), 4 at a time.
    for budget in [1usize, 7, 33] {
        let cfg = EngineConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: 4,
            // These prompts share a head: with the prefix cache, part of each would not be
            // computed at all, and these arms are about how it is computed.
            enable_prefix_caching: false,
            ..EngineConfig::default()
        };
        let (got, e) = run_all(&m, cfg, &ps[..4], &greedy);
        assert_same(&reference[..4], &got, &format!("chunk budget {budget}"));
        let s = wait_all_free(&e);
        assert_eq!(s.free_blocks, s.total_blocks);
    }

    // A budget of 32 tokens, shorter than these prompts: chunked, they are prefilled 32
    // tokens a step beside the others' decodes; with chunking off, each is prefilled whole
    // in a step with nothing else, so it waits for the running ones to finish.
    let lens = &lens[4..8];
    assert!(lens.iter().filter(|&&l| l > 32).count() >= 2, "{lens:?}");
    let mut steps = Vec::new();
    for chunked in [true, false] {
        let cfg = EngineConfig {
            enable_chunked_prefill: chunked,
            max_num_batched_tokens: 32,
            enable_prefix_caching: false,
            ..EngineConfig::default()
        };
        let (got, e) = run_all(&m, cfg, &ps[4..8], &greedy);
        assert_same(
            &reference[4..8],
            &got,
            &format!("chunked {chunked}, budget 32"),
        );
        steps.push(wait_all_free(&e).steps);
    }
    assert!(
        steps[1] > steps[0],
        "unchunked took {} steps, chunked {}: the schedules did not differ",
        steps[1],
        steps[0]
    );

    // A pool too small for all of them: requests are preempted and recomputed.
    let need: usize = ps[8..16]
        .iter()
        .map(|p| (p.len() + N_TOKENS).div_ceil(16))
        .sum();
    let cfg = EngineConfig {
        num_blocks: need / 2,
        max_model_len: Some(256),
        ..EngineConfig::default()
    };
    let (got, e) = run_all(&m, cfg, &ps[8..16], &greedy);
    assert_same(&reference[8..16], &got, "preempted");
    let s = wait_all_free(&e);
    assert!(
        s.preemptions > 0,
        "the small pool must force preemption: {s:?}"
    );
    assert_eq!(s.free_blocks, s.total_blocks);
}

#[test]
fn seeded_sampling_is_reproducible_batched_or_not() {
    let m = common::real_model();
    let ps = prompts(6);
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed: Some(1234),
        ignore_eos: true,
        ..SamplingParams::greedy(32)
    };
    let a = solo(&ps[..3], &params);
    let b = solo(&ps[..3], &params);
    assert_same(&a, &b, "seeded, repeated");
    let (batched, _) = run_all(&m, EngineConfig::default(), &ps[..3], &params);
    assert_same(&a, &batched, "seeded, batched");
    let other = SamplingParams {
        seed: Some(99),
        ..params.clone()
    };
    let c = solo(&ps[..1], &other);
    assert_ne!(
        a[0].tokens, c[0].tokens,
        "another seed gives another sample"
    );
}

#[test]
fn greedy_continuation_names_paris() {
    let m = common::real_model();
    let p = m
        .tokenizer
        .encode("The capital of France is")
        .expect("encode");
    let (out, _) = run_all(
        &m,
        EngineConfig::default(),
        &[p],
        &SamplingParams::greedy(8),
    );
    assert!(out[0].text.contains("Paris"), "{:?}", out[0].text);
}
