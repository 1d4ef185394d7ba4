//! `splitserve serve`: the engine behind the OpenAI-compatible HTTP API.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use splitserve_engine::{ComputePriority, CpuList, EngineConfig, KvDtype, KvLayout, Model};
use splitserve_kv::{Fingerprint, KvTransferConfig};
use splitserve_server::{AppState, PdSetup};

/// Engine flags, named as vLLM names them. Each help is one line, so that `--help` fits a
/// screen; docs/flags.md says more where a flag needs it.
#[derive(clap::Args, Clone, Debug)]
pub struct EngineArgs {
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Run weight types the kernels lack as f32 (slow)
    #[arg(long)]
    pub allow_f32_weights: bool,
    /// API model name (default: the file's stem)
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Tokens per KV cache block
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub block_size: usize,
    /// KV cache blocks in the pool
    #[arg(
        long,
        value_name = "N",
        alias = "num-gpu-blocks-override",
        default_value_t = 2048
    )]
    pub num_kv_blocks: usize,
    /// Requests in the running batch at most
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_num_seqs: usize,
    /// Token budget of one step
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Context length (default: the model's)
    #[arg(long, value_name = "N")]
    pub max_model_len: Option<usize>,
    /// Prefill in chunks of the step budget
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", hide_possible_values = true)]
    pub enable_chunked_prefill: bool,
    /// Per-step cap on a long prompt (0: none)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub long_prefill_token_threshold: usize,
    /// Long prompts prefilled at once
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_long_partial_prefills: u64,
    /// KV cache type: f16, f32 or q8_0
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    pub kv_cache_dtype: KvDtype,
    /// Kernel threads (default: all cores)
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Kernel threads: normal or idle
    #[arg(long, value_name = "CLASS", default_value = "normal")]
    pub compute_priority: ComputePriority,
    /// CPUs for the kernel threads, e.g. 0-3,8 (default: any)
    #[arg(long, value_name = "CPUS")]
    pub cpu_bind: Option<CpuList>,
    /// Requests that may wait; more get 503
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_waiting_requests: usize,
    /// Automatic prefix caching (on by default)
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turn automatic prefix caching off
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
}

impl EngineArgs {
    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            block_size: self.block_size,
            num_blocks: self.num_kv_blocks,
            kv_dtype: self.kv_cache_dtype,
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            enable_chunked_prefill: self.enable_chunked_prefill,
            long_prefill_token_threshold: self.long_prefill_token_threshold,
            max_long_partial_prefills: self.max_long_partial_prefills as usize,
            max_model_len: self.max_model_len,
            max_waiting: self.max_waiting_requests,
            threads: self.threads,
            compute_priority: self.compute_priority,
            cpu_bind: self.cpu_bind.clone().unwrap_or_default(),
            enable_prefix_caching: !self.no_enable_prefix_caching,
            ..EngineConfig::default()
        }
    }
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Role in a PD pair, vLLM's JSON (docs/pd.md)
    #[arg(long, value_name = "JSON", value_parser = KvConfigParser)]
    pub kv_transfer_config: Option<KvTransferConfig>,
    /// Port of the admin endpoints (default: off)
    #[arg(long, value_name = "PORT")]
    pub admin_port: Option<u16>,
    /// Address of the admin listener
    #[arg(long, value_name = "HOST", default_value = "127.0.0.1")]
    pub admin_host: String,
    /// Admin URLs that migrate and drain may send to
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    pub migrate_targets: Vec<String>,
    /// Report usage.prompt_tokens_details.cached_tokens
    #[arg(long)]
    pub enable_prompt_tokens_details: bool,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// What the HTTP front enforces besides the API.
#[derive(clap::Args, Clone, Debug)]
pub struct HttpArgs {
    /// Bearer key clients send; env SPLITSERVE_API_KEY
    #[arg(long, value_name = "KEY", env = "SPLITSERVE_API_KEY", hide_env = true)]
    pub api_key: Option<String>,
    /// Seconds a client has to send its headers
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub header_read_timeout_s: f64,
}

impl HttpArgs {
    pub fn api_key(&self) -> Option<splitserve_server::http::ApiKey> {
        if std::env::args().any(|a| a == "--api-key" || a.starts_with("--api-key=")) {
            tracing::warn!("--api-key on the command line is visible to other users (ps); prefer SPLITSERVE_API_KEY");
        }
        self.api_key
            .as_deref()
            .and_then(splitserve_server::http::ApiKey::new)
    }

    pub fn options(&self) -> Result<splitserve_server::HttpOptions> {
        let t = self.header_read_timeout_s;
        anyhow::ensure!(
            t.is_finite() && t > 0.0 && t <= 3600.0,
            "--header-read-timeout-s must be in (0, 3600], got {t}"
        );
        Ok(splitserve_server::HttpOptions {
            api_key: self.api_key(),
            header_read_timeout: std::time::Duration::from_secs_f64(t),
            prompt_tokens_details: false,
        })
    }
}

/// Parses `--kv-transfer-config`; its error names the problem without echoing the value
/// (clap's would, and a mistaken value may hold a credential).
#[derive(Clone)]
struct KvConfigParser;

