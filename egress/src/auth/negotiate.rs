//! (stub until the Negotiate module lands)
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NegotiateError(String);
pub struct NegotiateContext;
impl NegotiateContext {
    pub fn new(_service: &str) -> Result<NegotiateContext, NegotiateError> {
        Err(NegotiateError("Negotiate is not implemented yet".into()))
    }
    pub fn step(&mut self, _t: Option<&[u8]>) -> Result<Option<Vec<u8>>, NegotiateError> {
        Ok(None)
    }
}
