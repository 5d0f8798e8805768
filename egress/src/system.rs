//! (stub until the system settings module lands)
use crate::proxy::Proxy;
pub struct SystemProxy {
    pub source: String,
    pub mode: SystemMode,
}
pub enum SystemMode {
    Direct,
    Manual {
        https: Option<Proxy>,
        socks: Option<Proxy>,
        no_proxy: Vec<String>,
    },
    Pac(String),
    Wpad,
}
pub fn read() -> Vec<SystemProxy> {
    Vec::new()
}
