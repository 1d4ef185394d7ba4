//! The OpenAI-compatible API over real HTTP on loopback, real model, in-process server.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use splitserve_engine::{EngineConfig, Model};
use splitserve_server::AppState;

fn model() -> Arc<Model> {
    static M: OnceLock<Arc<Model>> = OnceLock::new();
    M.get_or_init(|| {
        let p = splitserve_engine::model_file::default_model(false).expect("default model");
        Arc::new(Model::load(&p).expect("load"))
    })
    .clone()
}

struct Server {
    url: String,
    client: reqwest::Client,
}

async fn start(cfg: EngineConfig) -> Server {
    start_with(cfg, splitserve_server::HttpOptions::default()).await
}

async fn start_with(cfg: EngineConfig, http: splitserve_server::HttpOptions) -> Server {
    let state = AppState::start(model(), cfg, "smol".into()).expect("engine");
    state.set_http_options(http);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(splitserve_server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    Server {
        url,
        client: reqwest::Client::new(),
    }
}

impl Server {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .expect("send");
        let status = r.status().as_u16();
        (status, r.json().await.expect("json body"))
    }

    async fn get_json(&self, path: &str) -> Value {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json")
    }

    /// Streams a request; returns the `data:` payloads (without `[DONE]`) and whether `[DONE]` came.
    async fn stream(&self, path: &str, body: Value) -> (Vec<Value>, bool) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .json(&body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 200);
        let mut buf = String::new();
        let mut s = r.bytes_stream();
        while let Some(chunk) = s.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        }
        let mut out = Vec::new();
        let mut done = false;
        for line in buf.lines() {
            if let Some(d) = line.strip_prefix("data: ") {
                if d == "[DONE]" {
                    done = true;
                } else {
                    out.push(serde_json::from_str(d).expect("chunk json"));
                }
            }
        }
        (out, done)
    }

    /// Waits (bounded) until nothing runs or waits and every block is free.
    async fn idle(&self) -> Value {
        let mut h = Value::Null;
        for _ in 0..300 {
            h = self.get_json("/health").await;
            if h["running"] == 0 && h["waiting"] == 0 && h["free_blocks"] == h["total_blocks"] {
                return h;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server did not become idle: {h}");
    }
}

fn greedy(prompt: &str, n: usize) -> Value {
    json!({"model": "smol", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true, "return_token_ids": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_and_whole_completions_agree() {
    let s = start(EngineConfig::default()).await;
    let (st, whole) = s
        .post("/v1/completions", greedy("The capital of France is", 24))
        .await;
    assert_eq!(st, 200, "{whole}");
    let text = whole["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(whole["usage"]["completion_tokens"], 24);
    assert_eq!(whole["usage"]["prompt_tokens"], 5);
    assert_eq!(whole["object"], "text_completion");
    let mut body = greedy("The capital of France is", 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = s.stream("/v1/completions", body).await;
    assert!(done, "stream ends with [DONE]");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    let ids: Vec<u64> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["token_ids"].as_array())
        .flatten()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(ids.len(), 24);
    let whole_ids: Vec<u64> = whole["choices"][0]["token_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert_eq!(ids, whole_ids);
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["usage"]["completion_tokens"], 24);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    s.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completion_uses_the_template() {
    let s = start(EngineConfig::default()).await;
    let msgs = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let (st, tok) = s.post("/tokenize", json!({"messages": msgs})).await;
    assert_eq!(st, 200);
    let (st, r) = s
        .post(
            "/v1/chat/completions",
            json!({"messages": msgs, "max_tokens": 16, "temperature": 0}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    let content = r["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    assert!(!content.is_empty());
    assert_eq!(r["usage"]["completion_tokens"], 16);
    assert_eq!(r["usage"]["prompt_tokens"], tok["count"]);
    // Streaming chat: role first, then content deltas, then the finish reason.
    let (chunks, done) = s
        .stream(
            "/v1/chat/completions",
            json!({"messages": msgs, "max_tokens": 16, "temperature": 0, "stream": true}),
        )
        .await;
    assert!(done);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, content);
    // Detokenize round trip.
    let (_, d) = s
        .post("/detokenize", json!({"tokens": tok["tokens"]}))
        .await;
    assert!(d["prompt"]
        .as_str()
        .expect("text")
        .ends_with("<|im_start|>assistant\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_streams_match_solo_runs() {
    let s = Arc::new(start(EngineConfig::default()).await);
    let start_free = s.idle().await["free_blocks"].clone();
    let prompts: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "Story {i}: {}",
                "Once upon a time in a land far away, ".repeat(1 + i % 4)
            )
        })
        .collect();
    let mut solo = Vec::new();
    for p in &prompts {
        let (_, r) = s.post("/v1/completions", greedy(p, 32)).await;
        solo.push(r["choices"][0]["token_ids"].clone());
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let s = s.clone();
            let mut body = greedy(p, 32);
            body["stream"] = json!(true);
            tokio::spawn(async move {
                let (chunks, done) = s.stream("/v1/completions", body).await;
                assert!(done);
                let ids: Vec<Value> = chunks
                    .iter()
                    .filter_map(|c| c["choices"][0]["token_ids"].as_array())
                    .flatten()
                    .cloned()
                    .collect();
                Value::Array(ids)
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let got = t.await.expect("task");
        assert_eq!(got, solo[i], "stream {i}");
    }
    let h = s.idle().await;
    assert_eq!(h["free_blocks"], start_free);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_aborts_and_frees_blocks() {
    let s = start(EngineConfig::default()).await;
    let mut body = greedy("Tell me a very long story.", 4000);
    body["stream"] = json!(true);
    let r = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .json(&body)
        .send()
        .await
        .expect("send");
    let mut stream = r.bytes_stream();
    let mut seen = 0;
    while seen < 3 {
        let c = stream.next().await.expect("chunk").expect("bytes");
        seen += String::from_utf8_lossy(&c).matches("data: ").count();
    }
    let h = s.get_json("/health").await;
    assert_eq!(h["running"], 1, "{h}");
    assert!(h["free_blocks"].as_u64() < h["total_blocks"].as_u64());
    drop(stream);
    let h = s.idle().await;
    assert_eq!(h["free_blocks"], h["total_blocks"]);
    let m = s
        .client
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .expect("m")
        .text()
        .await
        .expect("t");
    assert!(
        m.contains("splitserve:request_success_total{finished_reason=\"abort\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_errors() {
    let s = start(EngineConfig {
        max_model_len: Some(64),
        ..EngineConfig::default()
    })
    .await;
    let raw = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .header("content-type", "application/json")
        .body("{\"prompt\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(raw.status().as_u16(), 400);
    let e: Value = raw.json().await.expect("json");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("malformed JSON"),
        "{e}"
    );

    let (st, e) = s
        .post("/v1/completions", json!({"model": "gpt-4", "prompt": "hi"}))
        .await;
    assert_eq!(st, 404);
    assert_eq!(e["error"]["code"], "model_not_found");

    let long = "word ".repeat(100);
    let (_, t) = s.post("/tokenize", json!({"prompt": long})).await;
    let n = t["count"].as_u64().expect("count");
    let (st, e) = s
        .post("/v1/completions", json!({"prompt": long, "max_tokens": 4}))
        .await;
    assert_eq!(st, 400);
    let msg = e["error"]["message"].as_str().expect("msg");
    assert!(
        msg.contains("64") && msg.contains(&n.to_string()),
        "names both numbers: {msg}"
    );

    let (st, e) = s
        .post("/v1/completions", json!({"prompt": "hi", "max_tokens": 70}))
        .await;
    assert_eq!(st, 400, "prompt + max_tokens over the context: {e}");
    assert!(e["error"]["message"].as_str().expect("msg").contains("64"));

    for (body, param) in [
        (json!({"prompt": "hi", "temperature": -1}), "temperature"),
        (json!({"prompt": "hi", "top_p": 2.0}), "top_p"),
        (json!({"prompt": "hi", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "hi", "n": 2}), "n"),
        (json!({"prompt": "hi", "logprobs": 50}), "logprobs"),
        (json!({"prompt": "hi", "top_k": -5}), "top_k"),
        (json!({"prompt": [999999]}), "prompt"),
        (json!({"prompt": ""}), "prompt"),
    ] {
        let (st, e) = s.post("/v1/completions", body.clone()).await;
        assert_eq!(st, 400, "{body} -> {e}");
        assert_eq!(e["error"]["param"], param, "{body} -> {e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    let (st, _) = s
        .post("/v1/chat/completions", json!({"messages": []}))
        .await;
    assert_eq!(st, 400);
    s.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_503_with_retry_after() {
    let s = start(EngineConfig {
        max_num_seqs: 1,
        max_waiting: 1,
        ..EngineConfig::default()
    })
    .await;
    let long = |p: &str| {
        let mut b = greedy(p, 3000);
        b["stream"] = json!(true);
        b
    };
    let a = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .json(&long("a"))
        .send()
        .await
        .expect("a");
    for _ in 0..300 {
        if s.get_json("/health").await["running"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .json(&long("b"))
        .send()
        .await
        .expect("b");
    assert_eq!(s.get_json("/health").await["waiting"], 1);
    let c = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .json(&greedy("c", 4))
        .send()
        .await
        .expect("c");
    assert_eq!(c.status().as_u16(), 503);
    assert_eq!(
        c.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let e: Value = c.json().await.expect("json");
    assert_eq!(e["error"]["code"], "overloaded");
    drop(a);
    drop(b);
    s.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_and_request_id_is_echoed() {
    let s = start(EngineConfig::default()).await;
    let scrape = |s: &Server| {
        let c = s.client.clone();
        let u = format!("{}/metrics", s.url);
        async move { c.get(u).send().await.expect("m").text().await.expect("t") }
    };
    let parse = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("name value");
                (
                    name.to_string(),
                    value
                        .parse::<f64>()
                        .unwrap_or_else(|_| panic!("not a number: {l}")),
                )
            })
            .collect()
    };
    let get =
        |m: &[(String, f64)], n: &str| m.iter().find(|(k, _)| k == n).map(|x| x.1).unwrap_or(-1.0);
    let before = parse(&scrape(&s).await);
    assert_eq!(get(&before, "splitserve:generation_tokens_total"), 0.0);
    assert!(get(&before, "splitserve:kv_cache_total_blocks") > 0.0);
    let r = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .header("x-request-id", "my-req-42")
        .json(&greedy("Hello", 5))
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("my-req-42")
    );
    let after = parse(&scrape(&s).await);
    assert_eq!(get(&after, "splitserve:generation_tokens_total"), 5.0);
    assert_eq!(get(&after, "splitserve:prompt_tokens_total"), 1.0);
    assert_eq!(
        get(&after, "splitserve:time_to_first_token_seconds_count"),
        1.0
    );
    assert_eq!(
        get(&after, "splitserve:inter_token_latency_seconds_count"),
        4.0
    );
    assert_eq!(
        get(
            &after,
            "splitserve:request_success_total{finished_reason=\"length\"}"
        ),
        1.0
    );
    let models = s.get_json("/v1/models").await;
    assert_eq!(models["data"][0]["id"], "smol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_echo_logprobs_and_seed() {
    let s = start(EngineConfig::default()).await;
    let (st, r) = s
        .post("/v1/completions", json!({"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stop": ["."]}))
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], " Paris");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    let (_, r) = s
        .post("/v1/completions", json!({"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "echo": true, "logprobs": 2}))
        .await;
    let text = r["choices"][0]["text"].as_str().expect("text");
    assert!(text.starts_with("The capital of France is Paris"), "{text}");
    let lp = &r["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(3));
    assert_eq!(lp["tokens"][0], " Paris");
    for (i, t) in lp["top_logprobs"]
        .as_array()
        .expect("top")
        .iter()
        .enumerate()
    {
        let m = t.as_object().expect("map");
        assert_eq!(m.len(), 2);
        // Greedy: the chosen token is the most likely one.
        let best = m
            .values()
            .filter_map(|v| v.as_f64())
            .fold(f64::MIN, f64::max);
        assert_eq!(lp["token_logprobs"][i].as_f64(), Some(best));
        assert!(best <= 0.0);
    }

    let sampled = json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.9, "seed": 7, "return_token_ids": true});
    let (_, a) = s.post("/v1/completions", sampled.clone()).await;
    let (_, b) = s.post("/v1/completions", sampled).await;
    assert_eq!(a["choices"][0]["token_ids"], b["choices"][0]["token_ids"]);
    s.idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_hits_show_in_usage_and_metrics_and_salts_are_checked() {
    let details = splitserve_server::HttpOptions {
        prompt_tokens_details: true,
        ..Default::default()
    };
    let s = start_with(EngineConfig::default(), details).await;
    let prompt = "A long shared instruction that many requests begin with. ".repeat(8);
    let (st, first) = s.post("/v1/completions", greedy(&prompt, 6)).await;
    assert_eq!(st, 200, "{first}");
    let n = first["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt tokens");
    let hit = (n - 1) / 16 * 16;
    assert!(hit >= 64, "{n} prompt tokens");
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, again) = s.post("/v1/completions", greedy(&prompt, 6)).await;
    assert_eq!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"],
        hit
    );
    assert_eq!(
        again["choices"][0]["token_ids"],
        first["choices"][0]["token_ids"]
    );
    // Streamed, with usage: the same count in the last chunk.
    let mut b = greedy(&prompt, 6);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = s.stream("/v1/completions", b).await;
    assert!(done);
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], hit,
        "{usage}"
    );

    // Another tenant's salt finds nothing; its own salt finds its blocks.
    let mut b = greedy(&prompt, 6);
    b["cache_salt"] = json!("tenant-b");
    let (_, v) = s.post("/v1/completions", b.clone()).await;
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, v) = s.post("/v1/completions", b).await;
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], hit);
    for (salt, what) in [
        (json!(""), "non-empty"),
        (json!("x".repeat(1025)), "1025 bytes"),
    ] {
        let mut b = greedy(&prompt, 2);
        b["cache_salt"] = salt;
        let (st, v) = s.post("/v1/completions", b).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["param"], "cache_salt", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(what),
            "{v}"
        );
    }

    // vLLM's counters, in tokens: five lookups, three hits.
    let text = s
        .client
        .get(format!("{}/metrics", s.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("splitserve:{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(value("prefix_cache_queries_total"), (5 * n) as f64);
    assert_eq!(value("prefix_cache_hits_total"), (3 * hit) as f64);
    let h = s.idle().await;
    assert_eq!(
        h["free_blocks"], h["total_blocks"],
        "cached blocks count as free"
    );

    // Without prompt-token details (the default, as in vLLM) usage has only the counts.
    let plain = start(EngineConfig::default()).await;
    let (_, v) = plain.post("/v1/completions", greedy(&prompt, 2)).await;
    assert!(v["usage"]["prompt_tokens_details"].is_null(), "{v}");
}
