//! The types every layer speaks. Nothing here imports another part of
//! nudge, so the decision core can depend on the domain alone.

pub mod boards;
pub mod bounds;
pub mod counters;
pub mod effects;
pub mod event;
pub mod experiments;
pub mod history;
pub mod log;
pub mod phone;
pub mod products;
pub mod settings;
