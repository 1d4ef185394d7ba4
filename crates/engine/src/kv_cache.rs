//! The paged KV cache: a pool of fixed-size blocks, one K and one V region per layer.
//!
//! Layout of one layer's region: `[block][slot][kv_head][head_dim]`. A request owns a block
//! table (block ids in position order); position `p` lives in block `table[p / block_size]`,
//! slot `p % block_size`.

use std::collections::{BTreeMap, HashMap};

use half::f16;
use half::slice::HalfFloatSliceExt;
use serde::{Deserialize, Serialize};

use std::sync::atomic::{AtomicU32, Ordering};

use crate::gguf::SlidingWindow;
use crate::prefix_cache::BlockHash;

/// How K and V values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    F16,
    F32,
    /// llama.cpp's `q8_0` (`--cache-type-k q8_0`): groups of [`Q8_GROUP`] values as an f16
    /// scale and one i8 each. Half the bytes of f16, so attention reads half as much.
    Q8_0,
}

/// Values per q8_0 group; a head's values split into whole groups.
pub const Q8_GROUP: usize = 32;
/// Bytes of one q8_0 group: the f16 scale, then the i8 values.
const Q8_BYTES: usize = 2 + Q8_GROUP;

impl KvDtype {
    /// Bytes that `n` values take (for q8_0, `n` is a whole number of groups).
    pub fn size_of(self, n: usize) -> usize {
        debug_assert!(self != KvDtype::Q8_0 || n.is_multiple_of(Q8_GROUP));
        match self {
            KvDtype::F16 => 2 * n,
            KvDtype::F32 => 4 * n,
            KvDtype::Q8_0 => n / Q8_GROUP * Q8_BYTES,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" | "auto" => Ok(KvDtype::F16),
            "f32" | "fp32" | "float32" => Ok(KvDtype::F32),
            "q8_0" => Ok(KvDtype::Q8_0),
            other => Err(format!(
                "unknown KV cache dtype {other:?} (expected f16, f32 or q8_0)"
            )),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F16 => "f16",
            KvDtype::F32 => "f32",
            KvDtype::Q8_0 => "q8_0",
        })
    }
}

/// One layer's K (or V) values for every block, in the storage type.
///
/// The memory is shared (an engine thread and connector threads reach it through
/// [`Memory`]), so every access names its range and touches nothing else. The rule that
/// keeps this sound: a block is used by one party at a time — the engine for blocks in its
/// requests' tables, a lease holder for blocks lent to it (the engine does not touch those
/// until the lease comes back).
pub(crate) struct Region {
    dtype: KvDtype,
    /// `words * 4` bytes rounded up to whole pages (huge ones for a region of at least one).
    map: PageMapping,
    words: usize,
}

/// Zeroed anonymous memory from [`map_huge`], unmapped on drop: the pool's kind of memory,
/// public so that benchmarks can copy between buffers like its regions.
pub struct PageMapping {
    ptr: *mut u8,
    mapped: usize,
}

impl PageMapping {
    /// At least `bytes` bytes, on 2 MiB pages where `bytes` reaches one and the kernel allows.
    pub fn new(bytes: usize) -> Self {
        let (ptr, mapped) = map_huge(bytes);
        Self { ptr, mapped }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The bytes mapped: the size asked for, rounded up to whole pages.
    pub fn len(&self) -> usize {
        self.mapped
    }

    pub fn is_empty(&self) -> bool {
        self.mapped == 0
    }
}

impl Drop for PageMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `map_huge` made; its owner is gone, so nothing uses it now.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.mapped) };
    }
}

/// The size of a transparent huge page on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

