//! One request through the router: where it is prefilled, where it is decoded, and the
//! answer passed through.
//!
//! Where the prompt is prefilled (conditional disaggregation and fallback), in order:
//! - on the decode instance ("local") when the prompt has fewer tokens than
//!   `--disagg-threshold` (0: never), or when `--prefill-busy-threshold` is set and every
//!   available prefill instance's queue (running + waiting + in flight) is at least it;
//! - on the decode instance, counted as a fallback, when no prefill instance is available
//!   (every circuit open), when none could be reached, or when the one that took it answered
//!   5xx (unless `--no-fallback`: then a 502);
//! - else on the prefill instance the policy picks, then decoded where the decode policy
//!   picks, pulling the KV.
//!
//! A one-token request is answered by the prefill instance alone (nothing to decode).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::{json, Value};
use splitserve_kv::{Ask as KvAsk, KvTransferParams};

use crate::policy::Ask;
use crate::pool::{InFlight, Instance, Pool};
use crate::Proxy;

use splitserve_server::http::REQUEST_ID;
/// The first retry's wait; each next one doubles, up to 8×.
const RETRY_BACKOFF: Duration = Duration::from_millis(10);

fn error_body(kind: &str, message: String) -> Value {
    splitserve_server::error_body(kind, &message, None, None)
}

pub(crate) fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (status, Json(error_body(kind, message.into()))).into_response()
}

/// An SSE event telling the client its stream failed upstream.
fn error_event(message: String) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\n",
        error_body("upstream_error", message)
    ))
}

pub(crate) async fn completions(
    State(p): State<Proxy>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(p, headers, body, "/v1/completions").await
}

pub(crate) async fn chat(State(p): State<Proxy>, headers: HeaderMap, body: Bytes) -> Response {
    handle(p, headers, body, "/v1/chat/completions").await
}

/// An instance that took a request: its answer, and the request counted in flight there
/// until the answer has been passed on.
struct Sent {
    url: String,
    resp: reqwest::Response,
    _in_flight: InFlight,
}

enum SendError {
    /// No instance of the pool is available.
    NoneAvailable,
    /// Every one tried was unreachable.
    Unreachable(String),
    /// One took the request and then failed before answering.
    Failed(String),
}

impl SendError {
    fn message(&self, pool: &str) -> String {
        match self {
            SendError::NoneAvailable => format!("no {pool} instance is available"),
            SendError::Unreachable(e) => format!("no {pool} instance answered: {e}"),
            SendError::Failed(e) => format!("{pool} instance failed: {e}"),
        }
    }
}

/// Sends `body` to the pool's instances in the policy's order, moving on when one cannot be
/// reached or its connection dies before it answers (nothing reached the client yet); a
/// timeout is not retried (the instance may still be working on it).
/// What every send of one client request shares.
struct Call<'a> {
    path: &'a str,
    id: &'a HeaderValue,
    ask: Ask<'a>,
    arrived: Instant,
}

async fn send(
    p: &Proxy,
    pool: &Pool,
    call: &Call<'_>,
    body: &Value,
    timeout: Option<Duration>,
) -> Result<Sent, SendError> {
    let Call {
        path,
        id,
        ref ask,
        arrived,
    } = *call;
    let m = &p.0.metrics;
    let order = pool.choose(ask);
    if order.is_empty() {
        return Err(SendError::NoneAvailable);
    }
    let mut errors = Vec::new();
    for (k, inst) in order.iter().enumerate() {
        if k == 0 {
            m.queue
                .with_label_values(&[pool.name])
                .observe(arrived.elapsed().as_secs_f64());
        } else {
            m.retries.inc();
            // Backoff before each retry (10, 20, 40 ms, then 80 at most): a pool restarting
            // under load is not hammered by every request at once.
            let backoff = RETRY_BACKOFF * (1u32 << (k - 1).min(3));
            tokio::time::sleep(backoff).await;
        }
        m.requests.with_label_values(&[pool.name, &inst.url]).inc();
        let in_flight = inst.start(ask.blocks);
        let mut req =
            p.0.client
                .post(format!("{}{path}", inst.url))
                .header(REQUEST_ID, id.clone())
                .json(body);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        match req.send().await {
            Ok(resp) => {
                let st = resp.status();
                // 503 is an instance saying it is full or draining, not failing.
                if st.is_server_error() && st != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                    fail(p, pool, inst, &format!("answered {st}"));
                } else {
                    inst.success();
                }
                return Ok(Sent {
                    url: inst.url.clone(),
                    resp,
                    _in_flight: in_flight,
                });
            }
            // Unreachable, or a kept-alive connection to it died (it was killed): nothing came
            // back, so the next one may take the request.
            Err(e) if !e.is_timeout() => {
                fail(p, pool, inst, &e.to_string());
                if !e.is_connect() {
                    // It had the request: what follows is a failover, not a plain retry.
                    m.failovers.inc();
                    tracing::warn!(id = ?id, instance = %inst.url, error = %e, "instance failed before answering; sending the request to the next");
                }
                errors.push(format!("{}: {e}", inst.url));
            }
            Err(e) => {
                fail(p, pool, inst, &e.to_string());
                return Err(SendError::Failed(format!("{}: {e}", inst.url)));
            }
        }
    }
    Err(SendError::Unreachable(errors.join("; ")))
}

