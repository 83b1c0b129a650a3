//! The store's traits, one per caller, each implemented once for
//! [`AnyStore`](super::AnyStore). The queries both databases run alike are
//! written here once, with `$n` placeholders, and compiled per backend with
//! [`shared!`](super::shared); where the backends differ, a method calls
//! into `sqlite/` or `postgres/`.

pub mod admin;
pub mod batches;
pub mod boards;
pub mod export;
pub mod history;
pub mod outbox;
pub mod products;
pub mod reports;
pub mod schedules;
pub mod staff;
pub mod texts;
pub mod window;