// SAFETY: the region owns its allocation; concurrent use is limited to disjoint ranges by
// the block-ownership rule above.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(dtype: KvDtype, n: usize) -> Self {
        // u32 words: aligned for f32 and f16 alike.
        let words = dtype.size_of(n).div_ceil(4);
        Self {
            dtype,
            map: PageMapping::new(words * 4),
            words,
        }
    }

    /// Bytes of values `at..at + n`.
    ///
    /// # Safety
    /// Nobody writes these values while the slice lives.
    unsafe fn bytes(&self, at: usize, n: usize) -> &[u8] {
        let (at, n) = self.byte_range(at, n);
        std::slice::from_raw_parts(self.map.ptr.cast_const().add(at), n)
    }

    /// Byte offset and length of values `at..at + n`.
    fn byte_range(&self, at: usize, n: usize) -> (usize, usize) {
        if self.dtype == KvDtype::Q8_0 {
            assert!(
                at.is_multiple_of(Q8_GROUP) && n.is_multiple_of(Q8_GROUP),
                "q8_0 ranges are whole groups"
            );
        }
        let (b, len) = (self.dtype.size_of(at), self.dtype.size_of(n));
        assert!(b + len <= self.words * 4, "KV range out of bounds");
        (b, len)
    }

    /// Bytes of values `at..at + n`, writable.
    ///
    /// # Safety
    /// Nobody else reads or writes these values while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn bytes_mut(&self, at: usize, n: usize) -> &mut [u8] {
        let (at, n) = self.byte_range(at, n);
        std::slice::from_raw_parts_mut(self.map.ptr.add(at), n)
    }

    /// Stores `src` at values `at..`; the caller owns those values' block (engine thread).
    fn write(&self, at: usize, src: &[f32]) {
        // SAFETY: the values are in a block of a request of the calling engine thread.
        let dst = unsafe { self.bytes_mut(at, src.len()) };
        match self.dtype {
            KvDtype::F16 => {
                let v: &mut [f16] = unsafe {
                    std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut f16, src.len())
                };
                v.convert_from_f32_slice(src);
            }
            KvDtype::F32 => {
                let v: &mut [f32] = unsafe {
                    std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut f32, src.len())
                };
                v.copy_from_slice(src);
            }
            KvDtype::Q8_0 => q8_quantize(src, dst),
        }
    }

    /// Asks the CPU to start fetching values `at..at + n` into cache (a hint; no effect
    /// off x86-64). Attention calls it for the next block while it works on this one, so
    /// reading K and V from memory overlaps the arithmetic.
    pub fn prefetch(&self, at: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let end = self.dtype.size_of(at + n).min(self.words * 4);
            let base = self.map.ptr as *const i8;
            let mut b = self.dtype.size_of(at);
            while b < end {
                // SAFETY: the address is inside the allocation; a prefetch never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(b)) };
                b += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (at, n);
    }

    /// Values `at..at + n` as stored, when they are stored as f16 (`None` otherwise).
    /// Decode attention converts these in registers.
    ///
    /// # Safety
    /// The values are in the caller's blocks, as for `read`, and nobody writes them while
    /// the slice lives.
    pub unsafe fn f16s(&self, at: usize, n: usize) -> Option<&[f16]> {
        if self.dtype != KvDtype::F16 {
            return None;
        }
        // SAFETY: the caller's promise; f16 values are 2-byte aligned in a u32 allocation.
        let src = unsafe { self.bytes(at, n) };
        Some(unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f16, n) })
    }

    /// Loads values `at..at + dst.len()` as f32; the caller's blocks, as for `write`.
    pub fn read(&self, at: usize, dst: &mut [f32]) {
        // SAFETY: as for `write`; readers on several engine threads share the slice.
        let src = unsafe { self.bytes(at, dst.len()) };
        match self.dtype {
            KvDtype::F16 => {
                let v: &[f16] =
                    unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f16, dst.len()) };
                f16_to_f32(v, dst);
            }
            KvDtype::F32 => {
                let v: &[f32] =
                    unsafe { std::slice::from_raw_parts(src.as_ptr() as *const f32, dst.len()) };
                dst.copy_from_slice(v);
            }
            KvDtype::Q8_0 => q8_dequantize(src, dst),
        }
    }
}

/// Stores `src` as q8_0 groups in `dst`: scale `d = max|x| / 127` (as f16), values
/// `round(x / d)` (half away from zero), as llama.cpp's reference `quantize_row_q8_0_ref`.
fn q8_quantize(src: &[f32], dst: &mut [u8]) {
    for (x, g) in src
        .chunks_exact(Q8_GROUP)
        .zip(dst.chunks_exact_mut(Q8_BYTES))
    {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        g[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, &v) in g[2..].iter_mut().zip(x) {
            *q = (v * id).round() as i8 as u8;
        }
    }
}

/// `dst[i] = d * q[i]` per q8_0 group of `src`: one exact product per value, so the AVX2
/// path gives the same bits as the portable one.
fn q8_dequantize(src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX2 and F16C (checked above).
        unsafe { q8_dequantize_avx2(src, dst) };
        return;
    }
    q8_dequantize_portable(src, dst);
}

fn q8_dequantize_portable(src: &[u8], dst: &mut [f32]) {
    for (g, out) in src
        .chunks_exact(Q8_BYTES)
        .zip(dst.chunks_exact_mut(Q8_GROUP))
    {
        let d = f16::from_le_bytes([g[0], g[1]]).to_f32();
        for (o, &q) in out.iter_mut().zip(&g[2..]) {
            *o = d * f32::from(q as i8);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn q8_dequantize_avx2(src: &[u8], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    for (g, out) in src
        .chunks_exact(Q8_BYTES)
        .zip(dst.chunks_exact_mut(Q8_GROUP))
    {
        let d = _mm256_set1_ps(f16::from_le_bytes([g[0], g[1]]).to_f32());
        let q = g.as_ptr().add(2);
        for k in 0..Q8_GROUP / 8 {
            let b = _mm_loadl_epi64(q.add(8 * k) as *const __m128i);
            let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * k), _mm256_mul_ps(d, v));
        }
    }
}

/// `dst[i] = src[i]` widened (exact; a signalling NaN may come out quiet). `half` converts
/// 8 values per call to a function it cannot inline; attention widens every K and V value
/// it reads, so one F16C loop here.
fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    // std caches the feature check, so asking on every call costs a load.
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") && is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has F16C and AVX (checked above).
        unsafe { f16_to_f32_f16c(src, dst) };
        return;
    }
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c,avx")]
unsafe fn f16_to_f32_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let (sp, dp) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(sp.add(i) as *const __m128i);
        _mm256_storeu_ps(dp.add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for (d, h) in dst[i..n].iter_mut().zip(&src[i..n]) {
        *d = h.to_f32();
    }
}

