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
