//! The command line: raw flags, then one step that resolves them against the manifest, then
//! the command. Errors carry the exit code they end with.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::control;
use crate::event::Sink;
use crate::hash::{self, CacheUse, HashSpec};
use crate::log::{Format, Printer};
use crate::manifest::{self, Manifest};
use crate::pipeline::{self, Outcome};
use crate::store::Store;

/// Exit codes.
pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser, Debug)]
#[command(
    name = "pmesh-dev",
    version,
    about = "Content-hashed builds, archived and flipped into place atomically"
)]
pub struct Cli {
    /// Use this manifest instead of the nearest pmesh.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Watch services (all, or those named): build at start if needed, then after every change.
    Watch {
        services: Vec<String>,
        /// Plain lines instead of the terminal UI (which needs a terminal anyway).
        #[arg(long)]
        no_tui: bool,
        /// One JSON event per line on stdout.
        #[arg(long)]
        json: bool,
        /// How changes are seen: inotify (Linux), the system's native watcher (FSEvents on
        /// macOS), or polling; `auto` picks the first the system has.
        #[arg(long, value_enum, default_value_t = crate::watch::Backend::Auto)]
        watcher: crate::watch::Backend,
        /// Poll the trees (network or virtual filesystems): `--watcher poll`.
        #[arg(long)]
        poll: bool,
    },
    /// Hash, build if needed, archive and flip .run (all services, or those named).
    Build {
        services: Vec<String>,
        /// Build even if .run already holds this tree's id.
        #[arg(long)]
        force: bool,
        /// One JSON event per line on stdout.
        #[arg(long)]
        json: bool,
        /// Upload the build to the manifest's [cache] before exiting (fills a team's cache).
        #[arg(long)]
        push: bool,
    },
    /// Print the build id of a service or of any directory.
    Hash {
        /// A service name, or a directory to hash with default settings.
        target: Option<String>,
        /// Every hashed entry: `<digest>  <path>`, sorted by path.
        #[arg(long, conflicts_with = "json")]
        list: bool,
        /// `{"id": ..., "files": ..., "bytes": ...}`.
        #[arg(long)]
        json: bool,
        /// Where the time went, on stderr.
        #[arg(long)]
        stats: bool,
    },
    /// List archived builds, newest first, the live one marked.
    Builds {
        service: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Re-point .run at an older build (default: the newest good one older than the live one).
    Rollback {
        /// `[SERVICE] [BUILD]`; SERVICE may be left out when there is one service.
        #[arg(num_args = 0..=2, value_name = "SERVICE|BUILD")]
        args: Vec<String>,
    },
    /// Serve what .run points to (all services with `run`, or those named), without building.
    Run {
        services: Vec<String>,
        /// One JSON event per line on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Write a commented starter pmesh.toml here and add pmesh-dev's paths to .gitignore.
    Init,
}

/// A command's failure and the exit code it ends with.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: EXIT_FAILED,
            error: e.into(),
        }
    }
}

/// An error of usage or configuration: exit 2.
fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: EXIT_USAGE,
        error: e.into(),
    }
}

type Result<T> = std::result::Result<T, Failure>;

fn load_manifest(explicit: Option<&Path>) -> Result<Manifest> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => manifest::find(&std::env::current_dir()?).map_err(usage)?,
    };
    Manifest::load(&path).map_err(usage)
}

/// Runs the parsed command line; returns the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let manifest = cli.manifest.as_deref();
    match cli.command {
        Command::Watch {
            services,
            no_tui,
            json,
            watcher,
            poll,
        } => {
            let watcher = if poll {
                crate::watch::Backend::Poll
            } else {
                watcher
            };
            watch(manifest, &services, json, watcher, no_tui)
        }
        Command::Build {
            services,
            force,
            json,
            push,
        } => build(manifest, &services, force, json, push),
        Command::Hash {
            target,
            list,
            json,
            stats,
        } => hash_cmd(manifest, target.as_deref(), list, json, stats),
        Command::Builds { service, json } => builds(manifest, service.as_deref(), json),
        Command::Rollback { args } => rollback(manifest, &args),
        Command::Run { services, json } => run_cmd(manifest, &services, json),
        Command::Init => {
            let msg = crate::init::init(&std::env::current_dir()?, manifest).map_err(usage)?;
            println!("{msg}");
            Ok(EXIT_OK)
        }
    }
}

