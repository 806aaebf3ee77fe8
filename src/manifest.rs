//! `pmesh.toml`: finding it, parsing it, and turning it into checked [`Service`] configs.
//!
//! Code past [`Manifest::load`] never sees an unvalidated value: durations are `Duration`s,
//! roots are existing absolute directories, ports are in range.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

/// The manifest's file name, looked for in the current directory and its parents.
pub const MANIFEST_NAME: &str = "pmesh.toml";

/// A loaded and validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Absolute path of the manifest file.
    pub path: PathBuf,
    /// The directory holding the manifest; relative paths resolve against it.
    pub dir: PathBuf,
    /// Services in the order the manifest lists them.
    pub services: Vec<Service>,
    /// The team's build cache, when the manifest has a `[cache]` table.
    pub cache: Option<Arc<CacheSettings>>,
}

/// The top-level `[cache]` table: where builds are shared, and how they are trusted. Holds no
/// credential: those come from the environment when the store is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// `s3://bucket/prefix`, `http(s)://host/path` (WebDAV) or `file:///path`, without a
    /// trailing `/`.
    pub url: String,
    /// Upload what this machine builds.
    pub push: bool,
    /// Ed25519 public keys (32 bytes each); when any is given, only entries signed by one of
    /// them are used.
    pub trusted_keys: Vec<[u8; 32]>,
    /// A PKCS#8 PEM file holding the Ed25519 key that signs pushed entries.
    pub signing_key: Option<PathBuf>,
    /// The most an entry may hold, unpacked (and downloaded).
    pub max_size: u64,
    /// How long to wait for the store to accept a connection.
    pub connect_timeout: Duration,
}

/// The largest entry fetched when `max_size` is not given: 2 GiB.
pub const DEFAULT_CACHE_MAX_SIZE: u64 = 2 << 30;

/// One service, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    /// Absolute, canonical service root.
    pub root: PathBuf,
    /// The directory whose ignore files apply first: the manifest's directory when the root is
    /// inside it, else the root itself.
    pub ignore_root: PathBuf,
    /// Installs the service's dependencies before the build steps, when its inputs changed.
    pub install: Option<Install>,
    /// Build steps, each run with `sh -c` in `root`.
    pub build: Vec<String>,
    /// The run command, run with `sh -c` in `root`.
    pub run: Option<String>,
    /// Or: a directory of the build that pmesh-dev serves itself.
    pub static_files: Option<StaticFiles>,
    /// Extra environment for build steps and the run command.
    pub env: BTreeMap<String, String>,
    /// Where the proxy listens.
    pub listen: Option<SocketAddr>,
    pub health: Health,
    pub ready_timeout: Duration,
    pub stop_timeout: Duration,
    /// Archives kept in all, the live one included.
    pub keep: usize,
    /// Extra gitignore-style patterns, relative to `root`.
    pub ignore: Vec<String>,
    /// Quiet time after the last change before hashing.
    pub debounce: Duration,
    /// The manifest's `[cache]` table, shared by all its services.
    pub cache: Option<Arc<CacheSettings>>,
    /// Look at the tree at this interval instead of using inotify (network or virtual
    /// filesystems).
    pub poll: Option<Duration>,
    pub protocol: Protocol,
    /// HTML pages through the proxy get the script that reloads them when a new build is live
    /// and shows an overlay when a build fails (`reload = false` turns it off).
    pub reload: bool,
    /// Services whose first instance must be live before this one's first starts.
    pub depends_on: Vec<String>,
}

impl Service {
    /// Whether `watch` and `run` start instances of it: a `run` command or `static` files.
    pub fn serves(&self) -> bool {
        self.run.is_some() || self.static_files.is_some()
    }
}

/// The `install` step: `run` with `sh -c` in the root before the build steps, only when the
/// content of `inputs` (paths relative to the root) changed since it last succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    pub run: String,
    pub inputs: Vec<String>,
}

/// A service whose build is a directory of files that pmesh-dev serves itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticFiles {
    /// The directory inside the build (`.` for the whole build), relative, no `..`.
    pub dir: String,
    /// Paths that match no file answer with the directory's `index.html` (a single-page app).
    pub spa: bool,
}

