//! The IMN backend: agent registry, parameter validation, request states, storage,
//! the REST API, and the all-in-one `imn up`.

pub mod api;
pub mod atlas;
pub mod error;
pub mod registry;
pub mod service;
pub mod store;
pub mod up;
pub mod validation;

pub use service::Backend;