/// The services `names` (all when empty), ready to share between tasks.
fn selected(m: &Manifest, names: &[String]) -> Result<Vec<Arc<crate::manifest::Service>>> {
    Ok(m.select(names)
        .map_err(usage)?
        .into_iter()
        .cloned()
        .map(Arc::new)
        .collect())
}

/// A printer of plain lines (prefixed with the service when there are several) or NDJSON.
fn plain_or_json(json: bool, services: usize) -> Printer {
    let format = if json { Format::Json } else { Format::Plain };
    Printer::new(format, services > 1)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn watch(
    manifest: Option<&Path>,
    names: &[String],
    json: bool,
    watcher: crate::watch::Backend,
    no_tui: bool,
) -> Result<u8> {
    use std::io::IsTerminal;
    let m = load_manifest(manifest)?;
    let services = selected(&m, names)?;
    // The TUI needs a terminal on both sides; anything else gets plain lines.
    let tui = !no_tui && !json && io::stdout().is_terminal() && io::stdin().is_terminal();
    let format = match (tui, json) {
        (true, _) => Format::Quiet,
        (false, true) => Format::Json,
        (false, false) => Format::Plain,
    };
    let opts = crate::engine::WatchOptions { watcher };
    crate::builder::force_colour(tui || (format == Format::Plain && crate::log::colour_terminal()));
    // Each root is held for the whole watch; a second pmesh-dev on it is refused.
    let locks = crate::session::Session::lock_all(&services)?;
    let rt = runtime()?;
    let sink = Sink::new();
    rt.block_on(async {
        let printing = Printer::new(format, services.len() > 1).spawn(&sink);
        let shutdown = CancellationToken::new();
        cancel_on_signals(shutdown.clone())?;
        let mut session =
            crate::session::Session::new(&m, names, opts, sink.clone(), shutdown.clone());
        for (svc, lock) in services.iter().zip(locks) {
            session.start(svc.clone(), lock);
        }
        let mut errors = Vec::new();
        let senders = session.senders.clone();
        let ui = async {
            if tui {
                crate::tui::run(services.clone(), &sink, senders, shutdown.clone()).await
            } else {
                shutdown.cancelled().await;
                Ok(())
            }
        };
        tokio::pin!(ui);
        let mut manifest_tick = tokio::time::interval(crate::session::MANIFEST_EVERY);
        manifest_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = &mut ui => {
                    if let Err(e) = r {
                        errors.push(format!("error: the terminal UI failed: {e:#}"));
                    }
                    break;
                }
                failed = session.next_failure(), if !session.is_empty() => match failed {
                    Some(f) => {
                        // One service that cannot be watched stops the whole watch: a partial
                        // one would look like it works.
                        errors.push(format!("error: service `{}`: {:#}", f.service, f.error));
                        shutdown.cancel();
                    }
                    None => break,
                },
                _ = manifest_tick.tick() => session.check_manifest().await,
            }
        }
        shutdown.cancel();
        while let Some(f) = session.next_failure().await {
            errors.push(format!("error: service `{}`: {:#}", f.service, f.error));
        }
        printing.finish().await;
        let mut code = EXIT_OK;
        for e in &errors {
            eprintln!("{e}");
            code = EXIT_FAILED;
        }
        Ok(code)
    })
}

