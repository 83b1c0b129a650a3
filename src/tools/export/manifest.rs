//! `manifest.json`: what each run wrote into an export folder and where
//! the export got to, and the files of the incremental tables found on disk
//! (named by their range of stream sequences, `part-FROM-TO`), which a run
//! goes by rather than by the manifest, so that files of a run cut short
//! before it wrote the manifest are replaced too.

use super::tables::INCREMENTAL_TABLES;
use super::writer::{FileInfo, Format};
use anyhow::Context;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FILE: &str = "manifest.json";

/// The manifest of an export folder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: Format,
    /// The business timezone of the days and local times.
    pub timezone: String,
    /// The last stream sequence exported: a run without `--since-seq` or
    /// `--since` starts after it.
    pub position: i64,
    /// Clients erased when the last run read the database; more now means
    /// the next run starts over, leaving them out of every file.
    pub erasures: u64,
    /// The runs whose files are in the folder, oldest first. A run that
    /// replaced the ranges of earlier runs took their place.
    pub runs: Vec<Run>,
}

/// One run: the events in `(from_seq, to_seq]` and the snapshot tables as
/// of `to_seq`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub from_seq: i64,
    pub to_seq: i64,
    pub at: DateTime<Utc>,
    pub restarted_for_erasure: bool,
    /// Rows written per table.
    pub rows: BTreeMap<String, u64>,
    pub files: Vec<FileInfo>,
}

impl Manifest {
    pub fn new(format: Format, timezone: Tz) -> Self {
        Manifest {
            format,
            timezone: timezone.name().to_string(),
            position: 0,
            erasures: 0,
            runs: Vec::new(),
        }
    }

    /// The folder's manifest, `None` for a folder no run has finished in.
    pub fn read(dir: &Path) -> anyhow::Result<Option<Manifest>> {
        let path = dir.join(FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("{} is not an export manifest", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Adds a run: the runs of the ranges it replaced go, and so do the
    /// earlier runs' snapshot files (each run rewrites the snapshot).
    pub fn record(&mut self, run: Run, erasures: u64) {
        self.runs.retain(|r| r.to_seq <= run.from_seq);
        for r in &mut self.runs {
            r.files
                .retain(|f| INCREMENTAL_TABLES.contains(&f.table.as_str()));
            r.rows
                .retain(|t, _| INCREMENTAL_TABLES.contains(&t.as_str()));
        }
        self.position = run.to_seq;
        self.erasures = erasures;
        self.runs.push(run);
    }

    /// Forgets the runs from `from` on, before their files are removed: a
    /// run cut short after removing them then leaves a manifest from which
    /// the next run starts early enough to write them again.
    pub fn truncate(&mut self, from: i64) {
        self.runs.retain(|r| r.to_seq <= from);
        self.position = self.position.min(from);
    }

    /// Written under a temporary name and renamed, so it is whole or absent.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(FILE);
        let temp = super::writer::temp_name(&path);
        std::fs::write(&temp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", temp.display()))?;
        std::fs::rename(&temp, &path).with_context(|| format!("cannot write {}", path.display()))
    }
}

/// A file of an incremental table, with the range in its name.
#[derive(Debug, Clone, PartialEq)]
pub struct PartFile {
    pub path: PathBuf,
    pub from: i64,
    pub to: i64,
}

/// The files of `tables` in `dir` (finished, or left half-written by a run
/// cut short), from their names.
pub fn part_files(dir: &Path, tables: &[&str]) -> anyhow::Result<Vec<PartFile>> {
    let mut found = Vec::new();
    for table in tables {
        let root = dir.join(table);
        if !root.exists() {
            continue;
        }
        for partition in read_dir(&root)? {
            if !partition.is_dir() {
                continue;
            }
            for path in read_dir(&partition)? {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                if let Some((from, to)) = range_of(&name) {
                    found.push(PartFile { path, from, to });
                }
            }
        }
    }
    Ok(found)
}

fn read_dir(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    entries
        .map(|e| Ok(e?.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))
}

/// `(FROM, TO)` of `part-FROM-TO.EXT`, or of its temporary `.part-FROM-TO.EXT.tmp`.
pub fn range_of(name: &str) -> Option<(i64, i64)> {
    let name = name.strip_prefix('.').unwrap_or(name);
    let rest = name.strip_prefix("part-")?;
    let (range, _ext) = rest.split_once('.')?;
    let (from, to) = range.split_once('-')?;
    Some((from.parse().ok()?, to.parse().ok()?))
}

/// The start of a run that would start at `from`: lowered to the start of
/// a file whose range holds the sequence after `from`, as that file is
/// replaced whole.
pub fn extend_down(mut from: i64, parts: &[PartFile]) -> i64 {
    while let Some(p) = parts.iter().find(|p| p.from < from && from < p.to) {
        from = p.from;
    }
    from
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(from: i64, to: i64) -> PartFile {
        PartFile {
            path: PathBuf::from(format!("part-{from}-{to}.parquet")),
            from,
            to,
        }
    }

    #[test]
    fn names_give_their_range() {
        assert_eq!(range_of("part-0-120.parquet"), Some((0, 120)));
        assert_eq!(range_of(".part-7-9.csv.tmp"), Some((7, 9)));
        assert_eq!(range_of("snapshot-9.parquet"), None);
        assert_eq!(range_of("part-x-9.csv"), None);
    }

    #[test]
    fn a_start_inside_an_earlier_range_goes_down_to_its_start() {
        let parts = [part(0, 100), part(100, 150), part(150, 160)];
        assert_eq!(extend_down(120, &parts), 100);
        assert_eq!(extend_down(100, &parts), 100);
        assert_eq!(extend_down(99, &parts), 0);
        assert_eq!(extend_down(160, &parts), 160);
        assert_eq!(extend_down(0, &parts), 0);
    }

    #[test]
    fn a_run_replaces_the_runs_of_the_ranges_it_covers() {
        let run = |from, to| Run {
            from_seq: from,
            to_seq: to,
            at: Utc::now(),
            restarted_for_erasure: false,
            rows: BTreeMap::from([("events".into(), 1), ("clients".into(), 1)]),
            files: vec![],
        };
        let mut m = Manifest::new(Format::Parquet, chrono_tz::UTC);
        m.record(run(0, 10), 0);
        m.record(run(10, 20), 0);
        m.record(run(20, 30), 0);
        let mut cut = m.clone();
        cut.truncate(15);
        assert_eq!((cut.runs.len(), cut.position), (1, 15));
        cut.truncate(5);
        assert_eq!((cut.runs.len(), cut.position), (0, 5));
        m.record(run(10, 35), 1);
        let ranges: Vec<(i64, i64)> = m.runs.iter().map(|r| (r.from_seq, r.to_seq)).collect();
        assert_eq!(ranges, [(0, 10), (10, 35)]);
        assert_eq!((m.position, m.erasures), (35, 1));
        assert!(!m.runs[0].rows.contains_key("clients"));
        assert!(m.runs[1].rows.contains_key("clients"));
    }
}
