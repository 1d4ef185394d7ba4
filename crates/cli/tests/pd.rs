//! Disaggregation end to end with real processes on loopback and the real model: a producer,
//! a consumer and the proxy against one colocated engine. Outputs must be token-identical,
//! mismatched pairs refused by field, and no KV block may leak, whatever dies.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

fn prompts() -> Vec<String> {
    let mut v: Vec<String> = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea,",
        "List three primary colors:",
        "Q: What is 12 times 12?\nA:",
        "The quick brown fox",
        "In 1969, the first humans",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut long = String::new();
    for i in 0..50 {
        long.push_str(&format!(
            "Paragraph {i}: the river ran past mill number {} while the keeper counted {} sacks of grain and wrote them in his ledger. ",
            i * 7 % 13,
            i * i % 97
        ));
    }
    long.push_str("In summary, the keeper's ledger says");
    v.push(long);
    v
}

fn body(prompt: &str, seeded: Option<u64>, max_tokens: u32) -> Value {
    match seeded {
        None => {
            json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": true})
        }
        Some(seed) => json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.9,
            "top_p": 0.95, "seed": seed, "return_token_ids": true}),
    }
}

fn tokens(v: &Value) -> Vec<u64> {
    v["choices"][0]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {v}"))
        .iter()
        .map(|x| x.as_u64().expect("token id"))
        .collect()
}

/// Reads an SSE response to its end: the data payloads in order.
async fn sse(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.expect("stream body");
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn chat_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_pair_equals_colocated_and_nothing_leaks() {
    pair_equals_colocated_and_nothing_leaks("TcpConnector").await
}

/// The same, with the KV read over NIXL (builds with `--features nixl`; the library must be
/// on LD_LIBRARY_PATH, as `.ci/run` puts it).
#[cfg(feature = "nixl")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nixl_pair_equals_colocated_and_nothing_leaks() {
    pair_equals_colocated_and_nothing_leaks("NixlConnector").await
}

/// A colocated engine, a producer, a consumer and the proxy over the pair, all ready, with
/// `extra` serve flags for each engine.
async fn colocated_and_pair(connector: &str, extra: &[&str]) -> (Proc, Proc, Proc, Proc) {
    let kv_config = |role: &str, side: u16, hold: f64| kv_config_for(connector, role, side, hold);
    // Prompts are processed one at a time here, so the prefilling engines get both cores.
    let two = [extra, &["--threads", "2"]].concat();
    let colo = serve(&two, None);
    let prod = serve(&two, Some(kv_config("kv_producer", free_port(), 15.0)));
    let cons = serve(extra, Some(kv_config("kv_consumer", free_port(), 15.0)));
    let proxy = spawn(&[
        "proxy".into(),
        "--prefill".into(),
        prod.url(),
        "--decode".into(),
        cons.url(),
    ]);
    for p in [&colo, &prod, &cons, &proxy] {
        ready(p).await;
    }
    (colo, prod, cons, proxy)
}

