//! The tiers of this host: files in a directory (shared by instances, or this instance's
//! own disk tier with a byte budget), and host memory with a byte budget whose evictions
//! may go down to a disk tier.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use splitserve_engine::prefix_cache::{hex, BlockHash};

use super::{file_len, fill_from, read_vectored_exact, Tier, HEADER};

fn file_of(dir: &Path, hash: &BlockHash) -> PathBuf {
    dir.join(format!("{}.kv", hex(hash)))
}

/// The hash a block file's name carries (`<64 hex digits>.kv`).
fn hash_of(path: &Path) -> Option<BlockHash> {
    let name = path.file_name()?.to_str()?.strip_suffix(".kv")?;
    if name.len() != 64 {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(h)
}

/// Writes `bytes` as `hash`'s file: a temporary name, then a rename. An existing file of
/// the right length is kept as it is.
pub(super) fn write_atomic(dir: &Path, hash: &BlockHash, bytes: &[u8]) -> std::io::Result<()> {
    let path = file_of(dir, hash);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(());
    }
    static N: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        hex(hash),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let r = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Checks that `path` is (or can be made) a writable directory.
pub(super) fn writable_dir(path: &Path) -> std::io::Result<()> {
    let probe = path.join(format!(".probe.{}", std::process::id()));
    std::fs::create_dir_all(path)
        .and_then(|()| std::fs::write(&probe, b"ok"))
        .and_then(|()| std::fs::remove_file(&probe))
}

/// Files in a directory.
pub(super) struct Dir(pub(super) PathBuf);

impl Tier for Dir {
    fn put(&self, hash: &BlockHash, bytes: Vec<u8>) -> std::io::Result<()> {
        write_atomic(&self.0, hash, &bytes)
    }

    fn has(&self, hash: &BlockHash) -> bool {
        std::fs::metadata(file_of(&self.0, hash)).is_ok_and(|m| m.len() > HEADER as u64)
    }

    fn read_into(
        &self,
        hash: &BlockHash,
        head: &mut [u8],
        parts: &mut [&mut [u8]],
    ) -> Result<bool, &'static str> {
        let mut f = std::fs::File::open(file_of(&self.0, hash)).map_err(|_| "missing")?;
        let len = file_len(head, parts);
        if f.metadata().map_err(|_| "missing")?.len() != len as u64 {
            return Err("truncated");
        }
        // Straight into the engine's blocks: a syscall per block, not per layer, and no
        // staging copy.
        read_vectored_exact(&mut f, head, parts).map_err(|_| "truncated")?;
        Ok(true)
    }

    fn discard(&self, hash: &BlockHash) {
        let _ = std::fs::remove_file(file_of(&self.0, hash));
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

/// Entries up to a byte budget, least recently used out first.
struct Lru<V> {
    cap: u64,
    used: u64,
    tick: u64,
    map: HashMap<BlockHash, (V, u64, u64)>,
    order: BTreeMap<u64, BlockHash>,
}

impl<V: Clone> Lru<V> {
    fn new(cap: u64) -> Self {
        Self {
            cap,
            used: 0,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) `hash`, newest; what it pushed out, oldest first.
    fn insert(&mut self, hash: BlockHash, v: V, size: u64) -> Vec<(BlockHash, V)> {
        self.remove(&hash);
        self.tick += 1;
        self.used += size;
        self.map.insert(hash, (v, self.tick, size));
        self.order.insert(self.tick, hash);
        let mut out = Vec::new();
        while self.used > self.cap {
            let Some((_, h)) = self.order.pop_first() else {
                break;
            };
            if let Some((v, _, size)) = self.map.remove(&h) {
                self.used -= size;
                out.push((h, v));
            }
        }
        out
    }

    /// `hash`'s value, now the newest.
    fn touch(&mut self, hash: &BlockHash) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        let (v, t, _) = self.map.get_mut(hash)?;
        let (v, old) = (v.clone(), std::mem::replace(t, tick));
        self.order.remove(&old);
        self.order.insert(tick, *hash);
        Some(v)
    }

    fn remove(&mut self, hash: &BlockHash) {
        if let Some((_, t, size)) = self.map.remove(hash) {
            self.used -= size;
            self.order.remove(&t);
        }
    }
}

/// This instance's own directory up to a byte budget: a tier below host memory. Files a
/// previous run left are kept (oldest out first) and used.
pub(super) struct Disk {
    dir: Dir,
    index: Mutex<Lru<()>>,
    /// Held locked while this tier lives: a second process on the same directory would
    /// evict, and delete the half-written files of, this one's blocks.
    _lock: std::fs::File,
}

impl Disk {
    pub(super) fn new(path: PathBuf, cap: u64) -> std::io::Result<Self> {
        writable_dir(&path)?;
        let lock = std::fs::File::create(path.join(".lock"))?;
        if let Err(e) = lock.try_lock() {
            return Err(std::io::Error::other(format!(
                "{} is in use by another instance ({}/.lock is locked): give each its own: {e}",
                path.display(),
                path.display()
            )));
        }
        let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(&path)?.flatten().collect();
        // Temporary files of a run that ended mid-write are no block's.
        for e in &entries {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut found: Vec<(std::time::SystemTime, BlockHash, u64)> = entries
            .iter()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, hash_of(&e.path())?, m.len()))
            })
            .collect();
        found.sort();
        let mut index = Lru::new(cap);
        for (_, hash, len) in found {
            for (old, ()) in index.insert(hash, (), len) {
                let _ = std::fs::remove_file(file_of(&path, &old));
            }
        }
        Ok(Self {
            dir: Dir(path),
            index: Mutex::new(index),
            _lock: lock,
        })
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Lru<()>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tier for Disk {
    fn put(&self, hash: &BlockHash, bytes: Vec<u8>) -> std::io::Result<()> {
        let n = bytes.len() as u64;
        if n > self.index().cap {
            return Ok(());
        }
        self.dir.put(hash, bytes)?;
        let out = self.index().insert(*hash, (), n);
        for (old, ()) in out {
            let _ = std::fs::remove_file(file_of(&self.dir.0, &old));
        }
        Ok(())
    }

    fn has(&self, hash: &BlockHash) -> bool {
        self.index().map.contains_key(hash)
    }

    fn read_into(
        &self,
        hash: &BlockHash,
        head: &mut [u8],
        parts: &mut [&mut [u8]],
    ) -> Result<bool, &'static str> {
        if self.index().touch(hash).is_none() {
            return Err("missing");
        }
        let r = self.dir.read_into(hash, head, parts);
        if r.is_err() {
            self.discard(hash);
        }
        r
    }

    fn discard(&self, hash: &BlockHash) {
        self.index().remove(hash);
        self.dir.discard(hash);
    }

    fn describe(&self) -> String {
        format!(
            "disk {} ({} MiB)",
            self.dir.describe(),
            self.index().cap >> 20
        )
    }
}

