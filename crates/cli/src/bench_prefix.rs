//! `splitserve bench prefix`: the prefix cache's worth in one run. The same workload
//! (`bench serve`'s `prefix` or `multiturn` dataset) goes to a server with automatic prefix
//! caching and then to one without; prints TTFT side by side and their ratio, writes JSON
//! and a TTFT CDF plot.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use splitserve_bench::load::{Report, ServeBenchArgs};

#[derive(clap::Args, Clone, serde::Serialize)]
pub struct BenchPrefixArgs {
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// prefix (shared heads) or multiturn
    #[arg(long, value_name = "KIND", default_value = "prefix")]
    pub dataset: String,
    /// Tokens of the shared head (prefix)
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub prefix_len: usize,
    /// Tokens of each suffix, or of each new turn
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub input_len: usize,
    /// Output tokens per request
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub output_len: usize,
    /// Turns per conversation (multiturn)
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub turns: usize,
    /// Requests per arm
    #[arg(long, value_name = "N", default_value_t = 24)]
    pub num_prompts: usize,
    /// Requests in flight at most
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub max_concurrency: usize,
    /// Kernel threads of the server
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub threads: usize,
    /// Loopback port of the server
    #[arg(long, default_value_t = 18400)]
    pub port: u16,
    /// Folder of the JSON and the plot
    #[arg(long, value_name = "DIR", default_value = "bench-results/prefix")]
    pub out: PathBuf,
    /// Seed of the prompts
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// KV blocks of the server (default: serve's)
    #[arg(long, value_name = "N")]
    pub num_kv_blocks: Option<usize>,
    /// Compare pool vs pool + offload of BYTES
    #[arg(long, value_name = "BYTES")]
    pub offload_bytes: Option<u64>,
}

/// One arm: its name, whether prefix caching is on, and a `--kv-transfer-config`.
struct Arm {
    name: &'static str,
    caching: bool,
    kv: Option<String>,
}

pub fn run(a: BenchPrefixArgs) -> Result<()> {
    anyhow::ensure!(
        a.num_prompts >= 2 && a.num_prompts <= 10_000,
        "--num-prompts must be in [2, 10000]"
    );
    anyhow::ensure!(
        a.max_concurrency >= 1 && a.max_concurrency <= 256,
        "--max-concurrency must be in [1, 256]"
    );
    let model = crate::model_path(&a.model)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let arms = match a.offload_bytes {
        None => vec![
            Arm {
                name: "caching on",
                caching: true,
                kv: None,
            },
            Arm {
                name: "caching off",
                caching: false,
                kv: None,
            },
        ],
        Some(b) => vec![
            Arm {
                name: "offloading on",
                caching: true,
                kv: Some(
                    json!({"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
                                "kv_connector_extra_config": {"cpu_bytes_to_use": b}})
                    .to_string(),
                ),
            },
            Arm {
                name: "offloading off",
                caching: true,
                kv: None,
            },
        ],
    };
    let mut reports = Vec::new();
    let mut computed = Vec::new();
    for arm_ in &arms {
        let name = arm_.name;
        eprintln!("[{name}] starting the server");
        let (r, c) = rt.block_on(arm(&a, &model, arm_))?;
        println!("[{name}]\n{}prompt tokens computed: {c}", r.table());
        reports.push((name, r));
        computed.push(c);
    }
    let (on, off) = (&reports[0].1, &reports[1].1);
    let p50 = on.ttft_ms.p50 / off.ttft_ms.p50;
    let p99 = on.ttft_ms.p99 / off.ttft_ms.p99;
    let summary = format!(
        "{} dataset, {} requests per arm: TTFT p50 {:.1} ms {}, {:.1} ms {} ({p50:.3}x); p99 {:.1} vs {:.1} ms ({p99:.3}x); prompt tokens computed {} vs {}\n",
        a.dataset,
        a.num_prompts,
        on.ttft_ms.p50,
        arms[0].name,
        off.ttft_ms.p50,
        arms[1].name,
        on.ttft_ms.p99,
        off.ttft_ms.p99,
        computed[0],
        computed[1]
    );
    print!("{summary}");
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let cpu = cpu_model();
    let out = json!({
        "args": a,
        "cpu": cpu,
        "ttft_p50_ratio": p50,
        "ttft_p99_ratio": p99,
        "arms": reports.iter().zip(&computed).map(|((n, r), c)| json!({
            "prompt_tokens_computed": c,
            "arm": n,
            "ttft_ms": r.ttft_ms,
            "itl_ms": r.itl_ms,
            "e2e_ms": r.e2e_ms,
            "completed": r.completed,
            "failed": r.failed,
            "cached_prompt_tokens": r.cached_prompt_tokens(),
        })).collect::<Vec<Value>>(),
    });
    let json_path = a.out.join(format!("{}.json", a.dataset));
    std::fs::write(&json_path, serde_json::to_string_pretty(&out)?)?;
    let plot = a.out.join(format!("{}-ttft.svg", a.dataset));
    let series: Vec<(String, Vec<f64>)> = reports
        .iter()
        .map(|(n, r)| {
            let v = r.requests.iter().filter(|q| q.ok).map(|q| q.ttft_ms);
            (n.to_string(), v.collect())
        })
        .collect();
    splitserve_bench::plot::cdf_of(
        &plot,
        &format!(
            "TTFT, {} dataset, {} vs {}",
            a.dataset, arms[0].name, arms[1].name
        ),
        "time to first token (ms, log scale)",
        "fraction of requests ≤ x",
        &series,
    )?;
    println!("wrote {} and {}", json_path.display(), plot.display());
    Ok(())
}

/// The CPU's model name, for the record next to the numbers.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

async fn arm(a: &BenchPrefixArgs, model: &std::path::Path, arm: &Arm) -> Result<(Report, f64)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(&exe);
    cmd.arg("serve")
        .arg("--model")
        .arg(model)
        .args(["--port", &a.port.to_string()])
        .args(["--threads", &a.threads.to_string()])
        .arg("--enable-prompt-tokens-details");
    if !arm.caching {
        cmd.arg("--no-enable-prefix-caching");
    }
    if let Some(n) = a.num_kv_blocks {
        cmd.args(["--num-kv-blocks", &n.to_string()]);
    }
    if let Some(kv) = &arm.kv {
        cmd.args(["--kv-transfer-config", kv]);
    }
    let mut child = crate::child::spawn_quiet(cmd).context("starting the server")?;
    let url = format!("http://127.0.0.1:{}", a.port);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    crate::child::wait_ready(&client, &url, &mut child).await?;
    let args = ServeBenchArgs {
        dataset: a.dataset.clone(),
        prefix_len: a.prefix_len,
        turns: a.turns,
        num_prompts: a.num_prompts,
        input_len: a.input_len,
        output_len: a.output_len,
        max_concurrency: Some(a.max_concurrency),
        seed: a.seed,
        ..ServeBenchArgs::new(url.clone())
    };
    let r = splitserve_bench::load::run(&args, Value::Null).await?;
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let computed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("splitserve:prompt_tokens_computed "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN);
    drop(child);
    Ok((r, computed))
}
