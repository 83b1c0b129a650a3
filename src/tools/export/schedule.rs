//! The daemon's own exports (`export.schedule`): at each occurrence of the
//! cron schedule, one incremental run into `export.dir`. Several instances
//! may share the schedule: into one folder (on one machine, or a shared
//! file system with working `flock`), the folder's lock lets one run at a
//! time and the other finds nothing new to export.

use super::{Options, Start, export};
use crate::config::ExportConfig;
use crate::store::AnyStore;
use chrono::Utc;
use chrono_tz::Tz;
use tokio_util::sync::CancellationToken;

/// Runs the export at each occurrence of its schedule until `cancel`; a
/// run stopped by `cancel` leaves only temporary files, which the next run
/// removes. Returns at once without a schedule.
pub async fn run(store: AnyStore, config: ExportConfig, timezone: Tz, cancel: CancellationToken) {
    let Some(cron) = config.schedule else {
        return;
    };
    let opts = Options {
        dir: config.dir,
        format: config.format,
        start: Start::Resume,
        timezone,
    };
    loop {
        let Some(next) = cron.schedule.upcoming(Utc).next() else {
            tracing::warn!("export.schedule has no further occurrence; no more scheduled exports");
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            outcome = export(&store, &opts) => match outcome {
                Ok(r) => tracing::info!(
                    dir = %opts.dir.display(),
                    from_seq = r.from_seq,
                    to_seq = r.to_seq,
                    files = r.files.len(),
                    seconds = r.seconds,
                    "scheduled export written"
                ),
                Err(e) => tracing::error!(dir = %opts.dir.display(), error = %format!("{e:#}"), "scheduled export failed"),
            },
        }
    }
}
