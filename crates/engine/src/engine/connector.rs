//! The KV connector as the engine reaches it (docs/design.md): one trait, two sides.
//!
//! Scheduler side ([`KvConnector`]): how many prompt tokens of a request can be had
//! remotely; once blocks are allocated for them, start loading into those blocks; release a
//! remote hold the request will never read. Worker side (the connector's own threads): a
//! [`LoadTarget`] lends the allocated blocks to the connector, which writes each layer
//! straight into them as it arrives and then reports the load finished; a [`HeldKv`] lends a
//! finished request's held blocks to a reader on the producer, and giving it back frees them.
//!
//! While a lease is out the engine does not touch its blocks; it keeps stepping its other
//! requests (the waiting request's state is WAITING_FOR_REMOTE_KVS).

use std::sync::mpsc;
use std::sync::Arc;

use super::Command;
use crate::kv_cache::{KvLayout, Memory};
use crate::prefix_cache::BlockHash;
use crate::sampler::Sampler;

/// Where a request's prompt KV waits, as the connector understood its `kv_transfer_params`
/// when the request arrived (for `TcpConnector`, a verified grant); opaque to the engine.
#[derive(Clone)]
pub struct RemoteKv(Arc<dyn std::any::Any + Send + Sync>);

impl RemoteKv {
    pub fn new<T: std::any::Any + Send + Sync>(what: T) -> Self {
        Self(Arc::new(what))
    }

    /// What the connector put in, if it is a `T`.
    pub fn get<T: std::any::Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl std::fmt::Debug for RemoteKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemoteKv(..)")
    }
}

/// What a finished load brings besides KV: tokens the producer already sampled and its
/// sampler after them (none: the engine computes the last prompt position itself).
#[derive(Debug, Clone, Default)]
pub struct RemoteFirst {
    pub generated: Vec<u32>,
    pub sampler: Option<Sampler>,
    /// `Some(t)`: only the KV of the first `t` prompt tokens arrived (`t` a multiple of the
    /// block size; a store's block was missing or bad): the engine keeps those blocks and
    /// computes the rest itself.
    pub loaded_tokens: Option<usize>,
}

/// The engine's own [`RemoteKv`] for a request it looks up in a store connector (one whose
/// [`KvConnector::looks_up`] is true) before computing it.
pub(super) struct StoreLookup;

/// The scheduler side of a KV connector.
pub trait KvConnector: Send + Sync {
    /// Prompt tokens of a `prompt_len`-token request whose KV can be loaded from `remote`
    /// (0: none; the engine computes the rest itself).
    fn remote_tokens(&self, remote: &RemoteKv, prompt_len: usize) -> usize;
    /// Blocks for those tokens are allocated: load into them, off the engine thread, and
    /// end with [`LoadTarget::finish`] (dropping the target fails the load).
    fn start_load(&self, remote: RemoteKv, target: LoadTarget);
    /// The request ended before its KV was loaded: the remote side may free it.
    fn release(&self, remote: RemoteKv);
    /// Worker side, for connectors that store KV (shared storage, offloading): whether
    /// [`KvConnector::save_block`] is called at all.
    fn wants_saves(&self) -> bool {
        false
    }
    /// A full block, every token of it computed, by its prefix-cache hash; called once per
    /// hash the engine's cache did not have, on the engine thread as the step that
    /// completed it ends, so copy what is kept and return.
    fn save_block(&self, _hash: &BlockHash, _block: SavedBlock<'_>) {}
    /// Store connectors: whether every request is looked up in the store
    /// ([`KvConnector::stored_tokens`]) before it is computed (prefix caching must be on).
    fn looks_up(&self) -> bool {
        false
    }
    /// Prompt tokens whose KV the store has, from the first block on: the consecutive
    /// blocks of `hashes` (a prompt's full blocks) found, times the block size. Loads of
    /// them come through [`KvConnector::start_load`], where [`LoadTarget::block_hash`]
    /// names each lent block.
    fn stored_tokens(&self, _hashes: &[BlockHash]) -> usize {
        0
    }
}

/// A computed block offered to [`KvConnector::save_block`]: read-only while it is cached.
#[derive(Clone, Copy)]
pub struct SavedBlock<'a> {
    mem: &'a Memory,
    block: u32,
}

impl<'a> SavedBlock<'a> {
    pub(super) fn new(mem: &'a Memory, block: u32) -> Self {
        Self { mem, block }
    }