fn fail(p: &Proxy, pool: &Pool, inst: &Arc<Instance>, why: &str) {
    p.0.metrics
        .errors
        .with_label_values(&[pool.name, &inst.url])
        .inc();
    inst.failure(why);
}

async fn passthrough_error(url: &str, stage: &str, r: reqwest::Response) -> Response {
    let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = r.bytes().await.unwrap_or_default();
    match serde_json::from_slice::<Value>(&body) {
        // A client error is the client's to see as the instance said it.
        Ok(v) if status.is_client_error() && v.get("error").is_some() => {
            (status, Json(v)).into_response()
        }
        Ok(v) => {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("{stage} instance {url} failed ({status}): {msg}"),
            )
        }
        Err(_) => error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!(
                "{stage} instance {url} failed ({status}): {}",
                String::from_utf8_lossy(&body)
            ),
        ),
    }
}

async fn handle(p: Proxy, headers: HeaderMap, body: Bytes, path: &str) -> Response {
    let (_, id) = splitserve_server::http::request_id(&headers, "pd");
    let r = handle_inner(&p, &id, body, path, Instant::now()).await;
    splitserve_server::http::with_request_id(r, id)
}

/// Why a prompt is prefilled on its decode instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    Short,
    PrefillBusy,
    PrefillDown,
    PrefillFailed,
}

impl Local {
    fn as_str(self) -> &'static str {
        match self {
            Local::Short => "short_prompt",
            Local::PrefillBusy => "prefill_busy",
            Local::PrefillDown => "prefill_down",
            Local::PrefillFailed => "prefill_failed",
        }
    }

    fn is_fallback(self) -> bool {
        matches!(self, Local::PrefillDown | Local::PrefillFailed)
    }
}

/// Where a prompt of `prompt_tokens` (if known) is prefilled, before any prefill instance is
/// tried: on its decode instance when `disagg_threshold > 0` and the prompt has fewer tokens;
/// else when no prefill instance is available (`queues`, the available ones' queue depths,
/// is empty); else when `busy > 0` and every available prefill instance's queue is at least
/// `busy`. `None`: on a prefill instance.
fn decide(
    prompt_tokens: Option<usize>,
    disagg_threshold: usize,
    queues: &[u64],
    busy: u64,
) -> Option<Local> {
    if disagg_threshold > 0 && prompt_tokens.is_some_and(|n| n < disagg_threshold) {
        Some(Local::Short)
    } else if queues.is_empty() {
        Some(Local::PrefillDown)
    } else if busy > 0 && queues.iter().all(|&q| q >= busy) {
        Some(Local::PrefillBusy)
    } else {
        None
    }
}

/// The KV blocks a request will take (prompt and output), for the decode policy; an
/// estimate when the prompt is text (4 bytes a token).
fn blocks(req: &Value, prompt_tokens: Option<usize>) -> u64 {
    let prompt = prompt_tokens.unwrap_or_else(|| {
        let text = req.get("prompt").or_else(|| req.get("messages"));
        text.map(|t| t.to_string().len() / 4).unwrap_or(0)
    });
    let out = [&req["max_tokens"], &req["max_completion_tokens"]]
        .iter()
        .find_map(|v| v.as_u64())
        .unwrap_or(16) as usize;
    (prompt + out).div_ceil(16) as u64
}

/// The prompt's beginning as bytes, for prefix affinity.
fn head(req: &Value) -> Vec<u8> {
    let v = req.get("prompt").or_else(|| req.get("messages"));
    let mut s = match v {
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
        None => Vec::new(),
    };
    s.truncate(crate::policy::CacheAware::CHUNK * crate::policy::CacheAware::MAX_CHUNKS);
    s
}

