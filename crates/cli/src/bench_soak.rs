//! `splitserve bench soak`: a bounded soak of a disaggregated pair on loopback. A producer,
//! a consumer and the proxy run as processes; clients send mixed requests (short and long
//! prompts, streamed or not) through the proxy, some of which they abandon mid-stream, and
//! one instance is killed and restarted periodically. Reports RSS over time, KV blocks back
//! at the end, and every request's outcome by kind; writes JSON and an SVG plot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::child::Kill;

#[derive(clap::Args, Clone, serde::Serialize)]
pub struct BenchSoakArgs {
    /// How long the load runs
    #[arg(long, value_name = "M", default_value_t = 30.0)]
    pub minutes: f64,
    /// Concurrent clients
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub concurrency: usize,
    /// Share abandoned after their first chunk
    #[arg(long, value_name = "F", default_value_t = 0.1)]
    pub abort_fraction: f64,
    /// Instance killed: prefill, decode or none
    #[arg(long, value_name = "ROLE", default_value = "prefill")]
    pub kill: String,
    /// Seconds between kills
    #[arg(long, value_name = "S", default_value_t = 300.0)]
    pub kill_every_s: f64,
    /// The pair's hold_timeout_s
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub hold_timeout_s: f64,
    /// Kernel threads of each instance
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,
    /// Seconds after which a request is hung
    #[arg(long, value_name = "S", default_value_t = 120.0)]
    pub request_timeout_s: f64,
    /// First of five loopback ports
    #[arg(long, value_name = "PORT", default_value_t = 18300)]
    pub base_port: u16,
    /// Seed of the load
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Folder of soak.json and soak-rss.svg
    #[arg(long, value_name = "DIR", default_value = "bench-results/soak")]
    pub out: PathBuf,
}

/// One process of the pair, restartable with the command that started it.
struct Instance {
    name: &'static str,
    /// Resolved once at the start: once the binary file is replaced (a rebuild), the
    /// running process's own path no longer names a file.
    exe: PathBuf,
    url: String,
    args: Vec<String>,
    child: Option<Kill>,
    starts: usize,
}

impl Instance {
    fn new(name: &'static str, exe: &std::path::Path, port: u16, args: Vec<String>) -> Self {
        Self {
            name,
            exe: exe.to_path_buf(),
            url: format!("http://127.0.0.1:{port}"),
            args,
            child: None,
            starts: 0,
        }
    }

