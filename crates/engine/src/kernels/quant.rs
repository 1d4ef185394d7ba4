//! Quantized weights and the mat-mul of the linear layers (prefill and decode alike).
//!
//! Activations are quantized per 32 values to 8 bits (like llama.cpp's Q8_1). Weights are
//! repacked at load into panels of [`P`] rows, block by block, so that one vector holds the
//! same 4 values of 16 rows: a block's integer dot products for 16 rows come from 8 `vpdpbusd`
//! against an activation's 4 bytes broadcast, and its scales are applied once per block, not
//! once per 4 values.
//!
//! The canonical order, the same in every implementation (SIMD or portable) and so the same
//! bits: for output (weight row `r`, activation row `a`), block by block in order, the block's
//! integer dot product `i` (exact in `i32`, and in `f32`: at most 32·127·128) is fused into one
//! accumulator, `acc = fma(d_w[r][b] * d_x[a][b], i as f32, acc)`; Q4_1 also accumulates its
//! offset term `off = fma(m_w[r][b], s_x[a][b], off)`, and the output is `acc + off`. How rows
//! are grouped into tiles and threads changes what is computed together, never this order.

use half::f16;
use rayon::prelude::*;

pub(crate) const QK: usize = 32;

/// One row of activations quantized per 32 values to 8 bits: scales, `d * sum(q)` per block
/// (for the Q4_1 offset term), the quants, and the quants offset by 128 (unsigned, for
/// `vpdpbusd` against signed Q8_0 weights).
#[derive(Clone, Debug, Default)]
pub(crate) struct QRow {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
    pub qu: Vec<u8>,
}

/// `x` quantized for a matrix of `kind` (only Q8_0 needs the offset quants).
pub(crate) fn quantize_row(x: &[f32], kind: QKind) -> QRow {
    #[cfg(target_arch = "x86_64")]
    let r = match Simd::detect() {
        // SAFETY: the level was detected on this CPU.
        Simd::Avx512Vnni => unsafe { avx512::quantize_row(x) },
        // SAFETY: as above.
        Simd::Avx2 => unsafe { avx2::quantize_row(x) },
        Simd::Portable => quantize_row_portable(x),
    };
    #[cfg(not(target_arch = "x86_64"))]
    let r = quantize_row_portable(x);
    if kind.offset_acts() {
        with_offset(r)
    } else {
        r
    }
}

impl QRow {
    /// Room for `nb` blocks' scales and sums, and their quants zeroed (SIMD paths store them).
    fn for_blocks(nb: usize) -> Self {
        Self {
            d: Vec::with_capacity(nb),
            s: Vec::with_capacity(nb),
            qs: vec![0i8; nb * QK],
            qu: Vec::new(),
        }
    }
}

fn with_offset(mut r: QRow) -> QRow {
    r.qu = r.qs.iter().map(|&q| q as u8 ^ 0x80).collect();
    r
}

fn quantize_row_portable(x: &[f32]) -> QRow {
    let nb = x.len() / QK;
    let mut r = QRow {
        d: Vec::with_capacity(nb),
        s: Vec::with_capacity(nb),
        qs: Vec::with_capacity(x.len()),
        qu: Vec::new(),
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

/// Rows per panel: one 512-bit vector of `i32` or `f32`, one per row.
pub(crate) const P: usize = 16;

/// Weight storage kinds the linear layers run on directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QKind {
    /// GGUF Q4_1. A panel block is `[d: f32; 16][m: f32; 16]` then, for each pair of
    /// 4-value groups `(2p, 2p + 1)`, 16 rows × 4 bytes whose low nibbles are group `2p`'s
    /// values and high nibbles group `2p + 1`'s: 384 bytes for 16 × 32 weights.
    Q4_1,
    /// GGUF Q8_0 (and Q4_0, Q5_0). A panel block is `[d: f16; 16][s: i16; 16]` (the
    /// GGUF's own f16 scales, and `s = Σ q`: `-128 · s` lets the unsigned-by-signed
    /// `vpdpbusd` take the activations offset by 128), then for each 4-value group 16 rows ×
    /// 4 bytes: 576 bytes for 16 × 32 weights.
    Q8_0,
    /// 8-bit quants with a scale per 16 values (GGUF Q6_K's sub-blocks). A panel block is
    /// `[d: f32; 16][d2: f32; 16][c: i32; 16][c2: i32; 16]` (`d`, `c` for values 0..16,
    /// `d2`, `c2` for 16..32), then the quants as in Q8_0: 768 bytes for 16 × 32 weights.
    /// Each half's integer dot product is fused on its own, first half first.
    Q8Halves,
    /// 8-bit unsigned quants with a scale and an offset per 32 values (GGUF Q5_1 and Q5_K,
    /// 0 to 31). A panel block is `[d: f32; 16][m: f32; 16]`, then the quants as in Q8_0:
    /// 640 bytes for 16 × 32 weights. The float operations are Q4_1's.
    U8,
    /// Plain f32 rows (the slow path, only when the loader is told to allow it).
    F32,
}

impl QKind {
    /// Bytes of one panel block.
    const fn block_bytes(self) -> usize {
        self.header() + self.quant_bytes()
    }

    /// Bytes of a panel block's scales, before its quants.
    const fn header(self) -> usize {
        match self {
            QKind::Q8_0 => 64,
            QKind::Q4_1 | QKind::U8 => 128,
            QKind::Q8Halves => 256,
            QKind::F32 => 0,
        }
    }

    const fn quant_bytes(self) -> usize {
        match self {
            QKind::Q4_1 => 256,
            QKind::Q8_0 | QKind::Q8Halves | QKind::U8 => 512,
            QKind::F32 => 0,
        }
    }

    /// Whether activations for this kind carry quants offset by 128 (signed 8-bit weights
    /// against `vpdpbusd`'s unsigned first factor).
    pub(crate) fn offset_acts(self) -> bool {
        matches!(self, QKind::Q8_0 | QKind::Q8Halves)
    }

    /// The tile kernels' index for this kind.
    fn tile_index(self) -> usize {
        match self {
            QKind::Q8_0 | QKind::F32 => 0,
            QKind::Q4_1 => 1,
            QKind::Q8Halves => 2,
            QKind::U8 => 3,
        }
    }

    /// Whether the weights are unsigned with an offset term (Q4_1's float operations).
    fn has_offset(self) -> bool {
        matches!(self, QKind::Q4_1 | QKind::U8)
    }
}

/// The GGUF block types the loader repacks into panels, each exactly (every weight keeps
/// its value): Q4_0, Q5_0 and Q8_0 become [`QKind::Q8_0`]; Q4_1 and Q4_K (a 32-value
/// sub-block's scale `d·sc` and offset `-dmin·m` are exact in f32) become [`QKind::Q4_1`];
/// Q6_K becomes [`QKind::Q8Halves`]; Q5_1 and Q5_K become [`QKind::U8`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GgufBlocks {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
    Q4K,
    Q6K,
    Q5_1,
    Q5K,
}

