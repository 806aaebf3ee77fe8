//! The loop ends in the browser: a page open through the proxy reloads once a new build is
//! live (never before), shows an overlay while a build fails, and loses it on the fix; all in
//! a real headless Chromium (Debian's `chromium`) driven by Playwright (`playwright-core` from
//! npm, installed under target/ once). What the script must never touch (other content types,
//! compressed bodies) is checked byte for byte on raw sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::util::*;

const CHROMIUM: &str = "/usr/bin/chromium";

/// A service `app` serving `app/page.html` with fixtures/pagesrv; its build fails, printing a
/// line with markup in it, while the page contains `BROKEN`.
fn page_service(t: &Tmp, port: u16, extra: &str) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pagesrv/server.js");
    std::fs::create_dir_all(t.join("app")).expect("mkdir");
    std::fs::copy(src, t.join("app/server.js")).expect("copy server");
    t.write("app/page.html", &page("v1"));
    t.write(
        "app/build.sh",
        "if grep -q BROKEN page.html; then\n  echo 'compiling page.html'\n  \
         echo 'error: <b>unclosed</b> & broken in page.html' >&2\n  exit 1\nfi\n\
         cp server.js page.html \"$PMESH_BUILD_DIR/\"\n",
    );
    t.write(
        "pmesh.toml",
        &format!(
            r#"[services.app]
build = "sh build.sh"
run = "exec node \"$PMESH_RUN_DIR/server.js\""
listen = {port}
health = "GET /healthz"
{extra}
"#
        ),
    );
}

/// A page that counts its loads in sessionStorage and shows `version`.
fn page(version: &str) -> String {
    format!(
        "<!doctype html>\n<html><head><title>{version}</title></head>\n<body>\n\
         <h1 id=\"v\">{version}</h1>\n\
         <script>sessionStorage.loads = String(Number(sessionStorage.loads || 0) + 1);</script>\n\
         </body></html>\n"
    )
}

/// The directory holding node_modules/playwright-core, installed once per test run.
fn playwright() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-deps");
        if !dir
            .join("node_modules/playwright-core/package.json")
            .exists()
        {
            let status = Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                .arg(&dir)
                .arg("playwright-core@1")
                .status()
                .expect("run npm (.ci/run installs node and npm)");
            assert!(status.success(), "npm install playwright-core: {status}");
        }
        dir
    })
}

/// Runs the node script `script` with `args`, Playwright reachable as `PLAYWRIGHT`; kills it
/// after `limit`. Returns (success, stdout, stderr).
fn node(t: &Tmp, script: &str, args: &[&str], limit: Duration) -> (bool, String, String) {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does)"
    );
    let path = t.write("driver.js", script);
    let pw = playwright().join("node_modules/playwright-core");
    let mut child = Command::new("node")
        .arg(path)
        .args(args)
        .env("PLAYWRIGHT", pw)
        .env("CHROMIUM", CHROMIUM)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for node") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if status.is_none() {
        err.push_str(&format!("\n(killed after {limit:?})"));
    }
    (status.is_some_and(|s| s.success()), out, err)
}

/// The browser's part: open the page, edit, break, fix; each step checked in the page. Prints
/// one line per step; exits 1 with the reason on the first failed check.
const DRIVER: &str = r##"
const { chromium } = require(process.env.PLAYWRIGHT);
const fs = require("fs");
const path = require("path");
const [url, app, profile, pmesh] = process.argv.slice(2);
const { execFileSync } = require("child_process");
const page = (v) => `<!doctype html>\n<html><head><title>${v}</title></head>\n<body>\n` +
  `<h1 id="v">${v}</h1>\n` +
  `<script>sessionStorage.loads = String(Number(sessionStorage.loads || 0) + 1);</script>\n` +
  `</body></html>\n`;
