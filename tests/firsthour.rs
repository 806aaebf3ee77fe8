//! What a new user's first hour needs beyond the builder: dependencies installed once (not on
//! every save), a static site served by pmesh-dev itself, the URL to open, and located errors.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::util::*;

/// One HTTP/1.1 exchange on a fresh connection: (status, headers lowercased, body).
fn request(port: u16, head: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(s, "{head}Host: test\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let headers = String::from_utf8_lossy(&out[..split]).to_lowercase();
    let body = out.get(split + 4..).unwrap_or_default().to_vec();
    let status = (headers.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, headers, body)
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}

fn wait_event(w: &mut Watch, event: &str) -> serde_json::Value {
    w.wait_for(30.0, |e| e["event"] == event)
        .unwrap_or_else(|| panic!("no {event} event: {:#?}", w.seen))
}

#[test]
fn the_install_step_runs_when_its_inputs_change_not_on_every_save() {
    let t = Tmp::new();
    one_service(
        &t,
        &["cp main.txt \"$PMESH_BUILD_DIR/\""],
        r#"install = { run = "echo installed >> installs.log; test \"$(cat deps.txt)\" != broken", inputs = ["deps.txt"] }
ignore = ["installs.log"]"#,
    );
    t.write("app/deps.txt", "left-pad 1\n");
    t.write("app/main.txt", "v1\n");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    assert_eq!(w.next_build("app")["ok"], true);
    let runs = || t.read("app/installs.log").lines().count();
    assert_eq!(runs(), 1, "installed for the first build");
    for v in 2..=3 {
        t.write("app/main.txt", &format!("v{v}\n"));
        assert_eq!(w.next_build("app")["ok"], true);
    }
    assert_eq!(runs(), 1, "two edits of the source install nothing");
    assert_eq!(t.read("app/.run/main.txt"), "v3\n");
    // The install shows in the build's output, saying why it runs.
    t.write("app/deps.txt", "left-pad 2\n");
    let started = w.seen.len();
    assert_eq!(w.next_build("app")["ok"], true);
    assert_eq!(runs(), 2, "a changed input installs again");
    assert!(
        w.seen[started..].iter().any(|e| e["event"] == "output"
            && e["line"]
                .as_str()
                .is_some_and(|l| l.contains("# install: deps.txt changed"))),
        "{:#?}",
        &w.seen[started..]
    );
    // A failing install fails the build like a step: the live build stays.
    let live = run_target(&t.join("app"));
    t.write("app/deps.txt", "broken\n");
    let failed = w.next_build("app");
    assert_eq!(failed["ok"], false);
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("install (`echo installed")),
        "{failed}"
    );
    assert_eq!(run_target(&t.join("app")), live);
    // Fixed: it runs again (a failure is not remembered as a success).
    t.write("app/deps.txt", "left-pad 3\n");
    assert_eq!(w.next_build("app")["ok"], true);
    assert_eq!(runs(), 4);
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn install_inputs_default_to_the_tools_lockfiles_and_an_unknown_tool_must_name_them() {
    let t = Tmp::new();
    one_service(&t, &["true"], "install = \"./get-deps.sh\"");
    let r = t.run(&["build"]).expect_code(2);
    assert!(
        r.stderr().contains("pmesh.toml:3:") && r.stderr().contains("inputs = "),
        "{}",
        r.stderr()
    );
    one_service(&t, &["true"], "install = \"npm ci --no-audit\"");
    t.write("app/package.json", "{}\n");
    t.write("app/package-lock.json", "{}\n");
    // No npm needed to see that it parses: `hash` reads the manifest only.
    t.run(&["hash"]).ok();
}

fn static_site(t: &Tmp, port: u16) {
    t.write("site/src/index.html", "<html><body>home v1</body></html>\n");
    t.write("site/src/style.css", "body { color: red }\n");
    t.write("site/src/big.txt", &"0123456789".repeat(1000));
    t.write(
        "pmesh.toml",
        &format!(
            "[services.site]\nbuild = [\"cp -R src \\\"$PMESH_BUILD_DIR/public\\\"\"]\n\
             static = \"public\"\nspa = true\nlisten = {port}\nkeep = 3\n"
        ),
    );
}

