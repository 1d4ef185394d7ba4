//! The forward pass over the paged KV cache, shaped by the architecture ([`Arch`]: Llama,
//! Gemma 3).
//!
//! Every token, prompt or generated, takes one path: activations quantized per 32 values to
//! 8 bits, times the GGUF's quantized weights in our own kernels (one output row at a time,
//! fixed reduction order). Nothing in that path depends on how many rows share the step, so
//! a request's logits are bit-identical alone, batched, chunked or resumed elsewhere.
//!
//! Why not dense f32 weights through a GEMM for prompts: measured
//! here, the GEMM's per-call cost (packing ~540 MB of weights) made small prefill chunks
//! cost 100+ ms (a 1-token prompt: 142 ms against 18 ms on this path, 2 threads), which is
//! exactly what hurts inter-token latency when prompts share steps with decodes; and the
//! dense copy held 650 MB more memory. A 512-token prefill is ~15% slower on this path.
//!
//! Norms, RoPE and attention are per row in a fixed order.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;
use rayon::prelude::*;

use crate::error::{EngineError, GgufError};
use crate::gguf::{GgufFile, ModelConfig, RawTensor};
use crate::kernels::attention::{attend_rows, Scratch};
use crate::kernels::quant::{quantize_row, GgufBlocks, QKind, QMatrix, QRow};
use crate::kernels::{gelu_mul, rms_norm, rms_norm_in_place, silu_mul, Rope};
use crate::kv_cache::KvCache;
use crate::tokenizer::Tokenizer;

struct Layer {
    attn_norm: Vec<f32>,
    wqkv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate_up: QMatrix,
    w_down: QMatrix,
    /// Gemma: RMS norms of each query and key head, before RoPE.
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// Gemma: RMS norms of the attention's and the FFN's outputs, before the residual add.
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
    /// Positions this layer attends to (`None`: all; a windowed layer takes the local RoPE
    /// table).
    window: Option<usize>,
}

/// What the architecture changes in the forward pass. Everything else (the paged cache,
/// the kernels, their order) is shared; a new Llama-like architecture is a new arm here and
/// in [`Model::load`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    /// Llama: SiLU-gated FFN, interleaved RoPE.
    Llama,
    /// Gemma 3: embeddings scaled by √d, QK norms, NeoX RoPE (base 10,000 on local layers),
    /// GELU-gated FFN, post-norms, local sliding-window layers.
    Gemma3,
}

/// How [`Model::load_with`] treats weights the kernels do not run.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Expand weights of other GGUF types to f32 rows (slow, and 4 bytes a weight) instead
    /// of refusing the file.
    pub allow_f32_weights: bool,
}

/// A loaded model: config, tokenizer, weights in the form our kernels run on.
pub struct Model {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    path: PathBuf,
    arch: Arch,
    embd: QMatrix,
    output_norm: Vec<f32>,
    lm_head: Option<QMatrix>,
    layers: Vec<Layer>,
    /// RoPE tables: global layers', then (Gemma) the windowed layers'.
    ropes: Vec<Rope>,
    weight_bytes: usize,
}

fn load_err(path: &Path, e: candle_core::Error) -> GgufError {
    GgufError::Malformed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Any GGUF type, dequantized by candle to f32 values.
fn vec_of(path: &Path, t: &RawTensor) -> Result<Vec<f32>, GgufError> {
    let storage = QStorage::from_data(Cow::Borrowed(&t.data), &Device::Cpu, t.dtype)
        .map_err(|e| load_err(path, e))?;
    let q = QTensor::new(storage, t.dims.clone()).map_err(|e| load_err(path, e))?;
    q.dequantize(&Device::Cpu)
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.to_vec1::<f32>())
        .map_err(|e| load_err(path, e))
}

