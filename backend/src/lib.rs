//! The IMN backend: agent registry, parameter validation, request states, storage,
//! the REST API, and the all-in-one `imn up`.

pub mod api;
pub mod atlas;
pub mod budget;
pub mod certs;
pub mod error;
pub mod feed;
pub mod fleet;
pub mod grpc;
pub mod ingest;
pub mod observe;
pub mod openapi;
pub mod peers;
pub mod registry;
pub mod security;
pub mod serve;
pub mod service;
pub mod store;
pub mod tls;
pub mod ui;
pub mod validation;

pub use service::Backend;
