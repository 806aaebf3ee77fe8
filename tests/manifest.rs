//! `pmesh.toml`: every bad manifest exits 2 and points at the offending spot; finding the
//! manifest; `--manifest`; unknown services; and `pmesh-dev init`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::util::*;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs `pmesh-dev args` in `dir`.
fn run_in(t: &Tmp, dir: &Path, args: &[&str]) -> Run {
    let mut c = t.cmd(args);
    c.current_dir(dir);
    Run(c.output().expect("run pmesh-dev"))
}

/// The manifest path as pmesh-dev names it in messages.
fn manifest_path(t: &Tmp, rel: &str) -> PathBuf {
    t.path().canonicalize().expect("canonical tmp").join(rel)
}

/// Asserts that `stderr` locates an error at `file:line:col`, shows that line of `src` and puts
/// a caret under the column.
fn assert_located(stderr: &str, file: &Path, src: &str, line: usize, col: usize) {
    let loc = format!("{}:{line}:{col}: ", file.display());
    assert!(
        stderr.contains(&loc),
        "expected the location `{loc}` in stderr, got:\n{stderr}"
    );
    let text = src.lines().nth(line - 1).unwrap_or("");
    let shown = format!("{line} | {text}");
    let lines: Vec<&str> = stderr.lines().collect();
    let Some(i) = lines.iter().position(|l| *l == shown) else {
        panic!("expected the offending line `{shown}` in stderr, got:\n{stderr}");
    };
    let caret = lines.get(i + 1).copied().unwrap_or("");
    let under = caret.split_once(" | ").map_or("", |(_, c)| c);
    let want = format!("{}^", " ".repeat(col - 1));
    assert!(
        under.starts_with(&want) && caret.trim_start().starts_with('|'),
        "expected a caret under column {col} after `{shown}`, got `{caret}` in:\n{stderr}"
    );
}

/// Writes `src` as `pmesh.toml` (with directories `app`, `web` and `api` present), runs
/// `pmesh-dev hash` and checks exit 2, the location, the line shown and every needle.
fn expect_bad(src: &str, line: usize, col: usize, needles: &[&str]) -> String {
    let t = Tmp::new();
    for d in ["app", "web", "api"] {
        fs::create_dir_all(t.join(d)).unwrap();
    }
    t.write("pmesh.toml", src);
    let r = t.run(&["hash"]).expect_code(2);
    let err = r.stderr();
    assert_located(&err, &manifest_path(&t, "pmesh.toml"), src, line, col);
    for n in needles {
        assert!(
            err.contains(n),
            "expected `{n}` in the error for\n{src}\ngot:\n{err}"
        );
    }
    assert!(r.stdout().is_empty(), "nothing on stdout: {}", r.stdout());
    err
}

