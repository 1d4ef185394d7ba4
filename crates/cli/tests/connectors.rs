//! The connectors with real processes: one conformance suite every pair passes (the same
//! tokens and logprob bits as one engine alone, a partial prefix hit, two writers of one
//! prefix, every block back), then each connector's own tests.
//!
//! `ExampleConnector` with real processes sharing a directory: a pair answers as one engine
//! does, with the consumer computing only what the store lacks; damaged files are misses
//! (computed, counted), never garbage; a restarted `kv_both` instance reuses the disk.
//! `OffloadingConnector`: a small engine pool backed by host memory loads back what it evicted.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn store_config(role: &str, dir: &Path) -> String {
    json!({"kv_connector": "ExampleConnector", "kv_role": role,
           "kv_connector_extra_config": {"shared_storage_path": dir}})
    .to_string()
}

fn fresh_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("splitserve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Block files in `dir`, sorted by name.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut f: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    f.retain(|p| p.extension().is_some_and(|x| x == "kv"));
    f.sort();
    f
}

/// A MultiConnector of a TcpConnector (side channel at `side`) and an ExampleConnector
/// in `dir`.
fn multi_config(role: &str, side: u16, dir: &Path) -> String {
    json!({"kv_connector": "MultiConnector", "kv_role": role,
           "kv_connector_extra_config": {"connectors": [
               {"kv_connector": "TcpConnector",
                "kv_connector_extra_config": {"side_channel_port": side}},
               {"kv_connector": "ExampleConnector",
                "kv_connector_extra_config": {"shared_storage_path": dir}}]}})
    .to_string()
}

/// A prompt of a few hundred tokens (several 16-token blocks and a partial one).
fn prompt() -> String {
    (0..24)
        .map(|i| format!("Item {i} of the shared storage test names a colour and a number."))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn complete(p: &Proc, prompt: &str, params: Option<&Value>) -> Value {
    // A producer's part is the prompt and the first token (as a proxy asks it).
    let produce = params.is_some_and(|x| x["do_remote_decode"] == true);
    let max_tokens = if produce { 1 } else { 16 };
    let mut body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                          "return_token_ids": true});
    if let Some(x) = params {
        body["kv_transfer_params"] = x.clone();
    }
    let (st, v) = post(&format!("{}/v1/completions", p.url()), &body).await;
    assert_eq!(st, 200, "{v}");
    v
}