impl GgufBlocks {
    /// The panel kind these blocks become.
    pub(crate) fn kind(self) -> QKind {
        match self {
            GgufBlocks::Q4_0 | GgufBlocks::Q5_0 | GgufBlocks::Q8_0 => QKind::Q8_0,
            GgufBlocks::Q4_1 | GgufBlocks::Q4K => QKind::Q4_1,
            GgufBlocks::Q6K => QKind::Q8Halves,
            GgufBlocks::Q5_1 | GgufBlocks::Q5K => QKind::U8,
        }
    }

    /// Values and bytes of one GGUF block.
    pub(crate) fn values_and_bytes(self) -> (usize, usize) {
        match self {
            GgufBlocks::Q4_0 => (32, 18),
            GgufBlocks::Q4_1 => (32, 20),
            GgufBlocks::Q5_0 => (32, 22),
            GgufBlocks::Q8_0 => (32, 34),
            GgufBlocks::Q4K => (256, 144),
            GgufBlocks::Q6K => (256, 210),
            GgufBlocks::Q5_1 => (32, 24),
            GgufBlocks::Q5K => (256, 176),
        }
    }

    /// Our 32-value block `b` of the row whose GGUF blocks are `row`.
    fn block(self, row: &[u8], b: usize) -> Block {
        let (vals, bytes) = self.values_and_bytes();
        let at = b * QK / vals;
        let g = &row[at * bytes..(at + 1) * bytes];
        let h = |i: usize| f16::from_le_bytes([g[i], g[i + 1]]).to_f32();
        match self {
            GgufBlocks::Q4_0 => Block::signed(h(0), |v| {
                let q = if v < 16 {
                    g[2 + v] & 15
                } else {
                    g[2 + v - 16] >> 4
                };
                q as i32 - 8
            }),
            GgufBlocks::Q4_1 => Block {
                d: h(0),
                m: h(2),
                d2: h(0),
                q: std::array::from_fn(|v| {
                    (if v < 16 {
                        g[4 + v] & 0x0f
                    } else {
                        g[4 + v - 16] >> 4
                    }) as i32
                }),
            },
            GgufBlocks::Q5_0 => {
                let qh = u32::from_le_bytes([g[2], g[3], g[4], g[5]]);
                Block::signed(h(0), |v| {
                    let (lo, j) = if v < 16 {
                        (g[6 + v] & 15, v)
                    } else {
                        (g[6 + v - 16] >> 4, v)
                    };
                    (lo as i32 | (((qh >> j) & 1) as i32) << 4) - 16
                })
            }
            GgufBlocks::Q8_0 => Block::signed(h(0), |v| g[2 + v] as i8 as i32),
            GgufBlocks::Q5_1 => {
                let qh = u32::from_le_bytes([g[4], g[5], g[6], g[7]]);
                Block {
                    d: h(0),
                    m: h(2),
                    d2: h(0),
                    q: std::array::from_fn(|v| {
                        let lo = if v < 16 {
                            g[8 + v] & 15
                        } else {
                            g[8 + v - 16] >> 4
                        };
                        lo as i32 | (((qh >> v) & 1) as i32) << 4
                    }),
                }
            }
            GgufBlocks::Q5K => {
                let j = b % 8;
                let (s, m) = k_scale_min(&g[4..16], j);
                let (qh, qs) = (&g[16..48], &g[48 + 32 * (j / 2)..48 + 32 * (j / 2) + 32]);
                let d = h(0) * s as f32;
                Block {
                    d,
                    m: -(h(2) * m as f32),
                    d2: d,
                    q: std::array::from_fn(|v| {
                        let lo = if j.is_multiple_of(2) {
                            qs[v] & 15
                        } else {
                            qs[v] >> 4
                        };
                        lo as i32 | (((qh[v] >> j) & 1) as i32) << 4
                    }),
                }
            }
            GgufBlocks::Q4K => {
                let j = b % 8;
                let (s, m) = k_scale_min(&g[4..16], j);
                let qs = &g[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
                let d = h(0) * s as f32;
                Block {
                    d,
                    m: -(h(2) * m as f32),
                    d2: d,
                    q: std::array::from_fn(|v| {
                        (if j.is_multiple_of(2) {
                            qs[v] & 15
                        } else {
                            qs[v] >> 4
                        }) as i32
                    }),
                }
            }
            GgufBlocks::Q6K => {
                let (ql, qh, sc) = (&g[..128], &g[128..192], &g[192..208]);
                let d = h(208);
                let q = std::array::from_fn(|v| {
                    // Value `i` of the 256: half `n`, quarter `k`, lane `l`.
                    let i = (b % 8) * QK + v;
                    let (n, k, l) = (i / 128, i % 128 / 32, i % 32);
                    let lo = ql[64 * n + l + 32 * (k % 2)] >> (4 * (k / 2)) & 15;
                    let hi = qh[32 * n + l] >> (2 * k) & 3;
                    (lo | hi << 4) as i32 - 32
                });
                let s = |half: usize| d * sc[(b % 8) * 2 + half] as i8 as f32;
                Block {
                    d: s(0),
                    m: 0.0,
                    d2: s(1),
                    q,
                }
            }
        }
    }
}

/// Sub-block `j` (0..8) of a Q4_K or Q5_K block: its 6-bit scale and min from the packed 12
/// bytes.
fn k_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        (
            (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4),
            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
        )
    }
}

/// One block of one row, unpacked: its scale(s), offset (Q4_1) and 32 integer quants.
#[derive(Clone, Copy)]
struct Block {
    d: f32,
    m: f32,
    /// The scale of values 16..32 ([`QKind::Q8Halves`]; `d` for the other kinds).
    d2: f32,
    q: [i32; QK],
}

impl Block {
    const ZERO: Block = Block {
        d: 0.0,
        m: 0.0,
        d2: 0.0,
        q: [0; QK],
    };

