//! Automatic prefix caching: a request's logits are the same bits whether its prefix was
//! computed or came from the cache, the cache is used when it can be (counted), never across
//! salts, and every block is back (free or evictable) when the engine is idle.

mod common;

use common::*;
use splitserve_engine::{Engine, EngineConfig, KvTransfer, Request, SamplingParams};

const N_TOKENS: usize = 12;

fn greedy() -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(N_TOKENS)
    }
}

fn salted(id: &str, prompt: &[u32], salt: Option<&str>) -> Request {
    Request {
        cache_salt: salt.map(str::to_string),
        ..request(id, prompt, &greedy(), KvTransfer::None)
    }
}

fn run(e: &Engine, id: &str, prompt: &[u32], salt: Option<&str>) -> Output {
    collect(e.submit(salted(id, prompt, salt)).expect("submit"))
}

fn no_cache() -> EngineConfig {
    EngineConfig {
        enable_prefix_caching: false,
        ..EngineConfig::default()
    }
}

/// A system prompt of `sys` tokens, then a suffix of its own for each `k`.
fn prompts(sys: usize, suffix: usize, n: usize) -> Vec<Vec<u32>> {
    let m = real_model();
    let head = m
        .tokenizer
        .encode(&"You are a careful assistant who answers in short sentences. ".repeat(40))
        .expect("encode");
    assert!(head.len() >= sys);
    (0..n)
        .map(|k| {
            let tail = m
                .tokenizer
                .encode(&format!(
                    " Question {k}: what is {} times {}? Think about it step by step.",
                    k * 7 + 3,
                    k + 11
                ))
                .expect("encode");
            assert!(tail.len() >= suffix, "{} suffix tokens", tail.len());
            [&head[..sys], &tail[..suffix]].concat()
        })
        .collect()
}

#[test]
fn cached_prefixes_give_the_same_bits() {
    let ps = prompts(160, 14, 4);
    let reference = solo(&no_cache(), &ps, &greedy());

    // The same prompt twice: the second finds all its full blocks but the one holding its
    // last token, which is computed so that there are logits to sample.
    let e = engine(EngineConfig::default());
    let first = run(&e, "a", &ps[0], None);
    assert_eq!(first.cached_tokens, 0);
    let before = e.stats();
    let again = run(&e, "a2", &ps[0], None);
    let after = wait_all_free(&e);
    let len = ps[0].len();
    let hit = (len - 1) / 16 * 16;
    assert_eq!(again.cached_tokens, hit);
    assert_eq!(
        after.prompt_tokens_computed - before.prompt_tokens_computed,
        (len - hit) as u64
    );
    assert_eq!(
        after.prefix_cache_queries - before.prefix_cache_queries,
        len as u64
    );
    assert_eq!(
        after.prefix_cache_hits - before.prefix_cache_hits,
        hit as u64
    );
    for got in [&first, &again] {
        assert_eq!(got.tokens, reference[0].tokens);
        assert_eq!(got.logit_hashes, reference[0].logit_hashes, "logits bits");
    }
    // Idle: every block is free or evictable.
    assert_eq!(after.free_blocks, after.total_blocks);

    // A shared system prompt with different suffixes, at several chunk budgets: each later
    // prompt reuses the 160-token head (10 blocks) and computes its own suffix.
    for budget in [1usize, 7, 512] {
        let e = engine(EngineConfig {
            max_num_batched_tokens: budget,
            ..EngineConfig::default()
        });
        for (k, p) in ps.iter().enumerate() {
            let got = run(&e, &format!("s{k}"), p, None);
            assert_eq!(
                got.cached_tokens,
                if k == 0 { 0 } else { 160 },
                "budget {budget}"
            );
            assert_eq!(
                got.tokens, reference[k].tokens,
                "budget {budget}, prompt {k}"
            );
            assert_eq!(
                got.logit_hashes, reference[k].logit_hashes,
                "budget {budget}, prompt {k}: logits bits"
            );
        }
        let s = wait_all_free(&e);
        assert_eq!(s.free_blocks, s.total_blocks, "budget {budget}");
        assert_eq!(s.prefix_cache_hits, 3 * 160, "budget {budget}");
    }

    // All four at once, sharing blocks while they run.
    let e = engine(EngineConfig::default());
    let _ = run(&e, "warm", &ps[0], None);
    let rxs: Vec<_> = ps
        .iter()
        .enumerate()
        .map(|(k, p)| e.submit(salted(&format!("b{k}"), p, None)).expect("submit"))
        .collect();
    for (k, rx) in rxs.into_iter().enumerate() {
        let got = collect(rx);
        assert!(
            got.cached_tokens >= 160,
            "prompt {k}: {}",
            got.cached_tokens
        );
        assert_eq!(
            got.logit_hashes, reference[k].logit_hashes,
            "batched prompt {k}"
        );
    }
    let s = wait_all_free(&e);
    assert_eq!(s.free_blocks, s.total_blocks);
}

