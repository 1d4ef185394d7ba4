//! `splitserve bench kv`: KV transfer throughput of the TCP connector against a raw loopback
//! TCP copy of the same number of bytes, measured in the same run.
//!
//! A producer engine prefills a prompt and holds its KV; a consumer engine's `TcpConnector`
//! loads it (handshake, frames written from the producer's blocks and read straight into
//! the consumer's) — the path a disaggregated request takes. The time is the connector's,
//! from connect to the last layer in the blocks. The raw copy is one `write_all` of a buffer
//! of that size on one side and `read_exact` on the other.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use splitserve_engine::{
    Engine, EngineConfig, Event, KvTransfer, Model, RemoteKv, Request, SamplingParams,
};
use splitserve_kv::{Fingerprint, LoadReport, TcpConnector};

#[derive(clap::Args)]
pub struct BenchKvArgs {
    /// GGUF file or model name (default: smollm2-135m, fetched)
    #[arg(long, value_name = "PATH")]
    pub(crate) model: Option<PathBuf>,
    /// Prompt tokens whose KV is moved
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub(crate) prompt_len: usize,
    /// Transfers measured (median reported)
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub(crate) reps: usize,
    /// KV cache type: f16, f32 or q8_0
    #[arg(long, value_name = "TYPE", default_value = "f16")]
    pub(crate) kv_cache_dtype: splitserve_engine::KvDtype,
    /// Write the results here as JSON
    #[arg(long, value_name = "PATH")]
    pub(crate) json: Option<PathBuf>,
    /// Connector to measure (docs/connectors.md)
    #[arg(long, value_name = "NAME", default_value = "TcpConnector")]
    pub(crate) connector: String,
    /// Example: its folder (default: a temporary one)
    #[arg(long, value_name = "DIR")]
    pub(crate) shared_storage_path: Option<PathBuf>,
    /// RedisStore: the server
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    pub(crate) remote_url: String,
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) fn raw_copy(bytes: usize) -> Result<Duration> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    // Both buffers are allocated and touched before the clock starts; the clock starts when
    // the sender is ready (its one-byte signal), not at connect.
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let buf = vec![7u8; bytes];
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        s.write_all(&[1])?;
        let mut go = [0u8; 1];
        s.read_exact(&mut go)?;
        s.write_all(&buf)
    });
    let mut buf = vec![1u8; bytes];
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut ready = [0u8; 1];
    s.read_exact(&mut ready)?;
    let t0 = Instant::now();
    s.write_all(&[1])?;
    s.read_exact(&mut buf)?;
    let t = t0.elapsed();
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok(t)
}

/// The model of `--model` (or the default) and its file's sha256.
pub(crate) fn load_model(a: &BenchKvArgs) -> Result<(Arc<Model>, String)> {
    let path = crate::model_path(&a.model)?;
    let model =
        Arc::new(Model::load(&path).with_context(|| format!("loading {}", path.display()))?);
    let sha = splitserve_engine::model_file::sha256_file(&path, false)?;
    Ok((model, sha))
}