/// Zeroed memory for `bytes`, on a huge-page boundary and advised to use huge pages.
/// Returns the address and the bytes mapped.
///
/// Why: NIXL reads blocks between processes on one host by CMA, and the kernel pins and
/// maps every page of both sides: on a 2-vCPU Xeon a 44 MiB `process_vm_readv` ran at
/// 3.4–3.8 GiB/s on 4 KiB pages and 6.0–7.7 on 2 MiB ones. Pages are still taken only when
/// first touched; where transparent huge pages are off the advice does nothing. Regions
/// smaller than a huge page (small test pools) keep small pages.
fn map_huge(bytes: usize) -> (*mut u8, usize) {
    // SAFETY: sysconf reads a constant of the system.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let huge = bytes >= HUGE_PAGE && HUGE_PAGE > page;
    let align = if huge { HUGE_PAGE } else { page };
    let mapped = bytes.max(1).next_multiple_of(align);
    let want = mapped + align - page;
    // SAFETY: a fresh private anonymous mapping; no existing memory is named.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            want,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        let layout = std::alloc::Layout::from_size_align(mapped, align)
            .unwrap_or(std::alloc::Layout::new::<u8>());
        std::alloc::handle_alloc_error(layout);
    }
    let start = (base as usize).next_multiple_of(align);
    let (head, tail) = (
        start - base as usize,
        base as usize + want - (start + mapped),
    );
    // SAFETY: the head and tail lie inside the mapping just made and nothing uses them;
    // what stays mapped is [start, start + mapped). madvise is a hint, its failure harmless.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + mapped) as *mut libc::c_void, tail);
        }
        #[cfg(target_os = "linux")]
        if huge {
            libc::madvise(start as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE);
        }
    }
    (start as *mut u8, mapped)
}

/// The kernel's transparent-huge-page mode (`always`, `madvise` or `never`), for the start
/// log: with `never` the pool stays on small pages and NIXL reads run slower.
pub(crate) fn huge_page_mode() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            let (_, rest) = s.split_once('[')?;
            Some(rest.split_once(']')?.0.to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

// The wire format is little-endian and KV bytes travel as stored: refuse big-endian
// targets at compile time rather than byte-swap silently.
#[cfg(not(target_endian = "little"))]
compile_error!("splitserve's KV wire format needs a little-endian target");

/// Geometry of the cache, the part a peer must agree on before KV crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub n_layer: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: KvDtype,
    /// Layers that see only a window of positions keep values only for the blocks that
    /// window can still reach (`None`: every layer sees everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<SlidingWindow>,
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
            window: c.sliding_window,
        }
    }

    /// Values of one block in one layer, for K (or for V).
    pub fn block_values(&self) -> usize {
        self.block_size * self.n_kv_head * self.head_dim
    }

    /// Bytes of one block in one layer, K and V.
    pub fn layer_block_bytes(&self) -> usize {
        2 * self.dtype.size_of(self.block_values())
    }

    /// Bytes of one block over all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        self.layer_block_bytes() * self.n_layer
    }

    /// Whether `layer` sees only a window of positions.
    pub fn is_windowed(&self, layer: usize) -> bool {
        self.window.is_some_and(|w| w.of_layer(layer).is_some())
    }

    /// Layers that see only a window.
    pub fn n_windowed(&self) -> usize {
        (0..self.n_layer).filter(|&l| self.is_windowed(l)).count()
    }

    /// The first block whose windowed layers a request with the KV of `n` tokens still
    /// needs: the one holding position `n - window`, the earliest that its query at `n - 1`
    /// sees (a request resumed from KV may compute its last position again). Blocks before
    /// it have values in the global layers only.
    pub fn window_start_block(&self, n: usize) -> usize {
        self.window
            .map_or(0, |w| n.saturating_sub(w.window) / self.block_size)
    }

    /// Blocks whose windowed layers one request holds at most, besides a step's new ones:
    /// its window's, and one more at either end (`None`: no windowed layers).
    pub fn window_blocks(&self) -> Option<usize> {
        self.window.map(|w| w.window.div_ceil(self.block_size) + 2)
    }

    /// Of the blocks `from..n_blocks` of a request with the KV of `n_tokens` tokens, those
    /// with values in `layer` (every one, unless the layer is windowed).
    pub fn layer_blocks(
        &self,
        layer: usize,
        n_tokens: usize,
        from: usize,
        n_blocks: usize,
    ) -> std::ops::Range<usize> {
        let first = if self.is_windowed(layer) {
            self.window_start_block(n_tokens).max(from)
        } else {
            from
        };
        first.min(n_blocks)..n_blocks
    }

    /// Whether `layers` are the KV of `n_tokens` tokens as [`KvCache::layers_bytes`] lays
    /// it out; if not, what they should be.
    pub fn check_layers(&self, n_tokens: usize, layers: &[Vec<u8>]) -> Result<(), String> {
        let n_blocks = n_tokens.div_ceil(self.block_size);
        let want: Vec<usize> = (0..self.n_layer)
            .map(|l| self.layer_blocks(l, n_tokens, 0, n_blocks).len() * self.layer_block_bytes())
            .collect();
        let got: Vec<usize> = layers.iter().map(Vec::len).collect();
        if got == want {
            return Ok(());
        }
        let total: usize = want.iter().sum();
        Err(format!(
            "KV for {n_tokens} tokens should be {} layers, {total} bytes in all",
            self.n_layer
        ))
    }

    /// Bytes of K and V over all layers in the blocks `from..n_blocks` of a request with the
    /// KV of `n_tokens` tokens: what a transfer of them moves.
    pub fn kv_bytes(&self, n_tokens: usize, from: usize, n_blocks: usize) -> usize {
        (0..self.n_layer)
            .map(|l| self.layer_blocks(l, n_tokens, from, n_blocks).len())
            .sum::<usize>()
            * self.layer_block_bytes()
    }
}

/// `Memory::slot` of a block whose windowed layers hold nothing.
const NO_SLOT: u32 = u32::MAX;

