//! Consumer side: KV that arrives from elsewhere (loaded by the connector into lent blocks,
//! or imported whole) and the request continuing from it.

use std::sync::atomic::Ordering;

use super::connector::StoreLookup;
use super::{
    Core, Event, FinishReason, KvImport, LoadFailurePolicy, LoadTarget, RemoteFirst, RemoteKv, Seq,
    TokenOut,
};
use crate::error::EngineError;
use crate::sampler::Sampler;
use crate::scheduler::{RequestState, Schedulable};

impl Core {
    pub(super) fn release_remote(&self, remote: RemoteKv) {
        if let Some(c) = &self.connector {
            c.release(remote);
        }
    }

    /// Allocates blocks for requests whose KV waits remotely, in arrival order, and lends
    /// them to the connector; a request that does not fit yet waits for free blocks.
    pub(super) fn start_loads(&mut self) {
        if self.remote_waiting.is_empty() {
            return;
        }
        let Some(conn) = self.connector.clone() else {
            return;
        };
        let bs = self.cache.layout.block_size;
        while let Some((s, remote)) = self.remote_waiting.front_mut() {
            let n = if remote.get::<StoreLookup>().is_some() {
                // A store lookup loads only what beats this engine's own cache.
                let len = s.prompt_len;
                let hashes = s.block_hashes();
                let mut stored = conn.stored_tokens(hashes).min(len);
                if let (Some((_, slots)), Some(window)) =
                    (self.cache.slot_counts(), self.cache.layout.window_blocks())
                {
                    // Blocks loaded from a store keep every layer until the request's
                    // first step: no more than the windowed layers' slots can ever hold
                    // (the rest is computed, window by window).
                    let cap = slots.saturating_sub(window);
                    stored = stored.min(cap * bs);
                }
                let local = self.cache.cached_prefix(hashes, len).len() * bs;
                if stored > local {
                    stored
                } else {
                    0
                }
            } else {
                conn.remote_tokens(remote, s.prompt_len).min(s.prompt_len)
            };
            if n == 0 {
                // Nothing to load: computed here like any request.
                if let Some((s, remote)) = self.remote_waiting.pop_front() {
                    self.release_remote(remote);
                    self.waiting.push_back(s);
                }
                continue;
            }
            // Blocks this engine has cached already are not loaded again; at least one block
            // always is (as a local prompt computes at least its last token).
            let from_store = remote.get::<StoreLookup>().is_some();
            let hit = match self.remote_waiting.front_mut() {
                Some((s, _)) if self.cache.prefix_caching() => {
                    self.cache.cached_prefix(s.block_hashes(), n)
                }
                _ => Vec::new(),
            };
            // The request will have the KV of `n` tokens (or, from a store, perhaps fewer,
            // computing the rest: those blocks keep every layer).
            let local_from = if from_store {
                self.cache.layout.window_start_block(hit.len() * bs)
            } else {
                self.cache.layout.window_start_block(n)
            };
            let Some(blocks) = self
                .cache
                .take(&hit, n.div_ceil(bs) - hit.len(), local_from)
            else {
                break;
            };
            let Some((mut s, remote)) = self.remote_waiting.pop_front() else {
                break;
            };
            self.stats
                .prefix_cache_queries
                .fetch_add(n as u64, Ordering::Relaxed);
            self.stats
                .prefix_cache_hits
                .fetch_add((hit.len() * bs) as u64, Ordering::Relaxed);
            s.cache.cached_tokens.get_or_insert(hit.len() * bs);
            s.state = RequestState::WaitingForRemoteKvs;
            let first = hit.len();
            s.blocks = hit;
            s.local_from = local_from;
            let hashes = s.block_hashes();
            let lent =
                hashes[first.min(hashes.len())..hashes.len().min(first + blocks.len())].to_vec();
            let blocks = (blocks, local_from.saturating_sub(first));
            let target = LoadTarget::new(self.lease(blocks, &s.id), n, first, lent);
            self.loading.insert(s.id.clone(), (s, n));
            conn.start_load(remote, target);
        }
        self.publish();
    }

