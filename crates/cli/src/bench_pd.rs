//! `splitserve bench pd`: the interference experiment. Each arm is started here on loopback
//! with the same total threads — one colocated engine, or a producer, a consumer and the
//! proxy (`splitserve up`) — and gets the same workload: steady decode streams (short
//! prompts, long outputs, re-issued until the end) while big prompts arrive periodically.
//! Reports decode-stream ITL and big-prompt TTFT side by side; writes JSON, a markdown table
//! and two SVG plots.
//!
//! `--sweep RATES` runs the goodput sweep instead: each arm gets Poisson traffic at each
//! request rate (low to saturation); per rate, the share of requests meeting both SLOs and
//! goodput (DistServe); per arm, the highest rate at which at least 90 % meet them.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use splitserve_bench::load::{send, served_model, Job};
use splitserve_bench::stats::{RequestResult, Summary};
use splitserve_engine::CpuList;

#[derive(clap::Args, Clone, serde::Serialize)]
pub struct BenchPdArgs {
    /// Small settings: under two minutes
    #[arg(long)]
    pub quick: bool,
    /// Threads of each arm, all roles together
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub threads: usize,
    /// The pair's threads (default: --threads)
    #[arg(long, value_name = "N")]
    pub pair_threads: Option<usize>,
    /// The pair's producer threads (default: split)
    #[arg(long, value_name = "N")]
    pub prefill_threads: Option<usize>,
    /// The pair's consumer threads (default: split)
    #[arg(long, value_name = "N")]
    pub decode_threads: Option<usize>,
    /// The pair prefills shorter prompts on decode
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub disagg_threshold: usize,
    /// The pair's connector (or NixlConnector)
    #[arg(long, value_name = "NAME", default_value = "TcpConnector",
          value_parser = ["TcpConnector", "NixlConnector"], hide_possible_values = true)]
    pub kv_connector: String,
    /// Concurrent decode streams
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub streams: usize,
    /// Tokens per stream (default: 128; quick 48)
    #[arg(long, value_name = "N")]
    pub stream_tokens: Option<usize>,
    /// Big prompt tokens (default: 1490; quick 256)
    #[arg(long, value_name = "N")]
    pub big_prompt_tokens: Option<usize>,
    /// max_tokens of each big prompt
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub big_max_tokens: usize,
    /// Big prompts per arm (default: 4; quick 2)
    #[arg(long, value_name = "N")]
    pub big_prompts: Option<usize>,
    /// Seconds between them (default: 20; quick 4)
    #[arg(long, value_name = "S")]
    pub big_interval_s: Option<f64>,
    /// Folder of pd.json, pd.md and the plots
    #[arg(long, value_name = "DIR", default_value = "bench-results/pd")]
    pub out: PathBuf,
    /// Arms to run
    #[arg(
        long,
        value_name = "ARMS",
        value_delimiter = ',',
        default_value = "colocated,disaggregated"
    )]
    pub arms: Vec<String>,
    /// Rounds, arms alternating; medians reported
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub runs: usize,
    /// First loopback port
    #[arg(long, value_name = "PORT", default_value_t = 18100)]
    pub base_port: u16,
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Extra flags for every engine of both arms
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    pub serve_args: Option<String>,
    /// CPUs, taken in turn (default: as up places)
    #[arg(long, value_name = "CPUS")]
    #[serde(skip)]
    pub cpu_bind: Option<CpuList>,
    /// Extra flags for the pair's producer only
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    pub prefill_args: Option<String>,
    /// Goodput sweep: request rates, e.g. 0.1,0.2
    #[arg(long, value_name = "RATES", value_delimiter = ',')]
    pub sweep: Vec<f64>,
    /// Sweep: requests per rate (default: 24)
    #[arg(long, value_name = "N")]
    pub sweep_prompts: Option<usize>,
    /// Sweep: prompt tokens (default: 256)
    #[arg(long, value_name = "N")]
    pub sweep_input_len: Option<usize>,
    /// Sweep: output tokens (default: 64)
    #[arg(long, value_name = "N")]
    pub sweep_output_len: Option<usize>,
    /// Sweep SLO: time to first token, ms
    #[arg(long, value_name = "MS", default_value_t = 3000.0)]
    pub slo_ttft_ms: f64,
    /// Sweep SLO: mean inter-token latency, ms
    #[arg(long, value_name = "MS", default_value_t = 100.0)]
    pub slo_itl_ms: f64,
    /// Run on hosts.sh's hosts NAME (root)
    #[arg(long, value_name = "NAME")]
    pub hosts: Option<String>,
    /// With --hosts: tc rate[:delay] of each link
    #[arg(long, value_name = "RATE", default_value = "10gbit")]
    pub link: String,
    /// The hosts harness
    #[arg(long, value_name = "PATH", default_value = "deploy/netns/hosts.sh")]
    pub hosts_script: PathBuf,
}

