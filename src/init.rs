//! `pmesh-dev init`: a commented starter `pmesh.toml`, guessed from the project's files, and
//! the ignore lines that keep pmesh-dev's directories out of git.
//!
//! Every guess is meant to work as written: dependencies go in `install` (run only when the
//! lockfile changes, not on every save), the build copies or compiles the app into
//! `$PMESH_BUILD_DIR`, the instance starts from `$PMESH_RUN_DIR` (its own archive, so that a
//! rollback changes what runs), and `listen` is set, so there is a stable URL and a lossless swap.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::manifest::MANIFEST_NAME;

/// The lines `init` makes sure `.gitignore` has.
pub const GITIGNORE_LINES: [&str; 4] = [".build/", ".build-*/", ".run", ".pmesh/"];

/// The first port `init` offers the proxy; the next services get the next free ones.
const FIRST_PORT: u16 = 8080;

/// A step that copies the service root into the build, without pmesh-dev's own directories,
/// git's, and the dependency directories in `skip` (they stay in the root, where the install
/// step put them). `tar` rather than `cp -R`: the build directory is itself inside the root.
/// Names match at any depth, as they do for the hash.
fn copy_step(skip: &[&str]) -> String {
    let mut excludes = vec![".git", ".build", "\".build-*\"", ".run", ".pmesh"];
    excludes.extend_from_slice(skip);
    let excludes: Vec<String> = excludes.iter().map(|e| format!("--exclude={e}")).collect();
    format!(
        "tar -cf - {} . | tar -xf - -C \"$PMESH_BUILD_DIR\"",
        excludes.join(" ")
    )
}

/// The install step as written in the manifest.
enum Install {
    /// A command whose inputs are the default ones for its tool.
    Command(String),
    /// A command with explicit inputs.
    WithInputs(String, Vec<String>),
}

