//! `up --cpu-bind` gives each instance's kernel threads their own CPUs, and bad bindings
//! are startup errors that name the problem. Linux only: it reads threads from procfs.

#![cfg(target_os = "linux")]

mod common;

use common::{model, post, ready, up};
use serde_json::json;
use splitserve_engine::CpuList;

/// Allowed-CPU lists of the SCHED_IDLE threads (policy 5) of process `pid`.
fn idle_thread_cpus(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    let mut out: Vec<String> = tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let sched = std::fs::read_to_string(dir.join("sched")).ok()?;
            let idle = sched.lines().any(|l| {
                l.starts_with("policy") && l.split(':').nth(1).map(str::trim) == Some("5")
            });
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
                .trim()
                .to_string();
            idle.then_some(cpus)
        })
        .collect();
    out.sort();
    out
}

/// The child of `parent` whose command line contains `needle`.
fn child_with(parent: u32, needle: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The parent pid is the second field after the parenthesised command name.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (ppid == parent && String::from_utf8_lossy(&cmd).contains(needle)).then_some(pid)
    })
}

#[tokio::test]
async fn up_gives_prefill_and_decode_their_own_cpus() {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let allowed: CpuList = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("allowed CPUs")
        .trim()
        .parse()
        .expect("CPU list");
    let [a, b, ..] = allowed.0[..] else {
        eprintln!("skipped: one CPU");
        return;
    };
    let bind = format!("{a},{b}");
    let pair = up(&[
        "--cpu-bind",
        &bind,
        "--serve-args",
        "--compute-priority idle",
    ]);
    ready(&pair).await;
    let (code, v) = post(
        &format!("{}/v1/completions", pair.url()),
        &json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let up = pair.pid().expect("up runs");
    let producer = child_with(up, "kv_producer").expect("prefill instance");
    let consumer = child_with(up, "kv_consumer").expect("decode instance");
    assert_eq!(idle_thread_cpus(producer), vec![a.to_string()]);
    assert_eq!(idle_thread_cpus(consumer), vec![b.to_string()]);
}

#[test]
fn bad_cpu_bindings_are_startup_errors() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
            .args(args)
            .output()
            .expect("run");
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let m = model();
    let e = run(&["up", "--model", &m, "--cpu-bind", "0", "--port", "1"]);
    assert!(
        e.contains("--cpu-bind lists 1 CPUs; the 2 instances have 2 threads, one CPU each"),
        "{e}"
    );
    let e = run(&["serve", "--model", &m, "--cpu-bind", "2-1"]);
    assert!(e.contains("CPU range \"2-1\" runs backwards"), "{e}");
    let e = run(&["serve", "--model", &m, "--cpu-bind", "1023", "--port", "1"]);
    assert!(
        e.contains("invalid engine setting cpu_bind: CPU 1023 is not one this process may use"),
        "{e}"
    );
}
