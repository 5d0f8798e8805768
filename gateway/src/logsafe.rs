//! Untrusted text in log lines: escaped and cut short.
//!
//! Whatever a peer chose (an agent's instance id, a destination it asked for, a connector's
//! route, a reason text) goes through [`Clean`] before it reaches a log: control characters and
//! newlines are escaped (nobody forges a log line), and the text is cut at [`MAX_LOGGED`] bytes
//! (nobody fills the disk with one 64 KiB field on every audit line).

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// At most `max` log lines a second for one kind of event that anyone can cause (a refused
/// token): a flood from many addresses must not fill the disk. What was left out is counted and
/// said with the next line that is written.
pub struct Throttle {
    max: u32,
    /// (start of the current second, lines written in it, lines left out since the last one)
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl Throttle {
    pub const fn new(max: u32) -> Throttle {
        Throttle {
            max,
            state: Mutex::new(None),
        }
    }

    /// `Some(left_out)` when a line may be written now (`left_out` lines were not written since
    /// the last one); `None` when this one is left out.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (since, written, left_out) = st.get_or_insert((now, 0, 0));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            *since = now;
            *written = 0;
        }
        if *written >= self.max {
            *left_out += 1;
            return None;
        }
        *written += 1;
        Some(std::mem::take(left_out))
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

    /// Every unauthenticated request wrote a WARN line: one address wrote 3 KB/s, many
    /// addresses as much as they liked.
    #[test]
    fn a_flood_of_refusals_writes_a_bounded_number_of_lines() {
        let t = Throttle::new(10);
        let written = (0..10_000).filter(|_| t.allow().is_some()).count();
        assert_eq!(written, 10);
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
