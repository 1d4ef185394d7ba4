//! Paged attention, read straight from the block pool.
//!
//! Per query row and head, an online softmax walks the row's blocks in position order; a
//! block's scores are computed, then folded into the running max, sum and weighted V. The
//! order depends only on the row's own position and the block size, never on the chunk or
//! batch it sits in. Consecutive rows of one sequence (a prefill chunk) share each block's
//! K and V, so a group of them reads and converts every block once.
//!
//! With SIMD, a prefill chunk runs in tiles of 8 or 16 rows, one row per lane: each K or V
//! value is broadcast once for the whole tile, and the softmax bookkeeping (max, rescale,
//! exponentials, sum) runs lane-wise instead of row by row. A decode row (one query)
//! instead reads each KV head's block once, converting f16 in registers, and serves every
//! query head of its group from it. Per value every path does exactly the float operations
//! of the portable one, in the same order, so all give the same bits.

use super::quant::Simd;
use crate::kv_cache::{KvCache, Region};

pub(crate) struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
    scores: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    /// Tiled path: queries and outputs per tile and head, transposed (`[dim][lane]`).
    qt: Vec<f32>,
    ot: Vec<f32>,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
            scores: Vec::new(),
            m: Vec::new(),
            l: Vec::new(),
            qt: Vec::new(),
            ot: Vec::new(),
        }
    }
}

/// For each query row `i` (`n_head * head_dim` values at `q.0[i * q.1..]`), row `i` of `out`
/// is `softmax(q_i·Kᵀ·scale)·V` over positions `0..first_ctx + i` of the sequence with `table`
/// (with a `window`, only the last `window` of them).
///
/// A window leaves the order of every sum as it was: positions outside it add nothing, and
/// blocks wholly outside it are not read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_rows(
    cache: &KvCache,
    layer: usize,
    table: &[u32],
    first_ctx: usize,
    window: Option<usize>,
    q: (&[f32], usize),
    n_head: usize,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let lay = &cache.layout;
    let level = Level::for_shape(lay.block_size, lay.head_dim);
    let rows = Rows {
        table,
        first_ctx,
        window: window.unwrap_or(usize::MAX),
        q,
        n_head,
    };
    attend_at(level, cache, layer, &rows, out, s);
}

/// The query rows of one call and the sequence they attend to.
struct Rows<'a> {
    table: &'a [u32],
    first_ctx: usize,
    /// Positions a row sees, counting back from its own (`usize::MAX`: all).
    window: usize,
    q: (&'a [f32], usize),
    n_head: usize,
}

impl Rows<'_> {
    /// The first position a row with `n_ctx` positions of context sees.
    fn first_seen(&self, n_ctx: usize) -> usize {
        n_ctx.saturating_sub(self.window)
    }
}

/// [`attend_rows`] with the kernels of `level`.
fn attend_at(
    level: Level,
    cache: &KvCache,
    layer: usize,
    r: &Rows<'_>,
    out: &mut [f32],
    s: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    if level != Level::Portable && out.len() > r.n_head * cache.layout.head_dim {
        return attend_tiled(level, cache, layer, r, out, s);
    }
    let Rows {
        table,
        first_ctx,
        q,
        n_head,
        ..
    } = *r;
    let lay = &cache.layout;
    let (bs, n_kv, hd) = (lay.block_size, lay.n_kv_head, lay.head_dim);
    let d = n_head * hd;
    let rows = out.len() / d;
    let (q, q_stride) = q;
    // The first row sees the earliest positions: blocks before its window are not read.
    let skip = r.first_seen(first_ctx) / bs;
    let last_ctx = first_ctx + rows - 1;
    let group = n_head / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_slot = n_kv * hd;
    #[cfg(target_arch = "x86_64")]
    let fused = rows == 1 && level != Level::Portable && hd % 16 == 0 && avx2::has_f16c();
    #[cfg(target_arch = "x86_64")]
    let dims = Dims {
        bs,
        n_kv,
        hd,
        group,
        scale,
        wide: level == Level::Avx512,
    };
    s.k.resize(bs * per_slot, 0.0);
    s.v.resize(bs * per_slot, 0.0);
    s.scores.resize(bs * GROUP_PASS, 0.0);
    s.m.clear();
    s.m.resize(rows * n_head, f32::NEG_INFINITY);
    s.l.clear();
    s.l.resize(rows * n_head, 0.0);
    out.fill(0.0);
    let (kr, vr): (&Region, &Region) = (cache.k(layer), cache.v(layer));
    for (start, at, ns_max) in blocks(cache, layer, table, skip, last_ctx) {
        #[cfg(target_arch = "x86_64")]
        if fused {
            let (n, row) = (bs * per_slot, (&mut s.m[..], &mut s.l[..], &mut out[..]));
            let from = r.first_seen(first_ctx).saturating_sub(start);
            // SAFETY: the block is this sequence's, and the step writes no KV while
            // attention runs.
            let kv = unsafe { kr.f16s(at, n).zip(vr.f16s(at, n)) };
            if let Some((k, v)) = kv {
                decode_block(k, v, (from, ns_max), q, &dims, row, &mut s.scores);
            } else {
                kr.read(at, &mut s.k[..ns_max * per_slot]);
                vr.read(at, &mut s.v[..ns_max * per_slot]);
                decode_block(&s.k, &s.v, (from, ns_max), q, &dims, row, &mut s.scores);
            }
            continue;
        }
        kr.read(at, &mut s.k[..ns_max * per_slot]);
        vr.read(at, &mut s.v[..ns_max * per_slot]);
        for i in 0..rows {
            let n_ctx = first_ctx + i;
            let seen = r.first_seen(n_ctx);
            if start >= n_ctx || start + bs <= seen {
                continue;
            }
            let ns = bs.min(n_ctx - start);
            let from = seen.saturating_sub(start);
            for h in 0..n_head {
                let g = h / group;
                let qh = &q[i * q_stride + h * hd..i * q_stride + (h + 1) * hd];
                let k = Strided {
                    data: &s.k[g * hd..],
                    stride: per_slot,
                };
                scores_rows(qh, k, ns, scale, &mut s.scores);
                let (m, l) = (&mut s.m[i * n_head + h], &mut s.l[i * n_head + h]);
                let (new_m, corr) = rescale(*m, &s.scores[from..ns]);
                let oh = &mut out[i * d + h * hd..i * d + (h + 1) * hd];
                scale_by(oh, corr);
                let v = Strided {
                    data: &s.v[g * hd..],
                    stride: per_slot,
                };
                *l = weigh(&mut s.scores, (from, ns), new_m, v, *l * corr, oh);
                *m = new_m;
            }
        }
    }
    for i in 0..rows {
        for h in 0..n_head {
            let inv = 1.0 / s.l[i * n_head + h];
            for o in &mut out[i * d + h * hd..i * d + (h + 1) * hd] {
                *o *= inv;
            }
        }
    }
}

