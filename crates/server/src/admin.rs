//! Admin endpoints, served on their own listener (loopback unless told otherwise):
//!
//! - `GET  /admin/requests`: running, waiting and parked requests;
//! - `POST /admin/migrate {"request_id", "target", "after_tokens"?}`: move one live request;
//! - `POST /admin/drain {"targets": [...]}`: refuse new requests, move every live one;
//! - `POST /admin/undrain`: accept requests again;
//! - `GET  /admin/health`: free blocks and whether this engine drains (targets are picked
//!   by free KV blocks);
//! - `POST /admin/import`: the receiving side of a migration.
//!
//! A migration parks the request at a step boundary, sends it (state and KV in one
//! [`splitserve_kv::migration`] unit) to the target's `/admin/import`, and frees it here
//! once the target has taken it. The target streams the request's further events back as
//! NDJSON and this server feeds them into the client's open response, so the client sees
//! one unbroken stream. On any refusal the request resumes here and nothing is lost.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use splitserve_engine::{EngineError, Event, FinishReason, Finished, TokenOut};
use splitserve_kv::migration;
use tokio::sync::mpsc::UnboundedSender;

use crate::{parse, ApiError, AppState, OnDrop};

/// How long a migration target may take to accept or refuse a request.
const IMPORT_ANSWER: Duration = Duration::from_secs(30);