/// The files an install command depends on, by the tool it runs: its manifest and lockfiles.
pub fn default_install_inputs(command: &str) -> Option<Vec<String>> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let tool = words.iter().find(|w| !w.contains('=')).copied()?;
    let tool = tool.rsplit('/').next().unwrap_or(tool);
    let list: &[&str] = match tool {
        "npm" => &["package.json", "package-lock.json", "npm-shrinkwrap.json"],
        "pnpm" => &["package.json", "pnpm-lock.yaml"],
        "yarn" => &["package.json", "yarn.lock"],
        "bun" => &["package.json", "bun.lock", "bun.lockb"],
        "uv" | "poetry" | "pdm" => &["pyproject.toml", "uv.lock", "poetry.lock", "pdm.lock"],
        "pip" | "pip3" | "python" | "python3" => &["requirements.txt", "pyproject.toml"],
        "go" => &["go.mod", "go.sum"],
        "cargo" => &["Cargo.toml", "Cargo.lock"],
        "bundle" => &["Gemfile", "Gemfile.lock"],
        "composer" => &["composer.json", "composer.lock"],
        _ => return None,
    };
    Some(list.iter().map(|s| (*s).to_owned()).collect())
}

/// What the proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, with keep-alive, streaming and upgrades.
    #[default]
    Http,
    /// Raw TCP: each new connection goes to the live instance.
    Tcp,
}

/// How an instance is judged healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// A TCP connect to the instance's port succeeds.
    Tcp,
    /// `GET path` answers 2xx or 3xx.
    Get(String),
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::Tcp => f.write_str("tcp"),
            Health::Get(p) => write!(f, "GET {p}"),
        }
    }
}

/// Why a manifest could not be used. Every variant's message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "no {MANIFEST_NAME} in {} or any parent directory (write one with `pmesh-dev init`)",
        .0.display()
    )]
    NotFound(PathBuf),
    #[error("cannot read {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A located problem, already rendered with the file, line, column and the line's text.
    #[error("{0}")]
    Invalid(String),
    #[error("{file}: no service named `{name}` (services: {known})")]
    UnknownService {
        file: String,
        name: String,
        known: String,
    },
}

const SERVICE_KEYS: &[&str] = &[
    "root",
    "install",
    "build",
    "run",
    "static",
    "spa",
    "env",
    "listen",
    "health",
    "ready_timeout",
    "stop_timeout",
    "keep",
    "ignore",
    "debounce",
    "poll",
    "protocol",
    "reload",
    "depends_on",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    services: BTreeMap<Spanned<String>, Spanned<RawService>>,
    cache: Option<Spanned<RawCache>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    url: Spanned<String>,
    #[serde(default)]
    push: bool,
    #[serde(default)]
    trusted_keys: Vec<Spanned<String>>,
    signing_key: Option<Spanned<String>>,
    max_size: Option<Spanned<Size>>,
    connect_timeout: Option<Dur>,
}