async fn handle_inner(
    p: &Proxy,
    id: &HeaderValue,
    body: Bytes,
    path: &str,
    arrived: Instant,
) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "request body must be a JSON object",
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("malformed JSON: {e}"),
            )
        }
    };
    let stream = req["stream"].as_bool().unwrap_or(false);
    let known_tokens = id_count(&req);
    let head = head(&req);
    let call = Call {
        path,
        id,
        ask: Ask {
            blocks: blocks(&req, known_tokens),
            head: &head,
        },
        arrived,
    };
    let threshold = p.0.disagg_threshold;
    let n = if threshold > 0 {
        prompt_tokens(p, &req, path).await
    } else {
        None
    };
    let prefill_pool = p.prefill_pool();
    let queues: Vec<u64> = prefill_pool
        .instances()
        .iter()
        .filter(|i| i.available())
        .map(|i| i.load().queue())
        .collect();
    let mut local = decide(n, threshold, &queues, p.0.routing.prefill_busy_threshold);
    // A one-token answer is complete once the prompt is prefilled: the prefill instance
    // serves it whole, so no KV is held, shipped, or loaded by a decode instance for it.
    let one_token = [&req["max_tokens"], &req["max_completion_tokens"]]
        .iter()
        .any(|v| v.as_u64() == Some(1))
        && req["n"].as_u64().unwrap_or(1) == 1;
    let mut prefill_error = None;
    if one_token && local.is_none() {
        let timeout = Some(Duration::from_secs(600));
        match send(p, prefill_pool, &call, &req, timeout).await {
            Ok(s) if !s.resp.status().is_server_error() => {
                return forward(s, stream).await;
            }
            Ok(s) => {
                let status = s.resp.status();
                prefill_error = Some(format!("prefill instance {} answered {status}", s.url));
            }
            Err(e) => prefill_error = Some(e.message("prefill")),
        }
        local = Some(Local::PrefillFailed);
    }
    let mut dec = req;
    if local.is_none() {
        match prefill(p, &call, &dec).await {
            // The decode instance gets the original request plus where its KV waits.
            Ok(params) => dec["kv_transfer_params"] = params,
            Err(Prefill::Answer(resp)) => return resp,
            Err(Prefill::Fallback(e)) => {
                prefill_error = Some(e);
                local = Some(Local::PrefillFailed);
            }
        }
    }
    if let Some(why) = local {
        if why.is_fallback() {
            let e = prefill_error.unwrap_or_else(|| "no prefill instance is available".into());
            if !p.0.routing.fallback {
                return error(StatusCode::BAD_GATEWAY, "upstream_error", e);
            }
            if !p.0.falling_back.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "prefilling on decode instances (fallback to colocated) until a prefill instance answers");
            }
            prefill_error = Some(e);
        }
        p.0.metrics
            .fallbacks
            .with_label_values(&[why.as_str()])
            .inc();
    } else {
        p.0.metrics.disaggregated.inc();
        if p.0.falling_back.swap(false, Ordering::Relaxed) {
            tracing::info!("a prefill instance answers again; disaggregating");
        }
    }
    // A stream can go on elsewhere if its decode instance dies: the router follows its
    // token ids (asked for, and hidden from a client that did not ask).
    let resume = (stream && dec["n"].as_u64().unwrap_or(1) == 1).then(|| {
        let mut original = dec.clone();
        if let Some(o) = original.as_object_mut() {
            o.remove("kv_transfer_params");
        }
        let client_ids = dec["return_token_ids"].as_bool().unwrap_or(false);
        dec["return_token_ids"] = json!(true);
        Resume {
            p: p.clone(),
            original,
            chat: path.ends_with("chat/completions"),
            client_ids,
            id: id.clone(),
            blocks: call.ask.blocks,
        }
    });
    let mut sent = send(p, p.decode_pool(), &call, &dec, None).await;
    if let Ok(s) = &sent {
        let status = s.resp.status();
        if status.is_server_error() && dec.get("kv_transfer_params").is_some() {
            // Its KV did not arrive (the producer died after the prefill, say): the decode
            // instance prefills it instead. Nothing reached the client yet.
            tracing::warn!(id = ?id, decode = %s.url, %status, "KV load failed; prefilling on a decode instance instead");
            p.0.metrics
                .fallbacks
                .with_label_values(&["kv_load_failed"])
                .inc();
            if let Some(o) = dec.as_object_mut() {
                o.remove("kv_transfer_params");
            }
            sent = send(p, p.decode_pool(), &call, &dec, None).await;
        }
    }
    let sent = match (sent, resume) {
        (Ok(s), Some(r)) if s.resp.status().is_success() => return relay(s, r),
        (sent, _) => sent,
    };
    match sent {
        Ok(s) if !stream && s.resp.status().is_success() => {
            let Sent {
                url,
                resp,
                _in_flight,
            } = s;
            match resp.bytes().await {
                Ok(b) => json_response(b),
                Err(err) => {
                    // The decode instance died before its answer was whole: the client has
                    // seen nothing, so the request runs again (prefilled where it lands);
                    // greedy and seeded answers come out the same.
                    drop(_in_flight);
                    if let Some(i) = p.decode_pool().find(&url) {
                        fail(p, p.decode_pool(), &i, &err.to_string());
                    }
                    tracing::warn!(id = ?id, decode = %url, error = %err, "decode instance failed mid-answer; running the request again on another");
                    p.0.metrics.failovers.inc();
                    if let Some(o) = dec.as_object_mut() {
                        o.remove("kv_transfer_params");
                    }
                    match send(p, p.decode_pool(), &call, &dec, None).await {
                        Ok(s) => forward(s, false).await,
                        Err(e) => error(
                            StatusCode::BAD_GATEWAY,
                            "upstream_error",
                            format!(
                                "decode instance {url} failed mid-answer ({err}); {}",
                                e.message("decode")
                            ),
                        ),
                    }
                }
            }
        }
        Ok(s) => forward(s, stream).await,
        Err(SendError::NoneAvailable)
            if p.decode_pool()
                .instances()
                .iter()
                .all(|i| !i.in_rotation.load(Ordering::Relaxed)) =>
        {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "every decode instance is drained",
            )
        }
        Err(e) => {
            let mut msg = e.message("decode");
            if let Some(pe) = prefill_error {
                msg = format!("{pe}; prefilling on a decode instance instead failed: {msg}");
            }
            error(StatusCode::BAD_GATEWAY, "upstream_error", msg)
        }
    }
}

