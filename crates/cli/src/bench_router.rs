//! `splitserve bench router`: the decode policies side by side. For each policy, `up` starts
//! the same pools and the same skewed workload runs through its proxy (every n-th request
//! long, the others short: the pattern that defeats round robin), while the decode
//! instances' free KV blocks are sampled; prints throughput, TTFT
//! and ITL p99, and how far apart the decode instances' free blocks stayed; writes JSON and
//! a plot of that spread over time.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use splitserve_bench::load::ServeBenchArgs;
use splitserve_bench::stats::{percentile, Summary};

#[derive(clap::Args, Clone, serde::Serialize)]
pub struct BenchRouterArgs {
    /// Policies to compare
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "round_robin,free_blocks,least_load"
    )]
    pub policies: Vec<String>,
    /// Prefill instances
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub prefill: usize,
    /// Decode instances
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub decode: usize,
    /// Requests per policy
    #[arg(long, value_name = "N", default_value_t = 48)]
    pub num_prompts: usize,
    /// Requests in flight at most
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_concurrency: usize,
    /// Prompt tokens per request
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub input_len: usize,
    /// Output tokens of the long requests
    #[arg(long, value_name = "N", default_value_t = 320)]
    pub long_output: usize,
    /// Output tokens of the short requests
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub short_output: usize,
    /// Every n-th request is long
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub long_every: usize,
    /// KV blocks of each instance
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub num_kv_blocks: usize,
    /// First loopback port (24 from here)
    #[arg(long, value_name = "PORT", default_value_t = 18500)]
    pub base_port: u16,
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Folder of the results
    #[arg(long, value_name = "DIR", default_value = "bench-results/router")]
    pub out: PathBuf,
    /// Seed of the workload
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: BenchRouterArgs) -> Result<()> {
    anyhow::ensure!(
        (1..=4).contains(&a.prefill) && (2..=4).contains(&a.decode),
        "--prefill must be 1 to 4 and --decode 2 to 4"
    );
    anyhow::ensure!(
        (1..=2000).contains(&a.num_prompts) && (1..=64).contains(&a.max_concurrency),
        "--num-prompts must be 1 to 2000 and --max-concurrency 1 to 64"
    );
    anyhow::ensure!(
        a.long_every >= 1
            && (1..=4096).contains(&a.long_output)
            && (1..=4096).contains(&a.short_output),
        "--long-every must be at least 1 and --long-output, --short-output 1 to 4096"
    );
    for p in &a.policies {
        splitserve_router::policy::by_name(p).map_err(anyhow::Error::msg)?;
    }
    let model = crate::model_path(&a.model)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    let mut series = Vec::new();
    let mut md = String::from(
        "| decode policy | req/s | output tok/s | TTFT p99 ms | ITL p99 ms | free-block spread mean | p95 | max | samples within 10 % | failed |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for policy in &a.policies {
        eprintln!(
            "[{policy}] starting up --prefill {} --decode {}",
            a.prefill, a.decode
        );
        let (r, spread) = rt.block_on(arm(&a, &model, policy))?;
        let vals: Vec<f64> = spread.iter().map(|(_, s)| *s).collect();
        let Summary { mean, max, .. } = Summary::of(&vals);
        let mut sorted = vals.clone();
        sorted.sort_by(f64::total_cmp);
        let p95 = percentile(&sorted, 95.0);
        let within = vals.iter().filter(|&&v| v <= 0.10).count() as f64 / vals.len().max(1) as f64;
        md.push_str(&format!(
            "| {policy} | {:.2} | {:.1} | {:.0} | {:.1} | {:.1} % | {:.1} % | {:.1} % | {:.0} % | {} |\n",
            r.request_throughput,
            r.output_throughput,
            r.ttft_ms.p99,
            r.itl_ms.p99,
            mean * 100.0,
            p95 * 100.0,
            max * 100.0,
            within * 100.0,
            r.failed
        ));
        rows.push(json!({
            "policy": policy,
            "request_throughput": r.request_throughput,
            "output_throughput": r.output_throughput,
            "ttft_ms": r.ttft_ms,
            "itl_ms": r.itl_ms,
            "completed": r.completed,
            "failed": r.failed,
            "free_block_spread_mean": mean,
            "free_block_spread_max": max,
            "free_block_spread_p95": p95,
            "samples_within_10_percent": within,
        }));
        series.push((
            policy.clone(),
            spread
                .iter()
                .map(|(t, s)| (*t, s * 100.0))
                .collect::<Vec<_>>(),
        ));
    }
    print!(
        "Workload: {} requests, {} in flight, {}-token prompts, every {}th with {} output tokens, the others {}; up --prefill {} --decode {}, {} KV blocks each. Spread: (most free blocks of a decode instance − fewest) / blocks, sampled every 200 ms.\n\n{md}",
        a.num_prompts,
        a.max_concurrency,
        a.input_len,
        a.long_every,
        a.long_output,
        a.short_output,
        a.prefill,
        a.decode,
        a.num_kv_blocks
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let json_path = a.out.join("router.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({"args": a, "policies": rows}))?,
    )?;
    std::fs::write(a.out.join("router.md"), &md)?;
    let plot = a.out.join("free-block-spread.svg");
    splitserve_bench::plot::lines(
        &plot,
        "Free KV blocks: largest difference between decode instances",
        "seconds into the run",
        "spread (% of the pool)",
        &series,
    )?;
    println!(
        "wrote {}, router.md and {}",
        json_path.display(),
        plot.display()
    );
    Ok(())
}

async fn arm(
    a: &BenchRouterArgs,
    model: &std::path::Path,
    policy: &str,
) -> Result<(splitserve_bench::load::Report, Vec<(f64, f64)>)> {
    let exe = std::env::current_exe()?;
    let base = a.base_port;
    let mut cmd = Command::new(&exe);
    cmd.arg("up")
        .arg("--model")
        .arg(model)
        .args(["--prefill", &a.prefill.to_string()])
        .args(["--decode", &a.decode.to_string()])
        .args(["--port", &base.to_string()])
        .args(["--base-port", &(base + 1).to_string()])
        .args(["--side-channel-port", &(base + 10).to_string()])
        .args(["--admin-base-port", &(base + 21).to_string()])
        .args(["--num-kv-blocks", &a.num_kv_blocks.to_string()])
        .args(["--decode-policy", policy]);
    let mut child = crate::child::spawn_quiet(cmd).context("starting up")?;
    let url = format!("http://127.0.0.1:{base}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    crate::child::wait_ready(&client, &url, &mut child).await?;
    let decode: Vec<String> = (0..a.decode)
        .map(|i| format!("http://127.0.0.1:{}", base + 1 + (a.prefill + i) as u16))
        .collect();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (samples, stop, client) = (samples.clone(), stop.clone(), client.clone());
        let t0 = Instant::now();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut free = Vec::new();
                let mut total = 1.0f64;
                for d in &decode {
                    if let Ok(r) = client.get(format!("{d}/health")).send().await {
                        if let Ok(v) = r.json::<Value>().await {
                            free.push(v["free_blocks"].as_f64().unwrap_or(0.0));
                            total = v["total_blocks"].as_f64().unwrap_or(1.0).max(1.0);
                        }
                    }
                }
                if free.len() >= 2 {
                    let hi = free.iter().copied().fold(f64::MIN, f64::max);
                    let lo = free.iter().copied().fold(f64::MAX, f64::min);
                    if let Ok(mut s) = samples.lock() {
                        s.push((t0.elapsed().as_secs_f64(), (hi - lo) / total));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let args = ServeBenchArgs {
        num_prompts: a.num_prompts,
        input_len: a.input_len,
        output_len: a.long_output,
        max_concurrency: Some(a.max_concurrency),
        seed: a.seed,
        ..ServeBenchArgs::new(url)
    };
    let mut jobs = splitserve_bench::load::make_jobs(&args)?;
    for (i, j) in jobs.iter_mut().enumerate() {
        j.max_tokens = if i % a.long_every == 0 {
            a.long_output
        } else {
            a.short_output
        };
    }
    let r = splitserve_bench::load::run_jobs(&args, jobs, Value::Null).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.await;
    drop(child);
    let spread = samples.lock().map(|s| s.clone()).unwrap_or_default();
    Ok((r?, spread))
}
