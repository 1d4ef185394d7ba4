//! Live migration: a running request leaves this engine at a step boundary with everything
//! needed to continue it elsewhere exactly as it would have continued here.
//!
//! The source parks the request (it keeps its blocks but is no longer scheduled) and hands
//! out a copy of its state and KV; the caller then either commits (the target took it: the
//! blocks are freed here) or resumes it (the target refused: nothing was lost).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

use super::{Core, Event, Seq, SeqCache};
use crate::error::EngineError;
use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::RequestState;
use crate::tokenizer::IncrementalDecoder;

/// Everything of a live request except its KV: tokens so far, sampling parameters and RNG,
/// stop conditions, and how much of its text the client has already been sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveState {
    pub id: String,
    pub prompt_len: usize,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Leading tokens whose K and V travel with the request.
    pub kv_tokens: usize,
    pub params: SamplingParams,
    pub sampler: Sampler,
    pub detok: IncrementalDecoder,
    pub text: String,
    /// Bytes of `text` the client has been sent (stop strings hold back the rest).
    pub sent: usize,
    /// Tests of the invariance compare logits across the move.
    #[serde(default)]
    pub return_logits: bool,
}

impl LiveState {
    pub fn generated(&self) -> usize {
        self.tokens.len().saturating_sub(self.prompt_len)
    }
}

/// A live request with its KV: per layer, each block's K bytes then V bytes, for the
/// `kv_tokens.div_ceil(block_size)` blocks in position order (a windowed layer's only from
/// the block its window starts at: `KvLayout::layer_blocks`).
#[derive(Debug, Clone)]
pub struct Migration {
    pub state: LiveState,
    pub layers: Vec<Vec<u8>>,
}

/// A parked request: its copy to send away, and the channel its client reads.
pub struct Parked {
    pub migration: Migration,
    pub events: UnboundedSender<Event>,
}

/// One request of [`super::Engine::requests`].
#[derive(Debug, Clone, Serialize)]
pub struct RequestInfo {
    pub id: String,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub state: &'static str,
}

pub(super) struct PendingPark {
    /// The first of these that is live is parked (a caller may know a request by more
    /// than one name).
    pub ids: Vec<String>,
    pub after_tokens: usize,
    pub reply: oneshot::Sender<Result<Parked, EngineError>>,
}

impl Core {
    /// Parks every request whose park was asked for and which has generated enough tokens.
    /// Runs after each step, so a request parks exactly when it reaches `after_tokens`.
    pub(super) fn serve_parks(&mut self) {
        for p in std::mem::take(&mut self.pending_parks) {
            if p.reply.is_closed() {
                continue;
            }
            let is = |s: &Seq| p.ids.contains(&s.id);
            let in_running = self.running.iter().position(is);
            let in_waiting = self.waiting.iter().position(is);
            let generated = in_running
                .map(|i| self.running[i].completion_tokens())
                .or_else(|| in_waiting.map(|i| self.waiting[i].completion_tokens()));
            match generated {
                None => {
                    let id = p.ids.into_iter().next().unwrap_or_default();
                    let _ = p.reply.send(Err(EngineError::NotFound(id)));
                }
                Some(n) if n < p.after_tokens => self.pending_parks.push(p),
                Some(_) => {
                    let s = match (in_running, in_waiting) {
                        (Some(i), _) => self.running.remove(i),
                        (None, Some(i)) => match self.waiting.remove(i) {
                            Some(s) => s,
                            None => continue,
                        },
                        (None, None) => continue,
                    };
                    let parked = Parked {
                        migration: self.snapshot(&s),
                        events: s.tx.clone(),
                    };
                    let id = s.id.clone();
                    self.parked.insert(id.clone(), (s, in_running.is_some()));
                    if p.reply.send(Ok(parked)).is_err() {
                        self.unpark(&id, false);
                    }
                }
            }
        }
        self.publish();
    }

    fn snapshot(&self, s: &Seq) -> Migration {
        // A request resumed from KV that computes its last position again (num_computed
        // one short of its KV) holds its windowed layers only from where that KV's window
        // starts: it has, and sends, the KV of one token more.
        let lay = &self.cache.layout;
        let kv_tokens = if lay.window_start_block(s.num_computed) < s.local_from {
            (s.num_computed + 1).min(s.tokens.len())
        } else {
            s.num_computed
        };
        let n_blocks = kv_tokens.div_ceil(self.cache.layout.block_size);
        let layers = self
            .cache
            .layers_bytes(&s.blocks[..n_blocks.min(s.blocks.len())], kv_tokens);
        Migration {
            state: LiveState {
                id: s.id.clone(),
                prompt_len: s.prompt_len,
                tokens: s.tokens.clone(),
                kv_tokens,
                params: s.params.clone(),
                sampler: s.sampler.clone(),
                detok: s.detok.clone(),
                text: s.text.clone(),
                sent: s.sent,
                return_logits: s.return_logits,
            },
            layers,
        }
    }

