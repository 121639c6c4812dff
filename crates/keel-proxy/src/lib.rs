//! `keel` as a sidecar: an HTTP proxy that applies keel's policies per route,
//! configured in one TOML file. See `docs/CONFIGURATION.md` for the file and
//! `docs/ARCHITECTURE.md` for the map of this crate.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]

mod admin;
pub mod config;
pub mod demo;
mod guard;
mod h1;
mod idempotency;
mod linger;
mod metrics;
mod path;
mod proxy;
mod route;
mod server;
mod stall;
mod store;
mod upstream;

pub use config::{Config, ConfigErrors, FieldError};
pub use server::{load, run};
