//! The sandbox: one QuickJS runtime per evaluation, on its own thread, with memory, time and
//! stack limits; the Rust side of the PAC helpers (DNS, addresses, clock, `shExpMatch`,
//! `alert`, the Microsoft IPv6 functions). See the parent module for the design.

use super::{shorten, PacEnv, PacLimits, ScriptProblem};
use rquickjs::context::intrinsic;
use rquickjs::{Coerced, Context, Ctx, Function, Runtime, Type, Value};
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// The JavaScript half of the helpers.
const HELPERS: &str = include_str!("helpers.js");

/// Functions defined by `helpers.js`; stack frames in them are not the script's.
const HELPER_FUNCTIONS: &[&str] = &[
    "isPlainHostName",
    "dnsDomainIs",
    "localHostOrDomainIs",
    "dnsDomainLevels",
    "convert_addr",
    "dnsResolve",
    "isResolvable",
    "isInNet",
    "myIpAddress",
    "shExpMatch",
    "alert",
    "dnsResolveEx",
    "isResolvableEx",
    "myIpAddressEx",
    "isInNetEx",
    "sortIpAddressList",
    "getClientVersion",
    "weekdayRange",
    "dateRange",
    "timeRange",
];

/// Most evaluations abandoned by the watchdog (stuck in code QuickJS cannot interrupt) that may
/// still be running; further evaluations are refused until one ends.
pub const MAX_ABANDONED: usize = 4;
static ABANDONED: AtomicUsize = AtomicUsize::new(0);

/// How long after the time limit the watchdog gives up on an evaluation thread.
const GRACE: Duration = Duration::from_millis(500);
/// QuickJS's own stack limit, and the evaluation thread's (with room for Rust and C frames).
const JS_STACK: usize = 1 << 20;
const THREAD_STACK: usize = 4 << 20;
/// Per-evaluation caps: distinct names looked up, `alert` messages logged and their length.
const MAX_DNS_NAMES: usize = 32;
const MAX_ALERTS: u32 = 32;
const MAX_ALERT_LEN: usize = 1024;

/// A checked script and everything an evaluation needs.
pub(super) struct Script {
    pub name: String,
    pub source: String,
    pub limits: PacLimits,
    pub env: Arc<dyn PacEnv>,
}

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const GIVEN_UP: u8 = 2;

/// Loads the script in a fresh sandbox and, with `call = Some((url, host))`, calls its entry
/// point: the function's name and its string answer. Runs on a new thread and waits for it at
/// most the time limit plus [`GRACE`].
pub(super) fn run(
    script: &Arc<Script>,
    call: Option<(String, String)>,
) -> Result<(&'static str, Option<String>), ScriptProblem> {
    let stuck = ABANDONED.load(Ordering::SeqCst);
    if stuck >= MAX_ABANDONED {
        return Err(ScriptProblem::TooManyStuck(stuck));
    }
    let limit = script.limits.time;
    let deadline = Instant::now() + limit;
    let (tx, rx) = mpsc::sync_channel(1);
    let state = Arc::new(AtomicU8::new(RUNNING));
    let (job, thread_state) = (script.clone(), state.clone());
    std::thread::Builder::new()
        .name("pac".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let _ = tx.send(evaluate(&job, deadline, call));
            if thread_state.swap(DONE, Ordering::SeqCst) == GIVEN_UP {
                ABANDONED.fetch_sub(1, Ordering::SeqCst);
                tracing::info!(pac = %job.name, "an abandoned PAC evaluation has ended");
            }
        })
        .map_err(|e| ScriptProblem::Engine(format!("cannot start a thread: {e}")))?;
    match rx.recv_timeout(limit + GRACE) {
        Ok(r) => r,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            ABANDONED.fetch_add(1, Ordering::SeqCst);
            if state
                .compare_exchange(RUNNING, GIVEN_UP, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                tracing::warn!(
                    pac = %script.name,
                    "PAC evaluation still running {:?} after its time limit; abandoning its thread",
                    GRACE
                );
                Err(ScriptProblem::Timeout(limit))
            } else {
                // It finished just now.
                ABANDONED.fetch_sub(1, Ordering::SeqCst);
                rx.try_recv().unwrap_or(Err(ScriptProblem::Timeout(limit)))
            }
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(ScriptProblem::Engine(
            "the evaluation thread ended without an answer".into(),
        )),
    }
}