/// The blocks of `table` that hold positions before `last_ctx`, in position order: each
/// block's first position, its first value in the layer's K and V, and the slots in use.
/// Stepping to a block starts fetching the next one, so that reading K and V from memory
/// overlaps the work on this one.
fn blocks<'a>(
    cache: &'a KvCache,
    layer: usize,
    table: &'a [u32],
    skip: usize,
    last_ctx: usize,
) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
    let lay = &cache.layout;
    let (bs, per_slot) = (lay.block_size, lay.n_kv_head * lay.head_dim);
    let used = move |start: usize| bs.min(last_ctx - start);
    (skip.min(table.len())..table.len())
        .map(move |bi| (bi * bs, cache.index(layer, table[bi]) * bs * per_slot))
        .take_while(move |&(start, _)| start < last_ctx)
        .map(move |(start, at)| {
            if let Some(&next) = table.get(start / bs + 1).filter(|_| start + bs < last_ctx) {
                let at = cache.index(layer, next) * bs * per_slot;
                let n = used(start + bs) * per_slot;
                cache.k(layer).prefetch(at, n);
                cache.v(layer).prefetch(at, n);
            }
            (start, at, used(start))
        })
}

/// The prefill path at a SIMD level: the rows in tiles of the level's lanes, one row per
/// lane. Per block, K and V are read once; per tile and head, the block's kernel folds the
/// block into the tile's running max, sum and (transposed) output.
#[cfg(target_arch = "x86_64")]
fn attend_tiled(
    level: Level,
    cache: &KvCache,
    layer: usize,
    r: &Rows<'_>,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let Rows {
        table,
        first_ctx,
        q: (q, q_stride),
        n_head,
        ..
    } = *r;
    let lay = &cache.layout;
    let (bs, n_kv, hd) = (lay.block_size, lay.n_kv_head, lay.head_dim);
    let lanes = level.lanes();
    let d = n_head * hd;
    let rows = out.len() / d;
    let tiles = rows.div_ceil(lanes);
    let (group, per_slot) = (n_head / n_kv, n_kv * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    // One tile and head's queries or outputs: `unit` values, `[dim][lane]`.
    let unit = hd * lanes;
    s.qt.clear();
    s.qt.resize(tiles * n_head * unit, 0.0);
    for i in 0..rows {
        let (ti, lane) = (i / lanes, i % lanes);
        for h in 0..n_head {
            let base = (ti * n_head + h) * unit + lane;
            let qh = &q[i * q_stride + h * hd..i * q_stride + (h + 1) * hd];
            for (e, &x) in qh.iter().enumerate() {
                s.qt[base + e * lanes] = x;
            }
        }
    }
    s.ot.clear();
    s.ot.resize(tiles * n_head * unit, 0.0);
    s.m.clear();
    s.m.resize(tiles * n_head * lanes, f32::NEG_INFINITY);
    s.l.clear();
    s.l.resize(tiles * n_head * lanes, 0.0);
    s.k.resize(bs * per_slot, 0.0);
    s.v.resize(bs * per_slot, 0.0);
    s.scores.resize(bs * lanes, 0.0);
    let last_ctx = first_ctx + rows - 1;
    let (kr, vr): (&Region, &Region) = (cache.k(layer), cache.v(layer));
    let skip = r.first_seen(first_ctx) / bs;
    for (start, at, ns_max) in blocks(cache, layer, table, skip, last_ctx) {
        kr.read(at, &mut s.k[..ns_max * per_slot]);
        vr.read(at, &mut s.v[..ns_max * per_slot]);
        for ti in 0..tiles {
            // The context lengths of the tile's first and last rows.
            let lo = first_ctx + ti * lanes;
            let hi = lo + lanes.min(rows - ti * lanes) - 1;
            if start >= hi || start + bs <= r.first_seen(lo) {
                continue;
            }
            let ns = bs.min(hi - start);
            // Lane `l` sees the block's positions from `lim[16 + l]` to below `lim[l]`; only
            // a block that some row of the tile does not see whole needs the mask.
            let mut lim = [0i32; 32];
            for l in 0..16 {
                lim[l] = (lo + l).saturating_sub(start).min(bs) as i32;
                lim[16 + l] = r.first_seen(lo + l).saturating_sub(start).min(bs) as i32;
            }
            let masked = start + ns > lo || start < r.first_seen(hi);
            for h in 0..n_head {
                let (g, u) = (h / group, ti * n_head + h);
                let block = BlockRows {
                    k: &s.k[g * hd..],
                    v: &s.v[g * hd..],
                    stride: per_slot,
                    ns,
                };
                let tile = Tile {
                    qt: &s.qt[u * unit..(u + 1) * unit],
                    m: &mut s.m[u * lanes..(u + 1) * lanes],
                    l: &mut s.l[u * lanes..(u + 1) * lanes],
                    ot: &mut s.ot[u * unit..(u + 1) * unit],
                };
                tile_block(level, masked, &block, &lim, scale, tile, &mut s.scores);
            }
        }
    }
    for i in 0..rows {
        let (ti, lane) = (i / lanes, i % lanes);
        for h in 0..n_head {
            let u = ti * n_head + h;
            let inv = 1.0 / s.l[u * lanes + lane];
            let ot = &s.ot[u * unit + lane..];
            for (e, o) in out[i * d + h * hd..i * d + (h + 1) * hd]
                .iter_mut()
                .enumerate()
            {
                *o = ot[e * lanes] * inv;
            }
        }
    }
}

/// One block's K and V for one KV head: slot `t`'s values start at `t * stride`; the first
/// `ns` slots are visited.
#[cfg(target_arch = "x86_64")]
struct BlockRows<'a> {
    k: &'a [f32],
    v: &'a [f32],
    stride: usize,
    ns: usize,
}

/// A tile's queries and running state for one head, one row per lane: `qt` and `ot` as
/// `[dim][lane]`, `m` and `l` a value per lane.
#[cfg(target_arch = "x86_64")]
struct Tile<'a> {
    qt: &'a [f32],
    m: &'a mut [f32],
    l: &'a mut [f32],
    ot: &'a mut [f32],
}

/// Folds one block into a tile at `level` (a SIMD level), lane `r` taking only positions
/// from `lim[16 + r]` to below `lim[r]` when `masked`; `scores` is scratch for `bs`
/// lanes-wide rows.
#[cfg(target_arch = "x86_64")]
fn tile_block(
    level: Level,
    masked: bool,
    b: &BlockRows<'_>,
    lim: &[i32; 32],
    scale: f32,
    t: Tile<'_>,
    scores: &mut [f32],
) {
    let lanes = level.lanes();
    let hd = t.qt.len() / lanes;
    // The kernels' reach: dims in passes of `lanes`, positions in pairs (so `ns` rounded up
    // to 2, which a block of a multiple of 8 slots holds).
    assert!(hd.is_multiple_of(lanes) && t.qt.len() == hd * lanes && t.ot.len() == hd * lanes);
    assert!(t.m.len() == lanes && t.l.len() == lanes);
    let slots = b.ns.next_multiple_of(2);
    assert!(scores.len() >= slots * lanes);
    assert!(b.ns == 0 || ((slots - 1) * b.stride + hd <= b.k.len().min(b.v.len())));
    // SAFETY: `level` vouches for the CPU; the asserts above bound every lane read or written.
    unsafe {
        match (level, masked) {
            (Level::Avx512, false) => avx512::tile_block::<false>(b, lim, scale, t, scores),
            (Level::Avx512, true) => avx512::tile_block::<true>(b, lim, scale, t, scores),
            (Level::Avx2, false) => avx2::tile_block::<false>(b, lim, scale, t, scores),
            (Level::Avx2, true) => avx2::tile_block::<true>(b, lim, scale, t, scores),
            (Level::Portable, _) => unreachable!("the tiled path runs at a SIMD level"),
        }
    }
}

