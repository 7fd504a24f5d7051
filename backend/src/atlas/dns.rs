//! Atlas dns format (scaffold: to be filled in).

use serde_json::Value;

use crate::store::ResultRow;

/// The Atlas `dns` result of a stored result; None if it has none.
pub fn dns(r: &ResultRow) -> Option<Vec<Value>> {
    let _ = r;
    None
}
