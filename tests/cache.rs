//! The team's build cache against real stores: an S3-compatible server (`s3s-fs`) and a WebDAV
//! server (nginx's DAV module), both started here on loopback and stopped at the end. Two
//! checkouts of one project in different directories share a store; hostile, broken and
//! vanishing entries are refused and the build runs locally.

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::util::*;

/// A program the tests need: `$var`, else on PATH, else in `extra` directories.
fn program(name: &str, var: &str, extra: &[PathBuf]) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is needed by the cache tests: `bash .ci/run` installs it (or set {var})")
        })
}

fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let up = wait_for(20.0, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok() || child.try_wait().ok().flatten().is_some()
    });
    assert!(
        up && child.try_wait().ok().flatten().is_none(),
        "{what} did not start on port {port}"
    );
}

/// Kills the process group a server runs in, and reaps it.
fn stop(child: &mut Child) {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// A real S3-compatible server: `s3s-fs` on a free loopback port, serving a directory.
struct S3 {
    child: Child,
    port: u16,
    /// Where it keeps objects: `<data>/<bucket>/<key>`.
    data: Tmp,
}

const BUCKET: &str = "team-builds";

impl S3 {
    fn start() -> S3 {
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|d| d.join("bin"))
            .into_iter()
            .collect::<Vec<_>>();
        let bin = program("s3s-fs", "PMESH_TEST_S3S_FS", &home);
        let data = Tmp::new();
        fs::create_dir_all(data.join(BUCKET)).expect("create the bucket");
        let port = free_port();
        let mut child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "test-access", "--secret-key", "test-secret"])
            .arg(data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start s3s-fs");
        wait_listening(port, &mut child, "s3s-fs");
        S3 { child, port, data }
    }

    fn url(&self) -> String {
        format!("s3://{BUCKET}/pmesh")
    }

    /// The environment a pmesh-dev needs to reach it: credentials never in the manifest.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "test-access".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test-secret".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
        ]
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A real WebDAV server: nginx with its DAV module, PUT creating parent directories, on a free
/// loopback port; `rate` slows its answers (to stop it in the middle of one).
struct Dav {
    child: Option<Child>,
    port: u16,
    dir: Tmp,
}

impl Dav {
    fn start(rate: Option<&str>) -> Dav {
        let bin = program("nginx", "PMESH_TEST_NGINX", &[PathBuf::from("/usr/sbin")]);
        let dir = Tmp::new();
        fs::create_dir_all(dir.join("data")).expect("create the DAV root");
        let port = free_port();
        let d = dir.path().display();
        // Root runs the workers as itself, so they can write the test's private directory.
        let user = if nix::unistd::geteuid().is_root() {
            "user root;"
        } else {
            ""
        };
        let limit = rate.map(|r| format!("limit_rate {r};")).unwrap_or_default();
        let conf = format!(
            "{user}
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port};
        root {d}/data;
        location / {{
            dav_methods PUT DELETE MKCOL COPY MOVE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            {limit}
        }}
    }}
}}
"
        );
        let conf_path = dir.write("nginx.conf", &conf);
        let mut child = Command::new(bin)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start nginx");
        wait_listening(port, &mut child, "nginx");
        Dav {
            child: Some(child),
            port,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/cache", self.port)
    }

    /// Stops the server at once, whatever it is sending.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c);
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data/cache")
    }
}

