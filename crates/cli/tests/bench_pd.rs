//! `splitserve bench pd --quick` against the real arms with tiny settings: the report has
//! both arms, every request completed, and the table and plots are written.

mod common;

use serde_json::Value;

#[test]
fn bench_pd_quick_runs_both_arms_and_writes_its_report() {
    let out = std::env::temp_dir().join(format!("splitserve-bench-pd-{}", std::process::id()));
    let base = common::free_port().saturating_sub(40).max(20000);
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args([
            "bench",
            "pd",
            "--quick",
            "--streams",
            "2",
            "--stream-tokens",
            "8",
        ])
        .args([
            "--big-prompt-tokens",
            "64",
            "--big-prompts",
            "2",
            "--big-interval-s",
            "1",
        ])
        .args([
            "--base-port",
            &base.to_string(),
            "--model",
            &common::model(),
        ])
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .status()
        .expect("run bench pd");
    assert!(st.success());
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("pd.json")).expect("pd.json"))
            .expect("json");
    assert_eq!(v["settings"]["streams"], 2);
    assert_eq!(v["settings"]["big_prompts"], 2);
    let arms = v["arms"].as_array().expect("arms");
    let names: Vec<&str> = arms.iter().filter_map(|a| a["arm"].as_str()).collect();
    assert_eq!(names, ["colocated", "disaggregated"]);
    for a in arms {
        assert_eq!(a["failed"], 0, "{}", a["arm"]);
        assert_eq!(a["big_requests"], 2);
        let streams = a["stream_requests"].as_u64().expect("stream count");
        assert!(streams >= 2);
        assert_eq!(a["completed"].as_u64(), Some(streams + 2));
        for k in ["decode_itl_ms", "stream_ttft_ms", "big_ttft_ms"] {
            for p in ["p50", "p90", "p99", "max"] {
                assert!(
                    a[k][p].as_f64().is_some_and(|x| x > 0.0),
                    "{k}.{p}: {}",
                    a[k]
                );
            }
        }
        // Every stream request produced its 8 tokens: 7 gaps each.
        let gaps = a["decode_itl_ms"]["count"].as_u64().expect("count");
        assert_eq!(gaps, streams * 7);
    }
    let md = std::fs::read_to_string(out.join("pd.md")).expect("pd.md");
    assert!(
        md.contains("| colocated |") && md.contains("| disaggregated |"),
        "{md}"
    );
    for f in ["itl_cdf.svg", "itl_timeline.svg"] {
        let svg = std::fs::read_to_string(out.join(f)).expect("plot");
        assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{f}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
