//! Runs the `ntp` module (scaffold: to be filled in).

use crate::kinds::ntp::{NtpParams, NtpResult};

pub async fn run(p: NtpParams) -> Result<NtpResult, String> {
    Err(format!("ntp to {} is not implemented yet", p.host))
}