    /// Commit: the request lives elsewhere now; free its blocks without telling its client
    /// (the client's channel is fed from the new engine). Otherwise: schedule it again.
    pub(super) fn unpark(&mut self, id: &str, commit: bool) {
        let Some((mut s, was_running)) = self.parked.remove(id) else {
            return;
        };
        if commit {
            self.cache.release(&mut s.blocks, s.local_from);
            tracing::debug!(id = %id, "migrated away; blocks freed");
        } else if was_running {
            self.running.push(s);
        } else {
            self.waiting.push_front(s);
        }
        self.publish();
    }

    /// Takes in a request migrated from another engine; refuses it loudly if its context
    /// (and the next token) does not fit in the free blocks.
    pub(super) fn adopt(&mut self, m: Migration) -> Result<UnboundedReceiver<Event>, EngineError> {
        let st = m.state;
        let layout = self.cache.layout;
        let bad = |what: String| Err(EngineError::KvMismatch(what));
        if st.prompt_len == 0 || st.prompt_len > st.tokens.len() || st.kv_tokens > st.tokens.len() {
            return bad(format!(
                "inconsistent request state: {} tokens, prompt {}, KV for {}",
                st.tokens.len(),
                st.prompt_len,
                st.kv_tokens
            ));
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = st.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadTokenId { id, vocab });
        }
        st.params.validate()?;
        if st.prompt_len + st.params.max_tokens > self.max_model_len {
            return Err(EngineError::TooLong {
                prompt_tokens: st.prompt_len,
                max_tokens: st.params.max_tokens,
                max_model_len: self.max_model_len,
            });
        }
        let n_blocks = st.kv_tokens.div_ceil(layout.block_size);
        layout
            .check_layers(st.kv_tokens, &m.layers)
            .map_err(EngineError::KvMismatch)?;
        if self.is_live(&st.id) {
            return Err(EngineError::DuplicateId(st.id));
        }
        let needed = (st.tokens.len() + 1).div_ceil(layout.block_size);
        let free = self.cache.num_free();
        if needed > free {
            return Err(EngineError::NoFreeBlocks { needed, free });
        }
        let local_from = layout.window_start_block(st.kv_tokens);
        let blocks = self
            .cache
            .take(&[], n_blocks, local_from)
            .ok_or(EngineError::NoFreeBlocks { needed, free })?;
        self.cache
            .set_layers_bytes(&blocks, st.kv_tokens, &m.layers);
        let (tx, rx) = unbounded_channel();
        // The last known token's KV is computed by the next step, which also samples.
        let num_computed = st.kv_tokens.min(st.tokens.len() - 1);
        let seq = Seq {
            id: st.id,
            prompt_len: st.prompt_len,
            tokens: st.tokens,
            num_computed,
            blocks,
            local_from,
            params: st.params,
            sampler: st.sampler,
            return_logits: st.return_logits,
            hold: false,
            state: RequestState::Waiting,
            tx,
            detok: st.detok,
            text: st.text,
            sent: st.sent,
            arrived: Instant::now(),
            first_scheduled: None,
            // Its cache salt did not travel with it: its blocks are never shared here.
            cache: SeqCache::new(None, self.cache.layout.block_size),
        };
        self.waiting.push_back(seq);
        self.publish();
        Ok(rx)
    }

    pub(super) fn list(&self) -> Vec<RequestInfo> {
        let info = |s: &Seq, state| RequestInfo {
            id: s.id.clone(),
            prompt_tokens: s.prompt_len,
            generated_tokens: s.completion_tokens(),
            state,
        };
        let mut v: Vec<RequestInfo> = self.running.iter().map(|s| info(s, "running")).collect();
        v.extend(self.waiting.iter().map(|s| info(s, "waiting")));
        v.extend(self.parked.values().map(|(s, _)| info(s, "parked")));
        v.extend(
            self.remote_waiting
                .iter()
                .map(|(s, _)| s)
                .chain(self.loading.values().map(|(s, _)| s))
                .map(|s| info(s, "waiting_for_remote_kvs")),
        );
        v
    }
}