/// What `init` guessed about one service.
#[derive(Default)]
struct Guess {
    /// What was recognised, for the header and the message: "an Express app (npm)".
    what: String,
    install: Option<Install>,
    build: Vec<String>,
    /// Why the build steps are what they are, as comment lines.
    build_note: Vec<&'static str>,
    run: Option<String>,
    /// The directory of the build served as files, and whether unknown paths get index.html.
    static_dir: Option<(&'static str, bool)>,
    env: Vec<(&'static str, &'static str)>,
    ignore: Vec<String>,
    /// Whether the guess serves something (a `run` or `static`), so `listen` is worth writing.
    serves: bool,
    /// Things the user must check, as comment lines.
    notes: Vec<String>,
    /// What will not work as guessed unless the user changes it: said by `init` too.
    warning: Option<String>,
}

impl Guess {
    /// A guess that builds but serves nothing `init` could name.
    fn unknown(what: &str, build: Vec<String>) -> Guess {
        Guess {
            what: what.to_owned(),
            build,
            ..Guess::default()
        }
    }
}

/// A warning when none of `files` (relative to `dir`) that exist mentions `PORT`: the app then
/// listens where pmesh-dev does not look, and never becomes healthy.
fn port_warning(dir: &Path, files: &[String]) -> Option<String> {
    let texts: Vec<(&String, String)> = files
        .iter()
        .filter_map(|f| Some((f, fs::read_to_string(dir.join(f)).ok()?)))
        .collect();
    if texts.is_empty() || texts.iter().any(|(_, t)| t.contains("PORT")) {
        return None;
    }
    let names: Vec<&str> = texts.iter().map(|(f, _)| f.as_str()).collect();
    Some(format!(
        "{} never reads PORT: make the app listen on $PORT (each instance gets its own), \
         or it never becomes healthy",
        names.join(", ")
    ))
}

/// The stack of `dir`, when it looks like a project of one.
fn detect(dir: &Path) -> Option<Guess> {
    if dir.join("package.json").is_file() {
        return Some(node(dir));
    }
    if dir.join("Cargo.toml").is_file() {
        return Some(rust(dir));
    }
    if dir.join("go.mod").is_file() {
        return Some(go(dir));
    }
    if ["requirements.txt", "pyproject.toml", "manage.py"]
        .iter()
        .any(|f| dir.join(f).is_file())
    {
        return Some(python(dir));
    }
    None
}

/// A guess for a directory that matched no stack.
fn fallback(dir: &Path) -> Guess {
    if dir.join("index.html").is_file() {
        return Guess {
            what: "a static site (index.html)".to_owned(),
            build: vec![copy_step(&[])],
            build_note: vec!["# This copies the site into the build; pmesh-dev serves it."],
            static_dir: Some((".", false)),
            serves: true,
            ..Guess::default()
        };
    }
    if dir.join("Makefile").is_file() || dir.join("makefile").is_file() {
        let mut g = Guess::unknown("a Makefile", vec!["make".to_owned()]);
        g.notes.push(
            "# Make the build write its output into $PMESH_BUILD_DIR, then add `run`.".into(),
        );
        return g;
    }
    Guess::unknown(
        "nothing known",
        vec!["echo \"write your build's output into $PMESH_BUILD_DIR\"".to_owned()],
    )
}

/// The JavaScript package manager, by the lockfile present.
struct Npm {
    tool: &'static str,
    /// The install command, and its inputs when the tool's defaults do not fit.
    install: Install,
    /// How to run a binary of node_modules/.bin (for npm, `--no`: never download one that the
    /// install did not put there; `--`: the rest are the binary's arguments, not npm's).
    exec: &'static str,
}

fn package_manager(dir: &Path) -> Npm {
    let has = |f: &str| dir.join(f).is_file();
    if has("pnpm-lock.yaml") {
        Npm {
            tool: "pnpm",
            install: Install::Command("pnpm install --frozen-lockfile".into()),
            exec: "pnpm exec",
        }
    } else if has("yarn.lock") {
        Npm {
            tool: "yarn",
            install: Install::Command("yarn install".into()),
            exec: "yarn",
        }
    } else if has("bun.lock") || has("bun.lockb") {
        Npm {
            tool: "bun",
            install: Install::Command("bun install --frozen-lockfile".into()),
            exec: "bunx",
        }
    } else if has("package-lock.json") || has("npm-shrinkwrap.json") {
        Npm {
            tool: "npm",
            install: Install::Command("npm ci".into()),
            exec: "npx --no --",
        }
    } else {
        // `npm ci` fails with no lockfile. `npm install` writes one, so package.json alone is
        // the input: the lockfile it writes must not make the next save install again.
        Npm {
            tool: "npm",
            install: Install::WithInputs("npm install".into(), vec!["package.json".into()]),
            exec: "npx --no --",
        }
    }
}

fn node(dir: &Path) -> Guess {
    let pkg: serde_json::Value = fs::read_to_string(dir.join("package.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let has_dep = |d: &str| {
        ["dependencies", "devDependencies"]
            .iter()
            .any(|k| pkg[*k].get(d).is_some())
    };
    let script = |s: &str| pkg["scripts"].get(s).and_then(|v| v.as_str());
    let pm = package_manager(dir);
    let ignore = vec!["node_modules/".to_owned()];

    if has_dep("vite") {
        return Guess {
            what: format!("a Vite app ({})", pm.tool),
            install: Some(pm.install),
            build: vec![format!(
                "{} vite build --outDir \"$PMESH_BUILD_DIR/dist\"",
                pm.exec
            )],
            build_note: vec![
                "# Vite writes the site into the build's dist/, which pmesh-dev serves (below).",
            ],
            static_dir: Some(("dist", true)),
            ignore: vec!["node_modules/".to_owned(), "dist/".to_owned()],
            serves: true,
            ..Guess::default()
        };
    }

    let mut build = vec![copy_step(&["node_modules"])];
    if script("build").is_some() {
        // In the copy, so that its output lands in the build, not in the source tree.
        build.push(format!("cd \"$PMESH_BUILD_DIR\" && {} run build", pm.tool));
    }
    let mut notes = vec!["# The app must listen on $PORT (process.env.PORT).".to_owned()];
    let entry = entry_file(dir, script("start"), pkg["main"].as_str());
    // A build script may write the entry file; only a source file is looked at.
    let warning = entry
        .as_ref()
        .and_then(|f| port_warning(dir, std::slice::from_ref(f)));
    let run = match entry {
        Some(file) => format!("exec node \"$PMESH_RUN_DIR/{file}\""),
        None => {
            notes.push("# No entry file found: `run` starts the copy's `start` script.".into());
            format!("cd \"$PMESH_RUN_DIR\" && exec {} start", pm.tool)
        }
    };
    let kind = if has_dep("express") {
        "an Express app"
    } else {
        "a Node app"
    };
    Guess {
        what: format!("{kind} ({})", pm.tool),
        install: Some(pm.install),
        build,
        build_note: vec![
            "# This copies the app (not node_modules) into the build. Node looks for require()d",
            "# packages upwards, so the archive finds the root's node_modules.",
        ],
        run: Some(run),
        ignore,
        serves: true,
        notes,
        warning,
        ..Guess::default()
    }
}

/// The file node runs: the start script's `node FILE`, else `main` if it exists (`npm init`
/// writes `"main": "index.js"` whatever the project holds), else a usual name.
fn entry_file(dir: &Path, start: Option<&str>, main: Option<&str>) -> Option<String> {
    if let Some(start) = start {
        let words: Vec<&str> = start.split_whitespace().collect();
        if words.first() == Some(&"node") {
            // `node [--flags] FILE ...`
            return words[1..]
                .iter()
                .find(|w| !w.starts_with('-'))
                .map(|w| w.trim_start_matches("./").to_owned());
        }
        // Anything else (nodemon, tsx, next...) is the start script's business.
        return None;
    }
    let main = main.map(|m| m.trim_start_matches("./"));
    if let Some(main) = main.filter(|m| dir.join(m).is_file()) {
        return Some(main.to_owned());
    }
    ["server.js", "index.js", "app.js", "main.js"]
        .iter()
        .find(|f| dir.join(f).is_file())
        .map(|f| (*f).to_owned())
        .or(main.map(str::to_owned))
}

fn rust(dir: &Path) -> Guess {
    let table = cargo_toml(dir);
    // A virtual workspace builds the first member that has a binary.
    let (what, name, build_cmd, warning) = if table.contains_key("package") {
        let (name, warning) = match crate_binary(dir, &table) {
            Some(name) => (name, port_warning(dir, &rust_sources(dir))),
            None => (
                "app".to_owned(),
                Some("the crate is a library: name the binary to run in `build` and `run`".into()),
            ),
        };
        (
            "a Rust crate (cargo)".to_owned(),
            name,
            "cargo build".to_owned(),
            warning,
        )
    } else {
        match workspace_binary(dir, &table) {
            Some((member, package, bin)) => (
                format!("a Rust workspace (cargo), its binary `{bin}` from {member}"),
                bin,
                format!("cargo build -p {package}"),
                port_warning(&dir.join(&member), &rust_sources(&dir.join(&member))),
            ),
            None => (
                "a Rust workspace (cargo)".to_owned(),
                "app".to_owned(),
                "cargo build".to_owned(),
                Some(
                    "no workspace member has a binary: name the one to run in `build` and `run`"
                        .to_owned(),
                ),
            ),
        }
    };
    Guess {
        what,
        build: vec![
            build_cmd,
            format!("cp \"${{CARGO_TARGET_DIR:-target}}/debug/{name}\" \"$PMESH_BUILD_DIR/\""),
        ],
        build_note: vec![
            "# A debug build (the quickest to rebuild), its binary copied into the build.",
            "# cargo decides what to recompile by mtimes: a file put back with an old mtime",
            "# (cp -p, tar, some checkouts) can leave a stale binary; `touch` it then.",
        ],
        run: Some(format!("exec \"$PMESH_RUN_DIR/{name}\"")),
        ignore: vec!["target/".to_owned()],
        serves: true,
        notes: vec!["# The server must listen on $PORT (std::env::var(\"PORT\")).".to_owned()],
        warning,
        ..Guess::default()
    }
}

fn cargo_toml(dir: &Path) -> toml::Table {
    fs::read_to_string(dir.join("Cargo.toml"))
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .unwrap_or_default()
}

/// The binary a crate builds: its first `[[bin]]`, else the package's own (`src/main.rs`), else
/// the first of `src/bin/`. `None` for a library (a `src/lib.rs` and none of those).
fn crate_binary(dir: &Path, table: &toml::Table) -> Option<String> {
    let bin = table.get("bin").and_then(|b| {
        b.as_array()?
            .first()?
            .get("name")?
            .as_str()
            .map(str::to_owned)
    });
    let package = table.get("package")?.get("name")?.as_str()?;
    if bin.is_some() {
        return bin;
    }
    if dir.join("src/main.rs").is_file() {
        return Some(package.to_owned());
    }
    if let Some(first) = files_ending(&dir.join("src/bin"), ".rs").first() {
        return Some(first.trim_end_matches(".rs").to_owned());
    }
    // Neither yet: cargo's default binary is named after the package.
    (!dir.join("src/lib.rs").is_file()).then(|| package.to_owned())
}

/// The first member of the workspace in `dir` (in `members` order, a trailing `/*` listed)
/// that builds a binary: (its path, its package name, the binary's name).
fn workspace_binary(dir: &Path, table: &toml::Table) -> Option<(String, String, String)> {
    let members = table.get("workspace")?.get("members")?.as_array()?;
    let mut paths = Vec::new();
    for m in members.iter().filter_map(|m| m.as_str()) {
        match m.strip_suffix("/*") {
            Some(parent) => {
                let mut subs: Vec<String> = fs::read_dir(dir.join(parent))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().join("Cargo.toml").is_file())
                    .map(|e| format!("{parent}/{}", e.file_name().to_string_lossy()))
                    .collect();
                subs.sort();
                paths.extend(subs);
            }
            None => paths.push(m.to_owned()),
        }
    }
    paths.into_iter().find_map(|member| {
        let table = cargo_toml(&dir.join(&member));
        let package = table.get("package")?.get("name")?.as_str()?.to_owned();
        let bin = crate_binary(&dir.join(&member), &table)?;
        Some((member, package, bin))
    })
}

fn go(dir: &Path) -> Guess {
    let module = fs::read_to_string(dir.join("go.mod"))
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("module ")
                    .map(|m| m.trim().to_owned())
            })
        })
        .unwrap_or_default();
    let name = sanitize(module.rsplit('/').next().unwrap_or(""), "app");
    Guess {
        what: "a Go module".to_owned(),
        build: vec![format!("go build -o \"$PMESH_BUILD_DIR/{name}\" .")],
        build_note: vec!["# The binary is written into the build."],
        run: Some(format!("exec \"$PMESH_RUN_DIR/{name}\"")),
        serves: true,
        notes: vec!["# The server must listen on $PORT (os.Getenv(\"PORT\")).".to_owned()],
        warning: port_warning(dir, &files_ending(dir, ".go")),
        ..Guess::default()
    }
}

