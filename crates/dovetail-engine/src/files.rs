//! File drops: on the flow's schedule, every CSV or JSON Lines file in the
//! folder is read, each row journalled through the flow's pipeline, and the
//! file moved to `archive` once all its rows are durable (or to `failed`
//! when it cannot be read at all).
//!
//! Each file is processed exactly once in effect: a row is named by the
//! file's name, its content hash and the row number, so a file re-read
//! after a crash (before its move) journals nothing twice. A row that
//! cannot be read or that the pipeline refuses is quarantined with its raw
//! bytes and its row number. In `full_extract` mode a file is a snapshot:
//! only rows whose key is new or whose content changed since the last
//! snapshot become records.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::Digest as _;
use tokio::sync::watch;

use dovetail_core::config::{FileFormat, FileMode, FilesConfig};
use dovetail_journal::Ingested;

use crate::contract::SourceContext;

pub(crate) struct FileSource {
    pub ctx: SourceContext,
    pub config: FilesConfig,
    /// The folders, resolved against the config file's folder.
    pub dir: PathBuf,
    pub archive: PathBuf,
    pub failed: PathBuf,
}

/// One row of a file: its number (1-based line) and raw bytes, or why it cannot be read.
struct Row {
    number: u64,
    raw: Vec<u8>,
    unreadable: Option<String>,
}

/// What one file gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FileRun {
    pub new: usize,
    pub duplicates: usize,
    pub unchanged: usize,
}

pub(crate) async fn run(source: Arc<FileSource>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if let Err(e) = source.scan().await {
            tracing::warn!(flow = %source.ctx.flow, error = %e, "cannot process the file drop; trying again at the next run");
        }
        let now = source.ctx.clock.now();
        let Some(next) = source.config.schedule.next_after(now) else {
            let _ = stop.wait_for(|s| *s).await;
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep(next.since(now)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// CSV rows as JSON objects of strings, keyed by the header.
fn csv_rows(bytes: &[u8]) -> Result<Vec<Row>, String> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(bytes);
    let headers = reader.headers().map_err(|e| format!("the header row cannot be read: {e}"))?.clone();
    let mut rows = Vec::new();
    let mut raw_record = csv::StringRecord::new();
    loop {
        let start = reader.position().byte() as usize;
        let line = reader.position().line();
        match reader.read_record(&mut raw_record) {
            Ok(false) => break,
            Ok(true) => {
                let end = reader.position().byte() as usize;
                let object: serde_json::Map<String, serde_json::Value> = headers
                    .iter()
                    .zip(raw_record.iter())
                    .map(|(h, v)| (h.to_string(), serde_json::Value::String(v.to_string())))
                    .collect();
                let raw = serde_json::to_vec(&object).unwrap_or_else(|_| bytes[start..end].to_vec());
                rows.push(Row { number: line, raw, unreadable: None });
            }
            Err(e) => {
                let end = (reader.position().byte() as usize).max(start).min(bytes.len());
                let raw = bytes[start..end].to_vec();
                rows.push(Row { number: line, raw, unreadable: Some(e.to_string()) });
                if end == start {
                    break; // nothing more can be read
                }
            }
        }
    }
    Ok(rows)
}

/// JSON Lines rows as they are (blank lines skipped).
fn jsonl_rows(bytes: &[u8]) -> Vec<Row> {
    bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Row { number: i as u64 + 1, raw: line.to_vec(), unreadable: None }
        })
        .collect()
}

fn hash(bytes: &[u8]) -> String {
    hex::encode(&sha2::Sha256::digest(bytes)[..12])
}