const edit = (text) => fs.writeFileSync(path.join(app, "page.html"), text);
const step = (s) => console.log(s);
const check = (ok, what) => { if (!ok) throw new Error(what); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

(async () => {
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const tab = ctx.pages()[0] || (await ctx.newPage());
    const loads = () => tab.evaluate(() => Number(sessionStorage.loads || 0));
    const version = () => tab.evaluate(() => document.getElementById("v").textContent);
    const waitVersion = (v) => tab.waitForFunction(
      (v) => document.getElementById("v") && document.getElementById("v").textContent === v,
      v, { timeout: 30000 });
    const overlay = "#pmesh-dev-overlay";

    await tab.goto(url);
    check((await version()) === "v1", "the page shows v1");
    await tab.waitForFunction(() => window.__pmeshDev === true, null, { timeout: 5000 });
    // Connecting to the event stream reloads nothing.
    await sleep(1500);
    check((await loads()) === 1, `one load after opening, not ${await loads()}`);
    step("opened");

    edit(page("v2"));
    await waitVersion("v2");
    await sleep(1500);
    check((await loads()) === 2, `reloaded once for v2, loads ${await loads()}`);
    check((await tab.$(overlay)) === null, "no overlay on a good build");
    step("reloaded");

    edit(page("v3 BROKEN"));
    await tab.waitForSelector(overlay, { state: "visible", timeout: 30000 });
    const text = await tab.textContent(overlay);
    check(text.includes("app: the build failed"), `the overlay names the service: ${text}`);
    check(text.includes("step 1 of 1 (`sh build.sh`) failed"), `and the step: ${text}`);
    check(text.includes("error: <b>unclosed</b> & broken in page.html"),
      `and the log line, as text: ${text}`);
    check((await tab.$$(`${overlay} b`)).length === 0, "log text is never markup");
    await sleep(1000);
    check((await loads()) === 2, `a failed build reloads nothing, loads ${await loads()}`);
    check((await version()) === "v2", "the old build's page stays under the overlay");
    step("overlay");

    edit(page("v4"));
    await waitVersion("v4");
    await sleep(1500);
    check((await loads()) === 3, `the fix reloads once, loads ${await loads()}`);
    check((await tab.$(overlay)) === null, "the fix removes the overlay");
    step("fixed");

    // A rollback is a new build live too (v2, the previous good one): one more reload.
    execFileSync(pmesh, ["rollback"], { cwd: path.dirname(app), stdio: "ignore" });
    await waitVersion("v2");
    await sleep(1000);
    check((await loads()) === 4, `the rollback reloads once, loads ${await loads()}`);
    step("rolled back");
  } finally {
    await ctx.close();
  }
})().catch((e) => {
  console.error(String(e && e.stack || e));
  process.exit(1);
});
"##;

#[test]
fn an_open_page_reloads_after_the_swap_shows_a_failed_build_and_reloads_on_the_fix_and_rollback() {
    let t = Tmp::new();
    let port = free_port();
    page_service(&t, port, "");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    w.wait_for(30.0, |e| e["event"] == "live")
        .unwrap_or_else(|| panic!("never live: {:#?}", w.seen));
    let profile = t.join("profile");
    std::fs::create_dir_all(&profile).expect("mkdir profile");
    let url = format!("http://127.0.0.1:{port}/");
    let app = t.join("app");
    let (ok, out, err) = node(
        &t,
        DRIVER,
        &[
            &url,
            &app.to_string_lossy(),
            &profile.to_string_lossy(),
            bin(),
        ],
        Duration::from_secs(150),
    );
    let steps: Vec<&str> = out.lines().collect();
    assert!(
        ok,
        "the browser run failed\nsteps done: {steps:?}\nstderr:\n{err}\nevents: {:#?}",
        w.seen
    );
    assert_eq!(
        steps,
        ["opened", "reloaded", "overlay", "fixed", "rolled back"]
    );
    // The pmesh-dev side of the same story (events read so far, and the rest).
    w.quiet_for(0.5);
    let finished: Vec<bool> = (w.seen.iter())
        .filter(|e| e["event"] == "build_finished")
        .map(|e| e["ok"] == true)
        .collect();
    assert_eq!(finished, [true, true, false, true], "{:#?}", w.seen);
    assert_eq!(w.interrupt(), Some(0));
}

