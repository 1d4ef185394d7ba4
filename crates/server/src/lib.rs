//! splitserve's OpenAI-compatible HTTP server: the engine behind `/v1/completions`,
//! `/v1/chat/completions` (streaming and not), `/v1/models`, `/health`, `/metrics`,
//! `/tokenize` and `/detokenize`.

mod admin;
mod error;
mod generation;
pub mod http;
mod metrics;
mod openai;
mod request;
mod roles;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use splitserve_engine::{ChatMessage, Engine, EngineConfig, Model};
use splitserve_kv::role::KvRoleConnector;
use splitserve_kv::Fingerprint;

pub use admin::admin_router;
pub use error::{error_body, ApiError};
pub use metrics::Metrics;
pub use splitserve_kv::role::Setup as PdSetup;

use generation::{Kind, PromptJob};
use openai::{ChatRequest, CompletionRequest, ContentInput, PromptInput};

struct Inner {
    engine: Engine,
    metrics: Arc<Metrics>,
    model_name: String,
    /// The KV connector of this server's role in a pair.
    pd: Option<Arc<dyn KvRoleConnector>>,
    /// Set by a drain: new requests are refused, live ones migrate away.
    draining: AtomicBool,
    /// What a migration's peer must match (set when admin endpoints are on).
    fingerprint: OnceLock<Fingerprint>,
    /// Admin base URLs a migration or a drain may send requests to (`--migrate-targets`).
    migrate_targets: OnceLock<Vec<String>>,
    /// `--api-key` and the header-read timeout (set once, before serving).
    http: OnceLock<HttpOptions>,
    client: reqwest::Client,
}

/// Shared state of one server: its engine, metrics and served model name.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    /// Starts an engine for `model` with metrics wired to its steps.
    pub fn start(
        model: Arc<Model>,
        cfg: EngineConfig,
        model_name: String,
    ) -> Result<Self, splitserve_engine::EngineError> {
        Self::start_pd(model, cfg, model_name, None)
    }

    /// Starts an engine that plays a part in a disaggregated pair (`pd`) or none; a
    /// producer serves its held KV from here on.
    pub fn start_pd(
        model: Arc<Model>,
        cfg: EngineConfig,
        model_name: String,
        pd: Option<PdSetup>,
    ) -> Result<Self, splitserve_engine::EngineError> {
        let metrics = Arc::new(Metrics::new());
        let m = metrics.clone();
        let internal = splitserve_engine::EngineError::Internal;
        let pd = pd
            .map(|s| splitserve_kv::role::build(s, roles::hooks(&metrics)))
            .transpose()
            .map_err(|e| internal(e.to_string()))?;
        let connector = pd.as_ref().and_then(|p| p.engine_connector());
        let engine = Engine::start_with(
            model,
            cfg,
            Some(Arc::new(move |s| m.observe_step(s))),
            connector,
        )?;
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| splitserve_engine::EngineError::Internal(e.to_string()))?;
        if let Some(p) = pd.as_ref().filter(|p| p.config().kv_role.produces()) {
            p.start(&engine).map_err(|e| internal(e.to_string()))?;
        }
        Ok(Self(Arc::new(Inner {
            engine,
            metrics,
            model_name,
            pd,
            draining: AtomicBool::new(false),
            fingerprint: OnceLock::new(),
            migrate_targets: OnceLock::new(),
            http: OnceLock::new(),
            client,
        })))
    }

    /// The admin base URLs this server may migrate requests to; set once, before serving.
    /// Without it every target is refused: an admin client must not make this server post
    /// a request's state to an address of its choosing.
    pub fn set_migrate_targets(&self, targets: Vec<String>) {
        let targets = targets
            .iter()
            .map(|t| t.trim_end_matches('/').to_string())
            .collect();
        let _ = self.0.migrate_targets.set(targets);
    }

    /// The fingerprint migrations carry and check (docs/design.md); set once, before serving.
    pub fn set_fingerprint(&self, fp: Fingerprint) {
        let _ = self.0.fingerprint.set(fp);
    }

    /// The API key clients must present and the header-read timeout; set once, before
    /// serving (defaults: no key, [`http::DEFAULT_HEADER_READ_TIMEOUT`]).
    pub fn set_http_options(&self, o: HttpOptions) {
        let _ = self.0.http.set(o);
    }

    fn http_options(&self) -> HttpOptions {
        self.0.http.get().cloned().unwrap_or_default()
    }

    fn fingerprint(&self) -> Option<&Fingerprint> {
        self.0
            .fingerprint
            .get()
            .or_else(|| self.0.pd.as_ref().map(|p| p.fingerprint()))
    }

    /// The KV connector of this server's role, if it has one.
    pub fn kv_role(&self) -> Option<&Arc<dyn KvRoleConnector>> {
        self.0.pd.as_ref()
    }

    pub fn engine(&self) -> &Engine {
        &self.0.engine
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }
}

