//! The forwarding policy, written once and used by both HTTP paths: which requests are refused,
//! which headers are left out and which are added, when a failed request is sent again, how long
//! an upstream connection is kept, and what a client is told when forwarding fails.
//!
//! The fast path works on `httparse` heads and the hyper path on `HeaderMap`s; both ask here
//! (by header name, as bytes) and only the mechanics of each stay with them.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// How long an idle upstream connection may be reused: shorter than any common dev server's
/// keep-alive timeout, so we never pick a connection the backend is about to close.
pub(super) const UPSTREAM_IDLE: Duration = Duration::from_secs(1);
/// Bound on connecting to an instance (loopback: a refusal is immediate, this is a backstop).
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the proxy waits on a client. Only time spent waiting for the client counts: a slow
/// instance (a long poll, a slow build step behind a request) never times a client out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From the first byte of a request head to its end (slowloris).
    pub head: Duration,
    /// With a request body not all read: the longest wait for its next bytes.
    pub body_stall: Duration,
    /// A kept-alive connection with no request in progress.
    pub idle: Duration,
}

impl Default for Timeouts {
    /// nginx's order of magnitude: 30 s for a head, 30 s of silence in a body, 60 s idle.
    fn default() -> Timeouts {
        Timeouts {
            head: Duration::from_secs(30),
            body_stall: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }
}

/// What a header is to the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Special {
    /// It describes one hop rather than the message: both sides of the proxy are separate
    /// connections with their own framing and keep-alive. `Transfer-Encoding` is one: each
    /// side frames its own message.
    HopByHop,
    /// `Connection` may name it, but it is never removed on that ground: it frames the
    /// message or says where it goes. Removing `Content-Length` while its body is still sent
    /// would make the body a second request (smuggling).
    Kept,
    /// The client's own forwarding header, replaced by the proxy's (`X-Forwarded-For` is
    /// appended to instead).
    Replaced,
}

/// What the header `name` is to the policy, if anything; looked up by length and first letter
/// first, since almost every header of a message is none of these (this runs for each one).
fn special(name: &[u8]) -> Option<Special> {
    use Special::{HopByHop, Kept, Replaced};
    let first = name.first()?.to_ascii_lowercase();
    let (candidate, kind) = match (name.len(), first) {
        (2, b't') => ("te", HopByHop),
        (4, b'h') => ("host", Kept),
        (7, b't') => ("trailer", HopByHop),
        (7, b'u') => ("upgrade", HopByHop),
        (10, b'c') => ("connection", HopByHop),
        (10, b'k') => ("keep-alive", HopByHop),
        (14, b'c') => ("content-length", Kept),
        (16, b'p') => ("proxy-connection", HopByHop),
        (16, b'x') => ("x-forwarded-host", Replaced),
        (17, b't') => ("transfer-encoding", HopByHop),
        (17, b'x') => ("x-forwarded-proto", Replaced),
        _ => return None,
    };
    name.eq_ignore_ascii_case(candidate.as_bytes())
        .then_some(kind)
}

/// Whether `name` reads as a framing, routing or hop-by-hop header once `_` is taken for `-`
/// (`Content_Length`): some servers (CGI-style environments) fold the two together, so such a
/// header is never forwarded.
pub(super) fn confusable(name: &[u8]) -> bool {
    if !matches!(name.len(), 2 | 4 | 7 | 10 | 14 | 16 | 17) || !name.contains(&b'_') {
        return false;
    }
    let mut folded = [0u8; 17];
    for (f, &b) in folded.iter_mut().zip(name) {
        *f = if b == b'_' { b'-' } else { b };
    }
    special(&folded[..name.len()]).is_some()
}

/// Whether the header `name` stays out of the forwarded message: hop-by-hop, named by the
/// message's `Connection` header (its `tokens`: any but framing and `Host`), or confusable with
/// one of those.
pub(super) fn leaves_out<'a>(name: &[u8], tokens: impl Iterator<Item = &'a [u8]>) -> bool {
    leaves(name, tokens, false)
}

