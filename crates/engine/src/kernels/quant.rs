//! Quantized weights and the decode-path mat-vec.
//!
//! Activations are quantized per 32 values to 8 bits (like llama.cpp's Q8_1). A block's
//! integer products are summed in 8 lanes of 4 neighbours each; lane sums are exact integers,
//! so the SIMD and portable paths agree bit for bit as long as the float part (scale × lane
//! fused into the lane's accumulator block after block, then a fixed tree) is done in the
//! same order in all.

use half::f16;
use rayon::prelude::*;

pub(crate) const QK: usize = 32;

/// One row of activations quantized per 32 values to 8 bits: scales, `d * sum(q)` per block
/// (for the Q4_1 offset term), and the quants.
#[derive(Clone, Debug, Default)]
pub(crate) struct QRow {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
}

pub(crate) fn quantize_row(x: &[f32]) -> QRow {
    #[cfg(target_arch = "x86_64")]
    if Simd::detect() != Simd::Portable {
        // SAFETY: the CPU has AVX2 (every non-portable level includes it).
        return unsafe { avx2::quantize_row(x) };
    }
    quantize_row_portable(x)
}

fn quantize_row_portable(x: &[f32]) -> QRow {
    let nb = x.len() / QK;
    let mut r = QRow {
        d: Vec::with_capacity(nb),
        s: Vec::with_capacity(nb),
        qs: Vec::with_capacity(x.len()),
    };
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for &v in chunk {
            let q = (v * id).round() as i8;
            sum += q as i32;
            r.qs.push(q);
        }
        r.d.push(d);
        r.s.push(d * sum as f32);
    }
    r
}

/// Weight storage kinds the decode path runs on directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QKind {
    /// GGUF Q4_1, repacked per row as `[d: f32; nb][m: f32; nb][nibbles: 16 bytes; nb]`
    /// (low nibbles are values 0..16 of a block, high nibbles 16..32).
    Q4_1,
    /// GGUF Q8_0, repacked per row as `[d: f32; nb][q: i8; 32 * nb]`.
    Q8_0,
    /// Plain f32 rows (fallback for any other GGUF type, dequantized at load).
    F32,
}

impl QKind {
    fn row_bytes(self, cols: usize) -> usize {
        let nb = cols / QK;
        match self {
            QKind::Q4_1 => nb * (8 + 16),
            QKind::Q8_0 => nb * (4 + 32),
            QKind::F32 => 0,
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

/// A view of one repacked row.
struct RowQ<'a> {
    d: &'a [u8],
    m: &'a [u8],
    q: &'a [u8],
}

#[inline(always)]
fn f32_at(b: &[u8], i: usize) -> f32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[4 * i..4 * i + 4]);
    f32::from_le_bytes(x)
}