/// What the HTTP front enforces besides the API itself.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Clients must send `Authorization: Bearer <key>` (all routes but health and metrics).
    pub api_key: Option<http::ApiKey>,
    pub header_read_timeout: std::time::Duration,
    /// Report prompt-token details (cached tokens) in `usage`.
    pub prompt_tokens_details: bool,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            header_read_timeout: http::DEFAULT_HEADER_READ_TIMEOUT,
            prompt_tokens_details: false,
        }
    }
}

/// All routes of the OpenAI-compatible server.
pub fn router(state: AppState) -> Router {
    let key = state.http_options().api_key;
    let protected = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .with_state(state.clone());
    let open = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    http::with_layers(protected, open, key)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let timeout = state.http_options().header_read_timeout;
    http::serve_router(listener, router(state), timeout, shutdown).await
}

/// Runs tokenizer work off the async workers: a long prompt must not stall `/health` or
/// the token streams of other requests.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
}

/// Roles a chat message may have; anything else is refused, not rendered.
const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

fn check_roles<'a>(roles: impl Iterator<Item = &'a str>) -> Result<(), ApiError> {
    for (i, r) in roles.enumerate() {
        if !ROLES.contains(&r) {
            return Err(ApiError::bad(
                format!(
                    "messages[{i}].role {:?} is not one of {}",
                    r.chars().take(64).collect::<String>(),
                    ROLES.join(", ")
                ),
                Some("messages"),
            ));
        }
    }
    Ok(())
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::bad(format!("{what}: {e}"), None)
    })
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn check_model(state: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != &state.0.model_name => Err(ApiError::ModelNotFound(m.clone())),
        _ => Ok(()),
    }
}

async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (id, hv) = http::request_id(&headers, "cmpl");
    let r = completions_inner(&state, id, body).await;
    http::with_request_id(r.unwrap_or_else(|e| e.into_response()), hv)
}

async fn completions_inner(
    state: &AppState,
    id: String,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(&body)?;
    check_model(state, &req.common.model)?;
    let model = state.0.engine.model().clone();
    let (prompt, echo) = (req.prompt.clone(), req.echo);
    let jobs = blocking(move || {
        let tok = &model.tokenizer;
        let prompts: Vec<Vec<u32>> = match prompt {
            PromptInput::Text(s) => vec![tok
                .encode(&s)
                .map_err(|e| ApiError::bad(e, Some("prompt")))?],
            PromptInput::Texts(v) => v
                .iter()
                .map(|s| tok.encode(s).map_err(|e| ApiError::bad(e, Some("prompt"))))
                .collect::<Result<_, _>>()?,
            PromptInput::Ids(ids) => vec![ids],
            PromptInput::IdLists(v) => v,
        };
        if prompts.is_empty() {
            return Err(ApiError::bad("prompt must not be empty", Some("prompt")));
        }
        let mut jobs = Vec::new();
        for ids in prompts {
            let echo = if echo {
                Some(
                    tok.decode(&ids, false)
                        .map_err(|e| ApiError::bad(e, Some("prompt")))?,
                )
            } else {
                None
            };
            jobs.push(PromptJob { ids, echo });
        }
        Ok(jobs)
    })
    .await?;
    request::run(
        state,
        Kind::Completion,
        id,
        jobs,
        &req.common,
        req.common.max_tokens,
        req.logprobs,
    )
    .await
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (id, hv) = http::request_id(&headers, "chatcmpl");
    let r = chat_inner(&state, id, body).await;
    http::with_request_id(r.unwrap_or_else(|e| e.into_response()), hv)
}