fn python(dir: &Path) -> Guess {
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
    let deps = format!("{}\n{}", read("requirements.txt"), read("pyproject.toml")).to_lowercase();
    // A requirement names a package as a word of its own: `flask>=3`, `"fastapi[standard]"`,
    // not `flask-cors`.
    let depends = |name: &str| {
        deps.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .any(|w| w == name)
    };
    let install = if dir.join("uv.lock").is_file() {
        // uv makes .venv itself.
        "uv sync".to_owned()
    } else if dir.join("requirements.txt").is_file() {
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt".to_owned()
    } else {
        "python3 -m venv .venv && .venv/bin/pip install .".to_owned()
    };
    let py = ".venv/bin/python";
    let mut notes = Vec::new();
    let mut warning = None;
    let (kind, run) = if dir.join("manage.py").is_file() || depends("django") {
        (
            "a Django project",
            format!("exec {py} \"$PMESH_RUN_DIR/manage.py\" runserver --noreload \"$HOST:$PORT\""),
        )
    } else if depends("fastapi") {
        let (file, var) = find_app(dir, "FastAPI(").unwrap_or(("main.py", "app".into()));
        let module = file.trim_end_matches(".py");
        if !depends("uvicorn") && !deps.contains("fastapi[standard]") {
            notes.push("# `run` uses uvicorn: add it to the dependencies.".into());
        }
        (
            "a FastAPI app (uvicorn)",
            format!(
                "exec {py} -m uvicorn --app-dir \"$PMESH_RUN_DIR\" {module}:{var} --host \"$HOST\" --port \"$PORT\""
            ),
        )
    } else if depends("flask") {
        let (file, _) = find_app(dir, "Flask(").unwrap_or(("app.py", "app".into()));
        (
            "a Flask app",
            format!(
                "exec {py} -m flask --app \"$PMESH_RUN_DIR/{file}\" run --host \"$HOST\" --port \"$PORT\""
            ),
        )
    } else {
        let file = ["app.py", "main.py", "server.py"]
            .into_iter()
            .find(|f| dir.join(f).is_file())
            .unwrap_or("app.py");
        notes.push("# The app must listen on $PORT (os.environ[\"PORT\"]).".into());
        warning = port_warning(dir, &[file.to_owned()]);
        (
            "a Python app",
            format!("exec {py} \"$PMESH_RUN_DIR/{file}\""),
        )
    };
    Guess {
        what: format!("{kind} (venv in .venv)"),
        install: Some(Install::Command(install)),
        build: vec![copy_step(&[".venv", "__pycache__"])],
        build_note: vec!["# This copies the app (not .venv) into the build."],
        run: Some(run),
        // Output shows up as it is printed, not when a buffer fills.
        env: vec![("PYTHONUNBUFFERED", "1")],
        ignore: vec![".venv/".to_owned(), "__pycache__/".to_owned()],
        serves: true,
        notes,
        warning,
        ..Guess::default()
    }
}

