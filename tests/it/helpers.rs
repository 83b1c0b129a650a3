//! Test harness: each test gets its own nats-server (JetStream on a private
//! store) and its own SMTP server keeping a Maildir, both from the test kit
//! (`nudge-kit`, shared with the bench), its own database (a SQLite file, or
//! a PostgreSQL database created for it and dropped after) and its own copy
//! of the rules and templates, and runs nudge in-process. A service that
//! cannot start fails the test.

use nudge::app::Application;
use nudge::config::Config;
use nudge::store::{AnyStore, History, Outbox};
pub use nudge_kit::free_port;
use nudge_kit::nats::NatsServer;
use nudge_kit::smtp::SmtpSink;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// Runs each named test, an `async fn(Backend)`, once per database backend:
/// `name::sqlite` and `name::postgres`.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
        }
    )*};
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where the Postgres tests create their databases: `NUDGE_TEST_PG_URL`, a
/// database the user may `CREATE DATABASE` from.
fn pg_admin_url() -> String {
    std::env::var("NUDGE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of one test's own: a SQLite file in `dir`, or a fresh
/// PostgreSQL database, dropped (connections and all) when this is dropped.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn create(backend: Backend, dir: &Path, name: &str) -> TestDb {
        match backend {
            Backend::Sqlite => TestDb {
                url: format!("sqlite://{}/{name}.db", dir.display()),
                pg_name: None,
            },
            Backend::Postgres => {
                use sqlx::Connection;
                let admin = pg_admin_url();
                let mut salt = [0u8; 4];
                getrandom::fill(&mut salt).unwrap();
                let db = format!("nudge_t_{name}_{}", hex::encode(salt));
                let mut c = sqlx::PgConnection::connect(&admin)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("PostgreSQL at {admin} (NUDGE_TEST_PG_URL) must be reachable: {e}")
                    });
                sqlx::query(&format!("CREATE DATABASE {db}"))
                    .execute(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("cannot create database {db}: {e}"));
                c.close().await.ok();
                let mut url = url::Url::parse(&admin).expect("NUDGE_TEST_PG_URL is a url");
                url.set_path(&db);
                TestDb {
                    url: url.to_string(),
                    pg_name: Some(db),
                }
            }
        }
    }

    /// A connection for checks the store's API does not offer.
    pub async fn sql(&self) -> Sql {
        Sql::connect(&self.url).await
    }

    /// The PostgreSQL database's name; panics on SQLite.
    pub fn pg_name(&self) -> &str {
        self.pg_name.as_deref().expect("a PostgreSQL test database")
    }

    /// Runs `sql` on the server's admin database (NUDGE_TEST_PG_URL), not
    /// on this one: for taking this one away and bringing it back.
    pub async fn pg_admin(&self, sql: &str) {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
        sqlx::raw_sql(sql)
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        c.close().await.ok();
    }

    /// Ends every session on this database (PostgreSQL).
    pub async fn pg_terminate_sessions(&self) {
        let db = self.pg_name();
        self.pg_admin(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{db}' AND pid <> pg_backend_pid()"
        ))
        .await;
    }

    /// Makes this database unreachable without touching the shared server:
    /// new connections are refused and the open ones are ended (PostgreSQL).
    pub async fn pg_refuse_connections(&self) {
        let db = self.pg_name();
        self.pg_admin(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
            .await;
        self.pg_terminate_sessions().await;
    }

    /// Undoes [`TestDb::pg_refuse_connections`].
    pub async fn pg_allow_connections(&self) {
        let db = self.pg_name();
        self.pg_admin(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"))
            .await;
    }

    /// Makes every new session on this database read-only (or writable
    /// again) and ends the open ones, so nudge reconnects into the new state.
    pub async fn pg_set_read_only(&self, on: bool) {
        let db = self.pg_name();
        let sql = if on {
            format!("ALTER DATABASE {db} SET default_transaction_read_only = on")
        } else {
            format!("ALTER DATABASE {db} RESET default_transaction_read_only")
        };
        self.pg_admin(&sql).await;
        self.pg_terminate_sessions().await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(db) = self.pg_name.take() else {
            return;
        };
        // Drop runs inside the test's runtime: do the async work on a thread
        // of its own.
        let admin = pg_admin_url();
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                let mut c = sqlx::PgConnection::connect(&admin).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                    .execute(&mut c)
                    .await?;
                c.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop a test database: {e}");
        }
    }
}

