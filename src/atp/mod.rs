//! The protocol core: everything about AT Protocol data that can be computed
//! without touching a disk, a socket or a clock source beyond the TID clock.
//!
//! Nothing under `atp` may import tokio, sqlx, axum or reqwest (a tidy test
//! enforces this). Keeping it pure keeps it deterministic, fuzzable and
//! testable against the interop fixtures in `../shared`.

pub mod car;
pub mod commit;
pub mod data;
pub mod event;
pub mod keys;
pub mod mst;
pub mod syntax;

#[cfg(test)]
pub(crate) mod fixtures;