/// The K and V regions of every layer, shared by the engine and lease holders.
///
/// A global layer's region has a place for every block. A windowed layer's region is
/// smaller: its places (slots) go only to blocks some request's window still reaches, and
/// `slot` says which block has which (vLLM's hybrid allocator keeps a block table per layer
/// group for the same end).
pub(crate) struct Memory {
    pub layout: KvLayout,
    k: Vec<Region>,
    v: Vec<Region>,
    /// The windowed layers' slot of each block, or [`NO_SLOT`]. Changed by the engine
    /// thread only, for blocks no lease holds; atomics keep lease holders' reads defined.
    slot: Vec<AtomicU32>,
}

impl Memory {
    /// Where the pool lives, for a transport that registers it (NIXL): each layer's K
    /// region then its V region, as (address, bytes). The regions never move or shrink while
    /// the engine lives.
    pub fn regions(&self) -> Vec<(usize, usize)> {
        self.k
            .iter()
            .zip(&self.v)
            .flat_map(|(k, v)| [k, v])
            .map(|r| (r.map.ptr as usize, r.words * 4))
            .collect()
    }

    /// Where `block`'s values lie in `layer`'s region, in blocks (the slot, for a windowed
    /// layer).
    pub fn index(&self, layer: usize, block: u32) -> u32 {
        if self.layout.is_windowed(layer) {
            let s = self.slot[block as usize].load(Ordering::Relaxed);
            assert!(
                s != NO_SLOT,
                "block {block} has no values in windowed layer {layer}"
            );
            s
        } else {
            block
        }
    }

    /// The K range and the V range of `block` in `layer`, as bytes.
    ///
    /// # Safety
    /// The caller has the block to itself (see [`Region`]); nobody writes it meanwhile.
    pub unsafe fn block(&self, layer: usize, block: u32) -> [&[u8]; 2] {
        let n = self.layout.block_values();
        let at = self.index(layer, block) as usize * n;
        [self.k[layer].bytes(at, n), self.v[layer].bytes(at, n)]
    }

    /// As [`Memory::block`], writable.
    ///
    /// # Safety
    /// The caller has the block to itself; nobody else reads or writes it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn block_mut(&self, layer: usize, block: u32) -> [&mut [u8]; 2] {
        let n = self.layout.block_values();
        let at = self.index(layer, block) as usize * n;
        [
            self.k[layer].bytes_mut(at, n),
            self.v[layer].bytes_mut(at, n),
        ]
    }
}

/// Unowned blocks whose content is kept, by release order: the least recently released
/// is the first taken.
struct Lru {
    order: BTreeMap<u64, u32>,
    /// Each block's key in `order` (stale once it left).
    key: Vec<u64>,
    tick: u64,
}

impl Lru {
    fn new(num_blocks: usize) -> Self {
        Self {
            order: BTreeMap::new(),
            key: vec![0; num_blocks],
            tick: 0,
        }
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    /// `block` was released: it is now the newest.
    fn push(&mut self, block: u32) {
        self.tick += 1;
        self.key[block as usize] = self.tick;
        self.order.insert(self.tick, block);
    }

    /// `block` is owned again (or gone); nothing if it was not here.
    fn remove(&mut self, block: u32) {
        self.order.remove(&self.key[block as usize]);
    }

    fn pop_oldest(&mut self) -> Option<u32> {
        self.order.pop_first().map(|(_, b)| b)
    }
}

/// The windowed layers' slots: free, owned (by the requests and holds whose windows reach
/// their block: a reference count per block) or evictable (nobody's window reaches the
/// block, but it is a cached block whose values a prefix match may still use; by block).
struct Slots {
    total: usize,
    free: Vec<u32>,
    refs: Vec<u32>,
    evictable: Lru,
}

impl Slots {
    fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }
}

/// The block pool. A block is free (no owner, no content worth keeping), owned (by one or
/// more requests or holds: a reference count), or evictable (no owner, but its content is a
/// cached full block under its hash; reused by a prefix match or, least recently released
/// first, taken by an allocation that finds no free block).
///
/// With windowed layers, an owner also holds a block's slot (its windowed layers' values)
/// from the block its window starts at ([`KvLayout::window_start_block`]) on: the
/// `local_from` index each owner keeps with its block list. Slots of blocks behind every
/// owner's window go back to the pool while the blocks stay owned.
pub(crate) struct KvCache {
    pub layout: KvLayout,
    pub mem: std::sync::Arc<Memory>,
    free: Vec<u32>,
    refs: Vec<u32>,
    /// The hash a cached block is known by.
    hash: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
    evictable: Lru,
    prefix_caching: bool,
    /// `None`: no windowed layers.
    slots: Option<Slots>,
}

impl KvCache {
    /// A pool of `num_blocks` blocks; with windowed layers, `num_slots` (at most
    /// `num_blocks`) of them at a time hold values in those layers.
    pub fn new(layout: KvLayout, num_blocks: usize, num_slots: usize) -> Self {
        let windowed = layout.n_windowed() > 0;
        let num_slots = if windowed {
            num_slots.clamp(1, num_blocks)
        } else {
            0
        };
        let values = |l: usize| {
            let places = if layout.is_windowed(l) {
                num_slots
            } else {
                num_blocks
            };
            places * layout.block_values()
        };
        let mem = Memory {
            k: (0..layout.n_layer)
                .map(|l| Region::new(layout.dtype, values(l)))
                .collect(),
            v: (0..layout.n_layer)
                .map(|l| Region::new(layout.dtype, values(l)))
                .collect(),
            slot: (0..if windowed { num_blocks } else { 0 })
                .map(|_| AtomicU32::new(NO_SLOT))
                .collect(),
            layout,
        };
        Self {
            mem: std::sync::Arc::new(mem),
            // Pop from the end: low ids first, which keeps runs reproducible.
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            cached: HashMap::new(),
            evictable: Lru::new(num_blocks),
            prefix_caching: false,
            slots: windowed.then(|| Slots {
                total: num_slots,
                free: (0..num_slots as u32).rev().collect(),
                refs: vec![0; num_blocks],
                evictable: Lru::new(num_blocks),
            }),
            layout,
        }
    }

