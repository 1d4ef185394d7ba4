//! The Llama forward pass over the paged KV cache.
//!
//! Two paths, chosen per token by its phase and never by what else is in the step:
//! - prompt tokens take the *dense* path: f32 weights (dequantized at load) through candle's
//!   matmul, which gives bit-identical rows for any row count ≥ 2 at any offset (a lone row
//!   is padded to two, since m = 1 takes another kernel);
//! - generated tokens take the *quantized* path: our own mat-vec over the GGUF blocks, which
//!   reads 4–8× fewer bytes per token (decode is memory-bound).
//!
//! Everything else (norms, RoPE, attention) is per row in a fixed order.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{EngineError, GgufError};
use crate::gguf::{GgufFile, ModelConfig, RawTensor};
use crate::kernels::attention::{attend_row, Scratch};
use crate::kernels::quant::{quantize_row, QKind, QMatrix, QRow};
use crate::kernels::{rms_norm, silu_mul, Rope};
use crate::kv_cache::KvCache;
use crate::tokenizer::Tokenizer;

type CResult<T> = Result<T, candle_core::Error>;

/// A linear layer in both forms: dense for the prompt path, quantized for the decode path.
struct Linear {
    dense: Tensor,
    quant: QMatrix,
}

impl Linear {
    fn out_dim(&self) -> usize {
        self.quant.rows
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wqkv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w_gate_up: Linear,
    w_down: Linear,
}

/// A loaded model: config, tokenizer, weights in the forms the two paths need.
pub struct Model {
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    path: PathBuf,
    embd: QMatrix,
    output_norm: Vec<f32>,
    lm_head: Linear,
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

fn dense_of(path: &Path, t: &RawTensor) -> Result<Tensor, GgufError> {
    let storage = QStorage::from_data(Cow::Borrowed(&t.data), &Device::Cpu, t.dtype)
        .map_err(|e| load_err(path, e))?;
    let q = QTensor::new(storage, t.dims.clone()).map_err(|e| load_err(path, e))?;
    q.dequantize(&Device::Cpu).map_err(|e| load_err(path, e))
}

fn quant_of(path: &Path, t: RawTensor, dense: &Tensor) -> Result<QMatrix, GgufError> {
    let (rows, cols) = (t.dims[0], t.dims[1]);
    Ok(match t.dtype {
        GgmlDType::Q4_1 => QMatrix::from_gguf(QKind::Q4_1, rows, cols, &t.data),
        GgmlDType::Q8_0 => QMatrix::from_gguf(QKind::Q8_0, rows, cols, &t.data),
        _ => QMatrix::from_f32(
            rows,
            cols,
            dense
                .flatten_all()
                .and_then(|d| d.to_vec1::<f32>())
                .map_err(|e| load_err(path, e))?,
        ),
    })
}

fn vec_of(path: &Path, t: &RawTensor) -> Result<Vec<f32>, GgufError> {
    dense_of(path, t)?
        .flatten_all()
        .and_then(|d| d.to_vec1::<f32>())
        .map_err(|e| load_err(path, e))
}

/// Loads several tensors as one linear layer stacked along output rows.
fn linear(g: &mut GgufFile, names: &[String], cols: usize, rows: &[usize]) -> Result<Linear, GgufError> {
    let path = g.path.clone();
    let mut denses = Vec::new();
    let mut quants = Vec::new();
    for (name, &r) in names.iter().zip(rows) {
        let t = g.take(name, &[r, cols])?;
        let d = dense_of(&path, &t)?;
        quants.push(quant_of(&path, t, &d)?);
        denses.push(d);
    }
    let dense = Tensor::cat(&denses, 0).map_err(|e| load_err(&path, e))?;
    let quant = match QMatrix::concat(quants) {
        Some(q) => q,
        // Mixed types: fall back to f32 rows for the decode path.
        None => QMatrix::from_f32(
            rows.iter().sum(),
            cols,
            dense
                .flatten_all()
                .and_then(|d| d.to_vec1::<f32>())
                .map_err(|e| load_err(&path, e))?,
        ),
    };
    // Transposed once, contiguous, so the prompt path's matmul reads `x · Wᵀ` directly.
    let dense = dense
        .t()
        .and_then(|t| t.contiguous())
        .map_err(|e| load_err(&path, e))?;
    Ok(Linear { dense, quant })
}

/// Which path a token takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path2 {
    Dense,
    Quant,
}

/// One request's slice of a step: `tokens` at positions `start..`, written into `table`.
pub(crate) struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    /// Positions below this are prompt tokens (dense path); the rest were generated.
    pub prompt_len: usize,
    pub table: &'a [u32],
    /// Whether to return logits for the last token of the chunk.
    pub logits: bool,
}