/// A raw response: the head's lines and the body as sent.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        (self.headers.iter())
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` as a browser navigates (`Accept: text/html`, `Sec-Fetch-Dest: document`, gzip
/// accepted) on a fresh connection, read to its end.
fn navigate(port: u16, path: &str) -> Raw {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/html,*/*;q=0.8\r\n\
         Accept-Encoding: gzip, deflate, br\r\nSec-Fetch-Dest: document\r\n\
         Sec-Fetch-Mode: navigate\r\nIf-None-Match: \"page-1\"\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let end = (raw.windows(4).position(|w| w == b"\r\n\r\n"))
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = (lines.next().and_then(|l| l.split(' ').nth(1)))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = (headers.iter())
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Raw {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&b[..eol]).expect("chunk size");
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// The headers that describe the message itself, which a proxy may reword.
fn end_to_end(raw: &Raw) -> Vec<(String, String)> {
    let hop = ["date", "connection", "keep-alive", "transfer-encoding"];
    let mut h: Vec<(String, String)> = (raw.headers.iter())
        .filter(|(n, _)| !hop.contains(&n.to_ascii_lowercase().as_str()))
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
        .collect();
    h.sort();
    h
}

#[test]
fn only_plain_html_navigations_get_the_script_and_the_rest_passes_byte_for_byte() {
    let t = Tmp::new();
    let port = free_port();
    page_service(&t, port, "");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    let live = w
        .wait_for(30.0, |e| e["event"] == "live")
        .unwrap_or_else(|| panic!("never live: {:#?}", w.seen));
    let direct = u16::try_from(live["port"].as_u64().expect("a port")).expect("a port");
    let html = page("v1");

    // Text, and HTML the instance gzipped although identity was asked for: untouched.
    for path in ["/plain", "/gz"] {
        let (mine, theirs) = (navigate(port, path), navigate(direct, path));
        assert_eq!(mine.status, 200, "{path}");
        assert!(
            mine.body == theirs.body,
            "{path}: the body through the proxy differs from the instance's\n\
             proxy:    {:?}\ninstance: {:?}",
            String::from_utf8_lossy(&mine.body),
            String::from_utf8_lossy(&theirs.body)
        );
        assert_eq!(end_to_end(&mine), end_to_end(&theirs), "{path}");
    }
    assert_eq!(navigate(port, "/plain").body, html.as_bytes());

    // A page: the script before </body>, the length right, the ETag gone, asked uncompressed
    // and unconditionally (the browser's copy has an older token).
    let page = navigate(port, "/");
    let body = String::from_utf8(page.body.clone()).expect("utf-8");
    assert_eq!(page.status, 200, "{body}");
    assert!(body.contains("<script data-pmesh-dev>"), "{body}");
    assert!(body.ends_with("</script></body></html>\n"), "{body}");
    let script_at = body.find("<script data-pmesh-dev>").expect("the script");
    let body_end = body.rfind("</body>").expect("</body>");
    assert_eq!(format!("{}{}", &body[..script_at], &body[body_end..]), html);
    assert_eq!(
        page.header("content-length"),
        Some(&*page.body.len().to_string())
    );
    assert_eq!(page.header("etag"), None);
    assert_eq!(page.header("x-accept-encoding"), Some("identity"));

    // A page in chunks is held whole (it is small) and sent with a length.
    let chunked = navigate(port, "/chunked");
    let chunked_body = String::from_utf8_lossy(&chunked.body).into_owned();
    assert!(
        chunked_body.contains("<script data-pmesh-dev>"),
        "{chunked_body}"
    );
    assert_eq!(
        chunked.header("content-length"),
        Some(&*chunked.body.len().to_string())
    );

    // The event stream is the proxy's own: it says what is live at once.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET /.pmesh/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"live\"") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("content-type: text/event-stream"), "{got}");
    assert!(got.contains("data: {\"live\":"), "{got}");
    drop(s);
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn reload_false_leaves_pages_and_the_reserved_path_to_the_instance() {
    let t = Tmp::new();
    let port = free_port();
    page_service(&t, port, "reload = false");
    let mut w = Watch::start(&t, &[], &[], &["app"]);
    w.wait_for(30.0, |e| e["event"] == "live")
        .unwrap_or_else(|| panic!("never live: {:#?}", w.seen));
    let served = navigate(port, "/");
    assert_eq!(served.body, page("v1").as_bytes());
    assert_eq!(served.header("etag"), Some("\"page-1\""));
    let events = navigate(port, "/.pmesh/events");
    assert_eq!(
        (events.status, &*String::from_utf8_lossy(&events.body)),
        (404, "no such page\n"),
        "the instance's own 404"
    );
    assert_eq!(w.interrupt(), Some(0));
}
