//! The pieces of the `nudge` command line beside its commands (main.rs):
//! where the configuration comes from, the bench hand-over, stop signals,
//! the export's options and report.

pub(crate) mod bench;
pub(crate) mod config;
pub(crate) mod export;
pub(crate) mod signals;
