//! Running requests on the engine and turning their events into OpenAI responses, whole or
//! as server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use splitserve_engine::{
    Engine, Event, FinishReason, Finished, KvTransfer, Request, SamplingParams, TokenOut,
};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Which OpenAI object to produce.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Completion,
    Chat,
}

/// One prompt of a request.
pub struct PromptJob {
    pub ids: Vec<u32>,
    /// Text to put before the output (`echo`).
    pub echo: Option<String>,
}

/// Everything the formatter needs besides the events.
#[derive(Clone)]
pub struct Spec {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub include_usage: bool,
    pub return_token_ids: bool,
    pub logprobs: bool,
    /// Report `usage.prompt_tokens_details.cached_tokens` (vLLM's
    /// `--enable-prompt-tokens-details`).
    pub prompt_tokens_details: bool,
    /// Extra top-level fields of the final response (e.g. `kv_transfer_params`).
    pub extra: Option<Value>,
}

/// Per-request timing for metrics and the one log line at the end.
struct Tracker {
    id: String,
    metrics: Arc<Metrics>,
    start: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
    itl_sum: f64,
    done: bool,
}

impl Tracker {
    fn token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => {
                self.metrics.ttft.observe((now - self.start).as_secs_f64());
                self.first = Some(now);
            }
            Some(prev) => {
                let gap = (now - prev).as_secs_f64();
                self.metrics.itl.observe(gap);
                self.itl_sum += gap;
            }
        }
        self.last = Some(now);
        self.tokens += 1;
        self.metrics.generation_tokens.inc();
    }

    fn finish(&mut self, f: &Finished) {
        self.done = true;
        let e2e = self.start.elapsed().as_secs_f64();
        self.metrics.e2e.observe(e2e);
        self.metrics.queue.observe(f.queue_time.as_secs_f64());
        self.metrics
            .request_success
            .with_label_values(&[f.reason.as_str()])
            .inc();
        let ttft_ms = self
            .first
            .map(|t| (t - self.start).as_secs_f64() * 1e3)
            .unwrap_or(0.0);
        let mean_itl_ms = if self.tokens > 1 {
            self.itl_sum / (self.tokens - 1) as f64 * 1e3
        } else {
            0.0
        };
        tracing::info!(
            id = %self.id,
            prompt_tokens = f.prompt_tokens,
            output_tokens = f.completion_tokens,
            ttft_ms = format!("{ttft_ms:.1}"),
            mean_itl_ms = format!("{mean_itl_ms:.2}"),
            finish_reason = f.reason.as_str(),
            "request finished"
        );
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.done {
            self.metrics
                .request_success
                .with_label_values(&["abort"])
                .inc();
            tracing::info!(id = %self.id, output_tokens = self.tokens, finish_reason = "abort", "request finished (client went away)");
        }
    }
}

pub enum Out {
    Token(usize, TokenOut),
    Done(usize, Finished),
}

/// The engine's id for prompt `i` of HTTP request `base_id`.
pub fn engine_id(base_id: &str, i: usize) -> String {
    format!("{base_id}-{i}")
}

/// What a request asks of the engine besides its prompt and sampling.
#[derive(Clone, Copy, Default)]
pub struct More<'a> {
    pub cache_salt: Option<&'a str>,
    /// Output tokens at the end of the prompt (a resumed stream).
    pub resumed: usize,
}

/// Submits every prompt; the merged stream yields their events tagged with the prompt index.
pub fn submit_all(
    engine: &Engine,
    metrics: &Arc<Metrics>,
    base_id: &str,
    jobs: &[PromptJob],
    params: &SamplingParams,
    kv: KvTransfer,
    more: More<'_>,
) -> Result<impl Stream<Item = Out> + Send + Unpin + 'static, ApiError> {
    let mut streams = Vec::with_capacity(jobs.len());
    let mut kv = Some(kv);
    for (i, j) in jobs.iter().enumerate() {
        let rx = engine.submit(Request {
            id: engine_id(base_id, i),
            prompt: j.ids.clone(),
            params: params.clone(),
            return_logits: false,
            // Only single-prompt requests carry a KV transfer (checked by the caller).
            kv: kv.take().unwrap_or(KvTransfer::None),
            cache_salt: more.cache_salt.map(str::to_string),
            resumed: more.resumed,
        })?;
        metrics.prompt_tokens.inc_by(j.ids.len() as u64);
        let tracker = Tracker {
            id: format!("{base_id}-{i}"),
            metrics: metrics.clone(),
            start: Instant::now(),
            first: None,
            last: None,
            tokens: 0,
            itl_sum: 0.0,
            done: false,
        };
        streams.push(Box::pin(stream::unfold(
            (rx, tracker, false),
            move |(mut rx, mut t, ended)| async move {
                if ended {
                    return None;
                }
                match rx.recv().await? {
                    Event::Token(tok) => {
                        t.token();
                        Some((Out::Token(i, tok), (rx, t, false)))
                    }
                    Event::Finished(f) => {
                        t.finish(&f);
                        Some((Out::Done(i, f), (rx, t, true)))
                    }
                }
            },
        )));
    }
    Ok(stream::select_all(streams))
}