/// The crate's binary sources: `src/main.rs` and `src/bin/*.rs`.
fn rust_sources(dir: &Path) -> Vec<String> {
    let mut files = vec!["src/main.rs".to_owned()];
    files.extend(
        files_ending(&dir.join("src/bin"), ".rs")
            .into_iter()
            .map(|f| format!("src/bin/{f}")),
    );
    files
}

/// The names of the files in `dir` (not below) that end with `suffix`, sorted.
fn files_ending(dir: &Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    names
}

/// The first usual Python file that constructs `ctor`, and the variable it assigns to.
fn find_app(dir: &Path, ctor: &str) -> Option<(&'static str, String)> {
    ["app.py", "main.py", "server.py", "wsgi.py", "asgi.py"]
        .into_iter()
        .find_map(|f| {
            let text = fs::read_to_string(dir.join(f)).ok()?;
            let line = text.lines().find(|l| l.contains(ctor))?;
            let var = line
                .split_once('=')
                .map(|(v, _)| v.trim())
                .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_alphanumeric() || c == '_'))
                .unwrap_or("app");
            Some((f, var.to_owned()))
        })
}

/// The subdirectories of `dir` that look like projects, sorted by name.
fn packages(dir: &Path) -> Vec<(String, Guess)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<(String, Guess)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || matches!(name.as_str(), "node_modules" | "target") {
                return None;
            }
            Some((name, detect(&e.path())?))
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// `s` as a TOML string: a literal one ('...') when it can be, so that shell commands read as
/// they are typed.
fn toml_str(s: &str) -> String {
    if s.contains('\'') || s.chars().any(char::is_control) {
        toml::Value::String(s.to_owned()).to_string()
    } else {
        format!("'{s}'")
    }
}

