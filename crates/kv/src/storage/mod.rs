//! `ExampleConnector` (vLLM's name; `SharedStorageConnector` is accepted too): a prompt's KV
//! saved per block in a directory every instance sees (`shared_storage_path`), one file per
//! block named by the block's prefix-cache hash, so the same tokens after the same prefix
//! find the same file from any process. A producer saves what it computes; a consumer (or
//! `kv_both`) looks every prompt up there before computing it and loads the blocks it
//! finds. A restarted instance finds what is on disk.
//!
//! A file is written to a temporary name and renamed, so a reader sees all of it or none.
//! It starts with a header: magic, the digest of the model fingerprint, the block's hash,
//! the layer count and bytes per layer, and a CRC-32 over the header and the KV. A
//! missing, truncated, corrupted or foreign file ends the load at that block: the blocks
//! before it are used, the rest of the prompt is computed, and the miss is logged and
//! counted by reason. Bytes on disk are never decoded unchecked.
//!
//! Saves run on a writer thread (the engine thread only copies a block's bytes into a
//! bounded queue; when the queue is full the save is dropped and counted). A producer's
//! answer waits until its saves are on disk, so a consumer that asks next finds them.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use splitserve_engine::prefix_cache::{hex, BlockHash};
use splitserve_engine::{Engine, KvConnector, LoadTarget, RemoteFirst, RemoteKv, SavedBlock};

use crate::config::{ConfigError, ConnectorKind, KvTransferConfig};
use crate::connector::{LoadObserver, LoadReport, Spawner};
use crate::fingerprint::Fingerprint;
use crate::params::{Ask, KvTransferParams};
use crate::role::{Hooks, KvRoleConnector, Plan, PlanError, RoleError, Setup};

mod redis_store;
mod tiers;

use redis_store::Redis;
use tiers::{Dir, Disk, Memory};

const MAGIC: &[u8; 8] = b"SSKVBLK2";
/// Magic, fingerprint digest, block hash, layers, bytes per layer, checksum.
const HEADER: usize = 8 + 32 + 32 + 4 + 4 + 32;
/// Blocks waiting for the writer; past this a save is dropped (counted), never waited for.
const QUEUE: usize = 4096;
/// How long a producer's answer waits for its saves to reach the disk.
const FLUSH_WAIT: Duration = Duration::from_secs(30);

/// What a store connector did, for metrics (each event names the connector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreEvent {
    /// Blocks loaded into an engine's blocks, their KV bytes, and the load's time (reads,
    /// checks and copies).
    Loaded {
        blocks: u64,
        bytes: u64,
        took: Duration,
    },
    /// A block stored, its bytes (file or value, header included), and the writer's time
    /// for it (checksum and store).
    Saved { bytes: u64, took: Duration },
    /// A stored block not used (`missing`, `truncated`, `corrupt`, `foreign`) or a save
    /// dropped (`save_dropped`) or failed (`save_failed`).
    Miss { reason: &'static str },
}

/// Receives a store connector's events: the connector's name and what happened.
pub type StoreHook = Arc<dyn Fn(&'static str, StoreEvent) + Send + Sync>;

/// Where encoded block files live: a shared directory, host memory (over a disk tier), or
/// a Redis server.
trait Tier: Send + Sync + 'static {
    /// Keeps `bytes` as `hash`'s file.
    fn put(&self, hash: &BlockHash, bytes: Vec<u8>) -> std::io::Result<()>;
    /// Whether `hash` may be there (the load checks it).
    fn has(&self, hash: &BlockHash) -> bool;
    /// Reads `hash`'s file into `head` then `parts`, in order; `missing`, or `truncated`
    /// unless the file is exactly that long. `Ok(true)` when its checksum is to be checked
    /// (not for this process's own memory, whose bytes never left it).
    fn read_into(
        &self,
        hash: &BlockHash,
        head: &mut [u8],
        parts: &mut [&mut [u8]],
    ) -> Result<bool, &'static str>;
    /// Forgets `hash`'s file: it was read and found unusable (truncated, corrupt, foreign),
    /// so that the next save of the block writes it anew.
    fn discard(&self, _hash: &BlockHash) {}
    fn describe(&self) -> String;
    /// How many of `hashes`, from the first, may be there.
    fn run_of(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.has(h)).count()
    }
}

