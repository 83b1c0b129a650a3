//! The decision core: pure functions from an event and a client's history to
//! effects. It imports only [`crate::domain`]; I/O and configuration files
//! stay outside.

pub mod decide;
pub mod report;
pub mod rules;
pub mod templates;
pub mod texts;
