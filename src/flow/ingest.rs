//! The JetStream side of ingest: the stream and the durable pull consumer,
//! pulling messages in batches, and acking a batch only after the pipeline
//! committed it. Redelivery is harmless: the pipeline drops ids it has seen.

use crate::config::NatsConfig;
use crate::flow::pipeline::{Incoming, Pipeline};
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
        num_replicas: cfg.replicas.get(),
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
        ack_wait: Duration::from_secs(cfg.ack_wait_secs.get()),
        max_ack_pending: (cfg.batch_size.get() as i64 * 8).max(1000),
        ..Default::default()
    };
    stream
        .get_or_create_consumer(&cfg.consumer, config)
        .await
        .map_err(|e| anyhow::anyhow!("cannot get or create consumer {}: {e}", cfg.consumer))
}

/// Failed attempts of one batch before its messages are tried one by one.
const ISOLATE_AFTER: u32 = 3;

/// The consumer's ack floor, read from the broker: what every instance
/// sharing the consumer has acked up to.
struct ConsumerFloor {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    /// A stop does not wait for a broker that does not answer.
    cancel: CancellationToken,
}

/// How long reading the ack floor may take: the broker answers in
/// milliseconds when it is there.
const FLOOR_TIMEOUT: Duration = Duration::from_secs(3);

impl crate::flow::pipeline::AckFloor for ConsumerFloor {
    fn floor(&self) -> futures::future::BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            let info = tokio::time::timeout(FLOOR_TIMEOUT, self.consumer.get_info());
            tokio::select! {
                _ = self.cancel.cancelled() => Err("stopping".to_string()),
                info = info => match info {
                    Ok(Ok(i)) => Ok(i.ack_floor.stream_sequence),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer from the broker within {FLOOR_TIMEOUT:?}")),
                },
            }
        })
    }
}

/// How long one pull request waits at the broker for messages. Short, so
/// that a pull request of an instance that went away without a word holds
/// nothing back for long, and a pull that lost its way is replaced soon.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// How long a stop waits for the puller and for naks of what it pulled
/// but no batch took: the broker may be unreachable.
const STOP_NATS_WAIT: Duration = Duration::from_secs(2);

/// Pulls messages into `tx` until cancelled, one pull request at a time,
/// each for at most `batch_size` messages.
///
/// Why one-shot pull requests (`Consumer::batch`) and not the continuous
/// `Consumer::stream()`: async-nats 0.51's stream counts the messages it
/// has asked for in `pending_messages`, adding a request's size only when
/// its background task reports the request sent. When the broker's message
/// arrives before that report (a busy machine), the message is subtracted
/// from zero (`saturating_sub`, lost) and the request added afterwards: the
/// stream then believes a request is outstanding that the broker has
/// already served. It sends no new one, the broker sends nothing and no
/// heartbeat (it has no request), the stream reports "missed idle
/// heartbeat" after twice the heartbeat and recovers only when its task's
/// timer (expiry + 5 s) sends a fresh request: 35 s without consuming with
/// messages pending. With `batch_size: 1` one lost count is enough. A
/// one-shot pull counts only its own request and ends after its last
/// message or the broker's timeout, so there is nothing to drift.
async fn pull(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    batch_size: usize,
    tx: tokio::sync::mpsc::Sender<jetstream::Message>,
    cancel: CancellationToken,
) {
    let mut pause = Duration::from_millis(250);
    'requests: while !cancel.is_cancelled() {
        let request = consumer
            .batch()
            .max_messages(batch_size)
            .expires(PULL_EXPIRES)
            .messages();
        let mut batch = tokio::select! {
            _ = cancel.cancelled() => break,
            b = request => match b {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "cannot pull; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => break 'requests,
                next = batch.next() => next,
            };
            match next {
                // Served or expired: the next request.
                None => break,
                Some(Ok(m)) => {
                    pause = Duration::from_millis(250);
                    let slot = tokio::select! {
                        _ = cancel.cancelled() => None,
                        slot = tx.reserve() => slot.ok(),
                    };
                    match slot {
                        Some(slot) => slot.send(m),
                        None => {
                            // Pulled, never in a batch: back to the broker
                            // now rather than after ack_wait.
                            let _ = tokio::time::timeout(
                                STOP_NATS_WAIT,
                                m.ack_with(jetstream::AckKind::Nak(None)),
                            )
                            .await;
                            break 'requests;
                        }
                    }
                }
                Some(Err(e)) => {
                    // No responders (no stream leader), a deleted consumer:
                    // wait a little instead of asking again at once.
                    tracing::warn!(error = %e, retry_in = ?pause, "pull error");
                    tokio::select! {
                        _ = cancel.cancelled() => break 'requests,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    break;
                }
            }
        }
    }
    // Dropping the pull unsubscribes its inbox (queued on the connection
    // before the final flush in `app`): the broker then delivers nothing
    // more to this instance's request.
}