enum Prefill {
    /// What the client gets (its own error, or a producer that is not one).
    Answer(Response),
    /// The prefill pool could not serve it: prefill on the decode instance.
    Fallback(String),
}

/// Prefill: one token, no stream, the KV held for a remote decode. Returns the producer's
/// `kv_transfer_params`.
async fn prefill(p: &Proxy, call: &Call<'_>, req: &Value) -> Result<Value, Prefill> {
    let mut pre = req.clone();
    pre["max_tokens"] = json!(1);
    if let Some(o) = pre.as_object_mut() {
        o.remove("max_completion_tokens");
        o.remove("stream_options");
    }
    pre["stream"] = json!(false);
    if pre["min_tokens"].as_u64().is_some_and(|m| m > 1) {
        pre["min_tokens"] = json!(1);
    }
    pre["kv_transfer_params"] = json!({"do_remote_decode": true});
    let t0 = Instant::now();
    // A long prompt may take minutes to prefill.
    let timeout = Some(Duration::from_secs(600));
    let s = send(p, p.prefill_pool(), call, &pre, timeout)
        .await
        .map_err(|e| Prefill::Fallback(e.message("prefill")))?;
    let status = s.resp.status();
    if status.is_server_error() {
        let msg = s.resp.text().await.unwrap_or_default();
        return Err(Prefill::Fallback(format!(
            "prefill instance {} failed ({status}): {msg}",
            s.url
        )));
    }
    if !status.is_success() {
        return Err(Prefill::Answer(
            passthrough_error(&s.url, "prefill", s.resp).await,
        ));
    }
    let purl = s.url.clone();
    let pjson: Value = s.resp.json().await.map_err(|e| {
        Prefill::Fallback(format!("prefill instance {purl} sent a bad response: {e}"))
    })?;
    // Passed on as they came (a producer's own fields included), once they say where the
    // KV waits.
    let params = match KvTransferParams::parse(pjson.get("kv_transfer_params")) {
        Ok(Some(k)) if k.ask == KvAsk::Consume => k.to_value(),
        _ => {
            return Err(Prefill::Answer(error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!(
                    "prefill instance {purl} returned no kv_transfer_params for a remote decode (is it a kv_producer?)"
                ),
            )))
        }
    };
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    tracing::debug!(id = ?call.id, prefill = %purl, prefill_ms, "prefilled");
    Ok(params)
}

/// The number of prompt tokens when the prompt is a list of ids.
fn id_count(req: &Value) -> Option<usize> {
    let a = req["prompt"].as_array()?;
    a.iter().all(Value::is_number).then_some(a.len())
}

/// The prompt's token count: an id list's length, else a decode instance's `/tokenize`.
async fn prompt_tokens(p: &Proxy, req: &Value, path: &str) -> Option<usize> {
    if let Some(n) = id_count(req) {
        return Some(n);
    }
    let body = if path.ends_with("chat/completions") {
        json!({"messages": req["messages"]})
    } else {
        json!({"prompt": req["prompt"].as_str()?})
    };
    let inst = p.decode_pool().choose(&Ask::default()).into_iter().next()?;
    let r =
        p.0.client
            .post(format!("{}/tokenize", inst.url))
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
    let v: Value = r.json().await.ok()?;
    v["count"].as_u64().map(|n| n as usize)
}

