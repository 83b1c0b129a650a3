//! `nudge publish FILE`: sends contract events from a JSON-lines file to the
//! stream, each with `Nats-Msg-Id` set to its id, as a shop would.

use crate::config::NatsConfig;
use crate::domain::event::Envelope;
use anyhow::{Context, bail};
use async_nats::HeaderMap;
use std::path::Path;

/// Validates every line first, so a bad file publishes nothing; returns the count.
pub async fn publish_file(cfg: &NatsConfig, path: &Path) -> anyhow::Result<usize> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        match Envelope::from_value(value.clone()) {
            Ok(e) => events.push((e, value)),
            Err(reason) => bail!("{}:{}: {reason}", path.display(), i + 1),
        }
    }
    let client = async_nats::connect(cfg.servers().as_slice())
        .await
        .with_context(|| format!("cannot connect to nats.url {}", cfg.url))?;
    let js = async_nats::jetstream::new(client);
    crate::flow::ingest::ensure_stream(&js, cfg).await?;
    let mut acks = Vec::with_capacity(events.len());
    for (e, value) in &events {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", e.id.as_str());
        let subject = format!("{}.{}", cfg.subject_prefix, e.event_type);
        let ack = js
            .publish_with_headers(subject, headers, serde_json::to_vec(value)?.into())
            .await
            .with_context(|| format!("cannot publish event {}", e.id))?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.context("the stream did not confirm an event")?;
    }
    Ok(events.len())
}
