//! The Llama forward pass over the paged KV cache.
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
use crate::kernels::quant::{quantize_row, QKind, QMatrix, QRow};
use crate::kernels::{rms_norm, silu_mul, Rope};
use crate::kv_cache::KvCache;
use crate::tokenizer::Tokenizer;

struct Layer {
    attn_norm: Vec<f32>,
    wqkv: QMatrix,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    w_gate_up: QMatrix,
    w_down: QMatrix,
}

/// A loaded model: config, tokenizer, weights in the form our kernels run on.
pub struct Model {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    path: PathBuf,
    embd: QMatrix,
    output_norm: Vec<f32>,
    lm_head: Option<QMatrix>,
    layers: Vec<Layer>,
    rope: Rope,
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

/// Q4_1 and Q8_0 run as they are; other types become f32 rows.
fn quant_of(path: &Path, t: &RawTensor) -> Result<QMatrix, GgufError> {
    let (rows, cols) = (t.dims[0], t.dims[1]);
    Ok(match t.dtype {
        GgmlDType::Q4_1 => QMatrix::from_gguf(QKind::Q4_1, rows, cols, &t.data),
        GgmlDType::Q8_0 => QMatrix::from_gguf(QKind::Q8_0, rows, cols, &t.data),
        _ => QMatrix::from_f32(rows, cols, vec_of(path, t)?),
    })
}

/// Loads several tensors as one matrix stacked along output rows (one kernel call).
fn load_linear(
    g: &mut GgufFile,
    names: &[String],
    cols: usize,
    rows: &[usize],
) -> Result<QMatrix, GgufError> {
    let path = g.path.clone();
    let mut parts = Vec::new();
    for (name, &r) in names.iter().zip(rows) {
        parts.push(quant_of(&path, &g.take(name, &[r, cols])?)?);
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
    pub fn load(path: &Path) -> Result<Self, GgufError> {
        let mut g = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let c = g.config.clone();
        let (d, kvd, ff) = (c.n_embd, c.n_head_kv * c.head_dim, c.n_ff);
        let embd = quant_of(path, &g.take("token_embd.weight", &[c.vocab_size, d])?)?;
        // No `output.weight`: the output head is tied to the embedding.
        let lm_head = if g.tensors.contains_key("output.weight") {
            Some(load_linear(
                &mut g,
                &["output.weight".into()],
                d,
                &[c.vocab_size],
            )?)
        } else {
            None
        };
        let output_norm = vec_of(path, &g.take("output_norm.weight", &[d])?)?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vec_of(path, &g.take(&n("attn_norm"), &[d])?)?,
                wqkv: load_linear(
                    &mut g,
                    &[n("attn_q"), n("attn_k"), n("attn_v")],
                    d,
                    &[d, kvd, kvd],
                )?,
                wo: load_linear(&mut g, &[n("attn_output")], d, &[d])?,
                ffn_norm: vec_of(path, &g.take(&n("ffn_norm"), &[d])?)?,
                w_gate_up: load_linear(&mut g, &[n("ffn_gate"), n("ffn_up")], d, &[ff, ff])?,
                w_down: load_linear(&mut g, &[n("ffn_down")], ff, &[d])?,
            });
        }
        let weight_bytes = embd.bytes()
            + lm_head.as_ref().map_or(0, |m| m.bytes())
            + layers
                .iter()
                .map(|l| l.wqkv.bytes() + l.wo.bytes() + l.w_gate_up.bytes() + l.w_down.bytes())
                .sum::<usize>();
        Ok(Self {
            rope: Rope::new(c.head_dim, c.rope_base, c.context_length),
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
        self.rope.max_pos()
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
        let kvd = nkv * hd;
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
        let mut att = vec![0f32; n * d];
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
        for (li, layer) in self.layers.iter().enumerate() {
            norm(&layer.attn_norm, &h, &mut xn);
            linear_into(&layer.wqkv, &xn, n, &mut qkv);
            let w = d + 2 * kvd;
            qkv.par_chunks_exact_mut(w)
                .zip(rows.par_iter())
                .for_each(|(x, row)| self.rope.apply(&mut x[..d + kvd], row.pos));
            for (r, row) in rows.iter().enumerate() {
                let (k, v) = qkv[r * w + d..(r + 1) * w].split_at(kvd);
                cache.write(li, chunks[row.seq].table, row.pos, k, v);
            }
            let cache_ref = &*cache;
            let mut work = Vec::with_capacity(groups.len());
            let mut rest = &mut att[..];
            for &(r0, r1) in &groups {
                let (here, tail) = rest.split_at_mut((r1 - r0) * d);
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
                        (&qkv[r0 * w..(r1 - 1) * w + d], w),
                        nh,
                        out,
                        s,
                    );
                });
            linear_into(&layer.wo, &att, n, &mut o);
            for (hv, ov) in h.iter_mut().zip(&o) {
                *hv += ov;
            }
            norm(&layer.ffn_norm, &h, &mut xn);
            linear_into(&layer.w_gate_up, &xn, n, &mut gu);
            act.par_chunks_exact_mut(c.n_ff)
                .zip(gu.par_chunks_exact(2 * c.n_ff))
                .for_each(|(o, g)| silu_mul(g, o));
            linear_into(&layer.w_down, &act, n, &mut down);
            for (hv, dv) in h.iter_mut().zip(&down) {
                *hv += dv;
            }
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
