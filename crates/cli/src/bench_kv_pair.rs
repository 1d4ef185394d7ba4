//! `bench kv --connector NixlConnector`: one prompt's KV loaded between two processes on
//! this host, NixlConnector (with its default threads, and with the loading thread alone)
//! beside TcpConnector (each a producer and a consumer `serve`, the pairs alternating rep by
//! rep), beside a raw loopback TCP copy of the same bytes and beside the copy a one-host
//! NIXL read comes down to (`process_vm_readv` between buffers on 2 MiB pages).
//! A load's time is the consumer's own `kv_transfer_seconds` (handshake to last byte).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use splitserve_engine::PageMapping;

use crate::bench_kv::BenchKvArgs;

/// The first of `n` consecutive loopback ports that are free now.
fn free_ports(n: u16) -> Result<u16> {
    for start in (20_000..60_000).step_by(97) {
        if (start..start + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return Ok(start);
        }
    }
    anyhow::bail!("no {n} consecutive free loopback ports")
}

pub fn run(a: &BenchKvArgs) -> Result<()> {
    let model = crate::model_path(&a.model)?;
    let secret = crate::hosts::pair_secret()?;
    let exe = std::env::current_exe()?;
    let max_len = (a.prompt_len + 8).to_string();
    let dtype = a.kv_cache_dtype.to_string();
    let base = free_ports(12)?;
    let serve = |port: u16,
                 role: &str,
                 (connector, threads): (&str, Option<usize>),
                 side: u16|
     -> Result<crate::child::Kill> {
        let mut extra = json!({"side_channel_port": side, "secret_env": "SPLITSERVE_KV_SECRET"});
        if let Some(t) = threads {
            extra["num_threads"] = json!(t);
        }
        let kv = json!({"kv_connector": connector, "kv_role": role,
                        "kv_connector_extra_config": extra});
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["serve", "--model", &model.display().to_string()])
            .args(["--port", &port.to_string(), "--threads", "1"])
            .args(["--max-model-len", &max_len, "--kv-cache-dtype", &dtype])
            // Every request loads its whole prompt.
            .arg("--no-enable-prefix-caching")
            .args(["--kv-transfer-config", &kv.to_string()])
            .env("SPLITSERVE_KV_SECRET", &secret);
        crate::child::spawn_quiet(cmd).with_context(|| format!("starting a {connector} {role}"))
    };
    // Each with its label: TcpConnector, NixlConnector as configured by default, and
    // NixlConnector with the loading thread copying alone.
    let connectors = [
        (("TcpConnector", None), "TcpConnector"),
        (
            ("NixlConnector", None),
            "NixlConnector (default: num_threads 4)",
        ),
        (("NixlConnector", Some(0)), "NixlConnector, num_threads 0"),
    ];
    let mut pairs = Vec::new();
    for (i, (c, _)) in connectors.iter().enumerate() {
        let p = base + 4 * i as u16;
        let producer = serve(p, "kv_producer", *c, p + 2)?;
        let consumer = serve(p + 1, "kv_consumer", *c, p + 3)?;
        pairs.push((
            format!("http://127.0.0.1:{p}"),
            format!("http://127.0.0.1:{}", p + 1),
            producer,
            consumer,
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    rt.block_on(async {
        for (p, d, pc, dc) in &mut pairs {
            crate::child::wait_ready(&client, p, pc).await?;
            crate::child::wait_ready(&client, d, dc).await?;
        }
        anyhow::Ok(())
    })?;
    let post = |url: String, body: Value| crate::child::post_json(&client, url, body);
    let client = &client;
    let metrics = |url: String| async move { crate::child::metrics(client, &url).await };
    // Token ids every model's vocabulary has.
    let vocab = 32_000u32;
    let mut took = vec![Vec::new(); pairs.len()];
    let mut raw = Vec::new();
    let mut bytes = 0.0;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cma: Option<Cma> = None;
    let mut cma_ms = Vec::new();
    for rep in 0..a.reps + 1 {
        for (k, (p, d, ..)) in pairs.iter().enumerate() {
            let prompt: Vec<u32> = (0..a.prompt_len as u32)
                .map(|i| ((i ^ (rep as u32 * 7919)).wrapping_mul(2_654_435_761) >> 7) % vocab)
                .collect();
            let v = rt.block_on(post(
                format!("{p}/v1/completions"),
                json!({"prompt": prompt, "max_tokens": 1, "temperature": 0,
                       "kv_transfer_params": {"do_remote_decode": true}}),
            ))?;
            let params = v["kv_transfer_params"].clone();
            let before = rt.block_on(metrics(d.clone()))?;
            rt.block_on(post(
                format!("{d}/v1/completions"),
                json!({"prompt": prompt, "max_tokens": 1, "temperature": 0,
                       "kv_transfer_params": params}),
            ))?;
            let after = rt.block_on(metrics(d.clone()))?;
            let delta = |name: &str| {
                crate::child::counter(&after, name) - crate::child::counter(&before, name)
            };
            ensure!(
                delta("kv_transfer_seconds_count") == 1.0,
                "{}: {} KV transfers for one request",
                connectors[k].1,
                delta("kv_transfer_seconds_count")
            );
            bytes = delta("kv_transfer_bytes_received_total");
            // The first round sets up connections and registrations; it is not counted.
            if rep > 0 {
                took[k].push(delta("kv_transfer_seconds_sum") * 1e3);
            }
        }
        let r = crate::bench_kv::raw_copy(bytes as usize)?;
        let c = match &cma {
            Some(c) => c,
            None => cma.insert(Cma::new(bytes as usize, threads)),
        }
        .copy(bytes as usize)?;
        if rep > 0 {
            raw.push(r.as_secs_f64() * 1e3);
            cma_ms.push(c.as_secs_f64() * 1e3);
        }
    }
    let gib = bytes / (1u64 << 30) as f64;
    println!(
        "KV of a {}-token prompt: {:.1} MiB, loaded between two processes on this host",
        a.prompt_len,
        bytes / (1 << 20) as f64
    );
    println!("| path | median ms | GiB/s |");
    println!("|---|---|---|");
    let mut rates = Vec::new();
    for ((_, c), t) in connectors.iter().zip(took.iter_mut()) {
        let ms = crate::bench_kv::median(t);
        rates.push(gib / (ms / 1e3));
        println!(
            "| {c} load (handshake to last byte) | {ms:.1} | {:.2} |",
            gib / (ms / 1e3)
        );
    }
    let rms = crate::bench_kv::median(&mut raw);
    let rg = gib / (rms / 1e3);
    println!("| raw loopback TCP copy, same bytes | {rms:.1} | {rg:.2} |");
    let cms = crate::bench_kv::median(&mut cma_ms);
    let cg = gib / (cms / 1e3);
    println!(
        "| process_vm_readv copy, same bytes, {threads} threads (one host's ceiling) | {cms:.1} | {cg:.2} |"
    );
    println!(
        "NixlConnector / TcpConnector: {:.2}x; NixlConnector / raw copy: {:.2}x; with num_threads 0: {:.2}x and {:.2}x (median of {} reps)",
        rates[1] / rates[0],
        rates[1] / rg,
        rates[2] / rates[0],
        rates[2] / rg,
        a.reps
    );
    println!(
        "NixlConnector / process_vm_readv ceiling: {:.2}x",
        rates[1] / cg
    );
    if let Some(j) = &a.json {
        let v = json!({"prompt_len": a.prompt_len, "bytes": bytes, "reps": a.reps,
                       "tcp_ms": took[0], "nixl_ms": took[1], "nixl_one_thread_ms": took[2],
                       "raw_ms": raw, "tcp_gib_s": rates[0], "nixl_gib_s": rates[1],
                       "nixl_one_thread_gib_s": rates[2], "raw_gib_s": rg,
                       "cma_ms": cma_ms, "cma_gib_s": cg, "cma_threads": threads});
        std::fs::write(j, serde_json::to_string_pretty(&v)?)?;
        println!("wrote {}", j.display());
    }
    Ok(())
}

/// What a one-host NIXL read comes down to: UCX's CMA transport copies with
/// `process_vm_readv` in 512 KiB calls, between pools on 2 MiB pages. Here both buffers are
/// this process's (the kernel takes the same path), touched once and then left to go cold
/// between reps, as a pool's blocks do between prefill and load; `threads` threads share
/// the calls.
struct Cma {
    src: PageMapping,
    dst: PageMapping,
    threads: usize,
}

impl Cma {
    fn new(bytes: usize, threads: usize) -> Self {
        let (src, dst) = (PageMapping::new(bytes), PageMapping::new(bytes));
        // SAFETY: both mappings are at least `bytes` long, writable, and ours alone.
        unsafe {
            std::ptr::write_bytes(src.as_ptr(), 7, bytes);
            std::ptr::write_bytes(dst.as_ptr(), 1, bytes);
        }
        Self { src, dst, threads }
    }

    fn copy(&self, bytes: usize) -> Result<Duration> {
        ensure!(
            bytes <= self.src.len(),
            "{bytes} bytes in a {}-byte buffer",
            self.src.len()
        );
        const SEG: usize = 512 << 10;
        let segs = bytes.div_ceil(SEG);
        let (src, dst) = (self.src.as_ptr() as usize, self.dst.as_ptr() as usize);
        let (pid, threads) = (std::process::id() as libc::pid_t, self.threads);
        let t0 = std::time::Instant::now();
        std::thread::scope(|s| {
            let parts: Vec<_> = (0..threads)
                .map(|k| {
                    s.spawn(move || -> std::io::Result<()> {
                        for i in (k..segs).step_by(threads) {
                            let (off, n) = (i * SEG, SEG.min(bytes - i * SEG));
                            let local = libc::iovec {
                                iov_base: (dst + off) as *mut libc::c_void,
                                iov_len: n,
                            };
                            let remote = libc::iovec {
                                iov_base: (src + off) as *mut libc::c_void,
                                iov_len: n,
                            };
                            // SAFETY: both ranges lie inside live mappings of this process;
                            // the threads write disjoint parts of `dst`.
                            let got =
                                unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
                            if got != n as isize {
                                return Err(std::io::Error::last_os_error());
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for p in parts {
                p.join()
                    .map_err(|_| anyhow::anyhow!("a copying thread panicked"))?
                    .context("process_vm_readv")?;
            }
            anyhow::Ok(())
        })?;
        Ok(t0.elapsed())
    }
}
