//! The erasure ledger: every erasure is also written to a file kept outside the data
//! directory, so that it outlives the data directory's backups. A server restored from a
//! backup made before an erasure would otherwise bring the person back: the backup holds
//! their record and their key, and phones that purged them would receive them again. At
//! start, the server erases again everyone the ledger names whom its store still holds.
//!
//! The ledger holds organisation and person ids, the time and who erased: nothing of the
//! record. Lines are JSON, appended and synced before the erasure is carried out (a crash in
//! between leaves an erasure to finish at the next start, as the coordinator asked).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasure {
    pub org: String,
    pub person: String,
    pub at: DateTime<Utc>,
    pub by: String,
    /// The store the erasure was made in (`Directory::instance`): only it and its backups
    /// are held to it.
    #[serde(default)]
    pub store: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("erasure ledger {path}: {reason}")]
pub struct LedgerError {
    path: PathBuf,
    reason: String,
}

pub struct ErasureLedger {
    path: PathBuf,
    /// Appends one at a time: lines never interleave.
    append: Mutex<()>,
}

impl ErasureLedger {
    /// The ledger at `path` (created on first use, readable by its owner only).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), append: Mutex::new(()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, reason: impl std::fmt::Display) -> LedgerError {
        LedgerError { path: self.path.clone(), reason: reason.to_string() }
    }

    /// Check at start that the ledger can be written and lies outside `data_dir`: found out at
    /// the first erasure, a ledger that cannot be written would refuse every erasure until an
    /// operator noticed, and one inside the data directory would come back with its backups.
    pub fn check_place(&self, data_dir: &Path) -> Result<(), LedgerError> {
        let existed = self.path.exists();
        self.open_append().map_err(|e| self.error(format!("cannot be written ({e}); give --erasure-ledger a writable place outside the data directory")))?;
        let parent = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !existed {
            // The new file's name must survive a crash as well as its lines.
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        let (Ok(data), Ok(dir)) = (data_dir.canonicalize(), parent.canonicalize()) else { return Ok(()) };
        if dir.starts_with(&data) {
            return Err(self.error(format!(
                "is inside the data directory {}: backups of it would carry the ledger back with them; put it beside the data directory (the default) or elsewhere",
                data.display()
            )));
        }
        Ok(())
    }

    fn open_append(&self) -> std::io::Result<std::fs::File> {
        let mut options = std::fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&self.path)
    }

    /// Append `e` and sync it to disk.
    pub fn record(&self, e: &Erasure) -> Result<(), LedgerError> {
        let _one = self.append.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = serde_json::to_vec(e).map_err(|err| self.error(err))?;
        line.push(b'\n');
        let mut f = self.open_append().map_err(|err| self.error(format!("cannot open: {err}")))?;
        // After a write cut short (no newline at the end), start a line of its own: appended
        // to the torn one, this erasure would be unreadable with it.
        let torn = last_byte(&self.path).is_some_and(|c| c != b'\n');
        if torn {
            line.insert(0, b'\n');
        }
        f.write_all(&line).and_then(|()| f.sync_data()).map_err(|err| self.error(format!("cannot write: {err}")))
    }

    /// Every erasure recorded, oldest first. A missing ledger is empty; a line that cannot be
    /// read (a write cut short by a crash) is skipped with a warning.
    pub fn entries(&self) -> Result<Vec<Erasure>, LedgerError> {
        let f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.error(format!("cannot read: {e}"))),
        };
        let mut out = Vec::new();
        for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|e| self.error(format!("cannot read: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(&line) {
                Ok(e) => out.push(e),
                // A write cut short by a crash, before its erasure was carried out (the
                // coordinator was not told it was done). Damage looks the same: said loudly.
                Err(e) => tracing::error!(ledger = %self.path.display(), line = n + 1, error = %e, "a line of the erasure ledger cannot be read and is skipped: if it was not cut short by a crash, repair it"),
            }
        }
        Ok(out)
    }
}

/// The file's last byte, if it has one.
fn last_byte(path: &Path) -> Option<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    f.seek(SeekFrom::End(-1)).ok()?;
    let mut b = [0u8];
    f.read_exact(&mut b).ok()?;
    Some(b[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_must_be_writable_and_outside_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        assert!(ErasureLedger::new(dir.path().join("data.erasures")).check_place(&data).is_ok());
        let inside = ErasureLedger::new(data.join("erasures")).check_place(&data).unwrap_err();
        assert!(inside.to_string().contains("inside the data directory"), "{inside}");
        let nowhere = ErasureLedger::new(dir.path().join("no-such-dir/erasures")).check_place(&data).unwrap_err();
        assert!(nowhere.to_string().contains("cannot be written"), "{nowhere}");
        // The default beside the data directory, however the directory is named.
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(crate::app::default_erasure_ledger(Path::new(".")).unwrap(), cwd.with_file_name(format!("{}.erasures", cwd.file_name().unwrap().to_string_lossy())));
        assert_eq!(crate::app::default_erasure_ledger(&data).unwrap(), dir.path().join("data.erasures"));
        assert_eq!(crate::app::default_erasure_ledger(&data.join("x/..")).unwrap(), dir.path().join("data.erasures"));
        assert!(crate::app::default_erasure_ledger(Path::new("/")).is_err());
    }

    #[test]
    fn an_erasure_after_a_torn_write_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ErasureLedger::new(dir.path().join("erasures"));
        let e = |p: &str| Erasure { org: "o".into(), person: p.into(), at: Utc::now(), by: "x".into(), store: None };
        ledger.record(&e("p-1")).unwrap();
        std::fs::OpenOptions::new().append(true).open(ledger.path()).unwrap().write_all(b"{\"org\":\"o\",\"per").unwrap();
        ledger.record(&e("p-2")).unwrap();
        let people: Vec<String> = ledger.entries().unwrap().into_iter().map(|e| e.person).collect();
        assert_eq!(people, ["p-1", "p-2"]);
    }

    #[test]
    fn erasures_are_kept_in_order_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = ErasureLedger::new(dir.path().join("erasures"));
        assert!(ledger.entries().unwrap().is_empty(), "no ledger yet: nothing erased");
        let e = |p: &str| Erasure { org: "o".into(), person: p.into(), at: Utc::now(), by: "coordinator:o/maya".into(), store: None };
        ledger.record(&e("p-1")).unwrap();
        std::fs::OpenOptions::new().append(true).open(ledger.path()).unwrap().write_all(b"{\"org\":\"o\",\"per").unwrap();
        std::fs::OpenOptions::new().append(true).open(ledger.path()).unwrap().write_all(b"\n").unwrap();
        ledger.record(&e("p-2")).unwrap();
        let people: Vec<String> = ledger.entries().unwrap().into_iter().map(|e| e.person).collect();
        assert_eq!(people, ["p-1", "p-2"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(ledger.path()).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
