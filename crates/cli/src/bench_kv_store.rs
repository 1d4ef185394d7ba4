//! `splitserve bench kv --connector <store>`: a store connector's save and load throughput
//! on one prompt's blocks, beside its physical reference measured in the same run on the
//! same bytes: plain file writes and reads in the same directory (ExampleConnector),
//! memcpy (OffloadingConnector), plain SET and GET (RedisStoreConnector).
//!
//! Two engines share the connector: the first computes a prompt and the connector saves
//! its blocks (the writer thread's time per block: checksum and store); the second is
//! given the same prompt and loads them (reads, checks, copies into its blocks). Each
//! repetition uses a fresh prompt, so neither engine's own prefix cache answers.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use splitserve_engine::{Engine, EngineConfig, Event, KvTransfer, Request, SamplingParams};
use splitserve_kv::role::{Hooks, Setup};
use splitserve_kv::storage::StoreEvent;
use splitserve_kv::{Fingerprint, KvTransferConfig};

use crate::bench_kv::{median, BenchKvArgs};

/// Per repetition: bytes and writer time of the saves, bytes and time of the load.
#[derive(Default)]
struct Seen {
    saved: Vec<(u64, Duration)>,
    loaded: Vec<(u64, Duration)>,
}

/// The reference: writes then reads `n` values of `size` bytes the plain way; their times.
/// What is read lands in memory as large as all of it (touched beforehand), as a load lands
/// in the engine's pool: a buffer reused per value would stay in cache and measure less.
fn reference(
    a: &BenchKvArgs,
    dir: &std::path::Path,
    n: usize,
    size: usize,
) -> Result<(Duration, Duration)> {
    let data: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; size]).collect();
    let mut back: Vec<Vec<u8>> = (0..n).map(|_| vec![1u8; size]).collect();
    match a.connector.as_str() {
        "OffloadingConnector" => {
            let mut dst: Vec<Vec<u8>> = (0..n).map(|_| vec![1u8; size]).collect();
            let t0 = Instant::now();
            for (d, s) in dst.iter_mut().zip(&data) {
                d.copy_from_slice(s);
            }
            let w = t0.elapsed();
            let t0 = Instant::now();
            for (b, d) in back.iter_mut().zip(&dst) {
                b.copy_from_slice(d);
            }
            std::hint::black_box(&back);
            Ok((w, t0.elapsed()))
        }
        "RedisStoreConnector" => {
            let client = redis::Client::open(a.remote_url.as_str())?;
            let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
            let t0 = Instant::now();
            for (i, d) in data.iter().enumerate() {
                redis::cmd("SET")
                    .arg(format!("bench:ref:{i}"))
                    .arg(d)
                    .query::<()>(&mut c)?;
            }
            let w = t0.elapsed();
            let t0 = Instant::now();
            for i in 0..n {
                let v: Vec<u8> = redis::cmd("GET")
                    .arg(format!("bench:ref:{i}"))
                    .query(&mut c)?;
                std::hint::black_box(v);
            }
            let r = t0.elapsed();
            for i in 0..n {
                redis::cmd("DEL")
                    .arg(format!("bench:ref:{i}"))
                    .query::<()>(&mut c)?;
            }
            Ok((w, r))
        }
        _ => {
            let t0 = Instant::now();
            for (i, d) in data.iter().enumerate() {
                std::fs::write(dir.join(format!("ref-{i}")), d)?;
            }
            let w = t0.elapsed();
            let t0 = Instant::now();
            for (i, b) in back.iter_mut().enumerate() {
                std::fs::File::open(dir.join(format!("ref-{i}")))?.read_exact(b)?;
            }
            std::hint::black_box(&back);
            let r = t0.elapsed();
            for i in 0..n {
                std::fs::remove_file(dir.join(format!("ref-{i}")))?;
            }
            Ok((w, r))
        }
    }
}

fn wait(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>) -> Result<()> {
    while let Some(ev) = rx.blocking_recv() {
        if let Event::Finished(f) = ev {
            anyhow::ensure!(f.error.is_none(), "request failed: {:?}", f.error);
            return Ok(());
        }
    }
    anyhow::bail!("the engine stopped")
}

