//! The IMN backend: agent registry, parameter validation, request states, storage,
//! and the REST and gRPC APIs. It reads agents' messages from a bus (`imn-cloud`) and
//! links neither the agent nor the probes; `imn up` (crate `imn-cli`) runs it in one
//! process with a bridge and local agents.
//!
//! Where to look:
//! - [`service::Backend`]: the core every front end calls, a file per job in
//!   `service/`: validation, requests and their dispatch, ingest of what agents send,
//!   acks, waiters, agents' sessions and hellos, and the reads the front ends make.
//! - [`api`] (REST, a file per resource) and [`grpc`]: thin front ends over it; their
//!   handlers reach the store only through the service (a test checks their sources).
//!   The result streams' shared reader ([`feed`]) and the budget ledger ([`budget`])
//!   are parts of the service and read the store themselves.
//! - [`store`]: the [`store::Store`] trait, SQLite (embedded default) and PostgreSQL.
//! - [`registry`]: which agents exist and are alive; [`fleet`]: measurements on many
//!   agents and schedules; [`security`] and [`budget`]: who may do what, and how much.
//! - [`ingest`]: the bounds on what one agent may make the backend do.

pub mod alerts;
pub mod anomaly;
pub mod api;
pub mod atlas;
pub mod budget;
pub mod checks;
pub mod error;
pub mod feed;
pub mod fleet;
pub mod grpc;
pub mod ingest;
pub mod observe;
pub mod openapi;
pub mod peers;
pub mod registry;
pub mod retention;
pub mod rollup;
pub mod security;
pub mod serve;
pub mod service;
pub mod store;
#[cfg(test)]
mod test_pki;
pub mod tls;
pub mod ui;
pub mod validation;
pub mod wasm;

pub use service::Backend;