/// Bytes of a block file read into `head` then `parts`.
fn file_len(head: &[u8], parts: &[&mut [u8]]) -> usize {
    head.len() + parts.iter().map(|p| p.len()).sum::<usize>()
}

/// Fills `head` then `parts` from `r` with vectored reads (one, from a file).
fn read_vectored_exact(
    r: &mut impl Read,
    head: &mut [u8],
    parts: &mut [&mut [u8]],
) -> std::io::Result<()> {
    let mut bufs: Vec<std::io::IoSliceMut<'_>> = std::iter::once(std::io::IoSliceMut::new(head))
        .chain(parts.iter_mut().map(|p| std::io::IoSliceMut::new(p)))
        .collect();
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match r.read_vectored(bufs) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => std::io::IoSliceMut::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fills `head` then `parts` from `r`, which must hold exactly that many bytes.
fn fill_from(
    r: &mut dyn Read,
    head: &mut [u8],
    parts: &mut [&mut [u8]],
) -> Result<(), &'static str> {
    r.read_exact(head).map_err(|_| "truncated")?;
    for p in parts.iter_mut() {
        r.read_exact(p).map_err(|_| "truncated")?;
    }
    let mut more = [0u8; 1];
    if !matches!(r.read(&mut more), Ok(0)) {
        return Err("truncated");
    }
    Ok(())
}

/// Saves queued and saves done (written, skipped or failed), for a producer's flush.
#[derive(Default)]
struct Progress {
    counts: Mutex<(u64, u64)>,
    done: Condvar,
}

impl Progress {
    fn counts(&self) -> std::sync::MutexGuard<'_, (u64, u64)> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The engine's side of a store: block files in a [`Tier`].
pub struct BlockStore {
    tier: Arc<dyn Tier>,
    digest: [u8; 32],
    block_size: usize,
    /// Loads come in runs of this many blocks (an offloaded block of several engine blocks).
    group: usize,
    saves: bool,
    loads: bool,
    writer: Option<SyncSender<(BlockHash, Vec<u8>)>>,
    progress: Arc<Progress>,
    dropped: AtomicU64,
    spawner: Spawner,
    /// The connector's name, for its metrics.
    name: &'static str,
    on_event: Option<StoreHook>,
    on_start: Option<Arc<dyn Fn() + Send + Sync>>,
    observer: Option<LoadObserver>,
}

fn digest_of(fp: &Fingerprint) -> [u8; 32] {
    let json = serde_json::to_vec(fp).unwrap_or_default();
    Sha256::digest(&json).into()
}

/// A block file's bytes: header then, per layer, K then V; its checksum is left zero for
/// [`seal`].
fn encode(digest: &[u8; 32], hash: &BlockHash, layers: &[[&[u8]; 2]]) -> Vec<u8> {
    let layer_bytes = layers.first().map_or(0, |[k, v]| k.len() + v.len());
    let mut b = Vec::with_capacity(HEADER + layers.len() * layer_bytes);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(digest);
    b.extend_from_slice(hash);
    b.extend_from_slice(&(layers.len() as u32).to_le_bytes());
    b.extend_from_slice(&(layer_bytes as u32).to_le_bytes());
    b.extend_from_slice(&[0u8; 32]);
    for [k, v] in layers {
        b.extend_from_slice(k);
        b.extend_from_slice(v);
    }
    b
}

/// Fills in `file`'s checksum (off the engine thread: hashing a block takes a while).
fn seal(file: &mut [u8]) {
    let sum = checksum(file);
    file[HEADER - 32..HEADER].copy_from_slice(&sum);
}

/// CRC-32 over the header (its checksum field as zeros) and the KV, in a 32-byte field.
fn checksum(file: &[u8]) -> [u8; 32] {
    Crc::new(&file[..HEADER]).over(&file[HEADER..]).field()
}

/// The block checksum: a CRC-32, against truncation and torn or flipped bytes, as storage
/// systems check their blocks. It is no defence against a writer with access to the store
/// (nor would an unkeyed cryptographic hash be), and it costs little beside the copy: it
/// runs with the CPU's carry-less multiply (about 50 GiB/s from cache here, against 20 for
/// XXH3 and 2 for SHA-256).
struct Crc(crc32fast::Hasher);

impl Crc {
    /// Starts over a header, its checksum field taken as zeros.
    fn new(head: &[u8]) -> Self {
        let mut h = crc32fast::Hasher::new();
        h.update(&head[..HEADER - 32]);
        h.update(&[0u8; 32]);
        Self(h)
    }

