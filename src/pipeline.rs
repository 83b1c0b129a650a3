//! One batch of raw messages in, one committed transaction out: validate,
//! drop what already took effect, fold each event into its client's history
//! in event-time order, run the rules, and write events, states, effects and
//! rejections together. Knows nothing of NATS, so the daemon, tests and
//! benchmarks drive the same code.

use crate::catalog::Catalog;
use crate::decide::decide;
use crate::event::{ClientId, Envelope, EventId};
use crate::history::ClientState;
use crate::metrics::Metrics;
use crate::store::{AnyStore, BatchWrite, CommitOutcome, Rejected, Store, StoreError, StoredEvent};
use bytes::Bytes;
use chrono::Utc;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A message as it came off the broker.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub subject: String,
    pub payload: Bytes,
    pub stream_seq: Option<u64>,
}

/// What a committed batch held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchReport {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub effects: usize,
}

/// How often a batch is retried when another writer changed the same clients.
const MAX_CONFLICT_RETRIES: usize = 8;

pub struct Pipeline {
    store: AnyStore,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    max_event_bytes: usize,
}

impl Pipeline {
    pub fn new(
        store: AnyStore,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        max_event_bytes: usize,
    ) -> Self {
        Self {
            store,
            catalog,
            metrics,
            max_event_bytes,
        }
    }

    /// Processes and commits one batch. On `Ok` every message in it is safe to
    /// ack: it was stored, rejected and kept, or had taken effect before.
    pub async fn process(&self, batch: &[Incoming]) -> Result<BatchReport, StoreError> {
        let received_at = Utc::now();
        let mut rejected = Vec::new();
        let mut events: Vec<StoredEvent> = Vec::with_capacity(batch.len());
        let mut seen_ids: HashSet<EventId> = HashSet::with_capacity(batch.len());
        let mut duplicates = 0;
        for m in batch {
            match Envelope::parse(&m.payload, self.max_event_bytes) {
                Ok(envelope) => {
                    if !seen_ids.insert(envelope.id.clone()) {
                        duplicates += 1;
                        continue;
                    }
                    events.push(StoredEvent {
                        envelope,
                        received_at,
                        stream_seq: m.stream_seq,
                    });
                }
                Err(reason) => {
                    tracing::warn!(subject = %m.subject, seq = ?m.stream_seq, %reason, "event rejected");
                    rejected.push(Rejected {
                        received_at,
                        subject: m.subject.clone(),
                        stream_seq: m.stream_seq,
                        reason: reason.to_string(),
                        payload: String::from_utf8_lossy(
                            &m.payload[..m.payload.len().min(self.max_event_bytes)],
                        )
                        .into_owned(),
                    });
                }
            }
        }
        // Each client's events in event time; the sort is stable, so ties keep
        // stream order.
        events.sort_by(|a, b| {
            (&a.envelope.client_id, a.envelope.occurred_at)
                .cmp(&(&b.envelope.client_id, b.envelope.occurred_at))
        });

        for _ in 0..MAX_CONFLICT_RETRIES {
            let ids: Vec<&EventId> = events.iter().map(|e| &e.envelope.id).collect();
            let known = self.store.known_events(&ids).await?;
            let fresh: Vec<StoredEvent> = events
                .iter()
                .filter(|e| !known.contains(e.envelope.id.as_str()))
                .cloned()
                .collect();
            let report_dups = duplicates + (events.len() - fresh.len());

            let client_ids: Vec<&ClientId> = {
                let mut v: Vec<&ClientId> = fresh.iter().map(|e| &e.envelope.client_id).collect();
                v.dedup();
                v
            };
            let states = self.store.load_clients(&client_ids).await?;
            let write = self.decide_all(fresh, states, rejected.clone()).await;
            let report = BatchReport {
                accepted: write.events.len(),
                duplicates: report_dups,
                rejected: write.rejected.len(),
                effects: write.effects.len(),
            };
            match self.store.commit_batch(&write).await? {
                CommitOutcome::Committed => {
                    self.metrics.batch_committed(&report, &write);
                    return Ok(report);
                }
                CommitOutcome::Conflict => {
                    tracing::debug!("batch conflicted with another writer; retrying");
                    continue;
                }
            }
        }
        Err(StoreError::Corrupt {
            context: "batch commit",
            message: format!("still conflicting after {MAX_CONFLICT_RETRIES} attempts"),
        })
    }

    /// Runs the decision core for every event, off the async workers: rules
    /// are CPU work and must not stall I/O.
    async fn decide_all(
        &self,
        events: Vec<StoredEvent>,
        mut states: HashMap<ClientId, ClientState>,
        rejected: Vec<Rejected>,
    ) -> BatchWrite {
        let rules = self.catalog.rules();
        let templates = self.catalog.templates();
        let engine = self.catalog.engine.clone();
        let metrics = self.metrics.clone();
        let run = move || {
            let mut write = BatchWrite {
                rejected,
                ..Default::default()
            };
            for e in &events {
                let state = states
                    .entry(e.envelope.client_id.clone())
                    .or_insert_with(|| ClientState::new(e.envelope.client_id.clone()));
                let d = decide(&engine, &rules, &templates, state, &e.envelope);
                for (rule, ok) in &d.runs {
                    metrics.rule_run(rule, *ok);
                }
                write.effects.extend(d.effects);
                write.log.extend(d.log);
            }
            write.events = events;
            write.clients = states.into_values().collect();
            write
        };
        match tokio::task::spawn_blocking(run).await {
            Ok(w) => w,
            // A panic in the core is a bug; surface it rather than ack silently.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
