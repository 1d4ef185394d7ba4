//! `splitserve bench serve`: a load generator for any OpenAI-compatible server (ours,
//! llama.cpp's llama-server, vLLM). Streams every request and times each token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::stats::{chunk_has_token, goodput, inter_token_gaps, RequestResult, SseParser, Summary};
use crate::BenchError;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ServeBenchArgs {
    /// Server to load (loopback only)
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// Model to send (default: the first of /v1/models)
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// random, prefix, multiturn, or a JSONL file
    #[arg(long, value_name = "KIND", default_value = "random")]
    pub dataset: String,
    /// prefix: tokens of each shared head
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub prefix_len: usize,
    /// prefix: distinct heads, used in turn
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_prefixes: usize,
    /// multiturn: turns of each conversation
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub turns: usize,
    /// Requests to send
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub num_prompts: usize,
    /// Prompt tokens (prefix: the suffix; multiturn: a turn)
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub input_len: usize,
    /// Output tokens per request
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub output_len: usize,
    /// Lengths drawn from len·(1±r)
    #[arg(long, value_name = "R", default_value_t = 0.0)]
    pub range_ratio: f64,
    /// Poisson requests/s, or inf: all at once
    #[arg(long, value_name = "R", default_value = "inf")]
    pub request_rate: String,
    /// Requests in flight at most (default: no cap)
    #[arg(long, value_name = "N")]
    pub max_concurrency: Option<usize>,
    /// Seed of the prompts and arrivals
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub seed: u64,
    /// Goodput SLO: time to first token, ms
    #[arg(long, value_name = "MS", default_value_t = 1000.0)]
    pub slo_ttft_ms: f64,
    /// Goodput SLO: mean inter-token latency, ms
    #[arg(long, value_name = "MS", default_value_t = 50.0)]
    pub slo_itl_ms: f64,
    /// Write the report here as JSON
    #[arg(long, value_name = "PATH")]
    pub result_json: Option<PathBuf>,
    /// Seconds before a request is given up
    #[arg(long, value_name = "S", default_value_t = 600.0)]
    pub timeout_s: f64,
    /// No progress bar
    #[arg(long)]
    pub no_progress: bool,
}

impl ServeBenchArgs {
    /// The command's defaults against `base_url`, for callers that set a few fields.
    pub fn new(base_url: String) -> Self {
        Self {
            base_url,
            model: None,
            dataset: "random".into(),
            prefix_len: 1024,
            num_prefixes: 1,
            turns: 4,
            num_prompts: 64,
            input_len: 64,
            output_len: 128,
            range_ratio: 0.0,
            request_rate: "inf".into(),
            max_concurrency: None,
            seed: 0,
            slo_ttft_ms: 1000.0,
            slo_itl_ms: 50.0,
            result_json: None,
            timeout_s: 600.0,
            no_progress: false,
        }
    }
}

/// One prompt to send: text or token ids, and the output length.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompt: Value,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// Seconds after the start at which to send it (`None`: as soon as allowed).
    pub at: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: ServeBenchArgs,
    pub completed: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub ttft_ms: Summary,
    pub itl_ms: Summary,
    pub e2e_ms: Summary,
    pub slo_attainment: f64,
    pub goodput: f64,
    pub requests: Vec<RequestResult>,
}

fn draw_len(rng: &mut ChaCha8Rng, mean: usize, ratio: f64) -> usize {
    let lo = ((mean as f64) * (1.0 - ratio)).round().max(1.0) as u64;
    let hi = ((mean as f64) * (1.0 + ratio)).round().max(lo as f64) as u64;
    (lo + rng.next_u64() % (hi - lo + 1)) as usize
}

