//! One completion request's way through the server once its prompts are tokenized: admission
//! (draining, the PD plan and what each role allows), submission to the engine, and the
//! answer: local, produced (the KV held for a consumer) or consumed (the KV pulled first).

use std::sync::atomic::Ordering;

use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde_json::Value;
use splitserve_engine::{Engine, KvTransfer};
use splitserve_kv::role::Plan;

use crate::generation::{self, Kind, PromptJob, Spec};
use crate::{now_secs, openai, roles, ApiError, AppState, OnDrop};

/// Serves `jobs` (tokenized prompts) as a `kind` response under `id`.
pub(crate) async fn run(
    state: &AppState,
    kind: Kind,
    id: String,
    jobs: Vec<PromptJob>,
    common: &openai::CommonParams,
    max_tokens: Option<i64>,
    logprobs: Option<i64>,
) -> Result<Response, ApiError> {
    let (plan, release) = admit(state, common, jobs.len())?;
    // A producer answers with the connector's params: after holding the prompt's KV, or
    // after a store connector saved it.
    let produce = matches!(plan, Plan::Produce | Plan::Save);
    let consume = matches!(plan, Plan::Consume(_));
    // A held request's id must not be one a client can choose or guess: another request
    // under the same id would replace its hold.
    let id = if produce { unguessable(id)? } else { id };
    let engine = &state.0.engine;
    let resumed = common.resume_tokens.unwrap_or(0);
    // A resumed request's output so far is not prompt: it counts against max_tokens.
    let longest = jobs
        .iter()
        .map(|j| j.ids.len().saturating_sub(resumed))
        .max()
        .unwrap_or(0);
    let max_len = engine.max_model_len();
    if longest >= max_len {
        return Err(ApiError::bad(
            format!("This model's maximum context length is {max_len} tokens, but the prompt has {longest} tokens."),
            Some("prompt"),
        ));
    }
    let params = common.sampling(max_tokens, max_len - longest, logprobs)?;
    let spec = Spec {
        kind,
        id: id.clone(),
        model: state.0.model_name.clone(),
        created: now_secs(),
        include_usage: common.include_usage(),
        // The producer reads its first token id from the response it builds.
        return_token_ids: common.return_token_ids || produce,
        logprobs: params.logprobs.is_some(),
        prompt_tokens_details: state.http_options().prompt_tokens_details,
        extra: None,
    };
    let kv = match plan {
        Plan::Local | Plan::Save => KvTransfer::None,
        Plan::Produce => KvTransfer::Hold,
        Plan::Consume(r) => KvTransfer::Remote(r),
    };
    let salt = common.cache_salt()?;
    if resumed > 0 && (jobs.len() != 1 || !matches!(kv, KvTransfer::None)) {
        return Err(ApiError::bad(
            "resume_tokens needs one prompt and no kv_transfer_params",
            Some("resume_tokens"),
        ));
    }
    let more = generation::More {
        cache_salt: salt,
        resumed,
    };
    let mut events =
        generation::submit_all(engine, &state.0.metrics, &id, &jobs, &params, kv, more)?;
    // Submitted: from here the engine's connector releases the hold if the load never runs.
    release.disarm();
    if consume {
        // The KV loads inside the engine (WAITING_FOR_REMOTE_KVS); a failed load must still
        // be a 502 before the first byte, so wait for the first event.
        let first = events.next().await;
        if let Some(generation::Out::Done(_, f)) = &first {
            if let Some(e) = &f.error {
                return Err(ApiError::from(e.clone()));
            }
        }
        let events = futures_util::stream::iter(first).chain(events);
        return answer(engine, spec, jobs, events, common.stream).await;
    }
    if produce {
        return produced(state, &id, &spec, &jobs, events, common.return_token_ids).await;
    }
    answer(engine, spec, jobs, events, common.stream).await
}

/// Checks that this server takes the request and plans its KV; the returned guard tells a
/// producer whose KV the request would have read that it will not, unless disarmed.
fn admit(
    state: &AppState,
    common: &openai::CommonParams,
    n_prompts: usize,
) -> Result<(Plan, OnDrop), ApiError> {
    if state.0.draining.load(Ordering::Relaxed) {
        return Err(ApiError::Unavailable(
            "this server is draining and takes no new requests".into(),
        ));
    }
    let plan = roles::plan(state.0.pd.as_ref(), &common.kv_transfer_params)?;
    // Until its KV is pulled, a failure (or the client leaving) must tell the producer that
    // the blocks it holds for this request will not be read.
    let release = match (&plan, &state.0.pd) {
        (Plan::Consume(r), Some(role)) => {
            let (role, r) = (role.clone(), r.clone());
            OnDrop::new(move || role.release(&r))
        }
        _ => OnDrop::none(),
    };
    if !matches!(plan, Plan::Local) && n_prompts != 1 {
        return Err(ApiError::bad(
            "kv_transfer_params needs exactly one prompt",
            Some("prompt"),
        ));
    }
    if matches!(plan, Plan::Produce | Plan::Save) && common.stream {
        return Err(ApiError::bad(
            "do_remote_decode needs stream=false (the response carries kv_transfer_params)",
            Some("stream"),
        ));
    }
    Ok((plan, release))
}

/// `id` with 64 random bits appended.
fn unguessable(id: String) -> Result<String, ApiError> {
    let nonce =
        splitserve_kv::auth::random_bytes(8).map_err(|e| ApiError::Internal(e.to_string()))?;
    let nonce: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{id}-{nonce}"))
}

/// The response, streamed or whole.
async fn answer(
    engine: &Engine,
    spec: Spec,
    jobs: Vec<PromptJob>,
    events: impl futures_util::Stream<Item = generation::Out> + Send + Unpin + 'static,
    stream: bool,
) -> Result<Response, ApiError> {
    if stream {
        Ok(generation::stream_sse(engine.clone(), spec, jobs, events).into_response())
    } else {
        let v = generation::collect(engine, &spec, &jobs, events).await?;
        Ok(Json(v).into_response())
    }
}

/// The producer's answer: the first token and the `kv_transfer_params` a consumer pulls
/// the held KV with.
async fn produced(
    state: &AppState,
    id: &str,
    spec: &Spec,
    jobs: &[PromptJob],
    events: impl futures_util::Stream<Item = generation::Out> + Send + Unpin + 'static,
    return_token_ids: bool,
) -> Result<Response, ApiError> {
    let engine = &state.0.engine;
    // If the caller goes away before the answer is built, nobody will pull this KV.
    let engine_id = generation::engine_id(id, 0);
    let abort = {
        let (engine, engine_id) = (engine.clone(), engine_id.clone());
        OnDrop::new(move || {
            tracing::info!(id = %engine_id, "producer's caller went away; releasing the request's KV");
            engine.abort(&engine_id);
        })
    };
    let mut v = generation::collect(engine, spec, jobs, events).await?;
    let first: Vec<u32> = v["choices"][0]["token_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|t| t as u32))
                .collect()
        })
        .unwrap_or_default();
    if !return_token_ids {
        if let Some(c) = v["choices"][0].as_object_mut() {
            c.remove("token_ids");
            c.remove("prompt_token_ids");
        }
    }
    if let Some(role) = state.0.pd.clone() {
        // A store connector waits here for its saves to reach the store.
        let eid = engine_id.clone();
        v["kv_transfer_params"] =
            tokio::task::spawn_blocking(move || role.request_finished(&eid, &first))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| ApiError::Internal(e.to_string()))?;
    }
    abort.disarm();
    Ok(Json::<Value>(v).into_response())
}