    pub fn layout(&self) -> KvLayout {
        self.mem.layout
    }

    /// The K bytes and the V bytes of this block in `layer`.
    pub fn layer(&self, layer: usize) -> [&[u8]; 2] {
        // SAFETY: a cached block is never written (a shared or cached block is read-only),
        // and the borrow of the engine's memory ends with this call's caller.
        unsafe { self.mem.block(layer, self.block) }
    }
}

/// Blocks lent out of the engine; they go back through the engine's command channel.
pub(super) struct Lease {
    mem: Arc<Memory>,
    blocks: Vec<u32>,
    /// The first of `blocks` with values in the windowed layers (their slots go back with
    /// them).
    local_from: usize,
    id: String,
    back: mpsc::Sender<Command>,
}

impl Lease {
    /// Lends `blocks`, of which those from `.1` on have slots in the windowed layers.
    pub(super) fn new(
        mem: Arc<Memory>,
        (blocks, local_from): (Vec<u32>, usize),
        id: String,
        back: mpsc::Sender<Command>,
    ) -> Self {
        Self {
            mem,
            blocks,
            local_from,
            id,
            back,
        }
    }

    /// Lent blocks `from..` with values in `layer`: from `local_from` on in a windowed one.
    fn layer_blocks(&self, layer: usize, from: usize) -> std::ops::Range<usize> {
        let first = if self.mem.layout.is_windowed(layer) {
            from.max(self.local_from)
        } else {
            from
        };
        first.min(self.blocks.len())..self.blocks.len()
    }
}

/// The blocks allocated for a request's remote KV, lent to the connector to write into.
/// The request's first [`LoadTarget::first_block`] blocks are already here (found in the
/// prefix cache): only the blocks after them are lent and loaded.
pub struct LoadTarget {
    lease: Lease,
    n_tokens: usize,
    first_block: usize,
    hashes: Vec<BlockHash>,
    done: bool,
}

impl LoadTarget {
    pub(super) fn new(
        lease: Lease,
        n_tokens: usize,
        first_block: usize,
        hashes: Vec<BlockHash>,
    ) -> Self {
        Self {
            lease,
            n_tokens,
            first_block,
            hashes,
            done: false,
        }
    }

    /// The prefix-cache hash of lent block `i`, if it is a full block (with prefix caching
    /// on).
    pub fn block_hash(&self, i: usize) -> Option<&BlockHash> {
        self.hashes.get(i)
    }

    /// Blocks of the prompt (in position order) before the first lent one: the connector
    /// loads from this block on.
    pub fn first_block(&self) -> usize {
        self.first_block
    }

    pub fn request_id(&self) -> &str {
        &self.lease.id
    }

    pub fn layout(&self) -> KvLayout {
        self.lease.mem.layout
    }

    /// Prompt tokens whose KV the request has once the load is done (those of the blocks
    /// already here included).
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// Blocks lent to be filled.
    pub fn n_blocks(&self) -> usize {
        self.lease.blocks.len()
    }

    /// The lent blocks with values in `layer`. A windowed layer (Gemma 3's local layers)
    /// keeps values only in the blocks its window can still reach; the producer sends the
    /// same range ([`HeldKv::layer_blocks`]): [`KvLayout::layer_blocks`] of the request's
    /// tokens.
    pub fn layer_blocks(&self, layer: usize) -> std::ops::Range<usize> {
        self.lease.layer_blocks(layer, 0)
    }

    /// The engine's whole KV pool as (address, bytes) regions ([`KvLayout`] order: each
    /// layer's K then V), for a transport that registers it once (NIXL).
    pub fn pool_regions(&self) -> Vec<(usize, usize)> {
        self.lease.mem.regions()
    }

    /// The K bytes and the V bytes of lent block `i` (position order, from
    /// [`LoadTarget::first_block`]) in `layer`, to fill; `i` is in
    /// [`LoadTarget::layer_blocks`] of `layer`.
    pub fn block_mut(&mut self, layer: usize, i: usize) -> [&mut [u8]; 2] {
        let b = self.lease.blocks[i];
        // SAFETY: the block is lent to this target alone (the engine keeps away until the
        // lease returns), and `&mut self` keeps a second borrow through it out.
        unsafe { self.lease.mem.block_mut(layer, b) }
    }

