//! `dovetail dev`: a local stand-in partner and a signed-webhook sender, so
//! an integration can be tried end to end on one machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use dovetail_core::clock::{Clock, SystemClock};
use dovetail_core::config::{SecretSource, SourceConfig};
use dovetail_core::signature::{SigningSecret, sign};
use dovetail_engine::EnvSecrets;
use dovetail_testkit::partner::{Behaviour, Partner, Reply};

use crate::project;

#[derive(Subcommand)]
pub enum DevCommand {
    /// A partner API on LISTEN that honours Idempotency-Key and logs what it receives.
    Partner {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: SocketAddr,
        /// Answer 422 to bodies containing this text (to see the DLQ at work).
        #[arg(long)]
        fail_body: Option<String>,
    },
    /// POST FILE to FLOW's webhook, signed with the flow's secret.
    Send {
        flow: String,
        file: PathBuf,
        /// Send this many deliveries, each with its own delivery id.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
}

pub async fn run(config: &Path, cmd: DevCommand) -> Result<ExitCode> {
    match cmd {
        DevCommand::Partner { listen, fail_body } => partner(listen, fail_body).await,
        DevCommand::Send { flow, file, count } => send(config, &flow, &file, count).await,
    }
}

async fn partner(listen: SocketAddr, fail_body: Option<String>) -> Result<ExitCode> {
    let mut behaviour = Behaviour::always(Reply::Ok);
    if let Some(needle) = &fail_body {
        behaviour = behaviour.fail_body(
            needle,
            Reply::Status { status: 422, body: r#"{"error":"rejected by the dev partner"}"#.into() },
        );
    }
    let p = Partner::start_on(listen, behaviour).await.with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!("dev partner on {} (Ctrl-C to stop)", p.url());
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
        let requests = p.requests();
        for r in requests.iter().skip(seen) {
            eprintln!(
                "{} {}  idempotency-key={}  correlation-id={}  {} bytes",
                r.method,
                r.path,
                r.header("idempotency-key").unwrap_or("-"),
                r.header("x-correlation-id").unwrap_or("-"),
                r.body.len()
            );
        }
        seen = requests.len();
    }
    let s = p.stats();
    eprintln!("dev partner: {} requests, {} effects, {} idempotent replays", s.requests, s.effects, s.replays);
    Ok(ExitCode::SUCCESS)
}

async fn send(config: &Path, flow: &str, file: &Path, count: u32) -> Result<ExitCode> {
    let loaded = project::load(config)?;
    let Some(f) = loaded.config.flows.get(flow) else { bail!("there is no flow named `{flow}`") };
    let SourceConfig::Webhook { path, signature } = &f.source else {
        bail!("flow `{flow}` does not receive webhooks: its source polls a partner")
    };
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let url = format!("http://{}{}", loaded.config.engine.listen, path);
    let client = reqwest::Client::new();
    for _ in 0..count {
        let id = format!("msg_{:016x}", fastrand::u64(..));
        let mut request = client.post(&url).header("content-type", "application/json").body(body.clone());
        if let Some(sig) = signature {
            let reference =
                sig.secret.as_ref().or(sig.secrets.first()).context("the flow's signature has no secret")?;
            let value = EnvSecrets.lookup(reference).with_context(|| format!("the secret `{reference}` is not set"))?;
            let secret = SigningSecret::parse(sig.scheme, value.expose())?;
            for (name, value) in sign(sig.scheme, &secret, &id, SystemClock.now(), &body) {
                request = request.header(name, value);
            }
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the engine at {url} (is `dovetail run` running?)"))?;
        let status = response.status();
        println!("{} {}", status.as_u16(), response.text().await.unwrap_or_default());
        if !status.is_success() {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}