    fn start(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null());
        crate::child::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(Kill(child));
        self.starts += 1;
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
    }

    fn kill_hard(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.0.kill();
            let _ = c.0.wait();
        }
    }

    async fn ready(&mut self, client: &reqwest::Client) -> Result<()> {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/health", self.url)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(st) = c.0.try_wait()? {
                    bail!("{} exited while starting ({st})", self.name);
                }
            }
            if t0.elapsed() > Duration::from_secs(180) {
                bail!("{} not ready after 180 s", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Resident set size of `pid` in MiB (Linux; 0 elsewhere or if it is gone).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What the clients saw, by kind; a request that overlapped a restart is counted apart.
#[derive(Default)]
struct Outcomes {
    steady: BTreeMap<String, u64>,
    during_restart: BTreeMap<String, u64>,
}

struct Shared {
    outcomes: Mutex<Outcomes>,
    /// True from a kill until the instance answers /health again.
    down: AtomicBool,
    kills: AtomicU64,
    /// Set when the soak ends early; clients finish their request and stop.
    stop: AtomicBool,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// One request through the proxy; returns its outcome's kind.
async fn one(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    r: &mut Rng,
    abort_fraction: f64,
    timeout: Duration,
) -> String {
    // Mostly short prompts, one in eight long (the shape of a chat fleet's traffic).
    let n = if r.chance(0.125) {
        r.range(400, 700)
    } else {
        r.range(8, 160)
    };
    let seed = r.next() as u32;
    let prompt = crate::bench_pd::ids(n as usize, seed, 49_000);
    let abort = r.chance(abort_fraction);
    let stream = abort || r.chance(0.5);
    let body = json!({
        "model": model, "prompt": prompt, "max_tokens": r.range(4, 48),
        "temperature": 0, "stream": stream,
    });
    let work = async {
        let resp = match client
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
            .await
        {
            Ok(x) => x,
            Err(e) if e.is_connect() => return "connect_error".to_string(),
            Err(_) => return "transport_error".to_string(),
        };
        let status = resp.status();
        if !status.is_success() {
            return format!("http_{}", status.as_u16());
        }
        if !stream {
            return match resp.json::<Value>().await {
                Ok(v) if v["choices"][0]["text"].is_string() => "ok".into(),
                Ok(_) => "bad_body".into(),
                Err(_) => "body_error".into(),
            };
        }
        let mut resp = resp;
        let mut text = Vec::new();
        loop {
            let c = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_) => return "stream_broken".into(),
            };
            if abort {
                // Dropping the stream closes the connection: the server must free the
                // request's blocks.
                return "aborted_by_client".into();
            }
            text.extend_from_slice(&c);
        }
        let text = String::from_utf8_lossy(&text);
        if text.contains("\"error\"") {
            "stream_error_event".into()
        } else if text.trim_end().ends_with("data: [DONE]") {
            "ok".into()
        } else {
            "stream_cut".into()
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| "hung".into())
}

async fn client_loop(
    a: BenchSoakArgs,
    url: String,
    model: String,
    shared: Arc<Shared>,
    deadline: Instant,
    seed: u64,
) {
    let client = match reqwest::Client::builder().build() {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut r = Rng(seed | 1);
    let timeout = Duration::from_secs_f64(a.request_timeout_s);
    while Instant::now() < deadline && !shared.stop.load(Ordering::Relaxed) {
        let kills = shared.kills.load(Ordering::Relaxed);
        let down_before = shared.down.load(Ordering::Relaxed);
        let kind = one(&client, &url, &model, &mut r, a.abort_fraction, timeout).await;
        let overlapped = down_before
            || shared.down.load(Ordering::Relaxed)
            || shared.kills.load(Ordering::Relaxed) != kills;
        if let Ok(mut o) = shared.outcomes.lock() {
            let map = if overlapped {
                &mut o.during_restart
            } else {
                &mut o.steady
            };
            *map.entry(kind).or_default() += 1;
        }
        if overlapped {
            // Do not spin on a refused connection while an instance restarts.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn run(a: BenchSoakArgs) -> Result<()> {
    anyhow::ensure!(
        a.minutes > 0.0 && a.minutes <= 24.0 * 60.0,
        "--minutes must be in (0, 1440]"
    );
    anyhow::ensure!(
        (1..=64).contains(&a.concurrency),
        "--concurrency must be in 1..=64"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.abort_fraction),
        "--abort-fraction must be in [0, 1]"
    );
    anyhow::ensure!(
        matches!(a.kill.as_str(), "prefill" | "decode" | "none"),
        "--kill is prefill, decode or none"
    );
    anyhow::ensure!(a.kill_every_s >= 5.0, "--kill-every-s must be at least 5");
    std::fs::create_dir_all(&a.out)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(soak(a))
}

async fn soak(a: BenchSoakArgs) -> Result<()> {
    let model = crate::model_path(&a.model)?.display().to_string();
    let exe = std::env::current_exe()?;
    let p = a.base_port;
    let url = |port: u16| format!("http://127.0.0.1:{port}");
    let kv = |role: &str, side: u16| {
        format!(
            r#"{{"kv_connector":"TcpConnector","kv_role":"{role}","kv_connector_extra_config":{{"side_channel_port":{side},"hold_timeout_s":{}}}}}"#,
            a.hold_timeout_s
        )
    };
    let serve = |port: u16, kv: String| -> Vec<String> {
        [
            "serve",
            "--model",
            &model,
            "--port",
            &port.to_string(),
            "--threads",
            &a.threads.to_string(),
            "--kv-transfer-config",
            &kv,
        ]
        .map(String::from)
        .to_vec()
    };
    let mut prefill = Instance::new(
        "prefill",
        &exe,
        p + 1,
        serve(p + 1, kv("kv_producer", p + 3)),
    );
    let mut decode = Instance::new(
        "decode",
        &exe,
        p + 2,
        serve(p + 2, kv("kv_consumer", p + 4)),
    );
    let mut proxy = Instance::new(
        "proxy",
        &exe,
        p,
        [
            "proxy",
            "--port",
            &p.to_string(),
            "--prefill",
            &url(p + 1),
            "--decode",
            &url(p + 2),
        ]
        .map(String::from)
        .to_vec(),
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    for i in [&mut prefill, &mut decode, &mut proxy] {
        i.start()?;
    }
    for i in [&mut prefill, &mut decode, &mut proxy] {
        i.ready(&client).await?;
    }
    let served = splitserve_bench::load::served_model(&client, &proxy.url).await?;
    let shared = Arc::new(Shared {
        outcomes: Mutex::new(Outcomes::default()),
        down: AtomicBool::new(false),
        kills: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let total = Duration::from_secs_f64(a.minutes * 60.0);
    let t0 = Instant::now();
    let deadline = t0 + total;
    println!(
        "soak: {:.1} min, {} clients, {:.0} % aborted, kill {} every {:.0} s; proxy {}",
        a.minutes,
        a.concurrency,
        a.abort_fraction * 100.0,
        a.kill,
        a.kill_every_s,
        proxy.url
    );
    let clients: Vec<_> = (0..a.concurrency)
        .map(|i| {
            tokio::spawn(client_loop(
                a.clone(),
                proxy.url.clone(),
                served.clone(),
                shared.clone(),
                deadline,
                a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1),
            ))
        })
        .collect();
    // (seconds, [prefill, decode, proxy] RSS in MiB)
    let mut samples: Vec<(f64, [f64; 3])> = Vec::new();
    let mut next_kill = Duration::from_secs_f64(a.kill_every_s);
    let mut restarts: Vec<Value> = Vec::new();
    let every = Duration::from_secs(5);
    while Instant::now() < deadline {
        let now = t0.elapsed();
        let rss = [&prefill, &decode, &proxy].map(|i| i.pid().map_or(0.0, rss_mib));
        samples.push((now.as_secs_f64(), rss));
        let (ok, other) = shared
            .outcomes
            .lock()
            .map(|o| {
                let ok = o.steady.get("ok").copied().unwrap_or(0)
                    + o.during_restart.get("ok").copied().unwrap_or(0);
                let all: u64 = o.steady.values().chain(o.during_restart.values()).sum();
                (ok, all - ok)
            })
            .unwrap_or((0, 0));
        println!(
            "[{:>6.1} s] requests ok {ok}, other {other}; RSS MiB prefill {:.0}, decode {:.0}, proxy {:.0}",
            now.as_secs_f64(),
            rss[0],
            rss[1],
            rss[2]
        );
        if a.kill != "none" && now >= next_kill {
            next_kill += Duration::from_secs_f64(a.kill_every_s);
            let victim = if a.kill == "prefill" {
                &mut prefill
            } else {
                &mut decode
            };
            shared.down.store(true, Ordering::Relaxed);
            shared.kills.fetch_add(1, Ordering::Relaxed);
            let t_kill = Instant::now();
            victim.kill_hard();
            let back = match victim.start() {
                Ok(()) => victim.ready(&client).await,
                Err(e) => Err(e),
            };
            if let Err(e) = back {
                // Reported with everything measured so far; the clients stop at once.
                println!(
                    "  {} did not come back: {e:#}; ending the soak",
                    victim.name
                );
                restarts.push(json!({"at_s": now.as_secs_f64(), "instance": victim.name, "error": format!("{e:#}")}));
                shared.stop.store(true, Ordering::Relaxed);
                break;
            }
            shared.down.store(false, Ordering::Relaxed);
            let back = t_kill.elapsed().as_secs_f64();
            println!(
                "  killed {} and restarted it: serving again after {back:.1} s",
                victim.name
            );
            restarts.push(
                json!({"at_s": now.as_secs_f64(), "instance": victim.name, "back_after_s": back}),
            );
        }
        tokio::time::sleep(every.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
    // Clients finish their last request (bounded by --request-timeout-s).
    for c in clients {
        let _ = c.await;
    }
    let wall = t0.elapsed().as_secs_f64();
    // Every block comes back: pulled KV at once, unpulled holds after hold_timeout_s.
    let wait_until = Instant::now() + Duration::from_secs_f64(a.hold_timeout_s + 15.0);
    let mut blocks = Vec::new();
    for i in [&prefill, &decode] {
        let mut last = Value::Null;
        loop {
            if let Ok(r) = client.get(format!("{}/health", i.url)).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    last = v;
                }
            }
            let free = last["free_blocks"].as_u64().unwrap_or(0);
            let total = last["total_blocks"].as_u64().unwrap_or(u64::MAX);
            if free == total || Instant::now() > wait_until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let free = last["free_blocks"].as_u64().unwrap_or(0);
        let total = last["total_blocks"].as_u64().unwrap_or(0);
        if last.is_null() {
            blocks.push(json!({"instance": i.name, "unreachable": true}));
            continue;
        }
        blocks.push(json!({"instance": i.name, "free": free, "total": total,
            "leaked": total.saturating_sub(free), "held": last["held_blocks"]}));
    }
    // RSS growth after warm-up (the first fifth of the run, at least 30 s), for the
    // processes that lived through the whole run.
    let warm = (wall / 5.0).max(30.0).min(wall);
    let growth = |k: usize| -> Option<(f64, f64, f64)> {
        let base = samples.iter().find(|s| s.0 >= warm)?.1[k];
        let last = samples.last()?.1[k];
        (base > 0.0).then(|| (base, last, (last - base) / base * 100.0))
    };
    let mut growth_json = Vec::new();
    for (k, i) in [&prefill, &decode, &proxy].iter().enumerate() {
        if i.starts > 1 {
            growth_json.push(json!({"instance": i.name, "restarted": i.starts - 1}));
            continue;
        }
        if let Some((base, last, pct)) = growth(k) {
            growth_json.push(json!({"instance": i.name, "rss_after_warmup_mib": base,
                "rss_at_end_mib": last, "growth_pct": pct}));
        }
    }
    let (steady, during) = shared
        .outcomes
        .lock()
        .map(|o| (o.steady.clone(), o.during_restart.clone()))
        .unwrap_or_default();
    let hung = steady.get("hung").copied().unwrap_or(0) + during.get("hung").copied().unwrap_or(0);
    let leaked: u64 = blocks
        .iter()
        .map(|b| b["leaked"].as_u64().unwrap_or(0))
        .sum();
    let report = json!({
        "args": a,
        "wall_s": wall,
        "outcomes": steady,
        "outcomes_overlapping_a_restart": during,
        "hung": hung,
        "blocks_at_end": blocks,
        "leaked_blocks": leaked,
        "rss_growth": growth_json,
        "restarts": restarts,
        "rss_samples": samples.iter().map(|(t, r)| json!({"t_s": t, "prefill_mib": r[0], "decode_mib": r[1], "proxy_mib": r[2]})).collect::<Vec<_>>(),
    });
    let json_path = a.out.join("soak.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let series: Vec<(String, Vec<(f64, f64)>)> = ["prefill", "decode", "proxy"]
        .iter()
        .enumerate()
        .map(|(k, n)| {
            (
                n.to_string(),
                samples
                    .iter()
                    .filter(|s| s.1[k] > 0.0)
                    .map(|s| (s.0 / 60.0, s.1[k]))
                    .collect(),
            )
        })
        .collect();
    let svg = a.out.join("soak-rss.svg");
    splitserve_bench::plot::lines(&svg, "RSS during the soak", "minutes", "RSS (MiB)", &series)?;
    println!("\noutcomes (steady): {steady:?}");
    println!("outcomes (overlapping a restart): {during:?}");
    println!("hung requests: {hung}");
    for b in blocks.iter().filter(|b| b.get("unreachable").is_none()) {
        println!(
            "{}: {} of {} blocks free at the end ({} leaked)",
            b["instance"].as_str().unwrap_or("?"),
            b["free"],
            b["total"],
            b["leaked"]
        );
    }
    for g in &growth_json {
        println!("RSS {g}");
    }
    println!("wrote {} and {}", json_path.display(), svg.display());
    if restarts.iter().any(|r| r.get("error").is_some()) {
        bail!("an instance did not come back after its restart (see soak.json)");
    }
    if blocks.iter().any(|b| b.get("unreachable").is_some()) {
        bail!("an instance did not answer /health at the end (see soak.json)");
    }
    Ok(())
}