/// Passes an instance's answer through to the client; the request stays in flight there
/// until it has.
fn json_response(b: Bytes) -> Response {
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        b,
    )
        .into_response()
}

async fn forward(s: Sent, stream: bool) -> Response {
    let Sent {
        url,
        resp,
        _in_flight,
    } = s;
    if !resp.status().is_success() {
        return passthrough_error(&url, "decode", resp).await;
    }
    if !stream {
        let r = match resp.bytes().await {
            Ok(b) => json_response(b),
            Err(e) => error(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("instance {url} failed mid-response: {e}"),
            ),
        };
        drop(_in_flight);
        return r;
    }
    // SSE passthrough; a stream that breaks or ends without [DONE] gets an error event.
    let upstream = resp.bytes_stream();
    let state = (upstream, Vec::<u8>::new(), false, url, _in_flight);
    let body =
        futures_util::stream::unfold(state, |(mut up, mut tail, ended, url, guard)| async move {
            if ended {
                return None;
            }
            match up.next().await {
                Some(Ok(b)) => {
                    tail.extend_from_slice(&b);
                    let keep = tail.len().saturating_sub(32);
                    tail.drain(..keep);
                    Some((
                        Ok::<Bytes, std::io::Error>(b),
                        (up, tail, false, url, guard),
                    ))
                }
                Some(Err(e)) => {
                    tracing::warn!(decode = %url, error = %e, "decode stream broke");
                    let ev = error_event(format!("decode instance {url} failed mid-stream: {e}"));
                    Some((Ok(ev), (up, tail, true, url, guard)))
                }
                None if !String::from_utf8_lossy(&tail).contains("[DONE]") => {
                    let ev = error_event(format!("decode instance {url} ended the stream early"));
                    Some((Ok(ev), (up, tail, true, url, guard)))
                }
                None => None,
            }
        });
    sse(Body::from_stream(body))
}

/// What the router needs to continue a client's stream on another decode instance.
struct Resume {
    p: Proxy,
    /// The client's request (without `kv_transfer_params`).
    original: Value,
    chat: bool,
    /// Whether the client asked for token ids (else they are taken out of its chunks).
    client_ids: bool,
    id: HeaderValue,
    /// The KV blocks it takes ([`Ask::blocks`]), for the instance that continues it.
    blocks: u64,
}

/// Where a relayed stream stands.
#[derive(Default)]
struct Followed {
    prompt_ids: Option<Vec<u32>>,
    out: Vec<u32>,
    /// The first upstream chunk's `id`, `created` and `model`: the client's stream keeps them.
    head: Option<(Value, Value, Value)>,
    finished: bool,
    done: bool,
    /// The upstream sent an error event itself: the stream ends as it said.
    errored: bool,
}

/// The request that continues `r`'s stream after `f.out`: prompt and output so far as token
/// ids, the output marked as resumed; the same sampling, so that greedy and seeded runs go on
/// exactly as they would have (the sampler resumes at its position).
fn continuation(r: &Resume, f: &Followed) -> (String, Value) {
    let Some(prompt) = &f.prompt_ids else {
        // Nothing came back yet: the request again, prefilled where it lands.
        let path = if r.chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        return (path.into(), r.original.clone());
    };
    let o = &r.original;
    let ids = [&prompt[..], &f.out[..]].concat();
    let mut b = json!({
        "prompt": ids,
        "resume_tokens": f.out.len(),
        "stream": true,
        "return_token_ids": true,
    });
    for k in [
        "model",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "min_tokens",
        "presence_penalty",
        "frequency_penalty",
        "stream_options",
        "cache_salt",
        "max_tokens",
    ] {
        if let Some(v) = o.get(k).filter(|v| !v.is_null()) {
            b[k] = v.clone();
        }
    }
    if let Some(v) = o.get("max_completion_tokens").filter(|v| !v.is_null()) {
        b["max_tokens"] = v.clone();
    }
    if !r.chat {
        if let Some(v) = o.get("logprobs").filter(|v| !v.is_null()) {
            b["logprobs"] = v.clone();
        }
    } else if o["logprobs"].as_bool() == Some(true) {
        // Chat's `logprobs` + `top_logprobs` is completions' `logprobs: n`; [`chat_logprobs`]
        // turns the answer back.
        b["logprobs"] = json!(o["top_logprobs"].as_u64().unwrap_or(0));
    }
    ("/v1/completions".into(), b)
}