/// [`git_untracked_bytes`] as strings.
fn git_untracked(dir: &Path, home: &Path) -> Vec<String> {
    git_untracked_bytes(dir, home)
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Bad manifests: exit 2 with file:line:col and the line shown
// ---------------------------------------------------------------------------------------------

#[test]
fn toml_syntax_errors_are_located() {
    expect_bad("[services.app]\nbuild = \"echo hi\n", 2, 17, &[]);
    expect_bad(
        "[services.app]\nbuild = \"x\"\nkeep = 1\nkeep = 2\n",
        4,
        1,
        &[],
    );
    expect_bad("[services.app\nbuild = \"x\"\n", 1, 14, &[]);
}

#[test]
fn unknown_keys_suggest_the_known_one() {
    expect_bad(
        "[services.app]\nbuild = \"x\"\nlisen = 8080\n",
        3,
        1,
        &["unknown key `lisen`", "did you mean `listen`?"],
    );
    expect_bad(
        "[servics.app]\nbuild = \"x\"\n",
        1,
        2,
        &["unknown key `servics`", "did you mean `services`?"],
    );
    expect_bad(
        "services.app.build = \"x\"\nservices.app.debouce = \"5ms\"\n",
        2,
        14,
        &["did you mean `debounce`?"],
    );
    // CRLF line endings: the same location, the line shown without its CR.
    expect_bad(
        "[services.app]\r\nbuild = \"x\"\r\nlisen = 8080\r\n",
        3,
        1,
        &["did you mean `listen`?"],
    );
    // Far from any key: the known keys are listed instead.
    let err = expect_bad(
        "[services.app]\nbuild = \"x\"\nzzzzzzzz = 1\n",
        3,
        1,
        &["unknown key `zzzzzzzz`"],
    );
    assert!(
        err.contains("listen") && err.contains("debounce"),
        "the known keys are listed: {err}"
    );
}

#[test]
fn errors_in_a_later_service_point_at_their_own_line() {
    let src = "# two services\n\
               [services.web]\n\
               build = \"make\"\n\
               \n\
               [services.api]\n\
               build = [\"a\", \"b\"]\n\
               run = \"serve\"\n\
               biuld = \"x\"\n";
    expect_bad(src, 8, 1, &["unknown key `biuld`", "did you mean `build`?"]);
}

#[test]
fn wrong_types_are_located() {
    expect_bad(
        "[services.app]\nbuild = \"x\"\nkeep = \"two\"\n",
        3,
        8,
        &["wrong type"],
    );
    expect_bad("[services.app]\nbuild = 5\n", 2, 9, &["wrong type"]);
    expect_bad(
        "[services.app]\nbuild = \"x\"\nreload = \"no\"\n",
        3,
        10,
        &["wrong type"],
    );
    expect_bad(
        "[services.app]\nbuild = \"x\"\nkeep = 1.5\n",
        3,
        8,
        &["wrong type"],
    );
    expect_bad(
        "[services.app]\nbuild = \"x\"\nignore = \"*.log\"\n",
        3,
        10,
        &["wrong type"],
    );
    // The column counts characters, not bytes: `ünï` is 3 characters and 5 bytes.
    expect_bad(
        "[services.app]\nbuild = \"x\"\nenv = { NAME = \"ünï\", B = 1 }\n",
        3,
        27,
        &["wrong type"],
    );
}

#[test]
fn bad_durations_are_located() {
    for (src, col, needle) in [
        ("debounce = \"5\"", 12, "`5`"),
        ("ready_timeout = \"fast\"", 17, "`fast`"),
        ("stop_timeout = \"1.5s\"", 16, "`1.5s`"),
        ("debounce = \"-5ms\"", 12, "`-5ms`"),
        ("debounce = \"5 ms\"", 12, "`5 ms`"),
        (
            "ready_timeout = \"99999999999999999999h\"",
            17,
            "invalid duration",
        ),
        ("stop_timeout = 10", 16, "unit"),
    ] {
        let full = format!("[services.app]\nbuild = \"x\"\n{src}\n");
        expect_bad(&full, 3, col, &[needle]);
    }
}

#[test]
fn good_durations_load() {
    let t = Tmp::new();
    one_service(
        &t,
        &["true"],
        "debounce = \"50ms\"\nready_timeout = \"30s\"\nstop_timeout = \"2m\"",
    );
    t.run(&["hash"]).ok();
}

#[test]
fn ports_out_of_range_are_located() {
    for (value, needle) in [
        ("70000", "70000"),
        ("0", "port 0"),
        ("-1", "-1"),
        ("65536", "65536"),
        ("\"127.0.0.1:0\"", "port 0"),
    ] {
        let src = format!("[services.app]\nbuild = \"x\"\nlisten = {value}\n");
        expect_bad(&src, 3, 10, &[needle, "1-65535"]);
    }
    let src = "[services.app]\nbuild = \"x\"\nlisten = \"nope\"\n";
    expect_bad(src, 3, 10, &["`nope`"]);
    // The edges are fine.
    for value in ["1", "65535", "\"0.0.0.0:8080\"", "\"[::1]:8080\""] {
        let t = Tmp::new();
        one_service(&t, &["true"], &format!("listen = {value}"));
        t.run(&["hash"]).ok();
    }
}

#[test]
fn bad_health_checks_are_located() {
    for value in ["POST /x", "GET healthz", "http://x/", "GET /a b", ""] {
        let src = format!("[services.app]\nbuild = \"x\"\nhealth = \"{value}\"\n");
        expect_bad(&src, 3, 10, &["health", "GET /path"]);
    }
    for value in ["tcp", "GET /healthz", "GET /"] {
        let t = Tmp::new();
        one_service(&t, &["true"], &format!("health = \"{value}\""));
        t.run(&["hash"]).ok();
    }
}

#[test]
fn a_missing_root_names_the_service_and_the_resolved_path() {
    let t = Tmp::new();
    let src = "[services.app]\nbuild = \"x\"\nroot = \"nope/deeper\"\n";
    t.write("pmesh.toml", src);
    let err = t.run(&["hash"]).expect_code(2).stderr();
    assert_located(&err, &manifest_path(&t, "pmesh.toml"), src, 3, 8);
    let resolved = manifest_path(&t, "nope/deeper");
    for n in ["`app`", "does not exist", &resolved.display().to_string()] {
        assert!(err.contains(n), "expected `{n}` in:\n{err}");
    }

    // The default root is the service's name, resolved next to the manifest.
    let t = Tmp::new();
    let src = "[services.web]\nbuild = \"x\"\n";
    t.write("pmesh.toml", src);
    let err = t.run(&["hash"]).expect_code(2).stderr();
    assert_located(&err, &manifest_path(&t, "pmesh.toml"), src, 1, 11);
    let resolved = manifest_path(&t, "web");
    for n in ["`web`", &resolved.display().to_string()] {
        assert!(err.contains(n), "expected `{n}` in:\n{err}");
    }

    // A root that is a file.
    let t = Tmp::new();
    t.write("afile", "x");
    let src = "[services.app]\nbuild = \"x\"\nroot = \"afile\"\n";
    t.write("pmesh.toml", src);
    let err = t.run(&["hash"]).expect_code(2).stderr();
    assert_located(&err, &manifest_path(&t, "pmesh.toml"), src, 3, 8);
    assert!(err.contains("not a directory"), "{err}");
}

#[test]
fn no_services_at_all() {
    for src in ["", "# nothing here\n", "[services]\n"] {
        expect_bad(src, 1, 1, &["no services"]);
    }
}

#[test]
fn keep_below_one_is_rejected() {
    for value in ["0", "-3"] {
        let src = format!("[services.app]\nbuild = \"x\"\nkeep = {value}\n");
        expect_bad(&src, 3, 8, &["at least 1"]);
    }
    let t = Tmp::new();
    one_service(&t, &["true"], "keep = 1");
    t.run(&["hash"]).ok();
}

#[test]
fn invalid_service_names_are_located() {
    for name in ["we b", "a.b", "ünï", "", "semi;colon", "a/b"] {
        let src = format!("[services.\"{name}\"]\nbuild = \"x\"\nroot = \"app\"\n");
        expect_bad(&src, 1, 11, &["invalid service name"]);
    }
    // Letters, digits, `_` and `-` are fine.
    let t = Tmp::new();
    fs::create_dir_all(t.join("app")).unwrap();
    t.write(
        "pmesh.toml",
        "[services.Web_2-x]\nbuild = \"x\"\nroot = \"app\"\n",
    );
    t.run(&["hash"]).ok();
}

#[test]
fn other_invalid_services_are_located() {
    expect_bad(
        "[services.app]\nlisten = 8080\n",
        1,
        1,
        &["`app`", "neither `build` nor `run`"],
    );
    expect_bad(
        "[services.app]\nbuild = [\"ok\", \"  \"]\n",
        2,
        9,
        &["`app`", "empty"],
    );
    expect_bad(
        "[services.app]\nbuild = \"x\"\n\n[services.web]\nroot = \"app\"\nbuild = \"y\"\n",
        5,
        8,
        &["`app`", "`web`", "share"],
    );
    expect_bad(
        "[services.app]\nbuild = \"x\"\nignore = [\"ok\", \"\\\\\"]\n",
        3,
        17,
        &["ignore pattern"],
    );
}

#[test]
fn every_command_rejects_a_bad_manifest_before_doing_anything() {
    let t = Tmp::new();
    fs::create_dir_all(t.join("app")).unwrap();
    t.write("app/index.html", "hi");
    let src = "[services.app]\nbuild = \"touch built\"\nlisen = 8080\n";
    t.write("pmesh.toml", src);
    let file = manifest_path(&t, "pmesh.toml");
    for args in [
        &["hash"][..],
        &["hash", "app"],
        &["build"],
        &["build", "app"],
        &["builds"],
        &["rollback"],
    ] {
        let r = t.run(args).expect_code(2);
        let err = r.stderr();
        assert_located(&err, &file, src, 3, 1);
        assert!(
            err.contains("did you mean `listen`"),
            "{args:?}: the same message: {err}"
        );
    }
    let left: Vec<String> = fs::read_dir(t.join("app"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        ["index.html"],
        "a bad manifest must leave the service root untouched"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding the manifest, --manifest, service names
// ---------------------------------------------------------------------------------------------

#[test]
fn manifest_is_found_from_a_subdirectory() {
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    t.write("app/sub/deeper/file.txt", "x");
    let top = t.run(&["hash"]).ok().stdout();
    for dir in ["app", "app/sub", "app/sub/deeper"] {
        let r = run_in(&t, &t.join(dir), &["hash"]).ok();
        assert_eq!(
            r.stdout(),
            top,
            "`hash` from {dir} vs from the manifest's directory"
        );
        run_in(&t, &t.join(dir), &["builds"]).ok();
    }
    // The nearest manifest wins.
    t.write(
        "app/sub/pmesh.toml",
        "[services.inner]\nroot = \"deeper\"\nbuild = \"true\"\n",
    );
    let r = run_in(&t, &t.join("app/sub/deeper"), &["hash", "inner"]).ok();
    assert_eq!(r.stdout().trim().len(), 32, "{}", r.stdout());
}

#[test]
fn manifest_flag_overrides_the_nearest_manifest() {
    let t = Tmp::new();
    fs::create_dir_all(t.join("app")).unwrap();
    t.write("app/main.c", "int main;\n");
    // The manifest here is broken; --manifest must not read it.
    t.write("pmesh.toml", "this is = = not toml\n");
    let alt = "[services.app]\nroot = \"../app\"\nbuild = \"true\"\n";
    t.write("conf/alt.toml", alt);
    let id1 = t
        .run(&["--manifest", "conf/alt.toml", "hash"])
        .ok()
        .stdout();
    let id2 = t
        .run(&["hash", "--manifest", "conf/alt.toml"])
        .ok()
        .stdout();
    assert_eq!(id1, id2, "--manifest before or after the command");
    let abs = manifest_path(&t, "conf/alt.toml");
    let id3 = run_in(
        &t,
        &t.join("app"),
        &["--manifest", abs.to_str().unwrap(), "hash", "app"],
    )
    .ok()
    .stdout();
    assert_eq!(id1, id3, "--manifest with an absolute path from elsewhere");
    // Roots resolve against the manifest: the same service through a good top manifest.
    t.write("pmesh.toml", "[services.app]\nbuild = \"true\"\n");
    assert_eq!(t.run(&["hash"]).ok().stdout(), id1, "same service, same id");

    // Errors name the file given.
    let bad = "[services.app]\nroot = \"../app\"\nbuild = \"true\"\nkeep = 0\n";
    t.write("conf/bad.toml", bad);
    let err = t
        .run(&["--manifest", "conf/bad.toml", "hash"])
        .expect_code(2)
        .stderr();
    assert!(err.contains("bad.toml:4:8: "), "{err}");
    assert!(err.contains("4 | keep = 0"), "{err}");

    let err = t
        .run(&["--manifest", "conf/missing.toml", "hash"])
        .expect_code(2)
        .stderr();
    assert!(
        err.contains("missing.toml"),
        "names the missing file: {err}"
    );
}

#[test]
fn no_manifest_anywhere_is_exit_2() {
    let t = Tmp::new();
    for args in [&["build"][..], &["builds"], &["hash"], &["rollback"]] {
        let err = t.run(args).expect_code(2).stderr();
        assert!(
            err.contains("pmesh.toml") && err.contains("init"),
            "{args:?}: should say there is no pmesh.toml and mention `init`: {err}"
        );
    }
}

#[test]
fn unknown_service_names_are_exit_2() {
    let t = Tmp::new();
    one_service(&t, &["true"], "");
    for args in [
        &["build", "nope"][..],
        &["build", "app", "nope"],
        &["builds", "nope"],
        &["hash", "nope"],
        &["rollback", "nope", ".build-x"],
    ] {
        let r = t.run(args).expect_code(2);
        assert!(
            r.stderr().contains("nope"),
            "{args:?}: the error names the unknown service: {}",
            r.stderr()
        );
    }
    let err = t.run(&["build", "nope"]).stderr();
    assert!(err.contains("app"), "lists the known services: {err}");
    assert!(
        !t.join("app/.run").exists() && archives(&t.join("app")).is_empty(),
        "nothing was built"
    );
}

#[test]
fn several_services_need_a_name_where_one_is_expected() {
    let t = Tmp::new();
    fs::create_dir_all(t.join("web")).unwrap();
    fs::create_dir_all(t.join("api")).unwrap();
    t.write(
        "pmesh.toml",
        "[services.web]\nbuild = \"true\"\n[services.api]\nbuild = \"true\"\n",
    );
    // `builds` lists them all instead.
    let all = t.run(&["builds"]).ok().stdout();
    assert!(all.contains("web:") && all.contains("api:"), "{all}");
    for args in [&["hash"][..], &["rollback"]] {
        let err = t.run(args).expect_code(2).stderr();
        assert!(
            err.contains("web") && err.contains("api"),
            "{args:?}: should list the services: {err}"
        );
    }
    t.run(&["hash", "web"]).ok();
    t.run(&["hash", "api"]).ok();
}

#[test]
fn a_full_manifest_loads() {
    let t = Tmp::new();
    fs::create_dir_all(t.join("web")).unwrap();
    fs::create_dir_all(t.join("services/api")).unwrap();
    t.write(
        "pmesh.toml",
        r#"# every key
[services.web]
root = "web"                      # relative to pmesh.toml
build = ["npm ci", "npm run build"]
run = "node .run/server.js"
env = { NODE_ENV = "development", EMPTY = "" }
listen = 8080
health = "GET /healthz"
ready_timeout = "30s"
stop_timeout = "10s"
keep = 2
ignore = ["*.log", "node_modules/"]
debounce = "50ms"
reload = false

[services.api]
root = "services/api"
run = "python3 -m http.server"
listen = "127.0.0.1:9090"
health = "tcp"
"#,
    );
    t.run(&["hash", "web"]).ok();
    t.run(&["hash", "api"]).ok();
}

// ---------------------------------------------------------------------------------------------
// init
// ---------------------------------------------------------------------------------------------

/// Runs `init` in `t/rel` (created), expecting success; returns the parsed manifest.
fn init_in(t: &Tmp, rel: &str) -> toml::Table {
    let dir = t.join(rel);
    fs::create_dir_all(&dir).unwrap();
    let r = run_in(t, &dir, &["init"]).ok();
    assert!(
        r.stdout().contains("pmesh.toml"),
        "init says what it wrote: {}",
        r.stdout()
    );
    let text = fs::read_to_string(dir.join("pmesh.toml")).expect("init wrote pmesh.toml");
    // The starter manifest loads: `hash` works right away.
    run_in(t, &dir, &["hash"]).ok();
    text.parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("init wrote invalid TOML: {e}\n{text}"))
}

/// The only service of a parsed manifest: `(name, table)`.
fn only_service(m: &toml::Table) -> (String, toml::Table) {
    let services = m["services"].as_table().expect("a [services] table");
    assert_eq!(services.len(), 1, "one service: {m}");
    let (name, svc) = services.iter().next().unwrap();
    (name.clone(), svc.as_table().unwrap().clone())
}

fn steps(svc: &toml::Table) -> Vec<String> {
    match &svc["build"] {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().expect("string step").to_owned())
            .collect(),
        v => panic!("build is neither a string nor a list: {v}"),
    }
}

fn gitignore_lines(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join(".gitignore"))
        .expect(".gitignore")
        .lines()
        .map(str::to_owned)
        .collect()
}

const PMESH_LINES: [&str; 4] = [".build/", ".build-*/", ".run", ".pmesh/"];

#[test]
fn init_writes_a_manifest_that_loads_and_builds() {
    let t = Tmp::new();
    let m = init_in(&t, "my app");
    let (name, svc) = only_service(&m);
    assert_eq!(name, "my-app", "the service is named after the directory");
    assert_eq!(svc["root"].as_str(), Some("."), "root: {svc:?}");
    assert!(!steps(&svc).is_empty(), "a build step: {svc:?}");
    // The guessed default build works as it is.
    let dir = t.join("my app");
    run_in(&t, &dir, &["build"]).ok();
    assert_run_sound(&dir);
}

#[test]
fn init_commented_examples_are_valid_when_uncommented() {
    let t = Tmp::new();
    init_in(&t, "proj");
    let dir = t.join("proj");
    let text = fs::read_to_string(dir.join("pmesh.toml")).unwrap();
    let keys = [
        "run",
        "env",
        "listen",
        "health",
        "ready_timeout",
        "stop_timeout",
        "keep",
        "ignore",
        "debounce",
    ];
    let mut uncommented = Vec::new();
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if let Some(rest) = l.strip_prefix("# ")
                && let Some(key) = keys.iter().find(|k| rest.starts_with(&format!("{k} = ")))
            {
                uncommented.push(*key);
                return rest.to_owned();
            }
            l.to_owned()
        })
        .collect();
    assert!(
        uncommented.len() >= 6,
        "the starter should show most keys as commented examples; found {uncommented:?} in:\n{text}"
    );
    let new = out.join("\n") + "\n";
    fs::write(dir.join("pmesh.toml"), &new).unwrap();
    let r = run_in(&t, &dir, &["hash"]);
    assert_eq!(
        r.code(),
        0,
        "with {uncommented:?} uncommented the manifest should load:\n{new}\n--- stderr\n{}",
        r.stderr()
    );
}

