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
use dovetail_core::pipeline::{Rejection, Stage};
use dovetail_journal::Ingested;

use crate::contract::SourceContext;

pub(crate) struct FileSource {
    pub ctx: SourceContext,
    /// Each file's size and modification time at the previous scan.
    pub seen: std::sync::Mutex<BTreeMap<PathBuf, (u64, Option<std::time::SystemTime>)>>,
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
        if let Err(e) = source.scan(&stop).await {
            tracing::warn!(flow = %source.ctx.flow, error = %e, "cannot process the file drop; trying again at the next run");
        }
        if !source.ctx.wait_for_next(&source.config.schedule, &mut stop).await {
            return;
        }
    }
}

/// CSV rows as JSON objects of strings, keyed by the header.
fn csv_rows(bytes: &[u8]) -> Result<Vec<Row>, String> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(bytes);
    let headers = reader.headers().map_err(|e| format!("the header row cannot be read: {e}"))?.clone();
    let mut names = std::collections::BTreeSet::new();
    if let Some(dup) = headers.iter().find(|h| h.is_empty() || !names.insert(*h)) {
        return Err(format!("the header names `{dup}` twice (or a column has no name): a field would be lost"));
    }
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
    /// Every settled file, in name order. A file is settled when its size
    /// and modification time are the same as at the previous scan, so a
    /// file still being written is left for later.
    pub async fn scan(&self, stop: &watch::Receiver<bool>) -> Result<Vec<(String, FileRun)>, String> {
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
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut settled = Vec::new();
        let mut now_seen = BTreeMap::new();
        for file in files {
            let Ok(meta) = std::fs::metadata(&file) else { continue };
            let stamp = (meta.len(), meta.modified().ok());
            if seen.remove(&file) == Some(stamp) && meta.len() > 0 {
                settled.push(file);
            } else {
                now_seen.insert(file, stamp);
            }
        }
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = now_seen;
        let mut done = Vec::new();
        for file in settled {
            if *stop.borrow() {
                break; // the rest stays for the next start
            }
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let (target, outcome) = match self.process(&file, &name).await {
                Ok(run) => {
                    tracing::info!(flow = %self.ctx.flow, file = %name, new = run.new, duplicates = run.duplicates, unchanged = run.unchanged, "file processed");
                    done.push((name.clone(), run));
                    (&self.archive, "archive")
                }
                Err(Failure::File(why)) => {
                    tracing::error!(flow = %self.ctx.flow, file = %name, error = %why, "file moved to the failed folder");
                    (&self.failed, "failed")
                }
                // The journal is down: the file stays for the next run.
                Err(Failure::Journal(why)) => return Err(why),
                Err(Failure::Later(why)) => {
                    tracing::warn!(flow = %self.ctx.flow, file = %name, error = %why, "file left for the next run");
                    continue;
                }
            };
            if let Err(e) = move_aside(&file, target) {
                // The file stays (its rows are journalled: a re-read adds nothing); later files go on.
                tracing::error!(flow = %self.ctx.flow, file = %name, folder = outcome, error = %e, "cannot move the file");
            }
        }
        Ok(done)
    }

    async fn process(&self, file: &Path, name: &str) -> Result<FileRun, Failure> {
        let bytes = std::fs::read(file).map_err(|e| Failure::Later(format!("cannot read it: {e}")))?;
        let digest = hash(&bytes);
        let rows = match self.config.format {
            FileFormat::Csv => csv_rows(&bytes).map_err(Failure::File)?,
            FileFormat::Jsonl => jsonl_rows(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes)),
        };
        let extract_key = format!("extract:{}", self.ctx.flow);
        let mut previous: Option<BTreeMap<String, String>> = None;
        if self.config.mode == FileMode::FullExtract {
            let saved = self.ctx.journal.load_state(&extract_key).await.map_err(|e| Failure::Journal(e.to_string()))?;
            previous = Some(match saved {
                Some(text) => serde_json::from_str(&text)
                    .map_err(|e| Failure::Journal(format!("the saved snapshot cannot be read: {e}")))?,
                None => BTreeMap::new(),
            });
        }
        // A full extract's ids are tied to the snapshot it is compared with,
        // so a change back to a value sent long ago is sent again, and a
        // re-read of the same file against the same snapshot is a duplicate.
        let baseline = previous.as_ref().map(|p| hash(serde_json::to_string(p).unwrap_or_default().as_bytes()));
        let mut snapshot: BTreeMap<String, String> = BTreeMap::new();
        let mut run = FileRun::default();
        for row in rows {
            let started = std::time::Instant::now();
            let mut processed = self.ctx.process(&row.raw).await;
            if let Some(why) = &row.unreadable {
                processed.result = Err(Rejection { stage: Stage::Parse, reason: why.clone() });
            }
            let content = hash(&row.raw);
            // The flow's idempotency_key, when it has one, names the record; else the file's row.
            let mut delivery_id =
                processed.keys.dedup.clone().unwrap_or_else(|| format!("{name}#{digest}:{}", row.number));
            if let (Some(previous), Ok(_)) = (&previous, &processed.result) {
                match processed.keys.external.clone() {
                    None => {
                        processed.result =
                            Err(Rejection { stage: Stage::Key, reason: "a full extract's row needs its key".into() })
                    }
                    Some(key) => {
                        // Within one file the latest row of a key counts.
                        let before = snapshot.get(&key).or(previous.get(&key)).cloned();
                        snapshot.insert(key.clone(), content.clone());
                        if before.as_ref() == Some(&content) {
                            run.unchanged += 1;
                            continue;
                        }
                        delivery_id = format!("{key}@{content}@{}", baseline.as_deref().unwrap_or(""));
                    }
                }
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
        if let Some(previous) = previous {
            // Every row of this snapshot is durable: it becomes the one to compare with.
            // Keys a row of this file could not give keep their last known state.
            let mut next = previous;
            next.extend(snapshot);
            let text = serde_json::to_string(&next).map_err(|e| Failure::Journal(e.to_string()))?;
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

/// Moves `file` into `folder` without replacing anything there: a name
/// already taken gets the time appended.
fn move_aside(file: &Path, folder: &Path) -> Result<(), String> {
    std::fs::create_dir_all(folder).map_err(|e| format!("cannot create {}: {e}", folder.display()))?;
    let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let mut target = folder.join(&name);
    if target.exists() {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        target = folder.join(format!("{stamp}-{name}"));
    }
    std::fs::rename(file, &target).map_err(|e| format!("cannot move {} to {}: {e}", file.display(), target.display()))
}

enum Failure {
    /// The file itself cannot be parsed: it goes to the failed folder.
    File(String),
    /// The journal failed: the file stays and is read again.
    Journal(String),
    /// It cannot be read now (permissions, a writer's lock): it stays.
    Later(String),
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
    fn a_header_naming_a_field_twice_fails_the_file() {
        let e = csv_rows(b"id,name,name\n1,a,b\n").err().unwrap();
        assert!(e.contains("`name` twice"), "{e}");
    }

    #[test]
    fn jsonl_rows_are_numbered_by_line() {
        let rows = jsonl_rows(b"{\"a\":1}\n\n{\"a\":2}\r\nnot json\n");
        let seen: Vec<(u64, &[u8])> = rows.iter().map(|r| (r.number, r.raw.as_slice())).collect();
        assert_eq!(seen, [(1, br#"{"a":1}"#.as_slice()), (3, br#"{"a":2}"#), (4, b"not json")]);
    }
}
