//! Noticing that the network changed or that the machine woke from sleep, so that the agent
//! re-probes its way out and moves to a new session at once instead of waiting for the old
//! one's pings to time out (`react` decides and acts; `docs/egress.md`, "Network changes and
//! sleep").
//!
//! Two sources, one stream of [`Event`]s:
//! - **The network**: Linux joins the kernel's route notifications (links, IPv4/IPv6 addresses
//!   and routes: [`rtnetlink`], read in `linux`); Windows registers `NotifyIpInterfaceChange`,
//!   `NotifyUnicastIpAddressChange` and `NotifyRouteChange2` (`windows`). Changes come in bursts
//!   (a Wi-Fi roam is a dozen messages), so they are folded by [`Debounce`]: one event after
//!   [`QUIET`] without a change, or at most [`MAX_HOLD`] after the first.
//! - **Sleep**: every [`WAKE_CHECK`] the time spent asleep since boot is read ([`Clock`]:
//!   Linux `CLOCK_BOOTTIME` − `CLOCK_MONOTONIC`; Windows `GetTickCount64` −
//!   `QueryUnbiasedInterruptTime`); when it grew by more than [`WAKE_THRESHOLD`] between two
//!   reads, the machine slept ([`WakeDetector`]). The session's own ping timer runs on the
//!   monotonic clock, which stops during sleep, so without this a session that died while the
//!   lid was shut would be noticed only a ping interval after waking.
//!
//! Other systems (macOS) get neither source yet: the session's pings notice a dead path there.

pub mod react;
pub mod rtnetlink;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(windows)]
mod windows;

use std::fmt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A burst of changes ends after this long without another.
pub const QUIET: Duration = Duration::from_millis(500);
/// A burst that never goes quiet (a flapping link) still gives one event this often.
pub const MAX_HOLD: Duration = Duration::from_secs(5);
/// How often the sleep clock is read.
pub const WAKE_CHECK: Duration = Duration::from_secs(2);
/// More time asleep than this between two reads is a wake from sleep.
pub const WAKE_THRESHOLD: Duration = Duration::from_secs(5);
/// Most changes named in one event (the rest are counted).
const MAX_NAMED: usize = 6;

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The network changed: what the system said, e.g. `route default via 10.0.0.1 added`.
    Changed(String),
    /// The machine woke after sleeping this long.
    Woke(Duration),
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Changed(what) => write!(f, "network changed: {what}"),
            Event::Woke(slept) => write!(f, "woke from sleep after {} s", slept.as_secs()),
        }
    }
}

/// Folds a burst of changes into one event: due [`QUIET`] after the last change, or
/// [`MAX_HOLD`] after the first, whichever comes first. Keeps the first few descriptions.
#[derive(Debug)]
pub struct Debounce {
    quiet: Duration,
    max_hold: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
    named: Vec<String>,
    more: usize,
}

impl Debounce {
    pub fn new(quiet: Duration, max_hold: Duration) -> Debounce {
        Debounce {
            quiet,
            max_hold,
            first: None,
            last: None,
            named: Vec::new(),
            more: 0,
        }
    }

    /// A change seen at `now`.
    pub fn push(&mut self, now: Instant, what: String) {
        self.first.get_or_insert(now);
        self.last = Some(now);
        if self.named.contains(&what) {
            return;
        }
        if self.named.len() < MAX_NAMED {
            self.named.push(what);
        } else {
            self.more += 1;
        }
    }

    /// When the pending burst is due, if there is one.
    pub fn due(&self) -> Option<Instant> {
        Some((self.last? + self.quiet).min(self.first? + self.max_hold))
    }

    /// The burst's description, once it is due at `now` (and forgets it).
    pub fn fire(&mut self, now: Instant) -> Option<String> {
        if self.due()? > now {
            return None;
        }
        let mut what = std::mem::take(&mut self.named).join("; ");
        if self.more > 0 {
            what.push_str(&format!(" (and {} more)", self.more));
        }
        *self = Debounce::new(self.quiet, self.max_hold);
        Some(what)
    }
}

/// The two clocks whose difference is the time spent asleep since boot.
pub trait Clock: Send + 'static {
    /// Time since boot, not counting sleep (Linux `CLOCK_MONOTONIC`).
    fn awake(&self) -> Option<Duration>;
    /// Time since boot, sleep included (Linux `CLOCK_BOOTTIME`).
    fn since_boot(&self) -> Option<Duration>;
}

/// The system's clocks, where it has both.
pub struct SystemClock;