pub fn run(a: &BenchKvArgs) -> Result<()> {
    let (model, sha) = crate::bench_kv::load_model(a)?;
    let cfg = EngineConfig {
        kv_dtype: a.kv_cache_dtype,
        max_model_len: Some(a.prompt_len + 16),
        // Room for two prompts: later repetitions reuse (evict) blocks earlier ones
        // touched, as a pool in service does, instead of faulting in fresh pages.
        num_blocks: 2 * (a.prompt_len / 16 + 2),
        ..EngineConfig::default()
    };
    let layout =
        splitserve_engine::KvLayout::for_model(&model.config, cfg.block_size, cfg.kv_dtype);
    let fp = Fingerprint::new(&sha, &model.config, &layout);
    let tmp = std::env::temp_dir().join(format!("splitserve-bench-kv-{}", std::process::id()));
    let dir = a.shared_storage_path.clone().unwrap_or_else(|| tmp.clone());
    std::fs::create_dir_all(&dir)?;
    let extra = match a.connector.as_str() {
        "ExampleConnector" | "SharedStorageConnector" => {
            serde_json::json!({"shared_storage_path": dir})
        }
        "OffloadingConnector" => serde_json::json!({"cpu_bytes_to_use": 1u64 << 30}),
        "RedisStoreConnector" => serde_json::json!({"remote_url": a.remote_url}),
        other => anyhow::bail!("--connector {other}: TcpConnector, ExampleConnector, OffloadingConnector or RedisStoreConnector"),
    };
    let config = KvTransferConfig::parse(
        &serde_json::json!({"kv_connector": a.connector, "kv_role": "kv_both",
                            "kv_connector_extra_config": extra})
        .to_string(),
    )?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s2 = seen.clone();
    let hooks = Hooks {
        on_store_event: Some(Arc::new(move |_, e| {
            let mut s = s2.lock().unwrap_or_else(|p| p.into_inner());
            match e {
                StoreEvent::Saved { bytes, took } => s.saved.push((bytes, took)),
                StoreEvent::Loaded { bytes, took, .. } => s.loaded.push((bytes, took)),
                StoreEvent::Miss { reason } => tracing::warn!(reason, "store miss"),
            }
        })),
        ..Hooks::default()
    };
    let role = splitserve_kv::role::build(
        Setup {
            config,
            fingerprint: fp.clone(),
            secret: splitserve_kv::Secret::random()?,
            tls: Default::default(),
            engine_id: "bench-kv".into(),
            listener: None,
        },
        hooks,
    )?;
    let conn = role.engine_connector().context("a store connector")?;
    let cfg = EngineConfig {
        prefix_cache_identity: serde_json::to_string(&fp)?,
        ..cfg
    };
    let producer = Engine::start_with(model.clone(), cfg.clone(), None, Some(conn.clone()))?;
    let consumer = Engine::start_with(model.clone(), cfg, None, Some(conn))?;
    let vocab = model.config.vocab_size as u32;
    let (mut save_gib, mut load_gib, mut ref_w, mut ref_r) = (vec![], vec![], vec![], vec![]);
    let mut total = 0u64;
    for rep in 0..a.reps + 1 {
        let prompt: Vec<u32> = (0..a.prompt_len as u32)
            .map(|i| ((i ^ (rep as u32 * 7919)).wrapping_mul(2_654_435_761) >> 7) % vocab)
            .collect();
        let request = |id: String| Request {
            id,
            prompt: prompt.clone(),
            params: SamplingParams::greedy(1),
            return_logits: false,
            kv: KvTransfer::None,
            cache_salt: None,
            resumed: 0,
        };
        *seen.lock().unwrap_or_else(|p| p.into_inner()) = Seen::default();
        wait(&mut producer.submit(request(format!("save-{rep}")))?)?;
        // Waits until the saves are stored.
        role.request_finished(&format!("save-{rep}"), &[])?;
        wait(&mut consumer.submit(request(format!("load-{rep}")))?)?;
        let s = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
        anyhow::ensure!(
            !s.saved.is_empty() && !s.loaded.is_empty(),
            "nothing was saved or loaded"
        );
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let saved: u64 = s.saved.iter().map(|x| x.0).sum();
        let save_t: f64 = s.saved.iter().map(|x| x.1.as_secs_f64()).sum();
        let loaded: u64 = s.loaded.iter().map(|x| x.0).sum();
        let load_t: f64 = s.loaded.iter().map(|x| x.1.as_secs_f64()).sum();
        let size = (saved / s.saved.len() as u64) as usize;
        let (w, r) = reference(a, &dir, s.saved.len(), size)?;
        // The first round warms caches and allocators; it is not counted.
        if rep > 0 {
            save_gib.push(gib(saved) / save_t);
            load_gib.push(gib(loaded) / load_t);
            ref_w.push(gib(saved) / w.as_secs_f64());
            ref_r.push(gib(saved) / r.as_secs_f64());
            total = loaded;
        }
    }
    if a.shared_storage_path.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let (sg, lg, rw, rr) = (
        median(&mut save_gib),
        median(&mut load_gib),
        median(&mut ref_w),
        median(&mut ref_r),
    );
    println!(
        "{}: KV of a {}-token prompt, {:.1} MiB loaded per rep (median of {} reps)",
        a.connector,
        a.prompt_len,
        total as f64 / (1 << 20) as f64,
        a.reps
    );
    println!("| path | save GiB/s | load GiB/s |");
    println!("|---|---|---|");
    println!("| {} | {sg:.2} | {lg:.2} |", a.connector);
    println!("| reference, same bytes | {rw:.2} | {rr:.2} |");
    println!(
        "save / reference: {:.2}x; load / reference: {:.2}x",
        sg / rw,
        lg / rr
    );
    if let Some(j) = &a.json {
        let v = serde_json::json!({
            "connector": a.connector, "prompt_len": a.prompt_len, "reps": a.reps,
            "save_gib_s": sg, "load_gib_s": lg, "ref_write_gib_s": rw, "ref_read_gib_s": rr,
            "save_ratio": sg / rw, "load_ratio": lg / rr,
        });
        std::fs::write(j, serde_json::to_string_pretty(&v)?)?;
        println!("wrote {}", j.display());
    }
    Ok(())
}
