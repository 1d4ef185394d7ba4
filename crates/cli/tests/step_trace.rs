//! `RUST_LOG=splitserve::step=trace` logs every engine step with its wall and CPU time, in
//! plain text when stderr is not a terminal.

#![cfg(target_os = "linux")]

mod common;

/// The `key=value` fields of one log line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

#[test]
fn every_step_is_traced_with_its_cpu_time() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args(["generate", "--model", &common::model(), "--threads", "1"])
        .args(["--max-tokens", "6", "--prompt", "The capital of France is"])
        .env("RUST_LOG", "splitserve::step=trace")
        .output()
        .expect("run");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains('\u{1b}'),
        "escape codes in a piped log: {err}"
    );
    let steps: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("splitserve::step"))
        .collect();
    // One step prefills the 5-token prompt and samples the first token; five decode.
    let tokens: Vec<(u64, u64)> = steps
        .iter()
        .map(|l| {
            let n = |k| field(l, k).unwrap_or_else(|| panic!("{k} in {l}"));
            (n("prefill_tokens"), n("decode_tokens"))
        })
        .collect();
    assert_eq!(tokens, [(5, 0), (0, 1), (0, 1), (0, 1), (0, 1), (0, 1)]);
    for l in &steps {
        let (wall, cpu) = (field(l, "wall_us"), field(l, "cpu_us"));
        let (Some(wall), Some(cpu)) = (wall, cpu) else {
            panic!("wall_us and cpu_us in {l}")
        };
        // One thread does the whole step; CPU time cannot exceed the wall time it ran in
        // (give the two clocks' granularity a millisecond).
        assert!(cpu > 0 && cpu <= wall + 1000, "{l}");
    }
}