    fn signed(d: f32, q: impl Fn(usize) -> i32) -> Block {
        Block {
            d,
            m: 0.0,
            d2: d,
            q: std::array::from_fn(q),
        }
    }

    /// Value `v`'s scale.
    fn scale(&self, v: usize) -> f32 {
        if v < QK / 2 {
            self.d
        } else {
            self.d2
        }
    }
}

/// A weight matrix `rows × cols` (one output feature per row).
pub(crate) struct QMatrix {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    /// Panels of [`P`] rows (the last padded with zero rows), each `cols / 32` blocks.
    data: Vec<u8>,
    /// Rows of the F32 kind (kept typed so they are aligned).
    dataf: Vec<f32>,
}

fn f32_at(b: &[u8], i: usize) -> f32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[4 * i..4 * i + 4]);
    f32::from_le_bytes(x)
}

/// Row `i` of one panel block (`blk`, [`QKind::block_bytes`] long), unpacked.
fn unpack(kind: QKind, blk: &[u8], i: usize) -> Block {
    let q = &blk[kind.header()..];
    let q4 = kind == QKind::Q4_1;
    let d = if kind == QKind::Q8_0 {
        f16::from_le_bytes([blk[2 * i], blk[2 * i + 1]]).to_f32()
    } else {
        f32_at(blk, i)
    };
    Block {
        d,
        m: if kind.has_offset() {
            f32_at(&blk[64..], i)
        } else {
            0.0
        },
        d2: if kind == QKind::Q8Halves {
            f32_at(&blk[64..], i)
        } else {
            d
        },
        q: std::array::from_fn(|v| {
            let (g, e) = (v / 4, v % 4);
            if q4 {
                ((q[(g / 2) * 64 + 4 * i + e] >> (4 * (g % 2))) & 0x0f) as i32
            } else if kind == QKind::U8 {
                q[g * 64 + 4 * i + e] as i32
            } else {
                q[g * 64 + 4 * i + e] as i8 as i32
            }
        }),
    }
}

impl QMatrix {
    /// Takes a tensor's GGUF blocks (`rows × cols` values) and repacks them.
    pub fn from_gguf(src: GgufBlocks, rows: usize, cols: usize, gguf: &[u8]) -> Self {
        let (vals, bytes) = src.values_and_bytes();
        let row_bytes = cols / vals * bytes;
        Self::pack(src.kind(), rows, cols, |r, b| {
            src.block(&gguf[r * row_bytes..(r + 1) * row_bytes], b)
        })
    }

    /// Builds the panels from each row's blocks.
    fn pack(kind: QKind, rows: usize, cols: usize, block: impl Fn(usize, usize) -> Block) -> Self {
        let nb = cols / QK;
        let panels = rows.div_ceil(P);
        let bb = kind.block_bytes();
        let mut data = vec![0u8; panels * nb * bb];
        for p in 0..panels {
            for b in 0..nb {
                let out = &mut data[(p * nb + b) * bb..(p * nb + b + 1) * bb];
                let blocks: [Block; P] = std::array::from_fn(|i| {
                    let r = p * P + i;
                    if r < rows {
                        block(r, b)
                    } else {
                        Block::ZERO
                    }
                });
                for (i, k) in blocks.iter().enumerate() {
                    let put = |out: &mut [u8], at: usize, v: [u8; 4]| {
                        out[at + 4 * i..at + 4 * i + 4].copy_from_slice(&v)
                    };
                    let c = |q: &[i32]| (-128 * q.iter().sum::<i32>()).to_le_bytes();
                    if kind == QKind::Q8_0 {
                        // The scales come from GGUF f16s, so f16 holds them exactly.
                        let d = f16::from_f32(k.d);
                        debug_assert_eq!(d.to_f32(), k.d);
                        let sum = k.q.iter().sum::<i32>() as i16;
                        out[2 * i..2 * i + 2].copy_from_slice(&d.to_le_bytes());
                        out[32 + 2 * i..32 + 2 * i + 2].copy_from_slice(&sum.to_le_bytes());
                        continue;
                    }
                    put(out, 0, k.d.to_le_bytes());
                    match kind {
                        QKind::Q4_1 | QKind::U8 => put(out, 64, k.m.to_le_bytes()),
                        QKind::Q8_0 => {}
                        QKind::Q8Halves => {
                            put(out, 64, k.d2.to_le_bytes());
                            put(out, 128, c(&k.q[..QK / 2]));
                            put(out, 192, c(&k.q[QK / 2..]));
                        }
                        QKind::F32 => {}
                    }
                }
                let q = &mut out[kind.header()..];
                for (i, k) in blocks.iter().enumerate() {
                    for v in 0..QK {
                        let (g, e) = (v / 4, v % 4);
                        if kind == QKind::Q4_1 {
                            let at = (g / 2) * 64 + 4 * i + e;
                            q[at] |= (k.q[v] as u8 & 0x0f) << (4 * (g % 2));
                        } else {
                            q[g * 64 + 4 * i + e] = k.q[v] as i8 as u8;
                        }
                    }
                }
            }
        }
        Self {
            kind,
            rows,
            cols,
            data,
            dataf: Vec::new(),
        }
    }

    /// Row `r`'s block `b`, unpacked from its panel.
    fn block(&self, r: usize, b: usize) -> Block {
        let nb = self.cols / QK;
        let bb = self.kind.block_bytes();
        let at = (r / P * nb + b) * bb;
        unpack(self.kind, &self.data[at..at + bb], r % P)
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
        if kind == QKind::F32 {
            let dataf = parts.iter().flat_map(|p| p.dataf.iter().copied()).collect();
            return Some(Self::from_f32(rows, cols, dataf));
        }
        // Which part, and which row of it, each row comes from.
        let mut at = Vec::with_capacity(rows);
        for (k, p) in parts.iter().enumerate() {
            at.extend((0..p.rows).map(|r| (k, r)));
        }
        Some(Self::pack(kind, rows, cols, |r, b| {
            let (k, pr) = at[r];
            parts[k].block(pr, b)
        }))
    }

    pub fn bytes(&self) -> usize {
        self.data.len() + self.dataf.len() * 4
    }

    fn row_f32(&self, r: usize) -> &[f32] {
        &self.dataf[r * self.cols..(r + 1) * self.cols]
    }

    /// Panel `p`'s blocks.
    fn panel(&self, p: usize) -> &[u8] {
        let n = self.cols / QK * self.kind.block_bytes();
        &self.data[p * n..(p + 1) * n]
    }