/// The admin routes (mount them on a loopback listener).
pub fn admin_router(state: AppState) -> Router {
    // A migration unit holds at most a full context's KV and its state: nothing larger is
    // buffered.
    let engine = state.engine();
    let layout = engine.kv_layout();
    let max_len = engine.max_model_len();
    let kv = max_len.div_ceil(layout.block_size) * layout.layer_block_bytes() * layout.n_layer;
    let limit = kv + 16 * max_len + (4 << 20);
    Router::new()
        .route("/admin/requests", get(list))
        .route("/admin/migrate", post(migrate))
        .route("/admin/drain", post(drain))
        .route("/admin/undrain", post(undrain))
        .route("/admin/health", get(admin_health))
        .route("/admin/import", post(import))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn reply(r: Result<Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list(State(state): State<AppState>) -> Response {
    reply(
        state
            .engine()
            .requests()
            .await
            .map(|r| json!({"requests": r}))
            .map_err(ApiError::from),
    )
}

async fn admin_health(State(state): State<AppState>) -> Response {
    let s = state.engine().stats();
    Json(json!({
        "free_blocks": s.free_blocks,
        "total_blocks": s.total_blocks,
        "running": s.running,
        "waiting": s.waiting,
        "draining": state.0.draining.load(Ordering::Relaxed),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct MigrateRequest {
    request_id: String,
    target: String,
    /// Move it once it has generated this many tokens (default: at the next step boundary).
    #[serde(default)]
    after_tokens: usize,
}

async fn migrate(State(state): State<AppState>, body: Bytes) -> Response {
    let r = async {
        let req: MigrateRequest = parse(&body)?;
        // Known by its engine id, or by its HTTP id (a single prompt's engine id is `<id>-0`).
        let ids = [
            req.request_id.clone(),
            crate::generation::engine_id(&req.request_id, 0),
        ];
        migrate_one(
            &state,
            &ids,
            req.target.trim_end_matches('/'),
            req.after_tokens,
        )
        .await
    };
    reply(r.await)
}

/// Refuses a target that is not on the allow-list, before anything is parked or sent. A
/// listed URL that names a host allows every address the name resolves to, at its scheme
/// and port (a Kubernetes headless Service: every decode pod).
async fn check_target(state: &AppState, target: &str) -> Result<(), ApiError> {
    let allowed = state
        .0
        .migrate_targets
        .get()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if allowed.iter().any(|t| t == target) || resolves_to(allowed, target).await {
        return Ok(());
    }
    Err(ApiError::Forbidden(if allowed.is_empty() {
        format!(
            "migration target {target} refused: this server was started without --migrate-targets, so it sends requests nowhere"
        )
    } else {
        format!(
            "migration target {target} is not in --migrate-targets ({})",
            allowed.join(", ")
        )
    }))
}

/// Whether `target` (`scheme://ip:port`) is an address that a name in `allowed` resolves
/// to, with the same scheme and port.
async fn resolves_to(allowed: &[String], target: &str) -> bool {
    let Ok(t) = reqwest::Url::parse(target) else {
        return false;
    };
    // A base URL and nothing else: no path, query, fragment or credentials to smuggle.
    let bare = matches!(t.path(), "" | "/")
        && t.query().is_none()
        && t.fragment().is_none()
        && t.username().is_empty()
        && t.password().is_none();
    if !bare {
        return false;
    }
    let Some(ip) = t
        .host_str()
        .and_then(|h| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
    else {
        return false;
    };
    for a in allowed {
        let Ok(u) = reqwest::Url::parse(a) else {
            continue;
        };
        let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) else {
            continue;
        };
        let named = host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_err();
        if !named || u.scheme() != t.scheme() || Some(port) != t.port_or_known_default() {
            continue;
        }
        let found = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tokio::net::lookup_host((host, port)),
        )
        .await;
        if let Ok(Ok(mut addrs)) = found {
            if addrs.any(|x| x.ip() == ip) {
                return true;
            }
        }
    }
    false
}

/// Moves the request (the first live one of `ids`) to the engine whose admin base URL is
/// `target`; on any refusal the request continues here and the error says why.
pub(crate) async fn migrate_one(
    state: &AppState,
    ids: &[String],
    target: &str,
    after_tokens: usize,
) -> Result<Value, ApiError> {
    check_target(state, target).await?;
    let fp = state
        .fingerprint()
        .ok_or_else(|| ApiError::Internal("migration needs the model's fingerprint".into()))?
        .clone();
    let engine = state.engine().clone();
    let metrics = state.metrics().clone();
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    let parked = engine.park(&names, after_tokens).await?;
    let id = parked.migration.state.id.clone();
    let id = id.as_str();
    let t0 = Instant::now();
    // Until the target has the request, any way out of here (an error, the admin client
    // leaving) puts it back into this engine's schedule.
    let resume = {
        let (engine, id) = (engine.clone(), id.to_string());
        OnDrop::new(move || engine.resume_parked(&id))
    };
    let st = &parked.migration.state;
    let (generated, prompt_len, kv_tokens) = (st.generated(), st.prompt_len, st.kv_tokens);
    let blocks = kv_tokens.div_ceil(engine.kv_layout().block_size);
    let kv_bytes: usize = parked.migration.layers.iter().map(Vec::len).sum();
    let m = parked.migration;
    let unit = tokio::task::spawn_blocking(move || migration::encode(&fp, &m))
        .await
        .map_err(|e| ApiError::Internal(format!("encoding the migration: {e}")))?;
    let bytes = unit.len();
    let refused = |e: ApiError| {
        metrics.migrations.with_label_values(&["refused"]).inc();
        tracing::warn!(id = %id, target = %target, error = %e, "migration refused; the request continues here");
        e
    };
    let send = crate::http::with_admin_token(state.0.client.post(format!("{target}/admin/import")))
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(unit)
        .send();
    // The request is paused meanwhile: a target that does not answer must not hold it.
    let resp = match tokio::time::timeout(IMPORT_ANSWER, send).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return Err(refused(ApiError::BadGateway(format!(
                "migration target {target} unreachable: {e}; request {id} continues here"
            ))))
        }
        Err(_) => {
            return Err(refused(ApiError::BadGateway(format!(
                "migration target {target} did not answer within {} s; request {id} continues here",
                IMPORT_ANSWER.as_secs()
            ))))
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        let msg = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| v.to_string());
        let msg = format!(
            "migration target {target} refused request {id} ({status}): {msg}; it continues here"
        );
        return Err(refused(match status.as_u16() {
            409 => ApiError::Conflict(msg),
            503 => ApiError::Unavailable(msg),
            _ => ApiError::BadGateway(msg),
        }));
    }
    engine.commit_parked(id);
    resume.disarm();
    let took = t0.elapsed();
    metrics.migrations.with_label_values(&["ok"]).inc();
    metrics.migration_bytes.inc_by(bytes as u64);
    metrics.migration.observe(took.as_secs_f64());
    tracing::info!(
        "migrated request {id} to {target} after {generated} tokens: {blocks} blocks ({:.2} MiB) in {:.1} ms",
        kv_bytes as f64 / (1 << 20) as f64,
        took.as_secs_f64() * 1e3
    );
    relay(
        resp,
        parked.events,
        target.to_string(),
        prompt_len,
        generated,
    );
    Ok(json!({
        "request_id": id,
        "target": target,
        "generated_tokens": generated,
        "kv_tokens": kv_tokens,
        "blocks": blocks,
        "kv_bytes": kv_bytes,
        "bytes": bytes,
        "ms": took.as_secs_f64() * 1e3,
    }))
}

/// One line of the NDJSON stream a target sends back for a migrated request.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireEvent {
    Token {
        token: u32,
        text: String,
        logprob: Option<f32>,
        top_logprobs: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        error: Option<String>,
    },
}

/// Feeds the target's events into the client's channel until the request ends; if the
/// target fails first, the client gets an error. If the client leaves, dropping the
/// response makes the target abort the request.
fn relay(
    resp: reqwest::Response,
    events: UnboundedSender<Event>,
    target: String,
    prompt_tokens: usize,
    mut completion_tokens: usize,
) {
    tokio::spawn(async move {
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let failure = 'relay: loop {
            let chunk = tokio::select! {
                _ = events.closed() => return,
                c = body.next() => c,
            };
            match chunk {
                Some(Ok(b)) => buf.extend_from_slice(&b),
                Some(Err(e)) => break format!("the stream broke: {e}"),
                None => break "the stream ended before the request finished".to_string(),
            }
            while let Some(pos) = buf.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let ev = match serde_json::from_slice::<WireEvent>(&line[..pos]) {
                    Ok(WireEvent::Token {
                        token,
                        text,
                        logprob,
                        top_logprobs,
                    }) => {
                        completion_tokens += 1;
                        Event::Token(TokenOut {
                            token,
                            text,
                            logprob,
                            top_logprobs,
                            logits: None,
                        })
                    }
                    Ok(WireEvent::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        error,
                    }) => {
                        let _ = events.send(Event::Finished(Finished {
                            reason,
                            prompt_tokens,
                            completion_tokens,
                            queue_time: Duration::ZERO,
                            error: error.map(EngineError::Internal),
                            cached_tokens: 0,
                        }));
                        return;
                    }
                    Err(e) => break 'relay format!("a bad event: {e}"),
                };
                if events.send(ev).is_err() {
                    return;
                }
            }
        };
        tracing::warn!(target = %target, error = %failure, "migration target failed mid-request");
        let _ = events.send(Event::Finished(Finished {
            reason: FinishReason::Abort,
            prompt_tokens,
            completion_tokens,
            queue_time: Duration::ZERO,
            cached_tokens: 0,
            error: Some(EngineError::Internal(format!(
                "migration target {target} failed: {failure}"
            ))),
        }));
    });
}