    /// Bytes the pool's K and V take.
    pub fn bytes(&self) -> usize {
        self.mem
            .k
            .iter()
            .chain(&self.mem.v)
            .map(|r| r.words * 4)
            .sum()
    }

    /// Slots of the windowed layers: (available, total); `None` without such layers.
    pub fn slot_counts(&self) -> Option<(usize, usize)> {
        let s = self.slots.as_ref()?;
        Some((s.available(), s.total))
    }

    /// Keep released full blocks by their hash for later prompts (off: released blocks are
    /// plain free blocks).
    pub fn set_prefix_caching(&mut self, on: bool) {
        self.prefix_caching = on;
    }

    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }

    pub fn k(&self, layer: usize) -> &Region {
        &self.mem.k[layer]
    }

    pub fn v(&self, layer: usize) -> &Region {
        &self.mem.v[layer]
    }

    /// Blocks an allocation can take: free ones and evictable cached ones (and, with
    /// windowed layers, no more than there are slots to give them).
    pub fn num_free(&self) -> usize {
        let blocks = self.num_free_blocks();
        self.slots
            .as_ref()
            .map_or(blocks, |s| blocks.min(s.available()))
    }

    /// Blocks free or evictable, whether or not slots remain for them.
    pub fn num_free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks in the prefix cache (owned or evictable).
    #[cfg(test)]
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Takes `n` blocks, or none if fewer can be had; evicts cached blocks, least recently
    /// released first, when free ones run out. Each has a slot in the windowed layers.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        self.take(&[], n, 0)
    }

    /// Takes one block (its windowed layers' slot is not touched).
    fn pop_block(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.evictable.pop_oldest()?;
                if let Some(h) = self.hash[b as usize].take() {
                    self.cached.remove(&h);
                }
                // Its slot, if it kept one, goes with its content.
                self.drop_slot(b);
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Gives `block` a slot in the windowed layers, taking the least recently released
    /// evictable one when none is free (its block keeps its other layers).
    fn give_slot(&mut self, block: u32) {
        let Some(s) = self.slots.as_mut() else {
            return;
        };
        let slot = match s.free.pop() {
            Some(x) => x,
            None => {
                let Some(victim) = s.evictable.pop_oldest() else {
                    debug_assert!(false, "a slot was counted but none is available");
                    return;
                };
                self.mem.slot[victim as usize].swap(NO_SLOT, Ordering::Relaxed)
            }
        };
        self.mem.slot[block as usize].store(slot, Ordering::Relaxed);
        s.refs[block as usize] = 1;
    }

    /// Returns an unowned block's slot, if it has one, to the free slots.
    fn drop_slot(&mut self, block: u32) {
        let Some(s) = self.slots.as_mut() else {
            return;
        };
        let slot = self.mem.slot[block as usize].swap(NO_SLOT, Ordering::Relaxed);
        if slot != NO_SLOT {
            debug_assert_eq!(s.refs[block as usize], 0);
            s.evictable.remove(block);
            s.free.push(slot);
        }
    }

    /// Takes a reference to `block`'s slot, which it has.
    fn share_slot(&mut self, block: u32) {
        let Some(s) = self.slots.as_mut() else {
            return;
        };
        debug_assert!(self.mem.slot[block as usize].load(Ordering::Relaxed) != NO_SLOT);
        if s.refs[block as usize] == 0 {
            s.evictable.remove(block);
        }
        s.refs[block as usize] += 1;
    }

    /// Drops a reference to `block`'s slot: a slot nobody references stays with its block
    /// while the block is cached (evictable), else it is free.
    fn release_slot(&mut self, block: u32) {
        let Some(s) = self.slots.as_mut() else {
            return;
        };
        let r = &mut s.refs[block as usize];
        debug_assert!(*r > 0, "slot of block {block} released twice");
        *r = r.saturating_sub(1);
        if *r > 0 {
            return;
        }
        if self.hash[block as usize].is_some() {
            s.evictable.push(block);
        } else {
            let slot = self.mem.slot[block as usize].swap(NO_SLOT, Ordering::Relaxed);
            s.free.push(slot);
        }
    }

    /// Drops one reference to each block (and to the slots of those from `local_from`
    /// on); a block nobody references becomes evictable if it is cached, else free. The
    /// last block of a request is released first, so that its tail, the part least likely
    /// shared, is evicted before its head.
    pub fn release(&mut self, blocks: &mut Vec<u32>, local_from: usize) {
        for (i, b) in blocks.drain(..).enumerate().rev() {
            if i >= local_from {
                self.release_slot(b);
            }
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released twice");
            *r = r.saturating_sub(1);
            if *r > 0 {
                continue;
            }
            if self.hash[b as usize].is_some() {
                self.evictable.push(b);
            } else {
                self.drop_slot(b);
                self.free.push(b);
            }
        }
    }

    /// The owner of `blocks` now needs their windowed layers only from block `upto` on:
    /// the slots of those before it (from `*local_from`) are released.
    pub fn trim(&mut self, blocks: &[u32], local_from: &mut usize, upto: usize) {
        let upto = upto.min(blocks.len());
        for &b in blocks.get(*local_from..upto).unwrap_or(&[]) {
            self.release_slot(b);
        }
        *local_from = (*local_from).max(upto);
    }

    /// The blocks of the longest run of `hashes`, from the first, that are cached.
    pub fn lookup(&self, hashes: &[BlockHash]) -> Vec<u32> {
        if !self.prefix_caching {
            return Vec::new();
        }
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// The cached blocks a request of `tokens` tokens, whose full blocks hash to `hashes`,
    /// can start from: the longest cached run, leaving at least its last token to compute
    /// or load, whose last blocks still hold what the windowed layers of the next position
    /// see.
    pub fn cached_prefix(&self, hashes: &[BlockHash], tokens: usize) -> Vec<u32> {
        let max = tokens.saturating_sub(1) / self.layout.block_size;
        let mut run = self.lookup(&hashes[..hashes.len().min(max)]);
        if self.slots.is_some() {
            let bs = self.layout.block_size;
            let mut k = run.len();
            while k > 0 {
                let from = self.layout.window_start_block(k * bs);
                match run[from..k].iter().rposition(|&b| !self.has_slot(b)) {
                    // A run may end at most at the last block without a slot.
                    Some(j) => k = from + j,
                    None => break,
                }
            }
            run.truncate(k);
        }
        run
    }

    /// Whether `block` has values in every layer (it has a slot, or there are no windowed
    /// layers).
    pub fn is_whole(&self, block: u32) -> bool {
        self.slots.is_none() || self.has_slot(block)
    }

    fn has_slot(&self, block: u32) -> bool {
        self.mem.slot[block as usize].load(Ordering::Relaxed) != NO_SLOT
    }

    /// Shares the cached blocks `hit` and allocates `need` more, or takes nothing if they
    /// do not both fit (an evictable block in `hit` is not free for the allocation). Of the
    /// run `hit` then the new blocks, those from `local_from` on get (or share) a slot in
    /// the windowed layers: a request with the KV of `n` tokens needs them from
    /// [`KvLayout::window_start_block`] of `n` on.
    pub fn take(&mut self, hit: &[u32], need: usize, local_from: usize) -> Option<Vec<u32>> {
        let idle = hit.iter().filter(|&&b| self.refs[b as usize] == 0).count();
        if self.num_free_blocks() - idle < need {
            return None;
        }
        if let Some(s) = &self.slots {
            let idle_slots = hit
                .iter()
                .skip(local_from)
                .filter(|&&b| s.refs[b as usize] == 0)
                .count();
            let want = (hit.len()..hit.len() + need)
                .filter(|&i| i >= local_from)
                .count();
            if s.available() - idle_slots < want {
                return None;
            }
        }
        for (i, &b) in hit.iter().enumerate() {
            if self.refs[b as usize] == 0 {
                self.evictable.remove(b);
            }
            self.refs[b as usize] += 1;
            if i >= local_from {
                self.share_slot(b);
            }
        }
        let mut got = Vec::with_capacity(need);
        for i in hit.len()..hit.len() + need {
            let Some(b) = self.pop_block() else {
                debug_assert!(false, "blocks were counted but none is available");
                break;
            };
            if i >= local_from {
                self.give_slot(b);
            }
            got.push(b);
        }
        Some(got)
    }

    /// Records that `block`, owned and fully computed, holds the tokens `hash` names;
    /// whether it is newly cached. A hash already cached in another block keeps that block
    /// (this one stays private).
    pub fn register(&mut self, hash: BlockHash, block: u32) -> bool {
        if !self.prefix_caching || self.hash[block as usize].is_some() {
            return false;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hash[block as usize] = Some(hash);
            return true;
        }
        false
    }

    /// Whether `block` may be written: owned by one request only and not in the cache.
    pub fn writable(&self, block: u32) -> bool {
        self.refs[block as usize] == 1 && self.hash[block as usize].is_none()
    }

    /// Where `block`'s values start in `layer`'s region, in blocks.
    pub fn index(&self, layer: usize, block: u32) -> usize {
        self.mem.index(layer, block) as usize
    }

    fn offset(&self, layer: usize, table: &[u32], pos: usize) -> usize {
        let l = &self.layout;
        let blk = self.index(layer, table[pos / l.block_size]);
        (blk * l.block_size + pos % l.block_size) * l.n_kv_head * l.head_dim
    }

    /// Appends the K then V bytes of one block in one layer (little-endian, storage dtype).
    /// The block belongs to a request of this engine thread.
    pub fn block_bytes(&self, layer: usize, block: u32, out: &mut Vec<u8>) {
        // SAFETY: an engine-owned block, read on the engine thread.
        let [k, v] = unsafe { self.mem.block(layer, block) };
        out.extend_from_slice(k);
        out.extend_from_slice(v);
    }

    /// Per layer, the K then V bytes of each block of `blocks` (the KV of `n_tokens`
    /// tokens) with values in that layer ([`KvLayout::layer_blocks`]), in position order.
    pub fn layers_bytes(&self, blocks: &[u32], n_tokens: usize) -> Vec<Vec<u8>> {
        (0..self.layout.n_layer)
            .map(|l| {
                let mut out = Vec::new();
                for i in self.layout.layer_blocks(l, n_tokens, 0, blocks.len()) {
                    self.block_bytes(l, blocks[i], &mut out);
                }
                out
            })
            .collect()
    }

    /// Writes [`Self::layers_bytes`] of `n_tokens` tokens into `blocks` (checked by
    /// [`KvLayout::check_layers`]).
    pub fn set_layers_bytes(&mut self, blocks: &[u32], n_tokens: usize, layers: &[Vec<u8>]) {
        let per_block = self.layout.layer_block_bytes();
        for (l, bytes) in layers.iter().enumerate() {
            let r = self.layout.layer_blocks(l, n_tokens, 0, blocks.len());
            for (i, chunk) in r.zip(bytes.chunks_exact(per_block)) {
                self.set_block_bytes(l, blocks[i], chunk);
            }
        }
    }

    /// Writes one block of one layer from bytes laid out as [`Self::block_bytes`] makes them.
    pub fn set_block_bytes(&mut self, layer: usize, block: u32, src: &[u8]) {
        // SAFETY: an engine-owned block, written on the engine thread.
        let [k, v] = unsafe { self.mem.block_mut(layer, block) };
        let half = k.len();
        k.copy_from_slice(&src[..half]);
        v.copy_from_slice(&src[half..2 * half]);
    }

    /// Stores one token's K and V (`n_kv_head * head_dim` each) for `layer`.
    pub fn write(&mut self, layer: usize, table: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(
            self.writable(table[pos / self.layout.block_size]),
            "a shared or cached block is never written"
        );
        let at = self.offset(layer, table, pos);
        self.mem.k[layer].write(at, k);
        self.mem.v[layer].write(at, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f16 widens to the same f32 as `half`'s own conversion (NaNs stay NaN), with a
    /// length that leaves a tail after the 8-wide loop.
    #[test]
    fn f16_widening_matches_half_for_every_value() {
        let src: Vec<f16> = (0..=u16::MAX)
            .map(f16::from_bits)
            .chain([f16::ONE; 5])
            .collect();
        let mut ours = vec![0f32; src.len()];
        f16_to_f32(&src, &mut ours);
        for (h, o) in src.iter().zip(&ours) {
            let want = h.to_f32();
            if want.is_nan() {
                assert!(o.is_nan(), "{:#06x}", h.to_bits());
            } else {
                assert_eq!(o.to_bits(), want.to_bits(), "{:#06x}", h.to_bits());
            }
        }
    }

    /// A group with max |x| = 127 has scale 1 (f16 0x3C00) and stores x rounded half away
    /// from zero; an all-zero group has scale 0 and zeros.
    #[test]
    fn q8_0_bytes_are_llama_cpp_s() {
        let mut x = [0f32; Q8_GROUP];
        x[0] = 127.0;
        x[1] = -2.5;
        x[2] = 0.49;
        x[3] = -127.0;
        x[4] = 3.5;
        let mut q = [0u8; 2 * Q8_BYTES];
        let src: Vec<f32> = x.iter().copied().chain([0.0; Q8_GROUP]).collect();
        q8_quantize(&src, &mut q);
        assert_eq!(
            &q[..7],
            &[0x00, 0x3C, 127, (-3i8) as u8, 0, (-127i8) as u8, 4]
        );
        assert!(q[7..Q8_BYTES].iter().all(|&b| b == 0));
        assert!(q[Q8_BYTES..].iter().all(|&b| b == 0));
        let mut back = [1f32; 2 * Q8_GROUP];
        q8_dequantize(&q, &mut back);
        assert_eq!(&back[..5], &[127.0, -3.0, 0.0, -127.0, 4.0]);
        assert!(back[5..].iter().all(|&v| v == 0.0));
    }

    /// Groups at scales from 0.005 to 30 come back within half a step plus the f16 rounding
    /// of their scale (127 · 2⁻¹¹ of a step); every i8 value decodes to the same bits on
    /// AVX2 as portably.
    #[test]
    fn q8_0_decodes_the_same_on_every_path() {
        let mult = [0.05f32, 1.0, 30.0, 300.0];
        let src: Vec<f32> = (0..16 * Q8_GROUP)
            .map(|i| (((i * 7919) % 1000) as f32 / 37.0 - 13.0) * mult[(i / Q8_GROUP) % 4])
            .collect();
        let mut q = vec![0u8; KvDtype::Q8_0.size_of(src.len())];
        q8_quantize(&src, &mut q);
        let mut back = vec![0f32; src.len()];
        q8_dequantize(&q, &mut back);
        for (g, (x, y)) in src.chunks(Q8_GROUP).zip(back.chunks(Q8_GROUP)).enumerate() {
            let d = f16::from_le_bytes([q[g * Q8_BYTES], q[g * Q8_BYTES + 1]]).to_f32();
            for (u, v) in x.iter().zip(y) {
                assert!((u - v).abs() <= 0.57 * d, "group {g}: {u} came back as {v}");
            }
        }
        // The last 8 groups hold every byte value once.
        let tail = KvDtype::Q8_0.size_of(8 * Q8_GROUP);
        let at = q.len() - tail;
        for (i, g) in q[at..].chunks_mut(Q8_BYTES).enumerate() {
            for (j, b) in g[2..].iter_mut().enumerate() {
                *b = (i * Q8_GROUP + j) as u8;
            }
        }
        let (mut a, mut b) = (vec![0f32; src.len()], vec![0f32; src.len()]);
        q8_dequantize(&q, &mut a);
        q8_dequantize_portable(&q, &mut b);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
    }

    /// Layer 0 sees a window of 8 positions (blocks of 4), layer 1 everything: a block
    /// keeps a slot in layer 0 only while some owner's window reaches it (or, released and
    /// cached, until the slot is taken), and a cached run counts as a hit only if the
    /// blocks the next position's window reaches still have their slots. Counts are exact.
    #[test]
    fn window_slots_are_freed_taken_and_checked_by_prefix_hits() {
        let layout = KvLayout {
            n_layer: 2,
            n_kv_head: 1,
            head_dim: 2,
            block_size: 4,
            dtype: KvDtype::F32,
            window: Some(SlidingWindow {
                window: 8,
                global_every: 2,
            }),
        };
        assert!(layout.is_windowed(0) && !layout.is_windowed(1));
        assert_eq!(layout.window_start_block(16), 2);
        assert_eq!(
            layout.kv_bytes(16, 0, 4),
            (4 + 2) * layout.layer_block_bytes()
        );
        let mut c = KvCache::new(layout, 10, 4);
        c.set_prefix_caching(true);
        let h = |i: u8| [i; 32];
        assert_eq!((c.num_free(), c.slot_counts()), (4, Some((4, 4))));
        assert!(c.take(&[], 5, 0).is_none(), "5 blocks, 4 slots");
        // A 16-token request: 4 blocks, all computed; its next position sees blocks 2 and 3.
        let mut a = c.take(&[], 4, 0).unwrap_or_default();
        for (i, &b) in a.iter().enumerate() {
            assert!(c.register(h(i as u8), b));
        }
        let mut a_from = 0;
        c.trim(&a, &mut a_from, layout.window_start_block(16));
        assert_eq!(a_from, 2);
        // Blocks 0 and 1 gave back their slots, which stay with them while evictable.
        assert_eq!((c.num_free(), c.slot_counts()), (2, Some((2, 4))));
        assert!(c.is_whole(a[0]) && c.is_whole(a[1]));
        // Two new blocks take those slots, oldest released first.
        let mut b = c.allocate(2).unwrap_or_default();
        assert!(!c.is_whole(a[0]) && !c.is_whole(a[1]));
        assert_eq!(c.slot_counts(), Some((0, 4)));
        assert_eq!(c.num_free(), 0);
        let hashes: Vec<BlockHash> = (0..4).map(h).collect();
        // Starting at position 16 needs blocks 2 and 3 only: all 4 are a hit.
        assert_eq!(c.cached_prefix(&hashes, 17), a);
        // Starting at 8 needs blocks 0 and 1, whose values are gone: no hit at all.
        assert_eq!(c.cached_prefix(&hashes[..2], 9), Vec::<u32>::new());
        c.release(&mut b, 0);
        assert_eq!(c.slot_counts(), Some((2, 4)));
        // A second request shares all 4 blocks (slots of 2 and 3) and adds one.
        let hit = c.cached_prefix(&hashes, 17);
        let mut d = c
            .take(&hit, 1, layout.window_start_block(16))
            .unwrap_or_default();
        assert_eq!(c.slot_counts(), Some((1, 4)));
        let mut d_all = hit.clone();
        d_all.append(&mut d);
        c.release(&mut a, a_from);
        c.release(&mut d_all, 2);
        // Everything is free or evictable again; blocks 2 and 3 keep their slots.
        assert_eq!((c.num_free_blocks(), c.slot_counts()), (10, Some((4, 4))));
        assert_eq!(c.cached_prefix(&hashes, 17).len(), 4);
        assert!(c.cached_prefix(&hashes[..2], 9).is_empty());
    }

    #[test]
    fn allocate_and_release_keep_count() {
        let layout = KvLayout {
            n_layer: 1,
            n_kv_head: 1,
            head_dim: 2,
            block_size: 4,
            dtype: KvDtype::F16,
            window: None,
        };
        let mut c = KvCache::new(layout, 10, 0);
        let mut a = c.allocate(3).unwrap_or_default();
        assert_eq!(a, vec![0, 1, 2]);
        assert_eq!(c.num_free(), 7);
        assert!(c.allocate(8).is_none());
        assert_eq!(c.num_free(), 7);
        let mut b = c.allocate(7).unwrap_or_default();
        assert_eq!(c.num_free(), 0);
        c.release(&mut a, 0);
        c.release(&mut b, 0);
        assert_eq!(c.num_free(), 10);
        assert!(a.is_empty());
    }

    #[test]
    fn large_regions_lie_on_huge_pages_and_start_zeroed() {
        let layout = KvLayout {
            n_layer: 2,
            n_kv_head: 3,
            head_dim: 64,
            block_size: 16,
            dtype: KvDtype::F16,
            window: None,
        };
        // 700 blocks of 6 KiB: 4.1 MiB per region, three huge pages' worth mapped.
        let big = KvCache::new(layout, 700, 0);
        let regions = big.mem.regions();
        assert_eq!(regions.len(), 4);
        for &(at, len) in &regions {
            assert_eq!((at % HUGE_PAGE, len), (0, 700 * 6144));
            // SAFETY: the region is `len` bytes the pool owns; no block is in use.
            let bytes = unsafe { std::slice::from_raw_parts(at as *const u8, len) };
            assert!(bytes.iter().all(|&b| b == 0));
        }
        assert_eq!(big.mem.k[0].map.len(), 3 * HUGE_PAGE);
        // A small test pool keeps small pages and maps no more than it needs.
        let small = KvCache::new(layout, 10, 0);
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        assert_eq!(small.mem.k[0].map.len(), 61_440usize.next_multiple_of(page));
    }
}
