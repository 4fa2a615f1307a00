//! Loading a project (config + journal) and the commands that act on it as a whole.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use dovetail_core::config::{self, Loaded, StoreUrl, render_errors};
use dovetail_engine::{EngineOptions, EnvSecrets};
use dovetail_journal::{Journal, SqliteJournal, SqliteOptions};

/// Reads and checks the config, printing warnings; errors end the command.
pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("cannot read the config file {} (pass another with -c FILE or DOVETAIL_CONFIG; `dovetail init DIR` writes an example)", path.display())
    })?;
    match config::load(&text, path) {
        Ok((loaded, warnings)) => {
            if !warnings.is_empty() {
                eprintln!("{}", render_errors(&warnings));
            }
            Ok(loaded)
        }
        Err(errors) => bail!("the config has errors:\n{errors}"),
    }
}

/// Where the journal of this project lives.
pub fn store_path(loaded: &Loaded) -> PathBuf {
    let StoreUrl::Sqlite(path) =
        StoreUrl::parse(&loaded.config.engine.store).expect("checked by config::load").relative_to(loaded.base_dir());
    path
}

/// Opens the journal for a read or operator command; refuses to create one.
pub fn open_existing_journal(loaded: &Loaded) -> Result<Arc<SqliteJournal>> {
    let path = store_path(loaded);
    if !path.exists() {
        bail!(
            "there is no journal at {} yet: the engine has not run with this config (start it with `dovetail run`)",
            path.display()
        );
    }
    Ok(Arc::new(SqliteJournal::open(&path, SqliteOptions::default())?))
}

pub fn check(path: &Path) -> Result<ExitCode> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the config file {}", path.display()))?;
    let loaded = match config::load(&text, path) {
        Ok((loaded, warnings)) => {
            if !warnings.is_empty() {
                println!("{}", render_errors(&warnings));
            }
            loaded
        }
        Err(errors) => {
            println!("{errors}");
            println!(
                "{}: {} error(s)",
                path.display(),
                errors.0.iter().filter(|e| e.severity == config::Severity::Error).count()
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    // Secrets and files are independent: report the problems of both at once.
    let mut errors = Vec::new();
    if let Err(e) = loaded.resolve(&EnvSecrets) {
        errors.extend(e.0);
    }
    if let Err(e) = loaded.pipelines(&read_file) {
        errors.extend(e.0);
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| e.line);
        let errors = config::ConfigErrors(errors);
        println!("{errors}");
        println!("{}: {} error(s)", path.display(), errors.0.len());
        return Ok(ExitCode::FAILURE);
    }
    let c = &loaded.config;
    println!("{}: ok ({} connector(s), {} flow(s))", path.display(), c.connectors.len(), c.flows.len());
    Ok(ExitCode::SUCCESS)
}

pub async fn run(loaded: Loaded) -> Result<ExitCode> {
    let resolved =
        match loaded.resolve(&EnvSecrets).and_then(|mut r| loaded.attach_files(&mut r, &read_file).map(|()| r)) {
            Ok(r) => r,
            Err(errors) => bail!("the config cannot run:\n{errors}"),
        };
    let store = store_path(&loaded);
    let journal: Arc<dyn Journal> = Arc::new(SqliteJournal::open(&store, SqliteOptions::default())?);
    let listen = &loaded.config.engine.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (is another engine running? change [engine] listen)"))?;
    let options = EngineOptions { base_dir: loaded.base_dir().to_path_buf(), ..EngineOptions::default() };
    let engine = dovetail_engine::start(&loaded.config, &resolved, journal, listener, options).await?;
    eprintln!("dovetail: listening on http://{} with journal {}", engine.addr, store.display());
    engine.run_until(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn read_file(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}

pub async fn resume(path: &Path, flow: &str) -> Result<ExitCode> {
    let loaded = load(path)?;
    let notifier = flow.strip_prefix("notify.").is_some_and(|n| loaded.config.notify.contains_key(n));
    if !loaded.config.flows.contains_key(flow) && !notifier {
        bail!("there is no flow named `{flow}` in {}", path.display());
    }
    let journal = open_existing_journal(&loaded)?;
    if journal.resume_flow(flow).await? {
        println!("flow `{flow}` resumed; its held records will be delivered");
    } else {
        println!("flow `{flow}` was not paused");
    }
    Ok(ExitCode::SUCCESS)
}
