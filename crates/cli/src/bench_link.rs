//! `bench link`: a prefill and a decode host in network namespaces joined by a shaped link
//! (`deploy/netns/hosts.sh`), the KV transfer of prompts of several lengths measured across
//! each link, beside what `econ` predicts for the same bytes on the same link. Needs root.

use std::path::PathBuf;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use splitserve_econ::link::{tcp_over_ethernet, transfer_time, Link};
use splitserve_econ::shape::{freight, KvFormat};

use crate::hosts::Hosts;

#[derive(clap::Args)]
pub struct BenchLinkArgs {
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Links as tc rate[:delay]
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "10gbit:50us,1gbit:200us,100mbit"
    )]
    links: Vec<String>,
    /// Prompt lengths in tokens
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "500,2000,8000"
    )]
    prompt_tokens: Vec<usize>,
    /// Transfers per row (median reported)
    #[arg(long, value_name = "N", default_value_t = 3)]
    reps: usize,
    /// Threads of each instance
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
    /// The hosts harness
    #[arg(long, value_name = "PATH", default_value = "deploy/netns/hosts.sh")]
    hosts_script: PathBuf,
    /// Harness name (namespaces NAME-prefill, …)
    #[arg(long, value_name = "NAME", default_value = "sslink")]
    name: String,
    /// Write the rows here as JSON
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

/// `rate[:delay]` → (tc rate, delay, the link for econ).
fn parse_link(s: &str) -> Result<(String, Option<String>, Link)> {
    let (rate, delay) = crate::hosts::split_link(s);
    let (rate, delay) = (rate.to_string(), delay.map(str::to_string));
    let lower = rate.to_ascii_lowercase();
    let (n, unit) = lower.split_at(
        lower
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(lower.len()),
    );
    // Whole numbers, as hosts.sh takes them.
    let n: u64 = n
        .parse()
        .with_context(|| format!("link {s:?}: a whole number and a unit"))?;
    let n = n as f64;
    let bits = n * match unit {
        "gbit" => 1e9,
        "mbit" => 1e6,
        "kbit" => 1e3,
        _ => bail!("link {s:?}: a rate in kbit, mbit or gbit"),
    };
    let latency_s = match &delay {
        None => 0.0,
        Some(d) => {
            let (v, scale) = if let Some(v) = d.strip_suffix("us") {
                (v, 1e-6)
            } else if let Some(v) = d.strip_suffix("ms") {
                (v, 1e-3)
            } else {
                bail!("link {s:?}: a delay in us or ms")
            };
            v.parse::<f64>()
                .with_context(|| format!("link {s:?}: delay"))?
                * scale
        }
    };
    Ok((
        rate,
        delay,
        // As `econ --link-gbps G --link-latency-us L` sees it: TCP over Ethernet at the
        // namespaces' MTU of 1,500.
        Link {
            name: s.to_string(),
            bytes_per_s: bits / 8.0,
            latency_s,
            payload_share: tcp_over_ethernet(1500.0),
        },
    ))
}

