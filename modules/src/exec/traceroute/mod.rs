//! Runs the `traceroute` and `mtr` modules (scaffold: to be filled in).

use crate::kinds::traceroute::{MtrParams, MtrResult, TracerouteParams, TracerouteResult};

pub async fn run(p: TracerouteParams) -> Result<TracerouteResult, String> {
    Err(format!("traceroute to {} is not implemented yet", p.host))
}

pub async fn run_mtr(p: MtrParams) -> Result<MtrResult, String> {
    Err(format!("mtr to {} is not implemented yet", p.host))
}
