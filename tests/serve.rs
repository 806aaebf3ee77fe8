//! Serving: real instances of `fixtures/testsrv/server.js` behind the real proxy. Swaps lose no
//! request, unhealthy builds are undone, crashes are restarted, nothing outlives pmesh-dev.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::util::*;

/// Service `app`: the test server, copied into each build with its version and mode files.
fn test_service(t: &Tmp, port: u16, extra: &str) {
    let extra = if extra.contains("ready_timeout") {
        extra.to_owned()
    } else {
        format!("ready_timeout = \"10s\"\n{extra}")
    };
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/testsrv/server.js");
    std::fs::create_dir_all(t.join("app")).expect("mkdir");
    std::fs::copy(src, t.join("app/server.js")).expect("copy server");
    t.write("app/version.txt", "v1\n");
    t.write("app/mode.txt", "ok\n");
    t.write(
        "pmesh.toml",
        &format!(
            r#"[services.app]
build = ["cp server.js version.txt mode.txt \"$PMESH_BUILD_DIR/\""]
run = "exec node \"$PMESH_RUN_DIR/server.js\""
listen = {port}
health = "GET /healthz"
stop_timeout = "3s"
keep = 3
{extra}
"#
        ),
    );
}

/// `GET path` on the proxy with a fresh connection: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn wait_live(w: &mut Watch) -> serde_json::Value {
    w.wait_for(30.0, |e| e["event"] == "live")
        .unwrap_or_else(|| panic!("no instance went live: {:#?}", w.seen))
}