/// The workload: prompts, lengths and (for a finite rate) Poisson arrival times.
pub fn make_jobs(a: &ServeBenchArgs) -> Result<Vec<Job>, BenchError> {
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let rate: Option<f64> = match a.request_rate.as_str() {
        "inf" => None,
        s => Some(s.parse::<f64>().ok().filter(|r| *r > 0.0).ok_or_else(|| {
            BenchError::Config(format!(
                "--request-rate must be a positive number or inf, got {s:?}"
            ))
        })?),
    };
    let mut prompts: Vec<(Value, usize)> = Vec::new();
    // Ordinary vocabulary ids, away from the special tokens at the start.
    let random_ids = |rng: &mut ChaCha8Rng, n: usize| -> Vec<u32> {
        (0..n).map(|_| 300 + (rng.next_u32() % 20_000)).collect()
    };
    if a.dataset == "prefix" {
        if a.prefix_len == 0 || a.num_prefixes == 0 {
            return Err(BenchError::Config(
                "prefix: --prefix-len and --num-prefixes must be positive".into(),
            ));
        }
        let heads: Vec<Vec<u32>> = (0..a.num_prefixes)
            .map(|_| random_ids(&mut rng, a.prefix_len))
            .collect();
        for i in 0..a.num_prompts {
            let n = draw_len(&mut rng, a.input_len, a.range_ratio);
            let ids = [heads[i % heads.len()].clone(), random_ids(&mut rng, n)].concat();
            let len = ids.len();
            prompts.push((json!(ids), len));
        }
    } else if a.dataset == "multiturn" {
        if a.turns == 0 {
            return Err(BenchError::Config(
                "multiturn: --turns must be positive".into(),
            ));
        }
        let conversations = a.num_prompts.div_ceil(a.turns);
        let mut history: Vec<Vec<u32>> = vec![Vec::new(); conversations];
        // Turn by turn across the conversations, so a turn goes after its conversation's
        // previous one (with --max-concurrency at most the number of conversations).
        'turns: for _ in 0..a.turns {
            for h in history.iter_mut() {
                if prompts.len() == a.num_prompts {
                    break 'turns;
                }
                let n = draw_len(&mut rng, a.input_len, a.range_ratio);
                h.extend(random_ids(&mut rng, n));
                prompts.push((json!(h.clone()), h.len()));
                // The reply that the next turn resends (fixed here, not the one generated).
                h.extend(random_ids(&mut rng, a.output_len));
            }
        }
    } else if a.dataset == "random" {
        for _ in 0..a.num_prompts {
            let n = draw_len(&mut rng, a.input_len, a.range_ratio);
            // Ordinary vocabulary ids, away from the special tokens at the start.
            prompts.push((json!(random_ids(&mut rng, n)), n));
        }
    } else {
        let text = std::fs::read_to_string(&a.dataset)
            .map_err(|e| BenchError::Config(format!("{}: {e}", a.dataset)))?;
        for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| BenchError::Config(format!("{} line {}: {e}", a.dataset, i + 1)))?;
            let p = v.get("prompt").cloned().ok_or_else(|| {
                BenchError::Config(format!("{} line {}: no \"prompt\" field", a.dataset, i + 1))
            })?;
            let n = match &p {
                Value::Array(x) => x.len(),
                Value::String(s) => s.split_whitespace().count(),
                _ => 0,
            };
            prompts.push((p, n));
        }
        if prompts.is_empty() {
            return Err(BenchError::Config(format!("{} has no prompts", a.dataset)));
        }
    }
    let mut t = 0.0;
    Ok((0..a.num_prompts)
        .map(|i| {
            let (prompt, n) = prompts[i % prompts.len()].clone();
            let at = rate.map(|r| {
                let u = (rng.next_u32() as f64 + 1.0) / (u32::MAX as f64 + 2.0);
                let now = t;
                t += -u.ln() / r;
                now
            });
            Job {
                prompt,
                prompt_tokens: n,
                max_tokens: draw_len(&mut rng, a.output_len, a.range_ratio),
                at,
            }
        })
        .collect())
}