impl Clock for SystemClock {
    fn awake(&self) -> Option<Duration> {
        #[cfg(target_os = "linux")]
        {
            linux::clock(linux::Which::Monotonic)
        }
        #[cfg(windows)]
        {
            windows::awake()
        }
        #[cfg(not(any(target_os = "linux", windows)))]
        {
            None
        }
    }

    fn since_boot(&self) -> Option<Duration> {
        #[cfg(target_os = "linux")]
        {
            linux::clock(linux::Which::Boottime)
        }
        #[cfg(windows)]
        {
            windows::since_boot()
        }
        #[cfg(not(any(target_os = "linux", windows)))]
        {
            None
        }
    }
}

/// Tells a wake from sleep: the time asleep (since boot − awake) grew by more than a threshold
/// between two reads.
pub struct WakeDetector<C: Clock> {
    clock: C,
    threshold: Duration,
    asleep: Option<Duration>,
}

impl<C: Clock> WakeDetector<C> {
    pub fn new(clock: C, threshold: Duration) -> WakeDetector<C> {
        let mut d = WakeDetector {
            clock,
            threshold,
            asleep: None,
        };
        d.asleep = d.read();
        d
    }

    fn read(&self) -> Option<Duration> {
        Some(self.clock.since_boot()?.saturating_sub(self.clock.awake()?))
    }

    /// How long the machine slept since the last check, when that is over the threshold.
    pub fn check(&mut self) -> Option<Duration> {
        let now = self.read()?;
        let before = self.asleep.replace(now)?;
        let slept = now.saturating_sub(before);
        (slept > self.threshold).then_some(slept)
    }

    /// Whether this system's clocks tell sleep at all.
    pub fn works(&self) -> bool {
        self.asleep.is_some()
    }
}

/// Changes reported by the operating system, one description each, as they come. `None` when
/// this system has no source or it could not be set up (said in the log).
struct Source {
    rx: mpsc::Receiver<String>,
    #[cfg(windows)]
    _registration: windows::Registration,
}

impl Source {
    fn start(shutdown: &CancellationToken) -> Option<Source> {
        let (tx, rx) = mpsc::channel(64);
        #[cfg(target_os = "linux")]
        {
            let socket = linux::RouteSocket::open()
                .map_err(|e| tracing::warn!(error = %e, "cannot watch for network changes (netlink route socket); a dead session is noticed by its pings"))
                .ok()?;
            tokio::spawn(socket.run(tx, shutdown.clone()));
            Some(Source { rx })
        }
        #[cfg(windows)]
        {
            let _ = shutdown;
            let registration = windows::Registration::start(tx)
                .map_err(|e| tracing::warn!(error = %e, "cannot watch for network changes (NotifyIpInterfaceChange); a dead session is noticed by its pings"))
                .ok()?;
            Some(Source {
                rx,
                _registration: registration,
            })
        }
        #[cfg(not(any(target_os = "linux", windows)))]
        {
            let _ = (tx, shutdown);
            drop(rx);
            None
        }
    }
}

/// Starts watching; events arrive on the receiver until `shutdown`.
pub fn start(shutdown: CancellationToken) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(4);
    let source = Source::start(&shutdown);
    tokio::spawn(run(source, SystemClock, tx, shutdown));
    rx
}

