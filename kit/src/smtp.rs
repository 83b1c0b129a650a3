//! The SMTP server nudge sends to in the tests and in the bench: it takes
//! every mail and keeps it in a Maildir (tests) or only counts it (the
//! bench, where writing thousands of files would measure the file system).
//!
//! It runs on a thread and runtime of its own, so it answers whatever the
//! caller's runtime is doing, and it can be stopped and started again on the
//! same port (a mail server outage).
//!
//! Recipients fail on purpose by how their local part starts:
//! - `reject`: a permanent `550` to RCPT;
//! - `busy`: a transient `451` to RCPT;
//! - `stall`: no answer to RCPT for an hour (a stuck server: the client must
//!   time out);
//! - `slow`: accepted, but the end of DATA is answered after [`SLOW`].
//!
//! It keeps the rules a real server enforces and a sender can break: HELO or
//! EHLO before MAIL, MAIL before RCPT, a recipient before DATA, and lines of
//! at most 1000 octets (RFC 5321 4.5.3.1.6; a longer one fails the mail with
//! a `500`, as aiosmtpd and Postfix do).
//!
//! Why not aiosmtpd, the Python server the tests used before: it takes about
//! 1.7 ms of CPU per mail kept in a Maildir (1.0 ms discarding it) on the
//! development machine; the bench sends a mail per 20 events, so aiosmtpd
//! would cost more CPU per event than nudge's own 31 µs, and the bench would
//! measure the mail server.

use crate::Error;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

/// How long a `stall*@` recipient goes unanswered.
pub const STALL: Duration = Duration::from_secs(3600);
/// How long the end of a mail to a `slow*@` recipient waits for its answer.
pub const SLOW: Duration = Duration::from_secs(3);
/// RFC 5321 4.5.3.1.4-6: a command line and a text line, CRLF included.
const MAX_COMMAND_LINE: usize = 512;
const MAX_TEXT_LINE: usize = 1000;

/// An SMTP server on a free port of 127.0.0.1, stopped when dropped.
pub struct SmtpSink {
    port: u16,
    /// Where mails are kept (`new/`), if they are.
    maildir: Option<PathBuf>,
    /// Mails accepted since the sink was made, across restarts.
    received: Arc<AtomicU64>,
    /// The server thread and its stop signal; `None` while stopped.
    running: Option<Running>,
    /// The Maildir's parent when the sink made it; removed after the server
    /// stopped (fields drop after [`Drop::drop`] ran).
    _own_dir: Option<TempDir>,
}

struct Running {
    stop: oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl SmtpSink {
    /// A sink that counts mails and keeps none (the bench).
    pub fn counting() -> Result<Self, Error> {
        Self::start(None, None)
    }

    /// A sink keeping every mail in a Maildir of its own (the tests), read
    /// back with [`Self::maildir`].
    pub fn with_maildir() -> Result<Self, Error> {
        let dir = tempfile::Builder::new()
            .prefix("nudge-smtp-")
            .tempdir()
            .map_err(|source| Error::Io {
                what: "cannot create a Maildir",
                source,
            })?;
        let maildir = dir.path().join("maildir");
        Self::start(Some(maildir), Some(dir))
    }

    fn start(maildir: Option<PathBuf>, own: Option<TempDir>) -> Result<Self, Error> {
        if let Some(m) = &maildir {
            for sub in ["tmp", "new", "cur"] {
                std::fs::create_dir_all(m.join(sub)).map_err(|source| Error::Io {
                    what: "cannot create a Maildir",
                    source,
                })?;
            }
        }
        let mut sink = Self {
            port: 0,
            maildir,
            received: Arc::new(AtomicU64::new(0)),
            running: None,
            _own_dir: own,
        };
        sink.serve()?;
        Ok(sink)
    }

    /// Binds the port (a free one the first time, the same one after) and
    /// serves on a thread of its own.
    fn serve(&mut self) -> Result<(), Error> {
        let listener = bind(self.port).map_err(|source| Error::Io {
            what: "the SMTP sink cannot listen",
            source,
        })?;
        self.port = listener
            .local_addr()
            .map_err(|source| Error::Io {
                what: "the SMTP sink has no address",
                source,
            })?
            .port();
        let shared = Arc::new(Shared {
            maildir: self.maildir.clone(),
            received: self.received.clone(),
            seq: AtomicU64::new(0),
        });
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("smtp-sink".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the SMTP sink");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("a non-blocking listener in a runtime");
                    tokio::select! {
                        _ = accept(listener, shared) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime ends every session: their sockets close.
            })
            .map_err(|source| Error::Io {
                what: "cannot start the SMTP sink's thread",
                source,
            })?;
        self.running = Some(Running { stop, thread });
        Ok(())
    }

    /// `smtp://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Maildir the mails are kept in (`new/` holds them), if they are.
    pub fn maildir(&self) -> Option<&Path> {
        self.maildir.as_deref()
    }

    /// Mails accepted so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops listening and drops every connection: the port refuses
    /// connections until [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(());
            let _ = r.thread.join();
        }
    }

    /// Serves again on the same port with the same Maildir.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        self.serve()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listener that may take the port of a sink just stopped (its closed