/// `raw` as a service name: letters, digits, `-` and `_`, else `default`.
fn sanitize(raw: &str, default: &str) -> String {
    let name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        default.to_owned()
    } else {
        name.to_owned()
    }
}

fn service_name(dir: &Path) -> String {
    let raw = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    sanitize(&raw, "app")
}

/// The next port from `from` that nothing on this machine listens on now ("free-ish": it may
/// be taken by the time `watch` starts, which then says so).
fn free_ish_port(from: u16) -> u16 {
    (from..from.saturating_add(100))
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap_or(from)
}

/// One service's part of the manifest.
fn service_text(name: &str, root: &str, g: &Guess, port: Option<u16>) -> String {
    let list = |v: &[String]| v.iter().map(|s| toml_str(s)).collect::<Vec<_>>().join(", ");
    let mut out = String::new();
    let mut line = |s: &str| {
        out.push_str(s);
        out.push('\n');
    };
    line(&format!("# {name}: {}", g.what));
    if let Some(w) = &g.warning {
        line(&format!("# WARNING: {w}."));
    }
    line(&format!("[services.{name}]"));
    line("# The service's source tree, relative to this file.");
    line(&format!("root = {}", toml_str(root)));
    line("");
    if let Some(install) = &g.install {
        line("# Dependencies: run with `sh -c` in the root before the build, only when its inputs");
        line("# (by default the tool's manifest and lockfiles) changed since it last succeeded,");
        line("# so a save does not reinstall.");
        match install {
            Install::Command(c) => line(&format!("install = {}", toml_str(c))),
            Install::WithInputs(c, inputs) => line(&format!(
                "install = {{ run = {}, inputs = [{}] }}",
                toml_str(c),
                list(inputs)
            )),
        }
        line("");
    }
    line("# Build steps, each run with `sh -c` in the root. They get PMESH_BUILD_DIR (write the");
    line("# build's output there), PMESH_BUILD_ID and PMESH_SERVICE. A finished build is archived");
    line("# as .build-<timestamp> and .run points to the live one.");
    for n in &g.build_note {
        line(n);
    }
    line(&format!("build = [{}]", list(&g.build)));
    line("");
    if let Some((dir, spa)) = g.static_dir {
        line("# pmesh-dev serves this directory of the build itself (index.html, ETag, ranges):");
        line("# no `run`.");
        line(&format!("static = {}", toml_str(dir)));
        if spa {
            line("# A path that matches no file gets index.html (client-side routing).");
            line("spa = true");
        } else {
            line("# spa = true");
        }
    } else {
        line(
            "# Starts an instance, with `sh -c` in the root. It gets PORT, HOST, PMESH_BUILD_ID and",
        );
        line(
            "# PMESH_RUN_DIR, the archive it belongs to: it runs from there, never from the source",
        );
        line(
            "# or .run/ (which moves before a new build is proven healthy), so rollback changes what",
        );
        line("# runs.");
        for n in &g.notes {
            line(n);
        }
        match &g.run {
            Some(r) => line(&format!("run = {}", toml_str(r))),
            None => line("# run = \"exec \\\"$PMESH_RUN_DIR/app\\\"\""),
        }
    }
    line("");
    line("# Extra environment for the install, the build steps and the run command.");
    if g.env.is_empty() {
        line("# env = { NODE_ENV = \"development\" }");
    } else {
        let pairs: Vec<String> = g
            .env
            .iter()
            .map(|(k, v)| format!("{k} = {}", toml_str(v)))
            .collect();
        line(&format!("env = {{ {} }}", pairs.join(", ")));
    }
    line("");
    line("# Where the proxy listens (loopback unless an address is given): the URL to open. Each");
    line("# instance has its own PORT behind it, and a swap loses no request.");
    match port {
        Some(p) => line(&format!("listen = {p}")),
        None => line("# listen = 8080"),
    }
    line("# How an instance is judged healthy before traffic moves to it: \"tcp\" (a connect)");
    line("# or \"GET /path\" (2xx or 3xx).");
    line("# health = \"tcp\"");
    line("# ready_timeout = \"30s\"");
    line("# stop_timeout = \"10s\"");
    line("");
    line("# Archives kept in all, the live one included (rollback goes to these).");
    line("# keep = 2");
    line("");
    line("# Extra gitignore-style patterns that never count (as well as .gitignore and .ignore).");
    if g.ignore.is_empty() {
        line("# ignore = [\"*.log\"]");
    } else {
        line(&format!("ignore = [{}]", list(&g.ignore)));
    }
    line("");
    line("# Quiet time after the last change before a rebuild.");
    line("# debounce = \"50ms\"");
    out
}

