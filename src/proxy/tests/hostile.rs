//! Hostile and broken HTTP, at the byte level: raw sockets on both sides, what the client sent,
//! what the instance received, what the client got; on the fast path and on the hyper path.

use super::*;
use crate::proxy::chunked::Chunked;

/// Which of the proxy's two HTTP paths an exchange goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Fast,
    Hyper,
}

const PATHS: [Path; 2] = [Path::Fast, Path::Hyper];

/// Sent first on the hyper path: a chunked request, which the fast path hands over, and hyper
/// serves the rest of the connection.
const PRELUDE: &[u8] =
    b"POST /prelude HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";

/// A request as an instance received it: the head's bytes and the body's (after de-chunking
/// nothing: the body bytes as they came, chunked or not).
#[derive(Clone, Debug)]
struct Received {
    head: String,
    body: Vec<u8>,
}

impl Received {
    fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }

    /// The values of header `name` (lowercase) in the head.
    fn header(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

type Reply = fn(&Received) -> (Vec<u8>, bool);

/// An instance that parses requests as a strict HTTP/1.1 server does (Content-Length or
/// chunked bodies), records each one, and answers it with `reply` (raw bytes; and whether to
/// close after). The prelude is answered `ok` and not recorded.
async fn instance(reply: Reply) -> (Server, Arc<Mutex<Vec<Received>>>) {
    let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
    let log = seen.clone();
    let server = accept_each(move |mut stream| {
        let log = log.clone();
        async move {
            let mut buf = Vec::new();
            loop {
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    if !read_some(&mut stream, &mut buf).await {
                        return;
                    }
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
                buf.drain(..end + 4);
                let mut req = Received {
                    head,
                    body: Vec::new(),
                };
                let chunked = req
                    .header("transfer-encoding")
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case("chunked"));
                if chunked {
                    let mut c = Chunked::default();
                    loop {
                        let n = c.take(&buf).unwrap_or(buf.len());
                        req.body.extend(buf.drain(..n));
                        if c.done() {
                            break;
                        }
                        if !read_some(&mut stream, &mut buf).await {
                            return;
                        }
                    }
                } else if let Some(len) = req.header("content-length").first() {
                    let len: usize = len.parse().unwrap_or(0);
                    while buf.len() < len {
                        if !read_some(&mut stream, &mut buf).await {
                            return;
                        }
                    }
                    req.body = buf.drain(..len).collect();
                }
                let (bytes, close) = if req.path() == "/prelude" {
                    (
                        b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nprelude".to_vec(),
                        false,
                    )
                } else {
                    log.lock().unwrap().push(req.clone());
                    reply(&req)
                };
                if stream.write_all(&bytes).await.is_err() || close {
                    return;
                }
            }
        }
    })
    .await;
    (server, seen)
}

async fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// `ok <path>` with its length.
fn ok(req: &Received) -> (Vec<u8>, bool) {
    let body = format!("ok {}", req.path());
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    (reply.into_bytes(), false)
}

/// A proxy with `timeouts` in front of `addr`.
async fn proxy_with(addr: SocketAddr, timeouts: Timeouts) -> Server {
    let switch = Switch::new(Target::Live(Upstream::new(addr)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve_http_with(
        listener,
        "web".to_string(),
        switch,
        stop.clone(),
        timeouts,
    ));
    Server {
        addr: proxy_addr,
        stop,
        task,
    }
}

/// Sends `bytes` on `path` (after the prelude on the hyper path) and reads until the proxy
/// closes; what the client got, without the prelude's response.
async fn exchange(proxy: SocketAddr, path: Path, bytes: &[u8]) -> String {
    let mut sent = Vec::new();
    if path == Path::Hyper {
        sent.extend_from_slice(PRELUDE);
    }
    sent.extend_from_slice(bytes);
    let got = timeout(Duration::from_secs(10), raw_exchange(proxy, &sent, None))
        .await
        .expect("the proxy did not close the connection");
    match path {
        Path::Fast => got,
        Path::Hyper => {
            let end = got.find("\r\n\r\nprelude").expect("no prelude response") + 11;
            got[end..].to_owned()
        }
    }
}

/// The proxy in front of an instance answering with `reply`; runs `check` on each path.
async fn each_path<F, Fut>(reply: Reply, check: F)
where
    F: Fn(Path, SocketAddr, Arc<Mutex<Vec<Received>>>) -> Fut,
    Fut: Future<Output = ()>,
{
    for path in PATHS {
        let (b, seen) = instance(reply).await;
        let proxy = proxy_with(b.addr, Timeouts::default()).await;
        check(path, proxy.addr, seen).await;
        proxy.stop().await;
        b.stop().await;
    }
}

fn paths_of(seen: &Mutex<Vec<Received>>) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|r| r.path().to_owned())
        .collect()
}

