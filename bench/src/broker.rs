//! The broker side of the bench (the server itself is the kit's
//! [`nudge_kit::nats::NatsServer`]): pre-loading the stream as fast as the server confirms, the bare consumer that sets
//! the yardstick, and watching a durable consumer's ack floor to know when
//! everything published has been taken into effect.

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull, context::PublishAckFuture};
use futures::StreamExt;
use nudge::config::NatsConfig;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Publish confirmations awaited at most this far behind: deep enough to keep
/// the server busy, shallow enough that a refused publish shows up promptly.
const ACK_WINDOW: usize = 4096;

/// Publishes `payloads` as the shop does (`Nats-Msg-Id` set to the event id),
/// awaiting the stream's confirmations in a sliding window. Returns the
/// stream sequence of the last one.
pub async fn publish_all(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    payloads: impl Iterator<Item = (String, &'static str, Vec<u8>)>,
) -> anyhow::Result<u64> {
    let mut pending: VecDeque<PublishAckFuture> = VecDeque::with_capacity(ACK_WINDOW);
    let mut last = 0;
    for (id, ty, payload) in payloads {
        if pending.len() >= ACK_WINDOW {
            let ack = pending.pop_front().expect("window is not empty");
            last = ack
                .await
                .context("the stream did not confirm an event")?
                .sequence;
        }
        pending.push_back(publish_one(js, cfg, &id, ty, payload).await?);
    }
    for ack in pending {
        last = ack
            .await
            .context("the stream did not confirm an event")?
            .sequence;
    }
    Ok(last)
}

/// Sends one event; the confirmation is the caller's to await.
pub async fn publish_one(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    id: &str,
    ty: &str,
    payload: Vec<u8>,
) -> anyhow::Result<PublishAckFuture> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    js.publish_with_headers(
        format!("{}.{ty}", cfg.subject_prefix),
        headers,
        payload.into(),
    )
    .await
    .with_context(|| format!("cannot publish event {id}"))
}

/// Right after a stream is created the server may briefly answer "no
/// stream"; waits until a lookup succeeds so the bulk publish starts clean.
pub async fn wait_for_stream(js: &jetstream::Context, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match js.get_stream(name).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(anyhow::anyhow!("stream {name} not available: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The yardstick: a bare pull consumer, configured like nudge's, that parses
/// each event's JSON and acks it, nothing else. Returns once `n` events were
/// read and the server has every ack.
pub async fn raw_consume(
    client: &async_nats::Client,
    stream: &jetstream::stream::Stream,
    cfg: &NatsConfig,
    n: usize,
    last_seq: u64,
) -> anyhow::Result<Duration> {
    // Timed from before the consumer exists, as nudge's run is.
    let started = Instant::now();
    let consumer = nudge::flow::ingest::ensure_consumer(stream, cfg).await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(cfg.batch_size.get())
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .context("raw consumer cannot start pulling")?;
    let mut seen = 0;
    let mut ids = 0usize;
    while seen < n {
        let m = match messages.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "raw consumer: pull error");
                continue;
            }
            None => bail!("raw consumer: the message stream ended after {seen} events"),
        };
        // Parse, as any consumer must; counting ids keeps the parse from
        // being optimised away.
        let v: serde_json::Value =
            serde_json::from_slice(&m.payload).context("raw consumer: an event is not JSON")?;
        ids += usize::from(v.get("id").is_some());
        m.ack()
            .await
            .map_err(|e| anyhow::anyhow!("raw consumer: ack failed: {e}"))?;
        seen += 1;
    }
    client
        .flush()
        .await
        .context("raw consumer: flushing acks")?;
    wait_acked(&consumer, last_seq, Duration::from_secs(60)).await?;
    if ids != n {
        bail!("raw consumer: {} of {n} events had no id", n - ids);
    }
    Ok(started.elapsed())
}

/// Waits until the consumer's ack floor reaches `last_seq`: every event up to
/// it was acked, which nudge does only after committing it.
pub async fn wait_acked(
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    last_seq: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = consumer
            .get_info()
            .await
            .context("cannot read consumer info")?;
        if info.ack_floor.stream_sequence >= last_seq {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "consumer {} acked up to {} of {last_seq} within {timeout:?} ({} pending, {} awaiting ack)",
                info.name,
                info.ack_floor.stream_sequence,
                info.num_pending,
                info.num_ack_pending
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The consumer the daemon creates, once it exists.
pub async fn find_consumer(
    stream: &jetstream::stream::Stream,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    let deadline = Instant::now() + timeout;
    loop {
        match stream.get_consumer::<pull::Config>(name).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => {
                return Err(anyhow::anyhow!("consumer {name} never appeared: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
