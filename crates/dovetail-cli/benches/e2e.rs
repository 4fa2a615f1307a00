//! End to end, in one run: signed webhooks → `dovetail run` (a child
//! process, durable SQLite journal) → a fast loopback sink, against the
//! ceiling: the same load generator straight against the same sink.
//!
//! `cargo bench -p dovetail-cli --bench e2e -- [--seconds 10] [--connections 64]`
//!
//! Reports ingest records/s and latency (closed loop, as fast as the
//! engine answers), end-to-end delivered records/s, latency at half the
//! measured ingest rate (open loop: each request has a scheduled start and
//! its latency counts from then, so a stall is not hidden), ingest alone
//! with the flow paused (the engine journals and answers but delivers
//! nothing, as while a partner is down) with the journal writer's commits
//! from the engine's `/metrics`, the engine's RSS idle and at its
//! peak, and CPU time per record: the engine's per delivered record, the
//! generator's and sink's per request at the ceiling.
//! `DOVETAIL_BENCH_ENGINE=<path>` runs another build of the engine (and of
//! the CLI that replays), to compare two in alternating runs. Everything
//! runs on this machine's cores at once: the generator and the sink compete
//! with the engine, as they do for the ceiling.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dovetail_core::clock::Timestamp;
use dovetail_core::signature::{Scheme, SigningSecret, sign};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A ~300-byte order; `{n}` makes each one distinct.
fn body(n: u64) -> String {
    format!(
        r#"{{"id":"ord_{n:010}","customer":{{"id":"cus_42","email":"ada@example.com"}},"currency":"EUR","amount":"129.90","status":"paid","lines":[{{"sku":"A-1","qty":2,"price":"39.95"}},{{"sku":"B-7","qty":1,"price":"50.00"}}],"created_at":"2026-11-23T10:15:00Z"}}"#
    )
}

struct Args {
    seconds: u64,
    connections: usize,
    /// Run the scale phases instead: backlogs, replay, cost curve.
    scale: bool,
    /// The largest backlog of the scale phases (and the last point of the cost curve).
    backlog: u64,
    /// Dead letters replayed in the scale phases.
    replay: u64,
}

fn args() -> Args {
    let mut a = Args { seconds: 10, connections: 64, scale: false, backlog: 1_000_000, replay: 100_000 };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        if argv[i] == "--scale" {
            a.scale = true;
            i += 1;
            continue;
        }
        let value = argv.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match (argv[i].as_str(), value) {
            ("--seconds", Some(v)) => a.seconds = v.clamp(1, 600),
            ("--connections", Some(v)) => a.connections = (v as usize).clamp(1, 1024),
            ("--backlog", Some(v)) => a.backlog = v.clamp(1_000, 5_000_000),
            ("--replay", Some(v)) => a.replay = v.clamp(1_000, 1_000_000),
            // `cargo bench` passes `--bench`; anything else is ignored.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

// ---------------------------------------------------------------- the sink

/// A minimal HTTP/1.1 server answering 200 to every request, counting them.
async fn sink(listener: TcpListener, count: Arc<AtomicU64>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let count = count.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut conn = Conn::new(stream);
            while let Ok(Some(_)) = conn.read_message().await {
                count.fetch_add(1, Ordering::Relaxed);
                if conn.stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await.is_err() {
                    break;
                }
            }
        });
    }
}

/// One keep-alive connection's reads: a request or a response, head and
/// `Content-Length` body (chunked bodies too, for completeness).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        Conn { stream, buf: Vec::with_capacity(8192) }
    }

    /// The message's first line's second word (a response's status), or
    /// `None` at a clean end of stream.
    async fn read_message(&mut self) -> std::io::Result<Option<u16>> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                let chunked = head.contains("transfer-encoding: chunked");
                let start = end + 4;
                let total = match (length, chunked) {
                    (Some(n), _) => start + n,
                    (None, true) => loop {
                        if let Some(e) = find(&self.buf[start..], b"0\r\n\r\n") {
                            break start + e + 5;
                        }
                        self.fill().await?;
                    },
                    (None, false) => start,
                };
                while self.buf.len() < total {
                    self.fill().await?;
                }
                self.buf.drain(..total);
                return Ok(Some(status));
            }
            if self.fill().await? == 0 {
                return Ok(None);
            }
        }
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 && !self.buf.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-message"));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ------------------------------------------------------ the load generator

/// What one load run measured.
struct Load {
    ok: u64,
    failed: u64,
    elapsed: Duration,
    /// Microseconds per successful request, sorted.
    latencies: Vec<u32>,
}

