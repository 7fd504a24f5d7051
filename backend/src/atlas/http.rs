//! Atlas http format (scaffold: to be filled in).

use serde_json::Value;

use crate::store::ResultRow;

/// The Atlas `http` result of a stored result; None if it has none.
pub fn http(r: &ResultRow) -> Option<Vec<Value>> {
    let _ = r;
    None
}

/// The Atlas `sslcert` result of a stored result; None if it has none.
pub fn sslcert(r: &ResultRow) -> Option<Vec<Value>> {
    let _ = r;
    None
}
