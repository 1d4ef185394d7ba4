//! `splitserve econ`: the command line over the library, text tables or `--json`.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::decision::{plan, DefaultPolicy, DisaggPolicy, PrefillRate, Scenario, Workload};
use crate::link::{self, Link};
use crate::shape::{self, freight, ModelShape, MIB};
use crate::EconError;

/// What the binary provides: reading a GGUF and running the local engine.
pub trait EconHooks {
    fn shape_from_gguf(&self, path: &Path) -> Result<ModelShape, String>;
    fn calibrate_prefill_tok_s(&self, model: Option<&Path>) -> Result<f64, String>;
}

/// The model's shape. Each help is one line so that `--help` fits a screen (docs/econ.md).
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// SmolLM2-135M, Qwen2.5-0.5B, Llama-3.1-8B or -70B, Gemma-3-270M
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Read the shape from a GGUF file (or a model name: gemma3-270m)
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Layers (overrides the preset's)
    #[arg(long, value_name = "N")]
    pub layers: Option<u64>,
    /// KV heads (overrides the preset's)
    #[arg(long, value_name = "N")]
    pub kv_heads: Option<u64>,
    /// Head size (overrides the preset's)
    #[arg(long, value_name = "N")]
    pub head_dim: Option<u64>,
    /// Query heads (default: the KV heads)
    #[arg(long, value_name = "N")]
    pub heads: Option<u64>,
    /// Total parameters, for the FLOPs estimate
    #[arg(long, value_name = "N")]
    pub params: Option<u64>,
    /// KV type: f32, f16/bf16, fp8 or q8_0
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    pub kv_dtype: String,
    /// Prompt tokens
    #[arg(long, value_name = "N", default_value_t = 2048)]
    pub prompt_tokens: u64,
    /// Tokens per KV block
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub block_size: u64,
}

#[derive(clap::Args, Debug, Clone)]
pub struct LinkArgs {
    /// nvlink, ib-400/200, 100/25/10gbe, pcie, loopback
    #[arg(long, value_name = "LINK", default_value = "10gbe")]
    pub link: String,
    /// Custom bandwidth, GB/s (overrides --link)
    #[arg(long, value_name = "GBPS")]
    pub link_gbps: Option<f64>,
    /// Link latency, microseconds
    #[arg(long, value_name = "US", default_value_t = 0.0)]
    pub link_latency_us: f64,
    /// Count TCP/Ethernet headers at this MTU (0: none)
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u32>,
    /// Share of the bandwidth a transfer gets
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub efficiency: f64,
    /// Stream KV layer by layer behind the prefill
    #[arg(long)]
    pub overlap: bool,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum EconCommand {
    /// KV bytes per token and a prompt's freight, with its transfer time over every link.
    Freight {
        #[command(flatten)]
        model: ModelArgs,
        /// Share of the bandwidth a transfer gets
        #[arg(long, value_name = "F", default_value_t = 1.0)]
        efficiency: f64,
    },
    /// Does disaggregation pay for this request on this link?
    Decide {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        link: LinkArgs,
        /// Output tokens of the request
        #[arg(long, value_name = "N", default_value_t = 256)]
        output_tokens: u64,
        /// Prefill compute, TFLOP/s (peak × MFU)
        #[arg(long, value_name = "TF", default_value_t = 400.0)]
        tflops: f64,
        /// Measured prefill rate (overrides --tflops)
        #[arg(long, value_name = "TOK_S")]
        prefill_tok_s: Option<f64>,
        /// Measure the prefill rate with this engine
        #[arg(long)]
        calibrate: bool,
        /// Decode step time, ms
        #[arg(long, value_name = "MS", default_value_t = 15.0)]
        decode_step_ms: f64,
        /// Prefill chunk size, tokens
        #[arg(long, value_name = "N", default_value_t = 2048)]
        chunk_tokens: u64,
        /// Inter-token latency SLO, ms
        #[arg(long, value_name = "MS", default_value_t = 30.0)]
        itl_slo_ms: f64,
        /// Free KV blocks on the decode side
        #[arg(long, value_name = "N", default_value_t = 1_000_000)]
        decode_free_blocks: u64,
    },
    /// Colocated or xPyD, and the ratio, for a workload.
    #[command(
        override_usage = "splitserve econ plan [OPTIONS] --request-rate <R> --input-tokens <N>\n       \
                          --output-tokens <N> --prefill-tok-s <TOK_S> --decode-tok-s <TOK_S>"
    )]
    Plan {
        /// Requests per second
        #[arg(long, value_name = "R")]
        request_rate: f64,
        /// Mean prompt tokens
        #[arg(long, value_name = "N")]
        input_tokens: f64,
        /// Mean output tokens
        #[arg(long, value_name = "N")]
        output_tokens: f64,
        /// Time-to-first-token SLO, ms
        #[arg(long, value_name = "MS", default_value_t = 1000.0)]
        ttft_slo_ms: f64,
        /// Inter-token latency SLO, ms
        #[arg(long, value_name = "MS", default_value_t = 50.0)]
        itl_slo_ms: f64,
        /// One engine's prefill rate, tokens/s
        #[arg(long, value_name = "TOK_S")]
        prefill_tok_s: f64,
        /// One engine's decode rate, tokens/s
        #[arg(long, value_name = "TOK_S")]
        decode_tok_s: f64,
        /// Decode step time, ms
        #[arg(long, value_name = "MS", default_value_t = 20.0)]
        decode_step_ms: f64,
        /// Prefill chunk size, tokens
        #[arg(long, value_name = "N", default_value_t = 512.0)]
        chunk_tokens: f64,
    },
}

