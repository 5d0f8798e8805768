//! Sallyport gateway library: the DMZ switch (`dmz`) and the trusted-network connector (`connector`),
//! and what both show their operators (`metrics`, `admin`).

#![forbid(unsafe_code)]
pub mod admin;
pub mod auth;
pub mod certs;
pub mod config;
pub mod connector;
pub mod dmz;
pub mod http;
pub mod logsafe;
pub mod metrics;
pub mod policy;
pub mod revocation;