impl QMatrix {
    /// Takes GGUF blocks (Q4_1: 20-byte blocks, Q8_0: 34-byte blocks) and repacks them.
    pub fn from_gguf(kind: QKind, rows: usize, cols: usize, gguf: &[u8]) -> Self {
        let nb = cols / QK;
        let mut data = Vec::with_capacity(rows * kind.row_bytes(cols));
        let bsz = if kind == QKind::Q4_1 { 20 } else { 34 };
        for row in gguf.chunks_exact(nb * bsz).take(rows) {
            let blocks: Vec<&[u8]> = row.chunks_exact(bsz).collect();
            for b in &blocks {
                data.extend_from_slice(&f16::from_le_bytes([b[0], b[1]]).to_f32().to_le_bytes());
            }
            if kind == QKind::Q4_1 {
                for b in &blocks {
                    data.extend_from_slice(
                        &f16::from_le_bytes([b[2], b[3]]).to_f32().to_le_bytes(),
                    );
                }
                for b in &blocks {
                    data.extend_from_slice(&b[4..20]);
                }
            } else {
                for b in &blocks {
                    data.extend_from_slice(&b[2..34]);
                }
            }
        }
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

    /// The same matrix as f32 rows.
    pub fn to_f32(&self) -> QMatrix {
        let mut v = vec![0f32; self.rows * self.cols];
        for (r, out) in v.chunks_exact_mut(self.cols).enumerate() {
            self.dequantize_row(r, out);
        }
        QMatrix::from_f32(self.rows, self.cols, v)
    }

    /// Stacks matrices of one width along rows (as f32 rows if their kinds differ).
    pub fn concat(parts: Vec<QMatrix>) -> Option<QMatrix> {
        let kind = parts.first()?.kind;
        let cols = parts[0].cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        if parts.iter().any(|p| p.kind != kind) {
            return Self::concat(parts.iter().map(|p| p.to_f32()).collect());
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

    fn row(&self, r: usize) -> RowQ<'_> {
        let nb = self.cols / QK;
        let rb = self.kind.row_bytes(self.cols);
        let row = &self.data[r * rb..(r + 1) * rb];
        match self.kind {
            QKind::Q4_1 => RowQ {
                d: &row[..4 * nb],
                m: &row[4 * nb..8 * nb],
                q: &row[8 * nb..],
            },
            _ => RowQ {
                d: &row[..4 * nb],
                m: &[],
                q: &row[4 * nb..],
            },
        }
    }

    /// One row dequantized (used for the embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.kind == QKind::F32 {
            out.copy_from_slice(self.row_f32(r));
            return;
        }
        let w = self.row(r);
        for b in 0..self.cols / QK {
            let d = f32_at(w.d, b);
            match self.kind {
                QKind::Q4_1 => {
                    let m = f32_at(w.m, b);
                    let q = &w.q[b * 16..b * 16 + 16];
                    for j in 0..16 {
                        out[b * QK + j] = d * (q[j] & 0x0f) as f32 + m;
                        out[b * QK + 16 + j] = d * (q[j] >> 4) as f32 + m;
                    }
                }
                _ => {
                    for j in 0..QK {
                        out[b * QK + j] = d * (w.q[b * QK + j] as i8) as f32;
                    }
                }
            }
        }
    }

    /// `out[b][r] = dot(W[r], x[b])` for every batch row `b`; `out` is `batch × rows`.
    /// Quantized kinds take `xq` (rows quantized with [`quantize_row`]), F32 takes `xf`.
    pub fn matvec(&self, xf: &[f32], xq: &[QRow], batch: usize, out: &mut [f32]) {
        self.matvec_with(Simd::detect(), xf, xq, batch, out)
    }

    fn matvec_with(&self, simd: Simd, xf: &[f32], xq: &[QRow], batch: usize, out: &mut [f32]) {
        const CHUNK: usize = 64;
        let rows = self.rows;
        let ptr = SyncPtr(out.as_mut_ptr());
        let n_chunks = rows.div_ceil(CHUNK);
        (0..n_chunks).into_par_iter().for_each(|c| {
            let mut o = [0f32; 8];
            let (r0, r1) = (c * CHUNK, ((c + 1) * CHUNK).min(rows));
            // Activation groups outside, weight rows inside: a group of 8 quantized rows
            // stays in L1 while this task's weight rows stream past it.
            for b0 in (0..batch).step_by(8) {
                let n = (batch - b0).min(8);
                for r in r0..r1 {
                    match self.kind {
                        QKind::F32 => {
                            let wf = self.row_f32(r);
                            for (b, ob) in o[..n].iter_mut().enumerate() {
                                let x = &xf[(b0 + b) * self.cols..(b0 + b + 1) * self.cols];
                                *ob = super::dot_f32(wf, x);
                            }
                        }
                        kind => dot_rows(simd, kind, &self.row(r), &xq[b0..b0 + n], &mut o[..n]),
                    }
                    for (b, &v) in o[..n].iter().enumerate() {
                        // SAFETY: each (batch row, weight row) cell is written by exactly one
                        // task (the one owning weight row `r`), and `out` outlives the loop.
                        unsafe { *ptr.get().add((b0 + b) * rows + r) = v };
                    }
                }
            }
        });
    }
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Simd {
    pub fn detect() -> Self {
        use std::sync::OnceLock;
        static S: OnceLock<Simd> = OnceLock::new();
        *S.get_or_init(|| {
            let level = std::env::var("SPLITSERVE_SIMD").unwrap_or_default();
            #[cfg(target_arch = "x86_64")]
            {
                if level != "portable"
                    && level != "avx2"
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    return Simd::Avx512Vnni;
                }
                if level != "portable"
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                {
                    return Simd::Avx2;
                }
            }
            let _ = level;
            Simd::Portable
        })
    }