/// Sends one streaming completion and times every token chunk.
pub async fn send(
    client: &reqwest::Client,
    base_url: &str,
    model: &str,
    job: &Job,
    t0: Instant,
    timeout: Duration,
    extra: &Value,
) -> RequestResult {
    let start = Instant::now();
    let mut res = RequestResult {
        ok: false,
        error: None,
        prompt_tokens: job.prompt_tokens,
        output_tokens: 0,
        start_s: (start - t0).as_secs_f64(),
        ttft_ms: f64::NAN,
        e2e_ms: f64::NAN,
        itl_ms: vec![],
        cached_tokens: None,
    };
    let mut body = json!({
        "model": model, "prompt": job.prompt, "max_tokens": job.max_tokens,
        "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let (Value::Object(b), Value::Object(x)) = (&mut body, extra) {
        for (k, v) in x {
            b.insert(k.clone(), v.clone());
        }
    }
    let fut = async {
        let r = client
            .post(format!("{base_url}/v1/completions"))
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            let st = r.status();
            return Err(format!("{st}: {}", r.text().await.unwrap_or_default()));
        }
        let mut arrivals = Vec::new();
        let mut parser = SseParser::default();
        let mut stream = r.bytes_stream();
        let mut usage_tokens = None;
        let mut cached = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let now = (Instant::now() - start).as_secs_f64();
            for data in parser.push(&chunk) {
                if data == "[DONE]" {
                    continue;
                }
                let v: Value =
                    serde_json::from_str(&data).map_err(|e| format!("bad chunk {data:?}: {e}"))?;
                if let Some(e) = v.get("error") {
                    return Err(format!("server error mid-stream: {e}"));
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    usage_tokens = Some(n as usize);
                }
                if let Some(n) = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64() {
                    cached = Some(n as usize);
                }
                if chunk_has_token(&v) {
                    arrivals.push(now);
                }
            }
        }
        Ok((arrivals, usage_tokens, cached))
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => res.error = Some(format!("timed out after {timeout:?}")),
        Ok(Err(e)) => res.error = Some(e),
        Ok(Ok((arrivals, usage, cached))) => {
            res.cached_tokens = cached;
            res.ok = !arrivals.is_empty();
            if !res.ok {
                res.error = Some("no tokens received".into());
            }
            res.output_tokens = usage.unwrap_or(arrivals.len());
            res.ttft_ms = arrivals.first().map_or(f64::NAN, |t| t * 1e3);
            res.e2e_ms = start.elapsed().as_secs_f64() * 1e3;
            res.itl_ms = inter_token_gaps(&arrivals)
                .iter()
                .map(|g| g * 1e3)
                .collect();
        }
    }
    res
}

/// The model name a server serves (first of /v1/models).
pub async fn served_model(client: &reqwest::Client, base_url: &str) -> Result<String, BenchError> {
    let v: Value = client
        .get(format!("{base_url}/v1/models"))
        .send()
        .await
        .map_err(|e| BenchError::Http(format!("{base_url}/v1/models: {e}")))?
        .json()
        .await
        .map_err(|e| BenchError::Http(format!("{base_url}/v1/models: {e}")))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| BenchError::Http(format!("{base_url}/v1/models lists no model")))
}

/// Runs the whole workload and summarises it.
pub async fn run(a: &ServeBenchArgs, extra: Value) -> Result<Report, BenchError> {
    run_jobs(a, make_jobs(a)?, extra).await
}

