//! Shared by the `sniff_*` targets: the properties every first-bytes recogniser of
//! `gateway::policy::sniff` must have, checked on the input and on its prefix cut where byte 0
//! says.
//!
//! * no panic, whatever the lengths inside claim;
//! * a prefix's verdict holds for the whole: a prefix that `Is` one gives the same answer on the
//!   whole input (bytes after the thing are not looked at), a prefix that is `Not` one stays
//!   `Not`, and a whole input that says `More` had only `More` prefixes. So the connector never
//!   passes or refuses a stream on how the client's bytes were split into reads.

use gateway::policy::sniff::Sniff;

pub fn check<T: PartialEq + std::fmt::Debug>(data: &[u8], f: fn(&[u8]) -> Sniff<T>) -> Sniff<T> {
    let Some((&cut, input)) = data.split_first() else {
        return f(data);
    };
    let whole = f(input);
    let k = (cut as usize * input.len()) / 255;
    let part = f(&input[..k]);
    match (&part, &whole) {
        (Sniff::More, _) => {}
        (Sniff::Is(a), Sniff::Is(b)) => assert_eq!(a, b, "prefix of {k} bytes recognised differently"),
        (Sniff::Not(_), Sniff::Not(_)) => {}
        (p, w) => panic!("prefix of {k} bytes says {p:?}, the whole input {w:?}"),
    }
    whole
}
