//! What nudge is tested and measured against, written once for both: the
//! integration tests (`tests/it`) and the bench (`nudge-bench`) start the
//! same private services and publish the same kind of shop.
//!
//! - [`nats`]: a private `nats-server -js` (or a cluster of them) on free
//!   ports, killed when dropped;
//! - [`smtp`]: an SMTP server that takes every mail, keeping it in a Maildir
//!   (tests) or only counting it (the bench), with recipients that fail on
//!   purpose;
//! - [`workload`]: a deterministic shop as contract envelopes (JSON).
//!
//! The kit does not depend on `nudge`: nudge's integration tests use it, and
//! a dependency back would give them two copies of nudge's types. It speaks
//! the contract (`/work/shared/contract/EVENTS.md`) as JSON instead.

pub mod nats;
pub mod smtp;
pub mod workload;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Why a service of the kit did not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {what} ({hint}): {source}")]
    Spawn {
        what: &'static str,
        /// What to install or pass instead.
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("{what} exited before listening on port {port}: {status}")]
    Exited {
        what: &'static str,
        port: u16,
        status: ExitStatus,
    },
    #[error("{what} did not listen on port {port} within {LISTEN_TIMEOUT:?}")]
    NotListening { what: &'static str, port: u16 },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

/// How long a service may take to listen after it was started.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// A port of 127.0.0.1 nothing listens on right now (it may be taken again
/// before it is used: good enough for private services on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out an ephemeral port")
}

/// Waits until `child` listens on `port` of 127.0.0.1; kills it when it
/// does not in time.
fn wait_for_port(port: u16, what: &'static str, child: &mut Child) -> Result<(), Error> {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Exited { what, port, status });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::NotListening { what, port });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
