//! Engines on CPUs with different instruction sets must agree: the same greedy run with the
//! portable kernels, AVX2 and (where present) AVX-512 VNNI prints the same text, and a
//! server at each level answers with the same tokens and the same top-20 logprobs (f32,
//! printed shortest round-trip, so equal text means equal bits). The levels this CPU has
//! are printed; `SPLITSERVE_REQUIRE_SIMD=avx2|avx512` fails the test where one is missing.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

fn run(level: &str) -> String {
    run_model(level, None, "def fibonacci(n):", 48)
}

/// `generate` at a SIMD level with `model` (default: the default model).
fn run_model(level: &str, model: Option<&str>, prompt: &str, tokens: usize) -> String {
    let n = tokens.to_string();
    let mut args = vec![
        "generate",
        "--prompt",
        prompt,
        "--max-tokens",
        n.as_str(),
        "--threads",
        "2",
    ];
    if let Some(m) = model {
        args.extend(["--model", m]);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args(&args)
        .env("SPLITSERVE_SIMD", level)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run splitserve generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Drop the closing stats line (timings differ run to run).
    let body = text
        .trim_end()
        .rsplit_once('\n')
        .map(|(b, _)| b.to_string())
        .unwrap_or_default();
    assert!(text.contains(&format!("output tokens: {tokens}")), "{text}");
    body
}

/// The levels this CPU runs: portable, and avx2 / avx512 when it has their features.
fn levels() -> Vec<&'static str> {
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    let mut l = vec!["portable"];
    if has("avx2") && has("fma") {
        l.push("avx2");
        if ["avx512f", "avx512bw", "avx512_vnni"]
            .iter()
            .all(|f| has(f))
        {
            l.push("avx512");
        }
    }
    println!("SIMD levels compared: {l:?}");
    if let Ok(r) = std::env::var("SPLITSERVE_REQUIRE_SIMD") {
        assert!(
            l.contains(&r.as_str()),
            "SPLITSERVE_REQUIRE_SIMD={r}, but this CPU runs only {l:?}"
        );
    }
    l
}

#[test]
fn portable_avx2_and_best_level_generate_the_same_text() {
    let levels = levels();
    let portable = run("portable");
    assert!(!portable.trim().is_empty());
    if levels.contains(&"avx2") {
        assert_eq!(run("avx2"), portable);
    }
    assert_eq!(run(""), portable);
}

/// The same for Gemma 3 (Q6_K's per-16 scales, the Q5 and Q4_K repacks, GELU, NeoX RoPE)
/// with a prompt past its 512-position window, so that the windowed attention runs too.
#[test]
fn every_level_generates_the_same_gemma_text() {
    let levels = levels();
    let preset = splitserve_engine::model_file::preset("gemma3-270m").expect("preset");
    let path = splitserve_engine::model_file::model(preset, true).expect("gemma model");
    let model = path.display().to_string();
    let long = include_str!("../../engine/tests/data/gemma-long-prompt.txt");
    // About 700 tokens: past the window, and quick enough for the portable kernels.
    let prompt = &long[long.len() - 3000..];
    let portable = run_model("portable", Some(&model), prompt, 12);
    assert!(!portable.trim().is_empty());
    if levels.contains(&"avx2") {
        assert_eq!(run_model("avx2", Some(&model), prompt, 12), portable);
    }
    assert_eq!(run_model("", Some(&model), prompt, 12), portable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_level_answers_the_same_logprobs() {
    let levels = levels();
    let body = json!({"prompt": "The three primary colors are", "max_tokens": 24,
        "temperature": 0, "logprobs": 20, "return_token_ids": true});
    let mut answers = Vec::new();
    for level in &levels {
        // Unset (""): the best level this CPU has.
        let env = if *level == "avx512" { "" } else { level };
        let s = serve_env(&[], None, &[("SPLITSERVE_SIMD", env)]);
        ready(&s).await;
        let (st, v) = post(&format!("{}/v1/completions", s.url()), &body).await;
        assert_eq!(st, 200, "{v}");
        let lp = v["choices"][0]["logprobs"].clone();
        assert_eq!(lp["top_logprobs"].as_array().map(Vec::len), Some(24), "{v}");
        answers.push((level, lp));
    }
    let (first, reference) = &answers[0];
    for (level, lp) in &answers[1..] {
        assert_eq!(lp, reference, "{level} and {first} differ");
    }
}