/// Plain SQL on a test database, for both backends. Queries cast what they
/// read to TEXT (`CAST(x AS TEXT)` works on both), so rows come back as text.
pub enum Sql {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Sql {
    pub async fn connect(url: &str) -> Sql {
        if url.starts_with("sqlite:") {
            Sql::Sqlite(sqlx::SqlitePool::connect(url).await.unwrap())
        } else {
            Sql::Postgres(sqlx::PgPool::connect(url).await.unwrap())
        }
    }

    pub async fn execute(&self, sql: &str) {
        match self {
            Sql::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            Sql::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        match self {
            Sql::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await,
            Sql::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Every row, each column as optional text.
    pub async fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        use sqlx::Row;
        fn all<R: Row>(rows: Vec<R>) -> Vec<Vec<Option<String>>>
        where
            for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
            usize: sqlx::ColumnIndex<R>,
        {
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.get::<Option<String>, _>(i))
                        .collect()
                })
                .collect()
        }
        match self {
            Sql::Sqlite(p) => sqlx::query(sql).fetch_all(p).await.map(all),
            Sql::Postgres(p) => sqlx::query(sql).fetch_all(p).await.map(all),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn close(self) {
        match self {
            Sql::Sqlite(p) => p.close().await,
            Sql::Postgres(p) => p.close().await,
        }
    }
}

/// A private `nats-server -js` with a store of its own.
pub fn start_nats() -> NatsServer {
    NatsServer::start().unwrap_or_else(|e| panic!("{e}"))
}

/// A real SMTP server keeping every message it accepts in a Maildir
/// (read with [`TestEnv::mails`]); recipients `reject*@` get a 550, `busy*@`
/// a 451, `stall*@` no answer at all, and `slow*@` are accepted after 3 s
/// (see `nudge_kit::smtp`).
pub fn start_smtp() -> SmtpSink {
    SmtpSink::with_maildir().unwrap_or_else(|e| panic!("{e}"))
}

/// A mail as the SMTP server received it.
#[derive(Debug, Clone)]
pub struct Mail {
    pub raw: String,
    pub to: String,
    pub subject: String,
    pub message_id: String,
    pub text: String,
    pub html: String,
}

impl Mail {
    pub fn header(&self, name: &str) -> Option<String> {
        let parsed = mail_parser::MessageParser::default()
            .parse(self.raw.as_bytes())
            .expect("parsable mail");
        parsed.header_raw(name).map(|v| v.trim().to_string())
    }
}

pub fn read_maildir(dir: &Path) -> Vec<Mail> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("new")) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let raw = std::fs::read_to_string(&p).unwrap();
        let m = mail_parser::MessageParser::default()
            .parse(raw.as_bytes())
            .expect("parsable mail");
        let to = m
            .to()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .unwrap_or_default()
            .to_string();
        out.push(Mail {
            to,
            subject: m.subject().unwrap_or_default().to_string(),
            message_id: m.message_id().unwrap_or_default().to_string(),
            text: m.body_text(0).map(|s| s.to_string()).unwrap_or_default(),
            html: m.body_html(0).map(|s| s.to_string()).unwrap_or_default(),
            raw,
        });
    }
    out
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes like a shop that retries until the broker acks (a broker
/// restarting or electing a new stream leader); the same `Nats-Msg-Id`
/// makes a retry harmless.
pub async fn publish_retrying(env: &TestEnv, e: &Value) {
    let ty = e["type"].as_str().unwrap();
    let id = e["id"].as_str().unwrap();
    let payload = serde_json::to_vec(e).unwrap();
    let subject = format!("{}.{ty}", env.config.nats.subject_prefix);
    for _ in 0..100 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        let sent = env
            .js
            .publish_with_headers(subject.clone(), headers, payload.clone().into())
            .await;
        if let Ok(ack) = sent
            && tokio::time::timeout(Duration::from_secs(2), ack)
                .await
                .is_ok_and(|a| a.is_ok())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not publish {id}");
}

/// A `nudge run` process, killed when dropped (a failing test leaves none behind).
pub struct Daemon(Child);

impl std::ops::Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nudge as a process of its own (`nudge run`), configured by `vars`.
pub fn spawn_daemon(vars: &[(String, String)]) -> Daemon {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nudge"));
    cmd.args(["run"]).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in vars {
        cmd.env(k, v);
    }
    if std::env::var("TEST_LOG").is_err() {
        cmd.stderr(Stdio::null()).stdout(Stdio::null());
    }
    Daemon(cmd.spawn().expect("nudge starts"))
}

/// The settings of a `nudge run` process on this environment's services,
/// with `extra` on top.
pub fn daemon_vars(env: &TestEnv, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let d = env.dir.path().display();
    let base = [
        ("NUDGE__NATS__URL", env.config.nats.url.expose().to_string()),
        ("NUDGE__NATS__STREAM", env.config.nats.stream.clone()),
        ("NUDGE__DATABASE__URL", env.db.url.clone()),
        ("NUDGE__MAIL__TRANSPORT", "smtp".into()),
        ("NUDGE__SMTP__URL", env.smtp.url()),
        ("NUDGE__SMTP__FROM", "Shop <hello@shop.test>".into()),
        ("NUDGE__RULES__DIR", format!("{d}/rules")),
        ("NUDGE__TEMPLATES__DIR", format!("{d}/templates")),
        ("NUDGE__HTTP__LISTEN", format!("127.0.0.1:{}", free_port())),
        ("NUDGE__NATS__BATCH_SIZE", "100".into()),
        ("NUDGE__DELIVERY__POLL_MS", "50".into()),
        ("NUDGE__MAIL__QUIET_HOURS", "null".into()),
        // A killed instance's claims and unacked events come back quickly.
        ("NUDGE__DELIVERY__LEASE_SECS", "3".into()),
        ("NUDGE__NATS__ACK_WAIT_SECS", "5".into()),
    ];
    base.into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// Asks a process to stop the way an orchestrator does: SIGTERM.
pub fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "SIGTERM delivered");
}