/// Query heads per pass of the decode path: their score and output accumulators fit in the
/// 16 AVX2 registers.
const GROUP_PASS: usize = 3;

/// Folds a block's scores into a head's running max `m`: the new max, and the factor that
/// rescales what was summed under the old one.
fn rescale(m: f32, scores: &[f32]) -> (f32, f32) {
    let new_m = scores.iter().fold(m, |a, &b| a.max(b));
    let corr = if m == f32::NEG_INFINITY {
        0.0
    } else {
        exp(m - new_m)
    };
    (new_m, corr)
}

fn scale_by(o: &mut [f32], corr: f32) {
    if corr != 1.0 {
        for x in o {
            *x *= corr;
        }
    }
}

/// Shapes the decode path needs.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Dims {
    bs: usize,
    n_kv: usize,
    hd: usize,
    group: usize,
    scale: f32,
    /// Take the AVX-512 decode kernels (16 lanes) instead of the AVX2 ones.
    wide: bool,
}

/// One block of one decode row: `k` and `v` hold the block's `bs` slots (`n_kv * hd` values
/// each), `q` the row's heads; folds the first `ns` positions into the row's running max,
/// sum and output (`row`: `m`, `l`, `out`). AVX2 and F16C are present (the caller checked),
/// and AVX-512 where `dims.wide` says so.
#[cfg(target_arch = "x86_64")]
fn decode_block<T: avx512::Lanes16>(
    k: &[T],
    v: &[T],
    (from, ns): (usize, usize),
    q: &[f32],
    dims: &Dims,
    row: (&mut [f32], &mut [f32], &mut [f32]),
    scores: &mut [f32],
) {
    let Dims {
        bs,
        n_kv,
        hd,
        group,
        ..
    } = *dims;
    let (m, l, out) = row;
    let per_slot = n_kv * hd;
    assert!(k.len() >= bs * per_slot && v.len() >= bs * per_slot && ns <= bs && from < ns);
    // The kernels' shapes: 4 and 8 slots per pass, 8 and 16 dims.
    assert!(bs.is_multiple_of(8) && hd.is_multiple_of(16));
    // The kernels' instruction sets (cached bit tests, so cheap per block).
    assert!(
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && avx2::has_f16c()
    );
    assert!(!dims.wide || is_x86_feature_detected!("avx512f"));
    assert!(q.len() >= n_kv * group * hd && scores.len() >= GROUP_PASS * bs);
    for g in 0..n_kv {
        let kv = (&k[g * hd..], &v[g * hd..]);
        let mut h0 = g * group;
        while h0 < (g + 1) * group {
            let hn = ((g + 1) * group - h0).min(GROUP_PASS);
            let (heads, row) = (h0..h0 + hn, (&mut *m, &mut *l, &mut *out));
            // SAFETY: AVX2 and F16C are present, and AVX-512F where `dims.wide` (asserted
            // above); `k` and `v` reach `hd` values into each of
            // the block's `bs` slots (asserted above), and `bs` and `hd` are multiples of 8
            // and 16, so every lane read or written is in bounds.
            unsafe {
                match hn {
                    1 => decode_pass::<T, 1>(kv, (from, ns), q, dims, heads, row, scores),
                    2 => decode_pass::<T, 2>(kv, (from, ns), q, dims, heads, row, scores),
                    _ => decode_pass::<T, 3>(kv, (from, ns), q, dims, heads, row, scores),
                }
            }
            h0 += hn;
        }
    }
}

/// [`decode_block`] for `H` query heads (`heads`) of one KV head (`kv`, from its first
/// value): their scores, the running max and sum, then their share of V.
///
/// # Safety
/// As for `decode_block`'s kernels.
#[cfg(target_arch = "x86_64")]
unsafe fn decode_pass<T: avx512::Lanes16, const H: usize>(
    (k, v): (&[T], &[T]),
    (from, ns): (usize, usize),
    q: &[f32],
    dims: &Dims,
    heads: std::ops::Range<usize>,
    (m, l, out): (&mut [f32], &mut [f32], &mut [f32]),
    scores: &mut [f32],
) {
    let Dims {
        bs,
        n_kv,
        hd,
        scale,
        ..
    } = *dims;
    let (vals, stride) = (heads.start * hd..heads.end * hd, n_kv * hd);
    if dims.wide {
        avx512::group_scores::<T, H>(&q[vals.clone()], k, stride, ns, scale, bs, scores);
    } else {
        avx2::group_scores::<T, H>(&q[vals.clone()], k, stride, ns, scale, bs, scores);
    }
    for (j, h) in heads.enumerate() {
        let p = &mut scores[j * bs..(j + 1) * bs];
        let (new_m, corr) = rescale(m[h], &p[from..ns]);
        scale_by(&mut out[h * hd..(h + 1) * hd], corr);
        avx2::exp_row(p, ns, new_m);
        // Positions before the window weigh nothing (adding zeros leaves every sum exact).
        p[..from].fill(0.0);
        l[h] = p[..ns].iter().fold(l[h] * corr, |a, &x| a + x);
        m[h] = new_m;
    }
    if dims.wide {
        avx512::group_weigh::<T, H>(scores, bs, ns, v, stride, &mut out[vals]);
    } else {
        avx2::group_weigh::<T, H>(scores, bs, ns, v, stride, &mut out[vals]);
    }
}

/// Rows of `data` that start every `stride` values (V of one KV head across a block's slots).
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    stride: usize,
}

/// The kernels attention runs: the CPU's level, where the block and head sizes suit it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Portable,
    /// Prefill tiles of 8 rows: `bs` and `hd` are multiples of 8.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Prefill tiles of 16 rows, decode rows two slots or 16 dims per register: `bs` is a
    /// multiple of 8 and `hd` of 16.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Level {
    fn for_shape(bs: usize, hd: usize) -> Self {
        let fits = |n: usize| bs.is_multiple_of(n) && hd.is_multiple_of(n);
        match Simd::detect() {
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Vnni if fits(8) && hd.is_multiple_of(16) => Level::Avx512,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512Vnni | Simd::Avx2 if fits(8) => Level::Avx2,
            _ => Level::Portable,
        }
    }

    /// Rows per tile in the prefill path: f32 lanes per register.
    #[cfg(target_arch = "x86_64")]
    fn lanes(self) -> usize {
        match self {
            Level::Portable => 1,
            Level::Avx2 => 8,
            Level::Avx512 => 16,
        }
    }
}

/// `out[t] = dot(q, K[t]) * scale` for `t < ns`, K as rows.
fn scores_rows(q: &[f32], k: Strided<'_>, ns: usize, scale: f32, out: &mut [f32]) {
    for (t, o) in out[..ns].iter_mut().enumerate() {
        *o = dot(q, &k.data[t * k.stride..t * k.stride + q.len()]) * scale;
    }
}