    /// One row dequantized (used for the embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.kind == QKind::F32 {
            out.copy_from_slice(self.row_f32(r));
            return;
        }
        for b in 0..self.cols / QK {
            let k = self.block(r, b);
            for (v, (o, &q)) in out[b * QK..(b + 1) * QK].iter_mut().zip(&k.q).enumerate() {
                *o = if self.kind.has_offset() {
                    k.d * q as f32 + k.m
                } else {
                    k.scale(v) * q as f32
                };
            }
        }
    }

    /// `out[b][r] = dot(W[r], x[b])` for every batch row `b`; `out` is `batch × rows`.
    /// Quantized kinds take `xq` (rows quantized with [`quantize_row`]), F32 takes `xf`.
    pub fn matvec(&self, xf: &[f32], xq: &[QRow], batch: usize, out: &mut [f32]) {
        self.matvec_with(Simd::detect(), xf, xq, batch, out)
    }

    fn matvec_with(&self, simd: Simd, xf: &[f32], xq: &[QRow], batch: usize, out: &mut [f32]) {
        let rows = self.rows;
        // The kernels' reach, which the unsafe writes and reads below rely on.
        assert!(
            out.len() >= batch * rows,
            "output shorter than batch × rows"
        );
        if self.kind == QKind::F32 {
            assert!(
                xf.len() >= batch * self.cols,
                "activations shorter than batch × cols"
            );
        } else {
            let nb = self.cols / QK;
            assert!(
                xq.len() >= batch
                    && xq[..batch].iter().all(|r| {
                        r.qs.len() == self.cols
                            && r.d.len() == nb
                            && r.s.len() == nb
                            && (!self.kind.offset_acts() || r.qu.len() == self.cols)
                    }),
                "activation rows not quantized for {} columns of {:?}",
                self.cols,
                self.kind
            );
        }
        let ptr = SyncPtr(out.as_mut_ptr());
        if self.kind == QKind::F32 {
            const CHUNK: usize = 64;
            (0..rows.div_ceil(CHUNK)).into_par_iter().for_each(|c| {
                for r in c * CHUNK..((c + 1) * CHUNK).min(rows) {
                    let wf = self.row_f32(r);
                    for b in 0..batch {
                        let v = super::dot_f32(wf, &xf[b * self.cols..(b + 1) * self.cols]);
                        // SAFETY: each (batch row, weight row) cell is written by exactly one
                        // task (the one owning weight row `r`), and `out` outlives the loop.
                        unsafe { *ptr.get().add(b * rows + r) = v };
                    }
                }
            });
            return;
        }
        // A task owns a few panels and up to `ACTS` activation rows (long prompts split on
        // both, so the threads' shares even out); activation groups outside, panels inside:
        // a group's quantized rows stay in L1 while the task's panels (tens of KiB) are read
        // again.
        const PANELS: usize = 4;
        const ACTS: usize = 128;
        let panels = rows.div_ceil(P);
        let nb = self.cols / QK;
        let (pc, ac) = (panels.div_ceil(PANELS), batch.div_ceil(ACTS));
        let put = |a: usize, r0: usize, t: &[f32; P]| {
            let valid = (rows - r0).min(P);
            // SAFETY: each (batch row, weight row) cell is written by exactly one task (the
            // one owning the row's panel and the batch row), `valid` of the panel's rows lie
            // inside the output row, and `out` outlives the loop.
            unsafe {
                let dst = ptr.get().add(a * rows + r0);
                std::ptr::copy_nonoverlapping(t.as_ptr(), dst, valid);
            }
        };
        (0..pc * ac).into_par_iter().for_each(|task| {
            let (c, a0) = (task % pc, task / pc * ACTS);
            let a1 = (a0 + ACTS).min(batch);
            let task_panels = c * PANELS..((c + 1) * PANELS).min(panels);
            let mut tile = [[0f32; P]; GROUP];
            for b0 in (a0..a1).step_by(GROUP) {
                let n = (a1 - b0).min(GROUP);
                for p in task_panels.clone() {
                    panel_tile(
                        simd,
                        self.kind,
                        self.panel(p),
                        nb,
                        &xq[b0..b0 + n],
                        &mut tile,
                    );
                    for (a, t) in tile[..n].iter().enumerate() {
                        put(b0 + a, p * P, t);
                    }
                }
            }
        });
    }
}

/// The int8 multiply-add peak of one thread at the best SIMD level here, measured for about
/// `for_time`: a chain-free loop of the instruction the kernels use (`vpdpbusd` on 512-bit
/// vectors with AVX-512 VNNI; `vpmaddubsw` + `vpmaddwd` on 256-bit ones with AVX2). Returns
/// the level's name and multiply-adds per second; `None` at the portable level.
pub fn int8_peak(for_time: std::time::Duration) -> Option<(&'static str, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        let t0 = std::time::Instant::now();
        let mut macs = 0u64;
        let simd = Simd::detect();
        while t0.elapsed() < for_time {
            macs += match simd {
                // SAFETY: the CPU has the level `Simd::detect` reported.
                Simd::Avx512Vnni => unsafe { avx512::peak_loop(1 << 16) },
                Simd::Avx2 => unsafe { avx2::peak_loop(1 << 16) },
                Simd::Portable => return None,
            };
        }
        let name = if simd == Simd::Avx512Vnni {
            "AVX-512 VNNI"
        } else {
            "AVX2"
        };
        Some((name, macs as f64 / t0.elapsed().as_secs_f64()))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = for_time;
        None
    }
}

/// Activation rows per tile (AVX-512; AVX2 takes them 4 at a time): every accumulator stays
/// in a register.
const GROUP: usize = 8;

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
                    && is_x86_feature_detected!("f16c")
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    return Simd::Avx512Vnni;
                }
                if level != "portable"
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
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

/// A panel against 1 to [`GROUP`] activation rows.
#[cfg(target_arch = "x86_64")]
type Tile = unsafe fn(&[u8], usize, &[QRow], &mut [[f32; P]]);

#[cfg(target_arch = "x86_64")]
macro_rules! tiles {
    ($m:ident, $($n:literal)+) => {
        [
            [$($m::tile::<$n, 0>),+],
            [$($m::tile::<$n, 1>),+],
            [$($m::tile::<$n, 2>),+],
            [$($m::tile::<$n, 3>),+],
        ]
    };
}
#[cfg(target_arch = "x86_64")]
const AVX2_TILES: [[Tile; 4]; 4] = tiles!(avx2, 1 2 3 4);
#[cfg(target_arch = "x86_64")]
const AVX512_TILES: [[Tile; GROUP]; 4] = tiles!(avx512, 1 2 3 4 5 6 7 8);

