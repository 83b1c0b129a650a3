//! A private `nats-server -js`: its own free port, its own store folder,
//! killed when dropped, so no two tests (and no test and bench) share a
//! broker. It can be stopped and started again on the same port with the
//! same store (a broker outage), and started as a routed cluster.

use crate::{Error, free_port, wait_for_port};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use tempfile::TempDir;

/// A running (or stopped) `nats-server` with JetStream on 127.0.0.1.
pub struct NatsServer {
    /// The process; `None` while stopped.
    child: Option<Child>,
    /// Client port, kept across restarts.
    port: u16,
    /// JetStream's store, kept across restarts.
    store: PathBuf,
    /// Arguments beyond the basics (cluster name and routes), given again on
    /// restart.
    extra: Vec<String>,
    /// The store's folder when the server made it; removed after the
    /// process is gone (fields drop after [`Drop::drop`] ran).
    _own_store: Option<TempDir>,
}

impl NatsServer {
    /// Starts on a free port with a store folder of its own, removed when
    /// the server is dropped.
    pub fn start() -> Result<Self, Error> {
        let dir = own_dir()?;
        Self::launch(dir.path().to_path_buf(), Some(dir), Vec::new())
    }

    /// Starts on a free port with its store in `dir` (kept afterwards).
    pub fn start_in(dir: &Path) -> Result<Self, Error> {
        Self::launch(dir.to_path_buf(), None, Vec::new())
    }

    /// `nodes` servers with JetStream routed to each other as cluster
    /// `shop` (nodes `n0`, `n1`, ...), each with a store of its own.
    pub fn cluster(nodes: usize) -> Result<Vec<Self>, Error> {
        let routes: Vec<u16> = (0..nodes).map(|_| free_port()).collect();
        let route_urls = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        routes
            .iter()
            .enumerate()
            .map(|(i, route)| {
                let extra = [
                    "-n".into(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "shop".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".into(),
                    route_urls.clone(),
                ];
                let dir = own_dir()?;
                Self::launch(dir.path().to_path_buf(), Some(dir), extra.to_vec())
            })
            .collect()
    }

    fn launch(store: PathBuf, own: Option<TempDir>, extra: Vec<String>) -> Result<Self, Error> {
        let mut server = Self {
            child: None,
            port: free_port(),
            store,
            extra,
            _own_store: own,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .args(&self.extra)
            .arg("-sd")
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                what: "nats-server",
                hint: "is it installed? see .ci/run",
                source,
            })?;
        wait_for_port(self.port, "nats-server", &mut child)?;
        self.child = Some(child);
        Ok(())
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id (to read its CPU time); 0 while stopped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Kills the server: its port refuses connections until [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store (and
    /// cluster routes); stops it first if it runs.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn own_dir() -> Result<TempDir, Error> {
    tempfile::Builder::new()
        .prefix("nudge-nats-")
        .tempdir()
        .map_err(|source| Error::Io {
            what: "cannot create a store folder for nats-server",
            source,
        })
}
