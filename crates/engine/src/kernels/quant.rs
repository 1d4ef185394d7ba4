//! Quantized weights and the decode-path mat-vec.
//!
//! Activations are quantized per 32 values to 8 bits (like llama.cpp's Q8_1). A block's
//! integer products are summed in 8 lanes of 4 neighbours each; lane sums are exact integers,
//! so the AVX2 and portable paths agree bit for bit as long as the float part (scale × lane,
//! added lane-wise block after block, then a fixed tree) is done in the same order in both.

use half::f16;
use rayon::prelude::*;

pub(crate) const QK: usize = 32;

/// One quantized block of activations.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BlockQ8 {
    pub d: f32,
    /// `d * sum(qs)`, for the Q4_1 offset term.
    pub s: f32,
    pub qs: [i8; QK],
}

pub(crate) fn quantize_row(x: &[f32], out: &mut Vec<BlockQ8>) {
    out.clear();
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut b = BlockQ8 {
            d,
            ..Default::default()
        };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(chunk) {
            *q = (v * id).round() as i8;
            sum += *q as i32;
        }
        b.s = d * sum as f32;
        out.push(b);
    }
}

/// Weight storage kinds the decode path runs on directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QKind {
    /// 20-byte blocks: f16 d, f16 m, 16 bytes of nibbles (low = 0..16, high = 16..32).
    Q4_1,
    /// 34-byte blocks: f16 d, 32 i8.
    Q8_0,
    /// Plain f32 rows (fallback for any other GGUF type, dequantized at load).
    F32,
}

impl QKind {
    fn row_bytes(self, cols: usize) -> usize {
        match self {
            QKind::Q4_1 => cols / QK * 20,
            QKind::Q8_0 => cols / QK * 34,
            QKind::F32 => cols * 4,
        }
    }
}

/// A weight matrix `rows × cols` (one output feature per row) for the decode path.
pub(crate) struct QMatrix {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    data: Vec<u8>,
    /// Rows of the F32 kind (kept typed so they are aligned).
    dataf: Vec<f32>,
}

impl QMatrix {
    pub fn new(kind: QKind, rows: usize, cols: usize, data: Vec<u8>) -> Self {
        debug_assert!(kind != QKind::F32);
        debug_assert_eq!(data.len(), rows * kind.row_bytes(cols));
        Self {
            kind,
            rows,
            cols,
            data,
            dataf: Vec::new(),
        }
    }

    pub fn from_f32(rows: usize, cols: usize, v: Vec<f32>) -> Self {
        Self {
            kind: QKind::F32,
            rows,
            cols,
            data: Vec::new(),
            dataf: v,
        }
    }

    /// Stacks matrices of one kind and width along rows.
    pub fn concat(parts: Vec<QMatrix>) -> Option<QMatrix> {
        let kind = parts.first()?.kind;
        let cols = parts[0].cols;
        if parts.iter().any(|p| p.kind != kind || p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::new();
        let mut dataf = Vec::new();
        for p in parts {
            data.extend_from_slice(&p.data);
            dataf.extend_from_slice(&p.dataf);
        }
        Some(Self {
            kind,
            rows,
            cols,
            data,
            dataf,
        })
    }

    pub fn bytes(&self) -> usize {
        self.data.len() + self.dataf.len() * 4
    }

    fn row_f32(&self, r: usize) -> &[f32] {
        &self.dataf[r * self.cols..(r + 1) * self.cols]
    }

    fn row(&self, r: usize) -> &[u8] {
        let rb = self.kind.row_bytes(self.cols);
        &self.data[r * rb..(r + 1) * rb]
    }

    /// One row dequantized (used for the embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.kind == QKind::F32 {
            out.copy_from_slice(self.row_f32(r));
            return;
        }
        let row = self.row(r);
        match self.kind {
            QKind::Q4_1 => {
                for (b, blk) in row.chunks_exact(20).enumerate() {
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    for j in 0..16 {
                        out[b * QK + j] = d * (blk[4 + j] & 0x0f) as f32 + m;
                        out[b * QK + 16 + j] = d * (blk[4 + j] >> 4) as f32 + m;
                    }
                }
            }
            QKind::Q8_0 => {
                for (b, blk) in row.chunks_exact(34).enumerate() {
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    for j in 0..QK {
                        out[b * QK + j] = d * (blk[2 + j] as i8) as f32;
                    }
                }
            }
            QKind::F32 => {}
        }
    }

    /// `out[b][r] = dot(W[r], x[b])` for every batch row `b`; `out` is `batch × rows`.
    /// Quantized kinds take `xq` (each row quantized with [`quantize_row`]), F32 takes `xf`.
    pub fn matvec(&self, xf: &[f32], xq: &[Vec<BlockQ8>], batch: usize, out: &mut [f32]) {
        const CHUNK: usize = 32;
        let simd = Simd::detect();
        // Feature-major scratch so that each parallel task owns a contiguous slice.
        let mut tmp = vec![0f32; self.rows * batch];
        tmp.par_chunks_mut(CHUNK * batch)
            .enumerate()
            .for_each(|(c, dst)| {
                let r0 = c * CHUNK;
                for (i, o) in dst.chunks_exact_mut(batch).enumerate() {
                    match self.kind {
                        QKind::Q4_1 => dot_q4_1_rows(simd, self.row(r0 + i), xq, o),
                        QKind::Q8_0 => dot_q8_0_rows(simd, self.row(r0 + i), xq, o),
                        QKind::F32 => {
                            let wf = self.row_f32(r0 + i);
                            for (b, ob) in o.iter_mut().enumerate() {
                                *ob = super::dot_f32(wf, &xf[b * self.cols..(b + 1) * self.cols]);
                            }
                        }
                    }
                }
            });
        for b in 0..batch {
            for r in 0..self.rows {
                out[b * self.rows + r] = tmp[r * batch + b];
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Simd {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("SPLITSERVE_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return Simd::Avx2;
            }
        }
        Simd::Portable
    }
}

#[inline]
fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

pub(crate) fn dot_q4_1_rows(simd: Simd, w: &[u8], xq: &[Vec<BlockQ8>], out: &mut [f32]) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::dot_q4_1_rows(w, xq, out) },
        Simd::Portable => {
            for (o, x) in out.iter_mut().zip(xq) {
                *o = dot_q4_1_portable(w, x);
            }
        }
    }
}