impl Load {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies[i]) / 1000.0
    }
}

/// Signed POSTs of distinct records to `addr`+`path` over `connections`
/// keep-alive connections for `duration`. With `rate`, requests are
/// scheduled (open loop) and latency counts from the scheduled start.
/// `next` numbers the records across runs, so no run resends another's
/// (the engine would answer them as duplicates and deliver nothing).
async fn load(
    addr: String,
    path: &'static str,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
    next: Arc<AtomicU64>,
) -> Load {
    let secret = Arc::new(SigningSecret::parse(Scheme::StandardWebhooks, SECRET).expect("the bench secret"));
    let first = next.load(Ordering::Relaxed);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (addr, secret, next) = (addr.clone(), secret.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let (mut ok, mut failed) = (0u64, 0u64);
            let Ok(stream) = TcpStream::connect(&addr).await else { return (lat, 0, 1) };
            let _ = stream.set_nodelay(true);
            let mut conn = Conn::new(stream);
            let mut request = Vec::with_capacity(1024);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let scheduled = match rate {
                    Some(r) => start + Duration::from_secs_f64((n - first) as f64 / r),
                    None => Instant::now(),
                };
                if scheduled >= deadline {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                let b = body(n);
                let now = Timestamp::from_millis(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64),
                );
                request.clear();
                let _ = write!(
                    request,
                    "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    b.len()
                );
                for (name, value) in sign(Scheme::StandardWebhooks, &secret, &format!("msg_{n}"), now, b.as_bytes()) {
                    let _ = write!(request, "{name}: {value}\r\n");
                }
                request.extend_from_slice(b"\r\n");
                request.extend_from_slice(b.as_bytes());
                if conn.stream.write_all(&request).await.is_err() {
                    failed += 1;
                    break;
                }
                match conn.read_message().await {
                    Ok(Some(200..=299)) => {
                        ok += 1;
                        lat.push(scheduled.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                    Ok(Some(_)) => failed += 1,
                    Ok(None) | Err(_) => {
                        failed += 1;
                        break;
                    }
                }
            }
            (lat, ok, failed)
        }));
    }
    let mut out = Load { ok: 0, failed: 0, elapsed: Duration::ZERO, latencies: Vec::new() };
    for t in tasks {
        if let Ok((lat, ok, failed)) = t.await {
            out.latencies.extend(lat);
            out.ok += ok;
            out.failed += failed;
        }
    }
    out.elapsed = start.elapsed().max(duration);
    out.latencies.sort_unstable();
    out
}

// ---------------------------------------------------------------- the engine