/// connections linger in TIME_WAIT).
fn bind(port: u16) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// What every session of one serving thread shares.
struct Shared {
    maildir: Option<PathBuf>,
    received: Arc<AtomicU64>,
    /// Orders the Maildir's file names within one nanosecond.
    seq: AtomicU64,
}

async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    while let Ok((socket, _)) = listener.accept().await {
        // Replies are small and each waits for the client: send at once.
        let _ = socket.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            // A session ends when the client goes; an error is only a client gone rudely.
            let _ = session(socket, &shared).await;
        });
    }
}

/// The transaction under way on one connection.
#[derive(Default)]
struct Envelope {
    from: Option<String>,
    to: Vec<String>,
}

async fn session(socket: TcpStream, shared: &Shared) -> io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::with_capacity(1024);
    let mut greeted = false;
    let mut env = Envelope::default();
    write.write_all(b"220 nudge-kit ESMTP\r\n").await?;
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        if line.len() > MAX_COMMAND_LINE {
            write.write_all(b"500 5.5.2 Line too long\r\n").await?;
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
        let reply: &[u8] = match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                greeted = true;
                env = Envelope::default();
                b"250-nudge-kit\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n"
            }
            "HELO" => {
                greeted = true;
                env = Envelope::default();
                b"250 nudge-kit\r\n"
            }
            "MAIL" if !greeted => b"503 5.5.1 Send HELO first\r\n",
            "MAIL" if env.from.is_some() => b"503 5.5.1 Nested MAIL command\r\n",
            "MAIL" => match path_of(arg, "FROM:") {
                Some(from) => {
                    env.from = Some(from);
                    b"250 OK\r\n"
                }
                None => b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n",
            },
            "RCPT" if env.from.is_none() => b"503 5.5.1 Need MAIL command\r\n",
            "RCPT" => match path_of(arg, "TO:") {
                None => b"501 5.5.4 Syntax: RCPT TO:<address>\r\n",
                Some(to) => {
                    let local = to
                        .split('@')
                        .next()
                        .unwrap_or_default()
                        .to_ascii_lowercase();
                    if local.starts_with("reject") {
                        b"550 5.1.1 No such user here\r\n"
                    } else if local.starts_with("busy") {
                        b"451 4.3.0 Try again later\r\n"
                    } else {
                        if local.starts_with("stall") {
                            tokio::time::sleep(STALL).await;
                        }
                        env.to.push(to);
                        b"250 OK\r\n"
                    }
                }
            },
            "DATA" if env.to.is_empty() => b"503 5.5.1 Need RCPT command\r\n",
            "DATA" => {
                let env = std::mem::take(&mut env);
                data(&mut read, &mut write, &mut line, env, shared).await?
            }
            "RSET" => {
                env = Envelope::default();
                b"250 OK\r\n"
            }
            "NOOP" => b"250 OK\r\n",
            "VRFY" => b"252 2.0.0 Cannot verify, will accept\r\n",
            "QUIT" => {
                write.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            _ => b"500 5.5.2 Command not recognized\r\n",
        };
        write.write_all(reply).await?;
    }
}