#[test]
fn a_static_service_is_served_by_pmesh_dev_with_etags_ranges_and_an_spa_fallback() {
    let t = Tmp::new();
    let port = free_port();
    static_site(&t, port);
    let mut w = Watch::start(&t, &[], &[], &["site"]);
    let live = wait_event(&mut w, "live");
    assert_eq!(
        live["url"].as_str(),
        Some(format!("http://127.0.0.1:{port}").as_str())
    );

    let (status, headers, body) = request(port, "GET / HTTP/1.1\r\n");
    assert_eq!(status, 200, "{headers}");
    assert_eq!(body, b"<html><body>home v1</body></html>\n");
    assert!(header(&headers, "content-type").is_some_and(|c| c.starts_with("text/html")));
    assert!(header(&headers, "last-modified").is_some(), "{headers}");
    // (Headers are lowercased here: the tag is sent back as the server wrote it.)
    let etag = header(&headers, "etag")
        .expect("an etag")
        .replacen("w/", "W/", 1);

    let (status, _, body) = request(
        port,
        &format!("GET /index.html HTTP/1.1\r\nIf-None-Match: {etag}\r\n"),
    );
    assert_eq!(status, 304);
    assert!(body.is_empty());

    let (status, headers, _) = request(port, "GET /style.css HTTP/1.1\r\n");
    assert_eq!(status, 200);
    assert!(header(&headers, "content-type").is_some_and(|c| c.starts_with("text/css")));

    let (status, headers, body) = request(port, "GET /big.txt HTTP/1.1\r\nRange: bytes=10-19\r\n");
    assert_eq!(status, 206, "{headers}");
    assert_eq!(body, b"0123456789");
    assert_eq!(header(&headers, "content-range"), Some("bytes 10-19/10000"));

    // A page route of the app answers the index; a missing asset stays a 404.
    let (status, _, body) = request(
        port,
        "GET /users/42 HTTP/1.1\r\nAccept: text/html,application/xhtml+xml\r\n",
    );
    assert_eq!(status, 200);
    assert_eq!(body, b"<html><body>home v1</body></html>\n");
    let (status, _, _) = request(port, "GET /missing.js HTTP/1.1\r\nAccept: */*\r\n");
    assert_eq!(status, 404);
    let (status, _, _) = request(port, "GET /../../etc/passwd HTTP/1.1\r\n");
    assert_ne!(status, 200);

    // An edit is served after the swap; rollback serves the older files.
    t.write("site/src/index.html", "<html><body>home v2</body></html>\n");
    wait_event(&mut w, "live");
    assert_eq!(
        request(port, "GET / HTTP/1.1\r\n").2,
        b"<html><body>home v2</body></html>\n"
    );
    t.run(&["rollback"]).ok();
    assert!(
        wait_for(10.0, || request(port, "GET / HTTP/1.1\r\n").2
            == b"<html><body>home v1</body></html>\n"),
        "rollback serves v1"
    );
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn swaps_of_a_static_service_under_load_lose_no_request() {
    let t = Tmp::new();
    let port = free_port();
    static_site(&t, port);
    let mut w = Watch::start(&t, &[], &[], &["site"]);
    wait_event(&mut w, "live");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut bad) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, _, body) = request(port, "GET /index.html HTTP/1.1\r\n");
                    if status == 200 && body.starts_with(b"<html>") {
                        ok += 1;
                    } else {
                        bad.push((status, String::from_utf8_lossy(&body).into_owned()));
                    }
                }
                (ok, bad)
            })
        })
        .collect();
    for v in 2..=5 {
        t.write(
            "site/src/index.html",
            &format!("<html><body>home v{v}</body></html>\n"),
        );
        wait_event(&mut w, "live");
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, bad) = c.join().expect("client");
        assert!(bad.is_empty(), "failed requests: {bad:?}");
        total += ok;
    }
    assert!(total > 50, "only {total} requests");
    assert_eq!(
        request(port, "GET / HTTP/1.1\r\n").2,
        b"<html><body>home v5</body></html>\n"
    );
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn two_services_on_one_port_are_a_located_error() {
    let t = Tmp::new();
    std::fs::create_dir_all(t.join("a")).expect("mkdir");
    std::fs::create_dir_all(t.join("b")).expect("mkdir");
    t.write(
        "pmesh.toml",
        "[services.a]\nrun = \"true\"\nlisten = 8300\n\n[services.b]\nrun = \"true\"\nlisten = \"127.0.0.1:8300\"\n",
    );
    let r = t.run(&["build"]).expect_code(2);
    assert!(
        r.stderr().contains("pmesh.toml:7:10")
            && r.stderr()
                .contains("services `a` and `b` both listen on 127.0.0.1:8300"),
        "{}",
        r.stderr()
    );
}