async fn pair_equals_colocated_and_nothing_leaks(connector: &str) {
    let (colo, prod, cons, proxy) = colocated_and_pair(connector, &[]).await;
    let (c_url, p_url) = (
        format!("{}/v1/completions", colo.url()),
        format!("{}/v1/completions", proxy.url()),
    );

    let t0 = std::time::Instant::now();
    // 1. Eight prompts (one over 1,500 tokens), greedy and seeded: token for token.
    let mut long_len = 0;
    for (i, prompt) in prompts().iter().enumerate() {
        for seeded in [None, Some(1000 + i as u64)] {
            let b = body(prompt, seeded, 24);
            let (a, d) =
                same_answer(&c_url, &p_url, &b, &format!("prompt {i} seeded={seeded:?}")).await;
            assert_eq!(
                a["choices"][0]["finish_reason"],
                d["choices"][0]["finish_reason"]
            );
            assert_eq!(a["usage"], d["usage"]);
            long_len = long_len.max(a["usage"]["prompt_tokens"].as_u64().unwrap_or(0));
        }
    }
    assert!(long_len > 1500, "longest prompt has only {long_len} tokens");
    assert_eq!(metric(&cons, "prompt_tokens_computed").await, 0.0);
    assert!(metric(&cons, "kv_transfer_bytes_received_total").await > 0.0);
    assert_eq!(
        metric(&cons, "kv_transfer_bytes_received_total").await,
        metric(&prod, "kv_transfer_bytes_sent_total").await
    );

    eprintln!("section 2 at {:?}", t0.elapsed());
    // 2. Chat, streamed through the proxy, equals colocated chat.
    let chat = json!({"messages": [{"role": "user", "content": "Name a planet."}],
        "max_tokens": 16, "temperature": 0});
    let (_, a) = post(&format!("{}/v1/chat/completions", colo.url()), &chat).await;
    let mut sc = chat.clone();
    sc["stream"] = json!(true);
    let r = client()
        .post(format!("{}/v1/chat/completions", proxy.url()))
        .header("x-request-id", "chat-stream-1")
        .json(&sc)
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "chat-stream-1");
    let ev = sse(r).await;
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        a["choices"][0]["message"]["content"].as_str(),
        Some(chat_text(&ev).as_str())
    );

    eprintln!("section 3 at {:?}", t0.elapsed());
    // 3. vLLM's contract carries no first token: the consumer recomputes one position.
    let before = metric(&cons, "prompt_tokens_computed").await;
    let ps = prompts();
    for (i, prompt) in ps.iter().take(3).enumerate() {
        for seeded in [None, Some(7 + i as u64)] {
            let b = body(prompt, seeded, 12);
            let (_, a) = post(&c_url, &b).await;
            let mut pre = b.clone();
            pre["max_tokens"] = json!(1);
            pre["kv_transfer_params"] = json!({"do_remote_decode": true});
            let (s, p) = post(&format!("{}/v1/completions", prod.url()), &pre).await;
            assert_eq!(s, 200, "{p}");
            let mut params = p["kv_transfer_params"].clone();
            for k in ["first_token_ids", "fingerprint"] {
                params.as_object_mut().expect("params").remove(k);
            }
            let mut dec = b.clone();
            dec["kv_transfer_params"] = params;
            let (s, d) = post(&format!("{}/v1/completions", cons.url()), &dec).await;
            assert_eq!(s, 200, "{d}");
            assert_eq!(tokens(&a), tokens(&d), "vLLM contract, prompt {i}");
        }
    }
    assert_eq!(metric(&cons, "prompt_tokens_computed").await, before + 6.0);

    // 3a. A one-token request is answered by the prefill instance alone: same token, no KV
    // shipped, nothing held.
    let (pulled, sent) = (
        metric(&cons, "kv_transfer_bytes_received_total").await,
        metric(&prod, "kv_transfer_bytes_sent_total").await,
    );
    for stream in [false, true] {
        let mut b = body(&ps[7], Some(3), 1);
        let (_, a) = post(&c_url, &b).await;
        if stream {
            b["stream"] = json!(true);
            let r = client().post(&p_url).json(&b).send().await.expect("stream");
            assert_eq!(r.status(), 200);
            let ev = sse(r).await;
            assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
            let text: String = ev
                .iter()
                .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                .filter_map(|v| v["choices"][0]["text"].as_str().map(str::to_string))
                .collect();
            assert_eq!(a["choices"][0]["text"].as_str(), Some(text.as_str()));
        } else {
            let (s, d) = post(&p_url, &b).await;
            assert_eq!(s, 200, "{d}");
            assert_eq!(tokens(&a), tokens(&d));
            assert_eq!(a["usage"], d["usage"]);
        }
    }
    assert_eq!(
        metric(&cons, "kv_transfer_bytes_received_total").await,
        pulled
    );
    assert_eq!(metric(&prod, "kv_transfer_bytes_sent_total").await, sent);
    assert_eq!(metric(&prod, "kv_held_blocks").await, 0.0);

    // 3b. Conditional disaggregation: a short prompt is prefilled on the decode instance.
    let proxy2 = spawn(&[
        "proxy".into(),
        "--prefill".into(),
        prod.url(),
        "--decode".into(),
        cons.url(),
        "--disagg-threshold".into(),
        "64".into(),
    ]);
    ready(&proxy2).await;
    let (computed, pulled) = (
        metric(&cons, "prompt_tokens_computed").await,
        metric(&cons, "kv_transfer_bytes_received_total").await,
    );
    let b = body(&ps[0], None, 8);
    let (_, a) = post(&c_url, &b).await;
    let (s, d) = post(&format!("{}/v1/completions", proxy2.url()), &b).await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(tokens(&a), tokens(&d));
    let n = a["usage"]["prompt_tokens"].as_f64().unwrap_or(0.0);
    assert_eq!(metric(&cons, "prompt_tokens_computed").await, computed + n);
    assert_eq!(
        metric(&cons, "kv_transfer_bytes_received_total").await,
        pulled
    );
    let b = body(&ps[7], None, 4);
    let (_, a) = post(&c_url, &b).await;
    let (_, d) = post(&format!("{}/v1/completions", proxy2.url()), &b).await;
    assert_eq!(tokens(&a), tokens(&d));
    assert!(metric(&cons, "kv_transfer_bytes_received_total").await > pulled);
    drop(proxy2);

    eprintln!("section 4 at {:?}", t0.elapsed());
    let steps_before = metric(&cons, "decode_step_seconds_count").await;
    // 4. Fifty mixed requests through the proxy; then every block is free on both sides.
    let mut futs = Vec::new();
    for k in 0..50u64 {
        let url = proxy.url();
        futs.push(async move {
            let prompt = format!("Request {k}: write a word about the number {}.", k * 3);
            let (path, mut b) = if k % 2 == 0 {
                ("/v1/completions", json!({"prompt": prompt}))
            } else {
                (
                    "/v1/chat/completions",
                    json!({"messages": [{"role": "user", "content": prompt}]}),
                )
            };
            b["max_tokens"] = json!(4 + k % 13);
            b["temperature"] = json!(if k % 3 == 0 { 0.0 } else { 0.7 });
            b["stream"] = json!(k % 4 < 2);
            if k % 10 == 3 {
                // Goes away after its first chunk, long before its last token is made.
                b["stream"] = json!(true);
                b["max_tokens"] = json!(1000);
                b["ignore_eos"] = json!(true);
            }
            if k % 10 == 7 {
                b["max_tokens"] = json!(-1);
                let (s, v) = post(&format!("{url}{path}"), &b).await;
                assert_eq!(s, 400, "{v}");
                assert!(v["error"]["message"].is_string());
                return;
            }
            let r = client()
                .post(format!("{url}{path}"))
                .json(&b)
                .send()
                .await
                .expect("sent");
            let status = r.status();
            if status != 200 {
                panic!(
                    "request {k}: {status} {}",
                    r.text().await.unwrap_or_default()
                );
            }
            if k % 10 == 3 {
                // A client that goes away after the first chunk.
                let mut s = r.bytes_stream();
                let _ = s.next().await;
                return;
            }
            let _ = r.bytes().await.expect("body");
        });
        if futs.len() == 10 {
            futures_util::future::join_all(futs.drain(..)).await;
        }
    }
    futures_util::future::join_all(futs).await;
    all_free(&prod, Duration::from_secs(10)).await;
    all_free(&cons, Duration::from_secs(10)).await;
    // The five clients that went away were seen to go: their requests ended as aborted, and
    // the consumer stopped decoding them long before their 1,000 tokens.
    let aborted = r#"request_success_total{finished_reason="abort"}"#;
    assert_eq!(metric(&cons, aborted).await, 5.0);
    let steps = metric(&cons, "decode_step_seconds_count").await - steps_before;
    assert!(steps < 600.0, "{steps} decode steps");

    eprintln!("section 5 at {:?}", t0.elapsed());
    // 5. The consumer dies mid-stream: the client gets an error event, the stream ends, and
    // the producer holds nothing.
    let b = json!({"prompt": "Count to one hundred:", "max_tokens": 400, "ignore_eos": true,
        "temperature": 0, "stream": true});
    let r = client().post(&p_url).json(&b).send().await.expect("stream");
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    let mut seen = String::new();
    while seen.matches("data: ").count() < 3 {
        let chunk = s.next().await.expect("chunk").expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    cons.kill();
    let mut rest = String::new();
    while let Some(c) = s.next().await {
        match c {
            Ok(b) => rest.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => break,
        }
    }
    assert!(
        rest.contains("\"error\"") && rest.contains("decode instance"),
        "no error event after the consumer died: {rest:?}"
    );
    assert!(!rest.contains("[DONE]"));

    // The consumer is dead before it pulls: the proxy answers 502 naming the decode side,
    // and the producer's hold for that request is freed by its hold timeout (15 s).
    let (st, v) = post(&p_url, &json!({"prompt": "Hello there", "max_tokens": 4})).await;
    assert_eq!(st, 502, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("decode"), "{msg}");
    assert!(
        metric(&prod, "kv_held_blocks").await > 0.0,
        "the KV is held"
    );
    let freed = all_free(&prod, Duration::from_secs(30)).await;
    eprintln!("unpulled hold freed after {freed:?}");

    eprintln!("section 6 at {:?}", t0.elapsed());
    // 6. The producer dies: the next request fails at once with a clear 502.
    prod.kill();
    let (s, v) = post(&p_url, &json!({"prompt": "Hello", "max_tokens": 4})).await;
    assert_eq!(s, 502, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("prefill"), "{msg}");
}

