//! Untrusted text in log lines: escaped and cut short.
//!
//! Whatever a peer chose (an agent's instance id, a destination it asked for, a connector's
//! route, a reason text) goes through [`Clean`] before it reaches a log: control characters and
//! newlines are escaped (nobody forges a log line), and the text is cut at [`MAX_LOGGED`] bytes
//! (nobody fills the disk with one 64 KiB field on every audit line).

use std::fmt;

/// Longest untrusted text written to a log, in bytes (the rest is counted, not written).
pub const MAX_LOGGED: usize = 256;

/// Displays untrusted text escaped (`\n`, `\u{1b}`, …) and cut at [`MAX_LOGGED`] bytes.
pub struct Clean<'a>(pub &'a str);

impl fmt::Display for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut written = 0;
        for (i, c) in self.0.char_indices() {
            if written >= MAX_LOGGED {
                return write!(f, "…(+{} bytes)", self.0.len() - i);
            }
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                for e in c.escape_default() {
                    f.write_fmt(format_args!("{e}"))?;
                }
                written += 4;
            } else {
                f.write_fmt(format_args!("{c}"))?;
                written += c.len_utf8();
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Clean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_log_line_stays_on_its_own_line() {
        let s = Clean("db.internal:5432\n2026-01-01T00:00:00Z INFO audit: stream open token=admin")
            .to_string();
        assert!(!s.contains('\n'), "{s}");
        assert!(s.contains("\\n2026"), "{s}");
        assert_eq!(Clean("\u{1b}[31mred\r").to_string(), "\\u{1b}[31mred\\r");
    }

    #[test]
    fn a_64_kib_instance_id_is_cut_short() {
        let long = "x".repeat(65_536);
        let s = Clean(&long).to_string();
        assert!(s.len() < MAX_LOGGED + 32, "{}", s.len());
        assert!(
            s.ends_with(&format!("…(+{} bytes)", 65_536 - MAX_LOGGED)),
            "{s}"
        );
        // Short, plain text is unchanged.
        assert_eq!(Clean("alice-laptop").to_string(), "alice-laptop");
        // Multi-byte characters are never split.
        let wide = "é".repeat(300);
        assert!(Clean(&wide).to_string().starts_with("éé"));
    }
}
