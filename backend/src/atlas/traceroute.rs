//! Atlas traceroute format (scaffold: to be filled in).

use serde_json::Value;

use crate::store::ResultRow;

/// The Atlas `traceroute` result of a stored result; None if it has none.
pub fn traceroute(r: &ResultRow) -> Option<Vec<Value>> {
    let _ = r;
    None
}