/// The second model (Gemma 3 270M: K-quants, sliding-window layers, SentencePiece
/// tokenizer) through the same pair: token-identical to colocated, greedy and seeded, for
/// prompts shorter and longer than its 512-position window, and for chat; the local
/// layers' KV crosses only for the window (bytes counted); nothing leaks.
/// `b` posted to the colocated engine (`c_url`) and through the pair (`p_url`): both
/// answer 200 with the same tokens and text; the two answers.
async fn same_answer(c_url: &str, p_url: &str, b: &Value, what: &str) -> (Value, Value) {
    let (s1, a) = post(c_url, b).await;
    let (s2, d) = post(p_url, b).await;
    assert_eq!((s1, s2), (200, 200), "{a} / {d}");
    assert_eq!(tokens(&a), tokens(&d), "{what}");
    assert_eq!(a["choices"][0]["text"], d["choices"][0]["text"]);
    (a, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma_pair_equals_colocated_and_nothing_leaks() {
    gemma_pair("TcpConnector").await
}

/// The same, with the KV read over NIXL: each layer's blocks are read where they lie in the
/// producer's pool, the local layers' from their window slots.
#[cfg(feature = "nixl")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma_nixl_pair_equals_colocated_and_nothing_leaks() {
    gemma_pair("NixlConnector").await
}

async fn gemma_pair(connector: &str) {
    let preset = splitserve_engine::model_file::preset("gemma3-270m").expect("preset");
    let path = splitserve_engine::model_file::model(preset, true).expect("gemma model");
    let gemma = path.display().to_string();
    let (colo, prod, cons, proxy) =
        colocated_and_pair(connector, &["--model", gemma.as_str()]).await;
    let (c_url, p_url) = (
        format!("{}/v1/completions", colo.url()),
        format!("{}/v1/completions", proxy.url()),
    );
    let ps = prompts();
    // The local layers ship only the blocks their window reaches from the next position:
    // per block and layer, K and V of 16 positions × 1 KV head × 256 dims in f16.
    let (s, d) = post(&p_url, &body(&ps[7], None, 4)).await;
    assert_eq!(s, 200, "{d}");
    let n = d["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
    assert!(n > 512, "{n}");
    let (all, windowed) = (n.div_ceil(16), n.div_ceil(16) - (n - 512) / 16);
    assert_eq!(
        metric(&prod, "kv_transfer_bytes_sent_total").await,
        ((3 * all + 15 * windowed) * 16_384) as f64,
        "{n} tokens: {all} blocks in the 3 global layers, {windowed} in the 15 local ones"
    );
    let mut longest = 0;
    for (i, prompt) in [&ps[0], &ps[2], &ps[7]].into_iter().enumerate() {
        for seeded in [None, Some(40 + i as u64)] {
            let b = body(prompt, seeded, 16);
            let (a, _) =
                same_answer(&c_url, &p_url, &b, &format!("prompt {i} seeded={seeded:?}")).await;
            longest = longest.max(a["usage"]["prompt_tokens"].as_u64().unwrap_or(0));
        }
    }
    assert!(longest > 512, "longest prompt has only {longest} tokens");
    let chat = json!({"messages": [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a planet."}], "max_tokens": 16, "temperature": 0});
    let (s1, a) = post(&format!("{}/v1/chat/completions", colo.url()), &chat).await;
    let (s2, d) = post(&format!("{}/v1/chat/completions", proxy.url()), &chat).await;
    assert_eq!((s1, s2), (200, 200), "{a} / {d}");
    assert_eq!(a["choices"][0]["message"], d["choices"][0]["message"]);
    assert_eq!(a["usage"], d["usage"]);
    assert_eq!(metric(&cons, "prompt_tokens_computed").await, 0.0);
    assert_eq!(
        metric(&cons, "kv_transfer_bytes_received_total").await,
        metric(&prod, "kv_transfer_bytes_sent_total").await
    );
    all_free(&prod, Duration::from_secs(10)).await;
    all_free(&cons, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_pairs_are_refused_by_field() {
    pairs_mismatched_are_refused_by_field("TcpConnector").await
}

#[cfg(feature = "nixl")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nixl_mismatched_pairs_are_refused_by_field() {
    pairs_mismatched_are_refused_by_field("NixlConnector").await
}

async fn pairs_mismatched_are_refused_by_field(connector: &str) {
    let kv_config = |role: &str, side: u16, hold: f64| kv_config_for(connector, role, side, hold);
    let dir =
        std::env::temp_dir().join(format!("splitserve-pd-{}-{connector}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // Same shape, different weights: only the file hash tells them apart.
    let other = dir.join("other.gguf");
    std::fs::copy(model(), &other).expect("copy model");
    let mut bytes = std::fs::read(&other).expect("read copy");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&other, &bytes).expect("write copy");
    drop(bytes);

    let prod = serve(&[], Some(kv_config("kv_producer", free_port(), 2.0)));
    let kv = || Some(kv_config("kv_consumer", free_port(), 2.0));
    let other_s = other.display().to_string();
    let consumers = [
        (
            serve(&["--block-size", "32"], kv()),
            "block_size",
            "32",
            "16",
        ),
        (
            serve(&["--kv-cache-dtype", "f32"], kv()),
            "kv_dtype",
            "f32",
            "f16",
        ),
        (
            serve(
                &[
                    "--model",
                    &other_s,
                    "--served-model-name",
                    "SmolLM2-135M-Instruct.Q4_1",
                ],
                kv(),
            ),
            "model_sha256",
            "",
            "",
        ),
    ];
    ready(&prod).await;
    for (c, ..) in &consumers {
        ready(c).await;
    }
    for (c, field, ours, theirs) in &consumers {
        let b = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
        let mut pre = b.clone();
        pre["max_tokens"] = json!(1);
        pre["kv_transfer_params"] = json!({"do_remote_decode": true});
        let (s, p) = post(&format!("{}/v1/completions", prod.url()), &pre).await;
        assert_eq!(s, 200, "{p}");
        let mut dec = b.clone();
        dec["kv_transfer_params"] = p["kv_transfer_params"].clone();
        let (s, v) = post(&format!("{}/v1/completions", c.url()), &dec).await;
        assert_eq!(s, 502, "{field}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(&format!("{field} differs")), "{msg}");
        if !ours.is_empty() {
            assert!(
                msg.contains(&format!("ours {ours}, theirs {theirs}")),
                "{msg}"
            );
        }
        assert!(v["choices"].is_null(), "nothing may be decoded: {v}");
        all_free(c, Duration::from_secs(2)).await;
    }
    // The refused holds are freed by the producer's hold timeout (2 s).
    all_free(&prod, Duration::from_secs(6)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_kv_transfer_config_is_a_startup_error_naming_the_field() {
    for (json, field) in [
        (
            r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_producer"}"#,
            "kv_connector",
        ),
        (
            r#"{"kv_connector":"TcpConnector","kv_role":"decoder"}"#,
            "kv_role",
        ),
        (r#"{"kv_connector":"TcpConnector""#, "EOF"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
            .args(["serve", "--kv-transfer-config", json])
            .output()
            .expect("run");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{json}: {err}");
    }
}

/// NixlConnector where it cannot run is a startup error that says what to do: without the
/// cargo feature, how to build it; with it, but without NIXL's library, what to install.
#[test]
fn nixl_connector_that_cannot_run_is_a_startup_error_saying_why() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args(["serve", "--port", &free_port().to_string()])
        .args([
            "--kv-transfer-config",
            &kv_config_for("NixlConnector", "kv_producer", free_port(), 5.0),
        ])
        // Nowhere to find libnixl_capi.so.
        .env("LD_LIBRARY_PATH", "")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "nixl") {
        assert!(
            err.contains("libnixl_capi.so") && err.contains("nixl-cu12==1.5.1"),
            "{err}"
        );
    } else {
        assert!(err.contains("--features splitserve/nixl"), "{err}");
    }
}
