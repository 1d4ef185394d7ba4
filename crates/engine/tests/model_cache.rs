//! The cached default model is used only after its sha256 checked: a file of the right size
//! with one byte changed is refused, and a verified file's check is remembered by its size
//! and mtime.

use std::io::{Seek, SeekFrom, Write};

use splitserve_engine::model_file::{default_model, verified};

#[test]
fn a_cached_model_is_hashed_not_trusted_by_its_size() {
    let real = default_model(false).expect("default model");
    let dir = std::env::temp_dir().join(format!("splitserve-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let copy = dir.join(real.file_name().expect("file name"));
    std::fs::copy(&real, &copy).expect("copy");
    let record = copy.with_extension("gguf.verified");
    assert!(!record.exists());
    assert!(verified(&copy, false).expect("hashing"));
    let first = std::fs::read_to_string(&record).expect("the check is recorded");
    let len = std::fs::metadata(&copy).expect("meta").len();
    assert!(first.contains(&format!(" {len} ")), "{first}");
    // Unchanged: the record answers (a wrong record would not, see below).
    assert!(verified(&copy, false).expect("record"));

    // Same size, one byte different, a new mtime: hashed again and refused.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&copy)
        .expect("open");
    f.seek(SeekFrom::Start(len / 2)).expect("seek");
    f.write_all(&[0x5a]).expect("write");
    drop(f);
    assert_eq!(std::fs::metadata(&copy).expect("meta").len(), len);
    assert!(!verified(&copy, false).expect("hashing"));
    assert_eq!(
        std::fs::read_to_string(&record).expect("record"),
        first,
        "a refused file is not recorded"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