    /// Every layer's K then V bytes of lent block `i`, in layer order, to fill at once (one
    /// vectored read); only the layers with values in it (see
    /// [`LoadTarget::layer_blocks`]; a load from a store gets whole blocks).
    pub fn block_parts_mut(&mut self, i: usize) -> Vec<&mut [u8]> {
        let b = self.lease.blocks[i];
        let n_layer = self.lease.mem.layout.n_layer;
        let mut parts = Vec::with_capacity(2 * n_layer);
        for layer in 0..n_layer {
            if !self.lease.layer_blocks(layer, 0).contains(&i) {
                continue;
            }
            // SAFETY: as in `block_mut`; the layers' regions are disjoint, so the slices
            // never overlap, and `&mut self` keeps them the only borrows.
            parts.extend(unsafe { self.lease.mem.block_mut(layer, b) });
        }
        parts
    }

    /// Ends the load: the request continues (`Ok`) or fails with the message (`Err`).
    pub fn finish(mut self, result: Result<RemoteFirst, String>) {
        self.done = true;
        self.send(result);
    }

    /// Fails the load but keeps the lent blocks out of the pool for good: a transport that
    /// may still write into them (a NIXL read that never ended) must not see them reused.
    /// They stay counted as used until the engine restarts.
    pub fn fail_keeping_blocks(mut self, message: String) {
        self.done = true;
        let kept = std::mem::take(&mut self.lease.blocks);
        tracing::error!(id = %self.lease.id, blocks = kept.len(), "KV blocks quarantined: a transfer into them may still be under way");
        let _ = self.lease.back.send(Command::Loaded {
            id: self.lease.id.clone(),
            blocks: Vec::new(),
            local_from: 0,
            result: Box::new(Err(message)),
        });
    }

    fn send(&mut self, result: Result<RemoteFirst, String>) {
        let _ = self.lease.back.send(Command::Loaded {
            id: self.lease.id.clone(),
            blocks: std::mem::take(&mut self.lease.blocks),
            local_from: self.lease.local_from,
            result: Box::new(result),
        });
    }
}

impl Drop for LoadTarget {
    fn drop(&mut self) {
        if !self.done {
            self.send(Err("the connector abandoned the load".into()));
        }
    }
}

/// A finished request's held KV, lent to a reader (the producer's side channel). Dropping
/// it frees the blocks.
pub struct HeldKv {
    lease: Lease,
    pub n_tokens: usize,
    pub generated: Vec<u32>,
    pub sampler: Sampler,
}

impl HeldKv {
    pub(super) fn new(
        lease: Lease,
        n_tokens: usize,
        generated: Vec<u32>,
        sampler: Sampler,
    ) -> Self {
        Self {
            lease,
            n_tokens,
            generated,
            sampler,
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.lease.mem.layout
    }

    pub fn n_blocks(&self) -> usize {
        self.lease.blocks.len()
    }

    /// The held blocks from block `from` on with values in `layer`: every one, unless
    /// the layer is windowed ([`KvLayout::layer_blocks`] of the held tokens; a consumer
    /// lends the same range).
    pub fn layer_blocks(&self, layer: usize, from: usize) -> std::ops::Range<usize> {
        let n = self.lease.blocks.len();
        let r = self.layout().layer_blocks(layer, self.n_tokens, from, n);
        debug_assert!(self.lease.layer_blocks(layer, from).start <= r.start);
        r
    }

    /// Where the values of held blocks `from..` with values in `layer` lie in that layer's
    /// K and V regions, in blocks (for a transport that reads the pool in place, NIXL).
    pub fn layer_indices(&self, layer: usize, from: usize) -> Vec<u32> {
        self.layer_blocks(layer, from)
            .map(|i| self.lease.mem.index(layer, self.lease.blocks[i]))
            .collect()
    }

    /// The K bytes and the V bytes of block `i` (position order) in `layer`; `i` is in
    /// [`HeldKv::layer_blocks`] of `layer`.
    pub fn block(&self, layer: usize, i: usize) -> [&[u8]; 2] {
        let b = self.lease.blocks[i];
        // SAFETY: held blocks are written by nobody: the request finished, and the engine
        // keeps away from lent blocks until they come back.
        unsafe { self.lease.mem.block(layer, b) }
    }
}

impl Drop for HeldKv {
    fn drop(&mut self) {
        let _ = self.lease.back.send(Command::Returned(
            self.lease.id.clone(),
            std::mem::take(&mut self.lease.blocks),
            self.lease.local_from,
        ));
    }
}