fn run_cmd(manifest: Option<&Path>, names: &[String], json: bool) -> Result<u8> {
    let m = load_manifest(manifest)?;
    let selected = m.select(names).map_err(usage)?;
    if let Some(s) = selected.iter().find(|s| !s.serves() && !names.is_empty()) {
        return Err(usage(anyhow::anyhow!(
            "service `{}` has no `run` command in {}",
            s.name,
            m.path.display()
        )));
    }
    let services: Vec<_> = selected
        .into_iter()
        .filter(|s| s.serves())
        .cloned()
        .map(Arc::new)
        .collect();
    if services.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "no service in {} has a `run` command",
            m.path.display()
        )));
    }
    let printer = plain_or_json(json, services.len());
    let rt = runtime()?;
    let sink = Sink::new();
    rt.block_on(async {
        let printing = printer.spawn(&sink);
        let shutdown = CancellationToken::new();
        cancel_on_signals(shutdown.clone())?;
        let mut tasks = tokio::task::JoinSet::new();
        let mut code = EXIT_OK;
        let mut errors = Vec::new();
        for svc in services {
            // A running watch already serves it.
            let request = control::Request::Run;
            if let Some(done) = control::request(&svc.root, &request, |e| sink.emit(&e)).await {
                if let Ok(d) = &done
                    && d.code == EXIT_OK
                {
                    eprintln!("{}", d.message);
                }
                code = remote_code(&svc.name, done);
                if code != EXIT_OK {
                    break;
                }
                continue;
            }
            let name = svc.name.clone();
            let fut = crate::deploy::run_only(svc, sink.clone(), shutdown.clone());
            tasks.spawn(async move { (name, fut.await) });
        }
        if code != EXIT_OK {
            shutdown.cancel();
        }
        while let Some(joined) = tasks.join_next().await {
            let (name, result) = joined?;
            if let Err(e) = result {
                errors.push(format!("error: service `{name}`: {e:#}"));
                code = EXIT_FAILED;
                shutdown.cancel();
            }
        }
        printing.finish().await;
        for e in &errors {
            eprintln!("{e}");
        }
        Ok(code)
    })
}

/// Cancels `token` on the first SIGINT or SIGTERM; a second one exits at once.
fn cancel_on_signals(token: CancellationToken) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        token.cancel();
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        crate::tui::restore();
        std::process::exit(i32::from(EXIT_INTERRUPTED));
    });
    Ok(())
}

/// How one service's request was carried out: here, or by a running watch.
enum Carried<T> {
    Local(T),
    Remote(std::io::Result<crate::event::Done>),
}
use Carried::{Local, Remote};

/// The exit code of a request a running watch carried out, saying why when it failed.
fn remote_code(name: &str, done: std::io::Result<crate::event::Done>) -> u8 {
    match done {
        Ok(d) => {
            if d.code != EXIT_OK {
                if d.message.contains(&format!("`{name}`")) {
                    eprintln!("error: {}", d.message);
                } else {
                    eprintln!("error: service `{name}`: {}", d.message);
                }
            }
            d.code
        }
        Err(e) => {
            eprintln!("error: service `{name}`: the running watch did not answer: {e}");
            EXIT_FAILED
        }
    }
}