#[test]
fn swaps_under_keep_alive_load_lose_no_request() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_live(&mut w);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let last_version = Arc::new(std::sync::Mutex::new(String::new()));
    let load = {
        let (stop, ok, failures, last_version) = (
            stop.clone(),
            ok.clone(),
            failures.clone(),
            last_version.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for worker in 0..8 {
                    let (stop, ok, failures, last_version) = (
                        stop.clone(),
                        ok.clone(),
                        failures.clone(),
                        last_version.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        // One client per worker: its own keep-alive connections.
                        let client =
                            Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
                        let mut i = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            i += 1;
                            let post = i.is_multiple_of(2);
                            let body = format!("worker {worker} request {i} ").repeat(if post {
                                2000
                            } else {
                                0
                            });
                            let req = hyper::Request::builder()
                                .method(if post { "POST" } else { "GET" })
                                .uri(format!("http://127.0.0.1:{port}/"))
                                .body(Full::new(Bytes::from(body.clone())))
                                .expect("request");
                            let res =
                                tokio::time::timeout(Duration::from_secs(15), client.request(req))
                                    .await;
                            let outcome = match res {
                                Ok(Ok(resp)) => {
                                    let status = resp.status();
                                    let version = resp
                                        .headers()
                                        .get("x-version")
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("")
                                        .to_owned();
                                    match resp.into_body().collect().await {
                                        Ok(b) => {
                                            let got = b.to_bytes();
                                            if status != 200 {
                                                Err(format!(
                                                    "status {status}: {}",
                                                    String::from_utf8_lossy(&got)
                                                ))
                                            } else if post && got != body.as_bytes() {
                                                Err(format!(
                                                    "POST echo differs ({} vs {} bytes)",
                                                    got.len(),
                                                    body.len()
                                                ))
                                            } else {
                                                *last_version.lock().expect("lock") = version;
                                                Ok(())
                                            }
                                        }
                                        Err(e) => Err(format!("body: {e}")),
                                    }
                                }
                                Ok(Err(e)) => Err(format!("request: {e:?}")),
                                Err(_) => Err("timed out".to_owned()),
                            };
                            match outcome {
                                Ok(()) => {
                                    ok.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => failures.lock().expect("lock").push(e),
                            }
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })
    };

    for v in 2..=9 {
        std::thread::sleep(Duration::from_millis(250));
        t.write("app/version.txt", &format!("v{v}\n"));
        let live = wait_live(&mut w);
        assert!(live["archive"].as_str().is_some());
        // Let the old instance drain and stop under load.
        w.wait_for(15.0, |e| e["event"] == "stopped")
            .expect("the old instance stops");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    load.join().expect("load thread");
    let failures = failures.lock().expect("lock").clone();
    let served = ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        served + failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(served > 100, "only {served} requests were made");
    assert_eq!(
        *last_version.lock().expect("lock"),
        "v9",
        "the newest build serves"
    );
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn unhealthy_and_crashing_builds_are_undone_while_the_old_instance_serves() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "ready_timeout = \"2s\"");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    let first = wait_live(&mut w);
    let root = t.join("app");
    let good = run_target(&root).expect("live");
    assert_eq!(first["archive"].as_str(), Some(good.as_str()));

    // Health answers 500: undone after ready_timeout.
    t.write("app/mode.txt", "unhealthy\n");
    let bad = w
        .wait_for(30.0, |e| e["event"] == "unhealthy")
        .unwrap_or_else(|| panic!("no unhealthy event: {:#?}", w.seen));
    assert!(
        bad["reason"]
            .as_str()
            .is_some_and(|r| r.contains("GET /healthz")),
        "{bad}"
    );
    assert_eq!(run_target(&root), Some(good.clone()), ".run went back");
    assert!(
        get(port, "/").1.contains("version v1"),
        "the old instance still serves"
    );
    let builds: serde_json::Value =
        serde_json::from_str(&t.run(&["builds", "--json"]).ok().stdout()).expect("json");
    let bad_build = builds
        .as_array()
        .and_then(|a| a.iter().find(|b| b["name"] == bad["archive"]))
        .cloned()
        .expect("the unhealthy build is listed");
    assert_eq!(bad_build["status"], "unhealthy");
    assert_eq!(bad_build["live"], false);

    // Exits at start: undone at once, with its status and last lines.
    t.write("app/mode.txt", "crash-at-start\n");
    let crashed = w
        .wait_for(30.0, |e| e["event"] == "unhealthy")
        .expect("unhealthy again");
    let reason = crashed["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("exit status 3") && reason.contains("crashing at start on purpose"),
        "{reason}"
    );
    assert_eq!(run_target(&root), Some(good.clone()));
    assert!(get(port, "/").1.contains("version v1"));

    // A good build after that goes live.
    t.write("app/mode.txt", "ok\n");
    t.write("app/version.txt", "v2\n");
    wait_live(&mut w);
    assert!(get(port, "/").1.contains("version v2"));
    // Rollback's default skips the unhealthy builds.
    assert_eq!(w.interrupt(), Some(0));
    t.run(&["rollback"]).ok();
    assert_eq!(run_target(&root), Some(good));
}

#[test]
fn a_crashed_instance_is_restarted_and_502_explains_meanwhile() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_live(&mut w);
    let (_, before) = get(port, "/");
    assert!(before.contains("version v1"), "{before}");
    let _ = get(port, "/crash");
    let crashed = w
        .wait_for(10.0, |e| e["event"] == "crashed")
        .unwrap_or_else(|| panic!("no crashed event: {:#?}", w.seen));
    assert!(
        crashed["reason"]
            .as_str()
            .is_some_and(|r| r.contains("exit status 4")),
        "{crashed}"
    );
    wait_live(&mut w);
    let (status, after) = get(port, "/");
    assert_eq!(status, 200);
    assert!(
        after.contains("version v1") && after != before,
        "a new process serves: {after}"
    );
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn requests_during_the_first_build_wait_and_are_answered() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    // A slow first build.
    let toml = t
        .read("pmesh.toml")
        .replace("build = [", "build = [\"sleep 1\", ");
    t.write("pmesh.toml", &toml);
    let w = Watch::start(&t, &[], &[], &["app"]);
    let (status, body) = get(port, "/");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("version v1"), "{body}");
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn a_failed_first_build_answers_503_with_the_error() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    let toml = t.read("pmesh.toml").replace(
        "build = [",
        "build = [\"echo the compiler says no; exit 2\", ",
    );
    t.write("pmesh.toml", &toml);
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    w.next_build("app");
    let (status, body) = get(port, "/");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("app") && body.contains("exit status 2"),
        "{body}"
    );
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn websocket_upgrades_pass_through() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_live(&mut w);
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .expect("handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("read the handshake answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "the accept key: {head}"
    );
    for msg in [&b"hello through the proxy"[..], b"second frame"] {
        s.write_all(msg).expect("write");
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).expect("echo");
        assert_eq!(back, msg);
    }
    drop(s);
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn kill_9_while_serving_or_building_leaves_nothing_and_the_port_is_free() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    let marker = t.path().to_string_lossy().into_owned();
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_live(&mut w);
    assert!(
        process_alive(&format!("{marker}/app/.build-")),
        "the instance runs"
    );
    w.child.kill().expect("kill -9");
    let _ = w.child.wait();
    assert!(
        wait_for(10.0, || !process_alive(&marker)),
        "the instance outlived pmesh-dev"
    );

    // A new watch on the same port starts and serves.
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_live(&mut w);
    assert_eq!(get(port, "/").0, 200);

    // Killed while building.
    let build_marker = format!("pmesh-k9b-{}", std::process::id());
    let toml = t.read("pmesh.toml").replace(
        "build = [",
        &format!("build = [\"sleep 30 # {build_marker}\", "),
    );
    t.write("pmesh.toml", &toml);
    drop(w);
    assert!(wait_for(10.0, || !process_alive(&marker)));
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    assert!(
        wait_for(10.0, || process_alive(&build_marker)),
        "the build runs"
    );
    w.child.kill().expect("kill -9");
    let _ = w.child.wait();
    assert!(
        wait_for(10.0, || !process_alive(&build_marker)),
        "the build step outlived pmesh-dev"
    );
    assert!(
        wait_for(10.0, || !process_alive(&marker)),
        "an instance outlived pmesh-dev"
    );
    assert_run_sound(&t.join("app"));
}

