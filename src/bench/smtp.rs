//! The bench's mail server: speaks just enough SMTP to take every mail nudge
//! sends, counts it, and drops it. nudge sends over SMTP in production, so
//! the bench does too; writing thousands of `.eml` files would measure the
//! file system instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct SmtpSink {
    /// `smtp://127.0.0.1:<port>`
    pub url: String,
    received: Arc<AtomicU64>,
    server: JoinHandle<()>,
}

impl SmtpSink {
    /// Listens on a free port of 127.0.0.1 until dropped.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("smtp://{}", listener.local_addr()?);
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        let server = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                // Replies are small and each waits for the client: send at once.
                let _ = socket.set_nodelay(true);
                let count = count.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(socket, &count).await {
                        tracing::debug!(error = %e, "bench smtp session ended");
                    }
                });
            }
        });
        Ok(Self {
            url,
            received,
            server,
        })
    }

    /// Mails taken so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// One connection: every command is accepted; a message ends with a line
/// holding a single dot.
async fn session(socket: TcpStream, received: &AtomicU64) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::with_capacity(1024);
    write.write_all(b"220 bench ESMTP\r\n").await?;
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        let reply: &[u8] = match verb.as_slice() {
            b"EHLO" => b"250-bench\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n",
            b"DATA" => {
                write.write_all(b"354 end with a dot\r\n").await?;
                loop {
                    // lettre writes the closing dot on its own without
                    // TCP_NODELAY: it waits until the message is acked, and a
                    // delayed ack would hold each mail for some 40 ms.
                    let _ = socket2::SockRef::from(read.get_ref().as_ref()).set_tcp_quickack(true);
                    line.clear();
                    if read.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                }
                received.fetch_add(1, Ordering::Relaxed);
                b"250 queued\r\n"
            }
            b"QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"250 ok\r\n",
        };
        write.write_all(reply).await?;
    }
}
