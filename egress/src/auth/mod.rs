//! Proxy authentication schemes for HTTP `CONNECT`: Basic, Digest, NTLM (v2) and Negotiate.

pub mod digest;
pub mod negotiate;
pub mod ntlm;