#[test]
fn run_serves_the_live_build_without_building() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    t.run(&["build"]).ok();
    t.write("app/version.txt", "v2 not built\n");
    let mut w = Watch::spawn(&t, &["run", "--json"], &[]);
    wait_live(&mut w);
    let (_, body) = get(port, "/");
    assert!(body.contains("version v1"), "{body}");
    assert_eq!(w.interrupt(), Some(0));
    assert!(archives(&t.join("app")).len() == 1, "nothing was built");
}

#[test]
fn a_rollback_sent_to_the_watch_swaps_the_proxy_back() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_live(&mut w);
    t.write("app/version.txt", "v2\n");
    wait_live(&mut w);
    assert!(get(port, "/").1.contains("version v2"));
    // The command returns once the old build serves again.
    let r = t.run(&["rollback"]).ok();
    assert!(r.stderr().is_empty(), "{}", r.stderr());
    assert!(
        get(port, "/").1.contains("version v1"),
        "the proxy serves the rolled-back build"
    );
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn protocol_tcp_forwards_raw_connections_to_the_live_instance() {
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "protocol = \"tcp\"");
    let toml = t
        .read("pmesh.toml")
        .replace("health = \"GET /healthz\"", "health = \"tcp\"");
    t.write("pmesh.toml", &toml);
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_live(&mut w);
    // Raw bytes through: an HTTP request the proxy does not parse.
    let (status, body) = get(port, "/");
    assert_eq!(status, 200);
    assert!(body.contains("version v1"), "{body}");
    t.write("app/version.txt", "v2\n");
    wait_live(&mut w);
    assert!(
        get(port, "/").1.contains("version v2"),
        "new connections go to the new instance"
    );
    assert_eq!(w.interrupt(), Some(0));
}

/// CPU seconds (user + system) `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
    // SAFETY: sysconf only reads a system setting.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Sends a keep-alive GET on `s` and reads its response: (status, body).
fn get_on(s: &mut TcpStream, path: &str) -> (u16, String) {
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok());
            // The test server answers chunked; the proxy's own pages have a length.
            let chunked_done = len.is_none() && body.ends_with("0\r\n\r\n");
            if len.is_some_and(|n| body.len() >= n) || chunked_done {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                return (status, body.to_owned());
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return (0, text),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(target_os = "linux")]
#[test]
fn short_of_descriptors_the_newest_client_is_refused_and_the_others_served() {
    use std::os::unix::process::CommandExt;
    let t = Tmp::new();
    let port = free_port();
    test_service(&t, port, "");
    // A limit as low as a crowded machine's: pmesh-dev cannot raise it (hard = soft).
    let mut cmd = t.cmd(&["watch", "--json"]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 160,
                rlim_max: 160,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut w = Watch::spawn_cmd(cmd);
    wait_live(&mut w);

    let mut kept = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    kept.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert_eq!(get_on(&mut kept, "/").0, 200);

    // More idle clients than the limit allows: the last ones are refused at once.
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..200 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(n) if n > 0 => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
                assert!(text.contains("too many connections"), "{text}");
                refused += 1;
            }
            _ => idle.push(s),
        }
    }
    assert!(
        refused > 0 && !idle.is_empty(),
        "refused {refused}, held {}",
        idle.len()
    );

    // The accept loop does not spin while clients keep being refused.
    let pid = w.child.id();
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_seconds(pid) - before;
    assert!(
        spent < 0.3,
        "pmesh-dev used {spent} s of CPU in 1 s while idle"
    );

    // The client connected before the crowd is still served, on a new upstream connection
    // (the old one was idle for longer than the proxy keeps one).
    assert_eq!(
        get_on(&mut kept, "/").0,
        200,
        "the connected client was cut"
    );

    // Once the crowd leaves, new clients are served again: the listener lived.
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let (status, _) = get(port, "/");
    assert_eq!(status, 200);
    w.quiet_for(0.2);
    assert!(
        w.seen.iter().any(|e| e["event"] == "warning"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("refused a client"))),
        "no warning said so: {:#?}",
        w.seen
    );
    assert_eq!(w.interrupt(), Some(0));
}

/// The soft limit on open files of process `pid`.
fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    line.split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .expect("a number")
}

#[cfg(target_os = "linux")]
#[test]
fn the_descriptor_limit_is_raised_for_the_proxy_and_not_for_build_steps_or_instances() {
    use std::os::unix::process::CommandExt;
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) },
        0
    );
    if hard.rlim_max <= 256 {
        return; // Nothing to raise on this machine.
    }
    let t = Tmp::new();
    let seen = t.join("child-limit");
    one_service(
        &t,
        &[&format!("ulimit -n > '{}'", seen.display())],
        &format!("listen = {}\nrun = \"sleep 30\"", free_port()),
    );
    let mut cmd = t.cmd(&["watch", "--json"]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            limit.rlim_cur = 256;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut w = Watch::spawn_cmd(cmd);
    w.next_build("app");
    assert_eq!(soft_nofile(w.child.id()), hard.rlim_max);
    let child = std::fs::read_to_string(&seen).expect("the build step wrote its limit");
    assert_eq!(child.trim(), "256");
    assert_eq!(w.interrupt(), Some(0));
}