    /// A load ended: the request continues from its KV, or fails with the connector's error.
    pub(super) fn loaded(
        &mut self,
        id: String,
        (mut blocks, lent_from): (Vec<u32>, usize),
        result: Result<RemoteFirst, String>,
    ) {
        let Some((mut s, n)) = self.loading.remove(&id) else {
            // Aborted while loading.
            self.cache.release(&mut blocks, lent_from);
            return;
        };
        let first = match result {
            Ok(f) => f,
            Err(e) => {
                self.cache.release(&mut blocks, lent_from);
                if self.load_failure == LoadFailurePolicy::Recompute {
                    tracing::warn!(id = %s.id, error = %e, "KV load failed; computing the prompt here instead");
                    self.stats
                        .load_failures_recomputed
                        .fetch_add(1, Ordering::Relaxed);
                    // From scratch, as a new request: the scheduler looks up the cache again.
                    let local_from = std::mem::take(&mut s.local_from);
                    self.cache.release(&mut s.blocks, local_from);
                    s.num_computed = 0;
                    s.state = RequestState::Waiting;
                    self.waiting.push_front(s);
                    return;
                }
                return self.finish(s, FinishReason::Abort, Some(EngineError::KvTransfer(e)));
            }
        };
        let bs = self.cache.layout.block_size;
        let n = match first.loaded_tokens {
            Some(t) if t < n => {
                // Part of the load arrived: keep its blocks, compute the rest here.
                let keep = (t / bs).saturating_sub(s.blocks.len()).min(blocks.len());
                let mut unused = blocks.split_off(keep);
                self.cache
                    .release(&mut unused, lent_from.saturating_sub(keep));
                ((s.blocks.len() + keep) * bs).min(n)
            }
            _ => n,
        };
        // The blocks found in the prefix cache, then the loaded ones.
        s.blocks.extend(blocks);
        s.state = RequestState::Waiting;
        if s.params.logprobs.is_some() {
            // The producer's first token comes without its logprobs: recompute the last
            // prompt position here, whose sampler draws the same token (greedy or seeded).
            return self.resume_from_kv(s, n, Vec::new(), None);
        }
        self.resume_from_kv(s, n, first.generated, first.sampler);
    }

    /// Places imported KV into fresh blocks; the request then decodes from there.
    pub(super) fn import(&mut self, mut s: Seq, i: KvImport) {
        let ours = self.cache.layout;
        let fail =
            |core: &mut Self, s: Seq, e: EngineError| core.finish(s, FinishReason::Abort, Some(e));
        if i.layout != ours {
            let e = EngineError::KvMismatch(format!(
                "imported layout {:?} differs from ours {:?}",
                i.layout, ours
            ));
            return fail(self, s, e);
        }
        let n_blocks = i.n_tokens.div_ceil(ours.block_size);
        if i.n_tokens != s.prompt_len {
            let e = EngineError::KvMismatch(format!(
                "imported KV for {} tokens does not fit a {}-token prompt",
                i.n_tokens, s.prompt_len
            ));
            return fail(self, s, e);
        }
        if let Err(why) = ours.check_layers(i.n_tokens, &i.layers) {
            return fail(self, s, EngineError::KvMismatch(why));
        }
        let local_from = ours.window_start_block(i.n_tokens);
        let Some(blocks) = self.cache.take(&[], n_blocks, local_from) else {
            let e = EngineError::Overloaded {
                waiting: self.waiting.len(),
            };
            return fail(self, s, e);
        };
        self.cache.set_layers_bytes(&blocks, i.n_tokens, &i.layers);
        s.local_from = local_from;
        s.blocks = blocks;
        self.resume_from_kv(s, i.n_tokens, i.generated, Some(i.sampler));
    }

    /// `s` has the KV of its first `n` tokens in its blocks, and `generated` tokens were
    /// sampled remotely: queue it to continue from there.
    pub(super) fn resume_from_kv(
        &mut self,
        mut s: Seq,
        n: usize,
        generated: Vec<u32>,
        sampler: Option<Sampler>,
    ) {
        if generated.is_empty() {
            // No first token came with the KV (vLLM's proxy contract): recompute the last
            // prompt position here; the request's own sampler draws the first token.
            s.num_computed = n.min(s.prompt_len - 1);
            self.waiting.push_back(s);
            return;
        }
        s.num_computed = n;
        s.tokens.extend_from_slice(&generated);
        if let Some(sm) = sampler {
            s.sampler = sm;
        }
        // The imported first token is output too: the client sees it from this engine.
        let mut text = Some(
            s.detok
                .step(&self.model.tokenizer, &s.tokens[s.prompt_len..]),
        );
        s.text = text.clone().unwrap_or_default();
        s.sent = s.text.len();
        for &t in &generated {
            let out = TokenOut {
                token: t,
                text: text.take().unwrap_or_default(),
                logprob: None,
                top_logprobs: vec![],
                logits: None,
            };
            let _ = s.tx.send(Event::Token(out));
        }
        let ends = self.model.tokenizer.end_ids();
        let ended = generated.iter().any(|&t| {
            (ends.contains(&t) && !s.params.ignore_eos) || s.params.stop_token_ids.contains(&t)
        });
        if ended {
            return self.finish(s, FinishReason::Stop, None);
        }
        if s.completion_tokens() >= s.params.max_tokens {
            return self.finish(s, FinishReason::Length, None);
        }
        self.waiting.push_back(s);
    }
}
