//! The reload script and where it goes: which requests are page navigations, which responses
//! can take it safely, and the script itself. The I/O is the hyper path's (every navigation is
//! handed to it); these are the rules both paths follow.

use std::time::Duration;

use http::HeaderMap;
use http::header;

/// The path of the proxy's own event stream (server-sent events), relative to the page's
/// origin so that it works through any host name or tunnel that reaches the proxy.
pub(super) const EVENTS_PATH: &str = "/.pmesh/events";
/// Paths the proxy answers itself, never forwarded (while it injects its script).
pub(super) const RESERVED: &str = "/.pmesh/";
/// The largest HTML body held to be rewritten; a larger one passes untouched.
pub(super) const MAX_HTML: usize = 4 << 20;
/// How long an HTML body without a length may take to arrive whole before it passes untouched
/// (a page that streams for ever, or a slow server-rendered one, is not held back longer).
pub(super) const MAX_HTML_WAIT: Duration = Duration::from_secs(5);

/// Whether a request is a page navigation: a `GET` that a browser sends for a document
/// (`Sec-Fetch-Dest: document`), or, from a client that does not send that header, one that
/// accepts `text/html`. A browser's `fetch` or an htmx request says `Sec-Fetch-Dest: empty`,
/// and is left alone even when it accepts HTML. A ranged request never is one.
pub(super) fn navigation<'h>(
    method: &[u8],
    headers: impl Iterator<Item = (&'h [u8], &'h [u8])>,
) -> bool {
    if method != b"GET" {
        return false;
    }
    let mut dest = None;
    let mut accepts_html = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"sec-fetch-dest") {
            dest = Some(value);
        } else if name.eq_ignore_ascii_case(b"accept") {
            accepts_html |= contains_ignore_case(value, b"text/html");
        } else if name.eq_ignore_ascii_case(b"range") {
            return false;
        }
    }
    match dest {
        Some(dest) => dest.trim_ascii().eq_ignore_ascii_case(b"document"),
        None => accepts_html,
    }
}

/// Whether a request's path is one the proxy answers itself.
pub(super) fn reserved(path: &str) -> bool {
    path.starts_with(RESERVED)
}

/// Whether a response to a navigation can take the script: an HTML body (not an interim,
/// empty, partial or not-modified one) in no content coding, and not a range of something.
pub(super) fn rewritable(status: u16, headers: &HeaderMap) -> bool {
    if status < 200 || matches!(status, 204 | 206 | 304) {
        return false;
    }
    if headers.contains_key(header::CONTENT_RANGE) {
        return false;
    }
    let identity = headers.get_all(header::CONTENT_ENCODING).iter().all(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .all(|c| c.trim_ascii().is_empty() || c.trim_ascii().eq_ignore_ascii_case(b"identity"))
    });
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    let html = match (types.next(), types.next()) {
        (Some(t), None) => is_html(t.as_bytes()),
        _ => false,
    };
    identity && html
}

/// `text/html`, with or without parameters.
fn is_html(content_type: &[u8]) -> bool {
    let essence = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default();
    essence.trim_ascii().eq_ignore_ascii_case(b"text/html")
}

fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// `html` with `script` before its last `</body`, or at the end when it has none.
pub(super) fn inject(html: &[u8], script: &str) -> Vec<u8> {
    const END: &[u8] = b"</body";
    let at = html
        .windows(END.len())
        .rposition(|w| w.eq_ignore_ascii_case(END))
        .unwrap_or(html.len());
    let mut out = Vec::with_capacity(html.len() + script.len());
    out.extend_from_slice(&html[..at]);
    out.extend_from_slice(script.as_bytes());
    out.extend_from_slice(&html[at..]);
    out
}

/// The script for a page served by the build whose token is `token` (see
/// [`Notices`](super::Notices)): it listens to [`EVENTS_PATH`], reloads the page once another
/// build is live, and shows a problem in an overlay built from text nodes only (log lines are
/// the build's output: never markup).
pub(super) fn script(token: &str) -> String {
    // The token is hex digits, a dash and digits: nothing to escape.
    SCRIPT.replace("__TOKEN__", token)
}

