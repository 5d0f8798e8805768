//! (stub until the NTLM module lands)
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NtlmError(String);
pub struct ChallengeMessage;
impl ChallengeMessage {
    pub fn parse(_b: &[u8]) -> Result<ChallengeMessage, NtlmError> {
        Err(NtlmError("NTLM is not implemented yet".into()))
    }
}
pub fn negotiate_message() -> Vec<u8> {
    Vec::new()
}
pub fn authenticate_message(
    _c: &ChallengeMessage,
    _u: &str,
    _d: &str,
    _p: &str,
    _w: &str,
    _cc: [u8; 8],
    _t: u64,
) -> Vec<u8> {
    Vec::new()
}
pub fn current_filetime() -> u64 {
    0
}
