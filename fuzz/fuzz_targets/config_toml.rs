//! The TOML files people write: `agent.toml` (`agent::config::parse_file`), the DMZ and connector
//! config files (`gateway::config::parse_toml` into `DmzFile` / `ConnectorFile`, which pulls in the
//! `allow` rules and `advertise` routes) and the token file (`gateway::auth::TokenStore::parse`),
//! plus the small value parsers the config code applies afterwards (`parse_net`,
//! `normalize_prefix`, the `[tunnel]` table).
//!
//! These error paths turn byte offsets into line numbers by slicing the text, so the properties
//! are: nothing panics (in particular no slicing off a char boundary), and every line number an
//! error reports is within the text (1 ..= lines + 1).
#![no_main]

use std::path::Path;

use gateway::auth::{AuthError, TokenStore};
use gateway::config::{
    normalize_prefix, parse_net, parse_toml, ConfigError as GwConfigError, ConnectorFile, DmzFile,
};
use libfuzzer_sys::fuzz_target;

fn max_line(text: &str) -> usize {
    text.matches('\n').count() + 1
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    let lines = max_line(text);

    match agent::config::parse_file(text, Path::new("agent.toml")) {
        Ok(file) => {
            for f in &file.forwards {
                let _ = f.parse::<agent::config::Forward>();
            }
            for g in file.gateway.clone().map(|g| g.into_vec()).unwrap_or_default() {
                let _ = egress::GatewayUrl::parse(&g);
            }
        }
        Err(agent::config::ConfigError::Parse { line, .. }) => {
            assert!(line <= lines, "agent.toml error on line {line} of {lines}");
        }
        Err(_) => {}
    }

    match parse_toml::<DmzFile>(text, Path::new("dmz.toml")) {
        Ok(file) => {
            for p in &file.trusted_proxies {
                let _ = parse_net(p);
            }
            if let Some(p) = &file.prefix {
                if let Ok(n) = normalize_prefix(p) {
                    assert!(n.is_empty() || (n.starts_with('/') && !n.ends_with('/')));
                }
            }
            let mut cfg = tunnel::Config::new(tunnel::Role::Dmz, false);
            let _ = file.tunnel.apply(&mut cfg);
        }
        Err(GwConfigError::Parse { line, .. }) => {
            assert!(line <= lines, "dmz.toml error on line {line} of {lines}");
        }
        Err(_) => {}
    }

    match parse_toml::<ConnectorFile>(text, Path::new("connector.toml")) {
        Ok(file) => {
            let mut cfg = tunnel::Config::new(tunnel::Role::Connector, true);
            let _ = file.tunnel.apply(&mut cfg);
        }
        Err(GwConfigError::Parse { line, .. }) => {
            assert!(
                line <= lines,
                "connector.toml error on line {line} of {lines}"
            );
        }
        Err(_) => {}
    }

    match TokenStore::parse(text, "tokens.toml") {
        Ok(store) => {
            let _ = format!("{store:?}");
        }
        Err(AuthError::Invalid { line, .. }) => {
            assert!(
                (1..=lines).contains(&line),
                "token file error on line {line} of {lines}"
            );
        }
        Err(_) => {}
    }
});