/// One upstream event as the client gets it: token ids followed, hidden if not asked for;
/// a continuation's chunks keep the stream's id (and become chat chunks for a chat client).
fn rewrite(r: &Resume, f: &mut Followed, data: &str, continued: bool) -> Option<String> {
    if data == "[DONE]" {
        f.done = true;
        return Some(data.into());
    }
    let Ok(mut v) = serde_json::from_str::<Value>(data) else {
        return Some(data.into());
    };
    if v.get("error").is_some() {
        f.errored = true;
        return Some(v.to_string());
    }
    if f.head.is_none() {
        f.head = Some((v["id"].clone(), v["created"].clone(), v["model"].clone()));
    }
    if let Some(c) = v["choices"].get_mut(0) {
        if let Some(ids) = c["token_ids"].as_array() {
            f.out
                .extend(ids.iter().filter_map(|t| t.as_u64()).map(|t| t as u32));
        }
        if f.prompt_ids.is_none() {
            if let Some(ids) = c["prompt_token_ids"].as_array() {
                f.prompt_ids = Some(
                    ids.iter()
                        .filter_map(|t| t.as_u64())
                        .map(|t| t as u32)
                        .collect(),
                );
            }
        }
        if !c["finish_reason"].is_null() {
            f.finished = true;
        }
        if !r.client_ids {
            if let Some(o) = c.as_object_mut() {
                o.remove("token_ids");
                o.remove("prompt_token_ids");
            }
        }
    }
    if continued {
        let (id, created, model) = f.head.clone().unwrap_or_default();
        if r.chat {
            let choices: Vec<Value> = v["choices"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| {
                            let mut d = json!({"index": 0, "delta": {"content": c["text"]},
                                "logprobs": chat_logprobs(&c["logprobs"]), "finish_reason": c["finish_reason"]});
                            if r.client_ids {
                                d["token_ids"] = c["token_ids"].clone();
                            }
                            d
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut chat = json!({"id": id, "object": "chat.completion.chunk",
                "created": created, "model": model, "choices": choices});
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                chat["usage"] = u.clone();
            }
            v = chat;
        } else {
            v["id"] = id;
            v["created"] = created;
        }
    }
    Some(v.to_string())
}

/// A completions chunk's `logprobs` in chat's shape: `{"content": [{token, logprob, bytes,
/// top_logprobs}]}`. Completions give the alternatives as a map of text to logprob, which
/// JSON does not order: they are put back best first (ties by text).
fn chat_logprobs(l: &Value) -> Value {
    let Some(tokens) = l["tokens"].as_array() else {
        return Value::Null;
    };
    let entry = |t: &str, lp: &Value| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let t = t.as_str().unwrap_or_default();
            let mut e = entry(t, &l["token_logprobs"][k]);
            let mut alts: Vec<(&String, &Value)> = l["top_logprobs"][k]
                .as_object()
                .map(|m| m.iter().collect())
                .unwrap_or_default();
            let key = |v: &Value| v.as_f64().unwrap_or(f64::NEG_INFINITY);
            alts.sort_by(|a, b| key(b.1).total_cmp(&key(a.1)).then_with(|| a.0.cmp(b.0)));
            e["top_logprobs"] = alts.into_iter().map(|(t, v)| entry(t, v)).collect();
            e
        })
        .collect();
    json!({"content": content})
}