/// The receiving side: checks the sender's fingerprint, adopts the request, and streams its
/// events back as NDJSON.
async fn import(State(state): State<AppState>, body: Bytes) -> Response {
    let r = async {
        if state.0.draining.load(Ordering::Relaxed) {
            return Err(ApiError::Unavailable(
                "this engine is draining and takes no requests".into(),
            ));
        }
        let ours = state
            .fingerprint()
            .ok_or_else(|| ApiError::Internal("migration needs the model's fingerprint".into()))?;
        let (theirs, m) =
            migration::decode(&body).map_err(|e| ApiError::bad(e.to_string(), None))?;
        ours.check(&theirs)
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
        let (id, n) = (m.state.id.clone(), m.state.tokens.len());
        let rx = state.engine().adopt(m).await?;
        tracing::info!(id = %id, tokens = n, "adopted a migrated request");
        Ok(rx)
    };
    let rx = match r.await {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    let lines = futures_util::stream::unfold((rx, false), |(mut rx, ended)| async move {
        if ended {
            return None;
        }
        let (ev, ended) = match rx.recv().await? {
            Event::Token(t) => (
                WireEvent::Token {
                    token: t.token,
                    text: t.text,
                    logprob: t.logprob,
                    top_logprobs: t.top_logprobs,
                },
                false,
            ),
            Event::Finished(f) => (
                WireEvent::Finished {
                    reason: f.reason,
                    prompt_tokens: f.prompt_tokens,
                    completion_tokens: f.completion_tokens,
                    error: f.error.map(|e| e.to_string()),
                },
                true,
            ),
        };
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<Bytes, std::io::Error>(Bytes::from(line)), (rx, ended)))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .unwrap_or_else(|e| ApiError::Internal(e.to_string()).into_response())
}

#[derive(Deserialize)]
struct DrainRequest {
    targets: Vec<String>,
}

/// Free blocks of each reachable target that takes requests.
async fn target_room(state: &AppState, targets: &[String]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in targets {
        let r = state
            .0
            .client
            .get(format!("{t}/admin/health"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(r) = r {
            if let Ok(v) = r.json::<Value>().await {
                if v["draining"] == false {
                    out.push((t.clone(), v["free_blocks"].as_u64().unwrap_or(0)));
                }
            }
        }
    }
    out
}

async fn drain(State(state): State<AppState>, body: Bytes) -> Response {
    let r = async {
        let req: DrainRequest = parse(&body)?;
        let targets: Vec<String> = req
            .targets
            .iter()
            .map(|t| t.trim_end_matches('/').to_string())
            .collect();
        if targets.is_empty() {
            return Err(ApiError::bad(
                "give at least one target engine's admin URL",
                Some("targets"),
            ));
        }
        for t in &targets {
            check_target(&state, t).await?;
        }
        state.0.draining.store(true, Ordering::Relaxed);
        tracing::info!(targets = ?targets, "draining: new requests are refused, live ones move");
        let (mut moved, mut failed) = (Vec::new(), Vec::new());
        let live = state.engine().requests().await?;
        for r in live.iter().filter(|r| r.state != "parked") {
            // The target with the most free KV blocks takes the next request.
            let room = target_room(&state, &targets).await;
            let Some((target, _)) = room.into_iter().max_by_key(|(_, free)| *free) else {
                failed.push(
                    json!({"request_id": r.id, "error": "no target is reachable and accepting"}),
                );
                continue;
            };
            match migrate_one(&state, std::slice::from_ref(&r.id), &target, 0).await {
                Ok(v) => moved.push(v),
                // It finished on its own meanwhile: nothing left to move.
                Err(ApiError::NotFound(_)) => {}
                Err(e) => failed.push(json!({"request_id": r.id, "error": e.to_string()})),
            }
        }
        let left = state.engine().requests().await?.len();
        Ok(json!({"draining": true, "migrated": moved, "failed": failed, "remaining": left}))
    };
    reply(r.await)
}

async fn undrain(State(state): State<AppState>) -> Response {
    state.0.draining.store(false, Ordering::Relaxed);
    tracing::info!("accepting requests again");
    Json(json!({"draining": false})).into_response()
}

#[cfg(test)]
mod tests {
    use super::resolves_to;

    #[tokio::test]
    async fn a_named_migration_target_allows_the_addresses_it_resolves_to() {
        let allowed = ["http://localhost:9000".to_string()];
        assert!(resolves_to(&allowed, "http://127.0.0.1:9000").await);
        assert!(
            !resolves_to(&allowed, "http://127.0.0.1:9001").await,
            "another port"
        );
        assert!(
            !resolves_to(&allowed, "https://127.0.0.1:9000").await,
            "another scheme"
        );
        assert!(
            !resolves_to(&allowed, "http://10.9.9.9:9000").await,
            "another address"
        );
        assert!(
            !resolves_to(&allowed, "http://localhost:9000").await,
            "a name, not an address"
        );
        for smuggled in [
            "http://127.0.0.1:9000/admin/undrain?x=",
            "http://127.0.0.1:9000/x",
            "http://u:p@127.0.0.1:9000",
            "http://127.0.0.1:9000#f",
        ] {
            assert!(!resolves_to(&allowed, smuggled).await, "{smuggled}");
        }
        let by_ip = ["http://127.0.0.1:9000".to_string()];
        assert!(!resolves_to(&by_ip, "http://127.0.0.2:9000").await);
    }
}