async fn run(
    mut source: Option<Source>,
    clock: impl Clock,
    tx: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let mut debounce = Debounce::new(QUIET, MAX_HOLD);
    let mut wake = WakeDetector::new(clock, WAKE_THRESHOLD);
    let watching = match (&source, wake.works()) {
        (Some(_), true) => "network changes and wakes from sleep",
        (Some(_), false) => "network changes",
        (None, true) => "wakes from sleep",
        (None, false) => return,
    };
    tracing::debug!("watching for {watching}");
    let mut tick = tokio::time::interval(WAKE_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = debounce.due();
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            what = async { source.as_mut()?.rx.recv().await }, if source.is_some() => {
                match what {
                    Some(what) => debounce.push(Instant::now(), what),
                    // The source ended (its socket failed, said in the log): sleep is still
                    // watched.
                    None => source = None,
                }
                None
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                debounce.fire(Instant::now()).map(Event::Changed)
            }
            _ = tick.tick() => wake.check().map(Event::Woke),
        };
        if let Some(e) = event {
            if tx.send(e).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_wifi_roam_burst_is_one_event_after_it_goes_quiet() {
        let t = Instant::now();
        let mut d = Debounce::new(QUIET, MAX_HOLD);
        assert_eq!(d.due(), None);
        d.push(t, "link wlan0 down".into());
        d.push(
            t + Duration::from_millis(100),
            "route default via 10.0.0.1 removed".into(),
        );
        d.push(t + Duration::from_millis(300), "link wlan0 up".into());
        d.push(t + Duration::from_millis(350), "link wlan0 up".into());
        assert_eq!(
            d.fire(t + Duration::from_millis(700)),
            None,
            "fired inside the burst"
        );
        assert_eq!(d.due(), Some(t + Duration::from_millis(850)));
        assert_eq!(
            d.fire(t + Duration::from_millis(850)).unwrap(),
            "link wlan0 down; route default via 10.0.0.1 removed; link wlan0 up"
        );
        assert_eq!(d.due(), None, "one event per burst");
        assert_eq!(d.fire(t + Duration::from_secs(10)), None);
    }

    #[test]
    fn a_link_that_never_stops_flapping_gives_one_event_per_max_hold_not_one_per_flap() {
        let t = Instant::now();
        let mut d = Debounce::new(QUIET, MAX_HOLD);
        let mut fired = 0;
        // a flap every 200 ms for 20 s: 100 changes, never 500 ms quiet
        for i in 0..100u64 {
            let now = t + Duration::from_millis(200 * i);
            if d.fire(now).is_some() {
                fired += 1;
            }
            d.push(now, format!("link eth{} up", i % 10));
        }
        assert_eq!(fired, 3, "every 5 s, not every flap");
        let what = d.fire(t + Duration::from_secs(30)).unwrap();
        assert!(what.ends_with("more)"), "{what}");
    }

    /// A clock whose boottime the test moves.
    #[derive(Clone)]
    struct Fake(Arc<Mutex<(Duration, Duration)>>);
    impl Clock for Fake {
        fn awake(&self) -> Option<Duration> {
            Some(self.0.lock().unwrap().0)
        }
        fn since_boot(&self) -> Option<Duration> {
            Some(self.0.lock().unwrap().1)
        }
    }
    impl Fake {
        fn advance(&self, awake: u64, boot: u64) {
            let mut c = self.0.lock().unwrap();
            c.0 += Duration::from_secs(awake);
            c.1 += Duration::from_secs(boot);
        }
    }

    #[test]
    fn boottime_30_s_ahead_of_monotonic_after_a_suspend_is_a_wake() {
        let clock = Fake(Arc::new(Mutex::new((
            Duration::from_secs(1000),
            Duration::from_secs(1200),
        ))));
        let mut w = WakeDetector::new(clock.clone(), WAKE_THRESHOLD);
        assert!(w.works());
        clock.advance(2, 2);
        assert_eq!(w.check(), None, "awake: both clocks moved together");
        clock.advance(2, 3);
        assert_eq!(w.check(), None, "a second of drift is no sleep");
        clock.advance(2, 32);
        assert_eq!(w.check(), Some(Duration::from_secs(30)));
        clock.advance(2, 2);
        assert_eq!(w.check(), None, "said once");
    }

    #[tokio::test(start_paused = true)]
    async fn an_injected_wake_arrives_as_an_event_on_the_stream() {
        let clock = Fake(Arc::new(Mutex::new((
            Duration::from_secs(10),
            Duration::from_secs(10),
        ))));
        let (tx, mut rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        tokio::spawn(run(None, clock.clone(), tx, shutdown.clone()));
        tokio::time::sleep(WAKE_CHECK * 2).await;
        clock.advance(0, 30);
        let e = tokio::time::timeout(WAKE_CHECK * 3, rx.recv())
            .await
            .unwrap();
        assert_eq!(e, Some(Event::Woke(Duration::from_secs(30))));
        assert_eq!(e.unwrap().to_string(), "woke from sleep after 30 s");
        shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn os_changes_are_debounced_into_one_event() {
        let (otx, orx) = mpsc::channel(8);
        let (tx, mut rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let source = Source {
            rx: orx,
            #[cfg(windows)]
            _registration: windows::Registration::none(),
        };
        let clock = Fake(Arc::new(Mutex::new((Duration::ZERO, Duration::ZERO))));
        tokio::spawn(run(Some(source), clock, tx, shutdown.clone()));
        otx.send("link wlan0 down".into()).await.unwrap();
        otx.send("link wlan0 up".into()).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .unwrap();
        assert_eq!(
            e.unwrap().to_string(),
            "network changed: link wlan0 down; link wlan0 up"
        );
        shutdown.cancel();
    }
}