#[derive(Clone, serde::Serialize)]
struct Settings {
    runs: usize,
    threads: usize,
    pair_threads: usize,
    disagg_threshold: usize,
    streams: usize,
    stream_tokens: usize,
    big_prompt_tokens: usize,
    big_max_tokens: usize,
    big_prompts: usize,
    big_interval_s: f64,
    prefill_threads: Option<usize>,
    decode_threads: Option<usize>,
    serve_args: Option<String>,
    prefill_args: Option<String>,
    cpu_bind: Option<String>,
}

impl BenchPdArgs {
    fn settings(&self) -> Settings {
        let q = self.quick;
        Settings {
            runs: self.runs,
            threads: self.threads,
            pair_threads: self.pair_threads.unwrap_or(self.threads),
            disagg_threshold: self.disagg_threshold,
            streams: self.streams,
            stream_tokens: self.stream_tokens.unwrap_or(if q { 48 } else { 128 }),
            big_prompt_tokens: self.big_prompt_tokens.unwrap_or(if q { 256 } else { 1490 }),
            big_max_tokens: self.big_max_tokens,
            big_prompts: self.big_prompts.unwrap_or(if q { 2 } else { 4 }),
            big_interval_s: self.big_interval_s.unwrap_or(if q { 4.0 } else { 20.0 }),
            prefill_threads: self.prefill_threads,
            decode_threads: self.decode_threads,
            serve_args: self.serve_args.clone(),
            prefill_args: self.prefill_args.clone(),
            cpu_bind: self.cpu_bind.as_ref().map(|c| c.to_string()),
        }
    }
}

