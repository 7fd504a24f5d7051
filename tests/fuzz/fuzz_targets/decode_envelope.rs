//! Any bytes from the network: decoding never panics, and whatever decodes re-encodes
//! to a canonical form that decodes to the same bytes again. (Compared as bytes: a
//! NaN float from the network is legal and never equals itself.)
#![no_main]

use imn_proto::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = wire::decode(data) {
        let once = wire::encode(&env);
        let again = wire::decode(&once).expect("our own encoding decodes");
        assert_eq!(wire::encode(&again), once);
    }
});