/// [`leaves_out`] for a request's header, and the client's own forwarding headers too (the
/// proxy writes its own).
pub(super) fn leaves_out_of_request<'a>(
    name: &[u8],
    tokens: impl Iterator<Item = &'a [u8]>,
) -> bool {
    leaves(name, tokens, true)
}

fn leaves<'a>(name: &[u8], mut tokens: impl Iterator<Item = &'a [u8]>, replace: bool) -> bool {
    match special(name) {
        Some(Special::HopByHop) => true,
        Some(Special::Kept) => false,
        Some(Special::Replaced) if replace => true,
        _ => confusable(name) || tokens.any(|t| t.eq_ignore_ascii_case(name)),
    }
}

/// The comma-separated tokens of `Connection` header values, trimmed.
pub(super) fn tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// `X-Forwarded-For` as forwarded: the client's own values, then the client's address.
pub(super) fn forwarded_for<'a>(
    out: &mut Vec<u8>,
    previous: impl Iterator<Item = &'a [u8]>,
    peer_ip: &[u8],
) {
    for v in previous {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer_ip);
}

/// `X-Forwarded-Proto`: the proxy listens on plain HTTP only.
pub(super) const FORWARDED_PROTO: &[u8] = b"http";

/// The `Host` an HTTP/1.0 request without one is given: HTTP/1.1 to the instance requires it.
pub(super) fn default_host(addr: SocketAddr) -> String {
    addr.to_string()
}

/// Why a request is answered by the proxy instead of being forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// HTTP/1.1 without `Host` (RFC 9112 3.2).
    NoHost,
    /// More than one `Host` header.
    ManyHosts,
    /// A `Host` that is not `host[:port]` (a list, spaces, an empty value, ...).
    BadHost,
    /// `CONNECT`: a dev proxy tunnels nothing.
    Connect,
}

impl Refusal {
    pub(super) fn status(self) -> u16 {
        match self {
            Refusal::Connect => 405,
            _ => 400,
        }
    }

    pub(super) fn words(self) -> &'static str {
        match self {
            Refusal::NoHost => "The request has no Host header, which HTTP/1.1 requires.",
            Refusal::ManyHosts => "The request has more than one Host header.",
            Refusal::BadHost => {
                "The request's Host header is not a host name with an optional port."
            }
            Refusal::Connect => "This proxy does not tunnel CONNECT requests.",
        }
    }
}

/// Checks a request's method and `Host` headers; the `Host` to forward (`None` for HTTP/1.0
/// without one).
pub(super) fn check_request<'a>(
    method: &[u8],
    http11: bool,
    mut hosts: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<&'a [u8]>, Refusal> {
    if method.eq_ignore_ascii_case(b"CONNECT") {
        return Err(Refusal::Connect);
    }
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::ManyHosts);
    }
    match host {
        None if http11 => Err(Refusal::NoHost),
        None => Ok(None),
        Some(h) if valid_host(h) => Ok(Some(h)),
        Some(_) => Err(Refusal::BadHost),
    }
}

/// The bytes of a `reg-name` (RFC 3986: unreserved, `%` of pct-encoded, sub-delims) but the
/// comma: a list of hosts is not a host.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// Whether `v` is `uri-host [":" port]` (RFC 3986), with no comma: a list of hosts is not a
/// host.
pub(super) fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = v.strip_prefix(b"[") {
        // An IP literal.
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let inner = &rest[..end];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        (&b"x"[..], &rest[end + 1..])
    } else {
        match v.iter().position(|&b| b == b':') {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, &b""[..]),
        }
    };
    let reg_name = |b: &u8| REG_NAME[usize::from(*b)];
    let port_ok = match port.strip_prefix(b":") {
        Some(digits) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        None => port.is_empty(),
    };
    !host.is_empty() && host.iter().all(reg_name) && port_ok
}

/// Whether sending `method` twice has the effect of sending it once (RFC 9110 9.2.2).
pub(super) fn idempotent(method: &[u8]) -> bool {
    [
        &b"GET"[..],
        b"HEAD",
        b"OPTIONS",
        b"TRACE",
        b"PUT",
        b"DELETE",
    ]
    .contains(&method)
}

