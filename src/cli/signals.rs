//! Stopping the daemon on SIGTERM or Ctrl-C, bounded.

use tokio_util::sync::CancellationToken;

/// SIGTERM and Ctrl-C, listened to from the moment they are installed.
pub(crate) struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn install() -> anyhow::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| anyhow::anyhow!("cannot install a SIGTERM handler: {e}"))?,
        })
    }
}

/// Cancels on SIGTERM or Ctrl-C: the daemon then finishes the batch in hand.
/// The stop is bounded: the daemon gives up on unfinished work after
/// [`nudge::app::STOP_GRACE`], and should anything still hold the process
/// (a blocking call, a runtime that cannot shut down), it exits by force
/// a few seconds later. A second signal exits at once.
pub(crate) async fn stop_on_signal(signals: StopSignals, cancel: CancellationToken) {
    #[cfg(unix)]
    let mut term = signals.term;
    #[cfg(unix)]
    let mut next_signal = async move || {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    #[cfg(not(unix))]
    let mut next_signal = async move || {
        let _ = &signals;
        let _ = tokio::signal::ctrl_c().await;
    };
    next_signal().await;
    tracing::info!("stop requested");
    cancel.cancel();
    // A plain thread: it fires even if every runtime worker is stuck.
    std::thread::spawn(|| {
        std::thread::sleep(nudge::app::STOP_GRACE + FORCED_EXIT_AFTER_GRACE);
        eprintln!("nudge: still not stopped; exiting by force (unacked events are redelivered)");
        std::process::exit(1);
    });
    next_signal().await;
    eprintln!("nudge: second stop signal; exiting at once (unacked events are redelivered)");
    std::process::exit(1);
}

/// What the forced exit adds to the stop's grace: the final exchange with
/// the broker (at most 2 s) and the runtime's own shutdown.
pub(crate) const FORCED_EXIT_AFTER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
