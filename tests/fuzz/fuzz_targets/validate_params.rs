//! Any request body: parsing and validating against every module's schema never
//! panics, and every refusal names a field that is a JSON pointer.
#![no_main]

use std::sync::OnceLock;

use imn_backend::error::ApiError;
use imn_backend::validation::Validators;
use imn_proto::catalog;
use libfuzzer_sys::fuzz_target;

static VALIDATORS: OnceLock<Validators> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let v = VALIDATORS.get_or_init(|| Validators::new().expect("schemas compile"));
    let Ok(params) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    for spec in catalog::catalog() {
        match v.validate(spec.name, &params) {
            Ok(()) => {}
            Err(ApiError::InvalidParams { field, .. }) => {
                assert!(field.starts_with('/'), "{field}")
            }
            Err(other) => panic!("unexpected error kind: {other:?}"),
        }
    }
});