/// Runs `jobs` (made by [`make_jobs`], perhaps reshaped) as `a` says, and summarises them.
pub async fn run_jobs(
    a: &ServeBenchArgs,
    jobs: Vec<Job>,
    extra: Value,
) -> Result<Report, BenchError> {
    let client = reqwest::Client::new();
    let model = match &a.model {
        Some(m) => m.clone(),
        None => served_model(&client, &a.base_url).await?,
    };
    let bar = if a.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(jobs.len() as u64);
        if let Ok(s) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} requests ({elapsed})",
        ) {
            b.set_style(s.progress_chars("=> "));
        }
        b.set_message("bench serve");
        b
    };
    let sem = Arc::new(Semaphore::new(
        a.max_concurrency.unwrap_or(usize::MAX >> 4).max(1),
    ));
    let t0 = Instant::now();
    let timeout = Duration::from_secs_f64(a.timeout_s);
    let mut handles = Vec::new();
    for job in jobs {
        if let Some(at) = job.at {
            let due = t0 + Duration::from_secs_f64(at);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = sem
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| BenchError::Http(e.to_string()))?;
        let (client, url, model, bar, extra) = (
            client.clone(),
            a.base_url.clone(),
            model.clone(),
            bar.clone(),
            extra.clone(),
        );
        handles.push(tokio::spawn(async move {
            let r = send(&client, &url, &model, &job, t0, timeout, &extra).await;
            drop(permit);
            bar.inc(1);
            r
        }));
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.map_err(|e| BenchError::Http(e.to_string()))?);
    }
    bar.finish_and_clear();
    let duration_s = t0.elapsed().as_secs_f64();
    Ok(summarise(a.clone(), results, duration_s))
}

pub fn summarise(config: ServeBenchArgs, results: Vec<RequestResult>, duration_s: f64) -> Report {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.ok).collect();
    let ttft: Vec<f64> = ok.iter().map(|r| r.ttft_ms).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect();
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_ms).collect();
    let out_tokens: usize = ok.iter().map(|r| r.output_tokens).sum();
    let (slo_attainment, gp) = goodput(&results, config.slo_ttft_ms, config.slo_itl_ms, duration_s);
    Report {
        completed: ok.len(),
        failed: results.len() - ok.len(),
        duration_s,
        request_throughput: ok.len() as f64 / duration_s,
        output_throughput: out_tokens as f64 / duration_s,
        ttft_ms: Summary::of(&ttft),
        itl_ms: Summary::of(&itl),
        e2e_ms: Summary::of(&e2e),
        slo_attainment,
        goodput: gp,
        requests: results,
        config,
    }
}

impl Report {
    /// Prompt tokens the server reported cached, and all prompt tokens, over the completed
    /// requests (`None` where the server does not report them).
    pub fn cached_prompt_tokens(&self) -> Option<(usize, usize)> {
        let ok = self.requests.iter().filter(|r| r.ok);
        let cached: Option<usize> = ok.clone().map(|r| r.cached_tokens).sum();
        Some((cached?, ok.map(|r| r.prompt_tokens).sum()))
    }

    /// The table printed on stdout.
    pub fn table(&self) -> String {
        let row = |name: &str, s: &Summary| {
            format!(
                "{name:<10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}\n",
                s.mean, s.p50, s.p90, s.p99, s.max
            )
        };
        let mut t = format!(
            "requests: {} completed, {} failed in {:.2} s\nthroughput: {:.2} req/s, {:.1} output tok/s\ngoodput (TTFT <= {} ms, ITL <= {} ms): {:.2} req/s ({:.0}% of requests)\n",
            self.completed, self.failed, self.duration_s, self.request_throughput, self.output_throughput,
            self.config.slo_ttft_ms, self.config.slo_itl_ms, self.goodput, self.slo_attainment * 100.0
        );
        t.push_str(&format!(
            "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "ms", "mean", "p50", "p90", "p99", "max"
        ));
        t.push_str(&row("TTFT", &self.ttft_ms));
        t.push_str(&row("ITL", &self.itl_ms));
        t.push_str(&row("E2E", &self.e2e_ms));
        if let Some((cached, prompt)) = self.cached_prompt_tokens() {
            t.push_str(&format!(
                "prefix cache: {cached} of {prompt} prompt tokens cached ({:.0}%)\n",
                100.0 * cached as f64 / prompt.max(1) as f64
            ));
        }
        if let Some(e) = self.requests.iter().find_map(|r| r.error.as_ref()) {
            t.push_str(&format!("first error: {e}\n"));
        }
        t
    }
}