/// Passes a decode stream through, and if its instance dies before the end, continues it on
/// another one: the client's stream goes on as if nothing happened.
fn relay(first: Sent, r: Resume) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let mut f = Followed::default();
        let mut cur = first;
        let mut tried = vec![cur.url.clone()];
        let mut continued = false;
        let emit = |s: String| Bytes::from(format!("data: {s}\n\n"));
        loop {
            let Sent {
                url,
                resp,
                _in_flight,
            } = cur;
            let mut up = resp.bytes_stream();
            let mut buf: Vec<u8> = Vec::new();
            let broke = loop {
                match up.next().await {
                    Some(Ok(b)) => {
                        buf.extend_from_slice(&b);
                        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                            let ev: Vec<u8> = buf.drain(..end + 2).collect();
                            let text = String::from_utf8_lossy(&ev);
                            let Some(data) = text.trim().strip_prefix("data: ") else {
                                continue;
                            };
                            if let Some(out) = rewrite(&r, &mut f, data, continued) {
                                if tx.send(Ok(emit(out))).await.is_err() {
                                    return; // the client went away
                                }
                            }
                        }
                    }
                    Some(Err(e)) => break Some(e.to_string()),
                    None if f.done || f.errored => break None,
                    None => break Some("the stream ended early".into()),
                }
            };
            drop(_in_flight);
            let Some(why) = broke else { return };
            if f.finished {
                // Its last token and finish came; only the end was lost.
                let _ = tx.send(Ok(emit("[DONE]".into()))).await;
                return;
            }
            let p = &r.p;
            p.0.metrics
                .errors
                .with_label_values(&["decode", &url])
                .inc();
            if let Some(i) = p.decode_pool().find(&url) {
                i.failure(&why);
            }
            let next = p
                .decode_pool()
                .choose(&Ask {
                    blocks: r.blocks,
                    head: b"",
                })
                .into_iter()
                .find(|i| !tried.contains(&i.url));
            let Some(inst) = next else {
                let ev = error_event(format!("decode instance {url} failed mid-stream ({why}) and no other could continue it"));
                let _ = tx.send(Ok(ev)).await;
                return;
            };
            let seeded =
                r.original["seed"].is_u64() || r.original["temperature"].as_f64() == Some(0.0);
            if !seeded {
                tracing::warn!(id = ?r.id, "continuing an unseeded sampled stream: its continuation is not the one an uninterrupted run would have made");
            }
            tracing::warn!(id = ?r.id, failed = %url, next = %inst.url, tokens = f.out.len(), error = %why, "decode instance died mid-stream; continuing the stream on another");
            p.0.metrics.failovers.inc();
            tried.push(inst.url.clone());
            let (path, body) = continuation(&r, &f);
            let in_flight = inst.start(r.blocks);
            p.0.metrics
                .requests
                .with_label_values(&["decode", &inst.url])
                .inc();
            let resp =
                p.0.client
                    .post(format!("{}{path}", inst.url))
                    .header(REQUEST_ID, r.id.clone())
                    .json(&body)
                    .send()
                    .await;
            match resp {
                Ok(resp) if resp.status().is_success() => {
                    inst.success();
                    // Resending the request itself (nothing came yet) needs no rewriting.
                    continued = f.prompt_ids.is_some();
                    cur = Sent {
                        url: inst.url.clone(),
                        resp,
                        _in_flight: in_flight,
                    };
                }
                other => {
                    let e = match other {
                        Ok(resp) => format!("{} answered {}", inst.url, resp.status()),
                        Err(e) => format!("{}: {e}", inst.url),
                    };
                    let ev = error_event(format!(
                        "decode instance {url} failed mid-stream ({why}); continuing on {e}"
                    ));
                    let _ = tx.send(Ok(ev)).await;
                    return;
                }
            }
        }
    });
    let body =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    sse(Body::from_stream(body))
}

/// An SSE response around `body`.
fn sse(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_TYPE, "text/event-stream")
        .header(axum::http::header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            )
        })
}

pub(crate) async fn models(State(p): State<Proxy>) -> Response {
    let Some(inst) = p.decode_pool().choose(&Ask::default()).into_iter().next() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "no decode instance is available",
        );
    };
    let url = &inst.url;
    match p.0.client.get(format!("{url}/v1/models")).send().await {
        Ok(r) if r.status().is_success() => match r.json::<Value>().await {
            Ok(v) => Json(v).into_response(),
            Err(e) => error(StatusCode::BAD_GATEWAY, "upstream_error", e.to_string()),
        },
        Ok(r) => passthrough_error(url, "decode", r).await,
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            format!("{url}: {e}"),
        ),
    }
}