#[test]
fn rollback_takes_a_short_id_and_commands_run_inside_a_root_pick_that_service() {
    let t = Tmp::new();
    for s in ["a", "b"] {
        t.write(&format!("{s}/v.txt"), "one\n");
    }
    t.write(
        "pmesh.toml",
        "[services.a]\nbuild = [\"cp v.txt \\\"$PMESH_BUILD_DIR/\\\"\"]\n\n\
         [services.b]\nbuild = [\"cp v.txt \\\"$PMESH_BUILD_DIR/\\\"\"]\n",
    );
    t.run(&["build"]).ok();
    let first = run_target(&t.join("a")).expect("built");
    let first_id = t.read("a/.run/.buildid").trim().to_owned();
    t.write("a/v.txt", "two\n");
    t.run(&["build", "a"]).ok();
    assert_ne!(run_target(&t.join("a")), Some(first.clone()));

    // Inside a's root, `a` is meant; the 12-character id shown everywhere names the build.
    let mut c = t.cmd(&["rollback", &first_id[..12]]);
    c.current_dir(t.join("a"));
    let r = Run(c.output().expect("run"));
    assert_eq!(r.code(), 0, "{}", r.stderr());
    assert_eq!(run_target(&t.join("a")), Some(first));
    assert_eq!(t.read("a/.run/v.txt"), "one\n");
    let bad = t.run(&["rollback", "a", "ffffffffffff"]).expect_code(2);
    assert!(bad.stderr().contains("no build named"), "{}", bad.stderr());

    // At the top, `builds` lists every service.
    let all = t.run(&["builds"]).ok().stdout();
    assert!(all.contains("a:\n") && all.contains("b:\n"), "{all}");
    let json: serde_json::Value =
        serde_json::from_str(&t.run(&["builds", "--json"]).ok().stdout()).expect("json");
    let services: Vec<&str> = (json.as_array().into_iter().flatten())
        .filter_map(|b| b["service"].as_str())
        .collect();
    assert!(services.contains(&"a") && services.contains(&"b"), "{json}");
    let mut c = t.cmd(&["hash"]);
    c.current_dir(t.join("b"));
    let here = Run(c.output().expect("run")).ok().stdout();
    assert_eq!(here, t.run(&["hash", "b"]).ok().stdout());
}

#[test]
fn an_instance_that_dies_of_a_syntax_error_is_reported_with_the_file_and_line() {
    let t = Tmp::new();
    let port = free_port();
    t.write(
        "app/app.js",
        "const http = require('http');\nhttp.createServer((q, r) => r.end('ok')).listen(process.env.PORT);\n",
    );
    t.write(
        "pmesh.toml",
        &format!(
            "[services.app]\nbuild = [\"cp app.js \\\"$PMESH_BUILD_DIR/\\\"\"]\n\
             run = \"exec node \\\"$PMESH_RUN_DIR/app.js\\\"\"\nlisten = {port}\n"
        ),
    );
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    wait_event(&mut w, "live");
    t.write(
        "app/app.js",
        "const http = require('http');\n\nconst x = ;\nhttp.createServer((q, r) => r.end('ok')).listen(process.env.PORT);\n",
    );
    let bad = wait_event(&mut w, "unhealthy");
    let reason = bad["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("app.js:3") && reason.contains("SyntaxError"),
        "{reason}"
    );
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn the_plain_output_names_the_url_to_open_and_the_503_page_shows_the_log() {
    let t = Tmp::new();
    let port = free_port();
    t.write("app/mode.txt", "broken\n");
    t.write(
        "pmesh.toml",
        &format!(
            "[services.app]\nbuild = [\"echo first-line; echo second-line; test \\\"$(cat mode.txt)\\\" = ok\"]\n\
             run = \"exec python3 -m http.server \\\"$PORT\\\" --bind \\\"$HOST\\\" --directory \\\"$PMESH_RUN_DIR\\\"\"\n\
             listen = {port}\n"
        ),
    );
    let mut child = t
        .cmd(&["watch", "--no-tui"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut until = |pred: &dyn Fn(&str) -> bool| {
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(30)) {
            seen.push(l.clone());
            if pred(&l) {
                return;
            }
        }
        panic!("not seen: {seen:#?}");
    };
    let url = format!("http://127.0.0.1:{port}");
    until(&|l| {
        l.contains("watching") && l.contains(&format!("open {url}")) && l.contains("1 directory")
    });
    until(&|l| l.contains("failed"));
    let (status, _, body) = request(port, "GET / HTTP/1.1\r\n");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("<pre>") && body.contains("first-line\nsecond-line"),
        "{body}"
    );
    t.write("app/mode.txt", "ok\n");
    until(&|l| l.contains(&format!("app -> {url}")));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    assert_eq!(child.wait().expect("wait").code(), Some(0));
}
