//! Atlas ntp format (scaffold: to be filled in).

use serde_json::Value;

use crate::store::ResultRow;

/// The Atlas `ntp` result of a stored result; None if it has none.
pub fn ntp(r: &ResultRow) -> Option<Vec<Value>> {
    let _ = r;
    None
}