/// Where an error happened, for its message.
#[derive(Clone, Copy)]
enum Stage {
    Helpers,
    Load,
    Call(&'static str),
}

fn evaluate(
    job: &Script,
    deadline: Instant,
    call: Option<(String, String)>,
) -> Result<(&'static str, Option<String>), ScriptProblem> {
    let limits = &job.limits;
    let engine = |e: rquickjs::Error| match e {
        rquickjs::Error::Allocation => ScriptProblem::OutOfMemory(limits.memory),
        e => ScriptProblem::Engine(e.to_string()),
    };
    let rt = Runtime::new().map_err(engine)?;
    rt.set_memory_limit(limits.memory);
    rt.set_max_stack_size(JS_STACK);
    rt.set_interrupt_handler(Some(Box::new(move || Instant::now() >= deadline)));
    // The base objects (Object, Array, String, Math, Error…) plus what PAC scripts may use
    // (Promise too: without it, `async` and `import()` leave objects behind that make
    // JS_FreeRuntime abort; pending jobs are simply dropped with the runtime); no typed
    // arrays, Proxy, WeakRef, performance; no module loader, no std/os.
    let ctx = Context::builder()
        .with::<intrinsic::Date>()
        .with::<intrinsic::Eval>()
        .with::<intrinsic::RegExpCompiler>()
        .with::<intrinsic::RegExp>()
        .with::<intrinsic::Json>()
        .with::<intrinsic::MapSet>()
        .with::<intrinsic::Promise>()
        .build(&rt)
        .map_err(engine)?;
    let state = Rc::new(State {
        env: job.env.clone(),
        deadline,
        name: job.name.clone(),
        dns: RefCell::new(HashMap::new()),
        dns_capped: Cell::new(false),
        local: OnceCell::new(),
        alerts: Cell::new(0),
    });
    let result = ctx.with(|ctx| {
        let fail = |stage, e| problem(&ctx, e, stage, deadline, limits);
        install_natives(&ctx, &state).map_err(|e| fail(Stage::Helpers, e))?;
        ctx.eval::<(), _>(HELPERS)
            .map_err(|e| fail(Stage::Helpers, e))?;
        ctx.eval::<(), _>(job.source.as_str())
            .map_err(|e| fail(Stage::Load, e))?;
        let globals = ctx.globals();
        let mut entry = None;
        for name in ["FindProxyForURLEx", "FindProxyForURL"] {
            let v: Value = globals.get(name).map_err(|e| fail(Stage::Load, e))?;
            if let Some(f) = v.into_function() {
                entry = Some((name, f));
                break;
            }
        }
        let (name, function) = entry.ok_or(ScriptProblem::NoEntryPoint)?;
        let Some((url, host)) = call else {
            return Ok((name, None));
        };
        let answer: Value = function
            .call((url, host))
            .map_err(|e| fail(Stage::Call(name), e))?;
        match answer.as_string() {
            Some(s) => match s.to_string() {
                Ok(s) => Ok((name, Some(s))),
                Err(e) => Err(fail(Stage::Call(name), e)),
            },
            None => Err(ScriptProblem::NotString {
                function: name,
                got: describe_value(&answer),
            }),
        }
    });
    // Dropping frees everything, pending promise jobs included (QuickJS aborts the process if a
    // runtime is freed with objects alive; with the Promise intrinsic present it is not).
    drop(ctx);
    drop(rt);
    result
}

/// Turns an engine error into the problem to report: the deadline first (an interrupted script
/// throws an uncatchable "interrupted"), then memory, then the exception's own message.
fn problem(
    ctx: &Ctx<'_>,
    e: rquickjs::Error,
    stage: Stage,
    deadline: Instant,
    limits: &PacLimits,
) -> ScriptProblem {
    if Instant::now() >= deadline {
        return ScriptProblem::Timeout(limits.time);
    }
    let message = match e {
        rquickjs::Error::Allocation => return ScriptProblem::OutOfMemory(limits.memory),
        rquickjs::Error::Exception => {
            let thrown = ctx.catch();
            // QuickJS throws null when it cannot even allocate the error object: out of memory.
            // (A script that throws null itself is reported the same way; it is broken anyway.)
            if thrown.is_null() {
                return ScriptProblem::OutOfMemory(limits.memory);
            }
            describe_exception(&thrown)
        }
        rquickjs::Error::InvalidString(_) => "it contains a NUL character".to_string(),
        e => e.to_string(),
    };
    if Instant::now() >= deadline {
        return ScriptProblem::Timeout(limits.time);
    }
    if message.contains("out of memory") {
        return ScriptProblem::OutOfMemory(limits.memory);
    }
    match stage {
        Stage::Helpers => ScriptProblem::Engine(format!("loading the PAC helpers: {message}")),
        Stage::Load => ScriptProblem::Load(message),
        Stage::Call(function) => ScriptProblem::Threw { function, message },
    }
}

/// `ReferenceError: foo is not defined (in isIntranet)`, `SyntaxError: … (line 3)`, or the
/// thrown value. The function is the innermost one of the script (not a helper) when it is not
/// FindProxyForURL itself; lines are given for syntax errors only, as QuickJS's run-time
/// positions are sometimes those of the function's start.
fn describe_exception(v: &Value<'_>) -> String {
    if let Some(exc) = v.as_exception() {
        let name = exc
            .get::<_, Option<Coerced<String>>>("name")
            .ok()
            .flatten()
            .map(|c| c.0)
            .unwrap_or_default();
        let message = exc.message().unwrap_or_default();
        let mut text = match (name.is_empty(), message.is_empty()) {
            (false, false) => format!("{name}: {message}"),
            (false, true) => name.clone(),
            _ => message,
        };
        if let Some((function, line)) = exc.stack().as_deref().and_then(script_frame) {
            if name == "SyntaxError" {
                text = format!("{text} (line {line})");
            } else if !matches!(
                function.as_str(),
                "" | "<eval>" | "<anonymous>" | "FindProxyForURL" | "FindProxyForURLEx"
            ) {
                text = format!("{text} (in {function})");
            }
        }
        return shorten(&text, 300);
    }
    match v.get::<Coerced<String>>() {
        Ok(s) => shorten(&s.0, 300),
        Err(_) => format!("a value of type {}", v.type_name()),
    }
}

/// The innermost stack frame in the script (not in the helpers): its function ("" at top
/// level) and line.
fn script_frame(stack: &str) -> Option<(String, u32)> {
    stack.lines().find_map(|line| {
        let frame = line.trim().strip_prefix("at ")?;
        let (function, place) = match frame.rsplit_once(" (") {
            Some((f, p)) => (f.trim(), p.trim_end_matches(')')),
            None => ("", frame),
        };
        if HELPER_FUNCTIONS.contains(&function) || function.starts_with("__sp_") {
            return None;
        }
        let mut parts = place.rsplit(':');
        let (_column, line_no) = (parts.next()?, parts.next()?);
        Some((function.to_string(), line_no.parse().ok()?))
    })
}

/// A non-string answer, for the message: "42 (a number)", "undefined".
fn describe_value(v: &Value<'_>) -> String {
    match v.type_of() {
        Type::Undefined => "undefined (no return?)".into(),
        Type::Null => "null".into(),
        Type::Bool => format!("{} (a boolean)", v.as_bool().unwrap_or_default()),
        Type::Int | Type::Float => format!("{} (a number)", v.as_number().unwrap_or_default()),
        Type::Array => "an array".into(),
        Type::Function | Type::Constructor => "a function".into(),
        t => format!("a value of type {t}"),
    }
}

/// What the natives of one evaluation share.
struct State {
    env: Arc<dyn PacEnv>,
    deadline: Instant,
    name: String,
    /// Answers of this evaluation (scripts call `isInNet(host, …)` many times for one host);
    /// at most [`MAX_DNS_NAMES`] names are asked.
    dns: RefCell<HashMap<String, Vec<IpAddr>>>,
    dns_capped: Cell<bool>,
    local: OnceCell<Vec<IpAddr>>,
    alerts: Cell<u32>,
}

impl State {
    fn resolve(&self, host: &str) -> Vec<IpAddr> {
        let host = host.trim();
        if let Some(v) = self.dns.borrow().get(host) {
            return v.clone();
        }
        if self.dns.borrow().len() >= MAX_DNS_NAMES {
            if !self.dns_capped.replace(true) {
                tracing::warn!(
                    pac = %self.name,
                    "PAC looks up more than {MAX_DNS_NAMES} names; the others do not resolve"
                );
            }
            return Vec::new();
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        let addrs = if left.is_zero() || host.is_empty() {
            Vec::new()
        } else {
            self.env.resolve(host, left)
        };
        self.dns
            .borrow_mut()
            .insert(host.to_string(), addrs.clone());
        addrs
    }

    fn local(&self) -> &[IpAddr] {
        self.local.get_or_init(|| self.env.local_addresses())
    }

    fn alert(&self, message: &str) {
        let n = self.alerts.get();
        self.alerts.set(n.saturating_add(1));
        if n < MAX_ALERTS {
            tracing::info!(pac = %self.name, "PAC alert: {}", shorten(message, MAX_ALERT_LEN));
        } else if n == MAX_ALERTS {
            tracing::info!(pac = %self.name, "PAC alert: (further alerts of this evaluation not shown)");
        }
    }
}

fn join(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(";")
}

fn install_natives<'js>(ctx: &Ctx<'js>, state: &Rc<State>) -> rquickjs::Result<()> {
    let g = ctx.globals();
    let s = state.clone();
    g.set(
        "__sp_dnsResolve",
        Function::new(ctx.clone(), move |host: String| {
            s.resolve(&host)
                .into_iter()
                .find(IpAddr::is_ipv4)
                .map(|a| a.to_string())
                .unwrap_or_default()
        })?,
    )?;
    let s = state.clone();
    g.set(
        "__sp_dnsResolveEx",
        Function::new(ctx.clone(), move |host: String| join(&s.resolve(&host)))?,
    )?;
    let s = state.clone();
    g.set(
        "__sp_myIpAddress",
        Function::new(ctx.clone(), move || {
            s.local()
                .iter()
                .find(|a| a.is_ipv4())
                .map(|a| a.to_string())
                .unwrap_or_else(|| "127.0.0.1".into())
        })?,
    )?;
    let s = state.clone();
    g.set(
        "__sp_myIpAddressEx",
        Function::new(ctx.clone(), move || {
            let all = s.local();
            if all.is_empty() {
                "127.0.0.1".to_string()
            } else {
                join(all)
            }
        })?,
    )?;
    let s = state.clone();
    g.set(
        "__sp_isInNetEx",
        Function::new(ctx.clone(), move |ips: String, prefix: String| {
            is_in_net_ex(&s, &ips, &prefix)
        })?,
    )?;
    g.set(
        "__sp_sortIpAddressList",
        Function::new(ctx.clone(), |list: String| sort_ip_list(&list))?,
    )?;
    let s = state.clone();
    g.set(
        "__sp_shExpMatch",
        Function::new(ctx.clone(), move |text: String, pattern: String| {
            glob_match(&text, &pattern, s.deadline)
        })?,
    )?;
    let s = state.clone();
    g.set(
        "__sp_alert",
        Function::new(ctx.clone(), move |message: String| s.alert(&message))?,
    )?;
    let s = state.clone();
    g.set(
        "__sp_clock",
        Function::new(ctx.clone(), move || {
            match s.env.now().duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_millis() as f64,
                Err(e) => -(e.duration().as_millis() as f64),
            }
        })?,
    )?;
    let s = state.clone();
    g.set(
        "__sp_utcOffset",
        Function::new(ctx.clone(), move || s.env.utc_offset_minutes())?,
    )?;
    Ok(())
}

