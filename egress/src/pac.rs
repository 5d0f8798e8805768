//! (stub until the PAC module lands)
use crate::proxy::Proxy;
use std::time::Duration;
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PacError(String);
#[derive(Clone, Debug, Default)]
pub struct PacLimits;
pub struct Pac;
impl Pac {
    pub fn new(_name: &str, _script: &str, _limits: PacLimits) -> Result<Pac, PacError> {
        Err(PacError("PAC is not implemented yet".into()))
    }
    pub fn find_proxy(&self, _url: &str, _host: &str) -> Result<Vec<Proxy>, PacError> {
        Err(PacError("PAC is not implemented yet".into()))
    }
}
pub async fn fetch(_location: &str, _timeout: Duration) -> Result<String, PacError> {
    Err(PacError("PAC is not implemented yet".into()))
}
pub fn wpad_urls(_suffix: &str) -> Vec<String> {
    Vec::new()
}
pub fn dns_suffixes() -> Vec<String> {
    Vec::new()
}
