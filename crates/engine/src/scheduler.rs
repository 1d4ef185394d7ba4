//! Continuous batching: which requests run in the next step, and how many tokens each.
//!
//! Policy (vLLM v1-like): running requests first, in arrival order, one token each when
//! decoding or a chunk of their remaining prompt when prefilling; then waiting requests,
//! first come first served, while the token budget, `max_num_seqs` and free blocks allow.
//! When blocks run out for a running request, the newest running request is preempted by
//! recompute: its blocks are freed and it goes back to the head of the queue, never aborted.

use std::collections::VecDeque;

use crate::kv_cache::KvCache;
use crate::prefix_cache::BlockHash;

/// Request lifecycle states (docs/design.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestState {
    Waiting,
    WaitingForRemoteKvs,
    Running,
    Preempted,
}

/// What the scheduler needs to know of a request.
pub(crate) trait Schedulable {
    /// Tokens known so far (prompt plus generated).
    fn num_tokens(&self) -> usize;
    /// Tokens whose KV is in the cache.
    fn num_computed(&self) -> usize;
    fn blocks(&mut self) -> &mut Vec<u32>;
    /// The first of its blocks whose windowed layers it holds (see [`KvCache`]).
    fn local_from(&mut self) -> &mut usize;
    fn set_state(&mut self, s: RequestState);
    /// Forget computed KV (preemption by recompute).
    fn reset_computed(&mut self);
    /// Hashes of the full blocks of the tokens known so far (prefix caching).
    fn block_hashes(&mut self) -> &[BlockHash];
    /// The first `tokens` came from the prefix cache.
    fn set_cached(&mut self, tokens: usize);
}

#[derive(Debug, Clone)]
pub(crate) struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_chunked_prefill: bool,
    pub block_size: usize,
    /// With chunked prefill, a prompt with more than this many tokens left gets at most
    /// this many per step, so shorter prompts share the step (vLLM's
    /// `--long-prefill-token-threshold`); 0: no cap.
    pub long_prefill_token_threshold: usize,
    /// With a threshold set, at most this many prompts longer than it are prefilled at once;
    /// a shorter prompt may pass a long one waiting in the queue (vLLM's
    /// `--max-long-partial-prefills`).
    pub max_long_partial_prefills: usize,
}

impl SchedulerConfig {
    /// A prefill with more tokens left than the threshold.
    fn is_long(&self, remaining: usize) -> bool {
        self.long_prefill_token_threshold > 0 && remaining > self.long_prefill_token_threshold
    }

    /// Tokens of a request with `remaining` uncomputed tokens in a step with `budget` left.
    fn chunk(&self, remaining: usize, budget: usize) -> usize {
        let t = self.long_prefill_token_threshold;
        if t > 0 && remaining > t {
            t.min(budget)
        } else {
            remaining.min(budget)
        }
    }
}

/// The plan of one step: indices into `running` with the number of tokens to compute.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub items: Vec<(usize, usize)>,
    pub preempted: usize,
    /// Prompt tokens of the requests admitted, and of those the tokens the cache had.
    pub cache_queries: usize,
    pub cache_hits: usize,
}

