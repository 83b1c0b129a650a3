//! What a bench run found, as a small table for people or as JSON for
//! scripts that compare runs.

use crate::latency::Latency;
use serde::Serialize;
use std::fmt::Write;

/// The targets, printed beside the figures.
/// nudge/raw targets on SQLite; on PostgreSQL, a server over a socket, the
/// target is lower.
const RATIO_TARGET: f64 = 0.5;
const RATIO_TARGET_POSTGRES: f64 = 0.25;
const RATIO_STRETCH: f64 = 0.7;
const P99_TARGET_MS: f64 = 50.0;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    /// `sqlite` or `postgres`.
    pub database: String,
    /// The NATS server: `private` (started by the bench) or the URL given.
    pub nats: String,
    pub events: usize,
    pub clients: u32,
    /// Pre-loading the stream (publish with confirmations).
    pub publish: Rate,
    /// The bare consumer: parse and ack.
    pub raw: Rate,
    /// nudge end to end: from start until every event is committed and acked.
    pub nudge: Rate,
    /// nudge's rate over the raw consumer's.
    pub ratio: f64,
    /// CPU used in the raw and the nudge phase.
    pub cpu: Cpu,
    /// Rows in the event log afterwards: the shop's plus nudge's secondary events.
    pub stored_events: u64,
    /// Effects queued (mails, emitted events, tasks).
    pub effects: u64,
    /// Mails (tasks included) the bench's SMTP server took by the end.
    pub mails_received: u64,
    /// Seconds after the last commit until the outbox had nothing due;
    /// `None` when it did not empty within the wait.
    pub outbox_drain_secs: Option<f64>,
    pub latency: Option<Latency>,
    pub memory: Memory,
}

/// CPU used by each phase: a steadier figure than a rate on a machine that
/// runs other things too.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cpu {
    pub raw: PhaseCpu,
    pub nudge: PhaseCpu,
}

/// CPU seconds of one phase, and per event in microseconds: of the bench
/// process (the raw consumer, or nudge with all its tasks) and of the
/// private nats-server (`None` with `--nats-url`, or where unknown).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PhaseCpu {
    pub process_secs: Option<f64>,
    pub nats_secs: Option<f64>,
    pub process_us_per_event: Option<f64>,
    pub nats_us_per_event: Option<f64>,
}

impl PhaseCpu {
    pub fn between(
        before: (Option<f64>, Option<f64>),
        after: (Option<f64>, Option<f64>),
        events: usize,
    ) -> Self {
        let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        let per = |s: Option<f64>| s.map(|s| s * 1e6 / events.max(1) as f64);
        let process_secs = diff(before.0, after.0);
        let nats_secs = diff(before.1, after.1);
        Self {
            process_secs,
            nats_secs,
            process_us_per_event: per(process_secs),
            nats_us_per_event: per(nats_secs),
        }
    }

    fn describe(&self) -> String {
        let us = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.1}"));
        match self.nats_us_per_event {
            Some(_) => format!(
                "{} + nats-server {}",
                us(self.process_us_per_event),
                us(self.nats_us_per_event)
            ),
            None => us(self.process_us_per_event),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Rate {
    pub secs: f64,
    pub per_sec: f64,
}

impl Rate {
    pub fn new(events: usize, elapsed: std::time::Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        Self {
            secs,
            per_sec: events as f64 / secs.max(1e-9),
        }
    }
}

/// Resident memory of the bench process (nudge runs inside it), MiB.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub rss_before_mib: f64,
    pub rss_after_run_mib: f64,
    pub rss_after_latency_mib: f64,
    /// `VmHWM`: the peak, since just before nudge started when
    /// `peak_reset` (else since the process started).
    pub peak_mib: f64,
    pub peak_reset: bool,
}

impl Machine {
    pub fn this() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, v)| v.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            memory_gib: kib / 1024.0 / 1024.0,
        }
    }
}

fn grouped(n: f64) -> String {
    let s = format!("{:.0}", n);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Report {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let m = &self.machine;
        let _ = writeln!(
            t,
            "nudge bench: {} events, {} clients, {}, nats {}",
            self.events, self.clients, self.database, self.nats
        );
        let _ = writeln!(
            t,
            "machine: {} cpus, {}, {:.1} GiB\n",
            m.cpus, m.cpu_model, m.memory_gib
        );
        let _ = writeln!(t, "                       events/s   seconds");
        for (name, r) in [
            ("publish (pre-load)", self.publish),
            ("raw consumer", self.raw),
            ("nudge end to end", self.nudge),
        ] {
            let _ = writeln!(t, "  {name:<19} {:>10} {:>9.2}", grouped(r.per_sec), r.secs);
        }
        let target = if self.database.starts_with("postgres") {
            RATIO_TARGET_POSTGRES
        } else {
            RATIO_TARGET
        };
        let verdict = if self.ratio >= RATIO_STRETCH {
            "meets the stretch target"
        } else if self.ratio >= target {
            "meets the target"
        } else {
            "below the target"
        };
        let _ = writeln!(
            t,
            "  nudge / raw         {:>9.1} %   (target {:.0} %, stretch {:.0} %: {verdict})\n",
            self.ratio * 100.0,
            target * 100.0,
            RATIO_STRETCH * 100.0
        );
        let _ = writeln!(
            t,
            "cpu per event, us: raw consumer {}; nudge {}\n",
            self.cpu.raw.describe(),
            self.cpu.nudge.describe()
        );
        if let Some(l) = &self.latency {
            let ok = if l.p99_ms < P99_TARGET_MS {
                "meets"
            } else {
                "misses"
            };
            let _ = writeln!(
                t,
                "latency, publish to commit, {} events/s for {:.1} s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {} seen)\n  p99 {ok} the target of {P99_TARGET_MS:.0} ms",
                l.rate, l.secs, l.p50_ms, l.p99_ms, l.max_ms, l.observed, l.sent
            );
        }
        let drain = self
            .outbox_drain_secs
            .map_or("did not drain in the wait".into(), |s| {
                format!("drained {s:.1} s after the last commit")
            });
        let _ = writeln!(
            t,
            "stored: {} events (the shop's and nudge's own), {} effects queued; outbox {drain}; {} mails sent over SMTP",
            self.stored_events, self.effects, self.mails_received
        );
        let mem = &self.memory;
        let _ = writeln!(
            t,
            "memory (RSS, MiB): {:.0} before nudge, {:.0} after the run, {:.0} after the latency phase; peak {:.0}{}",
            mem.rss_before_mib,
            mem.rss_after_run_mib,
            mem.rss_after_latency_mib,
            mem.peak_mib,
            if mem.peak_reset {
                ""
            } else {
                " (since process start)"
            }
        );
        t
    }
}
