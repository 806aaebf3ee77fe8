//! One small real project per stack (fixtures/stacks/): `init` on a copy, then `watch`. Each
//! must be served through the proxy at the URL the `live` event names, serve an edit, serve the
//! older code after `rollback`, and run its install step once for two edits. The README's
//! recipes are these manifests.
//!
//! Packages come from the registries (express and vite from npm, flask from PyPI) through the
//! tools' own caches, so a second run needs no network; with no registry and a cold cache the
//! install step fails and the test says so.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

/// How long a first build may take: it installs packages (from a cache when it can).
const FIRST_BUILD_SECS: f64 = 240.0;

/// The project `fixtures/stacks/<name>` copied to `t/<name>`, with `init` run in it. Returns
/// its directory, the manifest `init` wrote, and what `init` printed.
fn init_stack(t: &Tmp, name: &str) -> (PathBuf, String, String) {
    let dir = t.join(name);
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/stacks")
            .join(name),
        &dir,
    );
    let out = Command::new(bin())
        .arg("init")
        .current_dir(&dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run pmesh-dev init");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "init failed: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = std::fs::read_to_string(dir.join("pmesh.toml")).expect("init wrote pmesh.toml");
    (dir, manifest, said)
}

fn copy_tree(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).expect("create dest");
    for e in std::fs::read_dir(src).expect("list fixture").flatten() {
        let to = dest.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            copy_tree(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).expect("copy file");
        }
    }
}

