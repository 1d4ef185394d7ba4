//! The step: schedule, run one forward pass over every scheduled chunk, register newly full
//! blocks in the prefix cache, sample, detokenize, apply stop conditions, finish.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::holds::Held;
use super::{placement, Core, Event, FinishReason, Finished, SavedBlock, Seq, StepInfo, TokenOut};
use crate::error::EngineError;
use crate::model::SeqChunk;
use crate::scheduler::{schedule, Schedulable};

impl Core {
    pub(super) fn step(&mut self) {
        let plan = schedule(
            &self.sched,
            &mut self.cache,
            &mut self.running,
            &mut self.waiting,
        );
        self.stats
            .preemptions
            .fetch_add(plan.preempted as u64, Ordering::Relaxed);
        self.stats
            .prefix_cache_queries
            .fetch_add(plan.cache_queries as u64, Ordering::Relaxed);
        self.stats
            .prefix_cache_hits
            .fetch_add(plan.cache_hits as u64, Ordering::Relaxed);
        if plan.items.is_empty() {
            return;
        }
        let t0 = Instant::now();
        // Per-step trace (RUST_LOG=splitserve::step=trace): a step whose CPU time is near
        // its wall time was slow on its own, not preempted.
        let traced = tracing::enabled!(target: "splitserve::step", tracing::Level::TRACE);
        let cpu0 = traced.then(placement::thread_cpu_time).flatten();
        let (mut prefill_tokens, mut decode_tokens) = (0, 0);
        let mut prompt_computed = 0u64;
        let chunks: Vec<SeqChunk<'_>> = plan
            .items
            .iter()
            .map(|&(i, n)| {
                let s = &self.running[i];
                let start = s.num_computed;
                prompt_computed += s.prompt_len.saturating_sub(start).min(n) as u64;
                if n == 1 && start >= s.prompt_len {
                    decode_tokens += 1;
                } else {
                    prefill_tokens += n;
                }
                SeqChunk {
                    tokens: &s.tokens[start..start + n],
                    start,
                    table: &s.blocks,
                    logits: start + n == s.tokens.len(),
                }
            })
            .collect();
        let result = self.model.forward(&mut self.cache, &chunks);
        drop(chunks);
        let now = Instant::now();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .prompt_tokens_computed
            .fetch_add(prompt_computed, Ordering::Relaxed);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "step failed; aborting its requests");
                let mut idx: Vec<usize> = plan.items.iter().map(|&(i, _)| i).collect();
                idx.sort_unstable_by(|a, b| b.cmp(a));
                for i in idx {
                    let s = self.running.remove(i);
                    self.finish(s, FinishReason::Abort, Some(e.clone()));
                }
                return;
            }
        };
        let mut done = Vec::new();
        for (&(i, n), lg) in plan.items.iter().zip(logits) {
            let s = &mut self.running[i];
            s.first_scheduled.get_or_insert(now);
            s.num_computed += n;
            if self.cache.prefix_caching() {
                // Blocks whose every token is now computed can serve later prompts.
                let full = s.num_computed / self.cache.layout.block_size;
                if full > s.cache.registered {
                    s.block_hashes();
                    let saver = self.connector.as_ref().filter(|c| c.wants_saves());
                    for j in s.cache.registered..full.min(s.cache.hashes.len()) {
                        let new = self.cache.register(s.cache.hashes[j], s.blocks[j]);
                        // A store keeps whole blocks: not one whose windowed layers were
                        // never here (loaded behind the window).
                        let whole = self.cache.is_whole(s.blocks[j]);
                        if let Some(c) = saver.filter(|_| new && whole) {
                            c.save_block(
                                &s.cache.hashes[j],
                                SavedBlock::new(&self.cache.mem, s.blocks[j]),
                            );
                        }
                    }
                    s.cache.registered = full;
                }
            }
            // Blocks now behind the window of its next position give back their windowed
            // layers' slots; a held request keeps what its reader will need.
            let kv = if s.hold {
                s.num_computed.min(s.prompt_len)
            } else {
                s.num_computed
            };
            let upto = self.cache.layout.window_start_block(kv);
            self.cache.trim(&s.blocks, &mut s.local_from, upto);
            let Some(lg) = lg else { continue };
            if let Some(reason) = self.sample_into(i, lg) {
                done.push((i, reason));
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, reason) in done {
            let s = self.running.remove(i);
            self.finish(s, reason, None);
        }
        let duration = t0.elapsed();
        if traced {
            let cpu = cpu0
                .zip(placement::thread_cpu_time())
                .map(|(a, b)| b.saturating_sub(a));
            tracing::trace!(
                target: "splitserve::step",
                wall_us = duration.as_micros() as u64,
                cpu_us = cpu.map(|c| c.as_micros() as u64),
                prefill_tokens,
                decode_tokens,
                running = self.running.len(),
            );
        }
        if let Some(hook) = &self.on_step {
            hook(StepInfo {
                duration,
                prefill_tokens,
                decode_tokens,
            });
        }
    }

    /// Samples the next token of running request `i`; returns a finish reason if it ended.
    pub(super) fn sample_into(&mut self, i: usize, logits: Vec<f32>) -> Option<FinishReason> {
        let tok = &self.model.tokenizer;
        let ends = tok.end_ids();
        let s = &mut self.running[i];
        let mut banned = Vec::new();
        if s.completion_tokens() < s.params.min_tokens {
            if !s.params.ignore_eos {
                banned.extend_from_slice(ends);
            }
            banned.extend_from_slice(&s.params.stop_token_ids);
        }
        let sampled = s.sampler.sample(&logits, &s.params, &banned);
        let t = sampled.token;
        s.tokens.push(t);
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let is_eos = ends.contains(&t) && !s.params.ignore_eos;
        let is_stop_id = s.params.stop_token_ids.contains(&t);
        let mut reason = None;
        let mut text = String::new();
        if is_eos || is_stop_id {
            reason = Some(FinishReason::Stop);
        } else {
            let delta = s.detok.step(tok, &s.tokens[s.prompt_len..]);
            s.text.push_str(&delta);
            // A stop string ends the text just before it (OpenAI semantics).
            let from = s
                .sent
                .saturating_sub(s.params.stop.iter().map(|x| x.len()).max().unwrap_or(0));
            let hit = s
                .params
                .stop
                .iter()
                .filter(|x| !x.is_empty())
                .filter_map(|x| s.text[from..].find(x.as_str()).map(|p| p + from))
                .min();
            let end = match hit {
                Some(p) => {
                    reason = Some(FinishReason::Stop);
                    p.max(s.sent)
                }
                None => s.text.len(),
            };
            text = s.text[s.sent..end].to_string();
            s.sent = end;
        }
        if reason.is_none()
            && (s.completion_tokens() >= s.params.max_tokens
                || s.tokens.len() >= self.max_model_len)
        {
            reason = Some(FinishReason::Length);
        }
        let out = TokenOut {
            token: t,
            text,
            logprob: s.params.logprobs.map(|_| sampled.logprob),
            top_logprobs: sampled.top,
            logits: s.return_logits.then_some(logits),
        };
        let _ = s.tx.send(Event::Token(out));
        reason
    }

    pub(super) fn finish(&mut self, mut s: Seq, reason: FinishReason, error: Option<EngineError>) {
        if s.hold && reason != FinishReason::Abort {
            // Only the prompt's blocks travel; the first token is sent as a token id.
            let n_tokens = s.prompt_len;
            let keep = n_tokens.div_ceil(self.cache.layout.block_size);
            let mut extra = s.blocks.split_off(keep.min(s.blocks.len()));
            self.cache
                .release(&mut extra, s.local_from.saturating_sub(keep));
            let old = self.holds.map().insert(
                s.id.clone(),
                Held {
                    since: Instant::now(),
                    blocks: std::mem::take(&mut s.blocks),
                    local_from: std::mem::take(&mut s.local_from),
                    n_tokens,
                    generated: s.tokens[s.prompt_len..].to_vec(),
                    sampler: s.sampler.clone(),
                },
            );
            if let Some(mut o) = old {
                // A second request under the same id: the older hold can never be pulled.
                tracing::warn!(id = %s.id, "request id reused while its KV was held; freeing the older hold");
                self.cache.release(&mut o.blocks, o.local_from);
            }
        }
        self.cache.release(&mut s.blocks, s.local_from);
        let queue_time = s
            .first_scheduled
            .map(|t| t.duration_since(s.arrived))
            .unwrap_or_default();
        let _ = s.tx.send(Event::Finished(Finished {
            reason,
            prompt_tokens: s.prompt_len,
            completion_tokens: s.completion_tokens(),
            queue_time,
            error,
            cached_tokens: s.cache.cached_tokens.unwrap_or(0),
        }));
    }
}