fn tokens(v: &Value) -> Vec<u64> {
    v["choices"][0]["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

/// Prompt tokens a consumer computes when the store has every full block: the partial last
/// block, or the last token (its logits are needed).
fn tail(n: usize) -> usize {
    match n % 16 {
        0 => 1,
        r => r,
    }
}

/// A store counter of `connector` from `/metrics` (0 when not yet exported).
async fn store_metric(p: &Proc, name: &str, connector: &str) -> f64 {
    let want = format!("splitserve:{name}{{connector=\"{connector}\"}} ");
    metrics_text(p)
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&want)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn misses(p: &Proc) -> f64 {
    metrics_text(p)
        .await
        .lines()
        .filter(|l| l.starts_with("splitserve:kv_store_misses_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_through_shared_storage_answers_like_one_engine_and_survives_bad_files() {
    let dir = fresh_dir("store-pair");
    let prompt = prompt();
    let solo = serve(&[], None);
    ready(&solo).await;
    let reference = complete(&solo, &prompt, None).await;
    drop(solo);
    let n = reference["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    assert!(n > 160, "{n} prompt tokens");

    let p = serve(&[], Some(store_config("kv_producer", &dir)));
    let d = serve(&[], Some(store_config("kv_consumer", &dir)));
    ready(&p).await;
    ready(&d).await;
    let first = complete(&p, &prompt, Some(&json!({"do_remote_decode": true}))).await;
    let params = first["kv_transfer_params"].clone();
    assert_eq!(params["do_remote_prefill"], true, "{first}");
    // One file per full block, on disk before the producer answered.
    assert_eq!(files(&dir).len(), n / 16);
    assert_eq!(
        health(&p).await["held_blocks"].as_u64(),
        Some(0),
        "nothing held"
    );

    let got = complete(&d, &prompt, Some(&params)).await;
    assert_eq!(tokens(&got), tokens(&reference));
    assert_eq!(got["choices"][0]["text"], reference["choices"][0]["text"]);
    // The consumer computed only the partial last block (or the last token).
    let tail = tail(n);
    all_free(&d, Duration::from_secs(10)).await;
    assert_eq!(metric(&d, "prompt_tokens_computed").await, tail as f64);
    assert_eq!(misses(&d).await, 0.0);
    let example = "ExampleConnector";
    let blocks = (n / 16) as f64;
    assert_eq!(
        store_metric(&p, "kv_store_saved_blocks_total", example).await,
        blocks
    );
    assert_eq!(
        store_metric(&d, "kv_store_loaded_blocks_total", example).await,
        blocks
    );
    assert_eq!(
        store_metric(&d, "kv_store_loaded_bytes_total", example).await,
        blocks * 30.0 * 2.0 * 16.0 * 3.0 * 64.0 * 2.0,
        "30 layers, K and V, 16 tokens, 3 KV heads of 64 f16 values"
    );

    // A corrupted and a truncated file: a fresh consumer uses the blocks before the first
    // bad one, computes the rest, counts the miss, and answers the same.
    let f = files(&dir);
    let mut bytes = std::fs::read(&f[2]).expect("read");
    let at = bytes.len() - 100;
    bytes[at] ^= 0x55;
    std::fs::write(&f[2], &bytes).expect("write");
    let bytes = std::fs::read(&f[5]).expect("read");
    std::fs::write(&f[5], &bytes[..bytes.len() / 2]).expect("write");
    let d2 = serve(&[], Some(store_config("kv_consumer", &dir)));
    ready(&d2).await;
    let got = complete(&d2, &prompt, Some(&params)).await;
    assert_eq!(tokens(&got), tokens(&reference));
    all_free(&d2, Duration::from_secs(10)).await;
    assert_eq!(
        misses(&d2).await,
        1.0,
        "one load, stopped at its first bad block"
    );
    let computed = metric(&d2, "prompt_tokens_computed").await;
    assert!(
        computed > tail as f64 && computed < n as f64,
        "{computed} of {n}"
    );
    // The bad file it met is gone, so the next save of that block writes it anew.
    assert_eq!(files(&dir).len(), n / 16 - 1);
    assert!(!f[2].exists() || !f[5].exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_reuses_what_is_on_disk() {
    let dir = fresh_dir("store-both");
    let prompt = prompt();
    let a = serve(&[], Some(store_config("kv_both", &dir)));
    ready(&a).await;
    let first = complete(&a, &prompt, None).await;
    let n = first["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    all_free(&a, Duration::from_secs(10)).await;
    assert_eq!(metric(&a, "prompt_tokens_computed").await, n as f64);
    // Every full block computed: the prompt's and the generated tokens' but the last (its
    // KV is never computed). Saves reach the disk off the engine thread, shortly after.
    let full = n.div_ceil(16);
    for _ in 0..100 {
        if files(&dir).len() == full {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(files(&dir).len(), full);
    drop(a);

    let b = serve(&[], Some(store_config("kv_both", &dir)));
    ready(&b).await;
    let again = complete(&b, &prompt, None).await;
    assert_eq!(tokens(&again), tokens(&first));
    all_free(&b, Duration::from_secs(10)).await;
    let tail = tail(n);
    assert_eq!(metric(&b, "prompt_tokens_computed").await, tail as f64);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_store_misconfigured_is_refused_at_start_naming_the_key() {
    for (extra, kv, want) in [
        (
            vec![],
            r#"{"kv_connector":"ExampleConnector","kv_role":"kv_both"}"#.to_string(),
            "shared_storage_path",
        ),
        (
            vec!["--no-enable-prefix-caching"],
            store_config("kv_both", &fresh_dir("store-refused")),
            "prefix-caching",
        ),
        (
            vec![],
            store_config("kv_both", Path::new("/proc/version/kv")),
            "shared_storage_path",
        ),
        (
            vec![],
            json!({"kv_connector": "RedisStoreConnector", "kv_role": "kv_both",
                   "kv_connector_extra_config": {"remote_url": format!("redis://127.0.0.1:{}", free_port())}})
            .to_string(),
            "does not answer",
        ),
        (
            vec![],
            r#"{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":{"cpu_bytes_to_use":1048576,"block_size":24}}"#.to_string(),
            "block_size",
        ),
        (
            vec![],
            r#"{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":{"cpu_bytes_to_use":1048576,"secondary_tiers":[{"kind":"disk","path":"/proc/version/kv","bytes":1048576}]}}"#.to_string(),
            "secondary_tiers",
        ),
        (
            vec![],
            r#"{"kv_connector":"OffloadingConnector","kv_role":"kv_both","kv_connector_extra_config":{"cpu_bytes_to_use":1048576,"secondary_tiers":[{"kind":"tape","path":"/tmp","bytes":1}]}}"#.to_string(),
            "secondary_tiers",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
            .args(["serve", "--model", &model(), "--threads", "1"])
            .args(["--port", &free_port().to_string()])
            .args(extra)
            .args(["--kv-transfer-config", &kv])
            .output()
            .expect("run");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_pool_backed_by_host_memory_loads_what_it_evicted() {
    // 32 blocks of 16 tokens: the second prompt evicts most of the first one's cached blocks.
    let kv = json!({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                    "kv_connector_extra_config": {"cpu_bytes_to_use": 256 << 20, "block_size": 32}})
    .to_string();
    let p = serve(&["--num-kv-blocks", "32"], Some(kv));
    ready(&p).await;
    let a = prompt();
    let b = a.replace("colour", "shape").replace("Item", "Entry");
    let first = complete(&p, &a, None).await;
    let n = first["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    complete(&p, &b, None).await;
    all_free(&p, Duration::from_secs(10)).await;
    let before = metric(&p, "prompt_tokens_computed").await;
    let again = complete(&p, &a, None).await;
    assert_eq!(tokens(&again), tokens(&first));
    all_free(&p, Duration::from_secs(10)).await;
    // Offloaded blocks are 2 engine blocks: the prompt's full blocks, rounded down to pairs,
    // come from host memory; the rest is computed.
    let full = n / 16;
    let loaded = (full - full % 2) * 16;
    assert_eq!(
        metric(&p, "prompt_tokens_computed").await - before,
        (n - loaded) as f64
    );
    assert_eq!(misses(&p).await, 0.0);
}

/// A `redis-server` of this test's own on a free loopback port (killed on drop), or `None`
/// when the machine has none (`.ci/run` installs it and sets SPLITSERVE_REQUIRE_REDIS, under
/// which a missing server fails the test).
struct RedisServer(std::process::Child, u16);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server() -> Option<RedisServer> {
    redis_server_with(&[])
}

/// As [`redis_server`], with more `redis-server` arguments.
fn redis_server_with(args: &[&str]) -> Option<RedisServer> {
    let port = free_port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("SPLITSERVE_REQUIRE_REDIS").is_none(),
                "SPLITSERVE_REQUIRE_REDIS is set, but redis-server cannot start: {e}"
            );
            eprintln!("skipped: no redis-server here ({e}); Debian's redis-server package has it");
            return None;
        }
    };
    let r = RedisServer(child, port);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some(r);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server did not listen on {port}");
}

/// Two `kv_both` instances on one Redis: `b` answers `prompt` as `a` did, loading the
/// prompt's whole 256-token chunks that `a` saved and computing only the rest.
async fn b_loads_what_a_computed(a: &Proc, b: &Proc, prompt: &str) {
    ready(a).await;
    ready(b).await;
    let first = complete(a, prompt, None).await;
    let n = first["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    all_free(a, Duration::from_secs(10)).await;
    // A's saves reach Redis off its engine thread: B finds them shortly after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = complete(b, prompt, None).await;
    assert_eq!(tokens(&got), tokens(&first));
    all_free(b, Duration::from_secs(10)).await;
    let loaded = n / 256 * 256;
    assert!(loaded > 0, "{n} prompt tokens");
    assert_eq!(
        metric(b, "prompt_tokens_computed").await,
        (n - loaded) as f64
    );
    assert_eq!(misses(b).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_prompt_through_redis_and_serve_without_it() {
    let Some(redis) = redis_server() else {
        return;
    };
    let kv = json!({"kv_connector": "RedisStoreConnector", "kv_role": "kv_both",
                    "kv_connector_extra_config": {"remote_url": format!("redis://127.0.0.1:{}", redis.1)}})
    .to_string();
    let a = serve(&[], Some(kv.clone()));
    let b = serve(&[], Some(kv.clone()));
    let prompt = prompt();
    b_loads_what_a_computed(&a, &b, &prompt).await;

    // Every stored value damaged (one byte of its KV changed, or cut short): a third
    // instance computes the prompt, answers the same tokens, and counts the misses by name.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.1.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (Debian's redis-tools, with redis-server)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let keys = cli(&["--scan", "--pattern", "splitserve:kv:*"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert!(!keys.is_empty());
    for (i, k) in keys.iter().enumerate() {
        if i % 2 == 0 {
            cli(&["SETRANGE", k, "5000", "X"]);
        } else {
            cli(&["SET", k, "short"]);
        }
    }
    let c = serve(&[], Some(kv.clone()));
    ready(&c).await;
    let got = complete(&c, &prompt, None).await;
    let n = got["usage"]["prompt_tokens"].as_f64().expect("usage");
    assert_eq!(tokens(&got), tokens(&complete(&a, &prompt, None).await));
    assert_eq!(metric(&c, "prompt_tokens_computed").await, n);
    let text = metrics_text(&c).await;
    let count = |reason: &str| {
        let want = format!("splitserve:kv_store_misses_total{{connector=\"RedisStoreConnector\",reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&want)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // The load stops at the first bad block.
    assert_eq!(count("corrupt") + count("truncated"), 1.0, "{text}");

    // Redis gone: requests are computed here, no error, no hang.
    drop(redis);
    let other = prompt.replace("number", "letter");
    let t0 = std::time::Instant::now();
    let v = complete(&b, &other, None).await;
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_evicts_and_every_request_still_answers() {
    // Room for a few block values only: saves push older ones out.
    let Some(redis) =
        redis_server_with(&["--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru"])
    else {
        return;
    };
    let kv = json!({"kv_connector": "RedisStoreConnector", "kv_role": "kv_both",
                    "kv_connector_extra_config": {"remote_url": format!("redis://127.0.0.1:{}", redis.1),
                                                  "chunk_size": 16}})
    .to_string();
    let a = serve(&[], Some(kv.clone()));
    let c = serve(&[], Some(kv));
    ready(&a).await;
    ready(&c).await;
    let long = prompt();
    let first = complete(&a, &long, None).await;
    let n = first["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    complete(&a, &long.replace("Item", "Entry"), None).await;
    all_free(&a, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The first prompt's first blocks were evicted: `c` computes from there, the same
    // tokens.
    let got = complete(&c, &long, None).await;
    assert_eq!(tokens(&got), tokens(&first));
    all_free(&c, Duration::from_secs(10)).await;
    let computed = metric(&c, "prompt_tokens_computed").await;
    assert!(
        computed > tail(n) as f64,
        "{computed} of {n} computed: nothing was evicted?"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_with_a_password_takes_it_from_the_environment_only() {
    let Some(redis) = redis_server_with(&["--requirepass", "kv-store-pw-9f3"]) else {
        return;
    };
    let url = format!("redis://127.0.0.1:{}", redis.1);
    let kv = |url: &str| {
        json!({"kv_connector": "RedisStoreConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"remote_url": url}})
        .to_string()
    };
    let refused = |url: &str, env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"));
        c.args(["serve", "--model", &model(), "--threads", "1"])
            .args(["--port", &free_port().to_string()])
            .args(["--kv-transfer-config", &kv(url)])
            .env_remove("SPLITSERVE_REDIS_PASSWORD");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().expect("run");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // No password, a wrong one, or one in the URL: refused at start, naming the key.
    let err = refused(&url, &[]);
    assert!(
        err.contains("remote_url") && err.contains("does not answer"),
        "{err}"
    );
    let err = refused(&url, &[("SPLITSERVE_REDIS_PASSWORD", "wrong")]);
    assert!(err.contains("does not answer"), "{err}");
    let err = refused(
        &format!("redis://:kv-store-pw-9f3@127.0.0.1:{}", redis.1),
        &[],
    );
    assert!(err.contains("SPLITSERVE_REDIS_PASSWORD"), "{err}");
    assert!(
        !err.contains("kv-store-pw-9f3"),
        "the password is echoed: {err}"
    );

    let env = [("SPLITSERVE_REDIS_PASSWORD", "kv-store-pw-9f3")];
    let a = serve_env(&[], Some(kv(&url)), &env);
    let b = serve_env(&[], Some(kv(&url)), &env);
    b_loads_what_a_computed(&a, &b, &prompt()).await;
    for p in [&a, &b] {
        assert!(
            !p.log().contains("kv-store-pw-9f3"),
            "the password is in a log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_memory_full_spills_to_a_bounded_disk_tier_and_never_fails() {
    // A block file: 30 layers x K and V x 16 tokens x 3 heads x 64 x f16, and its header.
    const FILE: u64 = 30 * 2 * 16 * 3 * 64 * 2 + 144;
    let dir = fresh_dir("offload-disk");
    // Host memory holds 8 block files; the disk 64 MiB.
    let kv = |disk_bytes: u64| {
        json!({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"cpu_bytes_to_use": 8 * FILE, "block_size": 32,
                   "secondary_tiers": [{"kind": "disk", "path": dir, "bytes": disk_bytes}]}})
        .to_string()
    };
    let a = prompt();
    let b = a.replace("colour", "shape").replace("Item", "Entry");
    let p = serve(&["--num-kv-blocks", "32"], Some(kv(64 << 20)));
    ready(&p).await;
    // Full blocks with KV: the prompt's and the generated tokens' but the last one's.
    let blocks = |v: &Value| {
        let u = &v["usage"];
        (u["prompt_tokens"].as_u64().expect("usage")
            + u["completion_tokens"].as_u64().expect("usage")
            - 1) as usize
            / 16
    };
    let first = complete(&p, &a, None).await;
    let n = first["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    let full = n / 16;
    let other = complete(&p, &b, None).await;
    all_free(&p, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Both requests' blocks were offloaded; memory kept the newest 8, the disk the rest.
    assert_eq!(files(&dir).len(), blocks(&first) + blocks(&other) - 8);
    let before = metric(&p, "prompt_tokens_computed").await;
    let again = complete(&p, &a, None).await;
    assert_eq!(tokens(&again), tokens(&first));
    all_free(&p, Duration::from_secs(10)).await;
    // All of `a` came back from the disk, in whole offloaded blocks.
    let loaded = (full - full % 2) * 16;
    assert_eq!(
        metric(&p, "prompt_tokens_computed").await - before,
        (n - loaded) as f64
    );
    assert_eq!(misses(&p).await, 0.0);
    drop(p);

    // A disk tier of 4 files: it evicts its oldest, and requests never fail; a restart
    // trims what an earlier run left to the budget.
    let p = serve(&["--num-kv-blocks", "32"], Some(kv(4 * FILE)));
    ready(&p).await;
    assert_eq!(files(&dir).len(), 4);
    for text in [&a, &b, &a] {
        let v = complete(&p, text, None).await;
        assert_eq!(v["usage"]["completion_tokens"], 16);
        assert!(files(&dir).len() <= 4, "{}", files(&dir).len());
    }
    assert_eq!(tokens(&complete(&p, &a, None).await), tokens(&first));
    all_free(&p, Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_connector_pulls_over_the_side_channel_and_keeps_a_store_for_later() {
    let dir = fresh_dir("store-multi");
    let multi = |role: &str, side: u16| multi_config(role, side, &dir);
    let p = serve(&[], Some(multi("kv_producer", free_port())));
    let d = serve(&[], Some(multi("kv_consumer", free_port())));
    ready(&p).await;
    ready(&d).await;
    let prompt = prompt();
    let params = complete(&p, &prompt, Some(&json!({"do_remote_decode": true}))).await
        ["kv_transfer_params"]
        .clone();
    // The side channel's grant, merged with the store's fields.
    assert!(params["remote_capability"].is_string(), "{params}");
    assert!(params["remote_port"].is_u64(), "{params}");
    let got = complete(&d, &prompt, Some(&params)).await;
    let n = got["usage"]["prompt_tokens"].as_u64().expect("usage") as usize;
    all_free(&d, Duration::from_secs(10)).await;
    // Pulled whole over the side channel, first token included: nothing computed.
    assert_eq!(metric(&d, "prompt_tokens_computed").await, 0.0);
    all_free(&p, Duration::from_secs(10)).await;
    assert_eq!(files(&dir).len(), n / 16, "and saved to the store");

    // Another consumer, asked without params, finds the prompt in the store.
    let d2 = serve(&[], Some(multi("kv_consumer", free_port())));
    ready(&d2).await;
    let again = complete(&d2, &prompt, None).await;
    assert_eq!(tokens(&again), tokens(&got));
    all_free(&d2, Duration::from_secs(10)).await;
    assert_eq!(metric(&d2, "prompt_tokens_computed").await, tail(n) as f64);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pair's `--kv-transfer-config` for a role, given the side channel's port.
type PairConfig = Box<dyn Fn(&str, u16) -> String>;

/// The conformance suite's pairs, by connector name.
fn pairs(dir: &Path, redis: Option<&RedisServer>) -> Vec<(&'static str, PairConfig)> {
    let d = dir.to_path_buf();
    let d2 = dir.to_path_buf();
    let mut v: Vec<(&'static str, PairConfig)> = vec![
        (
            "TcpConnector",
            Box::new(|role, side| kv_config(role, side, 30.0)),
        ),
        (
            "ExampleConnector",
            Box::new(move |role, _| store_config(role, &d)),
        ),
        (
            "MultiConnector",
            Box::new(move |role, side| multi_config(role, side, &d2)),
        ),
    ];
    #[cfg(feature = "nixl")]
    {
        v.push((
            "NixlConnector",
            Box::new(|role, side| kv_config_for("NixlConnector", role, side, 30.0)),
        ));
        // By default UCX's threads share a read; here the loading thread copies alone.
        v.push((
            "NixlConnector with num_threads 0",
            Box::new(|role, side| {
                let mut c: Value =
                    serde_json::from_str(&kv_config_for("NixlConnector", role, side, 30.0))
                        .expect("a config");
                c["kv_connector_extra_config"]["num_threads"] = json!(0);
                c.to_string()
            }),
        ));
    }
    if let Some(r) = redis {
        let url = format!("redis://127.0.0.1:{}", r.1);
        v.push((
            "RedisStoreConnector",
            Box::new(move |role, _| {
                json!({"kv_connector": "RedisStoreConnector", "kv_role": role,
                       "kv_connector_extra_config": {"remote_url": url, "chunk_size": 16}})
                .to_string()
            }),
        ));
    }
    v
}

/// A completion with the top-5 logprobs of every token: equal JSON means equal bits.
async fn with_logprobs(p: &Proc, prompt: &str, params: Option<&Value>) -> Value {
    let produce = params.is_some_and(|x| x["do_remote_decode"] == true);
    let mut body = json!({"prompt": prompt, "max_tokens": if produce { 1 } else { 8 },
                          "temperature": 0, "logprobs": 5});
    if let Some(x) = params {
        body["kv_transfer_params"] = x.clone();
    }
    let (st, v) = post(&format!("{}/v1/completions", p.url()), &body).await;
    assert_eq!(st, 200, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connector_passes_the_same_conformance_suite() {
    let redis = redis_server();
    let long = prompt();
    // Shares the first half of `long`, then goes its own way: a partial prefix hit.
    let half: String = long.chars().take(long.len() / 2).collect();
    let branch = format!("{half} A different ending follows here, about something else.");
    let solo = serve(&[], None);
    ready(&solo).await;
    let mut reference = Vec::new();
    for p in [&long, &branch] {
        reference.push(with_logprobs(&solo, p, None).await["choices"][0].clone());
    }
    drop(solo);
    for r in &reference {
        let lp = r["logprobs"]["top_logprobs"].as_array().map_or(0, Vec::len);
        assert_eq!(lp, 8, "top-5 logprobs for each of 8 tokens: {r}");
    }
    let dir = fresh_dir("conformance");
    let mut passed = Vec::new();
    for (name, config) in pairs(&dir, redis.as_ref()) {
        let _ = std::fs::remove_dir_all(&dir);
        let p = serve(&[], Some(config("kv_producer", free_port())));
        let d = serve(&[], Some(config("kv_consumer", free_port())));
        ready(&p).await;
        ready(&d).await;
        for (i, prompt) in [&long, &branch].into_iter().enumerate() {
            // Two producers' requests for the same prompt at once: two writers of one
            // prefix (the second may hit the first's cache; both must answer).
            let produce = json!({"do_remote_decode": true});
            let (a, b) = tokio::join!(
                with_logprobs(&p, prompt, Some(&produce)),
                with_logprobs(&p, prompt, Some(&produce))
            );
            for params in [&a["kv_transfer_params"], &b["kv_transfer_params"]] {
                assert!(params.is_object(), "{name}: {a}");
            }
            let got = with_logprobs(&d, prompt, Some(&a["kv_transfer_params"])).await;
            // Token for token, logprob for logprob: the same bits as one engine alone.
            assert_eq!(
                got["choices"][0]["text"], reference[i]["text"],
                "{name}, prompt {i}"
            );
            assert_eq!(
                got["choices"][0]["logprobs"], reference[i]["logprobs"],
                "{name}, prompt {i}"
            );
            // The second producer's grant is good too: a consumer redeems it (or, for a
            // store, finds the same blocks).
            {
                let (st, _) = post(
                    &format!("{}/v1/completions", d.url()),
                    &json!({"prompt": prompt, "max_tokens": 1, "temperature": 0,
                            "kv_transfer_params": b["kv_transfer_params"]}),
                )
                .await;
                assert_eq!(st, 200, "{name}: the second grant is good too");
            }
        }
        all_free(&p, Duration::from_secs(10)).await;
        all_free(&d, Duration::from_secs(10)).await;
        assert_eq!(health(&p).await["held_blocks"].as_u64(), Some(0), "{name}");
        assert_eq!(misses(&d).await, 0.0, "{name}");
        passed.push(name);
    }
    eprintln!("conformance passed: {passed:?}");
    assert_eq!(
        passed.len(),
        3 + usize::from(redis.is_some()) + 2 * usize::from(cfg!(feature = "nixl"))
    );
    let _ = std::fs::remove_dir_all(&dir);
}
