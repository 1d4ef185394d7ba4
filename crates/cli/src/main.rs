//! `splitserve`: the one binary. Subcommands wire the layers together; errors end here.

mod bench_engine;
mod bench_kv;
#[cfg(feature = "nixl")]
mod bench_kv_pair;
mod bench_kv_store;
mod bench_link;
mod bench_pd;
mod bench_prefix;
mod bench_router;
mod bench_soak;
mod child;
mod drain;
mod econ;
mod generate;
mod hosts;
mod proxy;
mod serve;
mod up;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "splitserve",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SPLITSERVE_COMMIT"), ")"),
    about = "Disaggregated prefill/decode LLM serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download a named model (default: smollm2-135m) into the cache and verify it.
    FetchModel(FetchModelArgs),
    /// Generate text for one prompt, streamed to stdout.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API (colocated, or one role of a pair).
    Serve(Box<serve::ServeArgs>),
    /// xPyD proxy: one OpenAI-compatible front over prefill and decode instances.
    Proxy(proxy::ProxyArgs),
    /// Drain a decode instance behind a proxy: out of rotation, its requests migrate away.
    Drain(drain::DrainArgs),
    /// Start prefill and decode instances and the proxy on loopback, all in one command.
    Up(up::UpArgs),
    /// Disaggregation economics: KV freight, link time, does it pay, xPyD sizing.
    Econ(splitserve_econ::EconArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Engine alone: prefill tok/s, and decode tok/s per batch size and thread count.
    Engine(bench_engine::BenchEngineArgs),
    /// Load an OpenAI-compatible server: TTFT, ITL, E2E percentiles, goodput.
    Serve(splitserve_bench::load::ServeBenchArgs),
    /// KV transfer throughput of a connector beside a plain copy of the same bytes.
    Kv(bench_kv::BenchKvArgs),
    /// The interference experiment: colocated vs disaggregated, same threads and load.
    Pd(Box<bench_pd::BenchPdArgs>),
    /// Soak a pair: mixed load, aborts, kills and restarts; RSS, leaks, outcomes.
    Soak(bench_soak::BenchSoakArgs),
    /// Prefix caching on vs off in one run: a shared-prefix or multi-turn workload, TTFT.
    Prefix(bench_prefix::BenchPrefixArgs),
    /// The proxy's decode policies side by side on one skewed workload through `up`.
    Router(bench_router::BenchRouterArgs),
    /// KV transfer between hosts over shaped links, beside econ's prediction (root).
    Link(bench_link::BenchLinkArgs),
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM (what `kill`, process managers and `bench pd`
/// send): both mean shut down cleanly, as in vLLM's server.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch for SIGTERM; Ctrl-C only"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Binds `host:port` for an HTTP front; the error names `what` and the address.
pub(crate) async fn listen(host: &str, port: u16, what: &str) -> Result<tokio::net::TcpListener> {
    let addr = format!("{host}:{port}");
    tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {what} {addr}"))
}

/// Binds an admin listener on `host:port` and serves `routes` on it until shutdown.
pub(crate) async fn spawn_admin(
    host: &str,
    port: u16,
    routes: axum::Router,
    what: &str,
) -> Result<()> {
    // Off loopback, the admin endpoints (migrate, drain, import) need their own token.
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    let routes = if loopback {
        routes
    } else {
        let token = splitserve_server::http::admin_token().with_context(|| {
                format!("the admin listener {host}:{port} is not on loopback: set SPLITSERVE_ADMIN_TOKEN to the token its clients must send (Authorization: Bearer)")
            })?;
        routes.layer(axum::middleware::from_fn_with_state(
            token,
            splitserve_server::http::require_api_key,
        ))
    };
    let l = listen(host, port, "the admin listener").await?;
    tracing::info!(addr = %l.local_addr()?, "{what} enabled");
    tokio::spawn(async move {
        if let Err(e) = splitserve_server::http::serve_router(
            l,
            routes,
            splitserve_server::http::DEFAULT_HEADER_READ_TIMEOUT,
            shutdown_signal(),
        )
        .await
        {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    Ok(())
}

#[derive(clap::Args, Debug)]
struct FetchModelArgs {
    /// Model to fetch: smollm2-135m or gemma3-270m
    #[arg(default_value = "smollm2-135m", value_name = "NAME")]
    name: String,
}

/// The model path given (a GGUF file, or a preset's name: fetched on first use), or the
/// default model.
pub(crate) fn model_path(given: &Option<PathBuf>) -> Result<PathBuf> {
    use splitserve_engine::model_file;
    match given {
        Some(p) if p.exists() => Ok(p.clone()),
        Some(p) => match p.to_str().and_then(model_file::preset) {
            Some(preset) => Ok(model_file::model(preset, true)?),
            None => Ok(p.clone()),
        },
        None => Ok(model_file::default_model(true)?),
    }
}

fn bench_serve(a: splitserve_bench::load::ServeBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(splitserve_bench::load::run(&a, serde_json::Value::Null))?;
    print!("{}", report.table());
    if let Some(p) = &a.result_json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in files or pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::FetchModel(a) => {
            use splitserve_engine::model_file;
            let preset = model_file::preset(&a.name).with_context(|| {
                format!(
                    "no model named {:?} (known: {})",
                    a.name,
                    model_file::preset_names()
                )
            })?;
            let path = model_file::model(preset, true)?;
            let sha = model_file::sha256_file(&path, true)?;
            anyhow::ensure!(
                sha == preset.sha256,
                "{}: sha256 {sha} does not match; delete it and fetch again",
                path.display()
            );
            println!("{}", path.display());
            Ok(())
        }
        Command::Generate(a) => generate::run(a),
        Command::Serve(a) => serve::run(*a),
        Command::Proxy(a) => proxy::proxy(a),
        Command::Up(a) => up::up(a),
        Command::Drain(a) => drain::drain(a),
        Command::Econ(a) => econ::run(a),
        Command::Bench(BenchCommand::Engine(a)) => bench_engine::run(a),
        Command::Bench(BenchCommand::Serve(a)) => bench_serve(a),
        Command::Bench(BenchCommand::Kv(a)) => bench_kv::run(a),
        Command::Bench(BenchCommand::Pd(a)) => bench_pd::run(*a),
        Command::Bench(BenchCommand::Soak(a)) => bench_soak::run(a),
        Command::Bench(BenchCommand::Prefix(a)) => bench_prefix::run(a),
        Command::Bench(BenchCommand::Router(a)) => bench_router::run(a),
        Command::Bench(BenchCommand::Link(a)) => bench_link::run(&a),
    }
}