#[test]
fn init_guesses_from_package_json() {
    let t = Tmp::new();
    t.write(
        "web/package.json",
        r#"{"name": "web", "scripts": {"start": "node server.js", "build": "tsc"}}"#,
    );
    t.write("web/package-lock.json", "{}");
    let (_, svc) = only_service(&init_in(&t, "web"));
    let build = steps(&svc);
    // Dependencies are installed when the lockfile changes, not by every save's build.
    assert_eq!(svc["install"].as_str(), Some("npm ci"), "{svc:?}");
    assert!(
        !build.iter().any(|s| s.contains("npm ci")),
        "npm ci is no build step: {build:?}"
    );
    assert!(
        build.iter().any(|s| s.contains("npm run build")),
        "build runs the build script: {build:?}"
    );
    assert_eq!(
        svc["run"].as_str(),
        Some(r#"exec node "$PMESH_RUN_DIR/server.js""#),
        "run starts the start script's file from the archive, not `npm start` on the source"
    );

    // No lockfile: `npm install` (`npm ci` would fail), and no `npm run build`.
    t.write("bare/package.json", r#"{"name": "bare"}"#);
    let (_, svc) = only_service(&init_in(&t, "bare"));
    let build = steps(&svc);
    assert_eq!(
        svc["install"]["run"].as_str(),
        Some("npm install"),
        "{svc:?}"
    );
    assert!(
        !build.iter().any(|s| s.contains("npm run build")),
        "no build script, no `npm run build`: {build:?}"
    );
    assert_ne!(svc.get("run").and_then(|v| v.as_str()), Some("npm start"));

    // `npm init -y` writes `"main": "index.js"` whether or not there is one: the file that is
    // there is run.
    t.write(
        "made/package.json",
        r#"{"name": "made", "main": "index.js"}"#,
    );
    t.write("made/server.js", "require('http');\n");
    let (_, svc) = only_service(&init_in(&t, "made"));
    assert_eq!(
        svc["run"].as_str(),
        Some(r#"exec node "$PMESH_RUN_DIR/server.js""#),
        "{svc:?}"
    );
    t.write("made/index.js", "require('http');\n");
    std::fs::remove_file(t.path().join("made/pmesh.toml")).unwrap();
    let (_, svc) = only_service(&init_in(&t, "made"));
    assert_eq!(
        svc["run"].as_str(),
        Some(r#"exec node "$PMESH_RUN_DIR/index.js""#),
        "`main` when it exists"
    );
}

#[test]
fn init_guesses_from_cargo_toml() {
    let t = Tmp::new();
    t.write(
        "crate/Cargo.toml",
        "[package]\nname = \"widget\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    let (_, svc) = only_service(&init_in(&t, "crate"));
    let build = steps(&svc);
    assert!(
        build.iter().any(|s| s.contains("cargo build")),
        "cargo build: {build:?}"
    );
    assert!(
        build.iter().any(|s| s.contains("widget")),
        "the build uses the package name: {build:?}"
    );
    let run = svc["run"].as_str().unwrap_or("");
    assert!(run.contains("widget"), "run uses the package name: {run}");
}

#[test]
fn init_guesses_from_go_mod_and_makefile() {
    let t = Tmp::new();
    t.write("gosvc/go.mod", "module example.com/gosvc\n\ngo 1.22\n");
    let (_, svc) = only_service(&init_in(&t, "gosvc"));
    assert!(
        steps(&svc).iter().any(|s| s.contains("go build")),
        "go build: {svc:?}"
    );

    t.write("mk/Makefile", "all:\n\techo hi\n");
    let (_, svc) = only_service(&init_in(&t, "mk"));
    assert!(
        steps(&svc)
            .iter()
            .any(|s| s.split_whitespace().next() == Some("make")),
        "make: {svc:?}"
    );
}

#[test]
fn init_refuses_to_overwrite_a_manifest() {
    let t = Tmp::new();
    t.write("pmesh.toml", "# mine, hand written\n");
    let r = t.run(&["init"]).expect_code(2);
    assert!(
        r.stderr().contains("already exists"),
        "says why: {}",
        r.stderr()
    );
    assert_eq!(
        t.read("pmesh.toml"),
        "# mine, hand written\n",
        "left as it was"
    );
    assert!(
        !t.join(".gitignore").exists(),
        "a refused init changes nothing, not even .gitignore"
    );
}

#[test]
fn init_completes_gitignore_once_and_keeps_existing_lines() {
    let t = Tmp::new();
    // No trailing newline on the last line, and one of the lines already present.
    t.write("p/.gitignore", "node_modules\n.run\n*.log");
    init_in(&t, "p");
    let dir = t.join("p");
    let lines = gitignore_lines(&dir);
    assert_eq!(
        &lines[..3],
        ["node_modules", ".run", "*.log"],
        "existing lines first, untouched: {lines:?}"
    );
    for l in PMESH_LINES {
        assert_eq!(
            lines.iter().filter(|x| x.as_str() == l).count(),
            1,
            "`{l}` exactly once in {lines:?}"
        );
    }
    let after_first = t.read("p/.gitignore");

    // Again, after deleting the manifest: nothing is added.
    fs::remove_file(dir.join("pmesh.toml")).unwrap();
    init_in(&t, "p");
    assert_eq!(
        t.read("p/.gitignore"),
        after_first,
        "a second init must not touch a complete .gitignore"
    );

    // Created when missing.
    init_in(&t, "fresh");
    let lines = gitignore_lines(&t.join("fresh"));
    for l in PMESH_LINES {
        assert_eq!(
            lines.iter().filter(|x| x.as_str() == l).count(),
            1,
            "`{l}` exactly once in a new .gitignore: {lines:?}"
        );
    }
}

#[test]
fn init_gitignore_lines_make_git_ignore_pmesh_dev_state() {
    let t = Tmp::new();
    let dir = t.join("proj");
    fs::create_dir_all(&dir).unwrap();
    t.write("proj/src.txt", "source");
    init_in(&t, "proj");
    t.write("proj/.build/partial", "x");
    t.write("proj/.build-20240101T000000.000Z/.buildid", "x");
    t.write("proj/.pmesh/digests", "x");
    std::os::unix::fs::symlink(".build-20240101T000000.000Z", dir.join(".run")).unwrap();
    let listed = git_untracked(&dir, &t.join("home"));
    assert_eq!(
        listed,
        [".gitignore", "pmesh.toml", "src.txt"],
        "git should ignore everything pmesh-dev writes"
    );
}

#[test]
fn cache_table_errors_are_located() {
    let svc = "[services.app]\nbuild = \"true\"\n";
    let bad = |cache: &str, line, col, needles: &[&str]| {
        expect_bad(&format!("[cache]\n{cache}\n{svc}"), line, col, needles);
    };
    bad(
        "url = \"ftp://x/y\"",
        2,
        7,
        &["`ftp` is not supported", "s3://"],
    );
    bad("url = \"s3:///prefix\"", 2, 7, &["names no bucket"]);
    bad("url = \"file://relative\"", 2, 7, &["absolute path"]);
    bad("url = \"team-builds\"", 2, 7, &["invalid cache url"]);
    // The manifest is shared: credentials in it are refused.
    bad(
        "url = \"https://me:secret@host/c\"",
        2,
        7,
        &["holds no credentials"],
    );
    bad("url = \"s3://b\"\npush = \"yes\"", 3, 8, &["wrong type"]);
    bad(
        "url = \"s3://b\"\ntrusted_keys = [\"AAAA\"]",
        3,
        17,
        &["invalid trusted key"],
    );
    bad(
        "url = \"s3://b\"\nmax_size = \"2 parsecs\"",
        3,
        12,
        &["invalid size"],
    );
    bad(
        "url = \"s3://b\"\nconnect_timeout = \"2\"",
        3,
        19,
        &["invalid duration"],
    );
    bad(
        "url = \"s3://b\"\npsuh = true",
        3,
        1,
        &["did you mean `push`"],
    );
}

#[test]
fn a_good_cache_table_loads() {
    let t = Tmp::new();
    fs::create_dir_all(t.join("app")).unwrap();
    t.write(
        "pmesh.toml",
        "[cache]\nurl = \"s3://team-builds/pmesh/\"\npush = true\nmax_size = \"500MiB\"\n\
         connect_timeout = \"500ms\"\n\
         trusted_keys = [\"MCowBQYDK2VwAyEAuB4oZlZZ3DkZsLIQZgWM8DXN2AFdj5di2VfSngixu8g=\"]\n\n\
         [services.app]\nbuild = \"true\"\n",
    );
    t.run(&["hash"]).ok();
}