/// The GGUF types our kernels run (each repacked exactly); others become f32 rows only
/// when `opts` allow it, and are refused, by name and type, otherwise.
fn quant_of(
    path: &Path,
    name: &str,
    t: &RawTensor,
    opts: LoadOptions,
) -> Result<QMatrix, GgufError> {
    let (rows, cols) = (t.dims[0], t.dims[1]);
    let src = match t.dtype {
        GgmlDType::Q4_0 => Some(GgufBlocks::Q4_0),
        GgmlDType::Q4_1 => Some(GgufBlocks::Q4_1),
        GgmlDType::Q5_0 => Some(GgufBlocks::Q5_0),
        GgmlDType::Q8_0 => Some(GgufBlocks::Q8_0),
        GgmlDType::Q4K => Some(GgufBlocks::Q4K),
        GgmlDType::Q6K => Some(GgufBlocks::Q6K),
        GgmlDType::Q5_1 => Some(GgufBlocks::Q5_1),
        GgmlDType::Q5K => Some(GgufBlocks::Q5K),
        _ => None,
    };
    match src {
        // Rows of whole blocks (the GGUF reader checked the tensor's total).
        Some(src) if cols % src.values_and_bytes().0 == 0 => {
            Ok(QMatrix::from_gguf(src, rows, cols, &t.data))
        }
        _ if opts.allow_f32_weights && cols % 32 == 0 => {
            Ok(QMatrix::from_f32(rows, cols, vec_of(path, t)?))
        }
        _ => Err(GgufError::UnsupportedTensorType {
            path: path.to_path_buf(),
            name: name.to_string(),
            ggml_type: format!("{:?}", t.dtype),
        }),
    }
}

/// Loads several tensors as one matrix stacked along output rows (one kernel call).
fn load_linear(
    g: &mut GgufFile,
    names: &[String],
    cols: usize,
    rows: &[usize],
    opts: LoadOptions,
) -> Result<QMatrix, GgufError> {
    let path = g.path.clone();
    let mut parts = Vec::new();
    for (name, &r) in names.iter().zip(rows) {
        parts.push(quant_of(&path, name, &g.take(name, &[r, cols])?, opts)?);
    }
    QMatrix::concat(parts).ok_or_else(|| GgufError::Malformed {
        path,
        reason: format!("cannot stack {names:?}"),
    })
}

/// One request's slice of a step: `tokens` at positions `start..`, written into `table`.
pub(crate) struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub table: &'a [u32],
    /// Whether to return logits for the last token of the chunk.
    pub logits: bool,
}

struct Row {
    seq: usize,
    pos: usize,
}

impl Model {
    /// Loads a GGUF whose weights our kernels run, refusing any other weight type.
    pub fn load(path: &Path) -> Result<Self, GgufError> {
        Self::load_with(path, LoadOptions::default())
    }

