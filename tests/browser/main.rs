//! Browser tests, in a binary of their own: `cargo test` runs test binaries
//! one after another, and [`ALONE`] runs these two one at a time, so what
//! they measure (the wall board's publish-to-screen latency) is nudge's and
//! the page's, not two cores shared with the ~190 integration tests of
//! `tests/it` and another Chromium. Under that contention the wall board's
//! p99 was seen at 1.1 s in CI, against 125 ms alone.

#[macro_use]
#[allow(dead_code, unused_macros)]
#[path = "../it/helpers.rs"]
mod helpers;

mod staff;
mod wall;

/// Held for the whole of each test here.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A Node script driving the browser, followed line by line until it ends
/// or its deadline passes; what it printed and its stderr come with the end.
pub(crate) struct Script {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
    deadline: tokio::time::Instant,
    limit: std::time::Duration,
    said: Vec<String>,
    failure: Option<String>,
}

/// How a script ended.
pub(crate) struct Ended {
    pub(crate) status: std::process::ExitStatus,
    /// Its stdout lines.
    pub(crate) said: Vec<String>,
    pub(crate) stderr: String,
    /// Why following it failed: no end in time, its output unreadable.
    pub(crate) failure: Option<String>,
}

impl Ended {
    /// Panics, with all of the above, unless the script ended well and
    /// `ok` holds; `what` names the test and `why` what `ok` was.
    pub(crate) fn check(&self, what: &str, ok: bool, why: &str) {
        if self.failure.is_some() || !self.status.success() || !ok {
            panic!(
                "the {what} test failed: {} (exit: {}; it printed {:?})\n--- stderr ---\n{}",
                self.failure.as_deref().unwrap_or(why),
                self.status,
                self.said,
                self.stderr
            );
        }
    }
}

impl Script {
    /// Starts `command` (`node` and its script, with its environment),
    /// which has until `limit` from now to end.
    pub(crate) fn start(command: &mut tokio::process::Command, limit: std::time::Duration) -> Self {
        use std::process::Stdio;
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let mut stderr = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        Script {
            child,
            lines,
            stderr,
            deadline: tokio::time::Instant::now() + limit,
            limit,
            said: Vec::new(),
            failure: None,
        }
    }

    /// Its next line; `None` once it closed its output, ran out of time or
    /// its output cannot be read (the last two kill it at the end).
    pub(crate) async fn next(&mut self) -> Option<String> {
        if self.failure.is_some() {
            return None;
        }
        match tokio::time::timeout_at(self.deadline, self.lines.next_line()).await {
            Err(_) => self.failure = Some(format!("no end within {:?}", self.limit)),
            Ok(Err(e)) => self.failure = Some(format!("reading its output: {e}")),
            Ok(Ok(None)) => {}
            Ok(Ok(Some(line))) => {
                self.said.push(line.clone());
                return Some(line);
            }
        }
        None
    }

    /// Waits for it to exit (killed at once after a failure, or at the
    /// deadline).
    pub(crate) async fn end(mut self) -> Ended {
        if self.failure.is_some() {
            let _ = self.child.start_kill();
        } else if tokio::time::timeout_at(self.deadline, self.child.wait())
            .await
            .is_err()
        {
            self.failure = Some(format!("did not exit within {:?}", self.limit));
            let _ = self.child.start_kill();
        }
        let status = self.child.wait().await.expect("wait for node");
        let stderr = tokio::time::timeout(std::time::Duration::from_secs(10), self.stderr)
            .await
            .map(|r| r.unwrap_or_default())
            .unwrap_or_else(|_| "(stderr still open)".into());
        Ended {
            status,
            said: self.said,
            stderr,
            failure: self.failure,
        }
    }
}
