//! The `nudge` command line: parse arguments, call into the library.

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cli::bench::run_bench;
use cli::config::{Checked, ConfigSource, DEFAULT_CONFIG_FILE};
use cli::signals::{StopSignals, stop_on_signal};
use nudge::app::{Application, open_store};
use nudge::config::Config;
use nudge::core::decide::CoreSettings;
use nudge::flow::catalog::Catalog;
use nudge::flow::pipeline::Pipeline;
use nudge::flow::scheduler::Scheduler;
use nudge::metrics::Metrics;
use nudge::store::Staff;
use nudge::tools;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "nudge",
    version,
    about = "Marketing-automation rules engine daemon"
)]
struct Cli {
    /// YAML configuration. Looked up in this order: this option, then the
    /// NUDGE_CONFIG environment variable, then `nudge.yaml` in the working
    /// folder; without any, the built-in defaults (no teams, no
    /// rules.settings). Every key can be overridden by NUDGE__SECTION__KEY.
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: consume events, run rules, send mail.
    Run,
    /// Validate the configuration, rules and templates, and what the rules
    /// reach (templates, functions, template variables); exit non-zero with
    /// `file:line: message` for each problem.
    Check {
        /// One JSON object: the configuration used, the counts and the problems.
        #[arg(long)]
        json: bool,
    },
    /// List rejected events with their reasons, newest first.
    Rejected {
        /// How many to list at most.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publish contract events from a JSON-lines file to the stream.
    Publish {
        /// The events, one JSON envelope per line (`#` comments and blank lines allowed).
        file: PathBuf,
        /// A JSON object with the count instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Create or update the database schema, then exit.
    Migrate {
        /// A JSON object instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Erase a client's personal data everywhere (GDPR), keeping anonymous aggregates.
    Forget {
        /// The client id, as the shop sends it.
        client: String,
        /// A JSON object with the outcome instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Run a scheduled rule's sweep now; the running daemon sends what it queues.
    Trigger {
        /// The rule's name (its file name without `.rhai`).
        rule: String,
        /// A JSON object with the clients swept and the effects queued.
        #[arg(long)]
        json: bool,
    },
    /// Run the rule tests; says which configuration it uses.
    Test {
        /// Test files, or folders of `*.yaml` files (default: `<rules.dir>/tests`).
        paths: Vec<PathBuf>,
        /// One JSON object with the counts and the report.
        #[arg(long)]
        json: bool,
    },
    /// Show the mails a rule would send a client now (or at --at), rendered
    /// with every variable the rule computes and a real unsubscribe link;
    /// or render a template with a client's profile or given variables.
    Preview {
        /// A rule (with --client: run it for that client, nothing queued), or a template.
        name: String,
        /// Use this client's stored history.
        #[arg(long, conflicts_with = "vars")]
        client: Option<String>,
        /// With a rule: the time it runs at (RFC 3339; default: now).
        #[arg(long, requires = "client")]
        at: Option<chrono::DateTime<chrono::Utc>>,
        /// Render the template with the variables in this YAML or JSON file
        /// (over its front-matter defaults).
        #[arg(long)]
        vars: Option<PathBuf>,
        /// Also write the (first) HTML part to this file, for a browser.
        #[arg(long)]
        html: Option<PathBuf>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild clients, sessions, timers and counters from the event log with
    /// the rules in force; nothing is sent. Stop the daemons first.
    Replay {
        /// Re-read the JetStream stream instead (for a fresh database).
        #[arg(long)]
        from_stream: bool,
        /// With --from-stream: start at this stream sequence.
        #[arg(long, requires = "from_stream", conflicts_with = "since")]
        since_seq: Option<u64>,
        /// With --from-stream: start at this time (RFC 3339).
        #[arg(long, requires = "from_stream")]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Print the outcome as one JSON object (progress stays on stderr).
        #[arg(long)]
        json: bool,
    },
    /// Run rules over the stored history on a scratch copy and report what
    /// they would have done. Sends nothing, changes nothing.
    Backtest {
        /// The rules to try (default: rules.dir).
        #[arg(long)]
        rules: Option<PathBuf>,
        /// Report effects from this time on (RFC 3339); history before it still counts.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Stop at this time (RFC 3339).
        #[arg(long)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// One JSON line per effect instead of a summary (with --report:
        /// one JSON object of the reports by rule).
        #[arg(long)]
        json: bool,
        /// Report per rule how many clients it would have reached and how
        /// many of them converted anyway (a baseline: nothing was sent then).
        #[arg(long)]
        report: bool,
    },
    /// What a rule achieves: per experiment and variant, clients exposed,
    /// mailed, opened, clicked and converted, revenue, and the lift against
    /// the control with its 95 % interval and p-value.
    Report {
        /// The rule (file stem in rules.dir).
        rule: String,
        /// Exposures from this time on (RFC 3339).
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Exposures before this time (RFC 3339).
        #[arg(long)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// The report as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write the history as Parquet or CSV files for analysts (DuckDB,
    /// ClickHouse, Spark, pandas): incremental, idempotent, one snapshot.
    Export(cli::export::ExportArgs),
    /// Measure throughput and latency on this machine, on private NATS and
    /// SQLite, against a bare consumer's rate (see docs/performance.md):
    /// runs the `nudge-bench` program next to this one with the same
    /// arguments (`nudge bench --help` lists them).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { args } = cli.command {
        return run_bench(cli.config, args);
    }
    let source = ConfigSource::find(cli.config, std::env::var_os("NUDGE_CONFIG"));
    let config = match Config::load(source.path()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nudge: {e}");
            return ExitCode::from(2);
        }
    };
    nudge::telemetry::init(&config.log);
    match dispatch(cli.command, config, source).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nudge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(
    command: Command,
    config: Config,
    source: ConfigSource,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => {
            // Handlers first: a SIGTERM during startup (a rolling restart
            // does not wait) is a clean stop, not death by signal.
            let cancel = CancellationToken::new();
            tokio::spawn(stop_on_signal(StopSignals::install()?, cancel.clone()));
            let app = tokio::select! {
                app = Application::build(config) => app?,
                _ = cancel.cancelled() => return Ok(ExitCode::SUCCESS),
            };
            app.run_until_stopped(cancel).await?;
        }
        Command::Check { json } => {
            let c = Checked::load(&config);
            let ok = c.problems.is_empty();
            if json {
                let v = serde_json::json!({
                    "config": source.path(),
                    "ok": ok,
                    "rules": c.rules.rules.len(),
                    "templates": c.templates.names().count(),
                    "problems": c.problems,
                });
                println!("{v}");
            } else {
                println!("{}", source.describe());
                for p in &c.problems {
                    println!("{p}");
                }
                if ok {
                    println!(
                        "ok: {} rules, {} templates",
                        c.rules.rules.len(),
                        c.templates.names().count()
                    );
                } else {
                    println!("{} problem(s)", c.problems.len());
                }
            }
            if !ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Rejected { limit, json } => {
            let store = open_store(&config).await?;
            for r in store.list_rejected(limit).await? {
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "{}  seq={}  {}  {}\n    {}",
                        r.received_at.to_rfc3339(),
                        r.stream_seq.map_or("-".into(), |s| s.to_string()),
                        r.subject,
                        r.reason,
                        r.payload.chars().take(200).collect::<String>()
                    );
                }
            }
        }
        Command::Publish { file, json } => {
            let n = nudge::flow::publish::publish_file(&config.nats, &file)
                .await
                .context("publish failed")?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"published": n, "stream": config.nats.stream})
                );
            } else {
                println!("published {n} events to {}", config.nats.stream);
            }
        }
        Command::Trigger { rule, json } => {
            let store = open_store(&config).await?;
            let catalog = Arc::new(Catalog::load(&config));
            let pipeline = Arc::new(Pipeline::new(
                store,
                catalog.clone(),
                Arc::new(Metrics::default()),
                &config,
            ));
            let scheduler = Scheduler::new(
                pipeline,
                catalog,
                config.scheduler.clone(),
                Arc::new(Notify::new()),
            );
            let report = scheduler.trigger(&rule).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"rule": report.rule, "clients": report.clients, "effects": report.effects})
                );
            } else {
                println!(
                    "rule {}: swept {} clients, queued {} effects",
                    report.rule, report.clients, report.effects
                );
            }
        }
        Command::Test { paths, json } => {
            let c = Checked::load(&config);
            if !json {
                println!("{}", source.describe());
            }
            if !c.problems.is_empty() {
                let lines: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
                if json {
                    let v = serde_json::json!({"config": source.path(), "passed": 0,
                        "failed": 0, "problems": c.problems});
                    println!("{v}");
                } else {
                    println!("{}", lines.join("\n"));
                    println!(
                        "{} problem(s) in rules or templates: fix them before testing (`nudge check`)",
                        lines.len()
                    );
                }
                return Ok(ExitCode::FAILURE);
            }
            let paths = if paths.is_empty() {
                vec![nudge::tools::ruletest::default_dir(&config.rules.dir)]
            } else {
                paths
            };
            let files = nudge::tools::ruletest::collect_files(&paths)?;
            let settings = CoreSettings::from_config(&config);
            let subject = nudge::tools::ruletest::Subject {
                engine: &c.engine,
                rules: &c.rules,
                templates: &c.templates,
                settings: &settings,
                business_tz: config.history.business_tz(),
                config_note: matches!(source, ConfigSource::Defaults).then(|| {
                    format!(
                        "run with the built-in defaults (no --config, NUDGE_CONFIG or ./{DEFAULT_CONFIG_FILE}): \
                         no teams and no rules.settings, so tasks and settings-driven rules do nothing"
                    )
                }),
            };
            let report = nudge::tools::ruletest::run_files(&subject, &files);
            if json {
                let v = serde_json::json!({"config": source.path(), "passed": report.passed,
                    "failed": report.failed, "report": report.output});
                println!("{v}");
            } else {
                print!("{}", report.output);
            }
            if report.failed > 0 || report.passed == 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Preview {
            name,
            client,
            at,
            vars,
            html,
            json,
        } => {
            let catalog = Catalog::load(&config);
            let is_rule = catalog.rules().get(&name).is_some();
            let mut parts: Vec<(String, nudge::core::templates::Rendered)> = Vec::new();
            let rule_mode = is_rule && client.is_some();
            match (client, vars) {
                (Some(c), _) if is_rule => {
                    let store = open_store(&config).await?;
                    let at = at.unwrap_or_else(chrono::Utc::now);
                    let p = tools::preview_rule(&config, &store, &name, &c, at).await?;
                    if json {
                        println!("{}", serde_json::to_string(&p)?);
                    } else {
                        println!(
                            "rule {} for client {} at {}",
                            p.rule,
                            p.client_id,
                            p.at.to_rfc3339()
                        );
                        for l in &p.log {
                            println!("  log: {l}");
                        }
                        for o in &p.other {
                            println!("  {o}");
                        }
                        if p.mails.is_empty() {
                            println!("  no mail");
                        }
                    }
                    for m in p.mails {
                        parts.push((format!("{} to {}", m.template, m.to), m.rendered));
                    }
                }
                (Some(c), _) => {
                    let store = open_store(&config).await?;
                    let vars = tools::client_vars(&store, &c).await?;
                    let templates = catalog.templates();
                    let vars = tools::with_defaults(&templates, &name, vars);
                    parts.push((name.clone(), tools::preview(&templates, &name, &vars)?));
                }
                (None, Some(f)) => {
                    let templates = catalog.templates();
                    let vars = tools::with_defaults(&templates, &name, tools::vars_file(&f)?);
                    parts.push((name.clone(), tools::preview(&templates, &name, &vars)?));
                }
                (None, None) => anyhow::bail!("give --client ID or --vars FILE"),
            }
            for (what, r) in &parts {
                if json && !rule_mode {
                    println!("{}", serde_json::to_string(r)?);
                } else if !json {
                    println!(
                        "=== {what}\nSubject: {}\nKind: {:?}\n\n--- text ---\n{}\n--- html ---\n{}",
                        r.subject, r.kind, r.text, r.html
                    );
                }
            }
            if let (Some(path), Some((_, r))) = (html, parts.first()) {
                std::fs::write(&path, &r.html)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("HTML written to {}", path.display());
            }
        }
        Command::Replay {
            from_stream: true,
            since_seq,
            since,
            json,
        } => {
            let store = open_store(&config).await?;
            let start = match (since_seq, since) {
                (Some(s), _) => tools::StreamStart::Sequence(s),
                (None, Some(t)) => tools::StreamStart::Time(t),
                (None, None) => tools::StreamStart::All,
            };
            eprintln!(
                "re-reading stream {} into {}",
                config.nats.stream, config.database.url
            );
            let n = tools::replay_from_stream(&config, &store, start, |read, pending| {
                eprintln!("  {read} messages read, {pending} to go")
            })
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"from_stream": true, "messages": n, "sent": 0})
                );
            } else {
                println!("re-read {n} messages from the stream; nothing was sent");
            }
        }
        Command::Replay { json, .. } => {
            let store = open_store(&config).await?;
            eprintln!(
                "replaying the event log into {} (stop every nudge daemon first)",
                config.database.url
            );
            let p = tools::replay(&config, &store, |p| {
                eprintln!("  {} events, {} sweeps", p.events, p.sweeps)
            })
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"from_stream": false, "events": p.events, "sweeps": p.sweeps})
                );
            } else {
                println!(
                    "replayed {} events and {} sweeps; derived history replaced",
                    p.events, p.sweeps
                );
            }
        }
        Command::Backtest {
            rules,
            since,
            until,
            json,
            report: reports,
        } => {
            let store = open_store(&config).await?;
            let dir = rules.unwrap_or_else(|| config.rules.dir.clone());
            let report = tools::backtest(&config, &store, &dir, since, until).await?;
            if reports && json {
                println!("{}", serde_json::to_string(&report.reports)?);
            } else if reports {
                for r in report.reports.values() {
                    println!("{}", nudge::core::report::render(r));
                }
                if report.reports.is_empty() {
                    println!("no rule in {} exposed any client", dir.display());
                }
            } else if json {
                for e in &report.effects {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else {
                println!(
                    "{} events and {} sweeps replayed with the rules in {}",
                    report.events,
                    report.sweeps,
                    dir.display()
                );
                for (rule, s) in &report.rules {
                    println!("{rule}:");
                    for (t, n) in &s.mails {
                        println!("  mail {t}: {n}");
                    }
                    for (t, n) in &s.events {
                        println!("  event {t}: {n}");
                    }
                    for (t, n) in &s.tasks {
                        println!("  task for {t}: {n}");
                    }
                    if s.errors > 0 {
                        println!("  rule errors: {}", s.errors);
                    }
                }
            }
        }
        Command::Report {
            rule,
            since,
            until,
            json,
        } => {
            let store = open_store(&config).await?;
            let catalog = nudge::flow::catalog::Catalog::load(&config);
            let goal = catalog.rules().get(&rule).and_then(|r| r.goal.clone());
            let report = tools::report::stored(&store, &rule, goal, since, until).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", nudge::core::report::render(&report));
            }
        }
        Command::Forget { client, json } => {
            let store = open_store(&config).await?;
            let id = nudge::domain::event::ClientId::parse(client)
                .map_err(|e| anyhow::anyhow!("client id: {e}"))?;
            let erased = store.erase_client(&id, chrono::Utc::now()).await?;
            if json {
                println!("{}", serde_json::json!({"client_id": id, "erased": erased}));
            } else if erased {
                println!("client {id} erased");
            } else {
                println!("no client {id}; nothing to erase");
            }
            if !erased {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Export(args) => cli::export::run(&config, args).await?,
        Command::Bench { .. } => {
            unreachable!("handed to nudge-bench before loading the configuration")
        }
        Command::Migrate { json } => {
            open_store(&config).await?;
            if json {
                println!("{}", serde_json::json!({"migrated": true}));
            } else {
                println!("database is up to date");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