    pub fn load_with(path: &Path, opts: LoadOptions) -> Result<Self, GgufError> {
        let mut g = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let c = g.config.clone();
        let arch = if c.architecture == "gemma3" {
            Arch::Gemma3
        } else {
            Arch::Llama
        };
        let (d, hd) = (c.n_embd, c.head_dim);
        let (qd, kvd, ff) = (c.n_head * hd, c.n_head_kv * hd, c.n_ff);
        let embd = quant_of(
            path,
            "token_embd.weight",
            &g.take("token_embd.weight", &[c.vocab_size, d])?,
            opts,
        )?;
        // No `output.weight`: the output head is tied to the embedding.
        let lm_head = if g.tensors.contains_key("output.weight") {
            Some(load_linear(
                &mut g,
                &["output.weight".into()],
                d,
                &[c.vocab_size],
                opts,
            )?)
        } else {
            None
        };
        let output_norm = vec_of(path, &g.take("output_norm.weight", &[d])?)?;
        let gemma = arch == Arch::Gemma3;
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let mut norm = |s: &str, len: usize| -> Result<Option<Vec<f32>>, GgufError> {
                if !gemma {
                    return Ok(None);
                }
                Ok(Some(vec_of(path, &g.take(&n(s), &[len])?)?))
            };
            let (q_norm, k_norm) = (norm("attn_q_norm", hd)?, norm("attn_k_norm", hd)?);
            let post_attn_norm = norm("post_attention_norm", d)?;
            let post_ffn_norm = norm("post_ffw_norm", d)?;
            let window = c.layer_window(i);
            layers.push(Layer {
                attn_norm: vec_of(path, &g.take(&n("attn_norm"), &[d])?)?,
                wqkv: load_linear(
                    &mut g,
                    &[n("attn_q"), n("attn_k"), n("attn_v")],
                    d,
                    &[qd, kvd, kvd],
                    opts,
                )?,
                wo: load_linear(&mut g, &[n("attn_output")], qd, &[d], opts)?,
                ffn_norm: vec_of(path, &g.take(&n("ffn_norm"), &[d])?)?,
                w_gate_up: load_linear(&mut g, &[n("ffn_gate"), n("ffn_up")], d, &[ff, ff], opts)?,
                w_down: load_linear(&mut g, &[n("ffn_down")], ff, &[d], opts)?,
                q_norm,
                k_norm,
                post_attn_norm,
                post_ffn_norm,
                window,
            });
        }
        let weight_bytes = embd.bytes()
            + lm_head.as_ref().map_or(0, |m| m.bytes())
            + layers
                .iter()
                .map(|l| l.wqkv.bytes() + l.wo.bytes() + l.w_gate_up.bytes() + l.w_down.bytes())
                .sum::<usize>();
        let mut ropes = vec![Rope::new(hd, c.rope_base, c.context_length, gemma)];
        if gemma {
            // Gemma 3's local layers keep the original base (reference implementations fix
            // it; the file does not say).
            ropes.push(Rope::new(hd, 10_000.0, c.context_length, true));
        }
        Ok(Self {
            arch,
            ropes,
            config: c,
            tokenizer,
            path: path.to_path_buf(),
            embd,
            output_norm,
            lm_head,
            layers,
            weight_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes held by weights.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    pub fn max_positions(&self) -> usize {
        self.ropes[0].max_pos()
    }

    /// Runs one step over `chunks`, writing their K and V into `cache`; returns logits for
    /// chunks that asked for them.
    pub(crate) fn forward(
        &self,
        cache: &mut KvCache,
        chunks: &[SeqChunk<'_>],
    ) -> Result<Vec<Option<Vec<f32>>>, EngineError> {
        let c = &self.config;
        let (d, hd, nh, nkv) = (c.n_embd, c.head_dim, c.n_head, c.n_head_kv);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let mut rows = Vec::new();
        let mut h = Vec::new();
        for (si, ch) in chunks.iter().enumerate() {
            for (i, &tok) in ch.tokens.iter().enumerate() {
                let pos = ch.start + i;
                rows.push(Row { seq: si, pos });
                let at = h.len();
                h.resize(at + d, 0.0);
                self.embd.dequantize_row(tok as usize, &mut h[at..]);
            }
        }
        if self.arch == Arch::Gemma3 {
            let scale = (d as f32).sqrt();
            for v in &mut h {
                *v *= scale;
            }
        }
        let n = rows.len();
        // Attention work units: runs of consecutive rows of one sequence (a chunk's rows share
        // each K/V block), at most ATTN_GROUP rows so a long chunk still spreads over threads.
        const ATTN_GROUP: usize = 32;
        let mut groups: Vec<(usize, usize)> = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            match groups.last_mut() {
                Some((r0, r1)) if rows[*r0].seq == row.seq && *r1 - *r0 < ATTN_GROUP => *r1 = r + 1,
                _ => groups.push((r, r + 1)),
            }
        }
        let mut xn = vec![0f32; n * d];
        let mut att = vec![0f32; n * qd];
        let mut act = vec![0f32; n * c.n_ff];
        // The layers' outputs, allocated once for all layers.
        let (mut qkv, mut o, mut gu, mut down) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Row-wise steps run over the pool too: on their own they would leave every other
        // thread idle for that long.
        let norm = |w: &[f32], h: &[f32], xn: &mut [f32]| {
            xn.par_chunks_exact_mut(d)
                .zip(h.par_chunks_exact(d))
                .for_each(|(o, x)| rms_norm(x, w, c.rms_eps, o));
        };
        // A residual add, after the output's own norm where the architecture has one.
        let add_normed = |post: &Option<Vec<f32>>, h: &mut [f32], out: &mut [f32]| {
            if let Some(w) = post {
                out.par_chunks_exact_mut(d)
                    .for_each(|x| rms_norm_in_place(x, w, c.rms_eps));
            }
            for (hv, ov) in h.iter_mut().zip(out.iter()) {
                *hv += ov;
            }
        };
        for (li, layer) in self.layers.iter().enumerate() {
            norm(&layer.attn_norm, &h, &mut xn);
            linear_into(&layer.wqkv, &xn, n, &mut qkv);
            let w = qd + 2 * kvd;
            let rope = &self.ropes[usize::from(layer.window.is_some())];
            qkv.par_chunks_exact_mut(w)
                .zip(rows.par_iter())
                .for_each(|(x, row)| {
                    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                        for (i, head) in x[..qd + kvd].chunks_exact_mut(hd).enumerate() {
                            rms_norm_in_place(head, if i < nh { qn } else { kn }, c.rms_eps);
                        }
                    }
                    rope.apply(&mut x[..qd + kvd], row.pos)
                });
            for (r, row) in rows.iter().enumerate() {
                let (k, v) = qkv[r * w + qd..(r + 1) * w].split_at(kvd);
                cache.write(li, chunks[row.seq].table, row.pos, k, v);
            }
            let cache_ref = &*cache;
            let mut work = Vec::with_capacity(groups.len());
            let mut rest = &mut att[..];
            for &(r0, r1) in &groups {
                let (here, tail) = rest.split_at_mut((r1 - r0) * qd);
                work.push((r0, r1, here));
                rest = tail;
            }
            work.into_par_iter()
                .for_each_init(Scratch::new, |s, (r0, r1, out)| {
                    let row = &rows[r0];
                    attend_rows(
                        cache_ref,
                        li,
                        chunks[row.seq].table,
                        row.pos + 1,
                        layer.window,
                        (&qkv[r0 * w..(r1 - 1) * w + qd], w),
                        nh,
                        out,
                        s,
                    );
                });
            linear_into(&layer.wo, &att, n, &mut o);
            add_normed(&layer.post_attn_norm, &mut h, &mut o);
            norm(&layer.ffn_norm, &h, &mut xn);
            linear_into(&layer.w_gate_up, &xn, n, &mut gu);
            let gate = if self.arch == Arch::Gemma3 {
                gelu_mul
            } else {
                silu_mul
            };
            act.par_chunks_exact_mut(c.n_ff)
                .zip(gu.par_chunks_exact(2 * c.n_ff))
                .for_each(|(o, g)| gate(g, o));
            linear_into(&layer.w_down, &act, n, &mut down);
            add_normed(&layer.post_ffn_norm, &mut h, &mut down);
        }
        // Logits only for the last row of each chunk that wants them.
        let mut want = Vec::new();
        let mut r0 = 0;
        for (si, ch) in chunks.iter().enumerate() {
            let r_last = r0 + ch.tokens.len() - 1;
            if ch.logits {
                want.push((si, r_last));
            }
            r0 += ch.tokens.len();
        }
        let mut out = vec![None; chunks.len()];
        if want.is_empty() {
            return Ok(out);
        }
        let mut xl = vec![0f32; want.len() * d];
        for (i, &(_, r)) in want.iter().enumerate() {
            rms_norm(
                &h[r * d..(r + 1) * d],
                &self.output_norm,
                c.rms_eps,
                &mut xl[i * d..(i + 1) * d],
            );
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embd);
        let logits = linear(head, &xl, want.len());
        let v = head.rows;
        for (i, &(si, _)) in want.iter().enumerate() {
            out[si] = Some(logits[i * v..(i + 1) * v].to_vec());
        }
        Ok(out)
    }
}

/// `x · Wᵀ` for `n` rows of `x`.
fn linear(w: &QMatrix, x: &[f32], n: usize) -> Vec<f32> {
    let mut y = Vec::new();
    linear_into(w, x, n, &mut y);
    y
}

/// [`linear`] into `y`, whose allocation is reused (every value is written, so a buffer of
/// the right length is not cleared first).
fn linear_into(w: &QMatrix, x: &[f32], n: usize, y: &mut Vec<f32>) {
    let k = w.cols;
    y.resize(n * w.rows, 0.0);
    if w.kind == QKind::F32 {
        w.matvec(x, &[], n, y);
    } else {
        let xq: Vec<QRow> = x
            .par_chunks_exact(k)
            .map(|r| quantize_row(r, w.kind))
            .collect();
        w.matvec(&[], &xq, n, y);
    }
}