pub(crate) fn ids(n: usize, seed: u32, vocab: u32) -> Vec<u32> {
    // Ordinary-text token ids (skip the special tokens at the start of the vocabulary).
    (0..n as u32)
        .map(|i| {
            let x = (i ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(2_654_435_761) >> 9;
            200 + x % (vocab - 200)
        })
        .collect()
}

struct ArmResult {
    name: String,
    /// Round of `--runs` (from 0).
    run: usize,
    streams: Vec<(usize, RequestResult)>,
    big: Vec<RequestResult>,
    big_at: Vec<f64>,
    wall_s: f64,
    /// When the workload started (Unix µs), so request times line up with the arms' logs.
    t0_unix_us: u128,
}

/// A started arm: its process (killed on drop), URL, client and served model name.
struct Arm {
    _child: crate::child::Kill,
    url: String,
    client: reqwest::Client,
    name: String,
}

async fn start_arm(a: &BenchPdArgs, s: &Settings, arm: &str, model: &str) -> Result<Arm> {
    let exe = std::env::current_exe()?;
    let port = a.base_port;
    let hosts = a
        .hosts
        .as_deref()
        .map(|n| crate::hosts::Hosts::existing(&a.hosts_script, n));
    // Across hosts the colocated engine runs on the decode host, at its address.
    let mut host = "127.0.0.1".to_string();
    let mut cmd = match (&hosts, arm) {
        (Some(h), "colocated") => {
            host = h.addr("decode")?;
            h.exec("decode", &exe)
        }
        _ => Command::new(&exe),
    };
    match arm {
        "colocated" => {
            cmd.args(["serve", "--model", model, "--port", &port.to_string()])
                .args(["--host", &host])
                .args(["--threads", &s.threads.to_string()]);
            if let Some(x) = &a.serve_args {
                cmd.args(x.split_whitespace());
            }
        }
        "disaggregated" => {
            cmd.args(["up", "--model", model, "--port", &port.to_string()])
                .args(["--base-port", &(port + 10).to_string()])
                .args(["--side-channel-port", &(port + 20).to_string()])
                .args(["--admin-base-port", &(port + 31).to_string()])
                .args(["--threads", &s.pair_threads.to_string()])
                .args(["--disagg-threshold", &s.disagg_threshold.to_string()])
                .args(["--kv-connector", &a.kv_connector]);
            if let Some(t) = a.prefill_threads {
                cmd.args(["--prefill-threads", &t.to_string()]);
            }
            if let Some(t) = a.decode_threads {
                cmd.args(["--decode-threads", &t.to_string()]);
            }
            if let Some(x) = &a.serve_args {
                cmd.args(["--serve-args", x]);
            }
            if let Some(x) = &a.prefill_args {
                cmd.args(["--prefill-args", x]);
            }
            if let Some(h) = &hosts {
                cmd.args(["--hosts", h.name()])
                    .arg("--hosts-script")
                    .arg(&a.hosts_script);
            }
        }
        other => bail!("unknown arm {other:?} (colocated or disaggregated)"),
    }
    // `serve` binds its threads to these CPUs; `up` splits them between its instances.
    if let Some(c) = &a.cpu_bind {
        cmd.args(["--cpu-bind", &c.to_string()]);
    }
    let mut child =
        crate::child::spawn_quiet(cmd).with_context(|| format!("starting the {arm} arm"))?;
    let url = format!("http://{host}:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .build()?;
    crate::child::wait_ready(&client, &url, &mut child).await?;
    let name = served_model(&client, &url).await?;
    Ok(Arm {
        _child: child,
        url,
        client,
        name,
    })
}

async fn run_arm(
    a: &BenchPdArgs,
    s: &Settings,
    arm: &str,
    model: &str,
    run: usize,
) -> Result<ArmResult> {
    let started = start_arm(a, s, arm, model).await?;
    let (url, client, name) = (
        started.url.clone(),
        started.client.clone(),
        started.name.clone(),
    );
    eprintln!(
        "[{arm}] ready; {} streams, {} big prompts of {} tokens every {} s",
        s.streams, s.big_prompts, s.big_prompt_tokens, s.big_interval_s
    );
    let vocab = 49152;
    let t0 = Instant::now();
    let t0_unix_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let timeout = Duration::from_secs(900);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Decode streams: each slot re-issues its request until the big prompts are all served.
    let mut slots = Vec::new();
    for slot in 0..s.streams {
        let (client, url, name, done) = (client.clone(), url.clone(), name.clone(), done.clone());
        let tokens = s.stream_tokens;
        slots.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut k = 0u32;
            while !done.load(std::sync::atomic::Ordering::Relaxed) || k == 0 {
                let job = Job {
                    prompt: json!(ids(16, 1000 + slot as u32 * 100 + k, vocab)),
                    prompt_tokens: 16,
                    max_tokens: tokens,
                    at: None,
                };
                let r = send(&client, &url, &name, &job, t0, timeout, &Value::Null).await;
                out.push((slot, r));
                k += 1;
            }
            out
        }));
    }
    // Big prompts, open loop, after the streams have started.
    let mut bigs = Vec::new();
    let mut big_at = Vec::new();
    for b in 0..s.big_prompts {
        let at = 1.0 + b as f64 * s.big_interval_s;
        big_at.push(at);
        let (client, url, name) = (client.clone(), url.clone(), name.clone());
        let job = Job {
            prompt: json!(ids(s.big_prompt_tokens, 7 + b as u32, vocab)),
            prompt_tokens: s.big_prompt_tokens,
            max_tokens: s.big_max_tokens,
            at: Some(at),
        };
        bigs.push(tokio::spawn(async move {
            let wait = Duration::from_secs_f64(at).saturating_sub(t0.elapsed());
            tokio::time::sleep(wait).await;
            let r = send(&client, &url, &name, &job, t0, timeout, &Value::Null).await;
            eprintln!(
                "[big prompt {}] TTFT {:.0} ms{}",
                b + 1,
                r.ttft_ms,
                r.error
                    .as_deref()
                    .map(|e| format!(" error: {e}"))
                    .unwrap_or_default()
            );
            r
        }));
    }
    let mut big = Vec::new();
    for h in bigs {
        big.push(h.await?);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut streams = Vec::new();
    for h in slots {
        streams.extend(h.await?);
    }
    Ok(ArmResult {
        name: arm.to_string(),
        run,
        streams,
        big,
        big_at,
        wall_s: t0.elapsed().as_secs_f64(),
        t0_unix_us,
    })
}