/// Pulls, processes and acks until cancelled. On cancel the batches in hand
/// are committed and acked before returning (or, failing, left unacked for
/// redelivery), and what was pulled but not yet in a batch is given back.
pub async fn run(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    pipeline: Arc<Pipeline>,
    cfg: &NatsConfig,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let batch_size = cfg.batch_size.get();
    let linger = Duration::from_millis(cfg.batch_linger_ms);
    let settler = Batch {
        pipeline,
        floor: Arc::new(ConsumerFloor {
            consumer: consumer.clone(),
            cancel: cancel.clone(),
        }),
        ack_wait: Duration::from_secs(cfg.ack_wait_secs.get()),
        max_deliveries: cfg.max_deliveries.get(),
        wake,
        cancel: cancel.clone(),
    };
    // Pulling runs on its own task, whatever the batches are doing: the
    // channel holds at most one batch ahead of those in flight.
    let (tx, mut rx) = tokio::sync::mpsc::channel(batch_size);
    let puller = tokio::spawn(pull(consumer, batch_size, tx, cancel.clone()));
    // Batches in flight at once: each is decided while the one before it
    // commits, on top of what that one decided, and commits after it (see
    // `chain`); so one core decides while the other writes.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(cfg.batches_in_flight.get()));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = in_flight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        // Wait for one message, then take whatever else is already here:
        // small batches when quiet (low latency), full ones under load.
        let first = tokio::select! {
            _ = cancel.cancelled() => break,
            m = rx.recv() => m,
        };
        // The puller ends only when cancelled.
        let Some(first) = first else { break };
        let mut held = Vec::with_capacity(batch_size);
        held.push(first);
        // Then more, until the batch is full or has lingered long enough:
        // the broker hands over pulled messages in small bursts, and a
        // batch per burst would pay the per-batch round trips many times.
        let linger_until = tokio::time::Instant::now() + linger;
        while held.len() < batch_size {
            let next = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(_) => tokio::time::timeout_at(linger_until, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            match next {
                Some(m) => held.push(m),
                None => break,
            }
        }
        let batch = settler.clone();
        let turn = settler.pipeline.turn();
        let metrics = settler.pipeline.clone();
        tasks.spawn(async move {
            // A panic while deciding must not take ingest with it nor keep
            // the permit: the batch stays unacked and comes back (counted
            // by the broker, so `max_deliveries` takes it apart).
            let settled = std::panic::AssertUnwindSafe(batch.settle(held, turn))
                .catch_unwind()
                .await;
            if let Err(panic) = settled {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                tracing::error!(panic = %what, "batch task panicked; its events are left for redelivery");
                metrics.metrics().batch_failed("panic", &format!("panic: {what}"));
            }
            drop(permit);
        });
    }
    // Pulled but in no batch: given back at once (nak) so that the next
    // instance, or this one restarted, gets them without waiting ack_wait.
    let _ = tokio::time::timeout(STOP_NATS_WAIT, puller).await;
    rx.close();
    let give_back = async {
        while let Some(m) = rx.recv().await {
            let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
        }
    };
    let _ = tokio::time::timeout(STOP_NATS_WAIT, give_back).await;
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
    /// Broker deliveries after which a batch is taken apart at once.
    max_deliveries: u64,
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
    async fn settle(self, held: Vec<jetstream::Message>, mut turn: crate::flow::chain::Turn) {
        let pipeline = &self.pipeline;
        // How often the broker has handed out the most delivered message:
        // counts every instance's and every earlier run's attempts, which
        // this task's own failure count cannot see.
        let mut delivered = 0;
        let incoming: Vec<Incoming> = held
            .iter()
            .map(|m| {
                // Parsed from the reply subject: once per message.
                let info = m.info().ok();
                delivered = delivered.max(info.as_ref().map_or(1, |i| i.delivered));
                Incoming {
                    subject: m.subject.to_string(),
                    payload: m.payload.clone(),
                    stream_seq: info.as_ref().map(|i| i.stream_sequence),
                    published: info.map(|i| i.published),
                }
            })
            .collect();
        // Failed attempts, and those of them that the database refused as
        // poison: only these can point at a message to blame.
        let mut failures: u32 = 0;
        let mut suspect: u32 = 0;
        if delivered as u64 > self.max_deliveries {
            // Delivered again and again without an ack: this batch has
            // failed before (a crash, a panic, a stop while failing). Take
            // it apart now; only poison is set aside (`Pipeline::isolate`).
            tracing::warn!(
                delivered,
                events = incoming.len(),
                "batch delivered more than nats.max_deliveries times; committing its events one by one"
            );
            suspect = ISOLATE_AFTER;
            turn.wait().await;
        }
        // While the batch is in hand (deciding, waiting for earlier
        // messages, retrying), every third of the ack wait: the broker is
        // told it is still at work on them (so it does not hand them to
        // another instance), and the window that its claim runs on (so
        // batches waiting for them know their holder is alive).
        let seqs: Vec<u64> = incoming.iter().filter_map(|m| m.stream_seq).collect();
        let keep_claims = async {
            loop {
                tokio::time::sleep(self.ack_wait / 3).await;
                for m in &held {
                    let _ = m.ack_with(jetstream::AckKind::Progress).await;
                }
                if let Err(e) = pipeline.renew_claims(&seqs, self.ack_wait).await {
                    tracing::warn!(error = %e, "cannot renew the batch's claim in the window");
                }
            }
        };
        let work = async {
            loop {
                let result = if suspect >= ISOLATE_AFTER {
                    // The batch keeps failing: find out whether one message
                    // is to blame rather than hold up the stream behind it.
                    pipeline
                        .isolate(&incoming, self.floor.as_ref(), self.ack_wait)
                        .await
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
                        // An outage, contention or a fault an operator must
                        // fix is not the batch's: retry it as it is, never take
                        // it apart as if a message were poison.
                        if e.is_poison() {
                            suspect += 1;
                        }
                        pipeline.metrics().batch_failed(e.class(), &e.to_string());
                        let pause = Duration::from_millis(200 * 2u64.pow(failures.min(6)));
                        tracing::error!(error = %e, retry_in = ?pause, "batch not committed; will retry");
                        tokio::select! {
                            // Cancelled, not acked: the broker redelivers after ack_wait.
                            _ = self.cancel.cancelled() => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                }
            }
        };
        tokio::select! {
            _ = work => {}
            _ = keep_claims => {}
        }
    }
}
