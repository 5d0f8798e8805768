//! The admin page: plain HTML tables, no script, every value HTML-escaped (destinations,
//! reasons and instance names come from the network). A role describes what it shows through
//! [`View`]; rows are cut at [`MAX_ROWS`] per table.

use crate::metrics::Metrics;
use std::fmt::Write as _;
use std::time::SystemTime;

/// Rows shown per table at most.
pub const MAX_ROWS: usize = 500;

/// One table of the page.
pub struct Table {
    pub title: &'static str,
    pub columns: &'static [&'static str],
    pub rows: Vec<Vec<String>>,
    /// What to show when `rows` is empty.
    pub empty: &'static str,
}

/// What a gateway role shows on its admin listener.
pub trait View: Send + Sync + 'static {
    /// e.g. `DMZ gateway dmz-1`.
    fn title(&self) -> String;
    fn metrics(&self) -> &Metrics;
    /// The summary line under the title (counts).
    fn summary(&self) -> String;
    fn tables(&self) -> Vec<Table>;
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

/// `12m ago`, `3h 4m`: how long since `t`.
/// The "Recent refusals" table, newest first; `columns` names them for the role (the DMZ shows
/// the token, a connector the user).
pub fn refusals(metrics: &crate::metrics::Metrics, columns: &'static [&'static str]) -> Table {
    Table {
        title: "Recent refusals",
        columns,
        rows: metrics
            .recent_refusals()
            .into_iter()
            .map(|r| {
                vec![
                    since(r.at),
                    r.who,
                    r.dest,
                    r.code.as_str().to_string(),
                    r.reason,
                ]
            })
            .collect(),
        empty: "no refusal since start",
    }
}

pub fn since(t: SystemTime) -> String {
    let s = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

const STYLE: &str =
    "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2430;background:#f6f7f9}\
h1{font-size:20px;margin:0 0 4px}h2{font-size:15px;margin:22px 0 6px}\
.sum{color:#4a5568;margin-bottom:8px}table{border-collapse:collapse;background:#fff;min-width:60%}\
th,td{border:1px solid #d7dce3;padding:4px 10px;text-align:left;vertical-align:top}\
th{background:#e9edf2;font-weight:600}td.e{color:#718096;font-style:italic}\
form.out{float:right}button{font:inherit;padding:4px 12px}\
input{font:inherit;padding:4px;width:320px}.err{color:#b42318}code{font-size:13px}";

fn head(o: &mut String, title: &str) {
    let _ = write!(
        o,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{t} — sallyport admin</title><style>{STYLE}</style></head><body>",
        t = escape(title)
    );
}

/// The page for an authenticated admin.
pub fn render(view: &dyn View) -> String {
    let mut o = String::with_capacity(16 * 1024);
    let title = view.title();
    head(&mut o, &title);
    let _ = write!(
        o,
        "<form class=\"out\" method=\"post\" action=\"/logout\"><button>Log out</button></form>\
         <h1>{}</h1><div class=\"sum\">{}</div>",
        escape(&title),
        escape(&view.summary())
    );
    for t in view.tables() {
        let _ = write!(
            o,
            "<h2>{} ({})</h2><table><tr>",
            escape(t.title),
            t.rows.len()
        );
        for c in t.columns {
            let _ = write!(o, "<th>{}</th>", escape(c));
        }
        o.push_str("</tr>");
        if t.rows.is_empty() {
            let _ = write!(
                o,
                "<tr><td class=\"e\" colspan=\"{}\">{}</td></tr>",
                t.columns.len(),
                escape(t.empty)
            );
        }
        for row in t.rows.iter().take(MAX_ROWS) {
            o.push_str("<tr>");
            for cell in row {
                let _ = write!(o, "<td>{}</td>", escape(cell));
            }
            o.push_str("</tr>");
        }
        if t.rows.len() > MAX_ROWS {
            let _ = write!(
                o,
                "<tr><td class=\"e\" colspan=\"{}\">and {} more</td></tr>",
                t.columns.len(),
                t.rows.len() - MAX_ROWS
            );
        }
        o.push_str("</table>");
    }
    o.push_str("<p class=\"sum\">Counters for Prometheus: <code>/metrics</code></p></body></html>");
    o
}

/// The login form (`failed`: after a wrong token; it says nothing more than that).
pub fn login(title: &str, failed: bool) -> String {
    let mut o = String::new();
    head(&mut o, title);
    let _ = write!(
        o,
        "<h1>{}</h1><p class=\"sum\">Sign in with the admin token.</p>{}\
         <form method=\"post\" action=\"/login\"><input type=\"password\" name=\"token\" \
         autocomplete=\"current-password\" autofocus> <button>Sign in</button></form></body></html>",
        escape(title),
        if failed {
            "<p class=\"err\">Wrong token.</p>"
        } else {
            ""
        }
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_in_a_destination_is_escaped() {
        assert_eq!(
            escape("<script>x</script>\"'&\n"),
            "&lt;script&gt;x&lt;/script&gt;&quot;&#39;&amp;\u{fffd}"
        );
    }
}