/// One guessed service, as `starter_manifest` wrote it.
pub struct Guessed {
    pub name: String,
    pub what: String,
    /// The URL the proxy will serve it at, when the guess serves something.
    pub url: Option<String>,
    /// What must change before it works.
    pub warning: Option<String>,
}

/// The starter manifest's text for the project in `dir`, and what was guessed. A directory that
/// is no project itself but has subdirectories that are (`api/`, `web/`) gets one service each.
pub fn starter_manifest(dir: &Path) -> (String, Vec<Guessed>) {
    let services: Vec<(String, String, Guess)> = match detect(dir) {
        Some(g) => vec![(service_name(dir), ".".to_owned(), g)],
        None => {
            let found = packages(dir);
            if found.is_empty() {
                vec![(service_name(dir), ".".to_owned(), fallback(dir))]
            } else {
                found
                    .into_iter()
                    .map(|(sub, g)| (sanitize(&sub, "app"), sub, g))
                    .collect()
            }
        }
    };
    let mut next_port = FIRST_PORT;
    let mut guessed = Vec::new();
    let mut body = String::new();
    for (name, root, g) in &services {
        let port = g.serves.then(|| {
            let p = free_ish_port(next_port);
            next_port = p.saturating_add(1);
            p
        });
        body.push('\n');
        body.push_str(&service_text(name, root, g, port));
        guessed.push(Guessed {
            name: name.clone(),
            what: g.what.clone(),
            url: port.map(|p| format!("http://127.0.0.1:{p}")),
            warning: g.warning.clone(),
        });
    }
    let summary: Vec<String> = guessed
        .iter()
        .map(|s| match &s.url {
            Some(u) => format!("#   {}: {} at {u}", s.name, s.what),
            None => format!("#   {}: {}", s.name, s.what),
        })
        .collect();
    let text = format!(
        "# pmesh-dev manifest, written by `pmesh-dev init`. Every key is described in pmesh-dev's\n\
         # README. Guessed:\n{}\n\
         # Check the commands, then run `pmesh-dev watch` and open the URL it prints.\n{body}",
        summary.join("\n")
    );
    (text, guessed)
}