/// The address of `MAIL FROM:<a>` or `RCPT TO:<a>` (parameters after it
/// ignored); `None` when the argument does not start with `prefix`.
fn path_of(arg: &str, prefix: &str) -> Option<String> {
    let rest = arg.get(..prefix.len())?;
    if !rest.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let path = arg[prefix.len()..].trim_start();
    let path = path.split_whitespace().next().unwrap_or_default();
    Some(
        path.trim_start_matches('<')
            .trim_end_matches('>')
            .to_string(),
    )
}

/// Reads one message up to the line holding a single dot, keeps it, and
/// returns the reply to its end.
async fn data(
    read: &mut BufReader<OwnedReadHalf>,
    write: &mut OwnedWriteHalf,
    line: &mut Vec<u8>,
    env: Envelope,
    shared: &Shared,
) -> io::Result<&'static [u8]> {
    write
        .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        .await?;
    let mut message = shared
        .maildir
        .as_ref()
        .map(|_| Vec::with_capacity(16 * 1024));
    let mut too_long = false;
    loop {
        // lettre writes the closing dot on its own without TCP_NODELAY: it
        // waits until the message is acked, and a delayed ack would hold
        // each mail for some 40 ms. The kernel turns quick acks off again
        // by itself, so they are asked for before every read of the socket
        // (not before every line: a syscall per line was most of the
        // sink's CPU).
        #[cfg(target_os = "linux")]
        if read.buffer().is_empty() {
            let _ = socket2::SockRef::from(read.get_ref().as_ref()).set_tcp_quickack(true);
        }
        line.clear();
        if read.read_until(b'\n', line).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" || line == b".\n" {
            break;
        }
        too_long |= line.len() > MAX_TEXT_LINE;
        if let Some(m) = &mut message {
            // Dot-stuffing undone (RFC 5321 4.5.2).
            let text = line.strip_prefix(b".").unwrap_or(line);
            m.extend_from_slice(text);
        }
    }
    if too_long {
        return Ok(b"500 5.5.2 Line too long (see RFC 5321 4.5.3.1.6)\r\n");
    }
    if env
        .to
        .iter()
        .any(|a| a.to_ascii_lowercase().starts_with("slow"))
    {
        tokio::time::sleep(SLOW).await;
    }
    if let (Some(dir), Some(m)) = (&shared.maildir, message) {
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = keep(dir, &env, &m, seq) {
            eprintln!("smtp sink: cannot keep a mail in {}: {e}", dir.display());
            return Ok(b"451 4.3.0 Cannot store the message\r\n");
        }
    }
    shared.received.fetch_add(1, Ordering::Relaxed);
    Ok(b"250 2.0.0 OK: queued\r\n")
}

/// Writes a mail into `tmp/`, then moves it into `new/` (so a reader never
/// sees half a mail), named by arrival so that names sort in arrival order.
/// The envelope goes first, in the headers aiosmtpd's Maildir adds.
fn keep(dir: &Path, env: &Envelope, message: &[u8], seq: u64) -> io::Result<()> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!("{nanos:020}.{seq:08}.{}.nudge-kit", std::process::id());
    let mut text = format!(
        "X-MailFrom: {}\r\nX-RcptTo: {}\r\n",
        env.from.as_deref().unwrap_or_default(),
        env.to.join(", ")
    )
    .into_bytes();
    text.extend_from_slice(message);
    let tmp = dir.join("tmp").join(&name);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join("new").join(&name))
}