/// Private services, a database file and rule/template folders for one test.
pub struct TestEnv {
    /// Kept for the test's lifetime: dropping it stops the server.
    pub nats: NatsServer,
    pub smtp: SmtpSink,
    pub config: Config,
    pub js: async_nats::jetstream::Context,
    /// Declared before `dir`: dropped first.
    pub db: TestDb,
    pub dir: TempDir,
}

/// nudge running in-process against a [`TestEnv`].
pub struct TestApp {
    pub env: TestEnv,
    pub http: SocketAddr,
    pub store: AnyStore,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl std::ops::Deref for TestApp {
    type Target = TestEnv;
    fn deref(&self) -> &TestEnv {
        &self.env
    }
}

impl TestEnv {
    pub async fn new(backend: Backend) -> TestEnv {
        Self::with_env(backend, &[]).await
    }

    /// A test environment with extra `NUDGE__...` settings.
    pub async fn with_env(backend: Backend, extra: &[(&str, &str)]) -> TestEnv {
        let nats = start_nats();
        let smtp = start_smtp();
        let dir = tempfile::tempdir().unwrap();
        let db = TestDb::create(backend, dir.path(), "nudge").await;
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for sub in ["rules", "templates"] {
            let to = dir.path().join(sub);
            std::fs::create_dir_all(&to).unwrap();
            for e in std::fs::read_dir(root.join(sub)).unwrap().flatten() {
                if e.path().is_file() {
                    std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
                }
            }
        }
        let d = dir.path().display();
        let env: Vec<(String, String)> = [
            ("NUDGE__NATS__URL", nats.url()),
            ("NUDGE__NATS__STREAM", format!("TEST_{}", free_port())),
            ("NUDGE__DATABASE__URL", db.url.clone()),
            ("NUDGE__MAIL__TRANSPORT", "smtp".into()),
            ("NUDGE__SMTP__URL", smtp.url()),
            ("NUDGE__SMTP__FROM", "Shop <hello@shop.test>".into()),
            ("NUDGE__SMTP__TIMEOUT_SECS", "5".into()),
            ("NUDGE__RULES__DIR", format!("{d}/rules")),
            ("NUDGE__RULES__RELOAD_POLL_MS", "100".into()),
            ("NUDGE__TEMPLATES__DIR", format!("{d}/templates")),
            ("NUDGE__DELIVERY__POLL_MS", "100".into()),
            ("NUDGE__DELIVERY__RETRY_BASE_SECS", "1".into()),
            ("NUDGE__HTTP__LISTEN", "127.0.0.1:0".into()),
            ("NUDGE__NATS__MAX_EVENT_BYTES", "4096".into()),
            ("NUDGE__TEAMS__SALES__EMAIL", "sales@shop.test".into()),
            ("NUDGE__RULES__SETTINGS__PARTNER_SHARES__ACME", "10".into()),
            ("NUDGE__RULES__SETTINGS__DEFAULT_PARTNER_SHARE", "5".into()),
            ("NUDGE__SCHEDULER__TICK_MS", "200".into()),
            // Tests run at any hour; the quiet-hours test turns them on.
            ("NUDGE__MAIL__QUIET_HOURS", "null".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
        let config = Config::load_with_env(None, env).expect("test config is valid");
        if std::env::var("TEST_LOG").is_ok() {
            nudge::telemetry::init(&config.log);
        }
        let client = async_nats::connect(config.nats.servers().as_slice())
            .await
            .unwrap();
        let js = async_nats::jetstream::new(client);
        TestEnv {
            nats,
            smtp,
            config,
            js,
            db,
            dir,
        }
    }

    pub fn rules_dir(&self) -> PathBuf {
        self.dir.path().join("rules")
    }

    /// Creates the stream as nudge would, for publishing before nudge starts.
    pub async fn create_stream(&self) {
        nudge::flow::ingest::ensure_stream(&self.js, &self.config.nats)
            .await
            .unwrap();
    }

    pub async fn start(self) -> TestApp {
        self.start_with_clock(nudge::delivery::system_clock()).await
    }

    /// Starts nudge without waiting for it to be ready.
    pub async fn start_unready(self) -> TestApp {
        let app = Application::build(self.config.clone())
            .await
            .expect("app builds");
        let http = app.http_addr();
        let store = app.store().clone();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(cancel.clone()));
        TestApp {
            env: self,
            http,
            store,
            cancel,
            task,
        }
    }

    /// Starts nudge with a mail sender that reads the time from `clock`.
    pub async fn start_with_clock(self, clock: nudge::delivery::Clock) -> TestApp {
        let app = Application::build(self.config.clone())
            .await
            .expect("app builds")
            .with_clock(clock);
        let http = app.http_addr();
        let store = app.store().clone();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(cancel.clone()));
        let t = TestApp {
            env: self,
            http,
            store,
            cancel,
            task,
        };
        t.wait_healthy().await;
        t
    }

