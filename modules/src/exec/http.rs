//! Runs the `http` and `tls_cert` modules (scaffold: to be filled in).

use crate::kinds::http::{HttpParams, HttpResult, TlsCertParams, TlsCertResult};

pub async fn run(p: HttpParams) -> Result<HttpResult, String> {
    Err(format!("http to {} is not implemented yet", p.host))
}

pub async fn run_tls_cert(p: TlsCertParams) -> Result<TlsCertResult, String> {
    Err(format!("tls_cert to {} is not implemented yet", p.host))
}
