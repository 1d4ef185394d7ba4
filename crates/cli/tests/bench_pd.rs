//! `splitserve bench pd --quick` against the real arms with tiny settings: the report has
//! both arms, every request completed, and the table and plots are written.

mod common;

use serde_json::Value;

/// Runs `splitserve bench pd ARGS` on a free range of ports, into `out`.
fn bench_pd(args: &[&str], out: &std::path::Path) {
    // `bench pd` takes ports up to about 40 above its base.
    let base = common::free_port_range(48);
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_splitserve"))
        .args(["bench", "pd"])
        .args(args)
        .args([
            "--base-port",
            &base.to_string(),
            "--model",
            &common::model(),
        ])
        .arg("--out")
        .arg(out)
        .env("RUST_LOG", "warn")
        .status()
        .expect("run bench pd");
    assert!(st.success());
    // Its arms, and the instances an arm starts, are gone: every port is free again (the
    // next run would otherwise fail to bind).
    for port in base..base + 48 {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still taken after bench pd returned"
        );
    }
}

/// `out/name`, parsed.
fn read_json(out: &std::path::Path, name: &str) -> Value {
    let text = std::fs::read_to_string(out.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// `--runs 2` alternates the arms round by round and adds each arm's median and range.
#[test]
fn bench_pd_runs_alternate_the_arms_and_summarize() {
    let out = std::env::temp_dir().join(format!("splitserve-bench-runs-{}", std::process::id()));
    bench_pd(
        &[
            "--quick",
            "--runs",
            "2",
            "--streams",
            "1",
            "--stream-tokens",
            "4",
            "--big-prompt-tokens",
            "32",
            "--big-prompts",
            "1",
        ],
        &out,
    );
    let v = read_json(&out, "pd.json");
    assert_eq!(v["settings"]["runs"], 2);
    let order: Vec<(String, u64)> = v["arms"]
        .as_array()
        .expect("arms")
        .iter()
        .map(|a| {
            assert_eq!(a["failed"], 0, "{}", a["arm"]);
            (
                a["arm"].as_str().unwrap_or("").to_string(),
                a["run"].as_u64().unwrap_or(9),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = [
        (0, "colocated"),
        (0, "disaggregated"),
        (1, "colocated"),
        (1, "disaggregated"),
    ]
    .iter()
    .map(|(r, a)| (a.to_string(), *r))
    .collect();
    assert_eq!(order, want);
    let md = std::fs::read_to_string(out.join("pd.md")).expect("pd.md");
    for row in [
        "| colocated, round 2 |",
        "| colocated | 2 |",
        "| disaggregated | 2 |",
    ] {
        assert!(md.contains(row), "{row} missing from:\n{md}");
    }
    assert!(md.contains("(medians over the rounds)"), "{md}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bench_pd_quick_runs_both_arms_and_writes_its_report() {
    let out = std::env::temp_dir().join(format!("splitserve-bench-pd-{}", std::process::id()));
    bench_pd(
        &[
            "--quick",
            "--streams",
            "2",
            "--stream-tokens",
            "8",
            "--big-prompt-tokens",
            "64",
            "--big-prompts",
            "2",
            "--big-interval-s",
            "1",
        ],
        &out,
    );
    let v = read_json(&out, "pd.json");
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
            for p in ["p50", "p90", "p99", "p99_9", "max"] {
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

#[test]
fn bench_pd_sweep_offers_every_rate_to_both_arms() {
    let out = std::env::temp_dir().join(format!("splitserve-sweep-{}", std::process::id()));
    bench_pd(
        &[
            "--quick",
            "--sweep",
            "1,4",
            "--sweep-prompts",
            "4",
            "--sweep-input-len",
            "24",
            "--sweep-output-len",
            "6",
        ],
        &out,
    );
    let v = read_json(&out, "sweep.json");
    assert_eq!(v["settings"]["rates"], serde_json::json!([1.0, 4.0]));
    let arms = v["arms"].as_array().expect("arms");
    let names: Vec<&str> = arms.iter().filter_map(|a| a["arm"].as_str()).collect();
    assert_eq!(names, ["colocated", "disaggregated"]);
    for a in arms {
        let points = a["points"].as_array().expect("points");
        assert_eq!(points.len(), 2);
        for (p, rate) in points.iter().zip([1.0, 4.0]) {
            assert_eq!(p["rate"], rate);
            assert_eq!(p["completed"], 4, "{p}");
            assert_eq!(p["failed"], 0, "{p}");
            let share = p["slo_attainment"].as_f64().expect("share");
            assert!((0.0..=1.0).contains(&share));
            // Goodput counts whole requests: share × completed / duration.
            let dur = p["duration_s"].as_f64().expect("duration");
            let gp = p["goodput"].as_f64().expect("goodput");
            assert!((gp - share * 4.0 / dur).abs() < 1e-9, "{p}");
        }
        assert!(a["max_rate_90pct"].as_f64().is_some());
    }
    let svg = std::fs::read_to_string(out.join("goodput.svg")).expect("plot");
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    let md = std::fs::read_to_string(out.join("sweep.md")).expect("md");
    assert!(md.contains("| disaggregated | 4 |"), "{md}");
    let _ = std::fs::remove_dir_all(&out);
}