struct Engine {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Engine {
    fn start(dir: &Path, sink_port: u16) -> Engine {
        let port = free_port();
        let config = format!(
            r#"[engine]
store = "sqlite://journal.db"
listen = "127.0.0.1:{port}"

[connectors.sink]
type = "http"
base_url = "http://127.0.0.1:{sink_port}"
max_in_flight = 64

[flows.bench]
source = {{ type = "webhook", path = "/hooks/bench", signature = {{ scheme = "standard-webhooks", secret = "env:BENCH_SECRET" }} }}
sink = {{ type = "http", connector = "sink", path = "/ingest" }}
"#
        );
        std::fs::write(dir.join("dovetail.toml"), config).expect("write the bench config");
        let log = std::fs::File::create(dir.join("engine.log")).expect("the engine log");
        // Another build of the engine, for comparing two in alternating runs.
        let program = engine_program();
        let child = Command::new(program)
            .args(["--config", "dovetail.toml", "--log-level", "warn", "run"])
            .current_dir(dir)
            .env("BENCH_SECRET", SECRET)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dovetail");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(&addr) {
            assert!(
                Instant::now() < deadline,
                "the engine did not become ready; see {}",
                dir.join("engine.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Engine { child, addr, dir: dir.to_path_buf() }
    }

    /// (VmRSS, VmHWM) in MiB.
    fn memory(&self) -> (f64, f64) {
        memory_of(self.child.id())
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// The `dovetail` binary to run: this build's, or another one, to compare
/// two in alternating runs (the replay's CLI too, since it shares the journal code).
fn engine_program() -> std::ffi::OsString {
    std::env::var_os("DOVETAIL_BENCH_ENGINE").unwrap_or_else(|| env!("CARGO_BIN_EXE_dovetail").into())
}

/// Writes back every dirty page before a timed phase: the files of the
/// phase before (the 1M journal is 600 MB) and of the fill would otherwise
/// be flushed while the engine fsyncs, and the replay figure swung between
/// 8.4k and 13.2k/s with it.
fn settle_disk() {
    let _ = Command::new("sync").status();
}

/// A process's (VmRSS, VmHWM) in MiB; NaN once it is gone.
fn memory_of(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// A process's CPU time (user + system, all its threads) in seconds;
/// `/proc` counts it in clock ticks, 100 per second on Linux.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields after it do not.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU time the hypervisor gave to other guests while this machine's
/// cores wanted it ("steal", the eighth figure of `/proc/stat`'s `cpu`
/// line), in seconds over all cores. Runs with much of it are not
/// comparable with runs without.
fn stolen() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().find(|l| l.starts_with("cpu ")).unwrap_or_default();
    cpu.split_whitespace().nth(8).and_then(|t| t.parse::<f64>().ok()).map_or(f64::NAN, |t| t / 100.0)
}

/// Samples a process's RSS every 100 ms on its own thread, with the sink's
/// count at each sample, until stopped.
struct Sampler {
    running: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u64, f64)>>,
}

impl Sampler {
    fn start(pid: u32, count: Arc<AtomicU64>) -> Sampler {
        let running = Arc::new(AtomicBool::new(true));
        let flag = running.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while flag.load(Ordering::Relaxed) {
                let (rss, _) = memory_of(pid);
                if rss.is_finite() {
                    samples.push((count.load(Ordering::Relaxed), rss));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        Sampler { running, thread }
    }

    /// (sink count, RSS MiB) samples, oldest first.
    fn stop(self) -> Vec<(u64, f64)> {
        self.running.store(false, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn peak(samples: &[(u64, f64)]) -> f64 {
    samples.iter().map(|s| s.1).fold(0.0, f64::max)
}

fn ready(addr: &str) -> bool {
    get(addr, "/readyz").is_some()
}

/// The body of a 200 answer to `GET path`, on a connection of its own.
fn get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The journal writer's counters from the engine's `/metrics`.
#[derive(Default)]
struct Commits {
    commits: f64,
    writes: f64,
    seconds: f64,
    /// Cumulative `(le, count)`, as Prometheus gives them.
    buckets: Vec<(f64, f64)>,
}

impl Commits {
    fn read(addr: &str) -> Commits {
        let text = get(addr, "/metrics").unwrap_or_default();
        let mut c = Commits::default();
        for line in text.lines().filter(|l| l.starts_with("dovetail_journal_")) {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            match name {
                "dovetail_journal_commits_total" => c.commits = value,
                "dovetail_journal_writes_total" => c.writes = value,
                "dovetail_journal_commit_duration_seconds_sum" => c.seconds = value,
                _ => {
                    let le = name.strip_prefix("dovetail_journal_commit_duration_seconds_bucket{le=\"");
                    if let Some(le) = le.and_then(|l| l.strip_suffix("\"}")) {
                        c.buckets.push((le.parse().unwrap_or(f64::INFINITY), value));
                    }
                }
            }
        }
        c
    }

    /// `after - self`, formatted: commits per second over `took`, writes
    /// per commit, the mean commit and the bucket bound under which 99 %
    /// of them fell.
    fn since(&self, after: &Commits, took: Duration) -> String {
        let commits = after.commits - self.commits;
        if commits <= 0.0 {
            return "no commits counted (an engine without the journal metrics?)".to_string();
        }
        let p99 = after
            .buckets
            .iter()
            .zip(self.buckets.iter().map(|b| b.1).chain(std::iter::repeat(0.0)))
            .find(|((_, n), before)| n - before >= 0.99 * commits)
            .map_or(f64::INFINITY, |((le, _), _)| *le);
        format!(
            "{:.0} commits/s, {:.1} writes per commit, commit mean {:.2} ms, 99 % within {} ms",
            commits / took.as_secs_f64(),
            (after.writes - self.writes) / commits,
            (after.seconds - self.seconds) * 1e3 / commits,
            p99 * 1e3
        )
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

// ------------------------------------------------------------------- main

fn main() {
    let args = args();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    if args.scale {
        rt.block_on(scale(args));
    } else {
        rt.block_on(run(args));
    }
}

/// The fast sink on a free port: its request counter and its port.
async fn start_sink() -> (Arc<AtomicU64>, u16) {
    let count = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the sink");
    let port = listener.local_addr().expect("sink address").port();
    tokio::spawn(sink(listener, count.clone()));
    (count, port)
}

async fn run(args: Args) {
    let seconds = Duration::from_secs(args.seconds);
    let (count, sink_port) = start_sink().await;
    let sink_addr = format!("127.0.0.1:{sink_port}");

    println!("e2e bench: {} s per phase, {} connections, ~300-byte records", args.seconds, args.connections);
    let numbers = Arc::new(AtomicU64::new(0));
    let (stolen_before, run_started) = (stolen(), Instant::now());
    let bench_cpu = cpu_of(std::process::id());
    let ceiling = load(sink_addr, "/ingest", args.connections, seconds, None, numbers.clone()).await;
    let bench_cpu = cpu_of(std::process::id()) - bench_cpu;
    println!(
        "ceiling (generator → sink): {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
        ceiling.rate(),
        ceiling.percentile(0.5),
        ceiling.percentile(0.99)
    );
    count.store(0, Ordering::Relaxed);

    let dir = tempfile::tempdir().expect("temp dir");
    let engine = Engine::start(dir.path(), sink_port);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle_rss, _) = engine.memory();

    let sampler = Sampler::start(engine.child.id(), count.clone());

    let started = Instant::now();
    let engine_cpu = cpu_of(engine.child.id());
    let ingest = load(engine.addr.clone(), "/hooks/bench", args.connections, seconds, None, numbers.clone()).await;
    let during = count.load(Ordering::Relaxed);
    // Drain: every acknowledged record reaches the sink.
    until_counted(&count, ingest.ok, Duration::from_secs(120)).await;
    let delivered = count.load(Ordering::Relaxed);
    let e2e_elapsed = started.elapsed();
    let engine_cpu = cpu_of(engine.child.id()) - engine_cpu;
    let e2e = delivered as f64 / e2e_elapsed.as_secs_f64();
    if delivered < ingest.ok {
        println!("NOT DRAINED: {delivered} of {} acknowledged records reached the sink within 120 s", ingest.ok);
    }

    let half = ingest.rate() / 2.0;
    count.store(0, Ordering::Relaxed);
    let paced = load(engine.addr.clone(), "/hooks/bench", args.connections, seconds, Some(half), numbers.clone()).await;
    until_counted(&count, paced.ok, Duration::from_secs(120)).await;
    let peak_rss = peak(&sampler.stop());
    let (_, hwm) = engine.memory();
    engine.stop();

    // Ingest alone: the flow paused in the journal (as after an auth
    // failure), so the engine journals and answers but delivers nothing, as
    // when the partner is down and records pile up.
    hold(&dir.path().join("journal.db")).await;
    let engine = Engine::start(dir.path(), sink_port);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (held_cpu, held_commits, held_started) =
        (cpu_of(engine.child.id()), Commits::read(&engine.addr), Instant::now());
    let held = load(engine.addr.clone(), "/hooks/bench", args.connections, seconds, None, numbers.clone()).await;
    let held_cpu = cpu_of(engine.child.id()) - held_cpu;
    let held_commits = held_commits.since(&Commits::read(&engine.addr), held_started.elapsed());
    engine.stop();

    let c = ceiling.rate();
    println!();
    println!("| measure | value | vs ceiling |");
    println!("|---|---|---|");
    println!("| ceiling: generator → sink | {c:.0} req/s | 1.00 |");
    println!(
        "| ingest, signed + durable (202) | {:.0} rec/s, p50 {:.2} ms, p99 {:.2} ms, {} failed | {:.2} |",
        ingest.rate(),
        ingest.percentile(0.5),
        ingest.percentile(0.99),
        ingest.failed,
        ingest.rate() / c
    );
    println!(
        "| end to end, delivered to the sink | {e2e:.0} rec/s ({delivered} of {} in {:.1} s; {during} during the ingest phase) | {:.2} |",
        ingest.ok,
        e2e_elapsed.as_secs_f64(),
        e2e / c
    );
    println!(
        "| ingest alone, delivery held (flow paused) | {:.0} rec/s, p50 {:.2} ms, p99 {:.2} ms, {} failed; engine {:.1} µs per record | {:.2} |",
        held.rate(),
        held.percentile(0.5),
        held.percentile(0.99),
        held.failed,
        held_cpu * 1e6 / held.ok.max(1) as f64,
        held.rate() / c
    );
    println!("| journal writer, ingest alone | {held_commits} | |");
    println!(
        "| ingest at half that rate ({half:.0}/s, open loop) | p50 {:.2} ms, p99 {:.2} ms, {} of {} ok | |",
        paced.percentile(0.5),
        paced.percentile(0.99),
        paced.ok,
        paced.ok + paced.failed
    );
    println!("| engine RSS | idle {idle_rss:.1} MiB, peak {peak_rss:.1} MiB sampled, {hwm:.1} MiB high-water | |");
    // CPU per record is steadier than rates on a shared machine: it is what
    // the rates divide two cores by.
    println!(
        "| CPU per record | engine {:.1} µs (ingest and delivery, from the ingest phase to the drain); generator + sink {:.1} µs per request at the ceiling | |",
        engine_cpu * 1e6 / delivered.max(1) as f64,
        bench_cpu * 1e6 / ceiling.ok.max(1) as f64
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let stolen = stolen() - stolen_before;
    println!(
        "| CPU stolen by the hypervisor | {stolen:.1} s over the {:.0} s run, {:.0} % of the cores' time (compare runs only with little of it) | |",
        run_started.elapsed().as_secs_f64(),
        100.0 * stolen / (cores * run_started.elapsed().as_secs_f64())
    );
}

// ------------------------------------------------------------ scale phases

/// Writes `n` records of the bench flow straight into the journal at
/// `path`, as intake would have stored them: pending and prepared, or dead
/// after a partner's refusal. Returns records/s.
async fn fill(path: &Path, n: u64, dead: bool) -> f64 {
    use dovetail_core::policy::ErrorClass;
    use dovetail_journal::{Journal, NewRecord, Prepared, SqliteJournal, SqliteOptions};
    let journal = Arc::new(SqliteJournal::open(path, SqliteOptions::default()).expect("open the bench journal"));
    let received_at = Timestamp::from_millis(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64) - 60_000,
    );
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..256 {
        let (journal, next) = (journal.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let delivery_id = format!("fill_{i}");
                let record = NewRecord {
                    flow: "bench".into(),
                    external_key: None,
                    idempotency_key: dovetail_core::ids::idempotency_key("bench", Some(&delivery_id)),
                    delivery_id: Some(delivery_id),
                    correlation_id: format!("{i:032x}"),
                    content_type: Some("application/json".into()),
                    payload: body(i).into_bytes(),
                    received_at,
                    quarantine: dead.then(|| (ErrorClass::Rejected, "422 from the partner: unknown customer".into())),
                    prepared: (!dead).then(Prepared::default),
                };
                journal.ingest(record).await.expect("fill the bench journal");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    n as f64 / started.elapsed().as_secs_f64()
}

/// Pauses the bench flow in the journal at `path` (the engine stopped).
async fn hold(path: &Path) {
    use dovetail_journal::{Journal, SqliteJournal, SqliteOptions};
    let journal = SqliteJournal::open(path, SqliteOptions::default()).expect("open the bench journal");
    let now = Timestamp::from_millis(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
    );
    journal.pause_flow("bench", "held by the bench: ingest alone", now).await.expect("pause the bench flow");
}

/// Waits until the sink has counted `n` (or `limit` passed); the time it took.
async fn until_counted(count: &AtomicU64, n: u64, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while count.load(Ordering::Relaxed) < n {
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(started.elapsed())
}

/// RSS when the sink had counted 0, 25, 50, 75 and 100 % of `n`.
fn by_progress(samples: &[(u64, f64)], n: u64) -> Vec<f64> {
    [0, 25, 50, 75, 100]
        .iter()
        .map(|pct| {
            let target = n * pct / 100;
            samples.iter().find(|(c, _)| *c >= target).or(samples.last()).map_or(f64::NAN, |s| s.1)
        })
        .collect()
}

/// Backlogs of growing size drained into the sink (rate, memory along the
/// way), then fresh ingest on top of each journal (the cost curve), then a
/// dead-letter replay.
async fn scale(args: Args) {
    let seconds = Duration::from_secs(args.seconds);
    let (count, sink_port) = start_sink().await;
    let sink_addr = format!("127.0.0.1:{sink_port}");
    println!(
        "e2e scale bench: backlogs up to {}, {} dead letters replayed, {} s ingest per point, {} connections",
        args.backlog, args.replay, args.seconds, args.connections
    );
    let numbers = Arc::new(AtomicU64::new(0));
    let ceiling = load(sink_addr, "/ingest", args.connections, seconds, None, numbers.clone()).await.rate();
    println!("ceiling (generator → sink): {ceiling:.0}/s");

    let mut sizes: Vec<u64> = [10_000, 100_000].into_iter().filter(|n| *n < args.backlog).collect();
    sizes.push(args.backlog);
    let mut rows = Vec::new();
    for n in sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        let fill_rate = fill(&dir.path().join("journal.db"), n, false).await;
        settle_disk();
        count.store(0, Ordering::Relaxed);
        // The drain is timed from the engine's start: it delivers before it
        // answers /readyz.
        let started = Instant::now();
        let engine = Engine::start(dir.path(), sink_port);
        let sampler = Sampler::start(engine.child.id(), count.clone());
        // Bounded: even at 1,000 records/s the drain ends within the limit.
        let drained = until_counted(&count, n, Duration::from_secs(n / 1_000 + 60)).await.map(|_| started.elapsed());
        let drain_samples = sampler.stop();
        let Some(drained) = drained else {
            println!("NOT DRAINED: {} of a backlog of {n} reached the sink", count.load(Ordering::Relaxed));
            engine.stop();
            continue;
        };
        let sampler = Sampler::start(engine.child.id(), count.clone());
        let ingest = load(engine.addr.clone(), "/hooks/bench", args.connections, seconds, None, numbers.clone()).await;
        let ingest_peak = peak(&sampler.stop());
        let size: u64 = ["journal.db", "journal.db-wal"]
            .iter()
            .map(|f| std::fs::metadata(dir.path().join(f)).map_or(0, |m| m.len()))
            .sum();
        engine.stop();
        let quartiles = by_progress(&drain_samples, n);
        println!(
            "backlog {n}: filled at {fill_rate:.0}/s; drained at {:.0}/s; RSS while draining {}; ingest on top {:.0}/s",
            n as f64 / drained.as_secs_f64(),
            quartiles.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>().join(" / "),
            ingest.rate()
        );
        rows.push((n, drained, drain_samples, quartiles, ingest, ingest_peak, size));
    }

    // Dead-letter replay: `dovetail dlq replay --flow bench` against the running engine.
    let dir = tempfile::tempdir().expect("temp dir");
    fill(&dir.path().join("journal.db"), args.replay, true).await;
    settle_disk();
    count.store(0, Ordering::Relaxed);
    let engine = Engine::start(dir.path(), sink_port);
    let sampler = Sampler::start(engine.child.id(), count.clone());
    let started = Instant::now();
    // Waited for on the blocking pool: the sink shares this runtime's two workers.
    let cwd = dir.path().to_path_buf();
    let (replay, command_took) = tokio::task::spawn_blocking(move || {
        let status = Command::new(engine_program())
            .args(["--config", "dovetail.toml", "--log-level", "warn", "dlq", "replay", "--flow", "bench"])
            .current_dir(cwd)
            .env("BENCH_SECRET", SECRET)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run dovetail dlq replay");
        (status, started.elapsed())
    })
    .await
    .expect("the replay command's thread");
    let replayed = until_counted(&count, args.replay, Duration::from_secs(args.replay / 1_000 + 60)).await;
    let replayed = replayed.map(|_| started.elapsed());
    let replay_peak = peak(&sampler.stop());
    engine.stop();

    println!();
    println!("ceiling (generator → sink): {ceiling:.0} req/s");
    println!();
    println!(
        "| records in the journal | drained at | RSS while draining (0/25/50/75/100 %) | peak | ingest on top | vs ceiling | p99 | RSS peak | journal file |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (n, drained, samples, quartiles, ingest, ingest_peak, size) in &rows {
        println!(
            "| {n} | {:.0} rec/s | {} MiB | {:.1} MiB | {:.0} rec/s | {:.2} | {:.2} ms | {ingest_peak:.1} MiB | {:.0} MiB |",
            *n as f64 / drained.as_secs_f64(),
            quartiles.iter().map(|r| format!("{r:.1}")).collect::<Vec<_>>().join(" / "),
            peak(samples),
            ingest.rate(),
            ingest.rate() / ceiling,
            ingest.percentile(0.99),
            *size as f64 / 1048576.0
        );
    }
    match replayed {
        Some(t) if replay.success() => println!(
            "\ndead-letter replay: {} records replayed and delivered in {:.1} s: {:.0} rec/s (the command took {:.1} s; engine RSS peak {replay_peak:.1} MiB)",
            args.replay,
            t.as_secs_f64(),
            args.replay as f64 / t.as_secs_f64(),
            command_took.as_secs_f64()
        ),
        _ => println!(
            "\ndead-letter replay FAILED: `dlq replay` {replay}, {} of {} delivered",
            count.load(Ordering::Relaxed),
            args.replay
        ),
    }
}