/// What is known of an attempt that got no response.
#[derive(Clone, Copy, Debug)]
pub(super) struct Attempt {
    /// It went on a kept connection (which the instance may have closed meanwhile).
    pub reused: bool,
    /// Nothing at all came back on it.
    pub silent: bool,
    /// The whole request is still at hand to send again.
    pub replayable: bool,
    /// None of it was written, as far as the proxy can tell.
    pub unsent: bool,
    /// Its method is idempotent.
    pub idempotent: bool,
}

/// The retry rule: once, on a fresh connection, when a kept connection turned out to be closed
/// (an instance closing an idle connection just as a request goes out) with no answer at all,
/// the whole request is at hand, and it cannot have been acted on twice: either none of it was
/// written, or its method is idempotent.
pub(super) fn retry(a: Attempt) -> bool {
    a.reused && a.silent && a.replayable && (a.unsent || a.idempotent)
}

/// Whether an upstream connection idle since `since` may still be used.
pub(super) fn fresh(since: tokio::time::Instant) -> bool {
    since.elapsed() < UPSTREAM_IDLE
}

/// Why a request could not be forwarded to its instance. The client's page says it in words
/// ([`Failure::words`]); the details (address, OS error) go to the log.
#[derive(Debug)]
pub(super) enum Failure {
    Connect(std::io::Error),
    ConnectTimeout,
    /// The connection ended before a response (or its head) came.
    Closed,
    /// The instance closed while the request body was being sent.
    ClosedDuringBody,
    /// What came back is not an HTTP/1.x response the proxy can pass on.
    BadResponse(String),
    /// A `101 Switching Protocols` to a request that did not ask for it.
    UnaskedUpgrade,
    /// Anything else hyper reports.
    Http(hyper::Error),
}

impl Failure {
    /// One sentence for the client's page.
    pub(super) fn words(&self) -> &'static str {
        match self {
            Failure::Connect(_) => {
                "The instance refused the connection: it has stopped, or it is not listening on \
                 its port."
            }
            Failure::ConnectTimeout => "The instance did not accept the connection in time.",
            Failure::Closed => "The instance closed the connection without answering.",
            Failure::ClosedDuringBody => {
                "The instance closed the connection while the request body was being sent."
            }
            Failure::BadResponse(_) => {
                "The instance answered with something that is not valid HTTP."
            }
            Failure::UnaskedUpgrade => {
                "The instance switched protocols on a request that did not ask to."
            }
            Failure::Http(e) if e.is_incomplete_message() || e.is_canceled() || e.is_closed() => {
                "The instance closed the connection without answering."
            }
            Failure::Http(e) if e.is_parse() => {
                "The instance answered with something that is not valid HTTP."
            }
            Failure::Http(_) => "The connection to the instance failed.",
        }
    }

    /// Whether the client connection goes on after the 502: when the instance said nothing,
    /// the exchange is cleanly over; after half a body or a response that could not be read,
    /// nothing on either connection can be trusted to be where a message starts.
    pub(super) fn keeps_client(&self) -> bool {
        self.silent()
    }

    /// Whether nothing at all came back (see [`Attempt::silent`]).
    pub(super) fn silent(&self) -> bool {
        match self {
            Failure::Closed | Failure::Connect(_) | Failure::ConnectTimeout => true,
            // hyper says so when the connection ended before any of a response.
            Failure::Http(e) => e.is_incomplete_message() || e.is_canceled() || e.is_closed(),
            _ => false,
        }
    }
}