pub fn run(a: &BenchLinkArgs) -> Result<()> {
    ensure!(a.reps >= 1, "--reps must be at least 1");
    let links = a
        .links
        .iter()
        .map(|s| parse_link(s))
        .collect::<Result<Vec<_>>>()?;
    let model = crate::model_path(&a.model)?;
    let shape = crate::econ::shape_of(&model)?;
    let hosts = Hosts::up(&a.hosts_script, &a.name, &links[0].0)?;
    let (p_addr, d_addr) = (hosts.addr("prefill")?, hosts.addr("decode")?);
    let secret = crate::hosts::pair_secret()?;
    let exe = std::env::current_exe()?;
    let serve = |ns: &str, addr: &str, role: &str, extra: &[&str]| -> Result<crate::child::Kill> {
        let kv = json!({"kv_connector": "TcpConnector", "kv_role": role,
                        "kv_connector_extra_config": {"side_channel_host": addr,
                            "side_channel_port": 5600, "secret_env": "SPLITSERVE_KV_SECRET"}});
        let mut cmd = hosts.exec(ns, &exe);
        cmd.args(["serve", "--model", &model.display().to_string()])
            .args(["--host", addr, "--port", "8000"])
            .args(["--threads", &a.threads.to_string()])
            .args(["--kv-transfer-config", &kv.to_string()])
            .args(extra)
            .env("SPLITSERVE_KV_SECRET", &secret);
        crate::child::spawn_quiet(cmd).with_context(|| format!("starting the {ns} host's instance"))
    };
    let max_len = a.prompt_tokens.iter().max().copied().unwrap_or(0) + 8;
    let max_len = max_len.to_string();
    let mut producer = serve(
        "prefill",
        &p_addr,
        "kv_producer",
        &["--max-model-len", &max_len],
    )?;
    // No prefix cache on the consumer: every request pulls its whole prompt.
    let mut consumer = serve(
        "decode",
        &d_addr,
        "kv_consumer",
        &["--max-model-len", &max_len, "--no-enable-prefix-caching"],
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (p_url, d_url) = (
        format!("http://{p_addr}:8000"),
        format!("http://{d_addr}:8000"),
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(900))
        .build()?;
    rt.block_on(async {
        crate::child::wait_ready(&client, &p_url, &mut producer).await?;
        crate::child::wait_ready(&client, &d_url, &mut consumer).await
    })?;
    let post = |url: String, body: Value| crate::child::post_json(&client, url, body);
    let client = &client;
    let metrics = |url: String| async move { crate::child::metrics(client, &url).await };
    // Token ids every model's vocabulary has.
    let vocab = 32_000u32;
    let mut rows = Vec::new();
    println!(
        "| link | prompt tokens | KV MiB | econ ms | measured ms (median of {}) | error |",
        a.reps
    );
    println!("|---|---|---|---|---|---|");
    for (rate, delay, link) in &links {
        let shaped = hosts.shape(rate, delay.as_deref())?;
        let delay_applied = !shaped.ends_with("delay=none");
        let link = Link {
            latency_s: if delay_applied { link.latency_s } else { 0.0 },
            ..link.clone()
        };
        for &n in &a.prompt_tokens {
            let mut took = Vec::new();
            let mut bytes = 0.0;
            for rep in 0..a.reps {
                // The same prompt on every link: the producer finds it in its cache after
                // the first link, and only the transfer is timed.
                let prompt: Vec<u32> = (0..n as u32)
                    .map(|i| ((i ^ (rep as u32 * 7919)).wrapping_mul(2_654_435_761) >> 7) % vocab)
                    .collect();
                let v = rt.block_on(post(
                    format!("{p_url}/v1/completions"),
                    json!({"prompt": prompt, "max_tokens": 1, "temperature": 0,
                           "kv_transfer_params": {"do_remote_decode": true}}),
                ))?;
                let params = v["kv_transfer_params"].clone();
                let shown = params.to_string();
                let before = rt.block_on(metrics(d_url.clone()))?;
                rt.block_on(post(
                    format!("{d_url}/v1/completions"),
                    json!({"prompt": prompt, "max_tokens": 1, "temperature": 0,
                           "kv_transfer_params": params}),
                ))?;
                let after = rt.block_on(metrics(d_url.clone()))?;
                let d = |name: &str| {
                    crate::child::counter(&after, name) - crate::child::counter(&before, name)
                };
                ensure!(
                    d("kv_transfer_seconds_count") == 1.0,
                    "{n} tokens: {} KV transfers measured for one request (its params: {shown})",
                    d("kv_transfer_seconds_count")
                );
                took.push(d("kv_transfer_seconds_sum"));
                bytes = d("kv_transfer_bytes_received_total");
            }
            took.sort_by(f64::total_cmp);
            let measured = took[took.len() / 2];
            let f = freight(&shape, KvFormat::F16, n as u64, 16);
            let predicted = transfer_time(&link, f.block_bytes, 1.0);
            let err = (measured - predicted) / predicted;
            println!(
                "| {}{} | {n} | {:.1} | {:.1} | {:.1} | {:+.1} % |",
                link.name,
                if delay_applied || delay.is_none() {
                    ""
                } else {
                    " (delay not applied)"
                },
                bytes / (1 << 20) as f64,
                predicted * 1e3,
                measured * 1e3,
                err * 100.0
            );
            rows.push(
                json!({"link": link.name, "rate": rate, "delay_applied": delay_applied,
                             "prompt_tokens": n, "bytes": bytes, "econ_bytes": f.block_bytes,
                             "econ_s": predicted, "measured_s": measured, "error": err}),
            );
        }
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    drop((producer, consumer));
    Ok(())
}
