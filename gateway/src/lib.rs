//! Sallyport gateway library: the DMZ switch (`dmz`) and the trusted-network connector (`connector`).
pub mod auth;
pub mod certs;
pub mod policy;
