//! `--compute-priority idle` and `--cpu-bind`: the engine's kernel threads run under
//! SCHED_IDLE on the CPUs asked for, and the tokens do not change.

mod common;

use splitserve_engine::{ComputePriority, CpuList, EngineConfig, EngineError, SamplingParams};

/// (scheduling policy, allowed CPUs) of every thread of this process, from procfs.
fn threads() -> Vec<(u32, String)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return vec![];
    };
    let field = |text: &str, key: &str, sep: char| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(sep).nth(1))
            .map(|v| v.trim().to_string())
    };
    tasks
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let sched = std::fs::read_to_string(dir.join("sched")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            Some((
                field(&sched, "policy", ':')?.parse().ok()?,
                field(&status, "Cpus_allowed_list", ':')?,
            ))
        })
        .collect()
}

/// SCHED_IDLE in the kernel's numbering.
const SCHED_IDLE: u32 = 5;

#[test]
fn idle_bound_compute_threads_give_the_same_tokens() {
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
    // The first CPU this process may use, as the kernel writes a one-CPU list.
    let cpu = threads().first().map(|t| t.1.clone());
    let first: usize = cpu
        .as_deref()
        .and_then(|c| c.split([',', '-']).next())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let normal_cfg = EngineConfig {
        threads: Some(2),
        ..EngineConfig::default()
    };
    let (normal, _a) = common::run_all(&model, normal_cfg.clone(), &prompts, &params);
    let idle_cfg = EngineConfig {
        compute_priority: ComputePriority::Idle,
        cpu_bind: CpuList(vec![first]),
        ..normal_cfg
    };
    let (idle, _b) = common::run_all(&model, idle_cfg, &prompts, &params);
    if cfg!(target_os = "linux") {
        let placed = threads()
            .iter()
            .filter(|(policy, cpus)| *policy == SCHED_IDLE && *cpus == first.to_string())
            .count();
        assert_eq!(placed, 2, "both kernel threads idle-class on CPU {first}");
    }
    assert_eq!(normal, idle);
    assert_eq!(normal[0].tokens.len(), 10);
}

#[cfg(target_os = "linux")]
#[test]
fn a_cpu_the_process_may_not_use_is_refused() {
    let model = common::real_model();
    let cfg = EngineConfig {
        cpu_bind: CpuList(vec![1023]),
        ..EngineConfig::default()
    };
    match splitserve_engine::Engine::start(model, cfg, None) {
        Err(EngineError::BadConfig { setting, reason }) => {
            assert_eq!(setting, "cpu_bind");
            assert!(
                reason.starts_with("CPU 1023 is not one this process may use"),
                "{reason}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("CPU 1023 accepted"),
    }
}

#[test]
fn cpu_lists_and_priorities_parse() {
    let list = |s: &str| s.parse::<CpuList>();
    assert_eq!(list("0-3,8"), Ok(CpuList(vec![0, 1, 2, 3, 8])));
    assert_eq!(list(" 5 "), Ok(CpuList(vec![5])));
    assert_eq!(list("3-1").unwrap_err(), "CPU range \"3-1\" runs backwards");
    assert_eq!(
        list("1,0-2").unwrap_err(),
        "CPU 1 appears twice in \"1,0-2\""
    );
    assert_eq!(
        list("1024").unwrap_err(),
        "bad CPU \"1024\" in \"1024\" (expected e.g. 0-3,8)"
    );
    assert!(list("a").is_err() && list("").is_err() && list("1,").is_err());
    assert_eq!(CpuList(vec![0, 2]).to_string(), "0,2");

    assert_eq!("IDLE".parse::<ComputePriority>(), Ok(ComputePriority::Idle));
    assert_eq!(
        "normal".parse::<ComputePriority>(),
        Ok(ComputePriority::Normal)
    );
    let e = "fast".parse::<ComputePriority>().unwrap_err();
    assert_eq!(
        e,
        "unknown compute priority \"fast\" (expected normal or idle)"
    );
    assert_eq!(ComputePriority::Idle.to_string(), "idle");
}
