//! Any bytes from the network: decoding never panics, and whatever decodes encodes
//! back to the same bytes' envelope.
#![no_main]

use imn_modules::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = wire::decode(data) {
        let again = wire::encode(&env);
        assert_eq!(wire::decode(&again).as_ref(), Ok(&env));
    }
});