    /// The levels the kernels may run at here: the portable one and every level up to
    /// [`Simd::detect`]'s (a level needs every feature of the ones below it). Printed, so a
    /// test log says what was compared; `SPLITSERVE_REQUIRE_SIMD=avx2|avx512` fails the
    /// test where that level is missing (a CPU without it, or `SPLITSERVE_SIMD` set lower).
    #[cfg(test)]
    pub fn runnable() -> Vec<Simd> {
        let mut levels = vec![Simd::Portable];
        #[cfg(target_arch = "x86_64")]
        match Simd::detect() {
            Simd::Avx512Vnni => levels.extend([Simd::Avx2, Simd::Avx512Vnni]),
            Simd::Avx2 => levels.push(Simd::Avx2),
            Simd::Portable => {}
        }
        println!("SIMD levels compared: {levels:?}");
        #[cfg(target_arch = "x86_64")]
        let required = match std::env::var("SPLITSERVE_REQUIRE_SIMD").as_deref() {
            Ok("avx512") => Some(Simd::Avx512Vnni),
            Ok("avx2") => Some(Simd::Avx2),
            _ => None,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let required: Option<Simd> = None;
        if let Some(r) = required {
            assert!(
                levels.contains(&r),
                "SPLITSERVE_REQUIRE_SIMD asks for {r:?}, but only {levels:?} can run here"
            );
        }
        levels
    }
}

/// A tile of one weight row against 1 to 4 activation rows.
#[cfg(target_arch = "x86_64")]
type Tile = unsafe fn(&RowQ<'_>, &[QRow], &mut [f32]);

/// Tiles by kind (Q8_0, Q4_1) and activation rows (1 to 4): four rows' accumulators fit
/// in registers; more rows, or more weight rows per tile, spill.
#[cfg(target_arch = "x86_64")]
macro_rules! tiles {
    ($m:ident) => {
        [
            [
                $m::tile::<1, false>,
                $m::tile::<2, false>,
                $m::tile::<3, false>,
                $m::tile::<4, false>,
            ],
            [
                $m::tile::<1, true>,
                $m::tile::<2, true>,
                $m::tile::<3, true>,
                $m::tile::<4, true>,
            ],
        ]
    };
}
#[cfg(target_arch = "x86_64")]
const AVX2_TILES: [[Tile; 4]; 2] = tiles!(avx2);
#[cfg(target_arch = "x86_64")]
const AVX512_TILES: [[Tile; 4]; 2] = tiles!(avx512);

/// # Safety
/// The CPU has the instruction set of `tiles`.
#[cfg(target_arch = "x86_64")]
unsafe fn by_fours(
    tiles: &[[Tile; 4]; 2],
    kind: QKind,
    w: &RowQ<'_>,
    xq: &[QRow],
    out: &mut [f32],
) {
    for (o, x) in out.chunks_mut(4).zip(xq.chunks(4)) {
        tiles[usize::from(kind == QKind::Q4_1)][x.len() - 1](w, x, o);
    }
}

/// Canonical float order, shared by every implementation: per activation row, 16
/// accumulators; block `b`'s 8 lane sums (lane `j` = products of values `4j..4j+4`) go to
/// `acc[(b % 2) * 8 + j] = fma(d_w * d_x, lane, acc[(b % 2) * 8 + j])` (one rounding; a
/// fused multiply-add is one instruction where a multiply then an add are two); the result is
/// `reduce8(acc[..8]) + reduce8(acc[8..])`, plus, for Q4_1, `dot_f32(m_w, s_x)`.
fn dot_rows(simd: Simd, kind: QKind, w: &RowQ<'_>, xq: &[QRow], out: &mut [f32]) {
    match simd {
        // SAFETY (both arms): the caller picked the level from `Simd::detect` or after
        // checking the CPU has it.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512Vnni => unsafe { by_fours(&AVX512_TILES, kind, w, xq, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { by_fours(&AVX2_TILES, kind, w, xq, out) },
        Simd::Portable => {
            for (o, x) in out.iter_mut().zip(xq) {
                *o = dot_portable(kind, w, x);
            }
        }
    }
}

fn finish(acc: &[f32; 16], kind: QKind, w: &RowQ<'_>, x: &QRow) -> f32 {
    let mut lo = [0f32; 8];
    let mut hi = [0f32; 8];
    lo.copy_from_slice(&acc[..8]);
    hi.copy_from_slice(&acc[8..]);
    let main = super::reduce8(&lo) + super::reduce8(&hi);
    if kind == QKind::Q4_1 {
        // Same accumulation order as `dot_f32` (acc[i % 8], then the fixed tree).
        let mut acc8 = [0f32; 8];
        for (i, &sx) in x.s.iter().enumerate() {
            acc8[i % 8] += f32_at(w.m, i) * sx;
        }
        main + super::reduce8(&acc8)
    } else {
        main
    }
}

fn dot_portable(kind: QKind, w: &RowQ<'_>, x: &QRow) -> f32 {
    let mut acc = [0f32; 16];
    for b in 0..x.d.len() {
        let (dd, lanes) = block_lanes(kind, w, x, b);
        for (j, lane) in lanes.into_iter().enumerate() {
            let a = &mut acc[(b % 2) * 8 + j];
            *a = dd.mul_add(lane, *a);
        }
    }
    finish(&acc, kind, w, x)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QRow, RowQ, QK};
    use std::arch::x86_64::*;

    /// [`super::quantize_row_portable`], 32 values per step: the block's absolute maximum
    /// and scale are the same scalars, and `round` (half away from zero) is built from
    /// truncation, so every quant and sum is the same.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(x: &[f32]) -> QRow {
        let nb = x.len() / QK;
        let mut r = QRow {
            d: Vec::with_capacity(nb),
            s: Vec::with_capacity(nb),
            qs: vec![0i8; nb * QK],
        };
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5);
        let one = _mm256_set1_ps(1.0);
        for b in 0..nb {
            let p = x.as_ptr().add(b * QK);
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for vi in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let q: [__m256i; 4] = std::array::from_fn(|i| {
                let y = _mm256_mul_ps(v[i], id);
                let t = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(y, t));
                let up = _mm256_cmp_ps(frac, half, _CMP_GE_OQ);
                let step = _mm256_or_ps(_mm256_and_ps(y, sign), one);
                _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, step)))
            });
            let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let mut sl = [0i32; 8];
            _mm256_storeu_si256(sl.as_mut_ptr() as *mut __m256i, sum);
            let packed = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let ordered =
                _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(r.qs.as_mut_ptr().add(b * QK) as *mut __m256i, ordered);
            r.d.push(d);
            r.s.push(d * sl.iter().sum::<i32>() as f32);
        }
        r
    }

    /// Four [`super::super::reduce8`]s at once, lane `a` of the result for `v[a]`: each
    /// addition pairs the same two values as the scalar tree, so the same bits.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn reduce8x4(v: [__m256; 4]) -> __m128 {
        let h = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
    }

    /// The Q4_1 offset term `dot_f32(m_w, s_x)` as 8 lanes (lane `i % 8` for block `i`);
    /// the tail is a masked load, whose zero lanes add `+0.0` to lanes that are never `-0.0`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn offset_lanes(w: &RowQ<'_>, x: &QRow) -> __m256 {
        let (m, s, n) = (w.m.as_ptr() as *const f32, x.s.as_ptr(), x.s.len());
        let mut v = _mm256_setzero_ps();
        let mut c = 0;
        while c + 8 <= n {
            v = _mm256_add_ps(
                v,
                _mm256_mul_ps(_mm256_loadu_ps(m.add(c)), _mm256_loadu_ps(s.add(c))),
            );
            c += 8;
        }
        if c < n {
            let k = _mm256_set1_epi32((n - c) as i32);
            let mask = _mm256_cmpgt_epi32(k, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let mv = _mm256_maskload_ps(m.add(c), mask);
            let sv = _mm256_maskload_ps(s.add(c), mask);
            v = _mm256_add_ps(v, _mm256_mul_ps(mv, sv));
        }
        v
    }

    /// One weight row against `NA` (1 to 4) activation rows with every accumulator in a
    /// register, so each unpacked weight block feeds `NA` rows. Per output the float
    /// operations are the canonical ones, in the same order.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const NA: usize, const Q4: bool>(w: &RowQ<'_>, x: &[QRow], out: &mut [f32]) {
        // Blocks per segment of `d_w * d_x` products; even, so a block's parity is its
        // index's parity within the segment.
        const SEG: usize = 32;
        let nb = w.d.len() / 4;
        let wd = w.d.as_ptr() as *const f32;
        let wq = w.q.as_ptr();
        let mask = _mm_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let xq: [*const u8; NA] =
            std::array::from_fn(|a| x.get_unchecked(a).qs.as_ptr() as *const u8);
        let mut acc = [[_mm256_setzero_ps(); 2]; NA];
        let mut dd = [[0f32; SEG]; NA];
        let mut s0 = 0;
        while s0 < nb {
            let n = (nb - s0).min(SEG);
            // The block scale products, 8 at a time (a vector product has the scalar bits),
            // so the inner loop broadcasts each from memory instead of multiplying.
            for (a, dda) in dd.iter_mut().enumerate() {
                let xd = x.get_unchecked(a).d.as_ptr().add(s0);
                let wds = wd.add(s0);
                let mut j = 0;
                while j + 8 <= n {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(wds.add(j)), _mm256_loadu_ps(xd.add(j)));
                    _mm256_storeu_ps(dda.as_mut_ptr().add(j), v);
                    j += 8;
                }
                while j < n {
                    dda[j] = *wds.add(j) * *xd.add(j);
                    j += 1;
                }
            }
            let mut j = 0;
            while j < n {
                // Even block into slot 0, odd block into slot 1; `h` is a constant after
                // unrolling, so the accumulators stay in registers.
                #[allow(clippy::needless_range_loop)]
                for h in 0..2 {
                    let jj = j + h;
                    if jj >= n {
                        break;
                    }
                    let bb = s0 + jj;
                    let (wu, ws) = if Q4 {
                        let raw = _mm_loadu_si128(wq.add(bb * 16) as *const __m128i);
                        let lo = _mm_and_si128(raw, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                        (_mm256_set_m128i(hi, lo), _mm256_setzero_si256())
                    } else {
                        let ws = _mm256_loadu_si256(wq.add(bb * QK) as *const __m256i);
                        // maddubs wants its first operand unsigned: |w| times a with w's sign.
                        (_mm256_sign_epi8(ws, ws), ws)
                    };
                    for a in 0..NA {
                        let av = _mm256_loadu_si256(xq[a].add(bb * QK) as *const __m256i);
                        let xs = if Q4 { av } else { _mm256_sign_epi8(av, ws) };
                        let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(wu, xs), ones);
                        let d = _mm256_broadcast_ss(dd.get_unchecked(a).get_unchecked(jj));
                        acc[a][h] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(lanes), acc[a][h]);
                    }
                }
                j += 2;
            }
            s0 += SEG;
        }
        let z = _mm256_setzero_ps();
        let even = std::array::from_fn(|a| if a < NA { acc[a][0] } else { z });
        let odd = std::array::from_fn(|a| if a < NA { acc[a][1] } else { z });
        finish_tile::<NA, Q4>(even, odd, w, x, out);
    }

    /// A tile's outputs from its accumulators (even and odd blocks' lanes per activation
    /// row, zero past `NA`): the canonical `reduce8(even) + reduce8(odd)`, plus the Q4_1
    /// offset term, four outputs at once.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn finish_tile<const NA: usize, const Q4: bool>(
        even: [__m256; 4],
        odd: [__m256; 4],
        w: &RowQ<'_>,
        x: &[QRow],
        out: &mut [f32],
    ) {
        let z = _mm256_setzero_ps();
        let mut res = _mm_add_ps(reduce8x4(even), reduce8x4(odd));
        if Q4 {
            let m = std::array::from_fn(|a| {
                if a < NA {
                    offset_lanes(w, x.get_unchecked(a))
                } else {
                    z
                }
            });
            res = _mm_add_ps(res, reduce8x4(m));
        }
        let mut r = [0f32; 4];
        _mm_storeu_ps(r.as_mut_ptr(), res);
        out[..NA].copy_from_slice(&r[..NA]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::finish_tile;
    use super::{QKind, QRow, RowQ, QK};
    use std::arch::x86_64::*;

    /// [`super::avx2::tile`] two blocks per step: `vpdpbusd` gives a pair's 16 canonical
    /// lane sums at once, the low 8 lanes (even block) and the high 8 (odd block) being the
    /// two halves of the canonical accumulators. Per output the float operations are the
    /// canonical ones, in the same order.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub unsafe fn tile<const NA: usize, const Q4: bool>(w: &RowQ<'_>, x: &[QRow], out: &mut [f32]) {
        let nb = w.d.len() / 4;
        let nbe = nb - nb % 2;
        let wd = w.d.as_ptr() as *const f32;
        let wq = w.q.as_ptr();
        let mask = _mm512_set1_epi8(0x0f);
        // A pair's 32 Q4_1 bytes as 128-bit lanes [r0 r0 r1 r1]; the odd lanes shifted down
        // a nibble give [lo(b) hi(b) lo(b+1) hi(b+1)], the two blocks' 64 values in order.
        let shifts = _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4);
        let first = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let two = _mm512_set1_epi32(2);
        let xq: [*const u8; NA] =
            std::array::from_fn(|a| x.get_unchecked(a).qs.as_ptr() as *const u8);
        let mut acc = [_mm512_setzero_ps(); NA];
        let mut g = 0;
        while g < nbe {
            // 16 blocks' scale products stay in a register (a vector product has the scalar
            // bits); each pair's two are broadcast to lanes 0..8 and 8..16 from there.
            let n = (nbe - g).min(16);
            let m: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
            let wdv = _mm512_maskz_loadu_ps(m, wd.add(g));
            let dd: [__m512; NA] = std::array::from_fn(|a| {
                let xd = x.get_unchecked(a).d.as_ptr().add(g);
                _mm512_mul_ps(wdv, _mm512_maskz_loadu_ps(m, xd))
            });
            let mut pick = first;
            let mut j = 0;
            while j < n {
                let b = g + j;
                let (wu, neg) = if Q4 {
                    let raw = _mm512_castsi256_si512(_mm256_loadu_si256(
                        wq.add(b * 16) as *const __m256i
                    ));
                    let dup = _mm512_shuffle_i64x2(raw, raw, 0b01_01_00_00);
                    (_mm512_and_si512(_mm512_srlv_epi64(dup, shifts), mask), 0)
                } else {
                    let wv = _mm512_loadu_si512(wq.add(b * QK) as *const __m512i);
                    (_mm512_abs_epi8(wv), _mm512_movepi8_mask(wv))
                };
                for a in 0..NA {
                    let mut av = _mm512_loadu_si512(xq[a].add(b * QK) as *const __m512i);
                    if !Q4 {
                        av = _mm512_mask_sub_epi8(av, neg, _mm512_setzero_si512(), av);
                    }
                    let lanes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, av);
                    let d = _mm512_permutexvar_ps(pick, dd[a]);
                    acc[a] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lanes), acc[a]);
                }
                pick = _mm512_add_epi32(pick, two);
                j += 2;
            }
            g += 16;
        }
        let z = _mm256_setzero_ps();
        let mut even = [z; 4];
        let mut odd = [z; 4];
        for a in 0..NA {
            even[a] = _mm512_castps512_ps256(acc[a]);
            odd[a] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[a]), 1));
            if nb % 2 == 1 {
                // Odd tail block: its canonical slot is the even half.
                let (dd, lanes) =
                    super::block_lanes(kind_of::<Q4>(), w, x.get_unchecked(a), nb - 1);
                let (dd, lanes) = (_mm256_set1_ps(dd), _mm256_loadu_ps(lanes.as_ptr()));
                even[a] = _mm256_fmadd_ps(dd, lanes, even[a]);
            }
        }
        finish_tile::<NA, Q4>(even, odd, w, x, out);
    }

    fn kind_of<const Q4: bool>() -> QKind {
        if Q4 {
            QKind::Q4_1
        } else {
            QKind::Q8_0
        }
    }
}

