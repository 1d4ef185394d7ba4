//! Drills on the router with real processes on loopback (2 prefill + 2 decode instances and
//! the proxy): one prefill instance killed under load costs no request; with both dead,
//! every request is still served (prefilled on the decode instances), token for token the
//! same; one restarted is used again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn body(k: usize) -> Value {
    json!({"prompt": format!("Item {k}: a short note on the number {}.", k * 7 + 1),
        "max_tokens": 12, "temperature": 0, "ignore_eos": true})
}

fn text(v: &Value) -> String {
    v["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Sends requests `ks` four at a time; every one must answer 200 with its reference text.
async fn load(url: &str, ks: std::ops::Range<usize>, reference: &[String]) {
    let ks: Vec<usize> = ks.collect();
    for chunk in ks.chunks(4) {
        let futs = chunk.iter().map(|&k| async move {
            let (st, v) = post(&format!("{url}/v1/completions"), &body(k)).await;
            assert_eq!(st, 200, "request {k}: {v}");
            assert_eq!(text(&v), reference[k], "request {k}");
        });
        futures_util::future::join_all(futs).await;
    }
}

/// The sum of the proxy's `/metrics` lines that start with `line_start` and contain each
/// of `labels` (0 when none).
async fn router_metric_with(proxy: &Proc, line_start: &str, labels: &[&str]) -> f64 {
    metrics_text(proxy)
        .await
        .lines()
        .filter(|l| l.starts_with(line_start) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .fold(0.0, |a, b| a + b)
}

async fn router_metric(proxy: &Proc, line_start: &str) -> f64 {
    router_metric_with(proxy, line_start, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_instances_die_and_come_back_without_failed_requests() {
    let colo = serve(&[], None);
    let sides = [free_port(), free_port()];
    let prefill_kv = |i: usize| Some(kv_config("kv_producer", sides[i], 30.0));
    let prefill_ports = [free_port(), free_port()];
    let mut prefill: Vec<Proc> = (0..2)
        .map(|i| serve_at(prefill_ports[i], &[], prefill_kv(i)))
        .collect();
    let decode: Vec<Proc> = (0..2)
        .map(|_| serve(&[], Some(kv_config("kv_consumer", free_port(), 30.0))))
        .collect();
    for p in prefill.iter().chain(&decode).chain([&colo]) {
        ready(p).await;
    }
    let mut args: Vec<String> = vec!["proxy".into(), "--prefill".into()];
    args.extend(prefill.iter().map(Proc::url));
    args.push("--decode".into());
    args.extend(decode.iter().map(Proc::url));
    args.extend(
        [
            "--health-interval-s",
            "0.2",
            "--failure-threshold",
            "2",
            "--circuit-cooldown-s",
            "0.5",
        ]
        .map(String::from),
    );
    let proxy = spawn(&args);
    ready(&proxy).await;
    let url = proxy.url();

    // References from a colocated engine.
    let n = 40;
    let mut reference = Vec::new();
    for k in 0..n {
        let (st, v) = post(&format!("{}/v1/completions", colo.url()), &body(k)).await;
        assert_eq!(st, 200, "{v}");
        reference.push(text(&v));
    }

    // 1. All up: disaggregated, token for token.
    load(&url, 0..8, &reference).await;
    let disagg = r#"splitserve:router_disaggregated_total"#;
    assert_eq!(router_metric(&proxy, disagg).await, 8.0);

    // 2. One prefill instance dies while requests run: none fails.
    let killer = {
        let p0 = prefill.remove(0);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            p0.kill();
            p0
        })
    };
    load(&url, 8..20, &reference).await;
    let dead = killer.await.expect("killer");
    drop(dead);
    load(&url, 20..24, &reference).await;
    // A request the dying instance was prefilling is prefilled again on its decode
    // instance; the others went to the live prefill instance.
    let fallbacks = "splitserve:router_fallbacks_total";
    let fell_back = router_metric(&proxy, fallbacks).await;
    println!(
        "requests prefilled on a decode instance while one prefill instance died: {fell_back}"
    );

    // 3. Both dead: every request is prefilled on a decode instance instead.
    prefill.remove(0).kill();
    let computed_before: f64 = {
        let mut s = 0.0;
        for d in &decode {
            s += metric(d, "prompt_tokens_computed").await;
        }
        s
    };
    load(&url, 24..32, &reference).await;
    assert_eq!(router_metric(&proxy, fallbacks).await - fell_back, 8.0);
    let mut computed = 0.0;
    for d in &decode {
        computed += metric(d, "prompt_tokens_computed").await;
    }
    assert!(
        computed > computed_before,
        "decode instances prefilled themselves"
    );

    // 4. One comes back where it was: requests go through it again, disaggregated.
    let back = serve_at(prefill_ports[1], &[], prefill_kv(1));
    ready(&back).await;
    let t0 = Instant::now();
    let before = router_metric(&proxy, disagg).await;
    loop {
        load(&url, 32..34, &reference).await;
        if router_metric(&proxy, disagg).await > before {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the restarted prefill instance was not used again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "restarted prefill instance used again {} ms after it answered",
        t0.elapsed().as_millis()
    );
    let before = router_metric(&proxy, disagg).await;
    load(&url, 34..n, &reference).await;
    assert_eq!(
        router_metric(&proxy, disagg).await - before,
        (n - 34) as f64
    );
    let dead_url = format!("instance=\"http://127.0.0.1:{}\"", prefill_ports[0]);
    assert!(
        router_metric_with(&proxy, "splitserve:router_circuit_state", &[&dead_url]).await > 0.0,
        "the dead instance's circuit is not closed"
    );
    let errors = router_metric(&proxy, "splitserve:router_errors_total").await;
    println!("errors seen by the router (dead instances): {errors}");
    assert!(errors > 0.0);
    for p in decode.iter().chain([&back]) {
        all_free(p, Duration::from_secs(40)).await;
    }
}

/// Streams `body` through `url`, killing whichever of `decode` runs it once `after` token
/// chunks arrived; returns the text the client saw, whether any chunk showed token ids,
/// whether it ended with `[DONE]`, and its logprobs (chat's entries, or completions'
/// tokens, token_logprobs and top_logprobs, each concatenated).
async fn stream_through_a_death(
    url: &str,
    path: &str,
    body: &Value,
    decode: &mut Vec<Proc>,
    after: usize,
) -> (String, bool, bool, Value) {
    use futures_util::StreamExt;
    let r = client()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let mut s = r.bytes_stream();
    let (mut buf, mut text, mut ids, mut done, mut n) =
        (String::new(), String::new(), false, false, 0);
    let mut killed = false;
    let (mut chat_lp, mut tokens, mut token_lp, mut top) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    while let Some(chunk) = s.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            let Some(data) = ev.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("json chunk");
            assert!(v.get("error").is_none(), "{v}");
            let c = &v["choices"][0];
            text.push_str(
                c["text"]
                    .as_str()
                    .or(c["delta"]["content"].as_str())
                    .unwrap_or(""),
            );
            ids |= c.get("token_ids").is_some() || c.get("prompt_token_ids").is_some();
            let lp = &c["logprobs"];
            let more = |v: &mut Vec<Value>, k: &str| {
                v.extend(lp[k].as_array().cloned().unwrap_or_default())
            };
            more(&mut chat_lp, "content");
            more(&mut tokens, "tokens");
            more(&mut token_lp, "token_logprobs");
            more(&mut top, "top_logprobs");
            n += 1;
        }
        if !killed && n >= after {
            // The decode instance running it: the one with a request running.
            let mut which = None;
            for (i, d) in decode.iter().enumerate() {
                if health(d).await["running"].as_u64().unwrap_or(0) > 0 {
                    which = Some(i);
                }
            }
            let i = which.expect("a decode instance runs the stream");
            decode.remove(i).kill();
            killed = true;
        }
    }
    assert!(killed, "the stream ended before the kill");
    let lp = if path.ends_with("chat/completions") {
        json!(chat_lp)
    } else {
        json!({"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top})
    };
    (text, ids, done, lp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_the_death_of_its_decode_instance() {
    let colo = serve(&[], None);
    let pre = serve(&[], Some(kv_config("kv_producer", free_port(), 30.0)));
    let mut decode: Vec<Proc> = (0..5)
        .map(|_| serve(&[], Some(kv_config("kv_consumer", free_port(), 30.0))))
        .collect();
    for p in decode.iter().chain([&pre, &colo]) {
        ready(p).await;
    }
    let mut args: Vec<String> = vec!["proxy".into(), "--prefill".into(), pre.url()];
    args.push("--decode".into());
    args.extend(decode.iter().map(Proc::url));
    let proxy = spawn(&args);
    ready(&proxy).await;
    let url = proxy.url();
    let greedy = json!({"prompt": "The story of a lighthouse keeper who", "max_tokens": 80,
        "temperature": 0, "ignore_eos": true, "stream": true, "logprobs": 2});
    let seeded = json!({"prompt": "Ten ideas for a rainy afternoon:", "max_tokens": 80,
        "temperature": 0.9, "top_p": 0.95, "seed": 1234, "ignore_eos": true, "stream": true});
    let chat = json!({"messages": [{"role": "user", "content": "Describe a quiet harbour at dawn."}],
        "max_tokens": 60, "temperature": 0, "ignore_eos": true, "stream": true,
        "logprobs": true, "top_logprobs": 3});
    for (what, path, body) in [
        ("greedy", "/v1/completions", greedy),
        ("seeded", "/v1/completions", seeded),
        ("chat", "/v1/chat/completions", chat),
    ] {
        let mut whole = body.clone();
        whole["stream"] = json!(false);
        let (st, v) = post(&format!("{}{path}", colo.url()), &whole).await;
        assert_eq!(st, 200, "{v}");
        let reference = v["choices"][0]["text"]
            .as_str()
            .or(v["choices"][0]["message"]["content"].as_str())
            .unwrap_or_default()
            .to_string();
        let (text, ids, done, lp) =
            stream_through_a_death(&url, path, &body, &mut decode, 10).await;
        assert_eq!(text, reference, "{what}: the client's text");
        // Logprobs go on across the death too, in the client's shape.
        let l = &v["choices"][0]["logprobs"];
        let want = if path.ends_with("chat/completions") {
            l["content"].clone()
        } else if l.is_null() {
            json!({"tokens": [], "token_logprobs": [], "top_logprobs": []})
        } else {
            json!({"tokens": l["tokens"], "token_logprobs": l["token_logprobs"], "top_logprobs": l["top_logprobs"]})
        };
        assert_eq!(lp, want, "{what}: the client's logprobs");
        assert!(!ids, "{what}: token ids the client did not ask for");
        assert!(done, "{what}: the stream ended with [DONE]");
        println!(
            "{what}: {} characters, equal to an uninterrupted run",
            text.len()
        );
        if decode.is_empty() {
            break;
        }
    }
    // Not streamed: the client has seen nothing when its decode instance dies, so the
    // request runs again elsewhere, and the answer is the uninterrupted one.
    let whole = json!({"prompt": "A list of harbour towns and what they trade:", "max_tokens": 120,
        "temperature": 0, "ignore_eos": true});
    let (st, v) = post(&format!("{}/v1/completions", colo.url()), &whole).await;
    assert_eq!(st, 200, "{v}");
    let reference = text(&v);
    let pending = {
        let url = url.clone();
        let whole = whole.clone();
        tokio::spawn(async move { post(&format!("{url}/v1/completions"), &whole).await })
    };
    let t0 = Instant::now();
    'kill: loop {
        for i in 0..decode.len() {
            if health(&decode[i]).await["running"].as_u64().unwrap_or(0) > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                decode.remove(i).kill();
                break 'kill;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the request never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (st, v) = pending.await.expect("request");
    assert_eq!(st, 200, "{v}");
    assert_eq!(text(&v), reference, "the non-streamed answer");
    let failovers = metrics_text(&proxy).await;
    assert!(
        failovers
            .lines()
            .any(|l| l.starts_with("splitserve:router_failovers_total 4")),
        "{failovers}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_are_added_and_removed_through_the_admin_endpoints() {
    let pre = serve(&[], Some(kv_config("kv_producer", free_port(), 30.0)));
    let d1 = serve(&[], Some(kv_config("kv_consumer", free_port(), 30.0)));
    let d2 = serve(&[], Some(kv_config("kv_consumer", free_port(), 30.0)));
    for p in [&pre, &d1, &d2] {
        ready(p).await;
    }
    let admin = free_port();
    let proxy = spawn(&[
        "proxy".into(),
        "--prefill".into(),
        pre.url(),
        "--decode".into(),
        d1.url(),
        "--decode-policy".into(),
        "round_robin".into(),
        "--admin-port".into(),
        admin.to_string(),
    ]);
    ready(&proxy).await;
    let admin = format!("http://127.0.0.1:{admin}");
    let served = |d: &Proc| {
        let label = format!("instance=\"{}\"", d.url());
        let proxy = &proxy;
        async move {
            router_metric_with(
                proxy,
                "splitserve:router_requests_total",
                &[&label, "decode"],
            )
            .await
        }
    };
    let (st, v) = post(
        &format!("{admin}/admin/add"),
        &json!({"pool": "decode", "url": d2.url()}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = post(
        &format!("{admin}/admin/add"),
        &json!({"pool": "decode", "url": d2.url()}),
    )
    .await;
    assert_eq!(st, 409, "added twice: {v}");
    let reference: Vec<String> = {
        let mut r = Vec::new();
        for k in 0..10 {
            let (st, v) = post(&format!("{}/v1/completions", d1.url()), &body(k)).await;
            assert_eq!(st, 200, "{v}");
            r.push(text(&v));
        }
        r
    };
    load(&proxy.url(), 0..6, &reference).await;
    assert!(
        served(&d2).await >= 2.0,
        "the added instance takes requests"
    );
    let (st, v) = post(
        &format!("{admin}/admin/remove"),
        &json!({"pool": "decode", "url": d1.url()}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let before = served(&d1).await;
    load(&proxy.url(), 6..10, &reference).await;
    assert_eq!(
        served(&d1).await,
        before,
        "nothing new for the removed instance"
    );
    let (st, v) = post(
        &format!("{admin}/admin/remove"),
        &json!({"pool": "decode", "url": d2.url()}),
    )
    .await;
    assert_eq!(st, 409, "the last instance stays: {v}");
    let (_, listed) = {
        let r = client()
            .get(format!("{admin}/admin/instances"))
            .send()
            .await
            .expect("instances");
        (r.status(), r.json::<Value>().await.expect("json"))
    };
    assert_eq!(
        listed["decode"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
}

/// Sends `n` streamed requests through `url` one after another (each once its stream has
/// started), every other one long (`long` output tokens); returns the tasks draining them.
async fn skewed(url: &str, n: usize, long: usize) -> Vec<tokio::task::JoinHandle<()>> {
    use futures_util::StreamExt;
    let mut streams = Vec::new();
    for k in 0..n {
        // Long in prompt (about 170 tokens) and output both: its KV is large from the start.
        let (prompt, max) = if k % 2 == 0 {
            (
                format!("Note {k}:{}", " on tides, winds and harbours.".repeat(24)),
                long,
            )
        } else {
            (format!("Note {k}."), 4)
        };
        let b = json!({"prompt": prompt, "max_tokens": max,
            "temperature": 0, "ignore_eos": true, "stream": true});
        let r = client()
            .post(format!("{url}/v1/completions"))
            .json(&b)
            .send()
            .await
            .expect("stream");
        assert_eq!(r.status(), 200);
        let mut s = r.bytes_stream();
        // Its first chunk: the router has chosen, and counts it in flight.
        let _ = s.next().await;
        streams.push(tokio::spawn(
            async move { while s.next().await.is_some() {} },
        ));
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_blocks_balances_a_skewed_load_that_round_robin_piles_on_one() {
    let pre = serve(&[], Some(kv_config("kv_producer", free_port(), 30.0)));
    let decode: Vec<Proc> = (0..2)
        .map(|_| {
            serve(
                &["--num-kv-blocks", "256"],
                Some(kv_config("kv_consumer", free_port(), 30.0)),
            )
        })
        .collect();
    for p in decode.iter().chain([&pre]) {
        ready(p).await;
    }
    let mut report = Vec::new();
    for policy in ["round_robin", "free_blocks"] {
        let mut args: Vec<String> = vec!["proxy".into(), "--prefill".into(), pre.url()];
        args.push("--decode".into());
        args.extend(decode.iter().map(Proc::url));
        args.extend(["--decode-policy".into(), policy.into()]);
        let proxy = spawn(&args);
        ready(&proxy).await;
        // 4 long requests and 4 short, alternating; once the short ones are done, where the
        // long ones run.
        let streams = skewed(&proxy.url(), 8, 600).await;
        let t0 = Instant::now();
        let (running, free) = loop {
            let hs = [health(&decode[0]).await, health(&decode[1]).await];
            let running: Vec<u64> = hs
                .iter()
                .map(|h| h["running"].as_u64().unwrap_or(0))
                .collect();
            if running.iter().sum::<u64>() == 4 && hs.iter().all(|h| h["waiting"] == 0) {
                // Let the long ones grow their KV a little.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let hs = [health(&decode[0]).await, health(&decode[1]).await];
                let free: Vec<u64> = hs
                    .iter()
                    .map(|h| h["free_blocks"].as_u64().unwrap_or(0))
                    .collect();
                break (running, free);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "short requests not done: {hs:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let spread = free[0].abs_diff(free[1]) as f64 / 256.0;
        println!(
            "{policy}: long requests per decode instance {running:?}, free blocks {free:?} (spread {:.1} % of 256)",
            spread * 100.0
        );
        report.push((policy, running, spread));
        for s in streams {
            s.abort();
        }
        for d in &decode {
            all_free(d, Duration::from_secs(30)).await;
        }
    }
    // Round robin sends every long request to the same instance; free_blocks splits them.
    let mut rr = report[0].1.clone();
    rr.sort();
    assert_eq!(rr, [0, 4], "round_robin");
    assert_eq!(report[1].1, [2, 2], "free_blocks");
    assert!(report[0].2 > 0.10, "round_robin spread {}", report[0].2);
    assert!(report[1].2 <= 0.10, "free_blocks spread {}", report[1].2);
}
