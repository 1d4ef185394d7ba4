//! Producer side: a finished request's KV held for its reader, lent out while read, freed
//! when read, released or timed out.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::connector::Lease;
use super::{Core, KvImport};
use crate::error::EngineError;
use crate::sampler::Sampler;

pub(super) struct Held {
    pub(super) since: Instant,
    pub(super) blocks: Vec<u32>,
    /// The first of `blocks` whose windowed layers' slots it holds.
    pub(super) local_from: usize,
    pub(super) n_tokens: usize,
    pub(super) generated: Vec<u32>,
    pub(super) sampler: Sampler,
}

/// Producer: finished requests' KV waiting for its reader, shared with the engine's handles
/// so that a reader's lease never waits for the engine thread to finish a step (a long
/// prefill step would otherwise delay every pull by up to its length).
#[derive(Default)]
pub(super) struct Holds {
    pub(super) map: std::sync::Mutex<std::collections::HashMap<String, Held>>,
    /// Held blocks lent to readers, until they come back.
    pub(super) lent: AtomicUsize,
}

impl Holds {
    pub(super) fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Held>> {
        // A panic while holding the lock cannot leave the map half-updated: every critical
        // section is a single insert, remove or scan.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn blocks(&self) -> usize {
        self.map().values().map(|h| h.blocks.len()).sum::<usize>()
            + self.lent.load(Ordering::Relaxed)
    }
}

impl Core {
    /// `blocks` of request `id` (slots from `.1` on), lent out; they come back through
    /// the command channel.
    pub(super) fn lease(&self, blocks: (Vec<u32>, usize), id: &str) -> Lease {
        Lease::new(
            self.cache.mem.clone(),
            blocks,
            id.to_string(),
            self.back.clone(),
        )
    }

    /// Removes `id`'s held KV (the map's lock is released on return).
    pub(super) fn take_held(&self, id: &str) -> Option<Held> {
        self.holds.map().remove(id)
    }

    /// Frees blocks no consumer came for within the hold timeout.
    pub(super) fn expire_held(&mut self) {
        let timeout = self.hold_timeout;
        let expired: Vec<(String, Held)> = {
            let mut map = self.holds.map();
            if map.is_empty() {
                return;
            }
            map.extract_if(|_, h| h.since.elapsed() >= timeout)
                .collect()
        };
        if expired.is_empty() {
            return;
        }
        for (id, mut h) in expired {
            tracing::warn!(id = %id, blocks = h.blocks.len(), "KV hold timed out; freeing blocks");
            self.cache.release(&mut h.blocks, h.local_from);
        }
        self.publish();
    }

    pub(super) fn export(&mut self, id: &str) -> Result<KvImport, EngineError> {
        let mut h = self
            .take_held(id)
            .ok_or_else(|| EngineError::KvMismatch(format!("no KV held for request {id}")))?;
        let layout = self.cache.layout;
        let layers = self.cache.layers_bytes(&h.blocks, h.n_tokens);
        self.cache.release(&mut h.blocks, h.local_from);
        Ok(KvImport {
            layout,
            n_tokens: h.n_tokens,
            layers,
            generated: h.generated,
            sampler: h.sampler,
        })
    }
}
