//! `bench soak` as a user runs it, shortened: 30 s of mixed load through a real pair with
//! client aborts and the prefill instance killed and restarted. Outside the restart windows
//! every request succeeds or was abandoned by its client; nothing hangs; every KV block of
//! both instances is free at the end.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

#[test]
fn a_short_soak_ends_with_every_block_back_and_nothing_hung() {
    let base = free_port_range(5);
    let out = std::env::temp_dir().join(format!("splitserve-soak-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args(["bench", "soak", "--minutes", "0.5", "--kill-every-s", "12"])
        .args(["--concurrency", "3", "--abort-fraction", "0.3"])
        .args(["--hold-timeout-s", "5", "--model", &model()])
        .args(["--base-port", &base.to_string()])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("running bench soak");
    assert!(status.success(), "bench soak failed: {status}");
    let text = std::fs::read_to_string(out.join("soak.json")).expect("soak.json");
    let r: Value = serde_json::from_str(&text).expect("soak.json is JSON");
    let _ = std::fs::remove_dir_all(&out);
    assert_eq!(r["hung"], 0, "{text}");
    assert_eq!(r["leaked_blocks"], 0, "{text}");
    let steady = r["outcomes"].as_object().expect("outcomes");
    for (kind, n) in steady {
        assert!(
            kind == "ok" || kind == "aborted_by_client",
            "{n} requests ended {kind} outside a restart: {text}"
        );
    }
    assert!(steady["ok"].as_u64().unwrap_or(0) > 0, "{text}");
    assert!(
        steady.get("aborted_by_client").is_some(),
        "no client aborted: {text}"
    );
    let restarts = r["restarts"].as_array().expect("restarts");
    assert!(!restarts.is_empty(), "{text}");
    assert!(restarts.iter().all(|x| x["instance"] == "prefill"));
}
