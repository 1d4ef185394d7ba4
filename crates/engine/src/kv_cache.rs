//! The paged KV cache: a pool of fixed-size blocks, one K and one V region per layer.
//!
//! Layout of one layer's region: `[block][slot][kv_head][head_dim]`. A request owns a block
//! table (block ids in position order); position `p` lives in block `table[p / block_size]`,
//! slot `p % block_size`.

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

/// How K and V values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    F16,
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" | "auto" => Ok(KvDtype::F16),
            "f32" | "fp32" | "float32" => Ok(KvDtype::F32),
            other => Err(format!(
                "unknown KV cache dtype {other:?} (expected f16 or f32)"
            )),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F16 => "f16",
            KvDtype::F32 => "f32",
        })
    }
}

pub(crate) enum Region {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl Region {
    fn new(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F16 => Region::F16(vec![f16::ZERO; n]),
            KvDtype::F32 => Region::F32(vec![0.0; n]),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Region::F16(v) => v[at..at + src.len()].convert_from_f32_slice(src),
            Region::F32(v) => v[at..at + src.len()].copy_from_slice(src),
        }
    }

    /// The raw little-endian bytes of values `at..at + n`.
    fn bytes_of(&self, at: usize, n: usize, out: &mut Vec<u8>) {
        match self {
            Region::F16(v) => out.extend_from_slice(as_bytes(v[at..at + n].reinterpret_cast())),
            Region::F32(v) => out.extend_from_slice(as_bytes(&v[at..at + n])),
        }
    }

    fn set_bytes(&mut self, at: usize, src: &[u8]) {
        match self {
            Region::F16(v) => {
                let dst = v[at..at + src.len() / 2].reinterpret_cast_mut();
                let n = dst.len() * 2;
                as_bytes_mut(dst).copy_from_slice(&src[..n]);
            }
            Region::F32(v) => {
                let dst = &mut v[at..at + src.len() / 4];
                let n = dst.len() * 4;
                as_bytes_mut(dst).copy_from_slice(&src[..n]);
            }
        }
    }

    pub fn read(&self, at: usize, dst: &mut [f32]) {
        match self {
            Region::F16(v) => v[at..at + dst.len()].convert_to_f32_slice(dst),
            Region::F32(v) => dst.copy_from_slice(&v[at..at + dst.len()]),
        }
    }
}

/// Plain numbers as their bytes. The wire format is little-endian, so big-endian targets
/// are refused at compile time rather than silently byte-swapped.
#[cfg(target_endian = "little")]
fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: T is u16 or f32 here: no padding, every byte initialised; the length covers
    // exactly the slice's memory.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

#[cfg(target_endian = "little")]
fn as_bytes_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; any byte pattern is a valid u16 or f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// Geometry of the cache, the part a peer must agree on before KV crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub n_layer: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    /// The cache geometry of a model at a block size and storage type.
    pub fn for_model(c: &crate::gguf::ModelConfig, block_size: usize, dtype: KvDtype) -> Self {
        Self {
            n_layer: c.n_layer,
            n_kv_head: c.n_head_kv,
            head_dim: c.head_dim,
            block_size,
            dtype,
        }
    }

    /// Values of one block in one layer, for K (or for V).
    pub fn block_values(&self) -> usize {
        self.block_size * self.n_kv_head * self.head_dim
    }

    /// Bytes of one block over all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        self.block_values() * 2 * self.n_layer * self.dtype.bytes()
    }
}

pub(crate) struct KvCache {
    pub layout: KvLayout,
    pub k: Vec<Region>,
    pub v: Vec<Region>,
    free: Vec<u32>,
}

impl KvCache {
    pub fn new(layout: KvLayout, num_blocks: usize) -> Self {
        let n = num_blocks * layout.block_values();
        Self {
            k: (0..layout.n_layer)
                .map(|_| Region::new(layout.dtype, n))
                .collect(),
            v: (0..layout.n_layer)
                .map(|_| Region::new(layout.dtype, n))
                .collect(),
            // Pop from the end: low ids first, which keeps runs reproducible.
            free: (0..num_blocks as u32).rev().collect(),
            layout,
        }
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` blocks, or none if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let at = self.free.len() - n;
        let mut got = self.free.split_off(at);
        got.reverse();
        Some(got)
    }

    pub fn release(&mut self, blocks: &mut Vec<u32>) {
        self.free.extend(blocks.drain(..).rev());
    }

    fn offset(&self, table: &[u32], pos: usize) -> usize {
        let l = &self.layout;
        let blk = table[pos / l.block_size] as usize;
        (blk * l.block_size + pos % l.block_size) * l.n_kv_head * l.head_dim
    }

    /// Appends the K then V bytes of one block in one layer (little-endian, storage dtype).
    pub fn block_bytes(&self, layer: usize, block: u32, out: &mut Vec<u8>) {
        let n = self.layout.block_values();
        let at = block as usize * n;
        self.k[layer].bytes_of(at, n, out);
        self.v[layer].bytes_of(at, n, out);
    }

    /// Writes one block of one layer from bytes laid out as [`Self::block_bytes`] makes them.
    pub fn set_block_bytes(&mut self, layer: usize, block: u32, src: &[u8]) {
        let n = self.layout.block_values();
        let half = n * self.layout.dtype.bytes();
        let at = block as usize * n;
        self.k[layer].set_bytes(at, &src[..half]);
        self.v[layer].set_bytes(at, &src[half..2 * half]);
    }

    /// Stores one token's K and V (`n_kv_head * head_dim` each) for `layer`.
    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let at = self.offset(table, pos);
        self.k[layer].write(at, k);
        self.v[layer].write(at, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_and_release_keep_count() {
        let layout = KvLayout {
            n_layer: 1,
            n_kv_head: 1,
            head_dim: 2,
            block_size: 4,
            dtype: KvDtype::F16,
        };
        let mut c = KvCache::new(layout, 10);
        let mut a = c.allocate(3).unwrap_or_default();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(c.num_free(), 7);
        assert!(c.allocate(8).is_none());
        assert_eq!(c.num_free(), 7);
        let mut b = c.allocate(7).unwrap_or_default();
        assert_eq!(c.num_free(), 0);
        c.release(&mut a);
        c.release(&mut b);
        assert_eq!(c.num_free(), 10);
        assert!(a.is_empty());
    }
}
