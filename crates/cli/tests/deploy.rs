//! The Kubernetes manifests (`deploy/k8s`), offline: rendered with `kubectl kustomize`,
//! validated against the Kubernetes schemas by `kubernetes-validate` (strict: no unknown
//! field), and read back for what the deployment depends on: probes, the decode pods' drain
//! before they stop, headless Services for discovery, a disruption budget per role, and
//! `--kv-transfer-config`s that this build accepts.
//!
//! Needs the `kubernetes-validate` package (`.ci/run` installs it and sets
//! SPLITSERVE_REQUIRE_K8S_VALIDATE, under which its absence fails the test); renders with
//! `kubectl kustomize` where kubectl is installed.

use std::process::Command;

use serde_json::Value;

const K8S: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/k8s");
/// The Kubernetes version the manifests are checked against.
const VERSION: &str = "1.32.0";

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `cmd`, its stdout; panics with its stderr when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_kubernetes_manifests_are_valid_and_wire_the_roles() {
    if !have("kubernetes-validate", "--version") {
        assert!(
            std::env::var_os("SPLITSERVE_REQUIRE_K8S_VALIDATE").is_none(),
            "SPLITSERVE_REQUIRE_K8S_VALIDATE is set, but kubernetes-validate is missing"
        );
        eprintln!("skipped: needs kubernetes-validate (pip install kubernetes-validate)");
        return;
    }
    let rendered = if have("kubectl", "--help") {
        run(Command::new("kubectl").args(["kustomize", K8S]))
    } else {
        // Without kubectl: the kustomization's resources as they are.
        let k =
            std::fs::read_to_string(format!("{K8S}/kustomization.yaml")).expect("kustomization");
        let files: Vec<&str> = k
            .lines()
            .skip_while(|l| !l.starts_with("resources:"))
            .skip(1)
            .map_while(|l| l.strip_prefix("  - "))
            .collect();
        assert!(!files.is_empty(), "no resources in the kustomization");
        files
            .iter()
            .map(|f| std::fs::read_to_string(format!("{K8S}/{f}")).expect("resource"))
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let file = std::env::temp_dir().join(format!("splitserve-k8s-{}.yaml", std::process::id()));
    std::fs::write(&file, &rendered).expect("write");
    let report = run(Command::new("kubernetes-validate")
        .args(["-k", VERSION, "--strict"])
        .arg(&file));
    // kubernetes-validate installs PyYAML: the documents as JSON, to read them back here.
    let json = run(Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(&file));
    let _ = std::fs::remove_file(&file);
    let docs: Vec<Value> = serde_json::from_str(&json).expect("documents");
    let kinds: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(report.matches("passed").count(), docs.len(), "{report}");
    let get = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind}/{name} among {kinds:?}"))
    };
    for role in ["prefill", "decode"] {
        let name = format!("splitserve-{role}");
        // Headless: the router resolves every pod's address.
        assert_eq!(get("Service", &name)["spec"]["clusterIP"], "None", "{role}");
        let pdb = get("PodDisruptionBudget", &name);
        assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{role}");
        let c = &get("Deployment", &name)["spec"]["template"]["spec"]["containers"][0];
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["path"], "/health", "{role} {probe}");
        }
        // The model loads before /health answers: the startup probe waits minutes for it.
        let p = &c["startupProbe"];
        let wait =
            p["periodSeconds"].as_u64().unwrap_or(10) * p["failureThreshold"].as_u64().unwrap_or(3);
        assert!(wait >= 120, "{role}: startup probe waits {wait} s");
        let args = c["args"].to_string();
        assert!(
            args.contains(&format!("/etc/splitserve/{role}.json")),
            "{role}: {args}"
        );
        assert!(
            c["env"].to_string().contains("SPLITSERVE_KV_SECRET"),
            "{role}"
        );
    }
    let ports = |name: &str| get("Service", name)["spec"]["ports"].to_string();
    assert!(
        ports("splitserve-prefill").contains("5600"),
        "the side channel is declared"
    );
    // Decode pods drain through the router before they stop.
    let decode = &get("Deployment", "splitserve-decode")["spec"]["template"]["spec"];
    let pre_stop = decode["containers"][0]["lifecycle"]["preStop"]["exec"]["command"].to_string();
    assert!(
        pre_stop.contains("splitserve drain --proxy-admin http://splitserve-router:9100"),
        "{pre_stop}"
    );
    assert!(decode["terminationGracePeriodSeconds"].as_u64() >= Some(60));
    // ... to the other decode pods, which its allow-list names through their Service.
    let args = decode["containers"][0]["args"].to_string();
    assert!(
        args.contains("--migrate-targets http://splitserve-decode:9000"),
        "{args}"
    );
    let router = get("Deployment", "splitserve-router")["spec"]["template"]["spec"]["containers"]
        [0]["args"]
        .to_string();
    for want in [
        "--prefill=http://splitserve-prefill:8000",
        "--decode=http://splitserve-decode:8000",
        "--decode-admin=http://splitserve-decode:9000",
        "--resolve-interval-s=",
    ] {
        assert!(router.contains(want), "router args lack {want}: {router}");
    }
    // Each role's --kv-transfer-config, as the pod will have it, is one this build takes.
    let cm = &get("ConfigMap", "splitserve-kv-transfer-config")["data"];
    for (key, role) in [
        ("prefill.json", "kv_producer"),
        ("decode.json", "kv_consumer"),
    ] {
        let text = cm[key]
            .as_str()
            .expect("config")
            .replace("@POD_IP@", "10.1.2.3");
        let c =
            splitserve_kv::KvTransferConfig::parse(&text).unwrap_or_else(|e| panic!("{key}: {e}"));
        assert_eq!(c.kv_role.produces(), role == "kv_producer", "{key}");
        assert_eq!(c.kv_role.consumes(), role == "kv_consumer", "{key}");
    }
}