fn arm_json(r: &ArmResult) -> Value {
    let itl: Vec<f64> = r
        .streams
        .iter()
        .flat_map(|(_, x)| x.itl_ms.iter().copied())
        .collect();
    let s_ttft: Vec<f64> = r.streams.iter().map(|(_, x)| x.ttft_ms).collect();
    let b_ttft: Vec<f64> = r.big.iter().map(|x| x.ttft_ms).collect();
    let failed =
        r.streams.iter().filter(|(_, x)| !x.ok).count() + r.big.iter().filter(|x| !x.ok).count();
    json!({
        "arm": r.name,
        "run": r.run,
        "wall_s": r.wall_s,
        "t0_unix_us": r.t0_unix_us as u64,
        "completed": r.streams.len() + r.big.len() - failed,
        "failed": failed,
        "stream_requests": r.streams.len(),
        "big_requests": r.big.len(),
        "decode_itl_ms": Summary::of(&itl),
        "stream_ttft_ms": Summary::of(&s_ttft),
        "big_ttft_ms": Summary::of(&b_ttft),
        "big_arrivals_s": r.big_at,
        "requests": {
            "streams": r.streams.iter().map(|(slot, x)| json!({"slot": slot, "result": x})).collect::<Vec<_>>(),
            "big": r.big,
        },
    })
}

/// (time s, gap ms) of every token gap of decode slot 0.
fn timeline(r: &ArmResult) -> Vec<(f64, f64)> {
    let mut pts = Vec::new();
    for (_, x) in r.streams.iter().filter(|(s, _)| *s == 0) {
        let mut t = x.start_s + x.ttft_ms / 1e3;
        for g in &x.itl_ms {
            t += g / 1e3;
            pts.push((t, *g));
        }
    }
    pts
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

/// A table cell: `prec` decimals, or a dash where there is nothing to show (an arm with no
/// decode streams has no ITL).
fn cell(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "–".into()
    }
}