    fn over(mut self, bytes: &[u8]) -> Self {
        self.0.update(bytes);
        self
    }

    fn field(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..4].copy_from_slice(&self.0.finalize().to_le_bytes());
        out
    }
}

/// Reads `hash`'s block file with `fill` (as [`Tier::read_into`]) straight into `parts`
/// (every layer's K then V) and checks it against what this instance expects (its checksum
/// too when `checked`); the reason if it is not usable (then what `parts` hold is not to be
/// used).
fn read_block(
    fill: impl FnOnce(&mut [u8], &mut [&mut [u8]]) -> Result<bool, &'static str>,
    digest: &[u8; 32],
    hash: &BlockHash,
    n_layer: usize,
    layer_bytes: usize,
    parts: &mut [&mut [u8]],
) -> Result<(), &'static str> {
    let layers_fit = parts.len() == 2 * n_layer
        && parts
            .chunks(2)
            .all(|kv| kv.iter().map(|p| p.len()).sum::<usize>() == layer_bytes);
    if !layers_fit {
        return Err("foreign");
    }
    let mut head = [0u8; HEADER];
    let checked = fill(&mut head, parts)?;
    let u32_at = |at: usize| {
        let mut w = [0u8; 4];
        w.copy_from_slice(&head[at..at + 4]);
        u32::from_le_bytes(w) as usize
    };
    if &head[..8] != MAGIC || u32_at(72) != n_layer || u32_at(76) != layer_bytes {
        return Err("foreign");
    }
    if checked {
        // Over the bytes just read, still in cache.
        let sum = parts.iter().fold(Crc::new(&head), |c, p| c.over(p)).field();
        if sum[..] != head[HEADER - 32..HEADER] {
            return Err("corrupt");
        }
    }
    // Checked after the checksum: a file for another model or block, intact, is foreign.
    if &head[8..40] != digest || &head[40..72] != hash {
        return Err("foreign");
    }
    Ok(())
}