/// `out[a][i]` = the dot product of panel row `i` with activation row `a`, in the canonical
/// order (module doc), for the `x.len()` (1 to [`GROUP`]) rows of `x`.
fn panel_tile(simd: Simd, kind: QKind, panel: &[u8], nb: usize, x: &[QRow], out: &mut [[f32; P]]) {
    let q4 = kind.tile_index();
    match simd {
        // SAFETY (both arms): the caller picked the level from `Simd::detect` or after
        // checking the CPU has it; `panel` holds `nb` blocks and every row of `x` `nb`.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512Vnni => unsafe { AVX512_TILES[q4][x.len() - 1](panel, nb, x, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => {
            for (k, xs) in x.chunks(4).enumerate() {
                unsafe { AVX2_TILES[q4][xs.len() - 1](panel, nb, xs, &mut out[4 * k..]) }
            }
        }
        Simd::Portable => portable_tile(kind, panel, nb, x, out),
    }
}

fn portable_tile(kind: QKind, panel: &[u8], nb: usize, x: &[QRow], out: &mut [[f32; P]]) {
    let bb = kind.block_bytes();
    let q4 = kind.has_offset();
    let dot = |w: &[i32], x: &[i8]| -> f32 {
        w.iter().zip(x).map(|(&w, &xv)| w * xv as i32).sum::<i32>() as f32
    };
    for (xa, row) in x.iter().zip(out.iter_mut()) {
        for (i, o) in row.iter_mut().enumerate() {
            let (mut acc, mut off) = (0f32, 0f32);
            for b in 0..nb {
                let k = unpack(kind, &panel[b * bb..(b + 1) * bb], i);
                let xs = &xa.qs[b * QK..(b + 1) * QK];
                if kind == QKind::Q8Halves {
                    let h = QK / 2;
                    acc = (k.d * xa.d[b]).mul_add(dot(&k.q[..h], &xs[..h]), acc);
                    acc = (k.d2 * xa.d[b]).mul_add(dot(&k.q[h..], &xs[h..]), acc);
                    continue;
                }
                acc = (k.d * xa.d[b]).mul_add(dot(&k.q, xs), acc);
                if q4 {
                    off = k.m.mul_add(xa.s[b], off);
                }
            }
            *o = if q4 { acc + off } else { acc };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{QRow, P, QK};
    use std::arch::x86_64::*;

    /// [`super::quantize_row_portable`], 32 values per step: the block's absolute maximum
    /// and scale are the same scalars, and `round` (half away from zero) is built from
    /// truncation, so every quant and sum is the same.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(x: &[f32]) -> QRow {
        let nb = x.len() / QK;
        let mut r = QRow::for_blocks(nb);
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

    /// `iters` rounds of 8 independent `vpmaddubsw` + `vpmaddwd` pairs (32 multiply-adds
    /// each); returns the multiply-adds done.
    #[target_feature(enable = "avx2")]
    pub unsafe fn peak_loop(iters: u64) -> u64 {
        let a = _mm256_set1_epi8(3);
        let b = _mm256_set1_epi8(-2);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); 8];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_add_epi32(*x, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
            }
        }
        std::hint::black_box(acc);
        iters * 8 * 32
    }

    /// A panel in two halves of 8 rows (one 256-bit vector each), the halves one after the
    /// other so that a half's accumulators stay in the 16 registers. `vpmaddubsw` wants an
    /// unsigned operand and saturates at `i16`: Q4_1's nibbles are unsigned (15·127·2 fits),
    /// Q8_0 takes `|w|` against `x` with `w`'s sign (128·127·2 fits). The integer sums are
    /// exact, the float operations the canonical ones.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<const NA: usize, const K: usize>(
        panel: &[u8],
        nb: usize,
        x: &[QRow],
        out: &mut [[f32; P]],
    ) {
        let (q4, halves, u8w) = (K == 1, K == 2, K == 3);
        let offset = q4 || u8w;
        let (bb, hdr) = match K {
            0 => (576, 64),
            1 => (384, 128),
            2 => (768, 256),
            _ => (640, 128),
        };
        let base = panel.as_ptr();
        let mask = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let xq: [*const u8; NA] =
            std::array::from_fn(|a| x.get_unchecked(a).qs.as_ptr() as *const u8);
        let xd: [*const f32; NA] = std::array::from_fn(|a| x.get_unchecked(a).d.as_ptr());
        let xs: [*const f32; NA] = std::array::from_fn(|a| x.get_unchecked(a).s.as_ptr());
        let bcast = |p: *const u8| _mm256_set1_epi32((p as *const i32).read_unaligned());
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); NA];
            let mut off = [_mm256_setzero_ps(); NA];
            for b in 0..nb {
                let blk = base.add(b * bb);
                let mut dot = [_mm256_setzero_si256(); NA];
                // The second half's sums ([`QKind::Q8Halves`]).
                let mut dot2 = [_mm256_setzero_si256(); NA];
                if q4 {
                    for p in 0..4 {
                        let raw =
                            _mm256_loadu_si256(blk.add(hdr + p * 64 + h * 32) as *const __m256i);
                        let lo = _mm256_and_si256(raw, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                        for a in 0..NA {
                            let x0 = bcast(xq[a].add(b * QK + p * 8));
                            let x1 = bcast(xq[a].add(b * QK + p * 8 + 4));
                            let s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), ones);
                            let s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), ones);
                            dot[a] = _mm256_add_epi32(dot[a], _mm256_add_epi32(s0, s1));
                        }
                    }
                } else {
                    for g in 0..8 {
                        let w =
                            _mm256_loadu_si256(blk.add(hdr + g * 64 + h * 32) as *const __m256i);
                        let wa = _mm256_sign_epi8(w, w);
                        for a in 0..NA {
                            let xa = bcast(xq[a].add(b * QK + g * 4));
                            // Unsigned 5-bit weights take the activations as they are.
                            let s = if u8w {
                                _mm256_madd_epi16(_mm256_maddubs_epi16(w, xa), ones)
                            } else {
                                let xv = _mm256_sign_epi8(xa, w);
                                _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xv), ones)
                            };
                            if halves && g >= 4 {
                                dot2[a] = _mm256_add_epi32(dot2[a], s);
                            } else {
                                dot[a] = _mm256_add_epi32(dot[a], s);
                            }
                        }
                    }
                }
                let wd = if K == 0 {
                    _mm256_cvtph_ps(_mm_loadu_si128(blk.add(h * 16) as *const __m128i))
                } else {
                    _mm256_loadu_ps(blk.add(h * 32) as *const f32)
                };
                let wm = _mm256_loadu_ps(blk.add(64 + h * 32) as *const f32);
                for a in 0..NA {
                    let xda = _mm256_set1_ps(*xd[a].add(b));
                    let dd = _mm256_mul_ps(wd, xda);
                    acc[a] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(dot[a]), acc[a]);
                    if halves {
                        // `wm` holds the second half's scales.
                        let dd2 = _mm256_mul_ps(wm, xda);
                        acc[a] = _mm256_fmadd_ps(dd2, _mm256_cvtepi32_ps(dot2[a]), acc[a]);
                    }
                    if offset {
                        off[a] = _mm256_fmadd_ps(wm, _mm256_set1_ps(*xs[a].add(b)), off[a]);
                    }
                }
            }
            for a in 0..NA {
                let r = if offset {
                    _mm256_add_ps(acc[a], off[a])
                } else {
                    acc[a]
                };
                _mm256_storeu_ps(out.get_unchecked_mut(a).as_mut_ptr().add(h * 8), r);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{QRow, P, QK};
    use std::arch::x86_64::*;

    /// [`super::quantize_row_portable`], a block in two vectors: the same scalar scale, and
    /// `round` (half away from zero) built from truncation as in the AVX2 path, so every
    /// quant and sum is the same.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn quantize_row(x: &[f32]) -> QRow {
        let nb = x.len() / QK;
        let mut r = QRow::for_blocks(nb);
        let sign = _mm512_set1_epi32(i32::MIN);
        let one = _mm512_castps_si512(_mm512_set1_ps(1.0));
        let half = _mm512_set1_ps(0.5);
        for b in 0..nb {
            let p = x.as_ptr().add(b * QK);
            let v = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
            let amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let q = v.map(|vi| {
                let y = _mm512_mul_ps(vi, id);
                let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
                let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(y, t)), half);
                let step = _mm512_castsi512_ps(_mm512_or_si512(
                    _mm512_and_si512(_mm512_castps_si512(y), sign),
                    one,
                ));
                _mm512_cvtps_epi32(_mm512_mask_add_ps(t, up, t, step))
            });
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
            let out = r.qs.as_mut_ptr().add(b * QK) as *mut __m128i;
            _mm_storeu_si128(out, _mm512_cvtsepi32_epi8(q[0]));
            _mm_storeu_si128(out.add(1), _mm512_cvtsepi32_epi8(q[1]));
            r.d.push(d);
            r.s.push(d * sum as f32);
        }
        r
    }

    /// `iters` rounds of 12 independent `vpdpbusd` (64 multiply-adds each); returns the
    /// multiply-adds done.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn peak_loop(iters: u64) -> u64 {
        let a = _mm512_set1_epi8(3);
        let b = _mm512_set1_epi8(-2);
        let mut acc = [_mm512_setzero_si512(); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        iters * 12 * 64
    }

    /// A panel's 16 rows in one 512-bit vector: per block, 8 `vpdpbusd` of a 4-value group
    /// of the 16 rows against the activation's 4 bytes broadcast give the 16 integer dot
    /// products (Q4_1: nibbles unsigned, activations signed; Q8_0: activations offset by 128
    /// unsigned, weights signed, starting from `-128 · Σ w`). Up to 4 rows keep two sums each
    /// (even and odd groups) so that the multiply-add chains overlap; 5 to 8 rows overlap by
    /// themselves, with one sum each (so that 32 registers hold them). Then the canonical
    /// float operations.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    pub unsafe fn tile<const NA: usize, const K: usize>(
        panel: &[u8],
        nb: usize,
        x: &[QRow],
        out: &mut [[f32; P]],
    ) {
        let (q4, halves) = (K == 1, K == 2);
        // Unsigned weights (Q4_1's nibbles, U8's bytes) with an offset term.
        let offset = q4 || K == 3;
        // [`QKind::Q8Halves`] keeps a sum per half instead (the first half's in `even`).
        let split = NA <= 4 && !halves;
        let (bb, hdr) = match K {
            0 => (576, 64),
            1 => (384, 128),
            2 => (768, 256),
            _ => (640, 128),
        };
        let base = panel.as_ptr();
        let mask = _mm512_set1_epi8(0x0f);
        let xq: [*const u8; NA] = std::array::from_fn(|a| {
            let r = x.get_unchecked(a);
            if offset {
                r.qs.as_ptr() as *const u8
            } else {
                r.qu.as_ptr()
            }
        });
        let xd: [*const f32; NA] = std::array::from_fn(|a| x.get_unchecked(a).d.as_ptr());
        let xs: [*const f32; NA] = std::array::from_fn(|a| x.get_unchecked(a).s.as_ptr());
        let bcast = |p: *const u8| _mm512_set1_epi32((p as *const i32).read_unaligned());
        let mut acc = [_mm512_setzero_ps(); NA];
        let mut off = [_mm512_setzero_ps(); NA];
        for b in 0..nb {
            let blk = base.add(b * bb);
            let mut even = if offset {
                [_mm512_setzero_si512(); NA]
            } else if halves {
                [_mm512_loadu_si512(blk.add(128) as *const __m512i); NA]
            } else {
                // `-128 · Σ w` from the stored sums.
                let sum = _mm512_cvtepi16_epi32(_mm256_loadu_si256(blk.add(32) as *const __m256i));
                [_mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<7>(sum)); NA]
            };
            let mut odd = if halves {
                [_mm512_loadu_si512(blk.add(192) as *const __m512i); NA]
            } else {
                [_mm512_setzero_si512(); NA]
            };
            for p in 0..4 {
                let (w0, w1) = if q4 {
                    let raw = _mm512_loadu_si512(blk.add(hdr + p * 64) as *const __m512i);
                    (
                        _mm512_and_si512(raw, mask),
                        _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask),
                    )
                } else {
                    (
                        _mm512_loadu_si512(blk.add(hdr + p * 128) as *const __m512i),
                        _mm512_loadu_si512(blk.add(hdr + 64 + p * 128) as *const __m512i),
                    )
                };
                for a in 0..NA {
                    let at = xq[a].add(b * QK + p * 8);
                    let (x0, x1) = (bcast(at), bcast(at.add(4)));
                    // `vpdpbusd` takes its first factor unsigned.
                    let (u0, s0, u1, s1) = if offset {
                        (w0, x0, w1, x1)
                    } else {
                        (x0, w0, x1, w1)
                    };
                    if halves {
                        let sum = if p < 2 { &mut even[a] } else { &mut odd[a] };
                        *sum = _mm512_dpbusd_epi32(*sum, u0, s0);
                        *sum = _mm512_dpbusd_epi32(*sum, u1, s1);
                        continue;
                    }
                    even[a] = _mm512_dpbusd_epi32(even[a], u0, s0);
                    if split {
                        odd[a] = _mm512_dpbusd_epi32(odd[a], u1, s1);
                    } else {
                        even[a] = _mm512_dpbusd_epi32(even[a], u1, s1);
                    }
                }
            }
            let wd = if K == 0 {
                _mm512_cvtph_ps(_mm256_loadu_si256(blk as *const __m256i))
            } else {
                _mm512_loadu_ps(blk as *const f32)
            };
            for a in 0..NA {
                let xda = _mm512_set1_ps(*xd[a].add(b));
                if halves {
                    let wd2 = _mm512_loadu_ps(blk.add(64) as *const f32);
                    let (d0, d1) = (_mm512_mul_ps(wd, xda), _mm512_mul_ps(wd2, xda));
                    acc[a] = _mm512_fmadd_ps(d0, _mm512_cvtepi32_ps(even[a]), acc[a]);
                    acc[a] = _mm512_fmadd_ps(d1, _mm512_cvtepi32_ps(odd[a]), acc[a]);
                    continue;
                }
                let sum = if split {
                    _mm512_add_epi32(even[a], odd[a])
                } else {
                    even[a]
                };
                let dot = _mm512_cvtepi32_ps(sum);
                let dd = _mm512_mul_ps(wd, xda);
                acc[a] = _mm512_fmadd_ps(dd, dot, acc[a]);
                if offset {
                    let wm = _mm512_loadu_ps(blk.add(64) as *const f32);
                    off[a] = _mm512_fmadd_ps(wm, _mm512_set1_ps(*xs[a].add(b)), off[a]);
                }
            }
        }
        for a in 0..NA {
            let r = if offset {
                _mm512_add_ps(acc[a], off[a])
            } else {
                acc[a]
            };
            _mm512_storeu_ps(out.get_unchecked_mut(a).as_mut_ptr(), r);
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
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    /// GGUF blocks of `src` with random quants and sane f16 scales (random bytes could make
    /// NaN or inf).
    fn gguf_bytes(src: GgufBlocks, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let (vals, bsz) = src.values_and_bytes();
        let mut data = random_bytes(rows * cols / vals * bsz, seed);
        for (i, blk) in data.chunks_exact_mut(bsz).enumerate() {
            let d = f16::from_f32(0.013 + i as f32 * 1e-4).to_le_bytes();
            match src {
                GgufBlocks::Q6K => blk[208..210].copy_from_slice(&d),
                GgufBlocks::Q4K | GgufBlocks::Q5K => {
                    blk[0..2].copy_from_slice(&d);
                    blk[2..4].copy_from_slice(&f16::from_f32(0.02).to_le_bytes());
                }
                GgufBlocks::Q4_1 | GgufBlocks::Q5_1 => {
                    blk[0..2].copy_from_slice(&d);
                    blk[2..4].copy_from_slice(&f16::from_f32(-0.1).to_le_bytes());
                }
                _ => blk[0..2].copy_from_slice(&d),
            }
        }
        data
    }

    fn weights(kind: QKind, rows: usize, cols: usize) -> QMatrix {
        let src = match kind {
            QKind::Q4_1 => GgufBlocks::Q4_1,
            QKind::Q8Halves => GgufBlocks::Q6K,
            QKind::U8 => GgufBlocks::Q5K,
            _ => GgufBlocks::Q8_0,
        };
        QMatrix::from_gguf(src, rows, cols, &gguf_bytes(src, rows, cols, 7))
    }

    /// The panel kinds a matrix of `cols` columns can be built as (Q6_K rows are whole
    /// 256-value blocks).
    fn kinds(cols: usize) -> Vec<QKind> {
        let mut k = vec![QKind::Q4_1, QKind::Q8_0];
        if cols.is_multiple_of(256) {
            k.extend([QKind::Q8Halves, QKind::U8]);
        }
        k
    }

    fn acts(batch: usize, cols: usize) -> (Vec<Vec<f32>>, Vec<QRow>) {
        let xs: Vec<Vec<f32>> = (0..batch)
            .map(|b| {
                (0..cols)
                    .map(|i| ((i * 31 + b * 17) % 97) as f32 / 13.0 - 3.5)
                    .collect()
            })
            .collect();
        let xq = xs.iter().map(|x| quantize_row(x, QKind::Q8_0)).collect();
        (xs, xq)
    }

    /// Every SIMD level and the portable path agree bit for bit (odd block counts included),
    /// so that engines on CPUs with different instruction sets compute the same logits.
    #[test]
    fn simd_and_portable_agree_bitwise() {
        let levels = Simd::runnable();
        // 608 columns: 19 blocks, an odd count.
        for cols in [576, 1536, 96, 608] {
            let (xs, xq) = acts(11, cols);
            for kind in kinds(cols) {
                let w = weights(kind, 5, cols);
                let mut results = Vec::new();
                for &lv in &levels {
                    let mut o = vec![0f32; 11 * 5];
                    w.matvec_with(lv, &[], &xq, 11, &mut o);
                    results.push(o.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                }
                for (lv, res) in levels.iter().zip(&results) {
                    assert_eq!(res, &results[0], "{kind:?} cols {cols} {lv:?}");
                }
                // And the quantized dot is close to the exact one: the activations' 8-bit
                // rounding errs by a small share of the terms' magnitude (the sum itself may
                // cancel to near zero).
                for (r, &bits) in results[0][..5].iter().enumerate() {
                    let mut deq = vec![0f32; cols];
                    w.dequantize_row(r, &mut deq);
                    let exact: f32 = deq.iter().zip(&xs[0]).map(|(a, b)| a * b).sum();
                    let size: f32 = deq.iter().zip(&xs[0]).map(|(a, b)| (a * b).abs()).sum();
                    let got = f32::from_bits(bits);
                    assert!(
                        (exact - got).abs() < 0.01 * size.max(1.0),
                        "{exact} vs {got} (terms' magnitude {size})"
                    );
                }
            }
        }
    }

    /// Tight against the exact arithmetic: each output equals, to f32 rounding, the f64 dot
    /// product of the dequantized weights and dequantized activations.
    #[test]
    fn matvec_is_the_dot_of_the_dequantized_values() {
        for kind in kinds(768) {
            let (rows, cols) = (37, 768);
            let w = weights(kind, rows, cols);
            let (_, xq) = acts(5, cols);
            let mut got = vec![0f32; 5 * rows];
            w.matvec(&[], &xq, 5, &mut got);
            for (a, x) in xq.iter().enumerate() {
                let xd: Vec<f64> = (0..cols)
                    .map(|c| x.d[c / QK] as f64 * x.qs[c] as f64)
                    .collect();
                for r in 0..rows {
                    let mut deq = vec![0f32; cols];
                    w.dequantize_row(r, &mut deq);
                    let exact: f64 = deq.iter().zip(&xd).map(|(&a, b)| a as f64 * b).sum();
                    let size: f64 = deq
                        .iter()
                        .zip(&xd)
                        .map(|(&a, b)| (a as f64 * b).abs())
                        .sum();
                    let g = got[a * rows + r] as f64;
                    assert!(
                        (g - exact).abs() <= 1e-5 * size,
                        "{kind:?} row {r} act {a}: {g} vs {exact} (magnitude {size})"
                    );
                }
            }
        }
    }

    /// Repacking keeps every weight: each row dequantizes to what its GGUF blocks say, and
    /// stacking matrices keeps their rows.
    #[test]
    fn panels_hold_the_gguf_rows() {
        for kind in [QKind::Q4_1, QKind::Q8_0] {
            let (rows, cols) = (21, 96);
            let bsz = if kind == QKind::Q4_1 { 20 } else { 34 };
            let mut g = random_bytes(rows * cols / QK * bsz, 3);
            for blk in g.chunks_exact_mut(bsz) {
                blk[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
                blk[2..4].copy_from_slice(&f16::from_f32(-2.0).to_le_bytes());
            }
            let src = if kind == QKind::Q4_1 {
                GgufBlocks::Q4_1
            } else {
                GgufBlocks::Q8_0
            };
            let w = QMatrix::from_gguf(src, rows, cols, &g);
            for r in 0..rows {
                let mut got = vec![0f32; cols];
                w.dequantize_row(r, &mut got);
                let want: Vec<f32> = (0..cols)
                    .map(|c| {
                        let blk = &g[(r * cols / QK + c / QK) * bsz..][..bsz];
                        let v = c % QK;
                        if kind == QKind::Q4_1 {
                            let q = if v < 16 {
                                blk[4 + v] & 15
                            } else {
                                blk[4 + v - 16] >> 4
                            };
                            0.5 * q as f32 - 2.0
                        } else {
                            0.5 * blk[2 + v] as i8 as f32
                        }
                    })
                    .collect();
                assert_eq!(got, want, "{kind:?} row {r}");
            }
            let both = QMatrix::concat(vec![weights(kind, 7, cols), w]).expect("same width");
            assert_eq!(both.rows, 28);
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            both.dequantize_row(7 + 20, &mut a);
            QMatrix::from_gguf(src, rows, cols, &g).dequantize_row(20, &mut b);
            assert_eq!(a, b);
        }
    }

    /// Every GGUF block type the loader takes repacks to exactly the values candle's own
    /// dequantization gives (an independent reading of the formats), bit for bit.
    #[test]
    fn every_gguf_type_repacks_to_its_dequantized_values() {
        use candle_core::quantized::{GgmlDType, QStorage, QTensor};
        let (rows, cols) = (19, 512);
        for (src, dtype) in [
            (GgufBlocks::Q4_0, GgmlDType::Q4_0),
            (GgufBlocks::Q4_1, GgmlDType::Q4_1),
            (GgufBlocks::Q5_0, GgmlDType::Q5_0),
            (GgufBlocks::Q8_0, GgmlDType::Q8_0),
            (GgufBlocks::Q4K, GgmlDType::Q4K),
            (GgufBlocks::Q6K, GgmlDType::Q6K),
            (GgufBlocks::Q5_1, GgmlDType::Q5_1),
            (GgufBlocks::Q5K, GgmlDType::Q5K),
        ] {
            let g = gguf_bytes(src, rows, cols, 11);
            let dev = candle_core::Device::Cpu;
            let storage =
                QStorage::from_data(std::borrow::Cow::Borrowed(&g), &dev, dtype).expect("storage");
            let want: Vec<f32> = QTensor::new(storage, (rows, cols))
                .and_then(|t| t.dequantize(&dev))
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("candle dequantizes");
            let w = QMatrix::from_gguf(src, rows, cols, &g);
            assert_eq!(w.kind, src.kind());
            for r in 0..rows {
                let mut got = vec![0f32; cols];
                w.dequantize_row(r, &mut got);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want[r * cols..(r + 1) * cols]),
                    "{src:?} row {r}"
                );
            }
        }
    }

    /// The AVX2 and AVX-512 quantizers give the portable quants, scales and sums, ties
    /// included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn quantize_simd_matches_portable() {
        let levels = Simd::runnable();
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
        let a = quantize_row_portable(&x);
        let mut simd = vec![("avx2", unsafe { avx2::quantize_row(&x) })];
        if levels.contains(&Simd::Avx512Vnni) {
            simd.push(("avx512", unsafe { avx512::quantize_row(&x) }));
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (name, b) in simd {
            assert_eq!(a.qs, b.qs, "{name}");
            assert_eq!(bits(&a.d), bits(&b.d), "{name}");
            assert_eq!(bits(&a.s), bits(&b.s), "{name}");
        }
    }

    /// The whole mat-vec (tiles, remainders, odd block counts, every batch size) agrees
    /// with the portable path bit for bit at every SIMD level this CPU has.
    #[test]
    fn matvec_levels_agree_bitwise() {
        let levels = Simd::runnable();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (cols, rows) in [(96, 70), (576, 67), (512, 35)] {
            for kind in kinds(cols) {
                let w = weights(kind, rows, cols);
                // 130 crosses a task's 128 activation rows.
                for batch in (1..=9).chain([16, 21, 130]) {
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