/// Attention's dot product: 8 accumulators by index residue, each term fused into its
/// accumulator (`fma`, one rounding), then [`super::reduce8`]'s tree. The SIMD kernels keep
/// a lane per residue and do the same.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        acc[i % 8] = x.mul_add(y, acc[i % 8]);
    }
    super::reduce8(&acc)
}

/// Turns `scores[from..ns]` into `p = exp(score - m)`, fuses `p * V[t]` into `o` in position
/// order, and returns `l + sum(p)` (summed in position order).
fn weigh(
    scores: &mut [f32],
    (from, ns): (usize, usize),
    m: f32,
    v: Strided<'_>,
    l: f32,
    o: &mut [f32],
) -> f32 {
    let (hd, stride, v, mut l) = (o.len(), v.stride, v.data, l);
    for (t, sc) in scores[..ns].iter_mut().enumerate().skip(from) {
        let p = exp(*sc - m);
        *sc = p;
        l += p;
        for (oe, &ve) in o.iter_mut().zip(&v[t * stride..t * stride + hd]) {
            *oe = p.mul_add(ve, *oe);
        }
    }
    l
}

// exp(x) as Cephes' expf: x = n·ln2 + r with n = floor(x·log2(e) + 0.5), a degree-5
// polynomial in r, times 2ⁿ. Only multiplies and adds in a fixed order (no FMA), so a SIMD
// lane computes the same bits; relative error about 2e-7 over the range softmax uses.
const EXP_HI: f32 = 88.376_26;
const EXP_LO: f32 = -87.336_55;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// The portable twin of the SIMD kernels' `exp_lanes`.
fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI;
    let r = r - n * LN2_LO;
    let z = r * r;
    let mut y = P[0];
    for &c in &P[1..] {
        y = y * r + c;
    }
    let y = (y * z + r) + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `silu(g) · u` of one value, `silu(g) = g / (1 + exp(0 - g))` with this module's [`exp`]
/// (which SIMD lanes compute to the same bits).
/// With `GELU`, `gelu(g) · u` instead, GELU's tanh form written as a sigmoid:
/// `0.5·(1 + tanh(z)) = 1 / (1 + exp(-2z))`, `2z = g·(C2·g² + C1)`.
fn silu_one<const GELU: bool>(g: f32, u: f32) -> f32 {
    let arg = if GELU {
        g * ((GELU_C2 * (g * g)) + GELU_C1)
    } else {
        g
    };
    (g / (1.0 + exp(0.0 - arg))) * u
}

/// `2·sqrt(2/π)` and `2·sqrt(2/π)·0.044715`.
const GELU_C1: f32 = 1.595_769;
const GELU_C2: f32 = 0.071_354_82;

/// `out[i] = silu(gate[i]) · up[i]` at the best level here, the same bits at every level.
pub(crate) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    gated_at::<false>(Simd::detect(), gate, up, out)
}

/// `out[i] = gelu(gate[i]) · up[i]` (GELU's tanh approximation), as [`silu_mul`].
pub(crate) fn gelu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    gated_at::<true>(Simd::detect(), gate, up, out)
}

fn gated_at<const GELU: bool>(simd: Simd, gate: &[f32], up: &[f32], out: &mut [f32]) {
    match simd {
        // SAFETY (both arms): the CPU has the level `Simd::detect` reported (every level
        // above the portable one includes AVX2; Avx512Vnni includes AVX-512F).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512Vnni => unsafe { avx512::gated_mul::<GELU>(gate, up, out) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::gated_mul::<GELU>(gate, up, out) },
        Simd::Portable => {
            for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
                *o = silu_one::<GELU>(g, u);
            }
        }
    }
}

