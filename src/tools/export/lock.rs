//! One run at a time per export folder: an exclusive `flock` on
//! `DIR/.lock`, held for the run and released by the kernel even when the
//! process dies, so a crashed run never leaves the folder locked.

use anyhow::{Context, bail};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Held while a run writes the folder.
pub struct DirLock(#[allow(dead_code)] File);

impl DirLock {
    /// Takes the folder's lock, or fails at once when another run has it.
    pub fn take(dir: &Path) -> anyhow::Result<DirLock> {
        let path = dir.join(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!("another export is writing {}", dir.display());
            }
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
        Ok(DirLock(file))
    }
}
