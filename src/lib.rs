//! Roost: an AT Protocol Personal Data Server. See ARCHITECTURE.md for the map.

pub mod accounts;
pub mod admin_cli;
pub mod app;
pub mod atp;
pub mod auth;
pub mod backup;
pub mod blobs;
pub mod config;
pub mod crawl;
pub mod db;
pub mod handle;
pub mod healthcheck;
pub mod identity;
pub mod lexicon;
pub mod lexicon_net;
pub mod lexicon_store;
pub mod progress;
pub mod proxy;
pub mod ratelimit;
pub mod read_after_write;
pub mod repo;
pub mod sequencer;
pub mod service_auth;
pub mod telemetry;
pub mod verify;
pub mod xrpc;
