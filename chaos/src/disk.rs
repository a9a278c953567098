//! Disk faults at rest, applied to a stopped node's RocksDB directory: what a
//! failing disk or a lost write-back cache leaves behind.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};

/// The newest file with `extension` (RocksDB numbers files in order).
fn newest(dir: &Path, extension: &str) -> anyhow::Result<Option<(PathBuf, u64)>> {
    let mut best: Option<(u64, PathBuf, u64)> = None;
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(extension) {
            continue;
        }
        let Some(number) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let len = std::fs::metadata(&path)?.len();
        if len > 0 && best.as_ref().is_none_or(|(n, _, _)| number > *n) {
            best = Some((number, path, len));
        }
    }
    Ok(best.map(|(_, path, len)| (path, len)))
}

fn flip_bits(path: &Path, len: u64, rng: &mut StdRng) -> anyhow::Result<Vec<u64>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut offsets: Vec<u64> = (0..4).map(|_| rng.random_range(0..len)).collect();
    offsets.sort_unstable();
    for &at in &offsets {
        let mut byte = [0u8];
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(&mut byte)?;
        byte[0] ^= 1 << rng.random_range(0..8);
        file.seek(SeekFrom::Start(at))?;
        file.write_all(&byte)?;
    }
    file.sync_all()?;
    Ok(offsets)
}

/// Damages one file of the RocksDB in `db_dir`: truncates the newest WAL or
/// SST file, or flips bits in one. Returns what it did (for the history).
pub fn damage(db_dir: &Path, rng: &mut StdRng) -> anyhow::Result<Value> {
    let wal = newest(db_dir, "log")?;
    let sst = newest(db_dir, "sst")?;
    let mut choices = Vec::new();
    if wal.is_some() {
        choices.extend(["truncate-wal", "flip-wal"]);
    }
    if sst.is_some() {
        choices.extend(["truncate-sst", "flip-sst"]);
    }
    anyhow::ensure!(
        !choices.is_empty(),
        "no WAL or SST file in {}",
        db_dir.display()
    );
    let how = choices[rng.random_range(0..choices.len())];
    let (path, len) = if how.ends_with("wal") { wal } else { sst }.context("file chosen")?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    Ok(if how.starts_with("truncate") {
        let to = rng.random_range(0..len);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(to)?;
        json!({"damage": how, "file": name, "from_bytes": len, "to_bytes": to})
    } else {
        let offsets = flip_bits(&path, len, rng)?;
        json!({"damage": how, "file": name, "bytes": len, "offsets": offsets})
    })
}
