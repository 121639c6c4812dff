//! `keel` as a sidecar: an HTTP proxy that applies keel's policies per route,
//! configured in one TOML file. This crate holds the configuration and the
//! command line; see `docs/CONFIGURATION.md`.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

pub mod config;

pub use config::{Config, ConfigErrors, FieldError};