impl fmt::Display for Failure {
    /// The details, for the log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::ConnectTimeout => write!(
                f,
                "cannot connect: no answer within {}",
                humantime::format_duration(CONNECT_TIMEOUT)
            ),
            Failure::Closed => f.write_str("the connection closed before a response"),
            Failure::ClosedDuringBody => {
                f.write_str("the connection closed during the request body")
            }
            Failure::BadResponse(why) => write!(f, "invalid response: {why}"),
            Failure::UnaskedUpgrade => f.write_str("101 Switching Protocols, not asked for"),
            Failure::Http(e) => f.write_str(&error_chain(e)),
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_and_host_survive_being_named_in_connection() {
        let named = || tokens([&b"keep-alive, Content-Length, host, x-a"[..]].into_iter());
        assert!(!leaves_out(b"content-length", named()));
        assert!(!leaves_out(b"Host", named()));
        assert!(leaves_out(b"x-a", named()));
        assert!(leaves_out(b"keep-alive", named()));
        assert!(leaves_out(b"transfer-encoding", named()));
        assert!(!leaves_out(b"x-b", named()));
    }

    #[test]
    fn what_each_header_is_to_the_policy() {
        use Special::{HopByHop, Kept, Replaced};
        for (name, kind) in [
            ("Connection", Some(HopByHop)),
            ("keep-alive", Some(HopByHop)),
            ("Proxy-Connection", Some(HopByHop)),
            ("TE", Some(HopByHop)),
            ("trailer", Some(HopByHop)),
            ("Transfer-Encoding", Some(HopByHop)),
            ("upgrade", Some(HopByHop)),
            ("Content-Length", Some(Kept)),
            ("HOST", Some(Kept)),
            ("x-forwarded-proto", Some(Replaced)),
            ("X-Forwarded-Host", Some(Replaced)),
            ("x-forwarded-for", None),
            ("user-agent", None),
            ("content-type", None),
        ] {
            assert_eq!(special(name.as_bytes()), kind, "{name}");
        }
        assert!(leaves_out_of_request(
            b"x-forwarded-host",
            std::iter::empty()
        ));
        assert!(!leaves_out(b"x-forwarded-host", std::iter::empty()));
    }

    #[test]
    fn underscored_look_alikes_of_framing_headers_are_left_out() {
        for name in [
            &b"Transfer_Encoding"[..],
            b"content_length",
            b"HOST",
            b"x_forwarded_host",
        ] {
            assert!(
                leaves_out(name, std::iter::empty()) || name == b"HOST",
                "{name:?}"
            );
        }
        assert!(!leaves_out(b"x_custom_thing", std::iter::empty()));
    }

    #[test]
    fn host_rules() {
        fn check<'a>(hosts: &[&'a [u8]], http11: bool) -> Result<Option<&'a [u8]>, Refusal> {
            check_request(b"GET", http11, hosts.iter().copied())
        }
        assert_eq!(
            check(&[b"example.test:8080"], true),
            Ok(Some(&b"example.test:8080"[..]))
        );
        assert_eq!(check(&[b"[::1]:80"], true), Ok(Some(&b"[::1]:80"[..])));
        assert_eq!(check(&[], true), Err(Refusal::NoHost));
        assert_eq!(check(&[], false), Ok(None));
        assert_eq!(check(&[b"a", b"a"], true), Err(Refusal::ManyHosts));
        for bad in [
            &b"a,b"[..],
            b"",
            b"a b",
            b"a:80x",
            b"[::1",
            b"a/b",
            b"a@b",
            b"a:123456",
        ] {
            assert_eq!(check(&[bad], true), Err(Refusal::BadHost), "{bad:?}");
        }
        assert_eq!(
            check_request(b"CONNECT", true, [&b"a:443"[..]].into_iter()),
            Err(Refusal::Connect)
        );
    }

    #[test]
    fn the_retry_rule() {
        let a = Attempt {
            reused: true,
            silent: true,
            replayable: true,
            unsent: false,
            idempotent: true,
        };
        assert!(retry(a));
        assert!(!retry(Attempt { reused: false, ..a }));
        assert!(!retry(Attempt { silent: false, ..a }));
        assert!(!retry(Attempt {
            replayable: false,
            ..a
        }));
        assert!(!retry(Attempt {
            idempotent: false,
            ..a
        }));
        assert!(retry(Attempt {
            idempotent: false,
            unsent: true,
            ..a
        }));
    }
}