/// One block's scale product `d_w * d_x` and its 8 integer lane sums (exact in f32), for
/// the portable path and the odd tail block of the SIMD paths.
fn block_lanes(kind: QKind, w: &RowQ<'_>, x: &QRow, b: usize) -> (f32, [f32; 8]) {
    let dd = f32_at(w.d, b) * x.d[b];
    let a = &x.qs[b * QK..(b + 1) * QK];
    let mut out = [0f32; 8];
    for (j, o) in out.iter_mut().enumerate() {
        let mut lane = 0i32;
        for e in 4 * j..4 * j + 4 {
            let wq = match kind {
                QKind::Q4_1 => {
                    let q = &w.q[b * 16..b * 16 + 16];
                    (if e < 16 { q[e] & 0x0f } else { q[e - 16] >> 4 }) as i32
                }
                _ => (w.q[b * QK + e] as i8) as i32,
            };
            lane += wq * a[e] as i32;
        }
        *o = lane as f32;
    }
    (dd, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    fn weights(kind: QKind, rows: usize, cols: usize) -> QMatrix {
        let bsz = if kind == QKind::Q4_1 { 20 } else { 34 };
        let mut data = random_bytes(rows * cols / QK * bsz, 7);
        // Sane f16 scales (random bytes could make NaN/inf).
        for (i, blk) in data.chunks_exact_mut(bsz).enumerate() {
            blk[0..2].copy_from_slice(&f16::from_f32(0.013 + i as f32 * 1e-4).to_le_bytes());
            if kind == QKind::Q4_1 {
                blk[2..4].copy_from_slice(&f16::from_f32(-0.1).to_le_bytes());
            }
        }
        QMatrix::from_gguf(kind, rows, cols, &data)
    }

    fn acts(batch: usize, cols: usize) -> (Vec<Vec<f32>>, Vec<QRow>) {
        let xs: Vec<Vec<f32>> = (0..batch)
            .map(|b| {
                (0..cols)
                    .map(|i| ((i * 31 + b * 17) % 97) as f32 / 13.0 - 3.5)
                    .collect()
            })
            .collect();
        let xq = xs.iter().map(|x| quantize_row(x)).collect();
        (xs, xq)
    }

    /// Every SIMD level and the portable path agree bit for bit (odd block counts included),
    /// so that engines on CPUs with different instruction sets compute the same logits.
    #[test]
    fn simd_and_portable_agree_bitwise() {
        let levels = Simd::runnable();
        // 608: a full group of 16 blocks, a masked one of 2, and an odd tail block.
        for cols in [576, 1536, 96, 608] {
            let (xs, xq) = acts(11, cols);
            for kind in [QKind::Q4_1, QKind::Q8_0] {
                let w = weights(kind, 5, cols);
                for r in 0..5 {
                    let mut results = Vec::new();
                    for &lv in &levels {
                        let mut o = [0f32; 11];
                        for (og, xg) in o.chunks_mut(8).zip(xq.chunks(8)) {
                            dot_rows(lv, kind, &w.row(r), xg, og);
                        }
                        results.push(o.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                    }
                    for (lv, res) in levels.iter().zip(&results) {
                        assert_eq!(res, &results[0], "{kind:?} cols {cols} row {r} {lv:?}");
                    }
                    // And the quantized dot is close to the exact one: the activations'
                    // 8-bit rounding errs by a small share of the terms' magnitude (the sum
                    // itself may cancel to near zero).
                    let mut deq = vec![0f32; cols];
                    w.dequantize_row(r, &mut deq);
                    let exact: f32 = deq.iter().zip(&xs[0]).map(|(a, b)| a * b).sum();
                    let size: f32 = deq.iter().zip(&xs[0]).map(|(a, b)| (a * b).abs()).sum();
                    let got = f32::from_bits(results[0][0]);
                    assert!(
                        (exact - got).abs() < 0.01 * size.max(1.0),
                        "{exact} vs {got} (terms' magnitude {size})"
                    );
                }
            }
        }
    }

    /// The AVX2 quantizer gives the portable quants, scales and sums, ties included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn quantize_avx2_matches_portable() {
        let _ = Simd::runnable();
        if !is_x86_feature_detected!("avx2") {
            println!("no AVX2 here: nothing to compare");
            return;
        }
        let mut x: Vec<f32> = (0..576)
            .map(|i| ((i * 53 % 211) as f32 - 105.0) / 7.3)
            .collect();
        // Exact halves after scaling: amax 127 makes id 1.
        x[..32].copy_from_slice(&std::array::from_fn::<f32, 32, _>(|i| i as f32 - 15.5));
        x[31] = 127.0;
        x[32..64].fill(0.0);
        let (a, b) = (quantize_row_portable(&x), unsafe { avx2::quantize_row(&x) });
        assert_eq!(a.qs, b.qs);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.d), bits(&b.d));
        assert_eq!(bits(&a.s), bits(&b.s));
    }

    /// The whole mat-vec (tiles, remainders, odd block counts, every batch size) agrees
    /// with the portable path bit for bit at every SIMD level this CPU has.
    #[test]
    fn matvec_levels_agree_bitwise() {
        let levels = Simd::runnable();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (cols, rows) in [(96, 70), (576, 67)] {
            for kind in [QKind::Q4_1, QKind::Q8_0] {
                let w = weights(kind, rows, cols);
                for batch in 1..=9 {
                    let (_, xq) = acts(batch, cols);
                    let mut want = vec![0f32; batch * rows];
                    w.matvec_with(Simd::Portable, &[], &xq, batch, &mut want);
                    for &lv in &levels {
                        let mut got = vec![0f32; batch * rows];
                        w.matvec_with(lv, &[], &xq, batch, &mut got);
                        assert_eq!(bits(&got), bits(&want), "{kind:?} {cols} b={batch} {lv:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn matvec_is_batch_invariant() {
        let cols = 64;
        let w = weights(QKind::Q4_1, 70, cols);
        let (_, all) = acts(9, cols);
        let mut batched = vec![0f32; 9 * 70];
        w.matvec(&[], &all, 9, &mut batched);
        for b in 0..9 {
            let mut one = vec![0f32; 70];
            w.matvec(&[], &all[b..b + 1], 1, &mut one);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one), bits(&batched[b * 70..(b + 1) * 70]));
        }
    }
}
