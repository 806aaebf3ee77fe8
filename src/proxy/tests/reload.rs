//! The reload script and the event stream at the byte level: what a navigation gets, what passes
//! untouched, and what `/.pmesh/events` says as the deployer's notices change.

use super::*;
use crate::proxy::inject::MAX_HTML;

const NAVIGATE: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\nSec-Fetch-Dest: document\r\nConnection: close\r\n\r\n";

/// A switch live on `backend`, with notices, the upstream numbered as build `id` would be.
fn reloading(backend: SocketAddr, id: &str) -> (Switch, Notices, Arc<Upstream>) {
    let notices = Notices::new("web");
    let upstream = Upstream::new(backend);
    let switch = Switch::new(Target::Live(upstream.clone())).with_notices(notices.clone());
    notices.live(&upstream, id);
    (switch, notices, upstream)
}

/// The body of a whole response (`Connection: close`), de-chunked.
fn body_of(response: &str) -> Vec<u8> {
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.as_bytes().to_vec();
    }
    dechunk(body.as_bytes())
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol]).expect("size");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

#[tokio::test]
async fn a_page_too_large_to_hold_passes_untouched() {
    within(async {
        // Chunked, no length, larger than what is held: the proxy cannot know its end in time.
        let b = raw_backend(|_, _| {
            let mut out =
                b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ntransfer-encoding: chunked\r\n\r\n"
                    .to_vec();
            let chunk = vec![b'a'; 64 << 10];
            for _ in 0..(MAX_HTML / chunk.len() + 2) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(&chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"6\r\n</body\r\n0\r\n\r\n");
            (out, true)
        })
        .await;
        let (switch, _notices, _up) = reloading(b.addr, "a");
        let p = start_proxy(&switch).await;
        let got = raw_exchange(p.addr, NAVIGATE, None).await;
        let body = body_of(&got);
        let expected = MAX_HTML / (64 << 10) * (64 << 10) + 2 * (64 << 10) + 6;
        assert_eq!(body.len(), expected);
        assert!(body.ends_with(b"</body"));
        assert!(!String::from_utf8_lossy(&body).contains("<script"));
        p.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_events_say_what_is_live_then_a_problem_then_the_next_build() {
    within(async {
        let b = backend("one").await;
        let (switch, notices, _up) = reloading(b.addr, "a");
        let token_1 = notices.token(1);
        let p = start_proxy(&switch).await;
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET /.pmesh/events HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = String::new();
        let read_until = async |s: &mut TcpStream, what: &str, got: &mut String| {
            let mut chunk = [0u8; 4096];
            while !got.contains(what) {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the stream ended: {got}");
                got.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        };
        let first = format!("{{\"live\":\"{token_1}\",\"problem\":null}}");
        read_until(&mut s, &first, &mut got).await;
        assert!(got.contains("content-type: text/event-stream"), "{got}");
        notices.problem(
            "the build failed",
            "step 1 failed; its last lines:\n    <oops>",
        );
        read_until(&mut s, "\"lines\":[\"<oops>\"]", &mut got).await;
        assert!(got.contains("\"what\":\"the build failed\""), "{got}");
        assert!(got.contains("\"reason\":\"step 1 failed\""), "{got}");
        let next = Upstream::new(b.addr);
        switch.set(Target::Live(next.clone()));
        notices.live(&next, "b");
        let second = format!("{{\"live\":\"{}\",\"problem\":null}}", notices.token(2));
        read_until(&mut s, &second, &mut got).await;
        // Stopping the proxy ends the stream, at once rather than after the grace period.
        let stopped = Instant::now();
        p.stop().await;
        assert!(
            stopped.elapsed() < Duration::from_secs(1),
            "{:?}",
            stopped.elapsed()
        );
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_proxys_own_pages_reload_too_and_other_requests_get_no_script() {
    within(async {
        let notices = Notices::new("web");
        let switch = Switch::new(Target::Starting {
            wait: Duration::from_millis(10),
        })
        .with_notices(notices.clone());
        let p = start_proxy(&switch).await;
        let page = raw_exchange(p.addr, NAVIGATE, None).await;
        assert!(page.starts_with("HTTP/1.1 503"), "{page}");
        assert!(
            page.contains(&format!("var token = \"{}\"", notices.token(0))),
            "{page}"
        );
        let plain = raw_exchange(
            p.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            None,
        )
        .await;
        assert!(
            plain.starts_with("HTTP/1.1 503") && !plain.contains("<script"),
            "{plain}"
        );
        let other = raw_exchange(
            p.addr,
            b"GET /.pmesh/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            None,
        )
        .await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        p.stop().await;
    })
    .await;
}
