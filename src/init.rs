//! `pmesh-dev init`: a commented starter `pmesh.toml`, guessed from the project's files, and
//! the ignore lines that keep pmesh-dev's directories out of git.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};

use crate::manifest::MANIFEST_NAME;

/// The lines `init` makes sure `.gitignore` has.
pub const GITIGNORE_LINES: [&str; 4] = [".build/", ".build-*/", ".run", ".pmesh/"];

/// What `init` guessed about the project.
struct Guess {
    what: &'static str,
    build: Vec<String>,
    run: Option<String>,
    ignore: Vec<String>,
}

fn guess(dir: &Path) -> Guess {
    if let Ok(text) = fs::read_to_string(dir.join("package.json")) {
        let pkg: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let script = |s: &str| pkg["scripts"].get(s).is_some();
        let mut build = vec!["npm ci".to_owned()];
        if script("build") {
            build.push("npm run build".to_owned());
        }
        return Guess {
            what: "package.json",
            build,
            run: Some(if script("start") {
                "npm start".to_owned()
            } else {
                "node .run/server.js".to_owned()
            }),
            ignore: vec!["node_modules/".to_owned()],
        };
    }
    if let Ok(text) = fs::read_to_string(dir.join("Cargo.toml")) {
        let name = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("package")?.get("name")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| "app".to_owned());
        return Guess {
            what: "Cargo.toml",
            build: vec![
                "cargo build --release".to_owned(),
                format!("cp target/release/{name} \"$PMESH_BUILD_DIR\"/"),
            ],
            run: Some(format!(".run/{name}")),
            ignore: vec!["target/".to_owned()],
        };
    }
    if dir.join("go.mod").is_file() {
        return Guess {
            what: "go.mod",
            build: vec!["go build -o \"$PMESH_BUILD_DIR/app\" .".to_owned()],
            run: Some(".run/app".to_owned()),
            ignore: Vec::new(),
        };
    }
    if dir.join("Makefile").is_file() || dir.join("makefile").is_file() {
        return Guess {
            what: "Makefile",
            build: vec!["make".to_owned()],
            run: None,
            ignore: Vec::new(),
        };
    }
    Guess {
        what: "nothing known",
        build: vec!["echo \"write your build's output into $PMESH_BUILD_DIR\"".to_owned()],
        run: None,
        ignore: Vec::new(),
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn service_name(dir: &Path) -> String {
    let raw = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
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
        "app".to_owned()
    } else {
        name.to_owned()
    }
}

/// The starter manifest's text for the project in `dir`.
pub fn starter_manifest(dir: &Path) -> (String, &'static str) {
    let g = guess(dir);
    let list = |v: &[String]| v.iter().map(|s| toml_str(s)).collect::<Vec<_>>().join(", ");
    let run = match &g.run {
        Some(r) => format!("run = {}", toml_str(r)),
        None => "# run = \".run/app\"".to_owned(),
    };
    let ignore = if g.ignore.is_empty() {
        "# ignore = [\"*.log\"]".to_owned()
    } else {
        format!("ignore = [{}]", list(&g.ignore))
    };
    let text = format!(
        r#"# pmesh-dev manifest. Every key is described in pmesh-dev's README.
# Guessed from: {what}. Check the commands before the first `pmesh-dev build`.

[services.{name}]
# The service's source tree, relative to this file (default: the service's name).
root = "."

# Build steps, each run with `sh -c` in the root. They get PMESH_BUILD_DIR (write the build's
# output there), PMESH_BUILD_ID and PMESH_SERVICE. A finished build is archived as
# .build-<timestamp> and .run points to it.
build = [{build}]

# How to start the service, with `sh -c` in the root; it gets PORT, HOST, PMESH_BUILD_ID and
# PMESH_RUN_DIR. Start it from .run/ so that it runs the build that is live.
{run}

# Extra environment for the build steps and the run command.
# env = {{ NODE_ENV = "development" }}

# Where the proxy listens (loopback unless an address is given), and how health is checked:
# "tcp" (a connect) or "GET /path" (2xx or 3xx).
# listen = 8080
# health = "tcp"
# ready_timeout = "30s"
# stop_timeout = "10s"

# Archives kept in all, the live one included.
# keep = 2

# Extra gitignore-style patterns that never count (as well as .gitignore and .ignore).
{ignore}

# Quiet time after the last change before a rebuild.
# debounce = "50ms"
"#,
        what = g.what,
        name = service_name(dir),
        build = list(&g.build),
    );
    (text, g.what)
}

/// Writes `dir/pmesh.toml` (never over an existing one) and completes `dir/.gitignore`.
/// Returns a line describing what was done.
pub fn init(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(MANIFEST_NAME);
    if path.exists() {
        bail!(
            "{} already exists; pmesh-dev init never overwrites it",
            path.display()
        );
    }
    let (text, what) = starter_manifest(dir);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    let added = complete_gitignore(dir)?;
    let mut msg = format!("wrote {} (guessed from {what})", path.display());
    if !added.is_empty() {
        msg.push_str(&format!("; added {} to .gitignore", added.join(" ")));
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
