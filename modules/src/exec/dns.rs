//! Runs the `dns` module (scaffold: to be filled in).

use crate::kinds::dns::{DnsParams, DnsResult};

pub async fn run(p: DnsParams) -> Result<DnsResult, String> {
    Err(format!("dns to {} is not implemented yet", p.host))
}
