//! (stub until the Digest module lands)
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DigestError(String);
pub fn parse_params(_s: &str) -> Result<Vec<(String, String)>, DigestError> {
    Err(DigestError("Digest is not implemented yet".into()))
}
pub fn authorization(
    _p: &[(String, String)],
    _u: &str,
    _pw: &str,
    _m: &str,
    _uri: &str,
    _nc: u32,
    _cn: &str,
) -> Result<String, DigestError> {
    Err(DigestError("Digest is not implemented yet".into()))
}
