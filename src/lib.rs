//! Roost: an AT Protocol Personal Data Server. See ARCHITECTURE.md for the map.

pub mod app;
pub mod atp;
pub mod auth;
pub mod backup;
pub mod blobs;
pub mod config;
pub mod crawl;
pub mod db;
pub mod healthcheck;
pub mod identity;
pub mod lexicon;
pub mod repo;
pub mod sequencer;
pub mod telemetry;
pub mod xrpc;