/// Writes the manifest (`manifest`, else `dir/pmesh.toml`; never over an existing one), guessed
/// from the directory it is in, and completes that directory's `.gitignore`. Returns what to
/// tell the user.
pub fn init(dir: &Path, manifest: Option<&Path>) -> anyhow::Result<String> {
    let path: PathBuf = match manifest {
        Some(m) => dir.join(m),
        None => dir.join(MANIFEST_NAME),
    };
    // Roots are relative to the manifest, so the project is the manifest's directory.
    let project = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(dir)
        .to_path_buf();
    if !project.is_dir() {
        bail!("{} is not a directory", project.display());
    }
    if path.exists() {
        bail!(
            "{} already exists; pmesh-dev init never overwrites it",
            path.display()
        );
    }
    let (text, guessed) = starter_manifest(&project);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    let added = complete_gitignore(&project)?;
    let mut msg = format!("wrote {}, guessing:", path.display());
    for s in &guessed {
        msg.push_str(&format!("\n  {}: {}", s.name, s.what));
        if let Some(u) = &s.url {
            msg.push_str(&format!(" -> {u}"));
        }
        if let Some(w) = &s.warning {
            msg.push_str(&format!("\n  warning: {}: {w}", s.name));
        }
    }
    if !added.is_empty() {
        msg.push_str(&format!("\nadded {} to .gitignore", added.join(" ")));
    }
    let flag = match manifest {
        Some(m) => format!("--manifest {} ", m.display()),
        None => String::new(),
    };
    if guessed.iter().any(|s| s.url.is_some()) {
        msg.push_str(&format!(
            "\ncheck the commands, then run `pmesh-dev {flag}watch` and open the URL"
        ));
    } else {
        msg.push_str("\nnothing to serve was recognised: fill in the build and `run`");
    }
    Ok(msg)
}

/// Appends the lines of [`GITIGNORE_LINES`] that `dir/.gitignore` lacks; returns them.
pub fn complete_gitignore(dir: &Path) -> anyhow::Result<Vec<&'static str>> {
    let path = dir.join(".gitignore");
    let existing = match fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let have: Vec<&str> = existing.lines().map(str::trim).collect();
    let missing: Vec<&'static str> = GITIGNORE_LINES
        .iter()
        .copied()
        .filter(|l| !have.contains(l))
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    let mut add = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        add.push('\n');
    }
    add.push_str("# pmesh-dev\n");
    for l in &missing {
        add.push_str(l);
        add.push('\n');
    }
    let mut f = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.write_all(add.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(missing)
}
