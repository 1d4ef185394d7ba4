//! SIGTERM (what `kill`, process managers and `bench pd` send) stops `serve` and `up`
//! cleanly: exit status 0, and every port they held is free again, `up`'s instances' too.
//! An instance of `up` that dies is restarted while the others keep serving.
#![cfg(unix)]

mod common;

use std::net::TcpStream;
use std::time::Duration;

use common::{free_port_range, post, ready, serve, up_at};

fn assert_free(ports: &[u16]) {
    for &port in ports {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still taken after exit"
        );
    }
}

#[tokio::test]
async fn sigterm_stops_serve() {
    let s = serve(&[], None);
    ready(&s).await;
    let st = s.terminate();
    assert!(st.success(), "serve exited with {st}");
    assert_free(&[s.port]);
}

#[tokio::test]
async fn sigterm_stops_up_and_its_instances() {
    let base = free_port_range(24);
    let up = up_at(base, &[]);
    ready(&up).await;
    let st = up.terminate();
    assert!(st.success(), "up exited with {st}");
    // Instances, side channel, the proxy's admin port (base + 20) and the instances'.
    assert_free(&[
        up.port,
        base,
        base + 1,
        base + 10,
        base + 20,
        base + 21,
        base + 22,
    ]);
}

/// Pids of `pid`'s children, whichever of its threads started them (Linux procfs).
fn children_of(pid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        kids.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    kids
}

#[tokio::test]
async fn up_restarts_a_dead_instance_and_keeps_serving() {
    let base = free_port_range(24);
    let up = up_at(base, &[]);
    ready(&up).await;
    let kids = children_of(up.pid().expect("pid"));
    assert_eq!(kids.len(), 2, "a prefill and a decode instance: {kids:?}");
    let prefill = kids
        .iter()
        .copied()
        .find(|&k| {
            std::fs::read(format!("/proc/{k}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("kv_producer"))
                .unwrap_or(false)
        })
        .expect("the prefill instance");
    // SAFETY: a child of our child, alive (listed a moment ago).
    assert_eq!(unsafe { libc::kill(prefill as i32, libc::SIGKILL) }, 0);
    // The decode instance keeps serving while the prefill instance is down and restarting.
    let decode = format!("http://127.0.0.1:{}", base + 1);
    let (st, v) = post(
        &format!("{decode}/v1/completions"),
        &serde_json::json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    // The prefill instance comes back (a new process), and up never stopped.
    let t0 = std::time::Instant::now();
    loop {
        up.check_alive();
        let kids = children_of(up.pid().expect("pid"));
        let back = kids.len() == 2 && !kids.contains(&prefill);
        if back && TcpStream::connect(("127.0.0.1", base)).is_ok() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the prefill instance was not restarted: {kids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, v) = post(
        &format!("{}/v1/completions", up.url()),
        &serde_json::json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(st, 200, "through the proxy again: {v}");
    let st = up.terminate();
    assert!(st.success(), "up exited with {st}");
}