/// Host memory up to a byte budget, least recently used out first: down to `below` when
/// there is one, else gone.
pub(super) struct Memory {
    lru: Mutex<Lru<Arc<Vec<u8>>>>,
    below: Option<Disk>,
}

impl Memory {
    pub(super) fn new(cap: u64, below: Option<Disk>) -> Self {
        Self {
            lru: Mutex::new(Lru::new(cap)),
            below,
        }
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru<Arc<Vec<u8>>>> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tier for Memory {
    fn put(&self, hash: &BlockHash, bytes: Vec<u8>) -> std::io::Result<()> {
        if bytes.len() as u64 > self.lru().cap {
            return Ok(());
        }
        let n = bytes.len() as u64;
        let out = self.lru().insert(*hash, Arc::new(bytes), n);
        // Written outside the lock: loads go on meanwhile.
        if let Some(disk) = &self.below {
            for (h, b) in out {
                let b = Arc::try_unwrap(b).unwrap_or_else(|shared| (*shared).clone());
                if let Err(e) = disk.put(&h, b) {
                    tracing::warn!(error = %e, block = %hex(&h), "cannot move a KV block to the disk tier");
                }
            }
        }
        Ok(())
    }

    fn has(&self, hash: &BlockHash) -> bool {
        self.lru().map.contains_key(hash) || self.below.as_ref().is_some_and(|d| d.has(hash))
    }

    fn read_into(
        &self,
        hash: &BlockHash,
        head: &mut [u8],
        parts: &mut [&mut [u8]],
    ) -> Result<bool, &'static str> {
        let Some(bytes) = self.lru().touch(hash) else {
            return match &self.below {
                Some(disk) => disk.read_into(hash, head, parts),
                None => Err("missing"),
            };
        };
        // Copied once, into the engine's blocks, outside the lock. Not checksummed: sealed
        // by this process and never out of its memory since.
        fill_from(&mut &bytes[..], head, parts).map(|()| false)
    }

    fn discard(&self, hash: &BlockHash) {
        self.lru().remove(hash);
        if let Some(disk) = &self.below {
            disk.discard(hash);
        }
    }

    fn describe(&self) -> String {
        let mem = format!("host memory ({} MiB)", self.lru().cap >> 20);
        match &self.below {
            Some(d) => format!("{mem} over {}", d.describe()),
            None => mem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_name_gives_back_its_hash() {
        let h: BlockHash = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(hash_of(&file_of(Path::new("/x"), &h)), Some(h));
        assert_eq!(hash_of(Path::new("/x/.ab.tmp")), None);
        assert_eq!(hash_of(Path::new("/x/zz.kv")), None);
    }

    #[test]
    fn memory_spills_its_oldest_to_a_bounded_disk_tier() {
        let dir = std::env::temp_dir().join(format!("splitserve-tiers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let block = |i: u8| vec![i; 100];
        let mem = Memory::new(250, Some(Disk::new(dir.clone(), 300).expect("disk")));
        for i in 0..6u8 {
            mem.put(&[i; 32], block(i)).expect("put");
        }
        // Memory holds the newest two; the disk the three before (300 bytes); the first is
        // gone from both, file included.
        let on_disk = |i: u8| file_of(&dir, &[i; 32]).exists();
        assert_eq!(
            (0..6).map(on_disk).collect::<Vec<_>>(),
            [false, true, true, true, false, false]
        );
        assert_eq!(
            (0..6).map(|i| mem.has(&[i; 32])).collect::<Vec<_>>(),
            [false, true, true, true, true, true]
        );
        // A second instance on the same directory is refused while the first lives.
        let e = Disk::new(dir.clone(), 200).err().expect("refused");
        assert!(e.to_string().contains("in use by another instance"), "{e}");
        // A restarted instance finds the disk's files.
        drop(mem);
        let again = Disk::new(dir.clone(), 200).expect("disk");
        assert_eq!((1..4).filter(|&i| again.has(&[i; 32])).count(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