    /// Publishes an event the way the shop does.
    pub async fn publish(&self, event: &Value) {
        let ty = event["type"].as_str().unwrap_or("unknown");
        let id = event["id"].as_str().unwrap_or("");
        self.publish_raw(ty, id, serde_json::to_vec(event).unwrap())
            .await;
    }

    pub async fn publish_raw(&self, ty: &str, msg_id: &str, payload: Vec<u8>) {
        let mut headers = async_nats::HeaderMap::new();
        if !msg_id.is_empty() {
            headers.insert("Nats-Msg-Id", msg_id);
        }
        let subject = format!("{}.{ty}", self.config.nats.subject_prefix);
        // Right after a stream is created the server can briefly answer "no
        // stream" (no responders); retry that, and only that, for a moment.
        for attempt in 0.. {
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone().into())
                .await
                .expect("publish")
                .await;
            match ack {
                Ok(_) => return,
                Err(e)
                    if attempt < 50
                        && e.kind()
                            == async_nats::jetstream::context::PublishErrorKind::StreamNotFound =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("stream ack: {e:?}"),
            }
        }
    }

    /// What the broker knows of nudge's consumer: delivered, acked, pending.
    pub async fn consumer_info(&self) -> async_nats::jetstream::consumer::Info {
        let stream = self
            .js
            .get_stream(&self.config.nats.stream)
            .await
            .expect("the stream exists");
        stream
            .consumer_info(&self.config.nats.consumer)
            .await
            .expect("the consumer exists")
    }

    pub fn mails(&self) -> Vec<Mail> {
        read_maildir(self.smtp.maildir().expect("the test sink keeps a Maildir"))
    }

