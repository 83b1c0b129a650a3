//! The latency phase: events published at a steady rate with `occurred_at` =
//! now, each timed from just before its publish until the bench sees its row
//! committed. The bench looks at the database every millisecond, so a figure
//! is at most about a millisecond (plus one small query) late, never early.

use crate::broker;
use crate::probe::Probe;
use anyhow::Context;
use async_nats::jetstream;
use chrono::Utc;
use nudge::config::NatsConfig;
use nudge_kit::workload::{Spec, render};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::time::MissedTickBehavior;

/// Ids of this phase's events: `live-<index>`.
const ID_PREFIX: &str = "live-";

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Target publish rate, events per second.
    pub rate: u32,
    /// How long publishing took, seconds.
    pub secs: f64,
    pub sent: usize,
    /// Events whose commit was seen (all of them, unless something is wrong).
    pub observed: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Publishes `specs` at `rate` per second and times each until committed.
pub async fn measure(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    probe: &Probe,
    specs: &[Spec],
    rate: u32,
    tag: &str,
) -> anyhow::Result<Latency> {
    let total = specs.len();
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let mut cursor = probe.cursor().await?;

    // Confirmations are awaited aside, in order, so a slow one never delays
    // the next publish and the rate stays steady.
    let (ack_tx, mut ack_rx) =
        tokio::sync::mpsc::unbounded_channel::<jetstream::context::PublishAckFuture>();
    let acks = tokio::spawn(async move {
        while let Some(ack) = ack_rx.recv().await {
            ack.await
                .context("the stream did not confirm a latency event")?;
        }
        anyhow::Ok(())
    });

    let publisher = {
        let js = js.clone();
        let cfg = cfg.clone();
        let sent_at = sent_at.clone();
        let specs = specs.to_vec();
        let tag = tag.to_string();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
            // Behind schedule, catch up with a burst: the average rate holds.
            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
            for (i, spec) in specs.iter().enumerate() {
                tick.tick().await;
                let id = format!("{ID_PREFIX}{i:07}");
                let payload = serde_json::to_vec(&render(spec, &id, &tag, Some(Utc::now())))?;
                sent_at.lock().expect("not poisoned")[i] = Some(Instant::now());
                let ack =
                    broker::publish_one(&js, &cfg, &id, spec.kind.type_name(), payload).await?;
                let _ = ack_tx.send(ack);
            }
            anyhow::Ok(started.elapsed())
        })
    };

    let mut latencies: Vec<Duration> = Vec::with_capacity(total);
    let mut deadline = None;
    while latencies.len() < total {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let (ids, next) = probe.committed_since(cursor).await?;
        let seen = Instant::now();
        cursor = next;
        let sent = sent_at.lock().expect("not poisoned");
        for id in ids {
            let Some(i) = id
                .strip_prefix(ID_PREFIX)
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue; // secondary events, or the throughput phase's stragglers
            };
            if let Some(Some(t)) = sent.get(i) {
                latencies.push(seen - *t);
            }
        }
        drop(sent);
        if publisher.is_finished() {
            // Everything sent: give stragglers a generous while, then stop.
            let d = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(30));
            if Instant::now() > d {
                break;
            }
        }
    }
    let secs = publisher.await.context("latency publisher panicked")??;
    acks.await.context("latency ack task panicked")??;
    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    Ok(Latency {
        rate,
        secs: secs.as_secs_f64(),
        sent: total,
        observed: latencies.len(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    })
}