async fn chat_inner(state: &AppState, id: String, body: Bytes) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(&body)?;
    check_model(state, &req.common.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    check_roles(req.messages.iter().map(|m| m.role.as_str()))?;
    let messages: Vec<ChatMessage> = req
        .messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: match &m.content {
                None => String::new(),
                Some(ContentInput::Text(s)) => s.clone(),
                Some(ContentInput::Parts(p)) => p
                    .iter()
                    .filter(|x| x.kind == "text")
                    .filter_map(|x| x.text.clone())
                    .collect::<Vec<_>>()
                    .join(""),
            },
        })
        .collect();
    let model = state.0.engine.model().clone();
    let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
    // Message text never becomes special tokens (no prompt-format injection).
    let ids = blocking(move || {
        model
            .tokenizer
            .encode_chat(&messages, add_generation_prompt)
            .map_err(|e| ApiError::bad(e, Some("messages")))
    })
    .await?;
    let logprobs = if req.logprobs {
        Some(req.top_logprobs.unwrap_or(0))
    } else {
        None
    };
    let max = req.max_completion_tokens.or(req.common.max_tokens);
    request::run(
        state,
        Kind::Chat,
        id,
        vec![PromptJob { ids, echo: None }],
        &req.common,
        max,
        logprobs,
    )
    .await
}

/// Runs a clean-up when dropped, unless disarmed first.
struct OnDrop(Option<Box<dyn FnOnce() + Send>>);

impl OnDrop {
    fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(f)))
    }

    fn none() -> Self {
        Self(None)
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.0.model_name,
            "object": "model",
            "created": now_secs(),
            "owned_by": "splitserve",
            "max_model_len": state.0.engine.max_model_len(),
        }]
    }))
}

async fn health(State(state): State<AppState>) -> Response {
    let s = state.0.engine.stats();
    let (code, status) = if state.0.draining.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else {
        (StatusCode::OK, "ok")
    };
    (code, Json(json!({"status": status, "free_blocks": s.free_blocks, "total_blocks": s.total_blocks, "free_window_slots": s.free_window_slots, "total_window_slots": s.total_window_slots, "held_blocks": s.held_blocks, "running": s.running, "waiting": s.waiting}))).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.0.metrics.render(&state.0.engine),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    #[serde(default = "yes")]
    add_generation_prompt: bool,
}

fn yes() -> bool {
    true
}

async fn tokenize(State(state): State<AppState>, body: Bytes) -> Response {
    let model = state.0.engine.model().clone();
    let max_model_len = state.0.engine.max_model_len();
    let r = blocking(move || -> Result<Value, ApiError> {
        let req: TokenizeRequest = parse(&body)?;
        let tok = &model.tokenizer;
        let ids = match (req.prompt, req.messages) {
            (Some(p), None) => tok.encode(&p),
            (None, Some(m)) => {
                check_roles(m.iter().map(|x| x.role.as_str()))?;
                tok.encode_chat(&m, req.add_generation_prompt)
            }
            _ => {
                return Err(ApiError::bad(
                    "give exactly one of prompt or messages",
                    Some("prompt"),
                ))
            }
        }
        .map_err(|e| ApiError::bad(e, Some("prompt")))?;
        Ok(json!({"count": ids.len(), "max_model_len": max_model_len, "tokens": ids}))
    })
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(State(state): State<AppState>, body: Bytes) -> Response {
    let r = (|| -> Result<Value, ApiError> {
        let req: DetokenizeRequest = parse(&body)?;
        let tok = &state.0.engine.model().tokenizer;
        let vocab = state.0.engine.model().config.vocab_size;
        if let Some(&t) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::bad(
                format!("token id {t} is outside the vocabulary (size {vocab})"),
                Some("tokens"),
            ));
        }
        Ok(
            json!({"prompt": tok.decode(&req.tokens, false).map_err(|e| ApiError::bad(e, Some("tokens")))?}),
        )
    })();
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
