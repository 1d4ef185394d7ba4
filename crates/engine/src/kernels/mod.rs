//! CPU kernels of our own: the quantized mat-mul of the linear layers, f32 helpers shared by
//! every path, and the paged attention.
//!
//! Every reduction here has a fixed order that does not depend on how many rows are in the
//! batch, which thread runs them, or which SIMD level the CPU has: that is what keeps a
//! request's logits bit-identical across batching, chunking and machines.

pub(crate) mod attention;
pub(crate) mod quant;

/// Sum of `a[i] * b[i]` with 8 interleaved accumulators reduced in a fixed tree.
#[inline]
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    for i in chunks * 8..a.len() {
        acc[i % 8] += a[i] * b[i];
    }
    reduce8(&acc)
}

#[inline]
pub(crate) fn reduce8(acc: &[f32; 8]) -> f32 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// RMS norm of one row into `out`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let scale = rms_scale(x, eps);
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = (xi * scale) * wi;
    }
}

/// [`rms_norm`] of a row in place (the same operations, so the same bits).
pub(crate) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let scale = rms_scale(x, eps);
    for (xi, &wi) in x.iter_mut().zip(w) {
        *xi = (*xi * scale) * wi;
    }
}

fn rms_scale(x: &[f32], eps: f32) -> f32 {
    1.0 / ((dot_f32(x, x) / x.len() as f32) + eps).sqrt()
}

/// `silu(gate) * up` for one row whose first half is gate and second half up (the
/// exponential is the attention's, vectorized to the same bits).
pub(crate) fn silu_mul(gate_up: &[f32], out: &mut [f32]) {
    let (g, u) = gate_up.split_at(out.len());
    attention::silu_mul(g, u, out);
}

/// `gelu(gate) * up` for one row whose first half is gate and second half up (GELU's tanh
/// form, through the same exponential as [`silu_mul`]).
pub(crate) fn gelu_mul(gate_up: &[f32], out: &mut [f32]) {
    let (g, u) = gate_up.split_at(out.len());
    attention::gelu_mul(g, u, out);
}

/// Rotary embedding table. Pairs are interleaved as GGML's "normal" RoPE (llama GGUFs), or
/// halves as its NeoX RoPE (`neox`: value `i` pairs with `i + head_dim / 2`; Gemma).
pub(crate) struct Rope {
    half: usize,
    neox: bool,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, base: f32, max_pos: usize, neox: bool) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let theta = (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
                let a = p as f64 * theta;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Self {
            half,
            neox,
            cos,
            sin,
        }
    }

    pub fn max_pos(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates every head in `x` (`n_heads * head_dim` values) in place for position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let c = &self.cos[pos * self.half..(pos + 1) * self.half];
        let s = &self.sin[pos * self.half..(pos + 1) * self.half];
        for head in x.chunks_exact_mut(self.half * 2) {
            for i in 0..self.half {
                let (ia, ib) = if self.neox {
                    (i, i + self.half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * c[i] - b * s[i];
                head[ib] = a * s[i] + b * c[i];
            }
        }
    }
}