#[derive(clap::Args, Debug, Clone)]
pub struct EconArgs {
    #[command(subcommand)]
    pub command: EconCommand,
    /// Machine-readable output
    #[arg(long, global = true)]
    pub json: bool,
}

fn shape_of(m: &ModelArgs, hooks: &dyn EconHooks) -> Result<ModelShape, EconError> {
    let mut s = match (&m.preset, &m.model) {
        (Some(p), _) => shape::preset(p).ok_or_else(|| EconError::UnknownPreset {
            kind: "model",
            name: p.clone(),
            known: shape::presets()
                .iter()
                .map(|x| x.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        })?,
        (None, Some(path)) => hooks.shape_from_gguf(path).map_err(EconError::Hook)?,
        (None, None) => ModelShape {
            name: "custom".into(),
            layers: 0,
            kv_heads: 0,
            head_dim: 0,
            heads: 0,
            params: 0,
            window: None,
        },
    };
    s.heads = m.heads.unwrap_or(s.heads);
    s.layers = m.layers.unwrap_or(s.layers);
    s.kv_heads = m.kv_heads.unwrap_or(s.kv_heads);
    s.head_dim = m.head_dim.unwrap_or(s.head_dim);
    s.params = m.params.unwrap_or(s.params);
    if s.heads == 0 {
        s.heads = s.kv_heads;
    }
    if s.layers == 0 || s.kv_heads == 0 || s.head_dim == 0 {
        return Err(EconError::Missing(
            "a model: --preset NAME, --model FILE.gguf, or --layers/--kv-heads/--head-dim",
        ));
    }
    Ok(s)
}

fn dtype(m: &ModelArgs) -> Result<shape::KvFormat, EconError> {
    shape::kv_format(&m.kv_dtype).ok_or_else(|| EconError::UnknownPreset {
        kind: "KV dtype",
        name: m.kv_dtype.clone(),
        known: "f32, f16, bf16, fp8, q8_0".into(),
    })
}

fn link_of(l: &LinkArgs) -> Result<Link, EconError> {
    if let Some(g) = l.link_gbps {
        return Ok(Link {
            name: format!("{g} GB/s"),
            bytes_per_s: g * 1e9,
            latency_s: l.link_latency_us * 1e-6,
            payload_share: framing(l.mtu.unwrap_or(0))?,
        });
    }
    if l.link.eq_ignore_ascii_case("loopback") {
        let bps = link::measure_loopback(256 << 20)
            .map_err(|e| EconError::Hook(format!("loopback measurement: {e}")))?;
        return Ok(Link {
            name: "loopback (measured)".into(),
            bytes_per_s: bps,
            latency_s: l.link_latency_us * 1e-6,
            // Measured as payload.
            payload_share: 1.0,
        });
    }
    let mut k = link::preset(&l.link).ok_or_else(|| EconError::UnknownPreset {
        kind: "link",
        name: l.link.clone(),
        known: link::presets()
            .iter()
            .map(|x| x.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
            + ", loopback",
    })?;
    if l.link_latency_us > 0.0 {
        k.latency_s = l.link_latency_us * 1e-6;
    }
    if let Some(m) = l.mtu {
        k.payload_share = framing(m)?;
    }
    Ok(k)
}

/// The payload share of TCP over Ethernet at `mtu` (0: no framing counted).
fn framing(mtu: u32) -> Result<f64, EconError> {
    match mtu {
        0 => Ok(1.0),
        68..=65535 => Ok(link::tcp_over_ethernet(f64::from(mtu))),
        m => Err(EconError::Hook(format!(
            "--mtu {m}: an MTU from 68 to 65535, or 0 for no framing"
        ))),
    }
}

/// Bytes per value as a person reads them: "2", or "34/32" for grouped formats.
fn value_bytes(kv: shape::KvFormat) -> String {
    match kv.group {
        1 => kv.group_bytes.to_string(),
        g => format!("{}/{g}", kv.group_bytes),
    }
}

/// Runs one `econ` command and returns what to print.
pub fn run(args: &EconArgs, hooks: &dyn EconHooks) -> Result<String, EconError> {
    match &args.command {
        EconCommand::Freight { model, efficiency } => {
            let s = shape_of(model, hooks)?;
            let kv = dtype(model)?;
            let f = freight(&s, kv, model.prompt_tokens, model.block_size);
            let links: Vec<(String, f64)> = link::presets()
                .iter()
                .map(|l| {
                    (
                        l.name.clone(),
                        link::transfer_time(l, f.block_bytes, *efficiency),
                    )
                })
                .collect();
            if args.json {
                return Ok(json!({"shape": s, "freight": f, "transfer_s": links}).to_string());
            }
            let mut t = format!(
                "{}: {} layers x {} KV heads x {} head dim x 2 x {} B = {} B per token\n{} tokens = {} blocks of {} = {:.2} MiB of KV\n\n{:<10} {:>12}\n",
                s.name, s.layers, s.kv_heads, s.head_dim, value_bytes(kv),
                f.bytes_per_token, f.tokens, f.blocks, f.block_size, f.block_bytes as f64 / MIB, "link", "transfer ms"
            );
            if let (Some(w), Some(wb)) = (s.window, f.window_blocks) {
                t.insert_str(
                    t.find("\n\n").unwrap_or(t.len()),
                    &format!(
                        "\n{} of the {} layers see a window of {} positions: they keep {wb} of the {} blocks",
                        w.layers, s.layers, w.positions, f.blocks
                    ),
                );
            }
            for (n, secs) in links {
                t.push_str(&format!("{n:<10} {:>12.2}\n", secs * 1e3));
            }
            Ok(t)
        }
        EconCommand::Decide {
            model,
            link: la,
            output_tokens,
            tflops,
            prefill_tok_s,
            calibrate,
            decode_step_ms,
            chunk_tokens,
            itl_slo_ms,
            decode_free_blocks,
        } => {
            let s = shape_of(model, hooks)?;
            let prefill = if *calibrate {
                PrefillRate::Measured {
                    tokens_per_s: hooks
                        .calibrate_prefill_tok_s(model.model.as_deref())
                        .map_err(EconError::Hook)?,
                }
            } else if let Some(r) = prefill_tok_s {
                PrefillRate::Measured { tokens_per_s: *r }
            } else {
                PrefillRate::Flops {
                    flops_per_s: tflops * 1e12,
                }
            };
            let sc = Scenario {
                q_width: s.heads * s.head_dim,
                kv_format: dtype(model)?,
                prompt_tokens: model.prompt_tokens,
                output_tokens: *output_tokens,
                block_size: model.block_size,
                link: link_of(la)?,
                efficiency: la.efficiency,
                overlap: la.overlap,
                prefill,
                decode_step_s: decode_step_ms / 1e3,
                chunk_tokens: *chunk_tokens,
                itl_slo_s: itl_slo_ms / 1e3,
                decode_free_blocks: *decode_free_blocks,
                shape: s,
            };
            let d = DefaultPolicy.decide(&sc);
            if args.json {
                return Ok(
                    json!({"scenario": sc, "decision": d, "pays": d.pays(), "reason": d.reason()})
                        .to_string(),
                );
            }
            let n = d.numbers();
            Ok(format!(
                "{} | prompt {} tokens, output {} | link {} ({:.2} GB/s x {:.3} payload x {}{})\n\
                 KV to move        {:>10.2} MiB ({} blocks needed on decode)\n\
                 prefill           {:>10.2} ms\n\
                 transfer          {:>10.2} ms (exposed {:.2} ms)\n\
                 colocated ITL     {:>10.2} ms (SLO {} ms)\n\
                 => {}\n",
                sc.shape.name,
                sc.prompt_tokens,
                sc.output_tokens,
                sc.link.name,
                sc.link.bytes_per_s / 1e9,
                sc.link.payload_share,
                sc.efficiency,
                if sc.overlap {
                    ", layer-wise overlap"
                } else {
                    ""
                },
                n.kv_bytes as f64 / MIB,
                n.blocks_needed,
                n.prefill_s * 1e3,
                n.transfer_s * 1e3,
                n.exposed_transfer_s * 1e3,
                n.colocated_itl_s * 1e3,
                itl_slo_ms,
                d.reason()
            ))
        }
        EconCommand::Plan {
            request_rate,
            input_tokens,
            output_tokens,
            ttft_slo_ms,
            itl_slo_ms,
            prefill_tok_s,
            decode_tok_s,
            decode_step_ms,
            chunk_tokens,
        } => {
            let w = Workload {
                request_rate: *request_rate,
                input_tokens: *input_tokens,
                output_tokens: *output_tokens,
                ttft_slo_s: ttft_slo_ms / 1e3,
                itl_slo_s: itl_slo_ms / 1e3,
                prefill_tok_s: *prefill_tok_s,
                decode_tok_s: *decode_tok_s,
                decode_step_s: decode_step_ms / 1e3,
                chunk_tokens: *chunk_tokens,
            };
            let p = plan(&w);
            if args.json {
                return Ok(json!({"workload": w, "plan": p}).to_string());
            }
            Ok(format!(
                "prefill instances (x)   {}\ndecode instances (y)    {}\ncolocated instances     {}\ncolocated worst ITL     {:.1} ms\n=> {}\n",
                p.prefill_instances, p.decode_instances, p.colocated_instances, p.colocated_itl_s * 1e3,
                if p.recommend_disaggregated { format!("disaggregate: {}", p.why) } else { format!("stay colocated: {}", p.why) }
            ))
        }
    }
}
