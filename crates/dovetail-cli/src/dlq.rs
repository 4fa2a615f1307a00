//! `dovetail dlq`: list, show, replay and discard dead letters.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::json;

use dovetail_core::clock::{Clock, SystemClock};
use dovetail_core::config::Loaded;
use dovetail_core::record::RecordId;
use dovetail_engine::views::{last_error, record_json, request_of, story, versions};
use dovetail_journal::{Journal, Selector, SqliteJournal};

use crate::project;

/// Records moved per transaction by replay and discard.
const CHUNK: usize = 1000;
/// Between two chunks the journal is left unlocked this long, longer than a
/// running engine's writer waits between tries at a locked journal (1 ms),
/// so that webhooks keep being acknowledged while a large replay runs.
const CHUNK_GAP: std::time::Duration = std::time::Duration::from_millis(2);
/// Above this many records, replay shows a progress bar.
const PROGRESS_FROM: u64 = 2 * CHUNK as u64;

#[derive(Subcommand)]
pub enum DlqCommand {
    /// Dead letters, oldest first.
    List {
        #[arg(long)]
        flow: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One record: payload, every attempt, last error.
    Show {
        id: RecordId,
        #[arg(long)]
        json: bool,
    },
    /// Back to pending, with the same idempotency key and a fresh retry budget.
    Replay(Which),
    /// Mark discarded: never delivered, kept for the record.
    Discard(Which),
}

#[derive(clap::Args)]
pub struct Which {
    /// Record ids.
    ids: Vec<RecordId>,
    /// Every dead letter of this flow.
    #[arg(long, conflicts_with_all = ["ids", "all"])]
    flow: Option<String>,
    /// Every dead letter of every flow.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
}

impl Which {
    fn selector(self) -> Result<Selector> {
        Ok(match (self.ids.is_empty(), self.flow, self.all) {
            (false, None, false) => Selector::Ids(self.ids),
            (true, Some(f), false) => Selector::Flow(f),
            (true, None, true) => Selector::All,
            _ => bail!("say which records: record ids, --flow FLOW, or --all"),
        })
    }
}

pub async fn run(path: &Path, cmd: DlqCommand) -> Result<ExitCode> {
    let loaded = project::load(path)?;
    let journal = project::open_existing_journal(&loaded)?;
    match cmd {
        DlqCommand::List { flow, limit, json } => list(&journal, flow.as_deref(), limit, json).await,
        DlqCommand::Show { id, json } => show(&loaded, &journal, id, json).await,
        DlqCommand::Replay(which) => bulk(&journal, which.selector()?, Action::Replay).await,
        DlqCommand::Discard(which) => bulk(&journal, which.selector()?, Action::Discard).await,
    }
}

async fn list(journal: &SqliteJournal, flow: Option<&str>, limit: usize, json: bool) -> Result<ExitCode> {
    let dead = journal.dead_letters(flow, limit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&json!({ "dead_letters": dead }))?);
        return Ok(ExitCode::SUCCESS);
    }
    if dead.is_empty() {
        println!("the dead-letter queue is empty{}", flow.map(|f| format!(" for flow `{f}`")).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["ID", "FLOW", "CLASS", "ATTEMPTS", "DEAD AT", "REASON"].map(String::from).to_vec()];
    for d in &dead {
        rows.push(vec![
            d.id.to_string(),
            d.flow.clone(),
            d.class.as_str().to_string(),
            d.attempts.to_string(),
            d.dead_at.to_string(),
            one_line(&d.reason, 80),
        ]);
    }
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

/// `dovetail trace NEEDLE`: the whole story of the records a record id,
/// correlation id, delivery id or external key names, newest first.
pub async fn trace(path: &Path, needle: &str, limit: usize, json: bool) -> Result<ExitCode> {
    let loaded = project::load(path)?;
    let journal = project::open_existing_journal(&loaded)?;
    let ids = journal.find(needle, limit).await?;
    if ids.is_empty() {
        bail!("no record has the id, correlation id, delivery id or key `{needle}`");
    }
    if json {
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(detail) = journal.record(id).await? {
                records.push(record_json(&loaded.config, &detail));
            }
        }
        println!("{}", serde_json::to_string_pretty(&json!({ "records": records }))?);
        return Ok(ExitCode::SUCCESS);
    }
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            println!("\n{}\n", "-".repeat(72));
        }
        show(&loaded, &journal, *id, false).await?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(loaded: &Loaded, journal: &SqliteJournal, id: RecordId, json: bool) -> Result<ExitCode> {
    let Some(detail) = journal.record(id).await? else { bail!("there is no record {id}") };
    let last_error = last_error(&detail);
    let request = request_of(&loaded.config, &detail);
    if json {
        let v = record_json(&loaded.config, &detail);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("record {} of flow {} — {}", detail.id, detail.flow, detail.state.as_str());
    println!("  received        {}", detail.received_at);
    println!("  correlation id  {}", detail.correlation_id);
    println!("  idempotency key {}", detail.idempotency_key);
    if let Some(d) = &detail.delivery_id {
        println!("  delivery id     {d}");
    }
    if let (Some(c), Some(r)) = (detail.dead_class, &detail.dead_reason) {
        println!("  dead            {} — {}", c.as_str(), printable(r));
    }
    println!("\nstory:");
    for s in story(&detail) {
        let at = s.at.map_or_else(|| " ".repeat(24), |t| format!("{t:<24}"));
        println!("  {at}  {}", printable(&s.event));
    }
    println!("\nraw payload (as received):");
    if let Some(at) = detail.payload_purged_at {
        println!("  (removed at {at} under the flow's retention; the record and its attempts are kept)");
    }
    print_body(&detail.payload)?;
    match (&detail.mapped, detail.prepared) {
        _ if detail.payload_purged_at.is_some() => {
            let by = versions(&detail);
            let by = if by.is_empty() { String::new() } else { format!(" (it was made by {by})") };
            println!("\nmapped: removed with the raw payload{by}");
        }
        (Some(m), _) => {
            println!("\nmapped ({}):", versions(&detail));
            print_body(m)?;
        }
        (None, true) => println!("\nmapped: no mapping; the raw payload is sent as received"),
        (None, false) => println!(
            "\nmapped: not yet; the record is validated and mapped with the flow's current config when it is (re)played"
        ),
    }
    if let Some(r) = &request {
        println!("\nsent (the request each attempt makes, from the current config; credentials hidden):\n{r}");
    }
    println!("\nattempts:");
    if detail.attempts.is_empty() {
        println!("  none");
    }
    let mut rows = vec![["#", "STARTED", "MS", "STATUS", "CLASS", "ERROR"].map(String::from).to_vec()];
    for a in &detail.attempts {
        rows.push(vec![
            a.number.to_string(),
            a.started_at.to_string(),
            a.duration_ms.to_string(),
            a.status.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            a.class.map(|c| c.as_str().to_string()).unwrap_or_else(|| "delivered".into()),
            one_line(a.error.as_deref().unwrap_or(""), 80),
        ]);
    }
    if !detail.attempts.is_empty() {
        print!("{}", table(&rows));
    }
    if let Some(e) = last_error {
        println!("\nlast error: {}", printable(&e));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_body(bytes: &[u8]) -> Result<()> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        Err(_) => println!("{}", printable(&String::from_utf8_lossy(bytes))),
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Action {
    Replay,
    Discard,
}

async fn bulk(journal: &SqliteJournal, selector: Selector, action: Action) -> Result<ExitCode> {
    let total = journal.count_dead(&selector).await?;
    let verb = match action {
        Action::Replay => "replayed",
        Action::Discard => "discarded",
    };
    if total == 0 {
        println!("no dead letters match; nothing {verb}");
        return Ok(ExitCode::SUCCESS);
    }
    let bar = (total >= PROGRESS_FROM).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(verb);
        bar
    });
    let mut done = 0u64;
    // One cut-off for every chunk: a record the running engine dead-letters
    // again while this runs is not picked up a second time.
    let now = SystemClock.now();
    loop {
        let n = match action {
            Action::Replay => journal.replay(&selector, now, CHUNK).await?,
            Action::Discard => journal.discard(&selector, now, CHUNK).await?,
        };
        if n == 0 {
            break;
        }
        done += n;
        if let Some(b) = &bar {
            b.set_position(done.min(total));
        }
        if n == CHUNK as u64 {
            tokio::time::sleep(CHUNK_GAP).await;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!("{verb} {done} record(s)");
    if matches!(action, Action::Replay) {
        println!("they keep their idempotency keys, so a partner that already applied one will not apply it twice");
    }
    Ok(ExitCode::SUCCESS)
}

/// Text from outside (payloads, partners' answers) with control characters
/// escaped, so it cannot drive the operator's terminal; newlines and tabs stay.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() && c != '\n' && c != '\t' { c.escape_default().to_string() } else { c.to_string() })
        .collect()
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}
