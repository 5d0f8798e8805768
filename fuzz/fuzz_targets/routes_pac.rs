//! What the agent does with a `ROUTES` frame from the gateway (before the agent has any reason
//! to trust what the gateway says about routes: a hostile gateway, or whoever answers in its
//! place, chooses every byte): `tunnel::Frame::decode` of the payload (what the session stores
//! as the peer's routes), then `agent::pages::pac_for`, which turns every route into JavaScript
//! that browsers run as `/proxy.pac`.
//!
//! The input is the `ROUTES` payload (the 5-byte header is added: type 0x0b, stream 0).
//! Properties checked:
//! * no panic;
//! * a decoded `ROUTES` frame re-encodes to the message byte for byte;
//! * the PAC text is the template, unchanged, plus at most one line per route in the route block
//!   (between `var port = …` and `return BEFORE;`) and one comment line
//!   for the skipped routes: a route cannot add lines;
//! * every route line is `  if (…) return AGENT; // <shown>`, where `<shown>` only has
//!   `[A-Za-z0-9-.*:/[]?]`, and the code before it, string literals removed, has no quote,
//!   brace, comment or second `return`; string literals hold only safe characters and the
//!   escapes `\"`, `\\`, `\uXXXX` (so no route text escapes its string);
//! * the skipped-routes comment, if any, is one `//` line of the same safe characters.
#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use tunnel::Frame;

const AGENT: &str = "PROXY 127.0.0.1:8118";
const BEFORE: &str = "DIRECT";
const GATEWAY: &str = "wss://gw.example.com/sallyport";

fn shown_ok(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-.*:/[]?".contains(c))
}

/// The code with its string literals replaced by `S`; checks the literals' contents.
fn strip_strings(code: &str) -> String {
    let mut out = String::new();
    let mut it = code.chars();
    while let Some(c) = it.next() {
        if c != '"' {
            out.push(c);
            continue;
        }
        loop {
            match it.next() {
                None => panic!("unterminated string literal in {code:?}"),
                Some('"') => break,
                Some('\\') => match it.next() {
                    Some('"') | Some('\\') => {}
                    Some('u') => {
                        for _ in 0..4 {
                            let h = it.next();
                            assert!(
                                h.is_some_and(|h| h.is_ascii_hexdigit()),
                                "bad \\u escape in {code:?}"
                            );
                        }
                    }
                    e => panic!("bad escape {e:?} in {code:?}"),
                },
                Some(c) => assert!(
                    c.is_ascii_alphanumeric() || "-._*:/ ;[]".contains(c),
                    "raw {c:?} in a string literal of {code:?}"
                ),
            }
        }
        out.push('S');
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut msg = BytesMut::with_capacity(5 + data.len());
    msg.put_u8(0x0b);
    msg.put_u32(0);
    msg.put_slice(data);
    let msg = msg.freeze();
    let Ok(frame) = Frame::decode(msg.clone(), 64 * 1024) else {
        return;
    };
    let Frame::Routes(routes) = frame else {
        panic!("a ROUTES message decoded as {frame:?}");
    };
    assert_eq!(
        Frame::Routes(routes.clone()).encode(),
        msg,
        "ROUTES does not re-encode"
    );

    let empty = agent::pages::pac_for(&[], AGENT, BEFORE, GATEWAY);
    let pac = agent::pages::pac_for(&routes, AGENT, BEFORE, GATEWAY);
    const START: &str = "  var port = sp_port(url);";
    const END: &str = "  return BEFORE;";
    let mut lines: Vec<&str> = pac.lines().collect();
    // The comment naming skipped routes, if any, comes first after the header comments.
    let mut skipped_lines = 0;
    if let Some(k) = lines
        .iter()
        .position(|l| l.starts_with("// Not matched here (IPv6 networks): "))
    {
        let list = &lines[k]["// Not matched here (IPv6 networks): ".len()..];
        assert!(
            list.split(", ").all(shown_ok),
            "unsafe text in the skipped-routes comment: {:?}",
            lines[k]
        );
        lines.remove(k);
        skipped_lines = 1;
    }
    let base: Vec<&str> = empty.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == START)
        .expect("route block start");
    let end = lines
        .iter()
        .rposition(|l| *l == END)
        .expect("route block end");
    assert!(start < end);
    // Everything but the route block is the template, unchanged.
    let bs = base.iter().position(|l| *l == START).unwrap();
    let be = base.iter().rposition(|l| *l == END).unwrap();
    assert_eq!(be, bs + 1);
    assert_eq!(
        lines[..=start],
        base[..=bs],
        "a route changed the PAC's header"
    );
    assert_eq!(lines[end..], base[be..], "a route changed the PAC's end");
    let conds = end - start - 1;
    for line in &lines[start + 1..end] {
        let rest = line
            .strip_prefix("  if ")
            .unwrap_or_else(|| panic!("not a route line: {line:?}"));
        let (code, shown) = rest
            .rsplit_once(" // ")
            .unwrap_or_else(|| panic!("route line without its comment: {line:?}"));
        assert!(shown_ok(shown), "unsafe text in a route comment: {line:?}");
        let code = strip_strings(code);
        let code = code
            .strip_suffix(" return AGENT;")
            .unwrap_or_else(|| panic!("route line does not end in return AGENT: {line:?}"));
        assert!(
            !code.contains(['"', '\'', '`', '{', '}', '\\', ';'])
                && !code.contains("//")
                && !code.contains("/*")
                && !code.contains("return"),
            "route code escapes its condition: {line:?}"
        );
    }
    assert!(conds <= routes.len());
    assert_eq!(
        pac.lines().count(),
        base.len() + conds + skipped_lines,
        "a route added lines to the PAC"
    );
});
