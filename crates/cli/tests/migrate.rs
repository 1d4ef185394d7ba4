//! Live migration end to end: real `serve` processes on loopback with the real model and
//! their admin listeners. A streamed request moved after 1, 17 or 63 tokens continues on the
//! same connection token-identical to an uninterrupted run; refusals (unreachable target,
//! other fingerprint, full target, a target off `--migrate-targets`) leave it running where
//! it was; draining an instance through the proxy moves all its streams and frees all its
//! blocks.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

fn admin_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// A request body: greedy, or sampled with a seed; token ids and usage in the answer.
fn body(prompt: &Value, seeded: Option<u64>, max_tokens: u32, stream: bool) -> Value {
    let mut b = json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true,
        "return_token_ids": true, "stream": stream,
        "stream_options": {"include_usage": true}});
    match seeded {
        None => b["temperature"] = json!(0),
        Some(seed) => {
            b["temperature"] = json!(0.9);
            b["top_p"] = json!(0.95);
            b["seed"] = json!(seed);
        }
    }
    if !stream {
        b.as_object_mut().map(|o| o.remove("stream_options"));
    }
    b
}

/// What a client saw: token ids, text, finish reason, completion tokens in usage.
#[derive(Debug, PartialEq)]
struct Seen {
    tokens: Vec<u64>,
    text: String,
    finish: String,
    usage_completion: u64,
}

fn seen_json(v: &Value) -> Seen {
    let c = &v["choices"][0];
    Seen {
        tokens: c["token_ids"]
            .as_array()
            .unwrap_or_else(|| panic!("no token_ids in {v}"))
            .iter()
            .filter_map(Value::as_u64)
            .collect(),
        text: c["text"].as_str().unwrap_or_default().to_string(),
        finish: c["finish_reason"].as_str().unwrap_or_default().to_string(),
        usage_completion: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    }
}

async fn seen_stream(resp: reqwest::Response) -> Seen {
    parse_sse(&resp.text().await.expect("stream body"))
}

/// Parses a whole SSE stream; panics on an error event or a missing or repeated [DONE].
fn parse_sse(text: &str) -> Seen {
    let data: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(
        data.iter().filter(|d| **d == "[DONE]").count(),
        1,
        "one [DONE]: {text}"
    );
    assert_eq!(data.last(), Some(&"[DONE]"), "[DONE] last");
    let mut s = Seen {
        tokens: vec![],
        text: String::new(),
        finish: String::new(),
        usage_completion: 0,
    };
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).expect("event JSON");
        assert!(v.get("error").is_none(), "error event: {v}");
        if let Some(u) = v["usage"]["completion_tokens"].as_u64() {
            s.usage_completion = u;
        }
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        s.text.push_str(c["text"].as_str().unwrap_or_default());
        if let Some(ids) = c["token_ids"].as_array() {
            s.tokens.extend(ids.iter().filter_map(Value::as_u64));
        }
        if let Some(f) = c["finish_reason"].as_str() {
            s.finish = f.to_string();
        }
    }
    s
}

fn long_prompt() -> Value {
    let mut p = String::new();
    for i in 0..20 {
        p.push_str(&format!(
            "Entry {i}: the lighthouse keeper logged {} ships and {} storms that week. ",
            i * 3 % 11,
            i % 5
        ));
    }
    p.push_str("The keeper's summary of the year:");
    json!(p)
}