impl Drop for Dav {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A checkout of the project: service `app` (the serve tests' server) whose build copies its
/// files, writes `extra_step`'s output, and leaves `ran` beside the manifest each time it runs.
fn checkout(url: &str, cache_extra: &str, extra_step: &str) -> Tmp {
    let t = Tmp::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/testsrv/server.js");
    fs::create_dir_all(t.join("app")).expect("mkdir");
    fs::copy(src, t.join("app/server.js")).expect("copy server");
    t.write("app/version.txt", "shared-v1\n");
    t.write("app/mode.txt", "ok\n");
    let port = free_port();
    t.write(
        "pmesh.toml",
        &format!(
            r#"[cache]
url = "{url}"
{cache_extra}

[services.app]
build = [
  "cp server.js version.txt mode.txt \"$PMESH_BUILD_DIR/\"",
  "{extra_step}",
  "echo ran >> ../ran",
]
run = "exec node \"$PMESH_RUN_DIR/server.js\""
listen = {port}
health = "GET /healthz"
ready_timeout = "10s"
stop_timeout = "3s"
"#
        ),
    );
    t
}

fn build(t: &Tmp, args: &[&str], env: &[(&'static str, String)]) -> Run {
    let mut c = t.cmd(&["build", "--json"]);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    Run(c.output().expect("run pmesh-dev build"))
}

fn events_of<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

fn warnings(events: &[serde_json::Value]) -> Vec<String> {
    events_of(events, "warning")
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect()
}

/// Every `<id>.pmesh` object below `dir`.
fn objects(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(objects(&p));
        } else if p.extension().is_some_and(|x| x == "pmesh") {
            out.push(p);
        }
    }
    out
}

/// Asserts that `t` built locally after refusing its cache's entry, and left nothing of it.
fn assert_built_locally(t: &Tmp, run: &Run, refused: &str) {
    let events = run.json_lines();
    let kinds = kinds(&events);
    assert!(
        !kinds.contains(&"fetched".to_owned()),
        "nothing may be fetched: {kinds:?}"
    );
    assert!(kinds.contains(&"build_started".to_owned()), "{kinds:?}");
    let w = warnings(&events);
    assert!(
        w.iter().any(|m| m.contains(refused)),
        "a warning saying `{refused}`, got {w:?}"
    );
    assert_eq!(t.read("ran"), "ran\n", "the steps must have run");
    assert_eq!(archives(&t.join("app")).len(), 1);
    assert_run_sound(&t.join("app"));
    let leftovers: Vec<_> = fs::read_dir(t.join("app/.pmesh/cache"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.iter().all(|n| n == "stored"),
        "no download may be left behind: {leftovers:?}"
    );
}

/// `GET /` through the proxy.
fn get_body(port: u16) -> String {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn listen_port(t: &Tmp) -> u16 {
    let m = t.read("pmesh.toml");
    m.lines()
        .find_map(|l| l.strip_prefix("listen = "))
        .and_then(|p| p.trim().parse().ok())
        .expect("a listen port")
}

#[test]
fn s3_a_second_checkout_serves_the_first_ones_build_without_running_its_steps() {
    let s3 = S3::start();
    let a = checkout(&s3.url(), "", "true");
    let run = build(&a, &["--push"], &s3.env()).ok();
    let events = run.json_lines();
    assert_eq!(events_of(&events, "build_started").len(), 1, "{events:#?}");
    let pushed = events_of(&events, "pushed");
    assert_eq!(pushed.len(), 1, "{events:#?}");
    assert!(pushed[0]["bytes"].as_u64().is_some_and(|b| b > 100));
    let id = a.read("app/.run/.buildid").trim().to_owned();
    let objs = objects(&s3.data.join(BUCKET));
    assert_eq!(objs.len(), 1, "one object in the bucket");
    assert!(objs[0].ends_with(format!("{id}.pmesh")), "{objs:?}");
    assert!(
        objs[0].starts_with(s3.data.join(BUCKET).join("pmesh/v1")),
        "under the url's prefix: {objs:?}"
    );

    // A second checkout, elsewhere, watching: it serves the fetched build at once.
    let b = checkout(&s3.url(), "", "true");
    let env: Vec<(&str, String)> = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut w = Watch::start(&b, &["--no-tui"], &env, &["app"]);
    let fetched = w
        .wait_for(30.0, |e| e["event"] == "fetched")
        .unwrap_or_else(|| panic!("no fetched event: {:#?}", w.seen));
    assert_eq!(fetched["id"], id.as_str());
    assert!(fetched["bytes"].as_u64().is_some_and(|b| b > 100));
    assert!(fetched["duration_ms"].is_u64());
    w.wait_for(30.0, |e| e["event"] == "live")
        .unwrap_or_else(|| panic!("never live: {:#?}", w.seen));
    let body = get_body(listen_port(&b));
    assert!(
        body.contains("shared-v1"),
        "served the fetched build: {body}"
    );
    assert!(
        !kinds(&w.seen).contains(&"build_started".to_owned()),
        "{:#?}",
        w.seen
    );
    assert!(!b.join("ran").exists(), "the second checkout's steps ran");
    assert_eq!(b.read("app/.run/.buildid").trim(), id);
    assert_eq!(b.read("app/.run/server.js"), a.read("app/.run/server.js"));
    // What was fetched is not pushed back.
    let later = w.quiet_for(1.0);
    assert!(!kinds(&later).contains(&"pushed".to_owned()), "{later:#?}");
    // The credentials reached neither the manifest nor the events.
    assert!(
        !serde_json::to_string(&w.seen)
            .unwrap_or_default()
            .contains("test-secret")
    );
    assert!(!b.read("pmesh.toml").contains("test-secret"));
    w.interrupt();
}

#[test]
fn webdav_watch_pushes_once_live_and_another_checkout_fetches_it() {
    let dav = Dav::start(None);
    let a = checkout(&dav.url(), "push = true", "true");
    let mut w = Watch::start(&a, &["--no-tui"], &[], &["app"]);
    w.wait_for(30.0, |e| e["event"] == "live")
        .unwrap_or_else(|| panic!("never live: {:#?}", w.seen));
    let pushed = w
        .wait_for(30.0, |e| e["event"] == "pushed")
        .unwrap_or_else(|| panic!("never pushed: {:#?}", w.seen));
    let id = a.read("app/.run/.buildid").trim().to_owned();
    assert_eq!(pushed["id"], id.as_str());
    w.interrupt();
    assert_eq!(objects(&dav.data()).len(), 1);

    let b = checkout(&dav.url(), "", "true");
    let run = build(&b, &[], &[]).ok();
    let events = run.json_lines();
    let fetched = events_of(&events, "fetched");
    assert_eq!(fetched.len(), 1, "{events:#?}");
    assert_eq!(
        fetched[0]["archive"],
        run_target(&b.join("app")).unwrap_or_default().as_str()
    );
    assert!(
        events_of(&events, "build_started").is_empty(),
        "{events:#?}"
    );
    assert!(!b.join("ran").exists(), "the second checkout's steps ran");
    assert_eq!(b.read("app/.run/version.txt"), "shared-v1\n");
    // Built or fetched, the archive is a normal one: `builds` lists it, live.
    let listed = b.run(&["builds", "--json"]).ok().stdout();
    assert!(
        listed.contains("\"live\":true") || listed.contains("\"live\": true"),
        "{listed}"
    );
}

#[test]
fn a_tampered_object_is_refused_and_the_build_runs_locally() {
    let s3 = S3::start();
    let a = checkout(
        &s3.url(),
        "",
        "head -c 200000 /dev/urandom > \\\"$PMESH_BUILD_DIR/blob\\\"",
    );
    build(&a, &["--push"], &s3.env()).ok();
    let obj = objects(&s3.data.join(BUCKET))
        .pop()
        .expect("the pushed object");
    let mut bytes = fs::read(&obj).expect("read object");
    let at = bytes.len() - 5000;
    bytes[at] ^= 0x55;
    fs::write(&obj, &bytes).expect("tamper");

    let b = checkout(
        &s3.url(),
        "",
        "head -c 200000 /dev/urandom > \\\"$PMESH_BUILD_DIR/blob\\\"",
    );
    let run = build(&b, &[], &s3.env()).ok();
    assert_built_locally(&b, &run, "refused");
    assert_ne!(
        fs::read(b.join("app/.run/blob")).ok(),
        fs::read(a.join("app/.run/blob")).ok()
    );
}

#[test]
fn a_truncated_upload_is_refused_and_the_build_runs_locally() {
    let s3 = S3::start();
    let a = checkout(
        &s3.url(),
        "",
        "head -c 300000 /dev/urandom > \\\"$PMESH_BUILD_DIR/blob\\\"",
    );
    build(&a, &["--push"], &s3.env()).ok();
    let obj = objects(&s3.data.join(BUCKET))
        .pop()
        .expect("the pushed object");
    let bytes = fs::read(&obj).expect("read object");
    fs::write(&obj, &bytes[..bytes.len() / 2]).expect("truncate");

    let b = checkout(
        &s3.url(),
        "",
        "head -c 300000 /dev/urandom > \\\"$PMESH_BUILD_DIR/blob\\\"",
    );
    let run = build(&b, &[], &s3.env()).ok();
    assert_built_locally(&b, &run, "cut short");
}

/// An Ed25519 key pair from openssl: (private key file, public key PEM).
fn keypair(t: &Tmp, name: &str) -> (PathBuf, String) {
    let key = t.join(name);
    let ok = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .expect("run openssl (the cache tests need it)");
    assert!(ok.success());
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&key)
        .output()
        .expect("run openssl");
    assert!(out.status.success());
    (key, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The base64 line of a PEM.
fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

#[test]
fn signatures_admit_the_trusted_key_and_refuse_any_other() {
    let dav = Dav::start(None);
    let keys = Tmp::new();
    let (a_key, a_pub) = keypair(&keys, "a.pem");
    let (_, other_pub) = keypair(&keys, "other.pem");
    let a = checkout(
        &dav.url(),
        &format!(
            "trusted_keys = [\"{}\"]\nsigning_key = \"{}\"",
            pem_body(&a_pub),
            a_key.display()
        ),
        "true",
    );
    let run = build(&a, &["--push"], &[]).ok();
    assert_eq!(events_of(&run.json_lines(), "pushed").len(), 1);
    assert_eq!(objects(&dav.data()).len(), 1);

    // Trusting another key: refused, built locally.
    let b = checkout(
        &dav.url(),
        &format!("trusted_keys = [\"{}\"]", pem_body(&other_pub)),
        "true",
    );
    let run = build(&b, &[], &[]).ok();
    assert_built_locally(&b, &run, "not signed by a trusted key");

    // Trusting the pusher's key (in PEM form this time): fetched.
    let c = checkout(
        &dav.url(),
        &format!("trusted_keys = [\"\"\"{a_pub}\"\"\"]"),
        "true",
    );
    let run = build(&c, &[], &[]).ok();
    assert_eq!(
        events_of(&run.json_lines(), "fetched").len(),
        1,
        "{}",
        run.stdout()
    );
    assert!(!c.join("ran").exists());

    // A pusher without the key that readers require uploads nothing, and says why.
    let d = checkout(
        &dav.url(),
        &format!("trusted_keys = [\"{}\"]", pem_body(&other_pub)),
        "echo different",
    );
    let run = build(&d, &["--push"], &[]).expect_code(1);
    assert!(run.stderr().contains("signing key"), "{}", run.stderr());
}

/// One member of a planted entry: path, kind, content or link target.
type Planted<'a> = (&'a str, tar::EntryType, &'a str);

/// An entry whose digest and header are right, holding `entries`, written straight into the
/// WebDAV store for build `id`.
fn plant(dav: &Dav, id: &str, entries: &[Planted]) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &str| {
        let mut h = tar::Header::new_gnu();
        // Written raw: the tar crate itself refuses to write `..`.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(0o644);
        if kind == tar::EntryType::Symlink {
            let link = &mut h.as_old_mut().linkname;
            link[..data.len()].copy_from_slice(data.as_bytes());
            h.set_size(0);
            h.set_cksum();
            tar.append(&h, std::io::empty()).expect("append");
        } else {
            h.set_size(data.len() as u64);
            h.set_cksum();
            tar.append(&h, data.as_bytes()).expect("append");
        }
    };
    add(".buildid", tar::EntryType::Regular, &format!("{id}\n"));
    for (p, k, d) in entries {
        add(p, *k, d);
    }
    let payload = zstd::encode_all(&tar.into_inner().expect("tar")[..], 3).expect("zstd");
    let sha: String = Sha256::digest(&payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let [v, platform, name] = pmesh_dev::cache::entry_name(id);
    let meta = serde_json::json!({
        "id": id, "platform": platform, "size": payload.len(), "sha256": sha,
    });
    let mut obj = b"pmesh-dev cache 1\n".to_vec();
    obj.extend(meta.to_string().as_bytes());
    obj.push(b'\n');
    obj.extend(&payload);
    let dir = dav.data().join(v).join(&platform);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join(name), obj).expect("plant");
}

#[test]
fn entries_that_climb_out_are_refused_and_write_nothing_outside() {
    let dav = Dav::start(None);
    let cases: &[(&str, &[Planted], &str)] = &[
        (
            "dotdot",
            &[("../../escaped.txt", tar::EntryType::Regular, "gotcha\n")],
            "leaves the archive",
        ),
        (
            "absolute-link",
            &[("evil", tar::EntryType::Symlink, "/etc")],
            "points outside",
        ),
        (
            "escaping-link",
            &[
                ("sub/evil", tar::EntryType::Symlink, "../../.."),
                ("sub/evil/escaped.txt", tar::EntryType::Regular, "gotcha\n"),
            ],
            "points outside",
        ),
        (
            "device",
            &[("dev", tar::EntryType::Char, "")],
            "character device",
        ),
    ];
    for (name, entries, refused) in cases {
        let t = checkout(&dav.url(), "", &format!("echo {name}"));
        let id = t.run(&["hash", "app"]).ok().stdout().trim().to_owned();
        plant(&dav, &id, entries);
        let run = build(&t, &[], &[]).ok();
        assert_built_locally(&t, &run, refused);
        for dir in [t.join("app/.pmesh"), t.join("app"), t.path().to_path_buf()] {
            assert!(
                !dir.join("escaped.txt").exists(),
                "{name}: a file escaped into {}",
                dir.display()
            );
        }
    }
}

#[test]
fn the_store_going_down_mid_download_leaves_no_partial_archive() {
    // 6 MB of noise at 1 MB/s: the download is under way for seconds.
    let mut dav = Dav::start(Some("1m"));
    let step = "head -c 6000000 /dev/urandom > \\\"$PMESH_BUILD_DIR/blob\\\"";
    let a = checkout(&dav.url(), "", step);
    build(&a, &["--push"], &[]).ok();

    let b = checkout(&dav.url(), "", step);
    let mut c = b.cmd(&["build", "--json"]);
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start build");
    let cache = b.join("app/.pmesh/cache");
    let started = wait_for(20.0, || {
        fs::read_dir(&cache).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("fetch-"))
        })
    });
    assert!(started, "the download never started");
    std::thread::sleep(Duration::from_millis(800));
    dav.kill();
    let t0 = Instant::now();
    let run = Run(child.wait_with_output().expect("wait for build"));
    assert_eq!(run.code(), 0, "{}", run.stderr());
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert_built_locally(&b, &run, "unreachable");
    let blob = fs::read(b.join("app/.run/blob")).expect("blob");
    assert_eq!(blob.len(), 6_000_000);
    assert_ne!(Some(blob), fs::read(a.join("app/.run/blob")).ok());
}

#[test]
fn an_unreachable_store_costs_one_warning_and_builds_go_on() {
    // A port with nothing behind it.
    let port = free_port();
    let t = checkout(
        &format!("http://127.0.0.1:{port}/cache"),
        "push = true",
        "true",
    );
    let t0 = Instant::now();
    let run = build(&t, &[], &[]).ok();
    assert!(t0.elapsed() < Duration::from_secs(15));
    let w = warnings(&run.json_lines());
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("unreachable"), "{w:?}");