/// `isInNetEx(ips, "10.0.0.0/8" | "2001:db8::/32")`: true when one of the `;`-separated
/// addresses (or, when `ips` is a name, one of its addresses) is in the prefix.
fn is_in_net_ex(state: &State, ips: &str, prefix: &str) -> bool {
    let Some((net, bits)) = prefix.trim().split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u8>()) else {
        return false;
    };
    if bits > if net.is_ipv4() { 32 } else { 128 } {
        return false;
    }
    let listed: Option<Vec<IpAddr>> = ips
        .split(';')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| a.parse().ok())
        .collect();
    let addrs = match listed {
        Some(v) if !v.is_empty() => v,
        _ => state.resolve(ips),
    };
    addrs.iter().any(|a| in_prefix(*a, net, bits))
}

fn in_prefix(addr: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// `sortIpAddressList("10.0.0.2;::1;10.0.0.1")` → `"::1;10.0.0.1;10.0.0.2"`: IPv6 first, then
/// IPv4, each in ascending order; "" (false in JavaScript) when empty or an entry is invalid.
fn sort_ip_list(list: &str) -> String {
    let parsed: Option<Vec<IpAddr>> = list.split(';').map(|a| a.trim().parse().ok()).collect();
    let Some(mut addrs) = parsed else {
        return String::new();
    };
    addrs.sort_by_key(|a| match a {
        IpAddr::V6(v6) => (0, u128::from(*v6)),
        IpAddr::V4(v4) => (1, u128::from(u32::from(*v4))),
    });
    join(&addrs)
}

/// Shell-expression match for `shExpMatch`: `*` matches any run of characters, `?` exactly one,
/// everything else itself; the whole of `text` must match. Linear in practice, O(n·m) at worst
/// (no backtracking explosion); gives up (false) at the deadline.
pub(super) fn glob_match(text: &str, pattern: &str, deadline: Instant) -> bool {
    let (t, p) = (text.as_bytes(), pattern.as_bytes());
    // Length of the UTF-8 character starting at t[i] (both strings are valid UTF-8, and `i` is
    // always on a character boundary where this is called).
    let char_len = |i: usize| match t[i] {
        b if b >= 0xF0 => 4,
        b if b >= 0xE0 => 3,
        b if b >= 0xC0 => 2,
        _ => 1,
    };
    let (mut ti, mut pi) = (0usize, 0usize);
    // After the last `*`: where the pattern resumes and where in `text` the star's run ends.
    let mut star: Option<(usize, usize)> = None;
    let mut steps = 0u32;
    while ti < t.len() {
        steps = steps.wrapping_add(1);
        if steps & 0xfff == 0 && Instant::now() >= deadline {
            return false;
        }
        match p.get(pi) {
            Some(b'*') => {
                pi += 1;
                star = Some((pi, ti));
            }
            Some(b'?') => {
                ti = (ti + char_len(ti)).min(t.len());
                pi += 1;
            }
            Some(&c) if c == t[ti] => {
                ti += 1;
                pi += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    let st = (st + char_len(st)).min(t.len());
                    star = Some((sp, st));
                    ti = st;
                    pi = sp;
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(t: &str, p: &str) -> bool {
        glob_match(t, p, Instant::now() + Duration::from_secs(5))
    }

    #[test]
    fn pac_glob_matches_like_shexpmatch() {
        assert!(glob(
            "http://home.netscape.com/people/ari/index.html",
            "*/ari/*"
        ));
        assert!(!glob(
            "http://home.netscape.com/people/montulli/index.html",
            "*/ari/*"
        ));
        assert!(glob("www.corp.example.com", "*.corp.example.com"));
        assert!(!glob("corp.example.com", "*.corp.example.com"));
        assert!(glob("", ""));
        assert!(glob("", "*"));
        assert!(glob("", "**"));
        assert!(!glob("", "?"));
        assert!(!glob("a", ""));
        assert!(glob("abc", "a?c"));
        assert!(!glob("abbc", "a?c"));
        assert!(glob("aaa", "a*a*a"));
        assert!(!glob("aa", "a*a*a"));
        assert!(glob("mississippi", "*sip*"));
        assert!(glob("mississippi", "m*iss*ppi"));
        // Regex metacharacters are literal.
        assert!(glob("a+b(c)[d]{2}|^$\\.x", "a+b(c)[d]{2}|^$\\.x"));
        assert!(!glob("aab", "a+b"));
        assert!(!glob("axcom", "a.com"));
        assert!(glob("a.com", "a.com"));
        // `?` is one character, not one byte.
        assert!(glob("ü.de", "?.de"));
        assert!(glob("日本.jp", "??.jp"));
        assert!(!glob("日本.jp", "?.jp"));
        assert!(glob("x日本y", "x*y"));
        assert!(glob("日本語", "*本*"));
        // Case-sensitive, as in browsers.
        assert!(!glob("A.COM", "a.com"));
    }

    #[test]
    fn pac_glob_has_no_backtracking_blowup() {
        let text = "a".repeat(20_000);
        let pattern = format!("{}b", "*a".repeat(30));
        let t0 = Instant::now();
        assert!(!glob(&text, &pattern));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[test]
    fn pac_prefix_and_sort_helpers() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_prefix(v4("10.1.2.3"), v4("10.0.0.0"), 8));
        assert!(!in_prefix(v4("11.1.2.3"), v4("10.0.0.0"), 8));
        assert!(in_prefix(v4("1.2.3.4"), v4("0.0.0.0"), 0));
        assert!(in_prefix(v4("1.2.3.4"), v4("1.2.3.4"), 32));
        assert!(!in_prefix(v4("1.2.3.5"), v4("1.2.3.4"), 32));
        assert!(in_prefix(v4("2001:db8::1"), v4("2001:db8::"), 32));
        assert!(!in_prefix(v4("2001:db9::1"), v4("2001:db8::"), 32));
        assert!(in_prefix(v4("::1"), v4("::"), 0));
        assert!(!in_prefix(v4("10.0.0.1"), v4("::"), 0));
        assert_eq!(
            sort_ip_list("10.0.0.2; ::1;10.0.0.1;2001:db8::1"),
            "::1;2001:db8::1;10.0.0.1;10.0.0.2"
        );
        assert_eq!(sort_ip_list(""), "");
        assert_eq!(sort_ip_list("10.0.0.1;nope"), "");
        assert_eq!(sort_ip_list("10.0.0.1;"), "");
    }

    #[test]
    fn pac_stack_frames_name_the_script_function() {
        let stack =
            "    at dnsDomainIs (eval_script:20:5)\n    at FindProxyForURL (eval_script:3:11)\n";
        assert_eq!(script_frame(stack), Some(("FindProxyForURL".into(), 3)));
        assert_eq!(
            script_frame("    at <eval> (eval_script:7:1)\n"),
            Some(("<eval>".into(), 7))
        );
        assert_eq!(
            script_frame("    at eval_script:2:5\n"),
            Some(("".into(), 2))
        );
        assert_eq!(script_frame("garbage"), None);
    }
}