impl BlockStore {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &'static str,
        tier: Arc<dyn Tier>,
        fingerprint: &Fingerprint,
        group: usize,
        saves: bool,
        loads: bool,
        hooks: &Hooks,
    ) -> std::io::Result<Self> {
        let progress = Arc::new(Progress::default());
        let writer = if saves {
            let (tx, rx) = sync_channel::<(BlockHash, Vec<u8>)>(QUEUE);
            let (t, progress) = (tier.clone(), progress.clone());
            let on_event = hooks.on_store_event.clone();
            let emit = move |e: StoreEvent| {
                if let Some(f) = &on_event {
                    f(name, e)
                }
            };
            std::thread::Builder::new()
                .name("kv-store-writer".into())
                .spawn(move || {
                    for (hash, mut bytes) in rx {
                        let t0 = Instant::now();
                        seal(&mut bytes);
                        let n = bytes.len() as u64;
                        match t.put(&hash, bytes) {
                            Ok(()) => emit(StoreEvent::Saved {
                                bytes: n,
                                took: t0.elapsed(),
                            }),
                            Err(e) => {
                                tracing::warn!(error = %e, block = %hex(&hash), "cannot save a KV block");
                                emit(StoreEvent::Miss { reason: "save_failed" });
                            }
                        }
                        progress.counts().1 += 1;
                        progress.done.notify_all();
                    }
                })?;
            Some(tx)
        } else {
            None
        };
        Ok(Self {
            tier,
            digest: digest_of(fingerprint),
            block_size: fingerprint.block_size as usize,
            group: group.max(1),
            saves,
            loads,
            writer,
            progress,
            dropped: AtomicU64::new(0),
            spawner: Spawner::new(),
            name,
            on_event: hooks.on_store_event.clone(),
            on_start: hooks.on_load_start.clone(),
            observer: hooks.on_load_end.clone(),
        })
    }

    /// Waits until every save queued so far is on disk (or `FLUSH_WAIT` passes).
    fn flush(&self) {
        let target = self.progress.counts().0;
        let deadline = Instant::now() + FLUSH_WAIT;
        let mut c = self.progress.counts();
        while c.1 < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("KV saves still queued after {FLUSH_WAIT:?}; answering anyway");
                return;
            }
            c = self
                .progress
                .done
                .wait_timeout(c, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

impl KvConnector for BlockStore {
    fn remote_tokens(&self, _: &RemoteKv, _: usize) -> usize {
        // Loads come from lookups by hash (`stored_tokens`), never from a peer's params.
        0
    }

    fn start_load(&self, _remote: RemoteKv, mut target: LoadTarget) {
        let (tier, digest, bs) = (self.tier.clone(), self.digest, self.block_size);
        let (name, on_event, observer) = (self.name, self.on_event.clone(), self.observer.clone());
        if let Some(f) = &self.on_start {
            f();
        }
        self.spawner.spawn("kv-store-load", move || {
            let t0 = Instant::now();
            let layout = target.layout();
            let (n_layer, layer_bytes) = (layout.n_layer, layout.layer_block_bytes());
            let mut loaded = 0;
            let mut miss = None;
            for i in 0..target.n_blocks() {
                let Some(hash) = target.block_hash(i).copied() else {
                    miss = Some("missing");
                    break;
                };
                let ok = read_block(
                    |head, parts| tier.read_into(&hash, head, parts),
                    &digest,
                    &hash,
                    n_layer,
                    layer_bytes,
                    &mut target.block_parts_mut(i),
                );
                if let Err(why) = ok {
                    if why != "missing" {
                        tier.discard(&hash);
                    }
                    tracing::warn!(block = %hex(&hash), reason = why, request = %target.request_id(), "stored KV block not used; computing from there");
                    miss = Some(why);
                    break;
                }
                loaded += 1;
            }
            if let Some(f) = &on_event {
                if loaded > 0 {
                    let bytes = (loaded * n_layer * layer_bytes) as u64;
                    let (blocks, took) = (loaded as u64, t0.elapsed());
                    f(name, StoreEvent::Loaded { blocks, bytes, took });
                }
                if let Some(reason) = miss {
                    f(name, StoreEvent::Miss { reason });
                }
            }
            let report = LoadReport {
                request_id: target.request_id().to_string(),
                producer: tier.describe(),
                blocks: loaded,
                bytes: (loaded * n_layer * layer_bytes) as u64,
                took: t0.elapsed(),
                error: None,
            };
            let first = RemoteFirst {
                loaded_tokens: miss.map(|_| (target.first_block() + loaded) * bs),
                ..RemoteFirst::default()
            };
            target.finish(Ok(first));
            if let Some(o) = &observer {
                o(&report);
            }
        });
    }

    fn release(&self, _: RemoteKv) {}

    fn wants_saves(&self) -> bool {
        self.saves
    }

    fn save_block(&self, hash: &BlockHash, block: SavedBlock<'_>) {
        let Some(tx) = &self.writer else { return };
        let layers: Vec<[&[u8]; 2]> = (0..block.layout().n_layer)
            .map(|l| block.layer(l))
            .collect();
        let bytes = encode(&self.digest, hash, &layers);
        self.progress.counts().0 += 1;
        match tx.try_send((*hash, bytes)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let mut c = self.progress.counts();
                c.0 -= 1;
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n,
                        "the KV store's writer is behind; blocks not saved"
                    );
                }
                if let Some(f) = &self.on_event {
                    f(
                        self.name,
                        StoreEvent::Miss {
                            reason: "save_dropped",
                        },
                    );
                }
            }
        }
    }

    fn looks_up(&self) -> bool {
        self.loads
    }

    fn stored_tokens(&self, hashes: &[BlockHash]) -> usize {
        let found = self.tier.run_of(hashes);
        // Whole offloaded blocks only.
        (found - found % self.group) * self.block_size
    }
}

