//! A token as text, held by the agent, the connector and `token new`: v1's
//! `sp_<id>_<64 hex>` or v2's `sp2_…`. It never shows: `Debug` and `Display` print
//! `sp_<id>_****` (v1) or `sp2_****` (v2); [`Secret::expose`] is the only way to the text (to
//! store it, or for v1 to send it in an `Authorization` header).

use std::fmt;

/// A token string whose `Debug`/`Display` never show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token string, trimming whitespace.
    pub fn new(token: impl AsRef<str>) -> Secret {
        Secret(token.as_ref().trim().to_string())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The id of a v1 token (`sp_<id>_<secret>`, id of `[a-z0-9-]`), if it has that shape.
    pub fn id(&self) -> Option<&str> {
        let rest = self.0.strip_prefix("sp_")?;
        let (id, secret) = rest.rsplit_once('_')?;
        let ok = (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && secret.len() == 64
            && secret
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok.then_some(id)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.starts_with("sp2_") {
            return f.write_str("sp2_****");
        }
        match self.id() {
            Some(id) => write!(f, "sp_{id}_****"),
            None => f.write_str("sp_****"),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neither_debug_nor_display_shows_a_secret_of_either_version() {
        let v1 = Secret::new(format!(" sp_alice-laptop_{}\n", "ab".repeat(32)));
        assert_eq!(v1.id(), Some("alice-laptop"));
        assert_eq!(format!("{v1:?}"), "sp_alice-laptop_****");
        assert_eq!(format!("{v1}"), "sp_alice-laptop_****");
        let v2 = Secret::new("sp2_AgSecretSecretSecret");
        assert_eq!(format!("{v2:?}"), "sp2_****");
        assert_eq!(v2.id(), None);
        let junk = Secret::new("password123");
        assert_eq!(format!("{junk}"), "sp_****");
    }
}
