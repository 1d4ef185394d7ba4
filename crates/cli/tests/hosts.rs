//! A pair across hosts: a prefill, a decode and a router host in network namespaces joined
//! by a shaped link (`deploy/netns/hosts.sh`), each role bound to its host's address. The
//! answer through the router equals one engine's, token for token; the KV crossed the
//! shaped link (no faster than its rate); everything is torn down, also on failure.
//!
//! Needs root (and a kernel that lets it make namespaces); says so and skips otherwise.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/netns/hosts.sh");

/// The namespaces; `down` on drop, panicking or not.
struct Hosts(String);

impl Hosts {
    /// `None` (and why, on stderr) where this machine cannot make them.
    fn up(name: &str, rate: &str) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: network namespaces need root");
            return None;
        }
        let out = Command::new(SCRIPT)
            .args(["up", name, rate])
            .output()
            .expect("run hosts.sh");
        if !out.status.success() {
            eprintln!(
                "skipped: cannot make network namespaces here: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Some(Self(name.to_string()))
    }

    fn addr(&self, role: &str) -> String {
        let out = Command::new(SCRIPT)
            .args(["addr", &self.0, role])
            .output()
            .expect("hosts.sh addr");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.0)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT).args(["down", &self.0]).status();
    }
}

fn namespaces() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip")
            .stdout,
    )
    .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_across_a_shaped_link_answers_like_one_engine() {
    let name = format!("t{}", std::process::id() % 100_000);
    let Some(hosts) = Hosts::up(&name, "1gbit") else {
        return;
    };
    let (p_addr, d_addr, r_addr) = (
        hosts.addr("prefill"),
        hosts.addr("decode"),
        hosts.addr("router"),
    );
    // Off loopback the pair needs a shared secret.
    let env = [("SPLITSERVE_KV_SECRET", "a-test-secret-of-32-bytes-123456")];
    let kv = |role: &str, addr: &str| {
        json!({"kv_connector": "TcpConnector", "kv_role": role,
               "kv_connector_extra_config": {"side_channel_host": addr, "side_channel_port": 5600,
                                             "secret_env": "SPLITSERVE_KV_SECRET"}})
        .to_string()
    };
    let serve = |role: &str, addr: &str, extra: &[&str]| {
        let mut args: Vec<String> = [
            "serve",
            "--model",
            &model(),
            "--threads",
            "1",
            "--host",
            addr,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["--kv-transfer-config".to_string(), kv(role, addr)]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let ns = if role == "kv_producer" {
            "prefill"
        } else {
            "decode"
        };
        spawn_on(Some(&hosts.ns(ns)), addr, 8000, &args, &env)
    };
    let p = serve("kv_producer", &p_addr, &[]);
    let d = serve("kv_consumer", &d_addr, &["--no-enable-prefix-caching"]);
    ready(&p).await;
    ready(&d).await;
    let proxy_args: Vec<String> = [
        "proxy",
        "--host",
        &r_addr,
        "--prefill",
        &p.url(),
        "--decode",
        &d.url(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let router = spawn_on(Some(&hosts.ns("router")), &r_addr, 8000, &proxy_args, &[]);
    ready(&router).await;

    let prompt: String = (0..40)
        .map(|i| format!("Host {i} of the namespace test sends its cache over a shaped link."))
        .collect::<Vec<_>>()
        .join(" ");
    let body =
        json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, "return_token_ids": true});
    // One engine alone (the producer, asked plainly) is the reference.
    let (st, alone) = post(&format!("{}/v1/completions", p.url()), &body).await;
    assert_eq!(st, 200, "{alone}");
    let (st, split) = post(&format!("{}/v1/completions", router.url()), &body).await;
    assert_eq!(st, 200, "{split}");
    assert_eq!(
        split["choices"][0]["token_ids"],
        alone["choices"][0]["token_ids"]
    );
    assert_eq!(split["choices"][0]["text"], alone["choices"][0]["text"]);

    // The KV crossed the link: all of the prompt's blocks, no faster than 1 Gbit/s.
    let bytes = metric(&d, "kv_transfer_bytes_received_total").await;
    let secs = metric(&d, "kv_transfer_seconds_sum").await;
    let n = alone["usage"]["prompt_tokens"].as_f64().expect("usage");
    let per_token = 30.0 * 2.0 * 3.0 * 64.0 * 2.0;
    assert_eq!(bytes, (n / 16.0).ceil() * 16.0 * per_token);
    assert!(
        secs >= bytes * 8.0 / 1e9 * 0.9,
        "{bytes} B in {secs} s: faster than the link"
    );
    all_free(&p, Duration::from_secs(10)).await;
    all_free(&d, Duration::from_secs(10)).await;

    drop((router, d, p));
    drop(hosts);
    assert!(
        !namespaces().contains(&format!("{name}-")),
        "{}",
        namespaces()
    );
}