/// Engine blocks per `field`'s tokens (a multiple of the engine's block size; the engine's
/// block when not given).
fn blocks_per(s: &Setup, field: &'static str, tokens: Option<usize>) -> Result<usize, ConfigError> {
    let bs = s.fingerprint.block_size as usize;
    let tokens = tokens.unwrap_or(bs);
    if tokens == 0 || !tokens.is_multiple_of(bs) {
        return Err(ConfigError::Field {
            field,
            reason: format!("{tokens} is not a multiple of the engine's block size {bs}"),
        });
    }
    Ok(tokens / bs)
}

/// `ExampleConnector` and `OffloadingConnector` as a server sees them.
pub(crate) struct StorageRole {
    config: KvTransferConfig,
    fingerprint: Fingerprint,
    engine_id: String,
    store: Arc<BlockStore>,
}

impl StorageRole {
    pub(crate) fn new(s: Setup, hooks: Hooks) -> Result<Self, ConfigError> {
        let x = &s.config.kv_connector_extra_config;
        let role = s.config.kv_role;
        let field = |field: &'static str, reason: String| ConfigError::Field { field, reason };
        let (tier, group, saves, loads): (Arc<dyn Tier>, usize, bool, bool) = match s.config.kind {
            ConnectorKind::Offloading => {
                let cap = x.cpu_bytes_to_use.ok_or_else(|| {
                    field(
                        "kv_connector_extra_config.cpu_bytes_to_use",
                        "OffloadingConnector needs the host memory it may use, in bytes".into(),
                    )
                })?;
                let group = blocks_per(&s, "kv_connector_extra_config.block_size", x.block_size)?;
                let disk = match x.secondary_tiers.as_deref() {
                    Some([t, ..]) => Some(Disk::new(t.path.clone(), t.bytes).map_err(|e| {
                        field(
                            "kv_connector_extra_config.secondary_tiers",
                            format!("cannot use {}: {e}", t.path.display()),
                        )
                    })?),
                    _ => None,
                };
                let memory = Memory::new(cap, disk);
                // A tier of this process: it saves and loads whatever the role.
                (Arc::new(memory), group, true, true)
            }
            ConnectorKind::RedisStore => {
                let url = x.remote_url.as_deref().ok_or_else(|| {
                    field(
                        "kv_connector_extra_config.remote_url",
                        "RedisStoreConnector needs the server, redis://host:port".into(),
                    )
                })?;
                // 256 tokens by default, as LMCache's chunks.
                let group = blocks_per(
                    &s,
                    "kv_connector_extra_config.chunk_size",
                    x.chunk_size.or(Some(256)),
                )?;
                let redis = Redis::new(url, &digest_of(&s.fingerprint))
                    .map_err(|e| field("kv_connector_extra_config.remote_url", e))?;
                // Unreachable at startup is a configuration error; later, a miss.
                redis
                    .with(|c| redis::cmd("PING").query::<String>(c))
                    .map_err(|e| {
                        field(
                            "kv_connector_extra_config.remote_url",
                            format!("{} does not answer: {e}", redis.describe()),
                        )
                    })?;
                (Arc::new(redis), group, role.produces(), role.consumes())
            }
            _ => {
                let path = x.shared_storage_path.clone().ok_or_else(|| {
                    field(
                        "kv_connector_extra_config.shared_storage_path",
                        format!("{} needs a directory", s.config.kv_connector),
                    )
                })?;
                // Missing or unwritable is a configuration error, found now.
                tiers::writable_dir(&path).map_err(|e| {
                    field(
                        "kv_connector_extra_config.shared_storage_path",
                        format!("{} is not a writable directory: {e}", path.display()),
                    )
                })?;
                (Arc::new(Dir(path)), 1, role.produces(), role.consumes())
            }
        };
        let name = s.config.connector_name;
        let store = BlockStore::new(name, tier, &s.fingerprint, group, saves, loads, &hooks)
            .map_err(|e| {
                field(
                    "kv_connector",
                    format!("cannot start the store's writer: {e}"),
                )
            })?;
        Ok(Self {
            config: s.config,
            fingerprint: s.fingerprint,
            engine_id: s.engine_id,
            store: Arc::new(store),
        })
    }
}

impl KvRoleConnector for StorageRole {
    fn config(&self) -> &KvTransferConfig {
        &self.config
    }

    fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    fn side_channel(&self) -> Option<std::net::SocketAddr> {
        None
    }

