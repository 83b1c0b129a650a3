//! Startup as a value: [`Application::build`] opens the database, loads rules
//! and templates, binds the HTTP listener and connects to NATS;
//! [`Application::run_until_stopped`] runs every task until the token is
//! cancelled, then lets each finish its unit of work.

use crate::config::{Config, Secret};
use crate::delivery::unsubscribe::Signer;
use crate::delivery::{Clock, Sender, system_clock};
use crate::flow::catalog::Catalog;
use crate::flow::ingest;
use crate::flow::live::Live;
use crate::flow::pipeline::Pipeline;
use crate::flow::scheduler::Scheduler;
use crate::http::{ApiState, Limits, router, serve};
use crate::metrics::Metrics;
use crate::store::{Admin, AnyStore, Window};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a stop waits for the work in hand (the batches being committed,
/// the mails being sent) before it gives up on it: whatever the broker and
/// the database are doing, `run_until_stopped` returns within this plus
/// [`STOP_NATS_WAIT`]. Work given up on is safe: a batch not committed is
/// not acked and comes back; a mail claimed but not sent is retried after
/// its lease.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The most a stop waits for the broker to confirm it read our last words.
const STOP_NATS_WAIT: Duration = Duration::from_secs(2);

pub struct Application {
    config: Config,
    store: AnyStore,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    nats: async_nats::Client,
    listener: tokio::net::TcpListener,
    signer: Arc<Signer>,
    clock: Clock,
    live: Live,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // Before anything is opened: an unsafe configuration changes nothing.
        check_open_api(&config.http)?;
        let store = open_store(&config).await?;
        let catalog = Arc::new(Catalog::load(&config));
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("cannot listen on http.listen {}", config.http.listen))?;
        let nats = ingest::connect(&config.nats)
            .await
            .with_context(|| format!("cannot connect to nats.url {}", config.nats.url))?;
        let signer = Arc::new(
            Signer::load(
                config.mail.unsubscribe_secret.as_ref().map(Secret::expose),
                &store,
            )
            .await
            .context("cannot load the unsubscribe signing key")?,
        );
        Ok(Self {
            config,
            store,
            catalog,
            metrics: Arc::new(Metrics::default()),
            nats,
            listener,
            signer,
            clock: system_clock(),
            live: Live::default(),
        })
    }

    /// Replaces the wall clock of the mail sender (quiet hours, retries):
    /// for tests that must not wait for hours.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The bound HTTP address (the real port when `http.listen` used port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn store(&self) -> &AnyStore {
        &self.store
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.clone()
    }

    pub async fn run_until_stopped(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let wake = Arc::new(Notify::new());

        tracker.spawn(self.catalog.clone().watch(
            Duration::from_millis(self.config.rules.reload_poll_ms.get()),
            cancel.clone(),
        ));

        let sender = Sender::new(
            &self.config,
            self.store.clone(),
            self.catalog.clone(),
            self.metrics.clone(),
            Some(self.nats.clone()),
            self.signer.clone(),
            self.clock.clone(),
        )?
        .with_live(self.live.clone());
        tracker.spawn(sender.run(wake.clone(), cancel.clone()));

        let pipeline = Arc::new(
            Pipeline::new(
                self.store.clone(),
                self.catalog.clone(),
                self.metrics.clone(),
                &self.config,
            )
            .with_live(self.live.clone()),
        );
        let scheduler = Arc::new(Scheduler::new(
            pipeline.clone(),
            self.catalog.clone(),
            self.config.scheduler.clone(),
            wake.clone(),
        ));
        tracker.spawn(scheduler.clone().run(cancel.clone()));
        tracker.spawn(crate::tools::export::schedule::run(
            self.store.clone(),
            self.config.export.clone(),
            self.config.history.business_timezone,
            cancel.clone(),
        ));
        let nats_cfg = self.config.nats.clone();
        let js = async_nats::jetstream::new(self.nats.clone());
        let ingest_cancel = cancel.clone();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        tracker.spawn(async move {
            let standing_by = |on: bool| metrics.set_standby(on);
            let Some(_consuming) = store.consumer_lock(&ingest_cancel, &standing_by).await else {
                return;
            };
            // The broker may not be there yet: retry setup with backoff
            // instead of exiting, while /health says not ready.
            let mut delay = Duration::from_millis(250);
            let consumer = loop {
                let attempt = async {
                    let stream = ingest::ensure_stream(&js, &nats_cfg).await?;
                    ingest::ensure_consumer(&stream, &nats_cfg).await
                };
                let attempt = tokio::select! {
                    // A JetStream request can wait seconds for an answer
                    // from a broker that is not there.
                    _ = ingest_cancel.cancelled() => return,
                    attempt = attempt => attempt,
                };
                match attempt {
                    Ok(c) => break c,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?delay, "nats not ready");
                        tokio::select! {
                            _ = ingest_cancel.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            };
            tracing::info!(stream = %nats_cfg.stream, consumer = %nats_cfg.consumer, "consuming");
            ingest::run(consumer, pipeline, &nats_cfg, wake, ingest_cancel).await;
        });

        let state = ApiState::new(
            self.store.clone(),
            Some(self.nats.clone()),
            self.catalog.clone(),
            self.metrics.clone(),
            Some(scheduler),
            Some(self.signer.clone()),
            &self.config.nats,
            self.live.clone(),
            &self.config.http,
        )
        .with_config(Arc::new(self.config.clone()));
        let limits = Limits::from_config(&self.config.http);
        let http_cancel = cancel.clone();
        let addr = self.http_addr();
        let listener = self.listener;
        tracker.spawn(async move {
            tracing::info!(%addr, max_connections = limits.max_connections, "http listening");
            serve(listener, router(state), limits, http_cancel).await;
        });

        tracker.close();
        cancel.cancelled().await;
        tracing::info!("stopping: finishing the work in hand");
        if tokio::time::timeout(STOP_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                grace = ?STOP_GRACE,
                "the work in hand did not finish in time; stopping without it (what was not acked is redelivered)"
            );
        }
        // Acks are buffered publishes, and ingest's pull request was
        // unsubscribed when it stopped. `flush` only writes them to the
        // socket; a request the server answers (here "no responders")
        // proves it has read all of it: from now on it delivers nothing to
        // this instance, where a message would wait ack_wait for nothing.
        // Bounded: with the broker away, neither would ever complete.
        let roundtrip = self
            .nats
            .request(self.nats.new_inbox(), bytes::Bytes::new());
        if tokio::time::timeout(STOP_NATS_WAIT, roundtrip)
            .await
            .is_err()
        {
            tracing::warn!(
                "the broker did not answer before the stop; unacked events are redelivered after nats.ack_wait_secs"
            );
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the configured database and brings its schema up to date.
pub async fn open_store(config: &Config) -> anyhow::Result<AnyStore> {
    let store = AnyStore::open(&config.database)
        .await
        .with_context(|| format!("cannot open database.url {}", config.database.url))?;
    store
        .migrate()
        .await
        .context("cannot migrate the database")?;
    Ok(store)
}

/// Refuses to serve the API without any token on an address others can
/// reach, unless `http.allow_open` says so: an open API exports and erases
/// clients for anyone. On loopback it is open with a warning (a developer's
/// machine, or a proxy on the same host that authenticates).
fn check_open_api(http: &crate::config::HttpConfig) -> anyhow::Result<()> {
    if http.token.is_some() || !http.tokens.is_empty() {
        return Ok(());
    }
    if http.listen.ip().is_loopback() || http.allow_open {
        tracing::warn!(
            listen = %http.listen,
            "no http.token or http.tokens: /api is open to anyone who can reach http.listen"
        );
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve /api without a token on {}: set http.tokens (or http.token), \
         listen on a loopback address, or set http.allow_open: true to serve it open on purpose",
        http.listen
    )
}