#[test]
fn salts_isolate_and_caching_can_be_turned_off() {
    let ps = prompts(64, 10, 1);
    let e = engine(EngineConfig::default());
    assert_eq!(run(&e, "t1", &ps[0], Some("tenant-1")).cached_tokens, 0);
    assert_eq!(run(&e, "t2", &ps[0], Some("tenant-2")).cached_tokens, 0);
    assert_eq!(run(&e, "none", &ps[0], None).cached_tokens, 0);
    assert_eq!(run(&e, "t1b", &ps[0], Some("tenant-1")).cached_tokens, 64);
    assert_eq!(run(&e, "none2", &ps[0], None).cached_tokens, 64);

    let off = engine(no_cache());
    for id in ["x", "y"] {
        assert_eq!(run(&off, id, &ps[0], None).cached_tokens, 0);
    }
    let s = wait_all_free(&off);
    assert_eq!((s.prefix_cache_queries, s.prefix_cache_hits), (0, 0));
    assert_eq!(s.prompt_tokens_computed, 2 * ps[0].len() as u64);
}

#[test]
fn preempted_requests_find_their_own_blocks_and_evicted_ones_are_recomputed() {
    let ps = prompts(96, 12, 8);
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(40)
    };
    let reference = solo(&no_cache(), &ps, &params);
    // A pool too small for all eight: the newest are preempted; when they come back their
    // computed full blocks are still cached (unless taken since) and are not recomputed.
    // Too small even when all but the first share its head from the start (6 + 8 × 4
    // blocks): whether they do depends on when they reach the engine.
    let need: usize = ps.iter().map(|p| (p.len() + 40).div_ceil(16)).sum();
    let cfg = EngineConfig {
        num_blocks: need * 3 / 8,
        max_model_len: Some(256),
        ..EngineConfig::default()
    };
    let (got, e) = run_all(&real_model(), cfg, &ps, &params);
    for (k, (g, r)) in got.iter().zip(&reference).enumerate() {
        assert_eq!(g.tokens, r.tokens, "prompt {k}");
        assert_eq!(g.logit_hashes, r.logit_hashes, "prompt {k}: logits bits");
    }
    let s = wait_all_free(&e);
    assert!(s.preemptions > 0, "{s:?}");
    assert_eq!(s.free_blocks, s.total_blocks);
    // All but the first share the 96-token head (6 blocks) from the start, and the
    // preempted ones find more on their return.
    assert!(s.prefix_cache_hits >= 7 * 96, "{s:?}");
    println!("{s:?}");

    // Another prompt needs 14 of the 16 blocks: 9 free ones and 5 of the first prompt's 7
    // cached ones, its tail first (released last-block-first). The first prompt then finds
    // only its first 2 blocks and recomputes the rest, with the same bits.
    let e = engine(EngineConfig {
        num_blocks: 16,
        max_model_len: Some(256),
        ..EngineConfig::default()
    });
    let first = run(&e, "p", &ps[0], None);
    assert_eq!(
        first.logit_hashes[..],
        reference[0].logit_hashes[..N_TOKENS]
    );
    let other: Vec<u32> = (0..200u32).map(|i| 1000 + i * 7).collect();
    let _ = run(&e, "other", &other, None);
    let again = run(&e, "p2", &ps[0], None);
    assert_eq!(again.cached_tokens, 32, "the tail was evicted first");
    assert_eq!(again.logit_hashes, first.logit_hashes);
    let s = wait_all_free(&e);
    assert_eq!(s.free_blocks, s.total_blocks);
}