    fn engine_connector(&self) -> Option<Arc<dyn KvConnector>> {
        Some(self.store.clone())
    }

    fn plan(&self, params: Option<&KvTransferParams>) -> Result<Plan, PlanError> {
        let role = self.config.kv_role;
        let is = role.as_str();
        // Every prompt is looked up in the store by the engine: a consumer's request needs
        // nothing from its params, and no params name an address.
        match params.map(|p| p.ask) {
            None | Some(Ask::Local) => Ok(Plan::Local),
            Some(Ask::Produce) if role.produces() => Ok(Plan::Save),
            Some(Ask::Produce) => Err(PlanError::Role {
                ask: "do_remote_decode",
                wants: "kv_producer",
                is,
            }),
            Some(Ask::Consume) if role.consumes() => Ok(Plan::Local),
            Some(Ask::Consume) => Err(PlanError::Role {
                ask: "do_remote_prefill",
                wants: "kv_consumer",
                is,
            }),
        }
    }

    fn start(&self, _: &Engine) -> Result<(), RoleError> {
        Ok(())
    }

    fn request_finished(&self, _request_id: &str, _first: &[u32]) -> Result<Value, RoleError> {
        if !self.config.kv_role.produces() {
            return Err(RoleError::NotProducer);
        }
        // The consumer looks the prompt up by its blocks' hashes: they must be on disk first.
        self.store.flush();
        Ok(json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_engine_id": self.engine_id,
            "remote_block_ids": [],
            "remote_host": null,
            "remote_port": null,
            "tp_size": 1,
        }))
    }

    fn release(&self, _: &RemoteKv) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One stored file, whatever the hash asked for.
    struct One(Vec<u8>);

    impl Tier for One {
        fn put(&self, _: &BlockHash, _: Vec<u8>) -> std::io::Result<()> {
            Ok(())
        }
        fn has(&self, _: &BlockHash) -> bool {
            true
        }
        fn read_into(
            &self,
            _: &BlockHash,
            head: &mut [u8],
            parts: &mut [&mut [u8]],
        ) -> Result<bool, &'static str> {
            fill_from(&mut &self.0[..], head, parts).map(|()| true)
        }
        fn describe(&self) -> String {
            "one file".into()
        }
    }

    /// A whole file checked through [`read_block`] into buffers.
    fn check(
        file: &[u8],
        digest: &[u8; 32],
        hash: &BlockHash,
        n_layer: usize,
        layer_bytes: usize,
    ) -> Result<(), &'static str> {
        let half = layer_bytes / 2;
        let mut bufs: Vec<Vec<u8>> = (0..2 * n_layer)
            .map(|i| vec![0; if i % 2 == 0 { half } else { layer_bytes - half }])
            .collect();
        let mut parts: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
        let one = One(file.to_vec());
        read_block(
            |head, parts| one.read_into(hash, head, parts),
            digest,
            hash,
            n_layer,
            layer_bytes,
            &mut parts,
        )
    }

    #[test]
    fn a_block_file_is_checked_field_by_field() {
        let digest = [7u8; 32];
        let hash = [9u8; 32];
        let (k, v) = (vec![1u8; 24], vec![2u8; 24]);
        let layers = [[&k[..], &v[..]], [&v[..], &k[..]]];
        let mut good = encode(&digest, &hash, &layers);
        assert_eq!(
            check(&good, &digest, &hash, 2, 48),
            Err("corrupt"),
            "unsealed"
        );
        seal(&mut good);
        assert_eq!(good.len(), HEADER + 2 * 48);
        assert_eq!(check(&good, &digest, &hash, 2, 48), Ok(()));
        assert_eq!(
            check(&good[..good.len() - 1], &digest, &hash, 2, 48),
            Err("truncated")
        );
        assert_eq!(check(&good, &[8u8; 32], &hash, 2, 48), Err("foreign"));
        assert_eq!(check(&good, &digest, &[0u8; 32], 2, 48), Err("foreign"));
        assert_eq!(check(&good, &digest, &hash, 3, 32), Err("foreign"));
        for at in [0, 20, 50, 75, HEADER - 1, HEADER, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            assert!(check(&bad, &digest, &hash, 2, 48).is_err(), "byte {at}");
        }
    }
}
