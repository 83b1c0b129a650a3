//! The daemon's stages, in the order an event meets them: ingest, the
//! pipeline (decide a batch in stream order and commit it), the chain of
//! secondary events, the scheduler's timers and cron rules, and the live
//! rule catalog they all read.

pub mod catalog;
pub mod chain;
pub mod error;
pub mod ingest;
pub mod live;
pub mod pipeline;
pub mod publish;
pub mod scheduler;