async fn start_stream(url: &str, b: &Value, id: &str) -> reqwest::Response {
    let r = client()
        .post(format!("{url}/v1/completions"))
        .header("x-request-id", id)
        .json(b)
        .send()
        .await
        .expect("stream request");
    assert_eq!(r.status(), 200);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_streams_continue_token_identical_and_refusals_keep_them() {
    let (pa, pb, pc, pd) = (free_port(), free_port(), free_port(), free_port());
    let (pa_s, pb_s, pc_s, pd_s) = (
        pa.to_string(),
        pb.to_string(),
        pc.to_string(),
        pd.to_string(),
    );
    let unreachable = admin_url(free_port());
    let targets = [
        admin_url(pb),
        admin_url(pc),
        admin_url(pd),
        unreachable.clone(),
    ]
    .join(",");
    let a = serve(
        &["--admin-port", &pa_s, "--migrate-targets", &targets],
        None,
    );
    let b = serve(&["--admin-port", &pb_s], None);
    // A target that holds most of its small pool for a remote reader.
    let c = serve(
        &["--admin-port", &pc_s, "--num-kv-blocks", "40"],
        Some(kv_config("kv_both", free_port(), 300.0)),
    );
    // A target whose KV blocks mean something else.
    let d = serve(&["--admin-port", &pd_s, "--block-size", "32"], None);
    for p in [&a, &b, &c, &d] {
        ready(p).await;
    }
    let prompt = long_prompt();
    let max = 72;
    let mut n = 0;
    for seeded in [None, Some(3)] {
        let (status, v) = post(
            &format!("{}/v1/completions", a.url()),
            &body(&prompt, seeded, max, false),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let reference = seen_json(&v);
        assert_eq!(reference.tokens.len(), max as usize);
        for after in [1, 17, 63] {
            n += 1;
            let id = format!("mig-{n}");
            let resp = start_stream(&a.url(), &body(&prompt, seeded, max, true), &id).await;
            let (status, report) = post(
                &format!("{}/admin/migrate", admin_url(pa)),
                &json!({"request_id": id, "target": admin_url(pb), "after_tokens": after}),
            )
            .await;
            assert_eq!(status, 200, "{report}");
            assert_eq!(report["generated_tokens"], after, "{report}");
            assert_eq!(report["request_id"], format!("{id}-0"));
            assert!(report["blocks"].as_u64().unwrap_or(0) > 0, "{report}");
            let got = seen_stream(resp).await;
            assert_eq!(got, reference, "seeded {seeded:?}, moved after {after}");
        }
    }
    all_free(&a, Duration::from_secs(10)).await;
    all_free(&b, Duration::from_secs(10)).await;
    // The target's engine generated each continuation, one stream at a time: a decode step
    // per token after the move, (72 - after) for each of the six, and no prefill at all.
    // (generation_tokens_total counts at the HTTP front, so on the source.)
    assert_eq!(
        metric(&b, "decode_step_seconds_count").await,
        2.0 * ((max - 1) + (max - 17) + (max - 63)) as f64
    );
    assert_eq!(metric(&b, "prefill_step_seconds_count").await, 0.0);

    // Fill the full target: a held 560-token prompt keeps 35 of its 40 blocks.
    let filler: Vec<u32> = (0..560).map(|i| 2000 + i).collect();
    let (status, v) = post(
        &format!("{}/v1/completions", c.url()),
        &json!({"prompt": filler, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": true}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");

    let (status, v) = post(
        &format!("{}/v1/completions", a.url()),
        &body(&prompt, None, max, false),
    )
    .await;
    assert_eq!(status, 200);
    let reference = seen_json(&v);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().expect("usage");
    let resp = start_stream(&a.url(), &body(&prompt, None, max, true), "stays").await;
    let migrate = |target: String, after: u32| {
        let a_admin = admin_url(pa);
        async move {
            post(
                &format!("{a_admin}/admin/migrate"),
                &json!({"request_id": "stays", "target": target, "after_tokens": after}),
            )
            .await
        }
    };
    // A target off the allow-list: refused before any connection is made to it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let off_list = admin_url(listener.local_addr().expect("addr").port());
    let (status, e) = migrate(off_list.clone(), 2).await;
    assert_eq!(status, 403, "{e}");
    assert_eq!(e["error"]["type"], "permission_error", "{e}");
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("{off_list} is not in --migrate-targets")),
        "{msg}"
    );
    assert!(
        listener.accept().is_err(),
        "the server connected to a target off the allow-list"
    );
    let (status, e) = migrate(unreachable, 3).await;
    assert_eq!(status, 502, "{e}");
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("unreachable") && msg.contains("continues here"),
        "{msg}"
    );
    let (status, e) = migrate(admin_url(pd), 6).await;
    assert_eq!(status, 409, "{e}");
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("block_size differs (ours 32, theirs 16)"),
        "{msg}"
    );
    let (status, e) = migrate(admin_url(pc), 9).await;
    assert_eq!(status, 503, "{e}");
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    // Its context so far and the next token: prompt + 9 + 1 tokens.
    let needed = (prompt_tokens + 10).div_ceil(16);
    assert!(
        msg.contains(&format!(
            "not enough free KV blocks: the request needs {needed}, 5 are free"
        )),
        "{msg}"
    );
    let got = seen_stream(resp).await;
    assert_eq!(got, reference, "the refused request finished where it was");
    let (status, e) = migrate(admin_url(pb), 0).await;
    assert_eq!(status, 404, "{e}");
    all_free(&a, Duration::from_secs(10)).await;
    assert_eq!(
        metric(&a, "migrations_total{result=\"refused\"}").await,
        3.0
    );
    assert_eq!(metric(&a, "migrations_total{result=\"ok\"}").await, 6.0);
    let h = health(&c).await;
    assert_eq!(h["free_blocks"], 5, "nothing allocated by the refusal: {h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_an_instance_through_the_proxy_moves_every_stream() {
    let (pa, pb, proxy_admin) = (free_port(), free_port(), free_port());
    let p = serve(&[], Some(kv_config("kv_producer", free_port(), 30.0)));
    let a = serve(
        &[
            "--admin-port",
            &pa.to_string(),
            "--max-num-seqs",
            "8",
            "--migrate-targets",
            &admin_url(pb),
        ],
        Some(kv_config("kv_consumer", free_port(), 30.0)),
    );
    let b = serve(
        &[
            "--admin-port",
            &pb.to_string(),
            "--max-num-seqs",
            "16",
            "--migrate-targets",
            &admin_url(pa),
        ],
        Some(kv_config("kv_consumer", free_port(), 30.0)),
    );
    for x in [&p, &a, &b] {
        ready(x).await;
    }
    let proxy = spawn(&[
        "proxy".into(),
        "--prefill".into(),
        p.url(),
        "--decode".into(),
        a.url(),
        b.url(),
        "--decode-admin".into(),
        admin_url(pa),
        admin_url(pb),
        "--admin-port".into(),
        proxy_admin.to_string(),
    ]);
    ready(&proxy).await;
    let prompts: Vec<Value> = (0..8)
        .map(|i| {
            json!(format!(
                "Note {i}: a short story about the number {}:",
                i * 13
            ))
        })
        .collect();
    let seed = |i: usize| (i % 2 == 1).then_some(i as u64 + 100);
    // Long enough that no stream can finish between its first token and the drain, even on
    // a machine slowed several-fold: the drain must find all eight running.
    let max = 256;
    // References: uninterrupted runs on the instance that will receive the streams.
    let refs = futures_util::future::join_all(prompts.iter().enumerate().map(|(i, pr)| {
        let url = format!("{}/v1/completions", b.url());
        let bd = body(pr, seed(i), max, false);
        async move { post(&url, &bd).await }
    }))
    .await;
    // Eight streams on A, each read as it comes; the drain waits for a token from each.
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (i, pr) in prompts.iter().enumerate() {
        let resp = start_stream(&a.url(), &body(pr, seed(i), max, true), &format!("d{i}")).await;
        let tx = first_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut bytes = Vec::new();
            let mut s = resp.bytes_stream();
            let mut told = false;
            while let Some(chunk) = s.next().await {
                bytes.extend_from_slice(&chunk.expect("chunk"));
                if !told && String::from_utf8_lossy(&bytes).contains("token_ids") {
                    told = true;
                    let _ = tx.send(i);
                }
            }
            String::from_utf8(bytes).expect("utf-8")
        }));
    }
    for _ in 0..8 {
        first_rx.recv().await.expect("a first token");
    }
    let (status, report) = post(
        &format!("{}/admin/drain", admin_url(proxy_admin)),
        &json!({"decode": a.url()}),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        report["migrated"].as_array().map(Vec::len),
        Some(8),
        "{report}"
    );
    assert_eq!(report["failed"], json!([]));
    assert_eq!(report["in_rotation"], false);
    for (i, r) in readers.into_iter().enumerate() {
        let text = r.await.expect("reader");
        let got = parse_sse(&text);
        let (status, v) = &refs[i];
        assert_eq!(*status, 200, "{v}");
        assert_eq!(got, seen_json(v), "stream {i}");
    }
    all_free(&a, Duration::from_secs(10)).await;
    all_free(&b, Duration::from_secs(10)).await;
    let (_, listed) = get_json(&format!("{}/admin/requests", admin_url(pa))).await;
    assert_eq!(listed["requests"], json!([]));
    // New requests through the proxy skip the drained instance.
    let served_before = metric(&a, "generation_tokens_total").await;
    let (status, v) = post(
        &format!("{}/v1/completions", proxy.url()),
        &body(&prompts[0], None, 8, false),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(metric(&a, "generation_tokens_total").await, served_before);
    let (status, v) = post(
        &format!("{}/v1/completions", a.url()),
        &body(&prompts[0], None, 8, false),
    )
    .await;
    assert_eq!(status, 503, "a drained instance refuses: {v}");
}

async fn get_json(url: &str) -> (u16, Value) {
    let r = client().get(url).send().await.expect("get");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}