pub fn run(a: BenchKvArgs) -> Result<()> {
    anyhow::ensure!(a.reps >= 1, "--reps must be at least 1");
    if a.connector == "NixlConnector" {
        #[cfg(not(feature = "nixl"))]
        anyhow::bail!("this build has no NixlConnector: build with --features splitserve/nixl");
        #[cfg(feature = "nixl")]
        return crate::bench_kv_pair::run(&a);
    }
    if a.connector != "TcpConnector" {
        return crate::bench_kv_store::run(&a);
    }
    let (model, sha) = load_model(&a)?;
    let cfg = EngineConfig {
        kv_dtype: a.kv_cache_dtype,
        max_model_len: Some(a.prompt_len + 16),
        // Each rep prefills the same prompt: the producer computes it every time.
        enable_prefix_caching: false,
        ..EngineConfig::default()
    };
    let engine = Engine::start(model.clone(), cfg.clone(), None)?;
    let fp = Fingerprint::new(&sha, &model.config, &engine.kv_layout());
    let (report_tx, report_rx) = std::sync::mpsc::channel::<LoadReport>();
    let report_tx = std::sync::Mutex::new(report_tx);
    let observer: splitserve_kv::connector::LoadObserver = Arc::new(move |r: &LoadReport| {
        if let Ok(tx) = report_tx.lock() {
            let _ = tx.send(r.clone());
        }
    });
    let secret = splitserve_kv::Secret::random()?;
    let connector = Arc::new(TcpConnector::new(
        fp.clone(),
        secret.clone(),
        None,
        Some(observer),
    ));
    let consumer = Engine::start_with(model.clone(), cfg, None, Some(connector))?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let grants = Arc::new(splitserve_kv::Grants::new(secret, l.local_addr()?));
    let side = splitserve_kv::tcp::SideChannel {
        engine: engine.clone(),
        fingerprint: fp.clone(),
        grants: grants.clone(),
        on_sent: None,
        tls: Default::default(),
        #[cfg(feature = "nixl")]
        nixl: None,
    };
    std::thread::spawn(move || side.serve(l));
    let vocab = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..a.prompt_len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % vocab)
        .collect();
    let (mut pull_ms, mut raw_ms) = (Vec::new(), Vec::new());
    let mut bytes = 0usize;
    for rep in 0..a.reps + 1 {
        let id = format!("bench-kv-{rep}");
        let mut rx = engine.submit(Request {
            id: id.clone(),
            prompt: prompt.clone(),
            params: SamplingParams::greedy(1),
            return_logits: false,
            kv: KvTransfer::Hold,
            cache_salt: None,

            resumed: 0,
        })?;
        while let Some(ev) = rx.blocking_recv() {
            if let Event::Finished(f) = ev {
                anyhow::ensure!(f.error.is_none(), "prefill failed: {:?}", f.error);
                break;
            }
        }
        let params = grants.issue(&id, Duration::from_secs(60))?;
        let params = splitserve_kv::KvTransferParams::parse(Some(&params))?
            .context("a grant is an object")?;
        let remote = RemoteKv::new(splitserve_kv::RemoteAddr::verify(&params, grants.secret())?);
        let mut rx = consumer.submit(Request {
            id: id.clone(),
            prompt: prompt.clone(),
            params: SamplingParams::greedy(1),
            return_logits: false,
            kv: KvTransfer::Remote(remote),
            cache_salt: None,

            resumed: 0,
        })?;
        while let Some(ev) = rx.blocking_recv() {
            if let Event::Finished(f) = ev {
                anyhow::ensure!(f.error.is_none(), "load failed: {:?}", f.error);
                break;
            }
        }
        let r = report_rx.recv_timeout(Duration::from_secs(60))?;
        anyhow::ensure!(r.error.is_none(), "load failed: {:?}", r.error);
        let t = r.took;
        bytes = r.bytes as usize;
        let raw = raw_copy(bytes)?;
        // The first round warms the page cache and the allocator; it is not counted.
        if rep > 0 {
            pull_ms.push(t.as_secs_f64() * 1e3);
            raw_ms.push(raw.as_secs_f64() * 1e3);
        }
    }
    let (p, r) = (median(&mut pull_ms), median(&mut raw_ms));
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let (pg, rg) = (gib / (p / 1e3), gib / (r / 1e3));
    println!(
        "KV of a {}-token prompt: {:.1} MiB ({} layers, {})",
        a.prompt_len,
        bytes as f64 / (1 << 20) as f64,
        model.config.n_layer,
        a.kv_cache_dtype
    );
    let layout = engine.kv_layout();
    if layout.window.is_some() {
        let blocks = a.prompt_len.div_ceil(layout.block_size);
        let kept = layout.layer_blocks(0, a.prompt_len, 0, blocks).len();
        println!(
            "  {} of its layers see a window: they send {kept} of the {blocks} blocks ({:.1} MiB with every block)",
            layout.n_windowed(),
            (blocks * layout.block_bytes()) as f64 / (1 << 20) as f64
        );
    }
    println!("| path | median ms | GiB/s |");
    println!("|---|---|---|");
    println!(
        "| TcpConnector load (handshake, frames, into the consumer's blocks) | {p:.1} | {pg:.2} |"
    );
    println!("| raw loopback TCP copy, same bytes | {r:.1} | {rg:.2} |");
    println!(
        "load / raw throughput: {:.2}x (median of {} reps)",
        pg / rg,
        a.reps
    );
    if let Some(j) = &a.json {
        let v = serde_json::json!({
            "prompt_len": a.prompt_len, "bytes": bytes, "reps": a.reps,
            "pull_ms": pull_ms, "raw_ms": raw_ms,
            "pull_gib_s": pg, "raw_gib_s": rg, "ratio": pg / rg,
        });
        std::fs::write(j, serde_json::to_string_pretty(&v)?)?;
        println!("wrote {}", j.display());
    }
    Ok(())
}
