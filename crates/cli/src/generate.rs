//! `splitserve generate`: one prompt through the engine, text streamed to stdout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use splitserve_engine::{
    ChatMessage, Engine, EngineConfig, Event, KvTransfer, Model, Request, SamplingParams,
};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// The prompt
    #[arg(long, value_name = "TEXT")]
    prompt: String,
    /// Wrap it in the model's chat template
    #[arg(long)]
    chat: bool,
    /// Tokens to generate at most
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0: greedy)
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: top probability mass
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    top_p: f32,
    /// Sample among the k likeliest (0: all)
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_k: usize,
    /// Sampling seed (default: random)
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Kernel threads (default: all cores)
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// KV cache type: f16, f32 or q8_0
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    kv_cache_dtype: splitserve_engine::KvDtype,
    /// Run weight types the kernels lack as f32 (slow)
    #[arg(long)]
    allow_f32_weights: bool,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let path = crate::model_path(&a.model)?;
    let t_load = Instant::now();
    let opts = splitserve_engine::LoadOptions {
        allow_f32_weights: a.allow_f32_weights,
    };
    let model = Arc::new(Model::load_with(&path, opts)?);
    tracing::info!(
        model = %path.display(),
        load_ms = t_load.elapsed().as_millis() as u64,
        "model loaded"
    );
    let text = if a.chat {
        model
            .tokenizer
            .apply_chat_template(
                &[ChatMessage {
                    role: "user".into(),
                    content: a.prompt.clone(),
                }],
                true,
            )
            .map_err(anyhow::Error::msg)?
    } else {
        a.prompt.clone()
    };
    let prompt = model.tokenizer.encode(&text).map_err(anyhow::Error::msg)?;
    let n_prompt = prompt.len();
    let engine = Engine::start(
        model,
        EngineConfig {
            threads: a.threads,
            kv_dtype: a.kv_cache_dtype,
            ..EngineConfig::default()
        },
        None,
    )?;
    let params = SamplingParams {
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
        ..SamplingParams::default()
    };
    let t0 = Instant::now();
    let mut rx = engine.submit(Request {
        id: "generate-0".into(),
        prompt,
        params,
        return_logits: false,
        kv: KvTransfer::None,
        cache_salt: None,

        resumed: 0,
    })?;
    let mut out = std::io::stdout().lock();
    let mut first = None;
    let mut n_out = 0usize;
    let mut reason = None;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Token(t) => {
                first.get_or_insert_with(Instant::now);
                n_out += 1;
                out.write_all(t.text.as_bytes())?;
                out.flush()?;
            }
            Event::Finished(f) => {
                if let Some(e) = f.error {
                    return Err(e).context("generation failed");
                }
                reason = Some(f.reason);
                break;
            }
        }
    }
    let end = Instant::now();
    let first = first.unwrap_or(end);
    let ttft = first.duration_since(t0);
    let decode = end.duration_since(first).as_secs_f64();
    let tps = if n_out > 1 && decode > 0.0 {
        (n_out - 1) as f64 / decode
    } else {
        0.0
    };
    writeln!(out)?;
    writeln!(
        out,
        "[prompt tokens: {n_prompt}, output tokens: {n_out}, finish: {}, TTFT: {:.1} ms, decode: {tps:.1} tok/s]",
        reason.map(|r| r.as_str()).unwrap_or("?"),
        ttft.as_secs_f64() * 1e3
    )?;
    Ok(())
}