pub(crate) fn schedule<S: Schedulable>(
    cfg: &SchedulerConfig,
    cache: &mut KvCache,
    running: &mut Vec<S>,
    waiting: &mut VecDeque<S>,
) -> Plan {
    let mut plan = Plan::default();
    let mut budget = cfg.max_num_batched_tokens;
    let blocks_for = |tokens: usize| tokens.div_ceil(cfg.block_size);
    let mut long_prefills = 0;
    let mut i = 0;
    while i < running.len() && budget > 0 {
        let (total, done) = (running[i].num_tokens(), running[i].num_computed());
        let remaining = total - done;
        long_prefills += usize::from(cfg.is_long(remaining));
        let n = if cfg.enable_chunked_prefill {
            cfg.chunk(remaining, budget)
        } else if remaining <= budget {
            remaining
        } else {
            i += 1;
            continue;
        };
        let need = blocks_for(done + n).saturating_sub(running[i].blocks().len());
        let mut self_preempted = false;
        while cache.num_free() < need {
            let victim = running.len() - 1;
            let mut v = running.remove(victim);
            let local_from = std::mem::take(v.local_from());
            cache.release(v.blocks(), local_from);
            v.reset_computed();
            v.set_state(RequestState::Preempted);
            waiting.push_front(v);
            plan.preempted += 1;
            if victim == i {
                self_preempted = true;
                break;
            }
        }
        if self_preempted {
            break;
        }
        if let Some(mut got) = cache.allocate(need) {
            running[i].blocks().append(&mut got);
        }
        plan.items.push((i, n));
        budget -= n;
        i += 1;
    }
    if plan.preempted > 0 {
        return plan;
    }
    let mut w = 0;
    while budget > 0 && running.len() < cfg.max_num_seqs {
        let Some(front) = waiting.get_mut(w) else {
            break;
        };
        let (total, mut done) = (front.num_tokens(), front.num_computed());
        // The longest cached run of its full blocks, leaving at least the last token to
        // compute (its logits are the ones sampled).
        let hit = if done == 0 && front.blocks().is_empty() && cache.prefix_caching() {
            cache.cached_prefix(front.block_hashes(), total)
        } else {
            Vec::new()
        };
        done += hit.len() * cfg.block_size;
        let remaining = total - done;
        let long = cfg.is_long(remaining);
        if long && long_prefills >= cfg.max_long_partial_prefills.max(1) {
            // Enough long prompts in this step: let a shorter one behind it in.
            w += 1;
            continue;
        }
        let n = if cfg.enable_chunked_prefill {
            cfg.chunk(remaining, budget)
        } else if remaining <= budget
            || (plan.items.is_empty() && budget == cfg.max_num_batched_tokens)
        {
            // Without chunking, a prompt longer than the budget runs alone in its own step.
            remaining
        } else {
            break;
        };
        let need = blocks_for(done + n).saturating_sub(front.blocks().len() + hit.len());
        // A request with blocks already (its KV loaded) holds their slots; new blocks come
        // after them. A prefix hit needs its slots from its window's start on.
        let local_from = if hit.is_empty() {
            0
        } else {
            cache.layout.window_start_block(done)
        };
        let Some(mut got) = cache.take(&hit, need, local_from) else {
            break;
        };
        long_prefills += usize::from(long);
        let Some(mut s) = waiting.remove(w) else {
            break;
        };
        if cache.prefix_caching() && s.num_computed() == 0 {
            plan.cache_queries += total;
            plan.cache_hits += hit.len() * cfg.block_size;
            s.set_cached(hit.len() * cfg.block_size);
        }
        if !hit.is_empty() {
            *s.local_from() = local_from;
        }
        s.blocks().extend_from_slice(&hit);
        s.blocks().append(&mut got);
        s.set_state(RequestState::Running);
        running.push(s);
        plan.items.push((running.len() - 1, n));
        budget = budget.saturating_sub(n);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::{KvDtype, KvLayout};

    struct S {
        total: usize,
        done: usize,
        blocks: Vec<u32>,
        local_from: usize,
        state: RequestState,
        hashes: Vec<BlockHash>,
    }
    impl Schedulable for S {
        fn num_tokens(&self) -> usize {
            self.total
        }
        fn num_computed(&self) -> usize {
            self.done
        }
        fn blocks(&mut self) -> &mut Vec<u32> {
            &mut self.blocks
        }
        fn local_from(&mut self) -> &mut usize {
            &mut self.local_from
        }
        fn set_state(&mut self, s: RequestState) {
            self.state = s;
        }
        fn reset_computed(&mut self) {
            self.done = 0;
        }
        fn block_hashes(&mut self) -> &[BlockHash] {
            &self.hashes
        }
        fn set_cached(&mut self, tokens: usize) {
            self.done = tokens;
        }
    }
    fn cache(n: usize) -> KvCache {
        KvCache::new(
            KvLayout {
                n_layer: 1,
                n_kv_head: 1,
                head_dim: 2,
                block_size: 4,
                dtype: KvDtype::F32,
                window: None,
            },
            n,
            0,
        )
    }
    fn s(total: usize) -> S {
        S {
            total,
            done: 0,
            blocks: vec![],
            local_from: 0,
            state: RequestState::Waiting,
            hashes: vec![],
        }
    }
    fn cfg(budget: usize, chunked: bool) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: budget,
            enable_chunked_prefill: chunked,
            block_size: 4,
            long_prefill_token_threshold: 0,
            max_long_partial_prefills: 1,
        }
    }

    #[test]
    fn one_long_prefill_at_a_time_and_short_prompts_pass() {
        let mut c = cache(100);
        let mut running = vec![];
        let mut waiting: VecDeque<S> = [s(40), s(30), s(3)].into_iter().collect();
        let capped = SchedulerConfig {
            long_prefill_token_threshold: 8,
            ..cfg(32, true)
        };
        // The second long prompt waits; the short one behind it runs beside the first.
        let p = schedule(&capped, &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 8), (1, 3)]);
        assert_eq!(running[1].total, 3);
        assert_eq!(waiting.len(), 1);
        assert_eq!(waiting[0].total, 30);
        // Once the first is within the threshold, the second long one starts.
        running[0].done = 36;
        running[1].done = 3;
        running[1].total = 4;
        let p = schedule(&capped, &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 4), (1, 1), (2, 8)]);
        // Two at once when allowed.
        let mut running = vec![];
        let mut waiting: VecDeque<S> = [s(40), s(30)].into_iter().collect();
        let two = SchedulerConfig {
            max_long_partial_prefills: 2,
            ..capped
        };
        let p = schedule(&two, &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 8), (1, 8)]);
    }

    #[test]
    fn long_prompts_leave_room_for_short_ones() {
        let mut c = cache(100);
        let mut running = vec![];
        let mut waiting: VecDeque<S> = [s(40), s(3)].into_iter().collect();
        let capped = SchedulerConfig {
            long_prefill_token_threshold: 8,
            ..cfg(16, true)
        };
        // The long prompt takes 8 of the 16; the short one runs whole beside it.
        let p = schedule(&capped, &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 8), (1, 3)]);
        running[0].done = 8;
        running[1].done = 3;
        running[1].total = 4;
        let p = schedule(&capped, &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 8), (1, 1)]);
        // Within the threshold nothing is capped.
        running[0].done = 34;
        let p = schedule(&capped, &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 6), (1, 1)]);
    }

    #[test]
    fn chunks_prompts_to_the_budget() {
        let mut c = cache(100);
        let mut running = vec![];
        let mut waiting: VecDeque<S> = [s(10), s(3)].into_iter().collect();
        let p = schedule(&cfg(6, true), &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 6)]);
        assert_eq!(c.num_free(), 98);
        running[0].done = 6;
        let p = schedule(&cfg(6, true), &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 4), (1, 2)]);
        assert_eq!(c.num_free(), 96);
    }

    #[test]
    fn preempts_newest_when_blocks_run_out() {
        let mut c = cache(3);
        let mut running = vec![];
        let mut waiting: VecDeque<S> = [s(4), s(4)].into_iter().collect();
        let p = schedule(&cfg(16, true), &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 4), (1, 4)]);
        assert_eq!(c.num_free(), 1);
        for r in running.iter_mut() {
            r.done = 4;
            r.total = 5;
        }
        // Each needs a second block and one is free: the first gets it, the newest is
        // preempted (its block returns to the pool) rather than aborted.
        let p = schedule(&cfg(16, true), &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 1)]);
        assert_eq!(p.preempted, 1);
        assert_eq!(running.len(), 1);
        assert_eq!(waiting[0].state, RequestState::Preempted);
        assert_eq!(waiting[0].done, 0);
        assert_eq!(c.num_free(), 1);
        // The preempted one needs two blocks to recompute; only one is free: it waits.
        running[0].done = 5;
        running[0].total = 6;
        let p = schedule(&cfg(16, true), &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 1)]);
        assert_eq!(waiting.len(), 1);
    }

    /// A queue of one request of `total` tokens whose full blocks hash to `hashes`.
    fn queued(total: usize, hashes: &[BlockHash]) -> VecDeque<S> {
        VecDeque::from([S {
            hashes: hashes.to_vec(),
            ..s(total)
        }])
    }

    #[test]
    fn cached_prefixes_are_shared_and_the_last_token_is_computed() {
        let mut c = cache(6);
        c.set_prefix_caching(true);
        let h = |i: u8| [i; 32];
        // A first request of 3 full blocks computes them; they are registered and released.
        let mut running = vec![];
        let mut waiting = queued(12, &[h(1), h(2), h(3)]);
        let p = schedule(&cfg(16, true), &mut c, &mut running, &mut waiting);
        assert_eq!(
            (p.items.clone(), p.cache_hits, p.cache_queries),
            (vec![(0, 12)], 0, 12)
        );
        let mut first = running.remove(0);
        for (i, &b) in first.blocks.iter().enumerate() {
            c.register(first.hashes[i], b);
        }
        let owned = first.blocks.clone();
        c.release(&mut first.blocks, 0);
        assert_eq!((c.num_free(), c.num_cached()), (6, 3));
        // The same 12 tokens again: 2 blocks come from the cache, the third is computed so
        // that its last token has logits.
        let mut waiting = queued(12, &[h(1), h(2), h(3)]);
        let p = schedule(&cfg(16, true), &mut c, &mut running, &mut waiting);
        assert_eq!(p.items, vec![(0, 4)]);
        assert_eq!((p.cache_hits, p.cache_queries), (8, 12));
        assert_eq!(running[0].done, 8);
        assert_eq!(running[0].blocks[..2], owned[..2]);
        assert!(c.writable(running[0].blocks[2]));
        assert!(
            !c.writable(running[0].blocks[0]),
            "shared blocks are read-only"
        );
        // A prompt diverging after one block shares only that one, and may still take
        // evictable blocks; the shared head is never evicted while in use.
        let mut waiting = queued(17, &[h(1), h(9), h(8), h(7)]);
        let p = schedule(&cfg(16, true), &mut c, &mut running, &mut waiting);
        assert_eq!(
            p.items,
            vec![(0, 4), (1, 12)],
            "4 cached, then 12 of 13 in the budget"
        );
        assert_eq!(running[1].blocks[0], owned[0]);
        assert_eq!(c.lookup(&[h(1), h(2)]), owned[..2].to_vec());
        assert_eq!(c.num_free(), 0);
        assert_eq!(
            c.lookup(&[h(1), h(2), h(3)]).len(),
            2,
            "the evicted block left the cache"
        );
        // Off: nothing is looked up.
        let mut off = cache(6);
        off.register(h(1), 0);
        assert_eq!(off.lookup(&[h(1)]), Vec::<u32>::new());
    }
}