/// The prefill kernels and the exponential at one register width: `$v` holds `$lanes` f32,
/// the intrinsics are its add, sub, mul, min, max, broadcast, load and store, and the module
/// brings `floor` and `pow2` (2ⁿ of an integral `n`) and the lane masks (`Mask`, `below`,
/// `select`, `fma_where`, `is_neg_inf`). `$pair` says whether the score pass takes two
/// positions at once (enough registers for 16 accumulators). One query row runs per lane;
/// per value every width does the portable path's operations in its order.
#[cfg(target_arch = "x86_64")]
macro_rules! prefill_kernels {
    (
        feature: $feat:literal, vector: $v:ty, lanes: $lanes:literal, pair: $pair:literal,
        add: $add:ident, sub: $sub:ident, mul: $mul:ident, fma: $fma:ident, div: $div:ident,
        min: $min:ident, max: $max:ident, set1: $set1:ident, load: $load:ident,
        store: $store:ident $(,)?
    ) => {
        /// [`super::silu_mul`] (or, with `GELU`, [`super::gelu_mul`]), `$lanes` values at
        /// a time (the tail by the portable twin): per value the same operations, so the
        /// same bits.
        #[target_feature(enable = $feat)]
        pub unsafe fn gated_mul<const GELU: bool>(g: &[f32], u: &[f32], out: &mut [f32]) {
            let n = out.len().min(g.len()).min(u.len());
            let mut i = 0;
            while i + $lanes <= n {
                let gv = $load(g.as_ptr().add(i));
                let arg = if GELU {
                    let t = $add(
                        $mul($set1(super::GELU_C2), $mul(gv, gv)),
                        $set1(super::GELU_C1),
                    );
                    $mul(gv, t)
                } else {
                    gv
                };
                let e = exp_lanes($sub($set1(0.0), arg));
                let s = $div(gv, $add($set1(1.0), e));
                $store(out.as_mut_ptr().add(i), $mul(s, $load(u.as_ptr().add(i))));
                i += $lanes;
            }
            for j in i..n {
                out[j] = super::silu_one::<GELU>(g[j], u[j]);
            }
        }

        /// [`super::exp`] on every lane.
        #[inline]
        #[target_feature(enable = $feat)]
        unsafe fn exp_lanes(x: $v) -> $v {
            // Bounds first: on NaN these intrinsics return their second operand, so a NaN
            // stays NaN as in the portable `clamp`.
            let x = $min($set1(EXP_HI), $max($set1(EXP_LO), x));
            let n = floor($add($mul(x, $set1(LOG2E)), $set1(0.5)));
            let r = $sub(x, $mul(n, $set1(LN2_HI)));
            let r = $sub(r, $mul(n, $set1(LN2_LO)));
            let z = $mul(r, r);
            let mut y = $set1(P[0]);
            for &c in &P[1..] {
                y = $add($mul(y, r), $set1(c));
            }
            let y = $add($add($mul(y, z), r), $set1(1.0));
            $mul(y, pow2(n))
        }

        /// One block of one head folded into a tile of rows, lane = row (see
        /// [`super::tile_block`], which checks the reach). Per lane the operations are the
        /// per-row path's: `scores_rows` (8 accumulators by dim residue, `reduce8`'s tree,
        /// times `scale`), `rescale`, `scale_by`, `weigh`. With `MASKED`, a lane's positions
        /// from `lim[lane]` on, and those below `lim[16 + lane]`, leave its max, sum and
        /// output as they were.
        #[target_feature(enable = $feat)]
        pub unsafe fn tile_block<const MASKED: bool>(
            b: &BlockRows<'_>,
            lim: &[i32; 32],
            scale: f32,
            t: Tile<'_>,
            scores: &mut [f32],
        ) {
            const G: usize = if $pair { 2 } else { 1 };
            let hd = t.qt.len() / $lanes;
            let (qp, kp, vp) = (t.qt.as_ptr(), b.k.as_ptr(), b.v.as_ptr());
            let (sp, lp, ns) = (scores.as_mut_ptr(), lim.as_ptr(), b.ns);
            let mut t0 = 0;
            while t0 < ns {
                let mut acc = [[$set1(0.0); 8]; G];
                for c in (0..hd).step_by(8) {
                    for j in 0..8 {
                        let qv = $load(qp.add((c + j) * $lanes));
                        for (u, a) in acc.iter_mut().enumerate() {
                            let kv = $set1(*kp.add((t0 + u) * b.stride + c + j));
                            a[j] = $fma(qv, kv, a[j]);
                        }
                    }
                }
                for (u, a) in acc.iter().enumerate() {
                    let r = $add(
                        $add($add(a[0], a[1]), $add(a[2], a[3])),
                        $add($add(a[4], a[5]), $add(a[6], a[7])),
                    );
                    $store(sp.add((t0 + u) * $lanes), $mul(r, $set1(scale)));
                }
                t0 += G;
            }
            let neg = $set1(f32::NEG_INFINITY);
            let m_old = $load(t.m.as_ptr());
            let mut m = m_old;
            for i in 0..ns {
                let s = $load(sp.add(i * $lanes));
                // The score first: a NaN score leaves the max as it was, as `f32::max` does.
                let s = if MASKED {
                    select(seen(lp, i), s, neg)
                } else {
                    s
                };
                m = $max(s, m);
            }
            let corr = select(is_neg_inf(m_old), $set1(0.0), exp_lanes($sub(m_old, m)));
            let mut l = $mul($load(t.l.as_ptr()), corr);
            for i in 0..ns {
                let p = sp.add(i * $lanes);
                let e = exp_lanes($sub($load(p), m));
                let e = if MASKED {
                    select(seen(lp, i), e, $set1(0.0))
                } else {
                    e
                };
                $store(p, e);
                l = $add(l, e);
            }
            $store(t.m.as_mut_ptr(), m);
            $store(t.l.as_mut_ptr(), l);
            // The output, `$lanes` dims per pass with every accumulator in a register.
            for c in (0..hd).step_by($lanes) {
                let op = t.ot.as_mut_ptr().add(c * $lanes);
                let mut acc = [$set1(0.0); $lanes];
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = $mul($load(op.add(i * $lanes)), corr);
                }
                for i in 0..ns {
                    let p = $load(sp.add(i * $lanes));
                    let vt = vp.add(i * b.stride + c);
                    if MASKED {
                        let keep = seen(lp, i);
                        for (e, a) in acc.iter_mut().enumerate() {
                            *a = fma_where(keep, p, $set1(*vt.add(e)), *a);
                        }
                    } else {
                        for (e, a) in acc.iter_mut().enumerate() {
                            *a = $fma(p, $set1(*vt.add(e)), *a);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    $store(op.add(i * $lanes), *a);
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockRows, Tile, EXP_HI, EXP_LO, LN2_HI, LN2_LO, LOG2E, P};
    use std::arch::x86_64::*;

    prefill_kernels! {
        feature: "avx2,fma", vector: __m256, lanes: 8, pair: false,
        add: _mm256_add_ps, sub: _mm256_sub_ps, mul: _mm256_mul_ps, fma: _mm256_fmadd_ps,
        div: _mm256_div_ps, min: _mm256_min_ps,
        max: _mm256_max_ps, set1: _mm256_set1_ps, load: _mm256_loadu_ps, store: _mm256_storeu_ps,
    }

    /// `scores[t] = exp(scores[t] - m)` for `t < ns`, 8 at a time (`scores` holds `ns`
    /// rounded up to 8).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_row(scores: &mut [f32], ns: usize, m: f32) {
        let mv = _mm256_set1_ps(m);
        let mut t0 = 0;
        while t0 < ns {
            let p = scores.as_mut_ptr().add(t0);
            _mm256_storeu_ps(p, exp_lanes(_mm256_sub_ps(_mm256_loadu_ps(p), mv)));
            t0 += 8;
        }
    }

    /// Lanes where a condition holds: all bits set, or clear.
    type Mask = __m256;

    /// Lanes that see position `t`: `lim` above it, and `lim + 16` not.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn seen(lim: *const i32, t: usize) -> Mask {
        let t = _mm256_set1_epi32(t as i32);
        let hi = _mm256_loadu_si256(lim as *const __m256i);
        let lo = _mm256_loadu_si256(lim.add(16) as *const __m256i);
        _mm256_castsi256_ps(_mm256_andnot_si256(
            _mm256_cmpgt_epi32(lo, t),
            _mm256_cmpgt_epi32(hi, t),
        ))
    }

    /// `a` where `m` holds, else `b`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn select(m: Mask, a: __m256, b: __m256) -> __m256 {
        _mm256_blendv_ps(b, a, m)
    }

    /// `acc + x` where `m` holds, else `acc` untouched.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma_where(m: Mask, a: __m256, b: __m256, acc: __m256) -> __m256 {
        _mm256_blendv_ps(acc, _mm256_fmadd_ps(a, b, acc), m)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn is_neg_inf(x: __m256) -> Mask {
        _mm256_cmp_ps::<_CMP_EQ_OQ>(x, _mm256_set1_ps(f32::NEG_INFINITY))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn floor(x: __m256) -> __m256 {
        _mm256_floor_ps(x)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pow2(n: __m256) -> __m256 {
        let e = _mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127));
        _mm256_castsi256_ps(_mm256_slli_epi32(e, 23))
    }

    pub fn has_f16c() -> bool {
        is_x86_feature_detected!("f16c")
    }

    /// A storage type the decode kernels read K and V in.
    pub trait Lanes: Copy {
        /// 8 values from `p`, as f32.
        ///
        /// # Safety
        /// AVX2 and F16C are present and `p` points at 8 readable values.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Lanes for f32 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Lanes for half::f16 {
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn load8(p: *const half::f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }

    /// Scores of `H` query heads against one KV head's block: row `j` of `out` (`bs`
    /// values each) gets `dot(q_j, K[t]) * scale` for `t < ns` (rounded up to 4), with K[t]
    /// at `k[t * stride..]`. Four slots per pass; each slot's K is converted once for all
    /// heads. The sums are [`super::scores_rows`]'s: per head and slot, 8 lanes accumulate
    /// dims `e % 8` in order, then reduce as `reduce8` does.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_scores<T: Lanes, const H: usize>(
        q: &[f32],
        k: &[T],
        stride: usize,
        ns: usize,
        scale: f32,
        bs: usize,
        out: &mut [f32],
    ) {
        let hd = q.len() / H;
        let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
        let sc = _mm_set1_ps(scale);
        let mut t0 = 0;
        while t0 < ns {
            let mut acc = [[_mm256_setzero_ps(); 4]; H];
            for c in (0..hd).step_by(8) {
                for s in 0..4 {
                    let kv = T::load8(kp.add((t0 + s) * stride + c));
                    for (h, a) in acc.iter_mut().enumerate() {
                        a[s] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(h * hd + c)), kv, a[s]);
                    }
                }
            }
            for (h, &a) in acc.iter().enumerate() {
                store_scores(a, sc, op.add(h * bs + t0));
            }
            t0 += 4;
        }
    }

    /// Four slots' scores from their 8 lanes each: `reduce8` of each, times `sc`, stored at
    /// `out`. hadd pairs lanes (0,1), (2,3), ...; twice gives each slot's lanes 0..4 and
    /// 4..8 sums, and adding the halves finishes reduce8's tree.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn store_scores([a0, a1, a2, a3]: [__m256; 4], sc: __m128, out: *mut f32) {
        let x = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        let r = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        _mm_storeu_ps(out, _mm_mul_ps(r, sc));
    }

    /// `o_j += p_j[t] * V[t]` in position order for `t < ns`, for `H` heads: `p` holds
    /// their rows of `bs` weights, `o` their `hd` outputs each, V[t] is at `v[t * stride..]`.
    /// Each slot's V is converted once for all heads.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_weigh<T: Lanes, const H: usize>(
        p: &[f32],
        bs: usize,
        ns: usize,
        v: &[T],
        stride: usize,
        o: &mut [f32],
    ) {
        let hd = o.len() / H;
        let (pp, vp, op) = (p.as_ptr(), v.as_ptr(), o.as_mut_ptr());
        // 16 dims per pass: 2 accumulators per head stay in registers.
        for c in (0..hd).step_by(16) {
            let mut acc: [[__m256; 2]; H] = std::array::from_fn(|h| {
                let at = op.add(h * hd + c);
                [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))]
            });
            for t in 0..ns {
                let vt = vp.add(t * stride + c);
                let (v0, v1) = (T::load8(vt), T::load8(vt.add(8)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let pv = _mm256_set1_ps(*pp.add(h * bs + t));
                    a[0] = _mm256_fmadd_ps(pv, v0, a[0]);
                    a[1] = _mm256_fmadd_ps(pv, v1, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let at = op.add(h * hd + c);
                _mm256_storeu_ps(at, a[0]);
                _mm256_storeu_ps(at.add(8), a[1]);
            }
        }
    }
}