pub(crate) fn dot_q8_0_rows(simd: Simd, w: &[u8], xq: &[Vec<BlockQ8>], out: &mut [f32]) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::dot_q8_0_rows(w, xq, out) },
        Simd::Portable => {
            for (o, x) in out.iter_mut().zip(xq) {
                *o = dot_q8_0_portable(w, x);
            }
        }
    }
}

fn dot_q4_1_portable(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = [0f32; 8];
    let mut sm = 0f32;
    for (blk, a) in w.chunks_exact(20).zip(x) {
        let dd = half_at(blk, 0) * a.d;
        let m = half_at(blk, 2);
        let q = &blk[4..20];
        for (j, accj) in acc.iter_mut().enumerate() {
            let mut lane = 0i32;
            for e in 4 * j..4 * j + 4 {
                let wq = if e < 16 { q[e] & 0x0f } else { q[e - 16] >> 4 };
                lane += wq as i32 * a.qs[e] as i32;
            }
            *accj += dd * lane as f32;
        }
        sm += m * a.s;
    }
    super::reduce8(&acc) + sm
}

fn dot_q8_0_portable(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut acc = [0f32; 8];
    for (blk, a) in w.chunks_exact(34).zip(x) {
        let dd = half_at(blk, 0) * a.d;
        for (j, accj) in acc.iter_mut().enumerate() {
            let mut lane = 0i32;
            for e in 4 * j..4 * j + 4 {
                lane += (blk[2 + e] as i8) as i32 * a.qs[e] as i32;
            }
            *accj += dd * lane as f32;
        }
    }
    super::reduce8(&acc)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{half_at, BlockQ8};
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn reduce(acc: __m256) -> f32 {
        let mut a = [0f32; 8];
        _mm256_storeu_ps(a.as_mut_ptr(), acc);
        super::super::reduce8(&a)
    }

    /// Rows of activations are processed four at a time so the unpacked weight block is
    /// reused from registers; per row the float order is that of the portable path.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1_rows(w: &[u8], xq: &[Vec<BlockQ8>], out: &mut [f32]) {
        let mask = _mm_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let nb = w.len() / 20;
        for (og, xg) in out.chunks_mut(4).zip(xq.chunks(4)) {
            let n = xg.len();
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut sm = [0f32; 4];
            for b in 0..nb {
                let blk = &w[b * 20..b * 20 + 20];
                let d = half_at(blk, 0);
                let m = half_at(blk, 2);
                let raw = _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i);
                let lo = _mm_and_si128(raw, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                let wv = _mm256_set_m128i(hi, lo);
                for r in 0..n {
                    let a = &xg[r][b];
                    let av = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, av), ones);
                    let dd = _mm256_set1_ps(d * a.d);
                    acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(lanes)));
                    sm[r] += m * a.s;
                }
            }
            for r in 0..n {
                og[r] = reduce(acc[r]) + sm[r];
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8_0_rows(w: &[u8], xq: &[Vec<BlockQ8>], out: &mut [f32]) {
        let ones = _mm256_set1_epi16(1);
        let nb = w.len() / 34;
        for (og, xg) in out.chunks_mut(4).zip(xq.chunks(4)) {
            let n = xg.len();
            let mut acc = [_mm256_setzero_ps(); 4];
            for b in 0..nb {
                let blk = &w[b * 34..b * 34 + 34];
                let d = half_at(blk, 0);
                let wv = _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i);
                let wabs = _mm256_sign_epi8(wv, wv);
                for r in 0..n {
                    let a = &xg[r][b];
                    let av = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
                    // |w| * (a with w's sign): maddubs needs its first operand unsigned.
                    let sa = _mm256_sign_epi8(av, wv);
                    let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, sa), ones);
                    let dd = _mm256_set1_ps(d * a.d);
                    acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(dd, _mm256_cvtepi32_ps(lanes)));
                }
            }
            for r in 0..n {
                og[r] = reduce(acc[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    fn weights(kind: QKind, rows: usize, cols: usize) -> QMatrix {
        let rb = kind.row_bytes(cols);
        let mut data = random_bytes(rows * rb, 7);
        let bsz = if kind == QKind::Q4_1 { 20 } else { 34 };
        // Sane f16 scales (random bytes could make NaN/inf).
        for blk in data.chunks_exact_mut(bsz) {
            blk[0..2].copy_from_slice(&f16::from_f32(0.013).to_le_bytes());
            if kind == QKind::Q4_1 {
                blk[2..4].copy_from_slice(&f16::from_f32(-0.1).to_le_bytes());
            }
        }
        QMatrix::new(kind, rows, cols, data)
    }

    /// The SIMD and portable kernels must agree bit for bit, so that engines on CPUs with
    /// different instruction sets compute the same logits.
    #[test]
    fn simd_and_portable_agree_bitwise() {
        let cols = 576;
        let xs: Vec<Vec<f32>> = (0..7)
            .map(|b| {
                (0..cols)
                    .map(|i| ((i * 31 + b * 17) % 97) as f32 / 13.0 - 3.5)
                    .collect()
            })
            .collect();
        let xq: Vec<Vec<BlockQ8>> = xs
            .iter()
            .map(|x| {
                let mut q = Vec::new();
                quantize_row(x, &mut q);
                q
            })
            .collect();
        for kind in [QKind::Q4_1, QKind::Q8_0] {
            let w = weights(kind, 5, cols);
            for r in 0..5 {
                let row = w.row(r);
                let mut simd = vec![0f32; 7];
                let mut port = vec![0f32; 7];
                match kind {
                    QKind::Q4_1 => {
                        dot_q4_1_rows(Simd::detect(), row, &xq, &mut simd);
                        dot_q4_1_rows(Simd::Portable, row, &xq, &mut port);
                    }
                    _ => {
                        dot_q8_0_rows(Simd::detect(), row, &xq, &mut simd);
                        dot_q8_0_rows(Simd::Portable, row, &xq, &mut port);
                    }
                }
                let sb: Vec<u32> = simd.iter().map(|v| v.to_bits()).collect();
                let pb: Vec<u32> = port.iter().map(|v| v.to_bits()).collect();
                assert_eq!(sb, pb, "{kind:?} row {r}");
                // And the quantized dot is close to the exact one.
                let mut deq = vec![0f32; cols];
                w.dequantize_row(r, &mut deq);
                let exact: f32 = deq.iter().zip(&xs[0]).map(|(a, b)| a * b).sum();
                assert!((exact - port[0]).abs() < 0.05 * exact.abs().max(1.0));
            }
        }
    }

    #[test]
    fn matvec_is_batch_invariant() {
        let cols = 64;
        let w = weights(QKind::Q4_1, 70, cols);
        let rows: Vec<Vec<f32>> = (0..9)
            .map(|b| (0..cols).map(|i| ((i + b) as f32).sin()).collect())
            .collect();
        let q = |x: &Vec<f32>| {
            let mut v = Vec::new();
            quantize_row(x, &mut v);
            v
        };
        let all: Vec<Vec<BlockQ8>> = rows.iter().map(q).collect();
        let mut batched = vec![0f32; 9 * 70];
        w.matvec(&[], &all, 9, &mut batched);
        for b in 0..9 {
            let mut one = vec![0f32; 70];
            w.matvec(&[], &all[b..b + 1], 1, &mut one);
            assert_eq!(
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                batched[b * 70..(b + 1) * 70]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            );
        }
    }
}