/// A sampled token, its log-probability and the top alternatives.
type TokenLogprob = (u32, f32, Vec<(u32, f32)>);

/// Accumulated output of one choice.
#[derive(Default)]
struct Choice {
    text: String,
    token_ids: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<Finished>,
}

/// Token counts of a response; `cached` (prompt tokens that came from the prefix cache)
/// only where the server reports prompt-token details.
fn usage(spec: &Spec, prompt: usize, completion: usize, cached: usize) -> Value {
    let mut u = json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion});
    if spec.prompt_tokens_details {
        u["prompt_tokens_details"] = json!({"cached_tokens": cached});
    }
    u
}

fn completion_logprobs(engine: &Engine, lp: &[TokenLogprob], text_start: usize) -> Value {
    let tok = &engine.model().tokenizer;
    let mut offset = text_start;
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    for (id, l, alts) in lp {
        let t = tok.token_text(*id);
        offsets.push(offset);
        offset += t.len();
        tokens.push(t);
        token_logprobs.push(*l);
        let m: serde_json::Map<String, Value> = alts
            .iter()
            .map(|(a, v)| (tok.token_text(*a), json!(v)))
            .collect();
        top.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

fn chat_logprobs(engine: &Engine, lp: &[TokenLogprob]) -> Value {
    let tok = &engine.model().tokenizer;
    let entry = |id: u32, l: f32| {
        let t = tok.token_text(id);
        json!({"token": t, "logprob": l, "bytes": t.as_bytes()})
    };
    let content: Vec<Value> = lp
        .iter()
        .map(|(id, l, alts)| {
            let mut e = entry(*id, *l);
            e["top_logprobs"] = Value::Array(alts.iter().map(|(a, v)| entry(*a, *v)).collect());
            e
        })
        .collect();
    json!({"content": content})
}

fn finish_reason(f: &Option<Finished>) -> Value {
    match f {
        Some(f) if f.reason != FinishReason::Abort => json!(f.reason.as_str()),
        Some(_) => json!("abort"),
        None => Value::Null,
    }
}

/// Waits for every choice and builds the whole response.
pub async fn collect(
    engine: &Engine,
    spec: &Spec,
    jobs: &[PromptJob],
    mut events: impl Stream<Item = Out> + Unpin,
) -> Result<Value, ApiError> {
    let mut choices: Vec<Choice> = jobs.iter().map(|_| Choice::default()).collect();
    while let Some(ev) = events.next().await {
        match ev {
            Out::Token(i, t) => {
                let c = &mut choices[i];
                c.text.push_str(&t.text);
                c.token_ids.push(t.token);
                if let Some(l) = t.logprob {
                    c.logprobs.push((t.token, l, t.top_logprobs));
                }
            }
            Out::Done(i, f) => {
                if let Some(e) = &f.error {
                    return Err(match e {
                        splitserve_engine::EngineError::KvTransfer(_) => {
                            ApiError::BadGateway(e.to_string())
                        }
                        _ => ApiError::Internal(e.to_string()),
                    });
                }
                choices[i].finish = Some(f);
            }
        }
    }
    let (mut p, mut c, mut cached) = (0, 0, 0);
    let mut out = Vec::new();
    for (i, (ch, job)) in choices.iter().zip(jobs).enumerate() {
        if let Some(f) = &ch.finish {
            p += f.prompt_tokens;
            c += f.completion_tokens;
            cached += f.cached_tokens;
        }
        let mut v = match spec.kind {
            Kind::Completion => {
                let echo = job.echo.clone().unwrap_or_default();
                json!({
                    "index": i,
                    "text": format!("{echo}{}", ch.text),
                    "logprobs": if spec.logprobs { completion_logprobs(engine, &ch.logprobs, echo.len()) } else { Value::Null },
                    "finish_reason": finish_reason(&ch.finish),
                })
            }
            Kind::Chat => json!({
                "index": i,
                "message": {"role": "assistant", "content": ch.text},
                "logprobs": if spec.logprobs { chat_logprobs(engine, &ch.logprobs) } else { Value::Null },
                "finish_reason": finish_reason(&ch.finish),
            }),
        };
        if spec.return_token_ids {
            v["token_ids"] = json!(ch.token_ids);
            v["prompt_token_ids"] = json!(job.ids);
        }
        out.push(v);
    }
    let mut resp = json!({
        "id": spec.id,
        "object": if spec.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": spec.created,
        "model": spec.model,
        "choices": out,
        "usage": usage(spec, p, c, cached),
    });
    if let Some(Value::Object(extra)) = &spec.extra {
        for (k, v) in extra {
            resp[k] = v.clone();
        }
    }
    Ok(resp)
}

fn chunk(spec: &Spec, choices: Value, usage: Option<Value>) -> Value {
    let mut v = json!({
        "id": spec.id,
        "object": if spec.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
        "created": spec.created,
        "model": spec.model,
        "choices": choices,
    });
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

/// Streams the response as SSE. A task owns the engine streams: when the client goes away
/// the channel closes, the task ends, and dropping the receivers aborts the requests.
pub fn stream_sse(
    engine: Engine,
    spec: Spec,
    jobs: Vec<PromptJob>,
    mut events: impl Stream<Item = Out> + Send + Unpin + 'static,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let (tx, rx) = mpsc::channel::<Value>(64);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(v).await.is_ok() }
        };
        // Opening chunks: the role (chat) or the echoed prompt (completions).
        for (i, job) in jobs.iter().enumerate() {
            let first = match spec.kind {
                Kind::Chat => {
                    json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}])
                }
                Kind::Completion => match &job.echo {
                    Some(e) => {
                        json!([{"index": i, "text": e, "logprobs": null, "finish_reason": null}])
                    }
                    None => continue,
                },
            };
            if !send(chunk(&spec, first, None)).await {
                return;
            }
        }
        let (mut p, mut c, mut cached) = (0, 0, 0);
        // With token ids, a choice's first chunk also carries its prompt's (as vLLM's).
        let mut told = vec![false; jobs.len()];
        while let Some(ev) = events.next().await {
            let v = match ev {
                Out::Token(i, t) => {
                    let mut ids = None;
                    let mut prompt_ids = None;
                    if spec.return_token_ids {
                        ids = Some(json!([t.token]));
                        if let (Some(false), Some(j)) = (told.get(i).copied(), jobs.get(i)) {
                            prompt_ids = Some(json!(j.ids));
                            told[i] = true;
                        }
                    }
                    let lp = t
                        .logprob
                        .map(|l| vec![(t.token, l, t.top_logprobs.clone())]);
                    let mut ch = match spec.kind {
                        Kind::Chat => json!({"index": i, "delta": {"content": t.text},
                            "logprobs": lp.map(|l| chat_logprobs(&engine, &l)), "finish_reason": null}),
                        Kind::Completion => json!({"index": i, "text": t.text,
                            "logprobs": lp.map(|l| completion_logprobs(&engine, &l, 0)), "finish_reason": null}),
                    };
                    if let Some(ids) = ids {
                        ch["token_ids"] = ids;
                    }
                    if let Some(ids) = prompt_ids {
                        ch["prompt_token_ids"] = ids;
                    }
                    chunk(&spec, json!([ch]), None)
                }
                Out::Done(i, f) => {
                    if let Some(e) = &f.error {
                        let _ = send(ApiError::Internal(e.to_string()).body_json()).await;
                        return;
                    }
                    p += f.prompt_tokens;
                    c += f.completion_tokens;
                    cached += f.cached_tokens;
                    let ch = match spec.kind {
                        Kind::Chat => {
                            json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": f.reason.as_str()})
                        }
                        Kind::Completion => {
                            json!({"index": i, "text": "", "logprobs": null, "finish_reason": f.reason.as_str()})
                        }
                    };
                    let mut v = chunk(&spec, json!([ch]), None);
                    if let Some(Value::Object(extra)) = &spec.extra {
                        for (k, x) in extra {
                            v[k] = x.clone();
                        }
                    }
                    v
                }
            };
            if !send(v).await {
                return;
            }
        }
        if spec.include_usage {
            let _ = send(chunk(&spec, json!([]), Some(usage(&spec, p, c, cached)))).await;
        }
        let _ = send(Value::String("[DONE]".into())).await;
    });
    let body = stream::unfold(rx, |mut rx| async move {
        let v = rx.recv().await?;
        let ev = match v {
            Value::String(s) if s == "[DONE]" => SseEvent::default().data("[DONE]"),
            other => SseEvent::default().data(other.to_string()),
        };
        Some((Ok(ev), rx))
    });
    Sse::new(body).keep_alive(KeepAlive::default())
}
