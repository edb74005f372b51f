//! Roost: an AT Protocol Personal Data Server. See ARCHITECTURE.md for the map.

pub mod app;
pub mod atp;
pub mod auth;
pub mod blobs;
pub mod config;
pub mod crawl;
pub mod db;
pub mod handle;
pub mod identity;
pub mod lexicon;
pub mod proxy;
pub mod ratelimit;
pub mod read_after_write;
pub mod repo;
pub mod sequencer;
pub mod service_auth;
pub mod xrpc;