#[tokio::test]
async fn a_connection_named_content_length_never_unframes_a_body() {
    within(async {
        let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\nX-Prefix: ";
        for connection in ["content-length", "keep-alive, Content-Length"] {
            each_path(ok, |path, proxy, seen| async move {
                let req = format!(
                    "POST /a HTTP/1.1\r\nHost: x\r\nConnection: {connection}\r\n\
                     Content-Length: {}\r\n\r\n{smuggled}\
                     GET /b HTTP/1.1\r\nHost: x\r\nCookie: secret\r\nconnection: close\r\n\r\n",
                    smuggled.len()
                );
                let got = exchange(proxy, path, req.as_bytes()).await;
                // The instance saw two requests, /a with its length and its body, then /b.
                assert_eq!(
                    paths_of(&seen),
                    ["/a", "/b"],
                    "{path:?} {connection}: {got}"
                );
                let a = seen.lock().unwrap()[0].clone();
                assert_eq!(a.header("content-length"), [smuggled.len().to_string()]);
                assert_eq!(a.body, smuggled.as_bytes(), "{path:?}");
                assert_eq!(a.header("x-forwarded-for"), ["127.0.0.1"], "{path:?}");
                // The client got the answer to each of its requests, in order.
                assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 2, "{path:?}: {got}");
                let (first, second) = (got.find("ok /a").unwrap(), got.find("ok /b").unwrap());
                assert!(first < second, "{got}");
            })
            .await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_connection_named_host_keeps_the_host() {
    within(async {
        each_path(ok, |path, proxy, seen| async move {
            let req = b"GET /h HTTP/1.1\r\nHost: app.test\r\nConnection: host, close\r\n\r\n";
            let got = exchange(proxy, path, req).await;
            assert!(got.contains("ok /h"), "{got}");
            let r = seen.lock().unwrap()[0].clone();
            assert_eq!(r.header("host"), ["app.test"], "{path:?}: {}", r.head);
            assert_eq!(r.header("x-forwarded-host"), ["app.test"], "{path:?}");
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn underscored_framing_look_alikes_never_reach_the_instance() {
    within(async {
        each_path(ok, |path, proxy, seen| async move {
            let req = b"GET /u HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\n\
                        Content_Length: 5\r\nX_Forwarded_Host: evil\r\nx_custom: kept\r\n\
                        connection: close\r\n\r\n";
            let got = exchange(proxy, path, req).await;
            assert!(got.contains("ok /u"), "{got}");
            let r = seen.lock().unwrap()[0].clone();
            let head = r.head.to_ascii_lowercase();
            for gone in ["transfer_encoding", "content_length", "x_forwarded_host"] {
                assert!(!head.contains(gone), "{path:?}: {gone} in {}", r.head);
            }
            assert_eq!(r.header("x_custom"), ["kept"], "{path:?}");
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn bad_hosts_are_answered_400_and_forward_nothing() {
    within(async {
        let cases: [&[u8]; 5] = [
            b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.test, b.test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a test\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \r\n\r\n",
            b"GET / HTTP/1.1\r\nX-No-Host: 1\r\n\r\n",
        ];
        for req in cases {
            each_path(ok, |path, proxy, seen| async move {
                let got = exchange(proxy, path, req).await;
                let shown = String::from_utf8_lossy(req);
                assert!(got.starts_with("HTTP/1.1 400 "), "{path:?} {shown}: {got}");
                assert!(got.contains("Host header"), "{got}");
                assert!(seen.lock().unwrap().is_empty(), "{path:?} {shown}");
            })
            .await;
        }
    })
    .await;
}

#[tokio::test]
async fn http_1_0_without_host_gets_one_and_no_client_forwarded_host() {
    within(async {
        let (b, seen) = instance(ok).await;
        let proxy = proxy_with(b.addr, Timeouts::default()).await;
        let req =
            b"GET /old HTTP/1.0\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Proto: gopher\r\n\r\n";
        let got = exchange(proxy.addr, Path::Fast, req).await;
        assert!(got.contains("ok /old"), "{got}");
        let r = seen.lock().unwrap()[0].clone();
        assert_eq!(r.header("host"), [b.addr.to_string()], "{}", r.head);
        assert!(r.header("x-forwarded-host").is_empty(), "{}", r.head);
        assert_eq!(r.header("x-forwarded-proto"), ["http"], "{}", r.head);
        proxy.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn connect_is_answered_405_and_forwards_nothing() {
    within(async {
        each_path(ok, |path, proxy, seen| async move {
            let req = b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n";
            let got = exchange(proxy, path, req).await;
            assert!(got.starts_with("HTTP/1.1 405 "), "{path:?}: {got}");
            assert!(got.contains("CONNECT"), "{got}");
            assert!(seen.lock().unwrap().is_empty(), "{path:?}");
        })
        .await;
    })
    .await;
}

/// The instance's answer for `/<case>`: misbehaving framing of several kinds.
fn misframed(req: &Received) -> (Vec<u8>, bool) {
    let reply: &[u8] = match req.path() {
        // Its length named in Connection: still the length.
        "/named" => b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
        // A length beside a coding that is not chunked: the body ends with the connection.
        "/identity" => {
            return (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: identity\r\n\r\nuntil the end"
                    .to_vec(),
                true,
            );
        }
        // A length beside chunked: chunked wins, all 50 bytes arrive.
        "/both" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n32\r\n01234567890123456789012345678901234567890123456789\r\n0\r\n\r\n",
        "/garbage" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext",
    };
    (reply.to_vec(), false)
}

/// The body of the one response in `got` (a head, then the rest), and its head.
fn split_response(got: &str) -> (&str, &str) {
    got.split_once("\r\n\r\n").unwrap_or((got, ""))
}

#[tokio::test]
async fn a_length_named_in_a_responses_connection_header_still_frames_it() {
    within(async {
        each_path(misframed, |path, proxy, _| async move {
            let req = b"GET /named HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n";
            let got = exchange(proxy, path, req).await;
            let (head, rest) = split_response(&got);
            assert!(head.to_ascii_lowercase().contains("content-length: 5"), "{path:?}: {got}");
            // The connection goes on: the next response follows the 5 bytes.
            assert!(rest.starts_with("helloHTTP/1.1 200 OK\r\n"), "{path:?}: {got}");
            assert!(rest.ends_with("\r\n\r\nnext"), "{path:?}: {got}");
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_length_beside_a_non_chunked_coding_is_dropped_and_the_client_closed() {
    within(async {
        each_path(misframed, |path, proxy, _| async move {
            // Pipelined: the client must not read "until the end" as 3 bytes and a response.
            let req = b"GET /identity HTTP/1.1\r\nHost: x\r\n\r\n\
                        GET /next HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n";
            let got = exchange(proxy, path, req).await;
            let (head, body) = split_response(&got);
            let lower = head.to_ascii_lowercase();
            assert!(!lower.contains("content-length: 3"), "{path:?}: {got}");
            if lower.contains("transfer-encoding: chunked") {
                // hyper re-frames it: all of it in chunks, then the next response.
                let mut c = Chunked::default();
                let n = c.take(body.as_bytes()).unwrap();
                assert!(c.done(), "{path:?}: {got}");
                assert!(body[..n].contains("until the end"), "{got}");
                assert!(body[n..].starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
                assert!(body[n..].ends_with("\r\n\r\nnext"), "{got}");
            } else {
                assert!(lower.contains("connection: close"), "{path:?}: {got}");
                assert_eq!(body, "until the end", "{path:?}");
            }
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_length_beside_chunked_never_cuts_the_body() {
    within(async {
        each_path(misframed, |path, proxy, _| async move {
            let req = b"GET /both HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n";
            let got = exchange(proxy, path, req).await;
            let (head, body) = split_response(&got);
            assert!(
                !head.to_ascii_lowercase().contains("content-length: 3"),
                "{path:?}: {got}"
            );
            assert!(
                head.to_ascii_lowercase()
                    .contains("transfer-encoding: chunked"),
                "{got}"
            );
            let mut c = Chunked::default();
            assert_eq!(
                c.take(body.as_bytes()).unwrap(),
                body.len(),
                "{path:?}: {got}"
            );
            assert!(c.done(), "{path:?}: {got}");
            assert!(
                body.contains("01234567890123456789012345678901234567890123456789"),
                "{got}"
            );
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn an_unreadable_response_is_a_502_in_words_and_a_close() {
    within(async {
        each_path(misframed, |path, proxy, _| async move {
            let req = b"GET /garbage HTTP/1.1\r\nHost: x\r\n\r\n";
            // `exchange` waits for the proxy to close.
            let got = exchange(proxy, path, req).await;
            assert!(got.starts_with("HTTP/1.1 502 "), "{path:?}: {got}");
            assert!(got.contains("not valid HTTP"), "{path:?}: {got}");
            assert!(!got.contains("hello"), "{got}");
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn the_retry_rule_is_the_same_on_both_paths() {
    within(async {
        for path in PATHS {
            // A GET on a kept connection that the instance closes without answering is sent
            // again on a new one; a POST is not.
            let (b, seen) = instance(|req| {
                if req.header("x-try").first().map(String::as_str) == Some("close") {
                    (Vec::new(), true)
                } else {
                    ok(req)
                }
            })
            .await;
            let proxy = proxy_with(b.addr, Timeouts::default()).await;
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            let mut first = Vec::new();
            if path == Path::Hyper {
                first.extend_from_slice(PRELUDE);
            }
            first.extend_from_slice(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n");
            s.write_all(&first).await.unwrap();
            let mut got = String::new();
            let mut chunk = [0u8; 4096];
            while !got.contains("ok /1") {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "{got}");
                got.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
            // The instance closes the connection on this one; the retry (same bytes, new
            // connection) closes it again: the client gets a 502, after exactly two tries.
            s.write_all(b"GET /2 HTTP/1.1\r\nHost: x\r\nx-try: close\r\n\r\n")
                .await
                .unwrap();
            let n = s.read(&mut chunk).await.unwrap();
            let answer = String::from_utf8_lossy(&chunk[..n]).into_owned();
            assert!(answer.starts_with("HTTP/1.1 502 "), "{path:?}: {answer}");
            assert_eq!(paths_of(&seen), ["/1", "/2", "/2"], "{path:?}");
            proxy.stop().await;
            b.stop().await;

            let (b, seen) = instance(|req| {
                if req.header("x-try").first().map(String::as_str) == Some("close") {
                    (Vec::new(), true)
                } else {
                    ok(req)
                }
            })
            .await;
            let proxy = proxy_with(b.addr, Timeouts::default()).await;
            let mut req = Vec::new();
            if path == Path::Hyper {
                req.extend_from_slice(PRELUDE);
            }
            req.extend_from_slice(
                b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n\
                  POST /3 HTTP/1.1\r\nHost: x\r\nx-try: close\r\ncontent-length: 0\r\n\r\n",
            );
            let got = timeout(
                Duration::from_secs(10),
                raw_exchange(proxy.addr, &req, Some("502")),
            )
            .await
            .unwrap();
            assert!(got.contains("HTTP/1.1 502 "), "{path:?}: {got}");
            // Sent once.
            assert_eq!(paths_of(&seen), ["/1", "/3"], "{path:?}");
            proxy.stop().await;
            b.stop().await;
        }
    })
    .await;
}

/// Short timeouts for the tests.
const SHORT: Timeouts = Timeouts {
    head: Duration::from_millis(300),
    body_stall: Duration::from_millis(300),
    idle: Duration::from_millis(1500),
};

/// Sends `bytes`, then waits for the proxy to close; what came back, and how long that took.
async fn closed_after(proxy: SocketAddr, bytes: &[u8]) -> (String, Duration) {
    let started = Instant::now();
    let got = timeout(Duration::from_secs(10), raw_exchange(proxy, bytes, None))
        .await
        .expect("the connection was never timed out");
    (got, started.elapsed())
}

#[tokio::test]
async fn idle_connections_time_out() {
    within(async {
        let (b, _) = instance(ok).await;
        let proxy = proxy_with(b.addr, SHORT).await;
        // Nothing at all.
        let (got, took) = closed_after(proxy.addr, b"").await;
        assert!(got.is_empty(), "{got}");
        assert!(took >= SHORT.idle && took < SHORT.idle * 4, "{took:?}");
        // Kept alive after a request, on each path.
        for path in PATHS {
            let mut req = Vec::new();
            if path == Path::Hyper {
                req.extend_from_slice(PRELUDE);
            }
            req.extend_from_slice(b"GET /k HTTP/1.1\r\nHost: x\r\n\r\n");
            let (got, took) = closed_after(proxy.addr, &req).await;
            assert!(got.contains("ok /k"), "{path:?}: {got}");
            assert!(
                took >= SHORT.idle && took < SHORT.idle * 4,
                "{path:?}: {took:?}"
            );
        }
        proxy.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_head_that_does_not_end_times_out() {
    within(async {
        let (b, seen) = instance(ok).await;
        let proxy = proxy_with(b.addr, SHORT).await;
        for path in PATHS {
            let mut req = Vec::new();
            if path == Path::Hyper {
                req.extend_from_slice(PRELUDE);
            }
            // After the prelude's answer: a head pipelined behind a request, already read
            // with it, gets the idle time (hyper holds it, unseen), which bounds it too.
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            if path == Path::Hyper {
                s.write_all(&req).await.unwrap();
                let mut got = Vec::new();
                while !got.ends_with(b"prelude") {
                    assert!(read_some(&mut s, &mut got).await);
                }
            }
            let started = Instant::now();
            s.write_all(b"GET /slowloris HTTP/1.1\r\nHost: x\r\nX-A: ")
                .await
                .unwrap();
            let mut got = Vec::new();
            while read_some(&mut s, &mut got).await {}
            let took = started.elapsed();
            let got = String::from_utf8_lossy(&got).into_owned();
            assert!(
                took >= SHORT.head && took < SHORT.idle,
                "{path:?}: {took:?} {got}"
            );
            if path == Path::Fast {
                assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
            }
        }
        assert!(seen.lock().unwrap().is_empty());
        proxy.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_stalled_request_body_times_out() {
    within(async {
        let (b, seen) = instance(ok).await;
        let proxy = proxy_with(b.addr, SHORT).await;
        for path in PATHS {
            let mut req = Vec::new();
            if path == Path::Hyper {
                req.extend_from_slice(PRELUDE);
            }
            req.extend_from_slice(
                b"POST /stall HTTP/1.1\r\nHost: x\r\ncontent-length: 10\r\n\r\nabc",
            );
            let (_, took) = closed_after(proxy.addr, &req).await;
            assert!(
                took >= SHORT.body_stall && took < SHORT.idle,
                "{path:?}: {took:?}"
            );
        }
        // It never got a whole request.
        assert!(seen.lock().unwrap().is_empty());
        proxy.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_slow_instance_never_times_the_client_out() {
    within(async {
        let slow = accept_each(|mut stream| async move {
            let mut buf = Vec::new();
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                if !read_some(&mut stream, &mut buf).await {
                    return;
                }
            }
            if buf.starts_with(b"POST /prelude") {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nprelude")
                    .await;
                buf.clear();
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    if !read_some(&mut stream, &mut buf).await {
                        return;
                    }
                }
            }
            // Longer than every client timeout, head, body and idle.
            sleep(SHORT.idle * 2).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate")
                .await;
        })
        .await;
        let proxy = proxy_with(slow.addr, SHORT).await;
        for path in PATHS {
            let got = exchange(
                proxy.addr,
                path,
                b"GET /slow HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n",
            )
            .await;
            assert!(
                got.starts_with("HTTP/1.1 200 OK") && got.ends_with("late"),
                "{path:?}: {got}"
            );
        }
        proxy.stop().await;
        slow.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_absolute_form_target_goes_in_origin_form_with_its_host() {
    within(async {
        let (b, seen) = instance(ok).await;
        let proxy = proxy_with(b.addr, Timeouts::default()).await;
        let req = b"GET http://app.test:3000/x?y=1 HTTP/1.1\r\nHost: other.test\r\nconnection: close\r\n\r\n";
        let got = exchange(proxy.addr, Path::Fast, req).await;
        assert!(got.contains("ok /x?y=1"), "{got}");
        let r = seen.lock().unwrap()[0].clone();
        assert!(r.head.starts_with("GET /x?y=1 HTTP/1.1\r\n"), "{}", r.head);
        assert_eq!(r.header("host"), ["app.test:3000"], "{}", r.head);
        assert_eq!(r.header("x-forwarded-host"), ["app.test:3000"], "{}", r.head);
        proxy.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_details_of_a_failure_go_to_the_log_at_most_once_a_second() {
    within(async {
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let switch = Switch::new(Target::Live(Upstream::new(addr)));
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        switch.on_failure(Arc::new(move |detail: &str| {
            let _ = tx.send(detail.to_owned());
        }));
        let proxy = start_proxy(&switch).await;
        // The fast path, then the hyper path (which HTTP/1.0 takes; no prelude can be
        // answered here), several times in a burst.
        let started = Instant::now();
        for _ in 0..3 {
            for req in [
                &b"GET / HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n"[..],
                b"GET / HTTP/1.0\r\n\r\n",
            ] {
                let got = exchange(proxy.addr, Path::Fast, req).await;
                // hyper answers an HTTP/1.0 client in its version.
                assert!(
                    got.starts_with("HTTP/1.1 502 ") || got.starts_with("HTTP/1.0 502 "),
                    "{got}"
                );
                assert!(got.contains("refused the connection"), "{got}");
            }
        }
        let burst = started.elapsed();
        let first = rx.recv().await.unwrap();
        assert!(
            first.contains(&addr.to_string()) && first.contains("cannot connect"),
            "{first}"
        );
        // Six failures: one report a second at most, the rest counted in the next one.
        let mut reports = 1;
        while rx.try_recv().is_ok() {
            reports += 1;
        }
        assert!(
            reports <= 1 + burst.as_secs() as usize,
            "{reports} reports in {burst:?}"
        );
        sleep(Duration::from_millis(1100)).await;
        exchange(
            proxy.addr,
            Path::Fast,
            b"GET / HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let next = rx.recv().await.unwrap();
        assert!(next.contains(" more since the last report)"), "{next}");
        proxy.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_upgraded_connection_is_never_timed_out() {
    within(async {
        let a = backend("A").await;
        let proxy = proxy_with(a.addr, SHORT).await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await
            .unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // Quiet for longer than the idle time, then a message sent slower than a head may be.
        for pause in [SHORT.idle * 2, SHORT.head * 2] {
            sleep(pause).await;
            stream.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            stream
                .read_exact(&mut got)
                .await
                .expect("the tunnel was closed");
            assert_eq!(&got, b"ping");
        }
        drop(stream);
        proxy.stop().await;
        a.stop().await;
    })
    .await;
}
