//! `--compute-priority idle`: the engine's kernel threads run under SCHED_IDLE, and the
//! tokens do not change.

mod common;

use splitserve_engine::{ComputePriority, EngineConfig, SamplingParams};

/// Threads of this process in the SCHED_IDLE class (policy 5), from procfs.
fn idle_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("sched")).ok())
        .filter(|s| {
            s.lines()
                .any(|l| l.starts_with("policy") && l.split(':').nth(1).map(str::trim) == Some("5"))
        })
        .count()
}

#[test]
fn idle_compute_threads_give_the_same_tokens() {
    let model = common::real_model();
    let prompts: Vec<Vec<u32>> = (0..3u32)
        .map(|r| {
            (0..24 + 9 * r)
                .map(|i| 200 + (i * 37 + r * 11) % 4000)
                .collect()
        })
        .collect();
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(10)
    };
    let cfg = |p| EngineConfig {
        threads: Some(2),
        compute_priority: p,
        ..EngineConfig::default()
    };
    let (normal, _a) = common::run_all(&model, cfg(ComputePriority::Normal), &prompts, &params);
    let before = idle_threads();
    let (idle, _b) = common::run_all(&model, cfg(ComputePriority::Idle), &prompts, &params);
    if cfg!(target_os = "linux") {
        assert_eq!(
            idle_threads() - before,
            2,
            "both kernel threads under SCHED_IDLE"
        );
    }
    assert_eq!(normal, idle);
    assert_eq!(normal[0].tokens.len(), 10);
}

#[test]
fn priority_names_parse() {
    assert_eq!("IDLE".parse::<ComputePriority>(), Ok(ComputePriority::Idle));
    assert_eq!(
        "normal".parse::<ComputePriority>(),
        Ok(ComputePriority::Normal)
    );
    let e = "fast".parse::<ComputePriority>().unwrap_err();
    assert!(
        e.contains("\"fast\"") && e.contains("normal or idle"),
        "{e}"
    );
    assert_eq!(ComputePriority::Idle.to_string(), "idle");
}