    let mut watch = Watch::start(&t, &["--no-tui"], &[], &["app"]);
    watch
        .wait_for(30.0, |e| e["event"] == "live")
        .unwrap_or_else(|| panic!("never live: {:#?}", watch.seen));
    for v in ["v2", "v3"] {
        t.write("app/version.txt", &format!("{v}\n"));
        watch
            .wait_for(30.0, |e| e["event"] == "live")
            .expect("live again");
        std::thread::sleep(Duration::from_millis(300));
    }
    let w: Vec<String> = warnings(&watch.seen);
    assert_eq!(w.len(), 1, "one warning for the whole outage: {w:?}");
    watch.interrupt();
}

#[test]
fn a_store_that_accepts_but_never_answers_costs_a_bounded_wait() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // A store that hangs: it takes connections and says nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let hung = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    let t = checkout(&format!("http://127.0.0.1:{port}/cache"), "", "true");
    let t0 = Instant::now();
    let run = build(&t, &[], &[]).ok();
    let took = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    let _ = hung.join();
    // The lookup gives up after connect_timeout + 1 s, whatever the client's retries.
    assert!(took < Duration::from_secs(8), "took {took:?}");
    let w = warnings(&run.json_lines());
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("unreachable"), "{w:?}");
    assert_eq!(t.read("ran"), "ran\n");
}

#[test]
fn a_file_url_shares_builds_through_a_directory() {
    let store = Tmp::new();
    let url = format!("file://{}/shared", store.path().display());
    let a = checkout(&url, "push = true", "true");
    let events = build(&a, &[], &[]).ok().json_lines();
    assert_eq!(events_of(&events, "pushed").len(), 1, "{events:#?}");
    let b = checkout(&url, "", "true");
    let events = build(&b, &[], &[]).ok().json_lines();
    assert_eq!(events_of(&events, "fetched").len(), 1, "{events:#?}");
    assert!(!b.join("ran").exists());
    // Pushing again finds it there and uploads nothing.
    let events = build(&a, &["--push"], &[]).ok().json_lines();
    assert!(events_of(&events, "pushed").is_empty(), "{events:#?}");
}

#[test]
fn push_without_a_cache_table_is_a_usage_error() {
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    let run = t.run(&["build", "--push"]).expect_code(2);
    assert!(
        run.stderr().contains("needs a [cache] table"),
        "{}",
        run.stderr()
    );
    assert!(archives(&t.join("app")).is_empty(), "nothing was built");
}