impl clap::builder::TypedValueParser for KvConfigParser {
    type Value = KvTransferConfig;

    fn parse_ref(
        &self,
        _: &clap::Command,
        _: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<KvTransferConfig, clap::Error> {
        let invalid = |why: String| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{why}\n"))
        };
        let s = value
            .to_str()
            .ok_or_else(|| invalid("--kv-transfer-config: not UTF-8".into()))?;
        KvTransferConfig::parse(s).map_err(|e| invalid(e.to_string()))
    }
}

/// What a peer's KV must match: the model file's hash and the KV layout.
fn fingerprint(path: &std::path::Path, model: &Model, cfg: &EngineConfig) -> Result<Fingerprint> {
    let sha = splitserve_engine::model_file::sha256_file(path, false)
        .with_context(|| format!("hashing {}", path.display()))?;
    let layout = KvLayout::for_model(&model.config, cfg.block_size, cfg.kv_dtype);
    Ok(Fingerprint::new(&sha, &model.config, &layout))
}

/// The role's setup: fingerprint (hashing the model file), the pair's secret and, for a
/// producer, the bound side channel.
fn pd_setup(
    kv: &KvTransferConfig,
    path: &std::path::Path,
    model: &Model,
    cfg: &EngineConfig,
    http_port: u16,
) -> Result<PdSetup> {
    let fingerprint = fingerprint(path, model, cfg)?;
    let secret = kv.secret(&splitserve_engine::model_file::cache_dir())?;
    let listener = if kv.serves_side_channel() {
        let x = &kv.tcp().kv_connector_extra_config;
        let addr = format!("{}:{}", x.side_channel_host, x.side_channel_port);
        let l = std::net::TcpListener::bind(&addr)
            .with_context(|| format!("binding the KV side channel {addr}"))?;
        Some(l)
    } else {
        None
    };
    let engine_id = kv
        .engine_id
        .clone()
        .unwrap_or_else(|| format!("splitserve-{}-{http_port}", std::process::id()));
    Ok(PdSetup {
        config: kv.clone(),
        fingerprint,
        secret,
        tls: kv.tls()?,
        engine_id,
        listener,
    })
}

pub fn run(a: ServeArgs) -> Result<()> {
    if let Some(t) = a.engine.threads {
        // candle's matmul reads this; set before any worker thread exists.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let path = crate::model_path(&a.engine.model)?;
    let opts = splitserve_engine::LoadOptions {
        allow_f32_weights: a.engine.allow_f32_weights,
    };
    let model = Arc::new(
        Model::load_with(&path, opts).with_context(|| format!("loading {}", path.display()))?,
    );
    let name = a.engine.served_model_name.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let mut cfg = a.engine.engine_config();
    let pd = match &a.kv_transfer_config {
        Some(kv) => {
            anyhow::ensure!(
                !(kv.is_store() || kv.children.iter().any(|c| c.is_store()))
                    || cfg.enable_prefix_caching,
                "{} finds stored KV by prefix-cache hashes: drop --no-enable-prefix-caching",
                kv.kv_connector
            );
            cfg.kv_hold_timeout = kv.hold_timeout();
            cfg.kv_load_failure_policy = kv.kv_load_failure_policy;
            Some(pd_setup(kv, &path, &model, &cfg, a.port)?)
        }
        None => None,
    };
    let admin_fp = match (&a.admin_port, &pd) {
        (Some(_), None) => Some(fingerprint(&path, &model, &cfg)?),
        _ => None,
    };
    if let Some(fp) = pd.as_ref().map(|p| &p.fingerprint).or(admin_fp.as_ref()) {
        // Block hashes that may meet another process's are rooted in the file's hash.
        cfg.prefix_cache_identity = serde_json::to_string(fp)?;
    }
    let mut http = a.http.options()?;
    http.prompt_tokens_details = a.enable_prompt_tokens_details;
    let state = AppState::start_pd(model, cfg.clone(), name.clone(), pd)?;
    state.set_http_options(http);
    state.set_migrate_targets(a.migrate_targets.clone());
    if let Some(fp) = admin_fp {
        state.set_fingerprint(fp);
    }
    if let Some(role) = state.kv_role() {
        let c = role.config();
        tracing::info!(
            side_channel = ?role.side_channel(),
            "{}: registered as {}",
            c.kv_connector,
            c.kv_role.as_str()
        );
    }
    // HTTP work is light (tokenizing runs on blocking threads); two I/O threads, so that
    // one busy connection cannot stall the others.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = crate::listen(&a.host, a.port, "the API listener").await?;
        tracing::info!(
            model = %name,
            addr = %listener.local_addr()?,
            block_size = cfg.block_size,
            num_kv_blocks = cfg.num_blocks,
            max_model_len = state.engine().max_model_len(),
            "serving OpenAI-compatible API"
        );
        if let Some(port) = a.admin_port {
            let routes = splitserve_server::admin_router(state.clone());
            crate::spawn_admin(
                &a.admin_host,
                port,
                routes,
                "admin endpoints (migrate, drain)",
            )
            .await?;
        }
        splitserve_server::serve(listener, state, crate::shutdown_signal()).await?;
        Ok(())
    })
}