struct Row {
    seq: usize,
    pos: usize,
    path: Path2,
}

impl Model {
    pub fn load(path: &Path) -> Result<Self, GgufError> {
        let mut g = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let c = g.config.clone();
        let (d, kvd, ff) = (c.n_embd, c.n_head_kv * c.head_dim, c.n_ff);
        let embd_raw = g.take("token_embd.weight", &[c.vocab_size, d])?;
        let embd_dense = dense_of(path, &embd_raw)?;
        let lm_head = if g.tensors.contains_key("output.weight") {
            linear(&mut g, &["output.weight".into()], d, &[c.vocab_size])?
        } else {
            // Tied output head: the same matrix in both forms.
            let q = quant_of(path, RawTensor { dtype: embd_raw.dtype, dims: embd_raw.dims.clone(), data: embd_raw.data.clone() }, &embd_dense)?;
            Linear {
                dense: embd_dense
                    .t()
                    .and_then(|t| t.contiguous())
                    .map_err(|e| load_err(path, e))?,
                quant: q,
            }
        };
        let embd = quant_of(path, embd_raw, &embd_dense)?;
        drop(embd_dense);
        let output_norm = vec_of(path, &g.take("output_norm.weight", &[d])?)?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: vec_of(path, &g.take(&n("attn_norm"), &[d])?)?,
                wqkv: linear(&mut g, &[n("attn_q"), n("attn_k"), n("attn_v")], d, &[d, kvd, kvd])?,
                wo: linear(&mut g, &[n("attn_output")], d, &[d])?,
                ffn_norm: vec_of(path, &g.take(&n("ffn_norm"), &[d])?)?,
                w_gate_up: linear(&mut g, &[n("ffn_gate"), n("ffn_up")], d, &[ff, ff])?,
                w_down: linear(&mut g, &[n("ffn_down")], ff, &[d])?,
            });
        }
        let lin_bytes = |l: &Linear| l.quant.bytes() + l.dense.elem_count() * 4;
        let weight_bytes = embd.bytes()
            + lin_bytes(&lm_head)
            + layers
                .iter()
                .map(|l| lin_bytes(&l.wqkv) + lin_bytes(&l.wo) + lin_bytes(&l.w_gate_up) + lin_bytes(&l.w_down))
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

    /// Bytes held by weights in both forms.
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
        self.forward_inner(cache, chunks)
            .map_err(|e| EngineError::Internal(e.to_string()))
    }

    fn forward_inner(
        &self,
        cache: &mut KvCache,
        chunks: &[SeqChunk<'_>],
    ) -> CResult<Vec<Option<Vec<f32>>>> {
        let c = &self.config;
        let (d, hd, nh, nkv) = (c.n_embd, c.head_dim, c.n_head, c.n_head_kv);
        let kvd = nkv * hd;
        let mut rows = Vec::new();
        let mut h = Vec::new();
        for (si, ch) in chunks.iter().enumerate() {
            for (i, &tok) in ch.tokens.iter().enumerate() {
                let pos = ch.start + i;
                rows.push(Row {
                    seq: si,
                    pos,
                    path: if pos < ch.prompt_len { Path2::Dense } else { Path2::Quant },
                });
                let at = h.len();
                h.resize(at + d, 0.0);
                self.embd.dequantize_row(tok as usize, &mut h[at..]);
            }
        }
        let n = rows.len();
        let paths: Vec<Path2> = rows.iter().map(|r| r.path).collect();
        let mut xn = vec![0f32; n * d];
        let mut att = vec![0f32; n * d];
        let mut act = vec![0f32; n * c.n_ff];
        for (li, layer) in self.layers.iter().enumerate() {
            for r in 0..n {
                rms_norm(&h[r * d..(r + 1) * d], &layer.attn_norm, c.rms_eps, &mut xn[r * d..(r + 1) * d]);
            }
            let mut qkv = self.linear(&layer.wqkv, &xn, d, &paths)?;
            let w = d + 2 * kvd;
            for (r, row) in rows.iter().enumerate() {
                let x = &mut qkv[r * w..(r + 1) * w];
                self.rope.apply(&mut x[..d + kvd], row.pos);
                let (k, v) = x[d..].split_at(kvd);
                cache.write(li, chunks[row.seq].table, row.pos, k, v);
            }
            let cache_ref = &*cache;
            att.par_chunks_mut(d)
                .zip(rows.par_iter())
                .enumerate()
                .for_each_init(Scratch::new, |s, (r, (out, row))| {
                    let q = &qkv[r * w..r * w + d];
                    attend_row(cache_ref, li, chunks[row.seq].table, row.pos + 1, q, nh, out, s);
                });
            let o = self.linear(&layer.wo, &att, d, &paths)?;
            for (hv, ov) in h.iter_mut().zip(&o) {
                *hv += ov;
            }
            for r in 0..n {
                rms_norm(&h[r * d..(r + 1) * d], &layer.ffn_norm, c.rms_eps, &mut xn[r * d..(r + 1) * d]);
            }
            let gu = self.linear(&layer.w_gate_up, &xn, d, &paths)?;
            for r in 0..n {
                silu_mul(&gu[r * 2 * c.n_ff..(r + 1) * 2 * c.n_ff], &mut act[r * c.n_ff..(r + 1) * c.n_ff]);
            }
            let down = self.linear(&layer.w_down, &act, c.n_ff, &paths)?;
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
        let mut lpaths = Vec::with_capacity(want.len());
        for (i, &(_, r)) in want.iter().enumerate() {
            rms_norm(&h[r * d..(r + 1) * d], &self.output_norm, c.rms_eps, &mut xl[i * d..(i + 1) * d]);
            lpaths.push(paths[r]);
        }
        let logits = self.linear(&self.lm_head, &xl, d, &lpaths)?;
        let v = self.lm_head.out_dim();
        for (i, &(si, _)) in want.iter().enumerate() {
            out[si] = Some(logits[i * v..(i + 1) * v].to_vec());
        }
        Ok(out)
    }

    /// `x · Wᵀ` for every row, each row through its own path.
    fn linear(&self, lin: &Linear, x: &[f32], k: usize, paths: &[Path2]) -> CResult<Vec<f32>> {
        let n_out = lin.out_dim();
        let n = paths.len();
        let mut y = vec![0f32; n * n_out];
        let dense_rows: Vec<usize> = (0..n).filter(|&r| paths[r] == Path2::Dense).collect();
        let quant_rows: Vec<usize> = (0..n).filter(|&r| paths[r] == Path2::Quant).collect();
        if !dense_rows.is_empty() {
            let m = dense_rows.len();
            // A lone row is padded to two: candle's m = 1 kernel gives other bits.
            let m_eff = m.max(2);
            let mut buf = Vec::with_capacity(m_eff * k);
            for &r in &dense_rows {
                buf.extend_from_slice(&x[r * k..(r + 1) * k]);
            }
            if m == 1 {
                buf.extend_from_slice(&x[dense_rows[0] * k..(dense_rows[0] + 1) * k]);
            }
            let xt = Tensor::from_vec(buf, (m_eff, k), &Device::Cpu)?;
            let res = xt.matmul(&lin.dense)?.flatten_all()?.to_vec1::<f32>()?;
            for (i, &r) in dense_rows.iter().enumerate() {
                y[r * n_out..(r + 1) * n_out].copy_from_slice(&res[i * n_out..(i + 1) * n_out]);
            }
        }
        if !quant_rows.is_empty() {
            let m = quant_rows.len();
            let mut xf = Vec::new();
            let mut xq: Vec<QRow> = Vec::with_capacity(m);
            for &r in &quant_rows {
                let row = &x[r * k..(r + 1) * k];
                if lin.quant.kind == QKind::F32 {
                    xf.extend_from_slice(row);
                } else {
                    xq.push(quantize_row(row));
                }
            }
            if m == n {
                // Decode-only step: rows are already in order, write in place.
                lin.quant.matvec(&xf, &xq, m, &mut y);
                return Ok(y);
            }
            let mut res = vec![0f32; m * n_out];
            lin.quant.matvec(&xf, &xq, m, &mut res);
            for (i, &r) in quant_rows.iter().enumerate() {
                y[r * n_out..(r + 1) * n_out].copy_from_slice(&res[i * n_out..(i + 1) * n_out]);
            }
        }
        Ok(y)
    }
}
