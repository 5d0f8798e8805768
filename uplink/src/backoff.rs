//! How long to wait before the next connection attempt: exponential, with full jitter, so that
//! thousands of desktops and connectors that lost the same gateway do not come back in step; and
//! an agent's first attempt after losing a session that was up, spread evenly over
//! [`Backoff::SPREAD`] (a restarted gateway meets thousands of desktops behind one corporate NAT
//! over seconds, not in one instant; the arithmetic is in `docs/deploy.md`, "Reconnect storms").

use rand::Rng;
use std::time::Duration;

/// Exponential backoff with jitter: 0.25 s doubling to 15 s (each wait drawn from half to all
/// of it), back to the start after a session that stayed up for a minute. One set of constants
/// for the agent and the connector.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    /// The next wait after the gateway refused the credential.
    next_refused: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Self::FIRST,
            next_refused: Self::REFUSED_FIRST,
        }
    }
}

impl Backoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_millis(250);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(15);
    /// A session that stayed up this long resets the backoff.
    pub const STABLE: Duration = Duration::from_secs(60);
    /// A session that was up at least this long and then lost starts the backoff over: it
    /// failed at nothing. Shorter (a gateway that accepts and drops at once) counts as a
    /// failed attempt, so a flapping peer still meets a growing wait.
    pub const UP_AT_LEAST: Duration = Duration::from_secs(2);
    /// An agent's first attempt after a session that was up is lost ([`Backoff::spread`]) is
    /// drawn evenly from zero to this: 5,000 desktops that lost one gateway arrive at 1,000 a
    /// second instead of all within the first wait (0.125–0.25 s), which keeps their
    /// handshakes under one address's `handshake_burst` running at once at typical round trips,
    /// and costs a lone desktop 2.5 s on average (its streams resume).
    pub const SPREAD: Duration = Duration::from_secs(5);

    /// The first wait after the gateway refused the credential: 40 times the first wait for an
    /// unreachable gateway, yet short enough that a token minted a moment ago (the DMZ reads
    /// its token files every 2 s) works at the next try.
    pub const REFUSED_FIRST: Duration = Duration::from_secs(10);
    /// The longest wait after refusals: still retried (a token revoked by mistake and put back
    /// works again without a restart).
    pub const REFUSED_MAX: Duration = Duration::from_secs(15 * 60);

    /// The next wait after the gateway itself refused the credential: 10 s doubling to
    /// [`Backoff::REFUSED_MAX`], with jitter. Call it only on an authenticated refusal
    /// (`ConnectError::Refused`, `GatewayReached::refused_credential`), never on an HTTP status
    /// that something on the way could have written, or a middlebox could slow every desktop
    /// down by answering 401.
    pub fn refused(&mut self) -> Duration {
        let base = self.next_refused;
        self.next_refused = (self.next_refused * 2).min(Self::REFUSED_MAX);
        base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    /// The next wait (and doubles the one after, up to [`Backoff::MAX`]).
    pub fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    /// The first wait of an agent after it lost a session that was up: evenly from zero to
    /// [`Backoff::SPREAD`]. Does not move the backoff on: should that attempt fail, the waits
    /// grow from [`Backoff::FIRST`].
    pub fn spread(&self) -> Duration {
        Self::SPREAD.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }

    /// Resets when the attempt that just ended had lasted at least [`Backoff::STABLE`].
    pub fn after(&mut self, lasted: Duration) {
        if lasted >= Self::STABLE {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::default();
        let first = b.delay();
        assert!(first >= Backoff::FIRST / 2 && first <= Backoff::FIRST);
        for _ in 0..20 {
            assert!(b.delay() <= Backoff::MAX);
        }
        assert!(b.delay() >= Backoff::MAX / 2);
        b.after(Duration::from_secs(5));
        assert!(
            b.delay() >= Backoff::MAX / 2,
            "a short session does not reset"
        );
        b.after(Backoff::STABLE);
        assert!(b.delay() <= Backoff::FIRST);
    }

    #[test]
    fn a_lost_session_spreads_the_first_attempt_and_then_backs_off_from_the_start() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..200).map(|_| b.spread()).collect();
        assert!(waits.iter().all(|w| *w <= Backoff::SPREAD));
        // Spread over the whole window, not bunched at its start (a chance of 2^-200 each).
        assert!(waits.iter().any(|w| *w < Backoff::SPREAD / 2));
        assert!(waits.iter().any(|w| *w > Backoff::SPREAD / 2));
        assert!(
            b.delay() <= Backoff::FIRST,
            "spreading does not grow the backoff"
        );
    }

    #[test]
    fn a_refused_credential_waits_longer_than_an_unreachable_gateway_and_still_retries() {
        let mut b = Backoff::default();
        let first = b.refused();
        assert!(first >= Backoff::REFUSED_FIRST / 2 && first >= Backoff::FIRST * 20);
        assert!(b.refused() >= Backoff::REFUSED_FIRST);
        for _ in 0..20 {
            let w = b.refused();
            assert!(w <= Backoff::REFUSED_MAX, "always retried: {w:?}");
        }
        assert!(b.refused() >= Backoff::REFUSED_MAX / 2);
        b.after(Backoff::STABLE);
        assert!(b.refused() <= Backoff::REFUSED_FIRST);
    }
}