/// [`avx2`]'s prefill and decode kernels with 16 lanes. Only AVX-512F is assumed: halves of
/// a register move as f64x4 (the f32x8 forms need AVX512DQ).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::avx2::store_scores;
    use super::{BlockRows, Tile, EXP_HI, EXP_LO, LN2_HI, LN2_LO, LOG2E, P};
    use std::arch::x86_64::*;

    prefill_kernels! {
        feature: "avx512f", vector: __m512, lanes: 16, pair: true,
        add: _mm512_add_ps, sub: _mm512_sub_ps, mul: _mm512_mul_ps, fma: _mm512_fmadd_ps,
        div: _mm512_div_ps, min: _mm512_min_ps,
        max: _mm512_max_ps, set1: _mm512_set1_ps, load: _mm512_loadu_ps, store: _mm512_storeu_ps,
    }

    type Mask = __mmask16;

    /// Lanes that see position `t`: `lim` above it, and `lim + 16` not.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn seen(lim: *const i32, t: usize) -> Mask {
        let t = _mm512_set1_epi32(t as i32);
        _mm512_cmpgt_epi32_mask(_mm512_loadu_epi32(lim), t)
            & _mm512_cmple_epi32_mask(_mm512_loadu_epi32(lim.add(16)), t)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn select(m: Mask, a: __m512, b: __m512) -> __m512 {
        _mm512_mask_blend_ps(m, b, a)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fma_where(m: Mask, a: __m512, b: __m512, acc: __m512) -> __m512 {
        _mm512_mask3_fmadd_ps(a, b, acc, m)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn is_neg_inf(x: __m512) -> Mask {
        _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(x, _mm512_set1_ps(f32::NEG_INFINITY))
    }

    /// A storage type the AVX-512 decode kernels read K and V in.
    pub trait Lanes16: super::avx2::Lanes {
        /// 16 values from `p`, as f32.
        ///
        /// # Safety
        /// AVX-512F is present and `p` points at 16 readable values.
        unsafe fn load16(p: *const Self) -> __m512;

        /// 8 values from `a` in the low half and 8 from `b` in the high half, as f32.
        ///
        /// # Safety
        /// AVX-512F is present and both point at 8 readable values.
        unsafe fn load8x2(a: *const Self, b: *const Self) -> __m512;
    }

    impl Lanes16 for f32 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load8x2(a: *const f32, b: *const f32) -> __m512 {
            let lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(a)));
            let hi = _mm256_castps_pd(_mm256_loadu_ps(b));
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(lo, hi))
        }
    }

    impl Lanes16 for half::f16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const half::f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }

        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load8x2(a: *const half::f16, b: *const half::f16) -> __m512 {
            let (lo, hi) = (a as *const __m128i, b as *const __m128i);
            _mm512_cvtph_ps(_mm256_set_m128i(_mm_loadu_si128(hi), _mm_loadu_si128(lo)))
        }
    }

    /// The low and high 8 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn halves(x: __m512) -> (__m256, __m256) {
        let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x));
        (_mm512_castps512_ps256(x), _mm256_castpd_ps(hi))
    }

    /// [`super::avx2::group_scores`] with two slots per register (low and high 8 lanes), so
    /// each lane accumulates the same dims of the same slot in the same order, and the same
    /// reduction finishes it.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn group_scores<T: Lanes16, const H: usize>(
        q: &[f32],
        k: &[T],
        stride: usize,
        ns: usize,
        scale: f32,
        bs: usize,
        out: &mut [f32],
    ) {
        let hd = q.len() / H;
        let (qp, kp, op) = (q.as_ptr(), k.as_ptr(), out.as_mut_ptr());
        let sc = _mm_set1_ps(scale);
        let mut t0 = 0;
        while t0 < ns {
            // acc[h][0]: slots t0 and t0 + 1; acc[h][1]: slots t0 + 2 and t0 + 3.
            let mut acc = [[_mm512_setzero_ps(); 2]; H];
            for c in (0..hd).step_by(8) {
                let slot = |s: usize| kp.add((t0 + s) * stride + c);
                let kv = [T::load8x2(slot(0), slot(1)), T::load8x2(slot(2), slot(3))];
                for (h, a) in acc.iter_mut().enumerate() {
                    let q8 = _mm256_castps_pd(_mm256_loadu_ps(qp.add(h * hd + c)));
                    let qv = _mm512_castpd_ps(_mm512_broadcast_f64x4(q8));
                    a[0] = _mm512_fmadd_ps(qv, kv[0], a[0]);
                    a[1] = _mm512_fmadd_ps(qv, kv[1], a[1]);
                }
            }
            for (h, &[a01, a23]) in acc.iter().enumerate() {
                let ((a0, a1), (a2, a3)) = (halves(a01), halves(a23));
                store_scores([a0, a1, a2, a3], sc, op.add(h * bs + t0));
            }
            t0 += 4;
        }
    }

    /// [`super::avx2::group_weigh`] with 16 dims per register, 64 per pass (then 16).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn group_weigh<T: Lanes16, const H: usize>(
        p: &[f32],
        bs: usize,
        ns: usize,
        v: &[T],
        stride: usize,
        o: &mut [f32],
    ) {
        let hd = o.len() / H;
        let mut c = 0;
        while c < hd {
            if hd - c >= 64 {
                weigh_dims::<T, H, 4>(p, bs, ns, v.as_ptr().add(c), stride, o, c);
                c += 64;
            } else {
                weigh_dims::<T, H, 1>(p, bs, ns, v.as_ptr().add(c), stride, o, c);
                c += 16;
            }
        }
    }

    /// `o_j[c..c + 16 * C] += p_j[t] * V[t][c..]` in position order, every accumulator in a
    /// register (`v` points at V[0][c]).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn weigh_dims<T: Lanes16, const H: usize, const C: usize>(
        p: &[f32],
        bs: usize,
        ns: usize,
        v: *const T,
        stride: usize,
        o: &mut [f32],
        c: usize,
    ) {
        let hd = o.len() / H;
        let (pp, op) = (p.as_ptr(), o.as_mut_ptr());
        let mut acc = [[_mm512_setzero_ps(); C]; H];
        for (h, a) in acc.iter_mut().enumerate() {
            for (r, x) in a.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(op.add(h * hd + c + 16 * r));
            }
        }
        for t in 0..ns {
            let mut vv = [_mm512_setzero_ps(); C];
            for (r, x) in vv.iter_mut().enumerate() {
                *x = T::load16(v.add(t * stride + 16 * r));
            }
            for (h, a) in acc.iter_mut().enumerate() {
                let pv = _mm512_set1_ps(*pp.add(h * bs + t));
                for (x, &vr) in a.iter_mut().zip(&vv) {
                    *x = _mm512_fmadd_ps(pv, vr, *x);
                }
            }
        }
        for (h, a) in acc.iter().enumerate() {
            for (r, x) in a.iter().enumerate() {
                _mm512_storeu_ps(op.add(h * hd + c + 16 * r), *x);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn floor(x: __m512) -> __m512 {
        _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(x)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pow2(n: __m512) -> __m512 {
        let e = _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127));
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gates `g` (SiLU, or GELU with `GELU`) times an up projection at every SIMD level,
    /// asserts each gives the portable bits, and returns the up projection and those bits.
    fn gated_levels_agree<const GELU: bool>(g: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 - i as f32 * 0.013).collect();
        let mut want = vec![0f32; g.len()];
        gated_at::<GELU>(Simd::Portable, g, &u, &mut want);
        for simd in Simd::runnable() {
            let mut got = vec![0f32; g.len()];
            gated_at::<GELU>(simd, g, &u, &mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{simd:?}");
        }
        (u, want)
    }

    /// SiLU gives the portable bits at every SIMD level (a tail shorter than a register
    /// included), over the range activations take and past the exponential's bounds.
    #[test]
    fn silu_levels_agree_bitwise() {
        let g: Vec<f32> = (0..203)
            .map(|i| (i as f32 - 101.0) * 0.37)
            .chain([0.0, -0.0, 95.0, -95.0, 1e-30, f32::MIN_POSITIVE])
            .collect();
        let (u, want) = gated_levels_agree::<false>(&g);
        // And it is SiLU: g·sigmoid(g)·u within the exponential's error.
        for ((&gi, &ui), &w) in g.iter().zip(&u).zip(&want) {
            let exact = gi as f64 / (1.0 + (-gi as f64).exp()) * ui as f64;
            assert!(
                (w as f64 - exact).abs() <= 1e-6 * exact.abs().max(1e-30),
                "{gi}: {w} vs {exact}"
            );
        }
    }

    /// GELU (tanh form) gives the portable bits at every SIMD level, and is GELU.
    #[test]
    fn gelu_levels_agree_bitwise() {
        let g: Vec<f32> = (0..203)
            .map(|i| (i as f32 - 101.0) * 0.07)
            .chain([0.0, -0.0, 95.0, -95.0, 1e-30, 3e3, -3e3])
            .collect();
        let (u, want) = gated_levels_agree::<true>(&g);
        for ((&gi, &ui), &w) in g.iter().zip(&u).zip(&want).take(203) {
            let x = gi as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let exact = 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh()) * ui as f64;
            assert!(
                (w as f64 - exact).abs() <= 1e-5 * exact.abs() + 1e-9,
                "{gi}: {w} vs {exact}"
            );
        }
    }

    /// The portable exp is close to libm's over the range softmax feeds it.
    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
    }

    /// Every SIMD level this CPU has gives the portable path's bits: prefill tiles with and
    /// without padding lanes, blocks seen whole and through the causal mask, chunks that
    /// start mid-sequence, decode rows, sliding windows (which start inside a block, at a
    /// block's edge, or cover everything), and K and V stored as f16, f32 and q8_0. With f32
    /// K and V, the portable result is softmax attention over the window (f64 reference).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn levels_attend_the_same_bits() {
        use crate::kv_cache::{KvDtype, KvLayout};
        let len = 96;
        let val = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 16.0;
        // One scratch for every call, as a worker thread keeps it: stale values must not leak.
        let mut scratch = Scratch::new();
        // (KV heads, query heads, head size, block size): the default model's shape, 8-slot
        // blocks, and a head size that is a multiple of 8 only (AVX2 tiles, no fused decode).
        for (n_kv, n_head, hd, bs) in [
            (3, 9, 64, 16),
            (2, 4, 64, 8),
            (1, 2, 40, 16),
            (1, 4, 256, 16),
        ] {
            let mut levels = Vec::new();
            for simd in Simd::runnable() {
                match simd {
                    Simd::Avx2 => levels.push(Level::Avx2),
                    Simd::Avx512Vnni if hd % 16 == 0 => levels.push(Level::Avx512),
                    _ => {}
                }
            }
            let d = n_head * hd;
            let q: Vec<f32> = (0..len * d).map(|i| val(i + 5) / 4.0).collect();
            for dtype in [KvDtype::F16, KvDtype::F32, KvDtype::Q8_0] {
                if dtype == KvDtype::Q8_0 && hd % 32 != 0 {
                    continue;
                }
                let layout = KvLayout {
                    n_layer: 1,
                    n_kv_head: n_kv,
                    head_dim: hd,
                    block_size: bs,
                    dtype,
                    window: None,
                };
                let mut cache = KvCache::new(layout, len / bs + 1, 0);
                let mut table = cache.allocate(len / bs).expect("blocks");
                // Blocks out of order in the pool, as a long-running engine has them.
                table.reverse();
                let kvd = n_kv * hd;
                for pos in 0..len {
                    let k: Vec<f32> = (0..kvd).map(|e| val(pos * kvd + e) / 2.0).collect();
                    let v: Vec<f32> = (0..kvd).map(|e| val(pos * kvd + e + 13)).collect();
                    cache.write(0, &table, pos, &k, &v);
                }
                let cases = [
                    (1, 40),
                    (1, 5),
                    (9, 8),
                    (20, 33),
                    (70, 17),
                    (33, 64),
                    (96, 1),
                    (50, 1),
                ];
                let windows = [usize::MAX, 1, 7, 16, 30];
                for ((first_ctx, rows), window) in cases
                    .into_iter()
                    .flat_map(|c| windows.iter().map(move |&w| (c, w)))
                {
                    let r = Rows {
                        table: &table,
                        first_ctx,
                        window,
                        q: (&q[..], d),
                        n_head,
                    };
                    let mut want = vec![0f32; rows * d];
                    attend_at(Level::Portable, &cache, 0, &r, &mut want, &mut scratch);
                    assert!(want.iter().all(|x| x.is_finite()));
                    if dtype == KvDtype::F32 {
                        let group = n_head / n_kv;
                        for i in 0..rows {
                            let n_ctx = first_ctx + i;
                            for h in 0..n_head {
                                let (g, qh) = (h / group, &q[i * d + h * hd..][..hd]);
                                let at = |pos: usize, e: usize, off: usize| {
                                    val(pos * kvd + g * hd + e + off) as f64
                                };
                                let seen = r.first_seen(n_ctx)..n_ctx;
                                let sc: Vec<f64> = seen
                                    .clone()
                                    .map(|p| {
                                        (0..hd)
                                            .map(|e| qh[e] as f64 * at(p, e, 0) / 2.0)
                                            .sum::<f64>()
                                            / (hd as f64).sqrt()
                                    })
                                    .collect();
                                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                                let w: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                                let sum: f64 = w.iter().sum();
                                for e in 0..hd {
                                    let o: f64 = seen
                                        .clone()
                                        .zip(&w)
                                        .map(|(p, wp)| wp * at(p, e, 13))
                                        .sum::<f64>()
                                        / sum;
                                    let got = want[i * d + h * hd + e] as f64;
                                    assert!(
                                        (got - o).abs() < 1e-4 * o.abs().max(1.0),
                                        "window {window} ctx {n_ctx} head {h} dim {e}: {got} vs {o}"
                                    );
                                }
                            }
                        }
                    }
                    for &level in &levels {
                        let mut got = vec![0f32; rows * d];
                        attend_at(level, &cache, 0, &r, &mut got, &mut scratch);
                        let lanes = level.lanes();
                        let case = format!(
                            "{dtype} hd={hd} bs={bs} lanes={lanes} first_ctx={first_ctx} rows={rows} window={window}"
                        );
                        let diff = (0..want.len()).find(|&i| want[i].to_bits() != got[i].to_bits());
                        assert_eq!(diff, None, "{case}: first differing value");
                    }
                }
            }
        }
    }

    /// The decode path (per KV head, heads in passes of up to 3, K and V as f32 or f16)
    /// gives the bits of the portable per-head path, over two blocks so the running-max
    /// rescale is exercised too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn decode_block_matches_portable_bitwise() {
        // Says what it compared, and fails where SPLITSERVE_REQUIRE_SIMD asks for more.
        let levels = Simd::runnable();
        if !is_x86_feature_detected!("avx2") || !avx2::has_f16c() {
            println!("no AVX2 or F16C here: only the portable path, nothing to compare");
            return;
        }
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        // The AVX2 kernels, and the AVX-512 ones where the CPU has them.
        let wides = [false, true];
        let wides = &wides[..1 + usize::from(levels.contains(&Simd::Avx512Vnni))];
        // Groups in passes of 3 + 1, 2, 3, 3 + 2 and 3 + 3 + 2 heads; head sizes 64, 128 and
        // 80 (64 dims and then 16 per AVX-512 pass).
        let shapes = [
            (2, 4, 64),
            (3, 2, 64),
            (1, 3, 128),
            (1, 5, 64),
            (2, 8, 128),
            (1, 3, 80),
        ];
        for ((n_kv, group, hd), &wide) in shapes
            .into_iter()
            .flat_map(|s| wides.iter().map(move |w| (s, w)))
        {
            let bs = 16;
            let (per_slot, n_head) = (n_kv * hd, n_kv * group);
            let dims = Dims {
                bs,
                n_kv,
                hd,
                group,
                scale: 0.125,
                wide,
            };
            // Values f16 holds exactly, so both storage types describe the same block.
            let val = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 16.0;
            let blocks: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
                .map(|b| {
                    let k = (0..bs * per_slot).map(|i| val(i + 7 * b)).collect();
                    let v = (0..bs * per_slot).map(|i| val(i + 11 + b)).collect();
                    (k, v)
                })
                .collect();
            let q: Vec<f32> = (0..n_head * hd).map(|i| val(i + 3) / 8.0).collect();
            for ns in [1, 5, 8, 13, 16] {
                let fresh = || {
                    (
                        vec![f32::NEG_INFINITY; n_head],
                        vec![0f32; n_head],
                        vec![0f32; n_head * hd],
                    )
                };
                // Portable: per head, scores from K rows, rescale, weigh.
                let (mut m, mut l, mut o) = fresh();
                let mut sc = vec![0f32; bs];
                for (k, v) in &blocks {
                    for h in 0..n_head {
                        let g = h / group;
                        let (kg, vg) = (&k[g * hd..], &v[g * hd..]);
                        let qh = &q[h * hd..(h + 1) * hd];
                        let stride = per_slot;
                        scores_rows(qh, Strided { data: kg, stride }, ns, 0.125, &mut sc);
                        let (new_m, corr) = rescale(m[h], &sc[..ns]);
                        let oh = &mut o[h * hd..(h + 1) * hd];
                        scale_by(oh, corr);
                        l[h] = weigh(
                            &mut sc,
                            (0, ns),
                            new_m,
                            Strided { data: vg, stride },
                            l[h] * corr,
                            oh,
                        );
                        m[h] = new_m;
                    }
                }
                let (mut m32, mut l32, mut o32) = fresh();
                let (mut m16, mut l16, mut o16) = fresh();
                let mut scores = vec![0f32; GROUP_PASS * bs];
                for (k, v) in &blocks {
                    let row = (&mut m32[..], &mut l32[..], &mut o32[..]);
                    decode_block(k, v, (0, ns), &q, &dims, row, &mut scores);
                    let (k16, v16): (Vec<half::f16>, Vec<half::f16>) = (
                        k.iter().map(|&x| half::f16::from_f32(x)).collect(),
                        v.iter().map(|&x| half::f16::from_f32(x)).collect(),
                    );
                    let row = (&mut m16[..], &mut l16[..], &mut o16[..]);
                    decode_block(&k16, &v16, (0, ns), &q, &dims, row, &mut scores);
                }
                let case = format!("n_kv={n_kv} group={group} hd={hd} ns={ns} wide={wide}");
                for (mx, lx, ox) in [(&m32, &l32, &o32), (&m16, &l16, &o16)] {
                    assert_eq!(bits(&m), bits(mx), "m {case}");
                    assert_eq!(bits(&l), bits(lx), "l {case}");
                    assert_eq!(bits(&o), bits(ox), "o {case}");
                }
            }
        }
    }
}
