//! `nudge-bench` (run as `nudge bench`, which hands over to it): how fast
//! nudge takes a busy shop's events into effect on this machine, against the
//! yardstick of what the broker can deliver.
//!
//! In one run, on private services from the test kit (a `nats-server -js`, an
//! SMTP sink that counts every mail) and a fresh SQLite file:
//! 1. pre-loads the stream with a realistic workload
//!    ([`nudge_kit::workload`]);
//! 2. reads it with a bare pull consumer that parses and acks (the raw rate);
//! 3. runs the real daemon ([`Application`], every task, every shipped rule)
//!    over the same events until all of them are committed and acked;
//! 4. publishes at a steady rate and times each event to its commit;
//! 5. reports rates, their ratio, latency percentiles and memory.
//!
//! With `--backtest` it measures `nudge backtest` instead ([`backtest`]):
//! a large shop history written straight into a scratch database, then every
//! shipped rule run over it; with `--export`, `nudge export` over such a
//! history ([`export`]).
//!
//! It is a measurement, not a test: nothing fails on a slow machine.

mod backtest;
mod broker;
mod export;
mod latency;
mod probe;
mod report;

// The daemon's allocator: the bench runs the daemon in-process and must
// measure it as `nudge run` runs.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use anyhow::{Context, bail};
use chrono::{Duration as Span, Utc};
use clap::Parser;
use nudge::app::Application;
use nudge::config::{Config, TeamConfig, Transport};
use nudge_kit::nats::NatsServer;
use nudge_kit::smtp::SmtpSink;
use nudge_kit::workload::{self, Shape, Spec, render};
use probe::Probe;
use report::{Cpu, Machine, Memory, PhaseCpu, Rate, Report};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "nudge bench",
    bin_name = "nudge bench",
    version,
    about = "Measure throughput and latency on this machine, on private NATS and \
             SQLite, against a bare consumer's rate (see docs/performance.md)"
)]
struct Cli {
    /// YAML configuration, looked up as `nudge` does: this option, then
    /// NUDGE_CONFIG, then `nudge.yaml` in the working folder, else the
    /// built-in defaults. Only its rules, templates and their settings are
    /// used: the infrastructure is the bench's own.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    args: BenchArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli
        .config
        .or_else(|| {
            std::env::var_os("NUDGE_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .or_else(|| Some(PathBuf::from("nudge.yaml")).filter(|p| p.is_file()));
    let mut config = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nudge bench: {e}");
            return ExitCode::from(2);
        }
    };
    // A line per mail sent would bury the report; RUST_LOG still wins.
    config.log.level = "warn".into();
    nudge::telemetry::init(&config.log);
    match run(cli.args, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nudge bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
struct BenchArgs {
    /// Events pre-loaded into the stream and measured [default: 200000;
    /// with --backtest or --export 1000000].
    #[arg(long)]
    events: Option<usize>,
    /// Distinct clients the events come from [default: one per 20 events].
    #[arg(long)]
    clients: Option<u32>,
    /// Measure `nudge backtest` instead: write the bench's shop straight
    /// into a scratch SQLite database (no NATS), then backtest every
    /// shipped rule over all of it.
    #[arg(long)]
    backtest: bool,
    /// Measure `nudge export` instead: write the bench's shop straight into
    /// a scratch SQLite database (no NATS), then export it as Parquet and
    /// as CSV.
    #[arg(long, conflicts_with = "backtest")]
    export: bool,
    /// Use this NATS server (a stream of the bench's own is created and
    /// deleted) instead of starting a private `nats-server -js`.
    #[arg(long)]
    nats_url: Option<String>,
    /// An empty database to measure: `sqlite://FILE` or `postgres://...`
    /// (e.g. made with `createdb`). Default: a fresh SQLite file in a
    /// scratch folder. Never the configured `database.url`.
    #[arg(long)]
    database_url: Option<String>,
    /// Events per second in the latency phase.
    #[arg(long, default_value_t = 1000)]
    latency_rate: u32,
    /// Seconds of the latency phase; 0 skips it.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Keep the scratch folder (database, mails, NATS store) and print where.
    #[arg(long)]
    keep: bool,
}

/// How long the daemon may take over the whole workload before the bench gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the sender gets to empty the outbox before the latency phase.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(90);
/// The workload's events happen over this span, ending when the bench starts.
const HISTORY_DAYS: i64 = 7;

/// Runs the bench with `base` for everything but the infrastructure, which
/// the bench replaces with its own (so it never touches a real database).
async fn run(args: BenchArgs, base: Config) -> anyhow::Result<()> {
    let scratch = Scratch::new(args.keep)?;
    if args.export {
        let db_url = args
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", scratch.path.join("history.db").display()));
        let report =
            export::run(args.events(), args.clients(), &base, &db_url, &scratch.path).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.table());
        }
        return Ok(());
    }
    if args.backtest {
        let db_url = args
            .database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", scratch.path.join("history.db").display()));
        let mut config = base;
        check_dirs(&config)?;
        shop_settings(&mut config);
        let report = backtest::run(args.events(), args.clients(), &config, &db_url).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report.table());
        }
        return Ok(());
    }
    // Declared after `scratch`, so the server stops before its store is removed.
    let server = match &args.nats_url {
        Some(_) => None,
        None => Some(
            NatsServer::start_in(&scratch.path.join("nats"))
                .context("no NATS server for the bench (or pass --nats-url)")?,
        ),
    };
    let nats_url = match (&args.nats_url, &server) {
        (Some(url), _) => url.clone(),
        (None, Some(s)) => s.url(),
        (None, None) => unreachable!("a server is started when no URL is given"),
    };
    let db_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", scratch.path.join("nudge.db").display()));
    let mail = SmtpSink::counting().context("no SMTP sink for the bench")?;
    let config = bench_config(base, &nats_url, &db_url, &mail.url(), &scratch.path)?;

    let client = async_nats::connect(nats_url.as_str())
        .await
        .with_context(|| format!("cannot connect to NATS at {nats_url}"))?;
    let js = async_nats::jetstream::new(client.clone());
    let stream = nudge::flow::ingest::ensure_stream(&js, &config.nats).await?;
    broker::wait_for_stream(&js, &config.nats.stream).await?;

    let nats_pid = server.as_ref().map(|s| s.pid());
    let result = measure(&args, &config, &client, &js, &stream, nats_pid, &mail).await;
    if let Err(e) = js.delete_stream(&config.nats.stream).await {
        tracing::warn!(error = %e, "cannot delete the bench stream");
    }
    let mut report = result?;
    report.nats = if server.is_some() {
        "private".into()
    } else {
        nats_url
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

async fn measure(
    args: &BenchArgs,
    config: &Config,
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    stream: &async_nats::jetstream::stream::Stream,
    nats_pid: Option<u32>,
    mail: &SmtpSink,
) -> anyhow::Result<Report> {
    // CPU of this process and of a private server, from now.
    let cpu_mark = || {
        (
            probe::cpu_secs(None),
            nats_pid.and_then(|p| probe::cpu_secs(Some(p))),
        )
    };
    let n = args.events();
    let start = Utc::now();
    let shape = Shape {
        clients: args.clients(),
        register: true,
        tag: "s",
    };
    let specs = workload::generate(n, &shape, 1, start, Span::days(HISTORY_DAYS));
    eprintln!(
        "bench: publishing {n} events from {} clients",
        args.clients()
    );
    let t = Instant::now();
    let last_seq = broker::publish_all(js, &config.nats, payloads(&specs)).await?;
    let publish = Rate::new(n, t.elapsed());
    drop(specs);

    eprintln!("bench: raw consumer");
    let mut raw_cfg = config.nats.clone();
    raw_cfg.consumer = "bench_raw".into();
    let before = cpu_mark();
    let raw = Rate::new(
        n,
        broker::raw_consume(client, stream, &raw_cfg, n, last_seq).await?,
    );
    let raw_cpu = PhaseCpu::between(before, cpu_mark(), n);

    let peak_reset = probe::reset_peak_memory();
    let rss_before = probe::memory_mib("VmRSS");
    let app = Application::build(config.clone()).await?;
    let refused = app.catalog().errors();
    if !refused.is_empty() {
        bail!(
            "rules or templates refused, the bench would measure the wrong work: {}",
            refused
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let probe = Probe::open(config.database.url.expose()).await?;
    if probe.all_events().await? != 0 {
        bail!("the database {} is not empty", config.database.url);
    }

    eprintln!(
        "bench: nudge with {} rules",
        app.catalog().rules().rules.len()
    );
    let cancel = CancellationToken::new();
    let before = cpu_mark();
    let t = Instant::now();
    let daemon = tokio::spawn(app.run_until_stopped(cancel.clone()));
    let phases = async {
        let consumer = broker::find_consumer(stream, &config.nats.consumer, RUN_TIMEOUT).await?;
        broker::wait_acked(&consumer, last_seq, RUN_TIMEOUT).await?;
        let nudge = Rate::new(n, t.elapsed());
        let nudge_cpu = PhaseCpu::between(before, cpu_mark(), n);
        let rss_after_run = probe::memory_mib("VmRSS");
        let stored = probe.shop_events().await?;
        if stored != n as u64 {
            bail!("{stored} of the shop's {n} events are in the database after all were acked");
        }
        eprintln!(
            "bench: nudge took {:.1} s; waiting for the outbox to drain",
            nudge.secs
        );
        let outbox_drain_secs = drain(&probe).await?;

        let latency = if args.latency_secs > 0 && args.latency_rate > 0 {
            eprintln!(
                "bench: latency at {} events/s for {} s",
                args.latency_rate, args.latency_secs
            );
            let live = Shape {
                clients: args.clients(),
                register: false,
                tag: "live",
            };
            let count = args.latency_rate as usize * args.latency_secs as usize;
            let specs = workload::generate(count, &live, 2, Utc::now(), Span::hours(1));
            Some(
                latency::measure(
                    js,
                    &config.nats,
                    &probe,
                    &specs,
                    args.latency_rate,
                    live.tag,
                )
                .await?,
            )
        } else {
            None
        };
        let (effects, _) = probe.outbox().await?;
        anyhow::Ok(Report {
            machine: Machine::this(),
            database: probe.describe().await?,
            nats: String::new(),
            events: n,
            clients: args.clients(),
            publish,
            raw,
            nudge,
            ratio: nudge.per_sec / raw.per_sec,
            cpu: Cpu {
                raw: raw_cpu,
                nudge: nudge_cpu,
            },
            stored_events: probe.all_events().await?,
            effects,
            mails_received: mail.received(),
            outbox_drain_secs,
            latency,
            memory: Memory {
                rss_before_mib: rss_before,
                rss_after_run_mib: rss_after_run,
                rss_after_latency_mib: probe::memory_mib("VmRSS"),
                peak_mib: probe::memory_mib("VmHWM"),
                peak_reset,
            },
        })
    }
    .await;
    // Whatever happened, stop the daemon the way SIGTERM would.
    cancel.cancel();
    match daemon.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the daemon stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "the daemon task panicked"),
    }
    phases
}

/// The workload as (id, type, JSON) in publish order.
fn payloads(specs: &[Spec]) -> impl Iterator<Item = (String, &'static str, Vec<u8>)> + '_ {
    specs.iter().enumerate().map(|(i, s)| {
        let id = format!("ev-{i:07}");
        let json = serde_json::to_vec(&render(s, &id, "s", None)).expect("JSON values serialise");
        (id, s.kind.type_name(), json)
    })
}

/// Seconds until nothing due is left in the outbox; `None` past the wait.
async fn drain(probe: &Probe) -> anyhow::Result<Option<f64>> {
    let t = Instant::now();
    while t.elapsed() < DRAIN_TIMEOUT {
        if probe.outbox().await?.1 == 0 {
            return Ok(Some(t.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(None)
}

/// The configuration under test: rules, templates and their settings from
/// `base`; NATS names, database, mail and HTTP the bench's own.
fn bench_config(
    mut c: Config,
    nats_url: &str,
    db_url: &str,
    smtp_url: &str,
    dir: &Path,
) -> anyhow::Result<Config> {
    check_dirs(&c)?;
    // Unique names, so a shared server (--nats-url) sees no clash.
    let tag = format!("{:x}", std::process::id());
    c.nats.url = nats_url.into();
    c.nats.stream = format!("NUDGE_BENCH_{tag}");
    c.nats.subject_prefix = format!("bench{tag}.shop");
    c.nats.emit_prefix = format!("bench{tag}.nudge");
    c.nats.consumer = "bench_nudge".into();
    c.database.url = db_url.into();
    c.mail.transport = Transport::Smtp;
    c.smtp.url = smtp_url.into();
    c.mail.dir = dir.join("mail");
    c.http.listen = ([127, 0, 0, 1], 0).into();
    // Any token: an open API would only add a warning to the output.
    c.http.token = Some(format!("bench-token-{tag}-0123456789").into());
    shop_settings(&mut c);
    Ok(c)
}

/// The rules and templates must be there, or the bench measures nothing.
fn check_dirs(c: &Config) -> anyhow::Result<()> {
    for (what, d) in [
        ("rules.dir", &c.rules.dir),
        ("templates.dir", &c.templates.dir),
    ] {
        if !d.is_dir() {
            bail!(
                "{what} {} is not a folder: run from the repository root or pass --config",
                d.display()
            );
        }
    }
    Ok(())
}

/// Teams and partner shares as in config.example.yaml, where the
/// configuration has none.
fn shop_settings(c: &mut Config) {
    // Without teams and partner shares, vip_callback and partner_attribution
    // would stop early and the bench would measure less than a shop gets:
    // use config.example.yaml's values when the configuration has none.
    if c.teams.is_empty() {
        for team in ["sales", "support"] {
            c.teams.insert(
                team.into(),
                TeamConfig {
                    email: nudge::domain::event::Email::parse(format!("{team}@shop.example"))
                        .expect("a valid address"),
                },
            );
        }
    }
    if c.rules.settings.is_empty() {
        c.rules.settings = serde_json::json!({
            "partner_shares": {"acme": 10},
            "default_partner_share": 5,
        })
        .as_object()
        .cloned()
        .unwrap_or_default();
    }
}

impl BenchArgs {
    fn events(&self) -> usize {
        self.events.unwrap_or(if self.backtest || self.export {
            1_000_000
        } else {
            200_000
        })
    }

    fn clients(&self) -> u32 {
        self.clients
            .unwrap_or((self.events() / 20).clamp(1, u32::MAX as usize) as u32)
    }
}

/// A scratch folder removed when dropped (unless kept).
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(keep: bool) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("nudge-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path, keep })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("bench: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
