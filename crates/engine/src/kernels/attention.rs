//! Paged attention for one query row, read straight from the block pool.
//!
//! Per head, an online softmax walks the row's blocks in position order; a block's scores are
//! computed, then folded into the running max, sum and weighted V. The order depends only on
//! the row's own position and the block size, never on the chunk or batch it sits in.

use crate::kv_cache::{KvCache, Region};

pub(crate) struct Scratch {
    k: Vec<f32>,
    v: Vec<f32>,
    scores: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            k: Vec::new(),
            v: Vec::new(),
            scores: Vec::new(),
            m: Vec::new(),
            l: Vec::new(),
        }
    }
}

/// `out = softmax(q·Kᵀ·scale)·V` over positions `0..n_ctx` of the sequence with `table`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_row(
    cache: &KvCache,
    layer: usize,
    table: &[u32],
    n_ctx: usize,
    q: &[f32],
    n_head: usize,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let lay = &cache.layout;
    let (bs, n_kv, hd) = (lay.block_size, lay.n_kv_head, lay.head_dim);
    let group = n_head / n_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_slot = n_kv * hd;
    s.k.resize(bs * per_slot, 0.0);
    s.v.resize(bs * per_slot, 0.0);
    s.scores.resize(bs, 0.0);
    s.m.clear();
    s.m.resize(n_head, f32::NEG_INFINITY);
    s.l.clear();
    s.l.resize(n_head, 0.0);
    out.fill(0.0);
    let (kr, vr): (&Region, &Region) = (cache.k(layer), cache.v(layer));
    for (bi, &blk) in table.iter().enumerate() {
        let start = bi * bs;
        if start >= n_ctx {
            break;
        }
        let ns = bs.min(n_ctx - start);
        let at = blk as usize * bs * per_slot;
        kr.read(at, &mut s.k[..ns * per_slot]);
        vr.read(at, &mut s.v[..ns * per_slot]);
        for h in 0..n_head {
            let g = h / group;
            let qh = &q[h * hd..(h + 1) * hd];
            let mut bmax = f32::NEG_INFINITY;
            for t in 0..ns {
                let kt = &s.k[t * per_slot + g * hd..t * per_slot + (g + 1) * hd];
                let sc = super::dot_f32(qh, kt) * scale;
                s.scores[t] = sc;
                bmax = bmax.max(sc);
            }
            let new_m = s.m[h].max(bmax);
            let corr = if s.m[h] == f32::NEG_INFINITY {
                0.0
            } else {
                (s.m[h] - new_m).exp()
            };
            let oh = &mut out[h * hd..(h + 1) * hd];
            if corr != 1.0 {
                for o in oh.iter_mut() {
                    *o *= corr;
                }
            }
            let mut l = s.l[h] * corr;
            for t in 0..ns {
                let p = (s.scores[t] - new_m).exp();
                l += p;
                let vt = &s.v[t * per_slot + g * hd..t * per_slot + (g + 1) * hd];
                for (o, &vv) in oh.iter_mut().zip(vt) {
                    *o += p * vv;
                }
            }
            s.l[h] = l;
            s.m[h] = new_m;
        }
    }
    for h in 0..n_head {
        let inv = 1.0 / s.l[h];
        for o in &mut out[h * hd..(h + 1) * hd] {
            *o *= inv;
        }
    }
}
