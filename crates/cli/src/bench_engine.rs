//! `splitserve bench engine`: prefill and decode throughput of the engine alone, per thread
//! count, release build. Prints a table and writes JSON.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use splitserve_engine::{
    Engine, EngineConfig, Event, KvTransfer, Model, Request, SamplingParams, StepInfo,
};

#[derive(clap::Args)]
pub struct BenchEngineArgs {
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Prompt tokens of the prefill measurement
    #[arg(long, value_name = "N", default_value_t = 512)]
    prompt_len: usize,
    /// Tokens per stream in the decode measurement
    #[arg(long, value_name = "N", default_value_t = 128)]
    decode_tokens: usize,
    /// Context of decode stream i: N + i tokens
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    decode_context: u64,
    /// Thread counts to measure
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "1,2"
    )]
    threads: Vec<usize>,
    /// Decode batch sizes to measure
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "1,8"
    )]
    batch: Vec<usize>,
    /// Prefill repetitions (the best is reported)
    #[arg(long, value_name = "N", default_value_t = 3)]
    reps: usize,
    /// KV cache type: f16, f32 or q8_0
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    kv_cache_dtype: splitserve_engine::KvDtype,
    /// Tokens per KV block
    #[arg(long, value_name = "N", default_value_t = 16)]
    block_size: usize,
    /// Write the results here as JSON
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Row {
    threads: usize,
    prefill_tokens: usize,
    prefill_tok_s: f64,
    prefill_share_of_int8_peak: Option<f64>,
    decode_context: usize,
    decode: Vec<(usize, f64)>,
    /// Per batch size: mean step time (ms) over the first and the last eighth of the
    /// decode steps. Attention grows with the context; the weights' cost does not.
    decode_step_ms: Vec<(usize, f64, f64)>,
}

fn run_one(
    engine: &Engine,
    prompt: Vec<u32>,
    max_tokens: usize,
    id: String,
) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>> {
    Ok(engine.submit(Request {
        id,
        prompt,
        params: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(max_tokens)
        },
        return_logits: false,
        kv: KvTransfer::None,
        cache_salt: None,

        resumed: 0,
    })?)
}

fn drain(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>) {
    while let Some(ev) = rx.blocking_recv() {
        if matches!(ev, Event::Finished(_)) {
            break;
        }
    }
}

pub fn run(a: BenchEngineArgs) -> Result<()> {
    let path = crate::model_path(&a.model)?;
    let model = Arc::new(Model::load(&path)?);
    // Decode stream `i` gets the first `ctx + i` tokens, so the text covers those too.
    let ctx = usize::try_from(a.decode_context)?;
    let max_batch = a.batch.iter().copied().max().unwrap_or(1);
    let need = a.prompt_len.max(ctx + max_batch);
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(need / 5 + 10);
    let all = model.tokenizer.encode(&text).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(all.len() >= need, "could not build a {need}-token prompt");
    let ids = all[..a.prompt_len].to_vec();
    let steps: Arc<Mutex<Vec<StepInfo>>> = Arc::default();
    let mut rows = Vec::new();
    // The linear layers' multiply-adds per prompt token (the output head runs once per
    // prompt), and the int8 peak of one thread here, to say how close prefill comes to it.
    let c = &model.config;
    let kvd = c.n_head_kv * c.head_dim;
    let linear_macs = (c.n_layer
        * (c.n_embd * (c.n_embd + 2 * kvd) + c.n_embd * c.n_embd + 3 * c.n_embd * c.n_ff))
        as f64;
    let peak = splitserve_engine::int8_peak(Duration::from_millis(500));
    match peak {
        Some((level, p)) => println!(
            "int8 peak of one thread ({level}, measured now): {:.1} G multiply-adds/s; the linear layers take {:.1} M per prompt token",
            p / 1e9,
            linear_macs / 1e6
        ),
        None => println!("int8 peak: none measured at the portable level"),
    }
    println!(
        "{:>7} | {:>16} | {}",
        "threads",
        "prefill tok/s",
        a.batch
            .iter()
            .map(|b| format!("decode b={b} tok/s"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for &t in &a.threads {
        // candle's matmul reads this on every call; our kernels run in the engine's pool.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        let s2 = steps.clone();
        let engine = Engine::start(
            model.clone(),
            EngineConfig {
                threads: Some(t),
                kv_dtype: a.kv_cache_dtype,
                block_size: a.block_size,
                max_num_batched_tokens: a.prompt_len.max(512),
                // The same prompt again and again: time it computed, not found cached.
                enable_prefix_caching: false,
                ..EngineConfig::default()
            },
            Some(Arc::new(move |s| {
                s2.lock().map(|mut v| v.push(s)).unwrap_or(())
            })),
        )?;
        let mut best = Duration::MAX;
        for r in 0..a.reps.max(1) {
            let t0 = Instant::now();
            let rx = run_one(&engine, ids.clone(), 1, format!("p{r}"))?;
            drain(rx);
            best = best.min(t0.elapsed());
        }
        let prefill = a.prompt_len as f64 / best.as_secs_f64();
        let (mut decode, mut step_ms) = (Vec::new(), Vec::new());
        for &b in &a.batch {
            steps.lock().map(|mut v| v.clear()).ok().context("lock")?;
            let rxs = (0..b)
                .map(|i| {
                    run_one(
                        &engine,
                        all[..ctx + i].to_vec(),
                        a.decode_tokens,
                        format!("d{b}-{i}"),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            rxs.into_iter().for_each(drain);
            let v = steps.lock().ok().context("lock")?;
            let full: Vec<&StepInfo> = v
                .iter()
                .filter(|s| s.prefill_tokens == 0 && s.decode_tokens == b)
                .collect();
            let secs: f64 = full.iter().map(|s| s.duration.as_secs_f64()).sum();
            decode.push((b, (full.len() * b) as f64 / secs.max(1e-9)));
            let eighth = full.len() / 8;
            let ms = |s: &[&StepInfo]| {
                s.iter().map(|s| s.duration.as_secs_f64()).sum::<f64>() * 1e3 / s.len() as f64
            };
            if full.len() >= 8 {
                step_ms.push((b, ms(&full[..eighth]), ms(&full[full.len() - eighth..])));
            }
        }
        println!(
            "{t:>7} | {prefill:>16.1} | {}",
            decode
                .iter()
                .map(|(b, x)| format!(
                    "{:>width$.1}",
                    x,
                    width = format!("decode b={b} tok/s").len()
                ))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        if let Some((_, p)) = peak {
            let got = linear_macs * prefill;
            println!(
                "{t:>7} | prefill: {:.1} G multiply-adds/s in the linear layers, {:.0} % of {t} × the int8 peak",
                got / 1e9,
                100.0 * got / (p * t as f64)
            );
        }
        for (b, first, last) in &step_ms {
            println!(
                "{t:>7} | decode b={b}: {first:.2} ms per step over the first eighth of the steps, {last:.2} over the last eighth"
            );
        }
        rows.push(Row {
            threads: t,
            prefill_tokens: a.prompt_len,
            prefill_tok_s: prefill,
            prefill_share_of_int8_peak: peak.map(|(_, p)| linear_macs * prefill / (p * t as f64)),
            decode_context: ctx,
            decode,
            decode_step_ms: step_ms,
        });
    }
    if let Some(rss) = peak_rss_mib() {
        println!("peak RSS: {rss:.0} MiB");
    }
    if let Some(p) = a.json {
        std::fs::write(&p, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}

/// VmHWM from /proc (Linux), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
