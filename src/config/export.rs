//! The `export` section: the analytics export the daemon runs on a
//! schedule (`nudge export` runs one by hand, with the same folder and
//! format as defaults).

use serde::{Deserialize, Deserializer, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// When the daemon exports (cron: sec min hour day-of-month month
    /// day-of-week, UTC); unset: it never does.
    pub schedule: Option<Cron>,
    /// The export folder.
    pub dir: PathBuf,
    /// The files' format.
    pub format: ExportFormat,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            schedule: None,
            dir: "var/export".into(),
            format: ExportFormat::Parquet,
        }
    }
}

/// The file format of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Parquet,
    Csv,
}

impl ExportFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ExportFormat::Parquet => "parquet",
            ExportFormat::Csv => "csv",
        }
    }
}

/// A cron expression, checked when the configuration is read.
#[derive(Debug, Clone, Serialize)]
#[serde(into = "String")]
pub struct Cron {
    text: String,
    #[serde(skip)]
    pub schedule: cron::Schedule,
}

impl PartialEq for Cron {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl From<Cron> for String {
    fn from(c: Cron) -> String {
        c.text
    }
}

impl std::str::FromStr for Cron {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let schedule = text.parse::<cron::Schedule>().map_err(|e| {
            format!("{text:?} is not a cron schedule (sec min hour day month weekday): {e}")
        })?;
        Ok(Cron {
            text: text.to_string(),
            schedule,
        })
    }
}

impl<'de> Deserialize<'de> for Cron {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_is_checked_when_read() {
        let c: ExportConfig =
            serde_yaml::from_str("schedule: \"0 */15 * * * *\"\ndir: out\nformat: csv").unwrap();
        assert_eq!(c.format, ExportFormat::Csv);
        assert!(c.schedule.is_some());
        let e = serde_yaml::from_str::<ExportConfig>("schedule: every minute").unwrap_err();
        assert!(e.to_string().contains("not a cron schedule"), "{e}");
    }
}
