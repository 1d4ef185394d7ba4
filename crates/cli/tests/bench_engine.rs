//! `splitserve bench engine` measures decode at the depth of context asked for, and its
//! JSON says so.

mod common;

#[test]
fn decode_is_measured_at_the_context_asked_for() {
    let json = std::env::temp_dir().join(format!(
        "splitserve-bench-engine-{}.json",
        std::process::id()
    ));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args(["bench", "engine", "--model", &common::model()])
        .args(["--threads", "1", "--batch", "1,2", "--reps", "1"])
        .args([
            "--prompt-len",
            "16",
            "--decode-context",
            "100",
            "--decode-tokens",
            "16",
        ])
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "warn,splitserve::step=trace")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("json");
    let _ = std::fs::remove_file(&json);
    let row = &v[0];
    assert_eq!(row["threads"], 1);
    assert_eq!(row["decode_context"], 100);
    // One rate per batch size, each from pure decode steps.
    let decode = row["decode"].as_array().expect("decode");
    assert_eq!(decode.len(), 2);
    for (d, b) in decode.iter().zip([1, 2]) {
        assert_eq!(d[0], b);
        assert!(d[1].as_f64().is_some_and(|x| x > 0.0), "{d}");
    }
    // 16 tokens per stream: the first comes from the prefill step, 15 decode steps follow,
    // so both batch sizes report first- and last-eighth step times.
    assert_eq!(row["decode_step_ms"].as_array().map(Vec::len), Some(2));

    // Every prompt token the engine computed: the 16-token prefill prompt, then the decode
    // streams' prompts of 100 (b=1) and 100 + 101 (b=2) tokens.
    let err = String::from_utf8_lossy(&out.stderr);
    let prefilled: u64 = err
        .lines()
        .filter(|l| l.contains("splitserve::step"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("prefill_tokens="))?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert_eq!(prefilled, 16 + 100 + 201, "{err}");

    // A depth of 0 is refused before any work.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args(["bench", "engine", "--decode-context", "0"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--decode-context"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
