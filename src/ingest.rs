//! The JetStream side of ingest: the stream and the durable pull consumer,
//! pulling messages in batches, and acking a batch only after the pipeline
//! committed it. Redelivery is harmless: the pipeline drops ids it has seen.

use crate::config::NatsConfig;
use crate::pipeline::{Incoming, Pipeline};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Connects, retrying in the background until the server answers, so that a
/// broker that starts after nudge is not a crash loop.
pub async fn connect(cfg: &NatsConfig) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .name("nudge")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            tracing::info!(%event, "nats connection event");
        })
        .connect(cfg.servers().as_slice())
        .await
}

/// Creates the stream when missing; an existing one is used as it is.
pub async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &NatsConfig,
) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        max_age: Duration::from_secs(cfg.max_age_days * 86_400),
        num_replicas: cfg.replicas,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot get or create stream {}: {e}", cfg.stream))
}

pub async fn ensure_consumer(
    stream: &stream::Stream,
    cfg: &NatsConfig,
) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    let config = pull::Config {
        durable_name: Some(cfg.consumer.clone()),
        // All of it: events published before nudge first started are history too.
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(cfg.ack_wait_secs),
        max_ack_pending: (cfg.batch_size as i64 * 8).max(1000),
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&cfg.consumer, config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot get or create consumer {}: {e}", cfg.consumer))
}

/// Failed attempts of one batch before its messages are tried one by one.
const ISOLATE_AFTER: u32 = 3;

/// Commits the messages one at a time; a message that alone cannot be
/// committed while the database answers is a poison message: it is kept as
/// rejected with the error, so the stream goes on. If the database does not
/// answer or cannot take writes at all (an outage: full, read-only, locked),
/// nothing is rejected and the error comes back.
async fn isolate(
    pipeline: &Pipeline,
    incoming: &[Incoming],
) -> Result<crate::pipeline::BatchReport, crate::store::StoreError> {
    let mut total = crate::pipeline::BatchReport::default();
    for m in incoming {
        let one = std::slice::from_ref(m);
        let report = match pipeline.process(one).await {
            Ok(r) => r,
            Err(e) if e.is_outage() => return Err(e),
            Err(_) => pipeline.quarantine_poison(m).await?,
        };
        total.accepted += report.accepted;
        total.duplicates += report.duplicates;
        total.rejected += report.rejected;
        total.effects += report.effects;
    }
    Ok(total)
}

/// The consumer's ack floor, read from the broker: what every instance
/// sharing the consumer has acked up to.
struct ConsumerFloor(jetstream::consumer::Consumer<pull::Config>);

impl crate::pipeline::AckFloor for ConsumerFloor {
    fn floor(&self) -> futures::future::BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            self.0
                .get_info()
                .await
                .map(|i| i.ack_floor.stream_sequence)
                .map_err(|e| e.to_string())
        })
    }
}

/// Pulls, processes and acks until cancelled. On cancel the batches in hand
/// are committed and acked before returning.
pub async fn run(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    pipeline: Arc<Pipeline>,
    cfg: &NatsConfig,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let batch_size = cfg.batch_size;
    let linger = Duration::from_millis(cfg.batch_linger_ms);
    let settler = Batch {
        pipeline,
        floor: Arc::new(ConsumerFloor(consumer.clone())),
        ack_wait: Duration::from_secs(cfg.ack_wait_secs),
        wake,
        cancel: cancel.clone(),
    };
    // Batches in flight at once: each is decided while the one before it
    // commits, on top of what that one decided, and commits after it (see
    // `chain`); so one core decides while the other writes.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(cfg.batches_in_flight.max(1)));
    let tasks = tokio_util::task::TaskTracker::new();
    'outer: while !cancel.is_cancelled() {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(batch_size)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start pulling; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break 'outer,
                p = in_flight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            // Wait for one message, then take whatever else is already here:
            // small batches when quiet (low latency), full ones under load.
            let first = tokio::select! {
                _ = cancel.cancelled() => break 'outer,
                m = messages.next() => m,
            };
            let mut held = Vec::with_capacity(batch_size);
            match first {
                None => continue 'outer,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull error");
                    continue;
                }
                Some(Ok(m)) => held.push(m),
            }
            // Then more, until the batch is full or has lingered long enough:
            // the client hands over pulled messages in small bursts, and a
            // batch per burst would pay the per-batch round trips many times.
            let linger_until = tokio::time::Instant::now() + linger;
            while held.len() < batch_size {
                let next = match messages.next().now_or_never() {
                    Some(next) => next,
                    None => match tokio::time::timeout_at(linger_until, messages.next()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    },
                };
                match next {
                    Some(Ok(m)) => held.push(m),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "pull error");
                        break;
                    }
                    None => break,
                }
            }
            let batch = settler.clone();
            let turn = settler.pipeline.turn();
            tasks.spawn(async move {
                batch.settle(held, turn).await;
                drop(permit);
            });
        }
    }
    // The batches in hand are committed and acked (or, cancelled while
    // failing, left to be redelivered) before ingest says it stopped.
    tasks.close();
    tasks.wait().await;
    tracing::info!("ingest stopped");
}