    /// Waits until at least `n` mails arrived, then returns all of them.
    pub async fn wait_mails(&self, n: usize) -> Vec<Mail> {
        eventually(Duration::from_secs(20), &format!("{n} mails"), || async {
            let m = self.mails();
            (m.len() >= n).then_some(m)
        })
        .await
    }
}

/// A second nudge instance on the same database, stream and consumer.
pub struct Peer {
    pub http: SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Peer {
    pub async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
    }
}

impl TestApp {
    pub async fn start_peer(&self) -> Peer {
        let app = Application::build(self.config.clone())
            .await
            .expect("peer builds");
        let http = app.http_addr();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(cancel.clone()));
        Peer { http, cancel, task }
    }

    pub async fn spawn(backend: Backend) -> TestApp {
        TestEnv::new(backend).await.start().await
    }

    pub async fn wait_healthy(&self) {
        let url = format!("http://{}/health", self.http);
        eventually(Duration::from_secs(20), "/health ready", || {
            let url = url.clone();
            async move {
                let r = reqwest::get(&url).await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        // Healthy means connected; the stream is created by the ingest task
        // right after: wait for it so publishes are not lost to "no stream".
        eventually(Duration::from_secs(20), "stream created", || async {
            self.js.get_stream(&self.config.nats.stream).await.ok()
        })
        .await;
    }

    /// Waits until the store holds `n` events: everything published was decided.
    pub async fn wait_events(&self, n: u64) {
        self.wait_events_within(n, Duration::from_secs(20)).await
    }

    pub async fn wait_events_within(&self, n: u64, limit: Duration) {
        eventually(limit, &format!("{n} stored events"), || async {
            (self.store.count_events().await.ok()? >= n).then_some(())
        })
        .await
    }

    /// Waits until the outbox has nothing pending or in flight.
    pub async fn wait_outbox_settled(&self) {
        eventually(Duration::from_secs(20), "the outbox to settle", || async {
            let rows = self.store.list_outbox(10_000).await.ok()?;
            rows.iter()
                .all(|r| r.status == "sent" || r.status == "failed")
                .then_some(())
        })
        .await
    }

    pub async fn post(&self, path: &str) -> reqwest::Response {
        reqwest::Client::new()
            .post(format!("http://{}{path}", self.http))
            .send()
            .await
            .expect("http request")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("http://{}{path}", self.http))
            .await
            .expect("http request")
    }

    /// Stops nudge the way SIGTERM does, waits for it, and hands back the
    /// environment for a restart.
    pub async fn stop(self) -> TestEnv {
        self.cancel.cancel();
        self.task.await.unwrap().unwrap();
        self.env
    }
}

pub fn registered(id: &str, client: &str, channel: &str, first_name: &str) -> Value {
    serde_json::json!({
        "id": id,
        "type": "client_registered",
        "client_id": client,
        "occurred_at": "2026-11-20T10:00:00Z",
        "data": {
            "email": format!("{client}@example.com"),
            "first_name": first_name,
            "acquisition_channel": channel,
            "promo_code": "WELCOME10",
            "marketing_consent": true
        },
        "context": {"channel": "web", "session_id": format!("s-{client}")}
    })
}

/// An RFC 3339 time `secs` seconds before now: back-dated events let tests
/// cover hours and days without waiting for them.
pub fn ago(secs: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(secs)).to_rfc3339()
}

/// A contract event (the kit's envelope, as the bench publishes them).
pub fn event(id: &str, ty: &str, client: &str, at: &str, data: Value, context: Value) -> Value {
    nudge_kit::workload::envelope(id, ty, client, at, data, context)
}

/// A registration at a given time, with marketing consent.
pub fn registered_at(id: &str, client: &str, at: &str) -> Value {
    let mut e = registered(id, client, "organic", &client.to_uppercase());
    e["occurred_at"] = Value::String(at.to_string());
    e
}

/// Counts, in shared counters, every event applied and every one applied
/// out of its client's order (each client's events carry n = 1, 2, ...).
pub const ORDER_CHECK: &str = r#"
const ON = ["page_viewed"];
let n = event.data.n;
let last = recall("n") ?? 0;
if n != last + 1 {
    add("order_violations", "year", 1);
}
remember("n", n);
add("applied", "year", 1);
"#;