pub fn run(a: BenchPdArgs) -> Result<()> {
    let s = a.settings();
    if let Some(c) = &a.cpu_bind {
        let split = (s.prefill_threads, s.decode_threads);
        let pair: usize = (0..2)
            .map(|i| crate::up::instance_threads(s.pair_threads, (1, 1), split, i))
            .sum();
        let need = s.threads.max(pair);
        anyhow::ensure!(
            c.0.len() >= need,
            "--cpu-bind lists {} CPUs; the arms need {need}, one per kernel thread (colocated {}, pair {pair})",
            c.0.len(),
            s.threads
        );
    }
    let model = crate::model_path(&a.model)?.display().to_string();
    std::fs::create_dir_all(&a.out)?;
    // Across hosts: made for the run, removed at its end (also on failure).
    let _hosts = match &a.hosts {
        Some(name) => {
            let (rate, delay) = crate::hosts::split_link(&a.link);
            let h = crate::hosts::Hosts::up(&a.hosts_script, name, rate)?;
            eprintln!("hosts {name}: {}", h.shape(rate, delay)?);
            Some(h)
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    if !a.sweep.is_empty() {
        return rt.block_on(sweep(&a, &s, &model));
    }
    anyhow::ensure!(a.runs >= 1, "--runs must be at least 1");
    let mut arms = Vec::new();
    for run in 0..a.runs {
        for arm in &a.arms {
            if a.runs > 1 {
                eprintln!("[round {} of {}] {arm}", run + 1, a.runs);
            }
            arms.push(rt.block_on(run_arm(&a, &s, arm, &model, run))?);
        }
    }
    let jsons: Vec<Value> = arms.iter().map(arm_json).collect();
    let mut md = String::new();
    md.push_str(&format!(
        "Workload: {} decode streams of {} tokens (16-token prompts, re-issued until the end) + {} big prompts of {} tokens (max_tokens {}) every {} s; threads: colocated {}, pair {} (split; prefill {:?}, decode {:?} when given); disagg threshold {}; engine flags {:?}; prefill-instance flags {:?}; kernel threads bound to CPUs {}{}.\n\n",
        s.streams, s.stream_tokens, s.big_prompts, s.big_prompt_tokens, s.big_max_tokens, s.big_interval_s, s.threads, s.pair_threads, s.prefill_threads, s.decode_threads, s.disagg_threshold, s.serve_args.as_deref().unwrap_or(""), s.prefill_args.as_deref().unwrap_or(""), s.cpu_bind.as_deref().unwrap_or("default (the pair: disjoint cores, as up places them)"),
        match &a.hosts {
            Some(n) => format!("; across hosts {n} (network namespaces), every link {}", a.link),
            None => String::new(),
        }
    ));
    md.push_str("| arm | decode ITL p50 ms | p90 | p99 | p99.9 | max | p99/p50 | big-prompt TTFT p50 ms | max | stream TTFT p50 ms | requests ok/failed |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
    for j in &jsons {
        let (i, b, st) = (&j["decode_itl_ms"], &j["big_ttft_ms"], &j["stream_ttft_ms"]);
        let name = j["arm"].as_str().unwrap_or("");
        let label = match a.runs {
            1 => name.to_string(),
            _ => format!("{name}, round {}", j["run"].as_u64().unwrap_or(0) + 1),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} |\n",
            label,
            cell(f(i, "p50"), 1),
            cell(f(i, "p90"), 1),
            cell(f(i, "p99"), 1),
            cell(f(i, "p99_9"), 1),
            cell(f(i, "max"), 1),
            cell(f(i, "p99") / f(i, "p50"), 2),
            cell(f(b, "p50"), 0),
            cell(f(b, "max"), 0),
            cell(f(st, "p50"), 0),
            j["completed"],
            j["failed"]
        ));
    }
    if a.runs > 1 {
        md.push_str(&spread_table(&a.arms, &jsons));
    }
    if let [c, d] = &a.arms[..] {
        // Over rounds, the medians' ratios.
        let med = |arm: &str, k: &str, p: &str| {
            median(
                jsons
                    .iter()
                    .filter(|j| j["arm"] == arm)
                    .map(|j| f(&j[k], p))
                    .collect(),
            )
        };
        let itl = |arm: &str| med(arm, "decode_itl_ms", "p99");
        let ttft = |arm: &str| med(arm, "big_ttft_ms", "p50");
        md.push_str(&format!(
            "\nITL p99 {c} / {d}: {}x; big-prompt TTFT p50 {d} / {c}: {}x{}\n",
            cell(itl(c) / itl(d), 2),
            cell(ttft(d) / ttft(c), 2),
            if a.runs > 1 {
                " (medians over the rounds)"
            } else {
                ""
            },
        ));
    }
    let report = json!({"settings": s, "arms": jsons});
    std::fs::write(
        a.out.join("pd.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(a.out.join("pd.md"), &md)?;
    // The CDF pools an arm's rounds; the timeline shows the first round.
    let itls: Vec<(String, Vec<f64>)> = a
        .arms
        .iter()
        .map(|name| {
            let of_arm = arms.iter().filter(|r| &r.name == name);
            let itl = of_arm.flat_map(|r| r.streams.iter().flat_map(|(_, x)| x.itl_ms.clone()));
            (name.clone(), itl.collect())
        })
        .collect();
    let arms: Vec<&ArmResult> = arms.iter().filter(|r| r.run == 0).collect();
    if let Err(e) = splitserve_bench::plot::cdf(
        &a.out.join("itl_cdf.svg"),
        "Decode-stream inter-token latency, CDF",
        &itls,
    ) {
        eprintln!("no ITL CDF plot: {e}");
    }
    let tl: Vec<(String, Vec<(f64, f64)>)> =
        arms.iter().map(|r| (r.name.clone(), timeline(r))).collect();
    let marks = arms.first().map(|r| r.big_at.clone()).unwrap_or_default();
    if let Err(e) = splitserve_bench::plot::timeline(
        &a.out.join("itl_timeline.svg"),
        "ITL of decode slot 0 over time (vertical lines: big-prompt arrivals)",
        &tl,
        &marks,
    ) {
        eprintln!("no ITL timeline plot: {e}");
    }
    print!("{md}");
    println!(
        "wrote {}/{{pd.json,pd.md,itl_cdf.svg,itl_timeline.svg}}",
        a.out.display()
    );
    Ok(())
}

/// The median of the finite values (NaN if none).
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Per arm, the median and range over the rounds of the figures a target is read from.
fn spread_table(names: &[String], jsons: &[Value]) -> String {
    let mut md = String::from(
        "\n| arm | rounds | ITL p99 ms, median (min–max) | p99/p50, median (min–max) | big-prompt TTFT p50 ms, median (min–max) |\n|---|---|---|---|---|\n",
    );
    let spread = |mut v: Vec<f64>, prec: usize| {
        v.retain(|x| x.is_finite());
        v.sort_by(f64::total_cmp);
        match (v.first(), v.last()) {
            (Some(lo), Some(hi)) => {
                let m = cell(median(v.clone()), prec);
                format!("{m} ({}–{})", cell(*lo, prec), cell(*hi, prec))
            }
            _ => "–".into(),
        }
    };
    for name in names {
        let runs: Vec<&Value> = jsons.iter().filter(|j| j["arm"] == name.as_str()).collect();
        let itl = |k: &str| {
            runs.iter()
                .map(|j| f(&j["decode_itl_ms"], k))
                .collect::<Vec<_>>()
        };
        let ratio = runs
            .iter()
            .map(|j| f(&j["decode_itl_ms"], "p99") / f(&j["decode_itl_ms"], "p50"))
            .collect();
        let big = runs.iter().map(|j| f(&j["big_ttft_ms"], "p50")).collect();
        md.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            runs.len(),
            spread(itl("p99"), 1),
            spread(ratio, 2),
            spread(big, 0)
        ));
    }
    md
}

/// The goodput sweep: every arm at every rate, one table, one JSON, one plot.
async fn sweep(a: &BenchPdArgs, s: &Settings, model: &str) -> Result<()> {
    anyhow::ensure!(
        a.sweep.iter().all(|r| r.is_finite() && *r > 0.0),
        "--sweep rates must be positive numbers"
    );
    let q = a.quick;
    let prompts = a.sweep_prompts.unwrap_or(if q { 6 } else { 24 });
    let input_len = a.sweep_input_len.unwrap_or(if q { 48 } else { 256 });
    let output_len = a.sweep_output_len.unwrap_or(if q { 8 } else { 64 });
    let mut arms_json = Vec::new();
    let mut curves = Vec::new();
    let mut md = format!(
        "Goodput sweep: {prompts} requests per rate ({input_len}-token prompts, {output_len} output tokens, Poisson arrivals); SLO TTFT <= {} ms and mean ITL <= {} ms; threads: colocated {}, pair {}; engine flags {:?}; prefill-instance flags {:?}; kernel threads bound to CPUs {}.\n\n| arm | rate req/s | SLO met | goodput req/s | TTFT p50 ms | TTFT p99 | ITL p50 ms | ITL p99 | ok/failed |\n|---|---|---|---|---|---|---|---|---|\n",
        a.slo_ttft_ms,
        a.slo_itl_ms,
        s.threads,
        s.pair_threads,
        s.serve_args.as_deref().unwrap_or(""),
        s.prefill_args.as_deref().unwrap_or(""),
        s.cpu_bind.as_deref().unwrap_or("default (the pair: disjoint cores, as up places them)")
    );
    for arm in &a.arms {
        let started = start_arm(a, s, arm, model).await?;
        let mut points = Vec::new();
        for (k, &rate) in a.sweep.iter().enumerate() {
            let args = splitserve_bench::load::ServeBenchArgs {
                model: Some(started.name.clone()),
                num_prompts: prompts,
                input_len,
                output_len,
                request_rate: rate.to_string(),
                seed: k as u64,
                slo_ttft_ms: a.slo_ttft_ms,
                slo_itl_ms: a.slo_itl_ms,
                timeout_s: 900.0,
                ..splitserve_bench::load::ServeBenchArgs::new(started.url.clone())
            };
            eprintln!("[{arm}] {rate} req/s");
            let r = splitserve_bench::load::run(&args, Value::Null).await?;
            md.push_str(&format!(
                "| {arm} | {rate} | {:.0}% | {:.3} | {:.0} | {:.0} | {:.1} | {:.1} | {}/{} |\n",
                r.slo_attainment * 100.0,
                r.goodput,
                r.ttft_ms.p50,
                r.ttft_ms.p99,
                r.itl_ms.p50,
                r.itl_ms.p99,
                r.completed,
                r.failed
            ));
            points.push(json!({
                "rate": rate, "slo_attainment": r.slo_attainment, "goodput": r.goodput,
                "completed": r.completed, "failed": r.failed, "duration_s": r.duration_s,
                "ttft_ms": r.ttft_ms, "itl_ms": r.itl_ms, "e2e_ms": r.e2e_ms,
            }));
        }
        drop(started);
        // DistServe's figure: the highest offered rate at which 90 % meet both SLOs.
        let best = points
            .iter()
            .filter(|p| p["slo_attainment"].as_f64().unwrap_or(0.0) >= 0.9)
            .filter_map(|p| p["rate"].as_f64())
            .fold(0.0, f64::max);
        curves.push((
            arm.clone(),
            points
                .iter()
                .map(|p| (f(p, "rate"), f(p, "goodput")))
                .collect::<Vec<_>>(),
        ));
        arms_json.push(json!({"arm": arm, "max_rate_90pct": best, "points": points}));
    }
    md.push('\n');
    for j in &arms_json {
        md.push_str(&format!(
            "{}: highest rate with >= 90% meeting the SLOs: {} req/s\n",
            j["arm"].as_str().unwrap_or(""),
            j["max_rate_90pct"]
        ));
    }
    let report = json!({
        "settings": {"threads": s.threads, "pair_threads": s.pair_threads,
            "disagg_threshold": s.disagg_threshold, "rates": a.sweep, "prompts": prompts,
            "input_len": input_len, "output_len": output_len,
            "slo_ttft_ms": a.slo_ttft_ms, "slo_itl_ms": a.slo_itl_ms,
            "serve_args": s.serve_args, "prefill_args": s.prefill_args, "cpu_bind": s.cpu_bind},
        "arms": arms_json,
    });
    std::fs::write(
        a.out.join("sweep.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(a.out.join("sweep.md"), &md)?;
    if let Err(e) = splitserve_bench::plot::lines(
        &a.out.join("goodput.svg"),
        &format!(
            "Goodput (TTFT <= {} ms, ITL <= {} ms) vs offered rate",
            a.slo_ttft_ms, a.slo_itl_ms
        ),
        "offered request rate (req/s)",
        "goodput (req/s meeting both SLOs)",
        &curves,
    ) {
        eprintln!("no goodput plot: {e}");
    }
    print!("{md}");
    println!(
        "wrote {}/{{sweep.json,sweep.md,goodput.svg}}",
        a.out.display()
    );
    Ok(())
}