/// Moves the `listen = N` that `init` wrote to a free port (tests run side by side), and makes
/// the install step count its runs in `t/<service>.installs`, outside the service's tree.
/// Returns the new manifest.
fn adapt(manifest: &str, listens: &[(&str, u16)]) -> String {
    let mut out = String::new();
    let mut service = String::new();
    for line in manifest.lines() {
        if let Some(name) = line
            .strip_prefix("[services.")
            .and_then(|l| l.strip_suffix(']'))
        {
            service = name.to_owned();
        }
        if line.starts_with("listen = ") {
            let port = listens
                .iter()
                .find(|(s, _)| *s == service)
                .map(|(_, p)| *p)
                .unwrap_or_else(|| panic!("no port given for {service}"));
            out.push_str(&format!("listen = {port}\n"));
            continue;
        }
        // The install runs in the service's root: the counter goes beside the project.
        let up = if manifest.contains("root = '.'") {
            ".."
        } else {
            "../.."
        };
        if let Some(cmd) = line
            .strip_prefix("install = '")
            .and_then(|l| l.strip_suffix('\''))
        {
            // The tool is still the first word, so the default inputs stay the same.
            out.push_str(&format!(
                "install = '{cmd} && echo ran >> {up}/{service}.installs'\n"
            ));
            continue;
        }
        if let Some(rest) = line.strip_prefix("install = { run = '")
            && let Some((cmd, tail)) = rest.split_once('\'')
        {
            out.push_str(&format!(
                "install = {{ run = '{cmd} && echo ran >> {up}/{service}.installs'{tail}\n"
            ));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// How many times the install step of `service` ran.
fn installs(t: &Tmp, service: &str) -> usize {
    std::fs::read_to_string(t.join(&format!("{service}.installs")))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// `GET url` (an `http://127.0.0.1:PORT/path` URL) on a fresh connection, as a browser
/// navigates: (status, head, body).
fn get(url: &str) -> (u16, String, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let Ok(mut s) = TcpStream::connect(host) else {
        return (0, String::new(), String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/html,*/*;q=0.8\r\nConnection: close\r\n\r\n"
    );
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let out = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = (head.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, head.to_owned(), body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Waits for `service` to go live with a build other than `not`, returning the event. On a
/// failed build, panics with its output: a registry that cannot be reached shows there.
fn wait_live(w: &mut Watch, service: &str, not: Option<&str>, secs: f64) -> serde_json::Value {
    let found = w.wait_for(secs, |e| {
        e["service"] == service
            && (e["event"] == "live" && not.is_none_or(|n| e["id"] != n)
                || e["event"] == "build_finished" && e["ok"] == false)
    });
    match found {
        Some(e) if e["event"] == "live" => e,
        other => {
            let lines: Vec<&str> = w
                .seen
                .iter()
                .filter(|e| e["service"] == service && e["event"] == "output")
                .filter_map(|e| e["line"].as_str())
                .collect();
            panic!(
                "{service} did not go live ({}). If its install step failed, the package \
                 registry (npm, PyPI) may be unreachable with nothing in the local cache.\n\
                 --- its output\n{}\n--- events\n{:#?}",
                match other {
                    Some(_) => "the build failed",
                    None => "timed out",
                },
                lines.join("\n"),
                w.seen
            )
        }
    }
}

/// The body served at the live event's URL (and `path`), waiting for `want` in it.
fn served(live: &serde_json::Value, path: &str, want: &str) -> String {
    let url = live["url"]
        .as_str()
        .unwrap_or_else(|| panic!("the live event names the proxy's URL: {live}"));
    let url = format!("{}{path}", url.trim_end_matches('/'));
    let mut last = (0, String::new(), String::new());
    let ok = wait_for(10.0, || {
        last = get(&url);
        last.0 == 200 && last.2.contains(want)
    });
    assert!(
        ok,
        "GET {url}: expected 200 with {want:?}, got {} {:?}",
        last.0, last.2
    );
    last.2
}

/// Replaces `from` with `to` in `dir/file`.
fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let p = dir.join(file);
    let text = std::fs::read_to_string(&p).expect("read for edit");
    assert!(text.contains(from), "{file} has {from:?}");
    std::fs::write(&p, text.replace(from, to)).expect("write edit");
}

fn require_tool(tool: &str, why: &str) {
    let found = Command::new(tool)
        .arg(if tool == "go" { "version" } else { "--version" })
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "`{tool}` is needed for this test ({why})");
}

/// The whole walk for a one-service stack: init, watch, served, two edits of `file` served
/// (the second rebuild timed against `max_build_ms`), the install run once, and rollback
/// serving the first edit's code again. Each version of `file` has `vN` and is served as
/// `hello from <stack> vN`. `check` looks at the first live build further. `input` is an edit
/// (file, from, to) of one of the install step's inputs, made last: the install runs again.
fn walk(
    stack: &str,
    file: &str,
    max_build_ms: u64,
    check: impl Fn(&serde_json::Value),
    input: Option<(&str, &str, &str)>,
) {
    let t = Tmp::new();
    let (_, manifest, said) = init_stack(&t, stack);
    assert!(
        said.contains("http://127.0.0.1:"),
        "init says where to open it: {said}"
    );
    assert!(!said.contains("warning"), "nothing to fix first: {said}");
    assert!(
        manifest.lines().any(|l| l.starts_with("listen = ")),
        "listen is written, not commented out:\n{manifest}"
    );
    assert!(
        manifest
            .lines()
            .filter(|l| l.starts_with("run = "))
            .all(|l| l.contains("$PMESH_RUN_DIR") && !l.contains(".run/")),
        "the instance starts from its archive, not .run/ (it moves before a build is \
         proven):\n{manifest}"
    );
    let has_install = manifest.lines().any(|l| l.starts_with("install = "));
    let port = free_port();
    let dir = t.join(stack);
    std::fs::write(dir.join("pmesh.toml"), adapt(&manifest, &[(stack, port)])).expect("write");
    let manifest_arg = format!("{stack}/pmesh.toml");
    let mut w = Watch::start(&t, &["--manifest", &manifest_arg], &ENV, &[stack]);
    let hello = |n: u32| format!("hello from {stack} v{n}");

    let first = wait_live(&mut w, stack, None, FIRST_BUILD_SECS);
    assert_eq!(
        first["url"].as_str(),
        Some(format!("http://127.0.0.1:{port}").as_str()),
        "{first}"
    );
    served(&first, "/", &hello(1));
    check(&first);

    edit(&dir, file, "v1", "v2");
    let second = wait_live(&mut w, stack, first["id"].as_str(), 120.0);
    served(&second, "/", &hello(2));

    let saved = Instant::now();
    edit(&dir, file, "v2", "v3");
    let third = wait_live(&mut w, stack, second["id"].as_str(), 120.0);
    served(&third, "/", &hello(3));
    let took = saved.elapsed();
    let build = w
        .seen
        .iter()
        .rev()
        .find(|e| e["event"] == "build_finished" && e["id"] == third["id"])
        .cloned()
        .unwrap_or_else(|| panic!("no build_finished for {third}"));
    let build_ms = build["duration_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(
        build_ms < max_build_ms,
        "a rebuild of {stack} took {build_ms} ms (save to served: {took:?})"
    );
    let builds = w
        .seen
        .iter()
        .filter(|e| e["event"] == "build_started")
        .count();
    assert_eq!(
        builds, 3,
        "one build at start and one per save: nothing the build writes triggers another"
    );
    if has_install {
        assert_eq!(
            installs(&t, stack),
            1,
            "the install step runs once, not for each edit"
        );
    }

    rollback(&t, &manifest_arg, &[]);
    let back = wait_live(&mut w, stack, third["id"].as_str(), 60.0);
    assert_eq!(
        back["id"], second["id"],
        "rollback goes to the previous build"
    );
    served(&back, "/", &hello(2));

    if let Some((input, from, to)) = input {
        edit(&dir, input, from, to);
        let next = wait_live(&mut w, stack, back["id"].as_str(), FIRST_BUILD_SECS);
        served(&next, "/", &hello(3));
        assert_eq!(
            installs(&t, stack),
            2,
            "an edit of {input} runs the install step again"
        );
    }
    assert_eq!(w.interrupt(), Some(0));
}

/// The environment of the watch: npm uses its cache before the registry.
const ENV: [(&str, &str); 1] = [("npm_config_prefer_offline", "true")];

/// `pmesh-dev --manifest M rollback args...`, carried out by the running watch.
fn rollback(t: &Tmp, manifest: &str, args: &[&str]) {
    let r = Command::new(bin())
        .args(["--manifest", manifest, "rollback"])
        .args(args)
        .current_dir(t.path())
        .env("NO_COLOR", "1")
        .output()
        .expect("run rollback");
    assert!(r.status.success(), "rollback {args:?}: {r:?}");
}

// An interpreted app's rebuild is a copy: well under a second.
const INTERPRETED_MS: u64 = 1000;
// A compiled one is what its compiler takes, on a busy machine.
const COMPILED_MS: u64 = 60_000;

#[test]
fn express_app_is_served_edited_and_rolled_back() {
    require_tool("npm", "the Express fixture installs express");
    walk(
        "express",
        "server.js",
        INTERPRETED_MS,
        |_| {},
        Some((
            "package.json",
            "\"private\": true,",
            "\"private\": true,\n  \"description\": \"edited\",",
        )),
    );
}

#[test]
fn flask_app_is_served_edited_and_rolled_back() {
    require_tool("python3", "the Flask fixture makes a venv");
    walk(
        "flask",
        "app.py",
        INTERPRETED_MS,
        |_| {},
        Some(("requirements.txt", "flask>=3,<4", "flask>=3.0,<4")),
    );
}

#[test]
fn rust_binary_is_served_edited_and_rolled_back() {
    walk("rust", "src/main.rs", COMPILED_MS, |_| {}, None);
}

#[test]
fn go_binary_is_served_edited_and_rolled_back() {
    require_tool("go", "Debian's golang-go; .ci/run installs it");
    walk("go", "main.go", COMPILED_MS, |_| {}, None);
}

#[test]
fn vite_app_is_served_as_a_single_page_app_edited_and_rolled_back() {
    require_tool("npm", "the Vite fixture installs vite");
    let check = |live: &serde_json::Value| {
        // Any route is the app's: the page, whose script Vite built into assets/.
        let page = served(live, "/some/client/route", "hello from vite");
        let script = page
            .split('"')
            .find(|s| s.starts_with("/assets/") && s.ends_with(".js"))
            .unwrap_or_else(|| panic!("the built page loads its script from /assets/: {page}"));
        served(live, script, "location.pathname");
    };
    walk("vite", "index.html", 30_000, check, None);
}

#[test]
fn two_packages_get_a_service_and_a_port_each() {
    require_tool("npm", "the api package is a Node one");
    require_tool("python3", "the web package makes a venv");
    let t = Tmp::new();
    let (dir, manifest, said) = init_stack(&t, "two");
    for (svc, root) in [("api", "root = 'api'"), ("web", "root = 'web'")] {
        assert!(
            manifest.contains(&format!("[services.{svc}]")),
            "{manifest}"
        );
        assert!(manifest.contains(root), "{manifest}");
        assert!(
            said.lines()
                .any(|l| l.contains(svc) && l.contains("http://127.0.0.1:")),
            "init names {svc}'s URL: {said}"
        );
    }
    let listens: Vec<&str> = manifest
        .lines()
        .filter(|l| l.starts_with("listen = "))
        .collect();
    assert_eq!(listens.len(), 2, "a port each: {listens:?}");
    assert_ne!(listens[0], listens[1], "a port each: {listens:?}");
    let (api_port, web_port) = (free_port(), free_port());
    std::fs::write(
        dir.join("pmesh.toml"),
        adapt(&manifest, &[("api", api_port), ("web", web_port)]),
    )
    .expect("write");
    let mut w = Watch::start(&t, &["--manifest", "two/pmesh.toml"], &ENV, &["api", "web"]);
    let api = wait_live(&mut w, "api", None, FIRST_BUILD_SECS);
    let web = wait_live(&mut w, "web", None, FIRST_BUILD_SECS);
    served(&api, "/", "api v1");
    served(&web, "/", "web v1");
    assert_eq!(api["url"], format!("http://127.0.0.1:{api_port}"));
    assert_eq!(web["url"], format!("http://127.0.0.1:{web_port}"));

    let web_builds = |w: &Watch| {
        w.seen
            .iter()
            .filter(|e| e["event"] == "build_started" && e["service"] == "web")
            .count()
    };
    let before = web_builds(&w);
    edit(&dir, "api/index.js", "\"v1\"", "\"v2\"");
    let api2 = wait_live(&mut w, "api", api["id"].as_str(), 60.0);
    served(&api2, "/", "api v2");
    served(&web, "/", "web v1");
    assert_eq!(
        web_builds(&w),
        before,
        "an edit in api/ does not rebuild web"
    );

    rollback(&t, "two/pmesh.toml", &["api"]);
    let back = wait_live(&mut w, "api", api2["id"].as_str(), 60.0);
    served(&back, "/", "api v1");
    assert_eq!(installs(&t, "api"), 1);
    assert_eq!(installs(&t, "web"), 1);
    assert_eq!(w.interrupt(), Some(0));
}

/// The README's recipes (each after a `<!-- recipe: NAME -->` line) are what `init` writes for
/// `fixtures/stacks/NAME` (its comments left out, `listen` from 8080 in order): the manifests
/// the tests above run.
#[test]
fn readme_recipes_are_what_init_writes() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    for stack in ["express", "vite", "flask", "rust", "go", "two"] {
        let marker = format!("<!-- recipe: {stack} -->\n```toml\n");
        let start = readme
            .find(&marker)
            .unwrap_or_else(|| panic!("README.md has no recipe for {stack}"))
            + marker.len();
        let documented = &readme[start..start + readme[start..].find("```").unwrap_or(0)];
        let t = Tmp::new();
        let (_, manifest, _) = init_stack(&t, stack);
        let mut port = 8080;
        let mut written = String::new();
        for line in manifest.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("listen = ") {
                written.push_str(&format!("listen = {port}\n"));
                port += 1;
            } else {
                written.push_str(line);
                written.push('\n');
            }
        }
        assert_eq!(
            documented, written,
            "README.md's {stack} recipe (left) is not what init writes (right)"
        );
    }
}

/// `init` in `t/rel`, made of `files`: the manifest's service table, checked to load.
fn guess(t: &Tmp, rel: &str, files: &[(&str, &str)]) -> toml::Table {
    for (f, text) in files {
        t.write(&format!("{rel}/{f}"), text);
    }
    let dir = t.join(rel);
    let out = Command::new(bin())
        .arg("init")
        .current_dir(&dir)
        .output()
        .expect("run init");
    assert!(out.status.success(), "init in {rel}: {out:?}");
    let hash = Command::new(bin())
        .arg("hash")
        .current_dir(&dir)
        .output()
        .expect("run hash");
    assert!(
        hash.status.success(),
        "the manifest for {rel} loads: {hash:?}"
    );
    let text = std::fs::read_to_string(dir.join("pmesh.toml")).expect("pmesh.toml");
    let m: toml::Table = text.parse().expect("TOML");
    let services = m["services"].as_table().expect("services");
    assert_eq!(services.len(), 1, "{text}");
    services
        .values()
        .next()
        .and_then(|s| s.as_table())
        .cloned()
        .expect("a service table")
}

fn key<'a>(svc: &'a toml::Table, k: &str) -> &'a str {
    svc.get(k).and_then(|v| v.as_str()).unwrap_or("")
}

#[test]
fn init_installs_with_the_package_manager_whose_lockfile_is_there() {
    let t = Tmp::new();
    let pkg = r#"{"scripts": {"start": "node app.js"}, "dependencies": {"express": "4"}}"#;
    for (rel, lock, install) in [
        ("npm", "package-lock.json", "npm ci"),
        ("pnpm", "pnpm-lock.yaml", "pnpm install --frozen-lockfile"),
        ("yarn", "yarn.lock", "yarn install"),
        ("bun", "bun.lock", "bun install --frozen-lockfile"),
    ] {
        let svc = guess(&t, rel, &[("package.json", pkg), (lock, "")]);
        assert_eq!(key(&svc, "install"), install, "{rel}: {svc:?}");
        assert_eq!(key(&svc, "run"), r#"exec node "$PMESH_RUN_DIR/app.js""#);
    }
    // A start script that is not `node FILE` runs in the archive.
    let svc = guess(
        &t,
        "tsx",
        &[(
            "package.json",
            r#"{"scripts": {"start": "tsx src/main.ts"}}"#,
        )],
    );
    assert_eq!(key(&svc, "run"), r#"cd "$PMESH_RUN_DIR" && exec npm start"#);
    // Vite with pnpm runs pnpm's vite.
    let svc = guess(
        &t,
        "vite-pnpm",
        &[
            ("package.json", r#"{"devDependencies": {"vite": "6"}}"#),
            ("pnpm-lock.yaml", ""),
        ],
    );
    let build = svc["build"].as_array().expect("build list");
    assert!(
        build[0]
            .as_str()
            .unwrap_or("")
            .starts_with("pnpm exec vite build --outDir"),
        "{build:?}"
    );
    assert_eq!(key(&svc, "static"), "dist");
}

#[test]
fn init_recognises_fastapi_django_and_a_pyproject() {
    let t = Tmp::new();
    let svc = guess(
        &t,
        "fast",
        &[
            ("requirements.txt", "fastapi[standard]\n"),
            ("main.py", "from fastapi import FastAPI\napi = FastAPI()\n"),
        ],
    );
    assert_eq!(
        key(&svc, "run"),
        r#"exec .venv/bin/python -m uvicorn --app-dir "$PMESH_RUN_DIR" main:api --host "$HOST" --port "$PORT""#
    );
    let svc = guess(
        &t,
        "dj",
        &[("requirements.txt", "Django>=5\n"), ("manage.py", "")],
    );
    assert!(
        key(&svc, "run").contains(r#""$PMESH_RUN_DIR/manage.py" runserver --noreload"#),
        "{svc:?}"
    );
    // Dependencies on one line of pyproject.toml; flask-cors is not flask.
    let svc = guess(
        &t,
        "pyproj",
        &[
            (
                "pyproject.toml",
                "[project]\nname = \"x\"\ndependencies = [\"flask>=3\", \"flask-cors\"]\n",
            ),
            ("app.py", "from flask import Flask\napp = Flask(__name__)\n"),
        ],
    );
    assert!(key(&svc, "run").contains("-m flask --app"), "{svc:?}");
    assert!(key(&svc, "install").ends_with("pip install ."), "{svc:?}");
    let svc = guess(&t, "cors", &[("requirements.txt", "flask-cors\n")]);
    assert!(!key(&svc, "run").contains("flask"), "{svc:?}");
}

#[test]
fn init_with_a_manifest_flag_writes_that_file_for_its_directory() {
    let t = Tmp::new();
    copy_tree(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/stacks/go"),
        &t.join("svc"),
    );
    let r = t.run(&["--manifest", "svc/dev.toml", "init"]).ok();
    assert!(r.stdout().contains("svc/dev.toml"), "{}", r.stdout());
    assert!(!t.join("svc/pmesh.toml").exists(), "writes the file named");
    let m: toml::Table = t.read("svc/dev.toml").parse().expect("TOML");
    assert!(m["services"].get("svc").is_some(), "guessed from svc/: {m}");
    assert!(t.read("svc/.gitignore").contains(".pmesh/"));
    // It loads as the manifest it was written as.
    t.run(&["--manifest", "svc/dev.toml", "hash"]).ok();
}

#[test]
fn a_plain_static_site_is_served_by_pmesh_dev() {
    let t = Tmp::new();
    let svc = guess(
        &t,
        "site",
        &[("index.html", "<h1>hello from site v1</h1>\n")],
    );
    assert_eq!(key(&svc, "static"), ".");
    let port = free_port();
    let text = t.read("site/pmesh.toml");
    std::fs::write(t.join("site/pmesh.toml"), adapt(&text, &[("site", port)])).expect("write");
    let mut w = Watch::start(&t, &["--manifest", "site/pmesh.toml"], &ENV, &["site"]);
    let live = wait_live(&mut w, "site", None, 60.0);
    served(&live, "/", "hello from site v1");
    edit(&t.join("site"), "index.html", "v1", "v2");
    let next = wait_live(&mut w, "site", live["id"].as_str(), 60.0);
    served(&next, "/", "hello from site v2");
    assert_eq!(w.interrupt(), Some(0));
}

#[test]
fn init_warns_about_an_app_that_never_reads_port() {
    let t = Tmp::new();
    t.write(
        "fixed/package.json",
        r#"{"scripts": {"start": "node s.js"}}"#,
    );
    t.write(
        "fixed/s.js",
        "require('http').createServer().listen(3000)\n",
    );
    let r = t
        .cmd(&["--manifest", "fixed/pmesh.toml", "init"])
        .output()
        .expect("run init");
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(
        said.contains("warning: fixed: s.js never reads PORT"),
        "init says what to fix: {said}"
    );
    assert!(
        t.read("fixed/pmesh.toml")
            .contains("# WARNING: s.js never reads PORT")
    );
}

#[test]
fn a_cargo_workspace_builds_and_runs_its_binary_member() {
    let t = Tmp::new();
    let server = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/stacks/rust/src/main.rs"),
    )
    .expect("read the Rust fixture");
    let svc = guess(
        &t,
        "ws",
        &[
            (
                "Cargo.toml",
                "[workspace]\nmembers = [\"crates/*\"]\nresolver = \"2\"\n",
            ),
            (
                "crates/core/Cargo.toml",
                "[package]\nname = \"core-lib\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
            ),
            ("crates/core/src/lib.rs", "pub fn x() {}\n"),
            (
                "crates/server/Cargo.toml",
                "[package]\nname = \"server\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
            ),
            ("crates/server/src/main.rs", &server),
        ],
    );
    let build: Vec<&str> = svc["build"]
        .as_array()
        .expect("build list")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(build[0], "cargo build -p server", "{build:?}");
    assert_eq!(key(&svc, "run"), r#"exec "$PMESH_RUN_DIR/server""#);
    // The root is the workspace: an edit of the library rebuilds too. And it builds.
    assert_eq!(key(&svc, "root"), ".");
    let r = Command::new(bin())
        .arg("build")
        .current_dir(t.join("ws"))
        .output()
        .expect("run build");
    assert!(r.status.success(), "the guessed build works: {r:?}");
    assert!(
        t.join("ws/.run/server").is_file(),
        "the binary is in the build"
    );
}
