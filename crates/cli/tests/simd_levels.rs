//! Engines on CPUs with different instruction sets must agree: the same greedy run with the
//! portable kernels, AVX2 and (where present) AVX-512 VNNI prints the same text.

use std::process::Command;

fn run(level: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args([
            "generate",
            "--prompt",
            "def fibonacci(n):",
            "--max-tokens",
            "48",
            "--threads",
            "2",
        ])
        .env("SPLITSERVE_SIMD", level)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run splitserve generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Drop the closing stats line (timings differ run to run).
    let body = text
        .trim_end()
        .rsplit_once('\n')
        .map(|(b, _)| b.to_string())
        .unwrap_or_default();
    assert!(text.contains("output tokens: 48"), "{text}");
    body
}

#[test]
fn portable_avx2_and_best_level_generate_the_same_text() {
    let portable = run("portable");
    assert!(!portable.trim().is_empty());
    assert_eq!(run("avx2"), portable);
    assert_eq!(run(""), portable);
}