impl FileSource {
    /// Every waiting file, oldest name first.
    pub async fn scan(&self) -> Result<Vec<(String, FileRun)>, String> {
        let extension = match self.config.format {
            FileFormat::Csv => "csv",
            FileFormat::Jsonl => "jsonl",
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(|e| format!("cannot read {}: {e}", self.dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case(extension)))
            .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        files.sort();
        let mut done = Vec::new();
        for file in files {
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            match self.process(&file, &name).await {
                Ok(run) => {
                    self.move_to(&file, &self.archive)?;
                    tracing::info!(flow = %self.ctx.flow, file = %name, new = run.new, duplicates = run.duplicates, unchanged = run.unchanged, "file processed");
                    done.push((name, run));
                }
                Err(Failure::File(why)) => {
                    tracing::error!(flow = %self.ctx.flow, file = %name, error = %why, "file moved to the failed folder");
                    self.move_to(&file, &self.failed)?;
                }
                // The journal is down: the file stays for the next run.
                Err(Failure::Journal(why)) => return Err(why),
            }
        }
        Ok(done)
    }

    fn move_to(&self, file: &Path, folder: &Path) -> Result<(), String> {
        std::fs::create_dir_all(folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
        let target = folder.join(file.file_name().unwrap_or_default());
        std::fs::rename(file, &target)
            .map_err(|e| format!("cannot move {} to {}: {e}", file.display(), target.display()))
    }

    async fn process(&self, file: &Path, name: &str) -> Result<FileRun, Failure> {
        let bytes = std::fs::read(file).map_err(|e| Failure::File(format!("cannot read it: {e}")))?;
        let digest = hash(&bytes);
        let rows = match self.config.format {
            FileFormat::Csv => csv_rows(&bytes).map_err(Failure::File)?,
            FileFormat::Jsonl => jsonl_rows(&bytes),
        };
        let extract_key = format!("extract:{}", self.ctx.flow);
        let mut previous: Option<BTreeMap<String, String>> = None;
        if self.config.mode == FileMode::FullExtract {
            let saved = self.ctx.journal.load_state(&extract_key).await.map_err(|e| Failure::Journal(e.to_string()))?;
            previous = Some(saved.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default());
        }
        let mut snapshot = BTreeMap::new();
        let mut run = FileRun::default();
        for row in rows {
            let started = std::time::Instant::now();
            let mut processed = self.ctx.process(&row.raw).await;
            if let Some(why) = &row.unreadable {
                processed.result = Err(dovetail_core::pipeline::Rejection {
                    stage: dovetail_core::pipeline::Stage::Parse,
                    reason: why.clone(),
                });
            }
            let content = hash(&row.raw);
            let mut delivery_id = format!("{name}#{digest}:{}", row.number);
            if let Some(previous) = &previous
                && let Some(key) = processed.keys.external.clone()
                && processed.result.is_ok()
            {
                snapshot.insert(key.clone(), content.clone());
                if previous.get(&key) == Some(&content) {
                    run.unchanged += 1;
                    continue;
                }
                // A change back to an earlier value is a change too: the
                // file's hash keeps ids apart between files, and the same
                // between two reads of one file.
                delivery_id = format!("{key}@{content}@{digest}");
            }
            if let Err(r) = &mut processed.result {
                r.reason = format!("{name} row {}: {}", row.number, r.reason);
            }
            match self
                .ctx
                .journal(processed, delivery_id, row.raw, started)
                .await
                .map_err(|e| Failure::Journal(e.to_string()))?
            {
                Ingested::New(_) => run.new += 1,
                Ingested::Duplicate(_) => run.duplicates += 1,
            }
        }
        if previous.is_some() {
            // Every row of this snapshot is durable: it becomes the one to compare with.
            let text = serde_json::to_string(&snapshot).map_err(|e| Failure::Journal(e.to_string()))?;
            self.ctx
                .journal
                .save_state(&extract_key, text, self.ctx.clock.now())
                .await
                .map_err(|e| Failure::Journal(e.to_string()))?;
        }
        if run.new > 0 {
            self.ctx.wake.notify_one();
        }
        Ok(run)
    }
}

enum Failure {
    /// The file itself cannot be read: it goes to the failed folder.
    File(String),
    /// The journal failed: the file stays and is read again.
    Journal(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_become_objects_and_bad_rows_keep_their_bytes() {
        let rows = csv_rows(b"id,name\n1,Ada\n2,Grace,extra\n3,\"Linus\"\n").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].number, rows[0].raw.as_slice()), (2, br#"{"id":"1","name":"Ada"}"#.as_slice()));
        assert!(rows[1].unreadable.as_deref().unwrap().contains("fields"), "{:?}", rows[1].unreadable);
        assert_eq!(rows[1].raw, b"2,Grace,extra\n", "the raw row is kept");
        assert_eq!(rows[2].raw, br#"{"id":"3","name":"Linus"}"#);
    }

    #[test]
    fn jsonl_rows_are_numbered_by_line() {
        let rows = jsonl_rows(b"{\"a\":1}\n\n{\"a\":2}\r\nnot json\n");
        let seen: Vec<(u64, &[u8])> = rows.iter().map(|r| (r.number, r.raw.as_slice())).collect();
        assert_eq!(seen, [(1, br#"{"a":1}"#.as_slice()), (3, br#"{"a":2}"#), (4, b"not json")]);
    }
}
