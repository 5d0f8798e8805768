//! Receive-window autotuning: a stream whose reader drains a whole window faster than the path
//! can return credit gets a larger window, within a per-stream cap, a per-session budget and a
//! process-wide budget. No wire change: the receiver simply grants more credit in a `WINDOW`
//! frame than the application consumed, which every peer accepts.
//!
//! Why: credit is hop by hop (agent ↔ DMZ ↔ connector), and one credit cycle crosses three
//! processes. On a busy two-core machine a cycle takes milliseconds of scheduling alone, and on a
//! WAN it takes a round trip: a fixed 512 KiB window then caps one stream at `window / cycle`
//! (about 1.5 Gbit/s at 3 ms on loopback, 40 Mbit/s at 100 ms), while the TCP relays we are
//! compared with use the kernel's autotuned socket buffers (several MiB).
//!
//! The rule (the one Chromium's QUIC uses, measured per whole window so one burst cannot fool
//! it): each time the reader has consumed a full window since the last measurement, if that took
//! less than [`interval`] (twice the session's round trip, at least [`MIN_INTERVAL`]), the window
//! doubles. A stream that is read slowly, or that carries keystrokes, never grows; a bulk stream
//! grows until a window covers [`interval`] of its own rate. Growth is taken from a session
//! budget and from the process's budget ([`set_budget`]), and given back when the stream ends,
//! so memory stays bounded by `streams × base window + budget` whatever the peers do.
//!
//! Pure rules: `now` is passed in, the budget is an atomic counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// The shortest time a window must cover: a few scheduling delays of a loaded machine.
pub const MIN_INTERVAL: Duration = Duration::from_millis(16);

/// The default largest window of one stream.
pub const DEFAULT_MAX: u32 = 8 * 1024 * 1024;

/// The default process-wide budget for growth beyond the base windows.
pub const DEFAULT_BUDGET: u64 = 256 * 1024 * 1024;

/// Bytes of window growth allowed (`limit`) and granted (`grown`); the process has one,
/// [`GLOBAL`], shared by every session.
pub(crate) struct Budget {
    limit: AtomicU64,
    grown: AtomicU64,
}

impl Budget {
    pub(crate) const fn new(limit: u64) -> Budget {
        Budget {
            limit: AtomicU64::new(limit),
            grown: AtomicU64::new(0),
        }
    }

    /// Takes up to `want` bytes; returns what it got.
    pub(crate) fn take(&self, want: u64) -> u64 {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut cur = self.grown.load(Ordering::Relaxed);
        loop {
            let got = want.min(limit.saturating_sub(cur));
            if got == 0 {
                return 0;
            }
            match self.grown.compare_exchange_weak(
                cur,
                cur + got,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return got,
                Err(now) => cur = now,
            }
        }
    }

    /// Gives `bytes` back.
    pub(crate) fn give(&self, bytes: u64) {
        if bytes > 0 {
            self.grown.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

static GLOBAL: Budget = Budget::new(DEFAULT_BUDGET);

/// Sets the process-wide budget for window growth (bytes beyond every stream's base window).
pub fn set_budget(bytes: u64) {
    GLOBAL.limit.store(bytes, Ordering::Relaxed);
}

/// Bytes of window growth granted in this process right now.
pub fn grown() -> u64 {
    GLOBAL.grown.load(Ordering::Relaxed)
}

/// Takes up to `want` bytes from the process budget; returns what it got.
pub(crate) fn take_global(want: u64) -> u64 {
    GLOBAL.take(want)
}

/// Gives `bytes` back to the process budget.
pub(crate) fn give_global(bytes: u64) {
    GLOBAL.give(bytes)
}

/// How long a window must last before it stops growing: twice the round trip, at least
/// [`MIN_INTERVAL`].
pub fn interval(rtt: Option<Duration>) -> Duration {
    rtt.map_or(MIN_INTERVAL, |r| (2 * r).max(MIN_INTERVAL))
}

/// One stream's measurement: when the current window started to be consumed, and how much of
/// it has been.
#[derive(Debug, Default)]
pub(crate) struct Tuner {
    since: Option<Instant>,
    consumed: u64,
}

impl Tuner {
    /// The reader consumed `n` bytes at `now` of a stream whose window is `window`. Returns how
    /// much the window should grow (0 most of the time; `window` when a whole window went by
    /// within `interval`). The caller caps it by the stream's maximum and the budgets.
    pub(crate) fn consumed(
        &mut self,
        now: Instant,
        n: u32,
        window: u32,
        interval: Duration,
    ) -> u32 {
        let since = *self.since.get_or_insert(now);
        self.consumed += n as u64;
        if self.consumed < window as u64 {
            return 0;
        }
        let fast = now.saturating_duration_since(since) < interval;
        self.since = Some(now);
        self.consumed = 0;
        if fast {
            window
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u32 = 512 * 1024;

    /// A bulk reader that drains each window in 2 ms asks to double it.
    #[test]
    fn a_fast_reader_doubles_its_window() {
        let mut t = Tuner::default();
        let t0 = Instant::now();
        let mut grow = 0;
        for i in 0..4 {
            grow = t.consumed(t0 + Duration::from_micros(500 * i), W / 4, W, MIN_INTERVAL);
        }
        assert_eq!(grow, W);
    }

    /// Keystrokes, or a reader that takes longer than the interval per window, never grow it.
    #[test]
    fn a_slow_reader_never_grows_its_window() {
        let mut t = Tuner::default();
        let t0 = Instant::now();
        for i in 0..100u64 {
            let g = t.consumed(t0 + Duration::from_millis(10 * i), W / 8, W, MIN_INTERVAL);
            assert_eq!(g, 0, "grew at step {i}");
        }
    }

    /// A reader that drains a full buffer at once, every 100 ms (a slow app with big reads),
    /// grows at most once, at the start: each later window takes 100 ms.
    #[test]
    fn a_bursty_slow_reader_grows_at_most_once() {
        let mut t = Tuner::default();
        let t0 = Instant::now();
        let mut grows = 0;
        let mut window = W;
        for i in 0..50u64 {
            let at = t0 + Duration::from_millis(100 * i);
            let g = t.consumed(at, window, window, MIN_INTERVAL);
            if g > 0 {
                grows += 1;
                window += g;
            }
        }
        assert!(grows <= 1, "grew {grows} times");
    }

    /// Many sessions whose bulk streams all grow (one attacker's 16 sessions of a token, each
    /// draining fast) cannot take more than the process budget between them: what one gets is
    /// gone for the others until a stream ends and gives it back.
    #[test]
    fn many_sessions_growing_at_once_stay_within_the_process_budget() {
        let b = Budget::new(10 * W as u64);
        let mut got = 0;
        for _ in 0..64 {
            got += b.take(W as u64);
        }
        assert_eq!(got, 10 * W as u64);
        assert_eq!(b.take(1), 0, "nothing left");
        b.give(W as u64);
        assert_eq!(b.take(2 * W as u64), W as u64, "only what was given back");
    }

    /// The round trip sets the interval: a WAN stream grows until a window covers two of them.
    #[test]
    fn the_interval_follows_the_round_trip() {
        assert_eq!(interval(None), MIN_INTERVAL);
        assert_eq!(interval(Some(Duration::from_millis(1))), MIN_INTERVAL);
        assert_eq!(
            interval(Some(Duration::from_millis(100))),
            Duration::from_millis(200)
        );
    }
}