/// A size: a number of bytes, or a string like `"500MB"` or `"2GiB"`.
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of bytes or a size like \"500MB\" or \"2GiB\"")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .ok()
                    .filter(|n| *n > 0)
                    .map(Size)
                    .ok_or_else(|| E::custom(format!("a size must be above zero, not {n}")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `123`, `500kB`, `500MB`, `2GB` (powers of 1000) or `KiB`, `MiB`, `GiB` (of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad =
        || format!("invalid size `{s}`: write a whole number and a unit, like `500MB` or `2GiB`");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(0) => Err(format!("a size must be above zero, not `{s}`")),
        Some(v) => Ok(v),
        None => Err(bad()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    root: Option<Spanned<String>>,
    install: Option<Spanned<RawInstall>>,
    #[serde(default)]
    build: Option<Spanned<Steps>>,
    run: Option<Spanned<String>>,
    #[serde(rename = "static")]
    static_dir: Option<Spanned<String>>,
    spa: Option<Spanned<bool>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    listen: Option<Spanned<Listen>>,
    health: Option<Health>,
    ready_timeout: Option<Dur>,
    stop_timeout: Option<Dur>,
    keep: Option<Keep>,
    #[serde(default)]
    ignore: Vec<Spanned<String>>,
    debounce: Option<Dur>,
    poll: Option<Poll>,
    protocol: Option<Protocol>,
    reload: Option<bool>,
    #[serde(default)]
    depends_on: Vec<Spanned<String>>,
}

/// `install`: a command, or `{ run = "...", inputs = [...] }`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawInstall {
    Command(String),
    Table {
        run: String,
        inputs: Option<Vec<String>>,
    },
}

/// `poll`: `true` (every second), `false`, or an interval like `"500ms"`.
struct Poll(Option<Duration>);

impl<'de> Deserialize<'de> for Poll {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Poll;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or an interval like \"500ms\"")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Poll, E> {
                Ok(Poll(b.then_some(DEFAULT_POLL)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Poll, E> {
                match parse_duration(s).map_err(E::custom)? {
                    d if d.is_zero() => Err(E::custom("a poll interval must be above zero")),
                    d => Ok(Poll(Some(d))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// How often a polled tree is looked at when `poll = true` or `--poll`.
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);

/// `build` as one string or a list of strings.
struct Steps(Vec<String>);

impl<'de> Deserialize<'de> for Steps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Steps;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a command string or a list of command strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Steps, E> {
                Ok(Steps(vec![s.to_owned()]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Steps, A::Error> {
                let mut steps = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    steps.push(s);
                }
                Ok(Steps(steps))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written like `50ms`, `30s`, `2m` or `1h`.
#[derive(Clone, Copy)]
struct Dur(Duration);

/// Parses `50ms`, `30s`, `2m`, `1h` (a whole number and a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration `{s}`: write a whole number and a unit, like `50ms`, `30s` or `2m`"
        )
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    Ok(d)
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string like \"50ms\", \"30s\" or \"2m\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                parse_duration(s).map(Dur).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{n}ms\" or \"{n}s\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// `listen`: a port (loopback) or `"ADDR:PORT"`.
struct Listen(SocketAddr);

/// Whether two listening addresses can clash: the same one, or either unspecified.
fn overlaps(a: IpAddr, b: IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

/// A relative path that stays inside the directory it is relative to.
fn is_relative_inside(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && path.is_relative()
        && path
            .components()
            .all(|c| !matches!(c, std::path::Component::ParentDir))
}

fn port(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(format!("port {n} is out of range: use 1-65535")),
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Listen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number (1-65535) or an \"ADDRESS:PORT\" string")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Listen, E> {
                let p = port(n).map_err(E::custom)?;
                Ok(Listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Listen, E> {
                if let Ok(n) = s.parse::<i64>() {
                    return self.visit_i64(n);
                }
                let addr: SocketAddr = s.parse().map_err(|_| {
                    E::custom(format!(
                        "invalid listen address `{s}`: write a port like 8080 or \"ADDRESS:PORT\""
                    ))
                })?;
                port(i64::from(addr.port())).map_err(E::custom)?;
                Ok(Listen(addr))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Health {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Health::parse(&s).map_err(de::Error::custom)
    }
}

impl Health {
    /// Parses `tcp` or `GET /path`.
    pub fn parse(s: &str) -> Result<Health, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("tcp") {
            return Ok(Health::Tcp);
        }
        if let Some(path) = t.strip_prefix("GET ") {
            let path = path.trim();
            if path.starts_with('/') && !path.contains(char::is_whitespace) {
                return Ok(Health::Get(path.to_owned()));
            }
        }
        Err(format!(
            "invalid health check `{s}`: write \"tcp\" or \"GET /path\""
        ))
    }
}

/// `keep`: at least one archive.
struct Keep(usize);

impl<'de> Deserialize<'de> for Keep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if n < 1 {
            return Err(de::Error::custom(format!(
                "keep = {n} would delete the live build: it must be at least 1"
            )));
        }
        Ok(Keep(usize::try_from(n).unwrap_or(usize::MAX)))
    }
}

/// Finds `pmesh.toml` in `start` or the nearest parent that has one.
pub fn find(start: &Path) -> Result<PathBuf, ManifestError> {
    let mut dir = Some(start);
    while let Some(d) = dir {
        let candidate = d.join(MANIFEST_NAME);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    Err(ManifestError::NotFound(start.to_path_buf()))
}

impl Manifest {
    /// Reads and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let src = std::fs::read_to_string(path).map_err(|error| ManifestError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        Manifest::parse(&path, &src)
    }

    /// Validates manifest text `src` that was read from `path`.
    pub fn parse(path: &Path, src: &str) -> Result<Manifest, ManifestError> {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = dir.canonicalize().unwrap_or(dir);
        // The manifest as the walk meets it: in the canonical directory, by its own name (not
        // its symlink target), so that excluding it compares like with like.
        let path = &match path.file_name() {
            Some(name) => dir.join(name),
            None => path.to_path_buf(),
        };
        let located = |span: Range<usize>, msg: &str| {
            ManifestError::Invalid(render_located(path, src, span, msg))
        };
        let raw: RawManifest = toml::from_str(src).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            located(span, &friendly_message(e.message()))
        })?;
        let cache = match raw.cache {
            Some(c) => Some(Arc::new(cache_settings(&dir, c.into_inner(), &located)?)),
            None => None,
        };
        if raw.services.is_empty() {
            return Err(located(
                0..0,
                "no services: add a table like [services.web] with at least `build` or `run`",
            ));
        }
        let mut raw_services: Vec<_> = raw.services.into_iter().collect();
        raw_services.sort_by_key(|(k, _)| k.span().start);

        let mut services = Vec::with_capacity(raw_services.len());
        // Each service's dependencies as written, for the checks once all are known.
        let mut deps: Vec<(String, Vec<Spanned<String>>)> = Vec::new();
        for (name, raw) in raw_services {
            let name_span = name.span();
            let name = name.into_inner();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(located(
                    name_span,
                    &format!(
                        "invalid service name `{name}`: use only letters, digits, `_` and `-`"
                    ),
                ));
            }
            let raw_span = raw.span();
            let raw = raw.into_inner();
            let (root_text, root_span) = match &raw.root {
                Some(r) => (r.get_ref().clone(), r.span()),
                None => (name.clone(), name_span.clone()),
            };
            let joined = dir.join(&root_text);
            let root = match joined.canonicalize() {
                Ok(r) if r.is_dir() => r,
                Ok(r) => {
                    return Err(located(
                        root_span,
                        &format!(
                            "service `{name}`: root `{root_text}` is not a directory (resolved to {})",
                            r.display()
                        ),
                    ));
                }
                Err(_) => {
                    return Err(located(
                        root_span,
                        &format!(
                            "service `{name}`: root `{root_text}` does not exist (resolved to {})",
                            joined.display()
                        ),
                    ));
                }
            };
            let build = raw.build.map(|b| (b.span(), b.into_inner().0));
            if let Some((span, steps)) = &build
                && steps.iter().any(|s| s.trim().is_empty())
            {
                return Err(located(
                    span.clone(),
                    &format!("service `{name}`: a build step is empty"),
                ));
            }
            let build = build.map(|(_, s)| s).unwrap_or_default();
            let run_span = raw.run.as_ref().map(Spanned::span);
            let run = match raw.run {
                Some(r) if r.get_ref().trim().is_empty() => {
                    return Err(located(
                        r.span(),
                        &format!("service `{name}`: `run` is empty"),
                    ));
                }
                Some(r) => Some(r.into_inner()),
                None => None,
            };
            let install = match raw.install {
                None => None,
                Some(i) => {
                    let span = i.span();
                    let (run, inputs) = match i.into_inner() {
                        RawInstall::Command(run) => (run, None),
                        RawInstall::Table { run, inputs } => (run, inputs),
                    };
                    if run.trim().is_empty() {
                        return Err(located(
                            span,
                            &format!("service `{name}`: `install` is empty"),
                        ));
                    }
                    let Some(inputs) = inputs.or_else(|| default_install_inputs(&run)) else {
                        return Err(located(
                            span,
                            &format!(
                                "service `{name}`: which files does `{run}` depend on? Write \
                                 install = {{ run = \"{run}\", inputs = [\"...\"] }} (its \
                                 lockfile, say): it runs again only when they change"
                            ),
                        ));
                    };
                    if let Some(bad) = inputs.iter().find(|p| !is_relative_inside(p)) {
                        return Err(located(
                            span,
                            &format!(
                                "service `{name}`: install input `{bad}` must be a path inside the root"
                            ),
                        ));
                    }
                    Some(Install { run, inputs })
                }
            };
            let static_files = match raw.static_dir {
                None => None,
                Some(d) => {
                    let span = d.span();
                    let dir = d.into_inner();
                    if let Some(r) = run_span {
                        return Err(located(
                            r,
                            &format!(
                                "service `{name}`: `run` and `static` exclude each other: \
                                 pmesh-dev serves `static` itself"
                            ),
                        ));
                    }
                    if !is_relative_inside(&dir) {
                        return Err(located(
                            span,
                            &format!(
                                "service `{name}`: `static` is a directory inside the build, \
                                 like \"dist\" (or \".\")"
                            ),
                        ));
                    }
                    Some(StaticFiles {
                        dir,
                        spa: raw.spa.as_ref().is_some_and(|s| *s.get_ref()),
                    })
                }
            };
            if static_files.is_none()
                && let Some(spa) = &raw.spa
            {
                return Err(located(
                    spa.span(),
                    &format!("service `{name}`: `spa` needs `static` (the directory served)"),
                ));
            }
            if build.is_empty() && run.is_none() && static_files.is_none() {
                return Err(located(
                    raw_span,
                    &format!("service `{name}` has neither `build` nor `run`"),
                ));
            }
            let mut env = BTreeMap::new();
            for (k, v) in raw.env {
                let span = k.span();
                let k = k.into_inner();
                if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                    return Err(located(
                        span,
                        &format!("service `{name}`: invalid environment variable name `{k}`"),
                    ));
                }
                env.insert(k, v);
            }
            let mut ignore = Vec::with_capacity(raw.ignore.len());
            for pat in raw.ignore {
                let mut b = ignore::gitignore::GitignoreBuilder::new(&root);
                if let Err(e) = b.add_line(None, pat.get_ref()) {
                    return Err(located(
                        pat.span(),
                        &format!("service `{name}`: invalid ignore pattern: {e}"),
                    ));
                }
                ignore.push(pat.into_inner());
            }
            if let Some(other) = services.iter().find(|s: &&Service| s.root == root) {
                return Err(located(
                    root_span,
                    &format!(
                        "services `{}` and `{name}` share the root {}: each service needs its own",
                        other.name,
                        root.display()
                    ),
                ));
            }
            let listen = raw.listen.map(|l| (l.get_ref().0, l.span()));
            if let Some((addr, span)) = &listen
                && let Some(other) = services.iter().find(|s: &&Service| {
                    s.listen
                        .is_some_and(|o| o.port() == addr.port() && overlaps(o.ip(), addr.ip()))
                })
            {
                return Err(located(
                    span.clone(),
                    &format!(
                        "services `{}` and `{name}` both listen on {addr}: give each its own port",
                        other.name
                    ),
                ));
            }
            deps.push((name.clone(), raw.depends_on.clone()));
            let ignore_root = if root.starts_with(&dir) {
                dir.clone()
            } else {
                root.clone()
            };
            services.push(Service {
                name,
                ignore_root,
                root,
                install,
                build,
                run,
                static_files,
                env,
                listen: listen.map(|(a, _)| a),
                health: raw.health.unwrap_or(Health::Tcp),
                ready_timeout: raw.ready_timeout.map_or(Duration::from_secs(30), |d| d.0),
                stop_timeout: raw.stop_timeout.map_or(Duration::from_secs(10), |d| d.0),
                keep: raw.keep.map_or(2, |k| k.0),
                ignore,
                debounce: raw.debounce.map_or(Duration::from_millis(50), |d| d.0),
                cache: cache.clone(),
                poll: raw.poll.and_then(|p| p.0),
                protocol: raw.protocol.unwrap_or_default(),
                reload: raw.reload.unwrap_or(true),
                depends_on: raw.depends_on.iter().map(|d| d.get_ref().clone()).collect(),
            });
        }
        for (name, list) in &deps {
            for d in list {
                if !services.iter().any(|s| s.name == *d.get_ref()) {
                    return Err(located(
                        d.span(),
                        &format!(
                            "service `{name}` depends on `{}`, which is not a service here",
                            d.get_ref()
                        ),
                    ));
                }
            }
        }
        if let Some(cycle) = find_cycle(&services) {
            let first = &cycle[0];
            let span = (deps.iter())
                .find(|(n, _)| n == first)
                .and_then(|(_, l)| l.iter().find(|d| *d.get_ref() == cycle[1]))
                .map_or(0..0, Spanned::span);
            return Err(located(
                span,
                &format!(
                    "depends_on makes a cycle: {} (a service cannot wait for itself)",
                    cycle.join(" -> ")
                ),
            ));
        }
        Ok(Manifest {
            path: path.to_path_buf(),
            dir,
            services,
            cache,
        })
    }

    /// The services named, in manifest order, or all of them when `names` is empty.
    pub fn select(&self, names: &[String]) -> Result<Vec<&Service>, ManifestError> {
        if names.is_empty() {
            return Ok(self.services.iter().collect());
        }
        names.iter().map(|n| self.service(n)).collect()
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Result<&Service, ManifestError> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ManifestError::UnknownService {
                file: self.path.display().to_string(),
                name: name.to_owned(),
                known: self
                    .services
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The service whose root holds the current directory (the innermost one).
    pub fn here(&self) -> Option<&Service> {
        let cwd = std::env::current_dir().ok()?;
        let cwd = cwd.canonicalize().unwrap_or(cwd);
        (self.services.iter())
            .filter(|s| cwd.starts_with(&s.root))
            .max_by_key(|s| s.root.components().count())
    }

    /// The one service, or `name`'s, or with several the one whose root holds the current
    /// directory; an error that lists them otherwise.
    pub fn one(&self, name: Option<&str>) -> Result<&Service, ManifestError> {
        match (name, self.services.as_slice()) {
            (Some(n), _) => self.service(n),
            (None, [only]) => Ok(only),
            (None, _) if let Some(here) = self.here() => Ok(here),
            (None, all) => Err(ManifestError::Invalid(format!(
                "{} has {} services: name one of {}",
                self.path.display(),
                all.len(),
                all.iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

/// A dependency cycle, as the names along it with the first repeated at the end.
fn find_cycle(services: &[Service]) -> Option<Vec<String>> {
    fn visit<'a>(
        s: &'a Service,
        all: &'a [Service],
        path: &mut Vec<&'a str>,
        done: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == s.name) {
            let mut cycle: Vec<String> = path[i..].iter().map(|p| (*p).to_owned()).collect();
            cycle.push(s.name.clone());
            return Some(cycle);
        }
        if done.contains(&s.name.as_str()) {
            return None;
        }
        path.push(&s.name);
        for d in &s.depends_on {
            if let Some(dep) = all.iter().find(|x| x.name == *d)
                && let Some(c) = visit(dep, all, path, done)
            {
                return Some(c);
            }
        }
        path.pop();
        done.push(&s.name);
        None
    }
    let mut done = Vec::new();
    services
        .iter()
        .find_map(|s| visit(s, services, &mut Vec::new(), &mut done))
}

/// Checks the `[cache]` table: a URL the store understands, with no credential in it, and keys
/// that decode.
fn cache_settings(
    dir: &Path,
    raw: RawCache,
    located: &dyn Fn(Range<usize>, &str) -> ManifestError,
) -> Result<CacheSettings, ManifestError> {
    let span = raw.url.span();
    let url = raw.url.into_inner();
    let url = url.trim().trim_end_matches('/').to_owned();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(located(
            span,
            &format!(
                "invalid cache url `{url}`: write s3://bucket/prefix, https://host/path or file:///path"
            ),
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    match scheme {
        "s3" | "http" | "https" if authority.is_empty() => {
            return Err(located(
                span,
                &format!("cache url `{url}` names no bucket or host"),
            ));
        }
        "s3" | "http" | "https" => {}
        "file" if rest.starts_with('/') => {}
        "file" => {
            return Err(located(
                span,
                &format!(
                    "cache url `{url}`: a file:// url needs an absolute path, like file:///srv/cache"
                ),
            ));
        }
        other => {
            return Err(located(
                span,
                &format!(
                    "cache url scheme `{other}` is not supported: use s3://, http://, https:// or file://"
                ),
            ));
        }
    }
    // The manifest is committed and shared: a credential in it would leak to everyone.
    if authority.contains('@') || url.contains('?') {
        return Err(located(
            span,
            "a cache url holds no credentials or query: set AWS_* variables for S3, PMESH_CACHE_TOKEN for HTTP",
        ));
    }
    let mut trusted_keys = Vec::with_capacity(raw.trusted_keys.len());
    for k in raw.trusted_keys {
        match crate::cache::sign::parse_public_key(k.get_ref()) {
            Ok(key) => trusted_keys.push(key),
            Err(e) => return Err(located(k.span(), &format!("invalid trusted key: {e}"))),
        }
    }
    let signing_key = raw.signing_key.map(|k| {
        let p = k.into_inner();
        match p.strip_prefix("~/") {
            Some(rest) => std::env::var_os("HOME")
                .map_or_else(|| dir.join(&p), |h| PathBuf::from(h).join(rest)),
            None => dir.join(&p),
        }
    });
    Ok(CacheSettings {
        url,
        push: raw.push,
        trusted_keys,
        signing_key,
        max_size: raw
            .max_size
            .map_or(DEFAULT_CACHE_MAX_SIZE, |s| s.into_inner().0),
        connect_timeout: raw.connect_timeout.map_or(Duration::from_secs(2), |d| d.0),
    })
}

/// Turns serde's wording into the manifest's: keys, not fields, with a suggestion.
fn friendly_message(msg: &str) -> String {
    let msg = msg.trim_end();
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let names: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
        if let Some((unknown, expected)) = names.split_first() {
            let mut out = format!("unknown key `{unknown}`");
            let expected: Vec<&str> = if expected.is_empty() {
                SERVICE_KEYS.to_vec()
            } else {
                expected.to_vec()
            };
            if let Some(s) = suggest(unknown, &expected) {
                out.push_str(&format!("; did you mean `{s}`?"));
            } else {
                out.push_str(&format!("; known keys: {}", expected.join(", ")));
            }
            return out;
        }
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        return format!("wrong type: {rest}");
    }
    msg.to_owned()
}

/// The candidate closest to `word`, if it is close enough to be a typo.
fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// `file:line:col: msg` followed by the offending line and a caret under the span.
pub fn render_located(path: &Path, src: &str, span: Range<usize>, msg: &str) -> String {
    let start = span.start.min(src.len());
    let line_start = src[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = src[start..].find('\n').map_or(src.len(), |i| start + i);
    let line_no = src[..start].matches('\n').count() + 1;
    let col = src[line_start..start].chars().count() + 1;
    let text = &src[line_start..line_end];
    let width = src[start..span.end.clamp(start, line_end)]
        .chars()
        .count()
        .max(1);
    let gutter = line_no.to_string().len();
    format!(
        "{}:{line_no}:{col}: {msg}\n{:gutter$} |\n{line_no} | {text}\n{:gutter$} | {}{}",
        path.display(),
        "",
        "",
        " ".repeat(col - 1),
        "^".repeat(width),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 seconds").is_err());
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("1.5s").is_err());
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("lisen", SERVICE_KEYS), Some("listen"));
        assert_eq!(suggest("biuld", SERVICE_KEYS), Some("build"));
        assert_eq!(suggest("zzzzzzz", SERVICE_KEYS), None);
    }

    #[test]
    fn health() {
        assert_eq!(Health::parse("tcp"), Ok(Health::Tcp));
        assert_eq!(
            Health::parse("GET /healthz"),
            Ok(Health::Get("/healthz".into()))
        );
        assert!(Health::parse("POST /x").is_err());
        assert!(Health::parse("GET healthz").is_err());
    }

    #[test]
    fn location_points_at_the_span() {
        let src = "[services.web]\nlisen = 1\n";
        let out = render_located(Path::new("p.toml"), src, 15..20, "bad");
        assert_eq!(out, "p.toml:2:1: bad\n  |\n2 | lisen = 1\n  | ^^^^^");
    }
}