const SCRIPT: &str = r#"<script data-pmesh-dev>(function () {
  if (window.__pmeshDev || !window.EventSource) return;
  window.__pmeshDev = true;
  var token = "__TOKEN__";
  var overlay = null;
  function hide() {
    if (overlay) { overlay.remove(); overlay = null; }
  }
  function el(tag, style, text) {
    var e = document.createElement(tag);
    e.style.cssText = style;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function show(p) {
    hide();
    var box = el("div", "position:fixed;inset:0;z-index:2147483647;overflow:auto;" +
      "background:rgba(24,24,27,.94);color:#e4e4e7;padding:24px;" +
      "font:14px/1.45 ui-monospace,SFMono-Regular,Menlo,monospace;text-align:left");
    box.id = "pmesh-dev-overlay";
    box.setAttribute("role", "alert");
    box.appendChild(el("div", "font-size:18px;color:#f87171;margin-bottom:8px",
      p.service + ": " + p.what));
    box.appendChild(el("div", "white-space:pre-wrap", p.reason));
    if (p.lines && p.lines.length) {
      box.appendChild(el("pre", "white-space:pre-wrap;margin:12px 0;color:#d4d4d8;" +
        "background:#09090b;padding:12px;border-radius:4px", p.lines.join("\n")));
    }
    box.appendChild(el("div", "color:#a1a1aa;margin-top:8px",
      "pmesh-dev: this page reloads once a build is live again."));
    (document.body || document.documentElement).appendChild(box);
    overlay = box;
  }
  var events = new EventSource("/.pmesh/events");
  events.onmessage = function (e) {
    var state;
    try { state = JSON.parse(e.data); } catch (_) { return; }
    if (state.live !== token) {
      events.close();
      location.reload();
      return;
    }
    if (state.problem) show(state.problem); else hide();
  };
})();</script>"#;

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn nav(method: &str, headers: &[(&str, &str)]) -> bool {
        navigation(
            method.as_bytes(),
            headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        )
    }

    #[test]
    fn navigations_are_document_gets() {
        let chrome = [
            ("Accept", "text/html,application/xhtml+xml,*/*;q=0.8"),
            ("Sec-Fetch-Dest", "document"),
        ];
        assert!(nav("GET", &chrome));
        assert!(!nav("POST", &chrome));
        assert!(
            nav("GET", &[("accept", "text/html")]),
            "curl -H, no fetch metadata"
        );
        assert!(!nav("GET", &[("accept", "*/*")]));
        assert!(!nav("GET", &[]));
        // fetch() or htmx asking for an HTML fragment.
        assert!(!nav(
            "GET",
            &[("Accept", "text/html"), ("Sec-Fetch-Dest", "empty")]
        ));
        assert!(!nav(
            "GET",
            &[("Accept", "text/html"), ("Range", "bytes=0-9")]
        ));
    }

    #[test]
    fn only_plain_html_is_rewritten() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(*n, HeaderValue::from_static(v));
            }
            h
        };
        let html = with(&[("content-type", "text/html; charset=utf-8")]);
        assert!(rewritable(200, &html));
        assert!(rewritable(404, &html));
        assert!(!rewritable(206, &html));
        assert!(!rewritable(304, &html));
        assert!(!rewritable(204, &html));
        assert!(!rewritable(200, &with(&[("content-type", "text/plain")])));
        assert!(!rewritable(200, &with(&[("content-type", "text/htmlx")])));
        assert!(!rewritable(200, &HeaderMap::new()));
        let gz = with(&[("content-type", "text/html"), ("content-encoding", "gzip")]);
        assert!(!rewritable(200, &gz));
        let id = with(&[
            ("content-type", "TEXT/HTML"),
            ("content-encoding", "identity"),
        ]);
        assert!(rewritable(200, &id));
        let range = with(&[
            ("content-type", "text/html"),
            ("content-range", "bytes 0-1/2"),
        ]);
        assert!(!rewritable(200, &range));
    }

    #[test]
    fn the_script_goes_before_the_last_body_end_or_at_the_end() {
        assert_eq!(
            inject(b"<p>a</p></BODY></html>", "S"),
            b"<p>a</p>S</BODY></html>"
        );
        assert_eq!(inject(b"<p>a</p>", "S"), b"<p>a</p>S");
        assert_eq!(
            inject(b"x</body>y</body>", "S"),
            b"x</body>yS</body>",
            "the last one: an earlier one may sit in a script or a comment"
        );
    }

    #[test]
    fn the_script_carries_its_token() {
        let s = script("1a-3");
        assert!(s.contains("var token = \"1a-3\";"));
        assert!(s.contains(EVENTS_PATH));
        assert!(!s.contains("innerHTML"));
    }
}