/// Every instance's `/health`; 200 when each pool has at least one healthy instance.
pub(crate) async fn health(State(p): State<Proxy>) -> Response {
    let check = |url: String| {
        let c = p.0.client.clone();
        async move {
            let r = c
                .get(format!("{url}/health"))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            let v = match r {
                Ok(r) if r.status().is_success() => r.json::<Value>().await.unwrap_or(json!({})),
                Ok(r) => json!({"status": format!("HTTP {}", r.status())}),
                Err(e) => json!({"status": format!("unreachable: {e}")}),
            };
            (url, v)
        }
    };
    let urls = |pool: &Pool| {
        pool.instances()
            .iter()
            .map(|i| i.url.clone())
            .collect::<Vec<_>>()
    };
    let pre = futures_util::future::join_all(urls(p.prefill_pool()).into_iter().map(check)).await;
    let dec = futures_util::future::join_all(urls(p.decode_pool()).into_iter().map(check)).await;
    // A pool is up when an instance answers and the router would send it requests (its
    // circuit is not open: one that failed its polls while starting stays out for the
    // cooldown even once it answers), so that a ready router routes.
    let ok = |v: &[(String, Value)], pool: &Pool| {
        v.iter()
            .any(|(u, x)| x["status"] == "ok" && pool.find(u).is_some_and(|i| i.available()))
    };
    // Decode instances can prefill (the fallback): the service is up while one answers.
    let (prefill_ok, decode_ok) = (ok(&pre, p.prefill_pool()), ok(&dec, p.decode_pool()));
    let status = match (prefill_ok, decode_ok) {
        (true, true) => "ok",
        (false, true) => "degraded",
        _ => "unavailable",
    };
    let list = |v: Vec<(String, Value)>, pool: &Pool| -> Vec<Value> {
        v.into_iter()
            .map(|(u, mut x)| {
                x["url"] = json!(u);
                if let Some(i) = pool.find(&u) {
                    x["router"] = i.describe();
                }
                x
            })
            .collect()
    };
    let body = json!({
        "status": status,
        "prefill": list(pre, p.prefill_pool()),
        "decode": list(dec, p.decode_pool()),
    });
    let code = if prefill_ok && decode_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

pub(crate) async fn metrics(State(p): State<Proxy>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        p.0.metrics.render(&p.0.pools[..]),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_a_prompt_is_prefilled_at_the_boundaries() {
        // Shorter than the threshold: local; at it: not.
        assert_eq!(decide(Some(99), 100, &[0], 0), Some(Local::Short));
        assert_eq!(decide(Some(100), 100, &[0], 0), None);
        // Threshold 0 or an unknown length: never short.
        assert_eq!(decide(Some(1), 0, &[0], 0), None);
        assert_eq!(decide(None, 100, &[0], 0), None);
        // No prefill instance available.
        assert_eq!(decide(Some(500), 100, &[], 0), Some(Local::PrefillDown));
        assert_eq!(
            decide(Some(5), 100, &[], 0),
            Some(Local::Short),
            "short wins"
        );
        // Busy: every queue at the threshold; one below it is enough to disaggregate.
        assert_eq!(decide(None, 0, &[4, 4], 4), Some(Local::PrefillBusy));
        assert_eq!(decide(None, 0, &[4, 3], 4), None);
        assert_eq!(decide(None, 0, &[9, 9], 0), None, "busy 0: never");
    }

    #[tokio::test]
    async fn continuations_resume_at_the_tokens_streamed() {
        let r = Resume {
            p: Proxy::new(crate::Pools {
                prefill: vec!["http://127.0.0.1:1".into()],
                decode: vec!["http://127.0.0.1:2".into()],
                disagg_threshold: 0,
                decode_admin: vec![],
                api_key: None,
                routing: crate::Routing::default(),
            })
            .expect("proxy"),
            original: json!({"model": "m", "prompt": "hi", "max_completion_tokens": 9,
                "seed": 3, "temperature": 0.5, "stream": true, "return_token_ids": true}),
            chat: false,
            client_ids: false,
            id: HeaderValue::from_static("r"),
            blocks: 1,
        };
        let mut f = Followed {
            prompt_ids: Some(vec![1, 2]),
            out: vec![7, 8, 9],
            ..Followed::default()
        };
        let (path, b) = continuation(&r, &f);
        assert_eq!(path, "/v1/completions");
        assert_eq!(b["prompt"], json!([1, 2, 7, 8, 9]));
        assert_eq!(b["resume_tokens"], 3);
        assert_eq!(
            (b["max_tokens"].clone(), b["seed"].clone()),
            (json!(9), json!(3))
        );
        // Token ids the client did not ask for are taken out; the continuation keeps the id.
        f.head = Some((json!("cmpl-1"), json!(5), json!("m")));
        let out = rewrite(
            &r,
            &mut f,
            r#"{"id":"cmpl-2","created":6,"choices":[{"text":"x","token_ids":[4],"finish_reason":null}]}"#,
            true,
        )
        .expect("an event");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["id"], "cmpl-1");
        assert!(v["choices"][0].get("token_ids").is_none());
        assert_eq!(f.out, [7, 8, 9, 4]);
    }

    #[test]
    fn completion_logprobs_become_chat_logprobs_best_first() {
        let c = json!({"tokens": [" a"], "token_logprobs": [-0.5],
            "top_logprobs": [{" b": -2.0, " a": -0.5, "c": -1.0}], "text_offset": [0]});
        let e = |t: &str, l: f64| json!({"token": t, "logprob": l, "bytes": t.as_bytes()});
        let mut want = e(" a", -0.5);
        want["top_logprobs"] = json!([e(" a", -0.5), e("c", -1.0), e(" b", -2.0)]);
        assert_eq!(chat_logprobs(&c), json!({"content": [want]}));
        assert_eq!(chat_logprobs(&Value::Null), Value::Null);
    }
}