/// What a batch needs to be committed and acked on its own task.
#[derive(Clone)]
struct Batch {
    pipeline: Arc<Pipeline>,
    floor: Arc<ConsumerFloor>,
    ack_wait: Duration,
    wake: Arc<Notify>,
    cancel: CancellationToken,
}

impl Batch {
    /// Commits the messages, retrying until it goes through, then acks them:
    /// nothing is acked that is not committed, and the ack floor does not
    /// move past them. Returns early, without acking, only when cancelled.
    /// The batches pulled after it commit after it: they wait while it is
    /// retried (in an outage nothing commits anyway; a poison message is
    /// set aside by the retries), unless it is cancelled.
    async fn settle(self, held: Vec<jetstream::Message>, mut turn: crate::chain::Turn) {
        let pipeline = &self.pipeline;
        let incoming: Vec<Incoming> = held
            .iter()
            .map(|m| {
                // Parsed from the reply subject: once per message.
                let info = m.info().ok();
                Incoming {
                    subject: m.subject.to_string(),
                    payload: m.payload.clone(),
                    stream_seq: info.as_ref().map(|i| i.stream_sequence),
                    published: info.map(|i| i.published),
                }
            })
            .collect();
        // Failed attempts, and those of them that were not an outage of the
        // database: only these can point at a poison message.
        let mut failures: u32 = 0;
        let mut suspect: u32 = 0;
        loop {
            let result = if suspect >= ISOLATE_AFTER && incoming.len() > 1 {
                // The batch keeps failing: find out whether one message
                // is to blame rather than hold up the stream behind it.
                isolate(pipeline, &incoming).await
            } else if suspect >= ISOLATE_AFTER {
                pipeline.quarantine_poison(&incoming[0]).await
            } else {
                pipeline
                    .process_in_order(&incoming, self.floor.as_ref(), self.ack_wait, &mut turn)
                    .await
            };
            match result {
                Ok(report) => {
                    turn.finish();
                    pipeline.metrics().batch_ok();
                    tracing::debug!(?report, "batch committed");
                    for m in &held {
                        if let Err(e) = m.ack().await {
                            // Redelivered later and dropped as a duplicate.
                            tracing::warn!(error = %e, "ack failed");
                        }
                    }
                    if report.effects > 0 {
                        self.wake.notify_one();
                    }
                    return;
                }
                Err(e) => {
                    failures += 1;
                    // Contention or an outage is not the batch's fault:
                    // retry it as it is, never take it apart as if a
                    // message were poison.
                    if !e.is_transient() {
                        suspect += 1;
                    }
                    pipeline.metrics().batch_failed(&e.to_string());
                    let pause = Duration::from_millis(200 * 2u64.pow(failures.min(6)));
                    tracing::error!(error = %e, retry_in = ?pause, "batch not committed; will retry");
                    for m in &held {
                        // Keep the messages ours while we wait.
                        let _ = m.ack_with(jetstream::AckKind::Progress).await;
                    }
                    tokio::select! {
                        // Not acked: the broker redelivers after ack_wait.
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}
