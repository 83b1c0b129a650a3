//! The HTTP server's accept loop, bounded: at most `http.max_connections`
//! connections at once (never more than half the open-file limit, so the
//! database, NATS and SMTP always have descriptors left), a deadline for a
//! request's headers that also closes idle keep-alive connections, and, at
//! the limit, the oldest connection that has not sent a request yet makes
//! room for the new one. So clients that connect and send nothing, or send
//! slowly, can hold at most a bounded number of descriptors for a bounded
//! time, and never keep `/health` or the staff page out.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How the server bounds its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Limits {
    /// `max_connections`, lowered to half the process's open-file limit.
    pub fn from_config(http: &crate::config::HttpConfig) -> Self {
        let fd_cap = open_file_limit().map_or(usize::MAX, |n| (n / 2).max(16) as usize);
        let max = http.max_connections.get().min(fd_cap);
        if max < http.max_connections.get() {
            tracing::info!(
                max_connections = max,
                "http.max_connections lowered to half the open-file limit (LimitNOFILE / ulimit -n)"
            );
        }
        Self {
            max_connections: max,
            header_timeout: Duration::from_secs(http.header_timeout_secs.get()),
        }
    }
}

fn open_file_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and reads nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// The open connections: how many, and those that have not sent a request
/// yet, oldest first, each with the token that closes it.
#[derive(Default)]
struct Slots {
    open: usize,
    next_id: u64,
    fresh: VecDeque<(u64, CancellationToken)>,
}

impl Slots {
    /// Makes room for a new connection, closing the oldest fresh one at the
    /// limit. `None`: every connection is busy with a request, refuse this one.
    fn admit(&mut self, max: usize) -> Option<(u64, CancellationToken)> {
        if self.open >= max {
            let (_, oldest) = self.fresh.pop_front()?;
            oldest.cancel();
        }
        self.open += 1;
        self.next_id += 1;
        let token = CancellationToken::new();
        self.fresh.push_back((self.next_id, token.clone()));
        Some((self.next_id, token))
    }

    fn started(&mut self, id: u64) {
        if let Some(i) = self.fresh.iter().position(|(c, _)| *c == id) {
            self.fresh.remove(i);
        }
    }

    fn closed(&mut self, id: u64) {
        self.started(id);
        self.open -= 1;
    }
}

/// Serves `app` on `listener` until `cancel`, then lets requests in flight
/// finish for up to five seconds (the live feed never finishes by itself).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, cancel: CancellationToken) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let conns = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (EMFILE) or the like: accepting again at
                // once would spin; a moment later some may be free.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admitted = slots
            .lock()
            .expect("slots lock")
            .admit(limits.max_connections);
        let Some((id, evicted)) = admitted else {
            // Every connection is in a request: dropping the socket closes it.
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (slots, app, cancel) = (slots.clone(), app.clone(), cancel.clone());
        conns.spawn(async move {
            let marks = slots.clone();
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    marks.lock().expect("slots lock").started(id);
                    app.clone().oneshot(req.map(axum::body::Body::new))
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                // Made room for a newer connection: dropping closes the socket.
                _ = evicted.cancelled() => {}
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
                }
            }
            slots.lock().expect("slots lock").closed(id);
        });
    }
    conns.close();
    conns.wait().await;
}

#[cfg(test)]
mod tests {
    use super::Slots;

    #[test]
    fn at_the_limit_the_oldest_silent_connection_makes_room() {
        let mut s = Slots::default();
        let (a, ta) = s.admit(2).unwrap();
        let (b, tb) = s.admit(2).unwrap();
        s.started(a);
        // b never sent anything: it goes for c; a is in a request and stays.
        let (c, tc) = s.admit(2).unwrap();
        assert!(tb.is_cancelled() && !ta.is_cancelled() && !tc.is_cancelled());
        s.closed(b);
        s.started(c);
        // Both busy: a new one is refused rather than cutting a request.
        assert!(s.admit(2).is_none());
        s.closed(a);
        assert!(s.admit(2).is_some());
    }
}