fn build(
    manifest: Option<&Path>,
    names: &[String],
    force: bool,
    json: bool,
    push: bool,
) -> Result<u8> {
    let m = load_manifest(manifest)?;
    if push && m.cache.is_none() {
        return Err(usage(anyhow::anyhow!(
            "--push needs a [cache] table in {}",
            m.path.display()
        )));
    }
    let services = selected(&m, names)?;
    let printer = plain_or_json(json, services.len());
    crate::builder::force_colour(!json && crate::log::colour_terminal());
    let rt = runtime()?;
    let sink = Sink::new();
    rt.block_on(async {
        let printing = printer.spawn(&sink);
        let cancel = CancellationToken::new();
        cancel_on_signals(cancel.clone())?;
        let mut tasks = tokio::task::JoinSet::new();
        for svc in services {
            let name = svc.name.clone();
            let (manifest, sink, cancel) = (m.path.clone(), sink.clone(), cancel.clone());
            tasks.spawn(async move {
                // A running watch owns this root: it builds, and we show what it does.
                let request = control::Request::Build { force };
                if let Some(done) = control::request(&svc.root, &request, |e| sink.emit(&e)).await {
                    return (name, Remote(done));
                }
                let outcome =
                    pipeline::build(svc.clone(), manifest, force, sink.clone(), cancel).await;
                // The team's cache (issue 14): the upload finishes before the command exits.
                if let Some(e) = crate::cache::push_after_build(&svc, &outcome, push, &sink).await {
                    return (name, Local(Err(e)));
                }
                (name, Local(outcome))
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            results.push(joined?);
        }
        // What the builds printed comes before what this says of them.
        printing.finish().await;
        let mut code = EXIT_OK;
        for (name, result) in results {
            let c = match result {
                Local(Ok(Outcome::Cancelled)) => EXIT_INTERRUPTED,
                Local(Ok(Outcome::Failed { .. })) => EXIT_FAILED,
                Local(Ok(_)) => EXIT_OK,
                Local(Err(e)) => {
                    eprintln!("error: service `{name}`: {e:#}");
                    EXIT_FAILED
                }
                Remote(done) => remote_code(&name, done),
            };
            code = code.max(c);
        }
        Ok(code)
    })
}

/// Writes to stdout; a closed pipe (`| head`) ends the output quietly.
fn out(bytes: &[u8]) -> Result<()> {
    match io::stdout().lock().write_all(bytes) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn hash_cmd(
    manifest: Option<&Path>,
    target: Option<&str>,
    list: bool,
    json: bool,
    stats: bool,
) -> Result<u8> {
    // A service of the manifest when one is named (or the only one), else a directory.
    let loaded = match (target, manifest) {
        (_, Some(p)) => Some(Manifest::load(p).map_err(usage)?),
        (None, None) => Some(load_manifest(None)?),
        (Some(_), None) => match manifest::find(&std::env::current_dir()?) {
            Ok(p) => Some(Manifest::load(&p).map_err(usage)?),
            Err(_) => None,
        },
    };
    let svc = match (&loaded, target) {
        (Some(m), Some(t)) if m.services.iter().any(|s| s.name == t) => Some(m.service(t)?),
        (Some(m), None) => Some(m.one(None).map_err(usage)?),
        _ => None,
    };
    let dir;
    let tree = match (svc, &loaded) {
        (Some(svc), Some(m)) => {
            hash::hash_tree(&HashSpec::service(svc, &m.path), CacheUse::Persist)?
        }
        _ => {
            let t = target.unwrap_or(".");
            dir = Path::new(t).canonicalize().map_err(|_| {
                usage(anyhow::anyhow!(
                    "`{t}` is neither a service of the manifest nor a directory"
                ))
            })?;
            if !dir.is_dir() {
                return Err(usage(anyhow::anyhow!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
            hash::hash_tree(&HashSpec::dir(&dir), CacheUse::None)?
        }
    };
    for w in &tree.warnings {
        eprintln!("warning: {w}");
    }
    if stats {
        eprintln!("{}", tree.timings);
    }
    if list {
        let mut buf = Vec::with_capacity(tree.entries.len() * 64);
        for e in &tree.entries {
            buf.extend_from_slice(format!("{:032x}  ", e.digest).as_bytes());
            quote_path(&e.path, &mut buf);
            buf.push(b'\n');
        }
        out(&buf)?;
    } else if json {
        let v = serde_json::json!({
            "id": tree.id.to_string(),
            "files": tree.entries.len(),
            "bytes": tree.bytes,
        });
        out(format!("{v}\n").as_bytes())?;
    } else {
        out(format!("{}\n", tree.id).as_bytes())?;
    }
    Ok(EXIT_OK)
}

/// Writes `path` as is, unless it holds a control character: then C-quoted the way git quotes
/// it (`"new\nline.txt"`), so that every entry stays on one line. Other bytes (UTF-8, quotes
/// and backslashes included) are written unchanged, so that plain names sort as bytes.
fn quote_path(path: &[u8], out: &mut Vec<u8>) {
    let needs = path.iter().any(|&b| b < 0x20 || b == 0x7f);
    if !needs {
        out.extend_from_slice(path);
        return;
    }
    out.push(b'"');
    for &b in path {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b if b < 0x20 || b == 0x7f => out.extend_from_slice(format!("\\{b:03o}").as_bytes()),
            b => out.push(b),
        }
    }
    out.push(b'"');
}

fn age(t: Option<SystemTime>) -> String {
    let Some(t) = t else { return "?".to_owned() };
    let secs = SystemTime::now()
        .duration_since(t)
        .map_or(0, |d| d.as_secs());
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

fn builds(manifest: Option<&Path>, service: Option<&str>, json: bool) -> Result<u8> {
    let m = load_manifest(manifest)?;
    // One service when it is named, the only one, or the one we are in; else all of them.
    let services: Vec<&crate::manifest::Service> = match m.one(service) {
        Ok(svc) => vec![svc],
        Err(_) if service.is_none() => m.services.iter().collect(),
        Err(e) => return Err(usage(e)),
    };
    let several = services.len() > 1;
    let mut items = Vec::new();
    let mut text = String::new();
    for svc in services {
        let store = Store::new(&svc.root);
        let live = store.live();
        let archives = store.archives()?;
        for a in &archives {
            let mut item = serde_json::json!({
                "name": a.name,
                "id": a.id.map(|i| i.to_string()),
                "live": live.as_deref() == Some(a.name.as_str()),
                "status": a.status().as_str(),
                "created": a.created().map(|t| humantime::format_rfc3339_millis(t).to_string()),
            });
            if several {
                item["service"] = serde_json::Value::String(svc.name.clone());
            }
            items.push(item);
        }
        if several {
            text.push_str(&format!("{}:\n", svc.name));
        }
        if archives.is_empty() {
            text.push_str(&format!(
                "{}: no builds yet (run `pmesh-dev build`)\n",
                svc.name
            ));
            continue;
        }
        text.push_str(&format!(
            "  {:<29} {:<13} {:<9} STATUS\n",
            "BUILD", "ID", "AGE"
        ));
        for a in &archives {
            let is_live = live.as_deref() == Some(a.name.as_str());
            text.push_str(&format!(
                "{} {:<29} {:<13} {:<9} {}{}\n",
                if is_live { "*" } else { " " },
                a.name,
                a.id.map_or_else(|| "?".to_owned(), |i| i.short()),
                age(a.created()),
                a.status().as_str(),
                if is_live { "  <- .run" } else { "" }
            ));
        }
    }
    if json {
        out(format!("{}\n", serde_json::Value::Array(items)).as_bytes())?;
    } else {
        out(text.as_bytes())?;
    }
    Ok(EXIT_OK)
}

fn rollback(manifest: Option<&Path>, args: &[String]) -> Result<u8> {
    let m = load_manifest(manifest)?;
    let (svc, target) = match args {
        [] => (m.one(None).map_err(usage)?, None),
        [one] if m.services.iter().any(|s| s.name == *one) => (m.service(one)?, None),
        [one] => (m.one(None).map_err(usage)?, Some(one.as_str())),
        [svc, build, ..] => (m.service(svc).map_err(usage)?, Some(build.as_str())),
    };
    let request = control::Request::Rollback {
        build: target.map(str::to_owned),
    };
    let sink = Sink::new();
    runtime()?.block_on(async {
        let printing = Printer::new(Format::Plain, false).spawn(&sink);
        let remote = control::request(&svc.root, &request, |e| sink.emit(&e)).await;
        let local = match remote {
            Some(_) => None,
            None => Some(pipeline::rollback(svc, target, &sink)),
        };
        printing.finish().await;
        match (remote, local) {
            (Some(done), _) => Ok(remote_code(&svc.name, done)),
            (None, Some(Err(e))) => Err(Failure {
                code: e.code(),
                error: e.into(),
            }),
            (None, _) => Ok(EXIT_OK),
        }
    })
}
