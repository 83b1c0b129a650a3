//! `nudge export`: one run of the analytics export (see
//! `nudge::tools::export`), its outcome printed as a summary or as JSON.

use nudge::app::open_store;
use nudge::config::{Config, ExportFormat};
use nudge::tools::export::{Options, Start, export};
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct ExportArgs {
    /// The export folder (default: export.dir).
    #[arg(long, value_name = "DIR")]
    to: Option<PathBuf>,
    /// Export the events after this stream sequence (default: after the
    /// last one the folder's previous run exported).
    #[arg(long, conflicts_with = "since")]
    since_seq: Option<u64>,
    /// Export from the first event that occurred at this time (RFC 3339) on.
    #[arg(long)]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// File format (default: export.format).
    #[arg(long, value_enum)]
    format: Option<ExportFormat>,
    /// Print the run's report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(config: &Config, args: ExportArgs) -> anyhow::Result<()> {
    let store = open_store(config).await?;
    let start = match (args.since_seq, args.since) {
        (Some(n), _) => Start::AfterSeq(i64::try_from(n)?),
        (None, Some(t)) => Start::Since(t),
        (None, None) => Start::Resume,
    };
    let opts = Options {
        dir: args.to.unwrap_or_else(|| config.export.dir.clone()),
        format: args.format.unwrap_or(config.export.format),
        start,
        timezone: config.history.business_timezone,
    };
    let report = export(&store, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "exported events ({}, {}] to {} in {:.1} s{}",
            report.from_seq,
            report.to_seq,
            opts.dir.display(),
            report.seconds,
            if report.restarted_for_erasure {
                " (from the start: clients were erased since the last run)"
            } else {
                ""
            }
        );
        for (table, rows) in &report.rows {
            println!("  {table}: {rows} rows");
        }
    }
    Ok(())
}
