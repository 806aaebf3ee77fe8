//! The terminal UI's glue: terminal set-up and restore, the event loop, and the translation
//! between engine events and the pure `pmesh-dev-ui` model. Everything shown is decided in
//! `ui/`; everything done is done by the engines, through the same Commands as the control
//! socket.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use pmesh_dev_ui::{self as ui, BuildRow, EngineEvent, Model, Msg};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::{cursor, event, execute, terminal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::event::{Command, EventKind, Received, Sink, Subscription};
use crate::manifest::Service;
use crate::store::Store;

/// Whether the terminal is in the TUI's state (raw mode, alternate screen), so that every way
/// out restores it once.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Puts the terminal back as it was; does nothing if the TUI is not active.
pub fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
        let _ = io::stdout().flush();
    }
}

fn enter() -> io::Result<()> {
    terminal::enable_raw_mode()?;
    ACTIVE.store(true, Ordering::SeqCst);
    execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
    Ok(())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn epoch_secs(t: Option<SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// The archived builds of `svc`, for the builds pane.
fn builds_of(store: &Store, serving: Option<&str>) -> Vec<BuildRow> {
    let live = store.live();
    store
        .archives()
        .unwrap_or_default()
        .into_iter()
        .map(|a| BuildRow {
            run: live.as_deref() == Some(a.name.as_str()),
            serving: serving == Some(a.name.as_str()),
            id: a.id.map(|i| i.to_string()).unwrap_or_default(),
            status: a.status().as_str().to_owned(),
            created: epoch_secs(a.created()),
            duration_ms: a.record.as_ref().map(|r| r.duration_ms),
            name: a.name,
        })
        .collect()
}

/// The engine of `service`, while it runs.
fn sender(
    commands: &crate::session::Senders,
    service: &str,
) -> Option<mpsc::UnboundedSender<Command>> {
    (commands.lock().unwrap_or_else(|e| e.into_inner()))
        .get(service)
        .cloned()
}

/// The id, archive and log lines of the build `.run` holds, when its log was kept.
fn live_log(store: &Store) -> Option<(String, String, Vec<String>)> {
    let archive = store.archive(&store.live()?)?;
    let log = archive.record.as_ref()?.log.clone()?;
    let text = std::fs::read_to_string(store.log_path(&log)).ok()?;
    let id = archive.id?.to_string();
    Some((id, archive.name, text.lines().map(str::to_owned).collect()))
}

/// The model's view of an engine event; `None` for those it does not show.
fn engine_event(kind: &EventKind) -> Option<EngineEvent> {
    Some(match kind.clone() {
        EventKind::Watching { .. } => EngineEvent::Watching,
        EventKind::BuildStarted { id, .. } => EngineEvent::BuildStarted { id },
        EventKind::Output { line, source } if source == "run" => EngineEvent::RunOutput { line },
        EventKind::Output { line, .. } => EngineEvent::BuildOutput { line },
        EventKind::BuildFinished {
            id,
            ok,
            duration_ms,
            archive,
            error,
        } => EngineEvent::BuildFinished {
            id,
            ok,
            duration_ms,
            archive,
            error,
        },
        EventKind::Cancelled { id } => EngineEvent::Cancelled { id },
        EventKind::Live {
            id, archive, port, ..
        } => EngineEvent::Live {
            id,
            archive,
            port,
            since: now_secs(),
        },
        EventKind::Unhealthy {
            id,
            archive,
            reason,
            ..
        } => EngineEvent::Unhealthy {
            id,
            archive,
            reason,
        },
        EventKind::Crashed { id, reason, .. } => EngineEvent::Crashed { id, reason },
        EventKind::Stopped { id, archive, port } => EngineEvent::Stopped { id, archive, port },
        EventKind::Rollback { to, .. } => EngineEvent::Rollback { to },
        EventKind::Warning { message } => EngineEvent::Warning { message },
        EventKind::Polling {
            polled_dirs,
            poll_interval_ms,
        } => EngineEvent::Warning {
            message: crate::log::polling_line(polled_dirs, poll_interval_ms),
        },
        EventKind::LoopDetected { paths, patterns } => EngineEvent::Warning {
            message: format!(
                "stopped rebuilding: builds write into their own tree ({}); ignore {}",
                paths.join(", "),
                patterns.join(" ")
            ),
        },
        EventKind::UpToDate { id, .. } => EngineEvent::UpToDate { id },
        EventKind::ManifestError { message, .. } => EngineEvent::Warning {
            message: format!("the manifest has an error, nothing changed: {message}"),
        },
        EventKind::ManifestApplied { .. } => return None,
        EventKind::Waiting { for_services, .. } => EngineEvent::Warning {
            message: format!("waiting for {} to be live", for_services.join(", ")),
        },
        EventKind::Reused { .. }
        | EventKind::Fetched { .. }
        | EventKind::Pushed { .. }
        | EventKind::Pruned { .. }
        | EventKind::Rescan { .. } => {
            return None;
        }
    })
}

/// Whether the builds pane must be read again after this event.
fn touches_builds(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Watching { .. }
            | EventKind::BuildFinished { .. }
            | EventKind::Reused { .. }
            | EventKind::Fetched { .. }
            | EventKind::UpToDate { .. }
            | EventKind::Pruned { .. }
            | EventKind::Rollback { .. }
            | EventKind::Live { .. }
            | EventKind::Unhealthy { .. }
            | EventKind::Stopped { .. }
    )
}

/// Runs the TUI until the user quits or `shutdown` fires; `commands` reaches each service's
/// engine. Quitting cancels `shutdown`, which stops every build and instance.
pub async fn run(
    services: Vec<Arc<Service>>,
    sink: &Sink,
    commands: crate::session::Senders,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut events = sink.subscribe();
    enter()?;
    let result = event_loop(&services, &mut events, &commands, &shutdown).await;
    restore();
    shutdown.cancel();
    result
}

async fn event_loop(
    services: &[Arc<Service>],
    events: &mut Subscription,
    commands: &crate::session::Senders,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let stores: BTreeMap<String, Store> = services
        .iter()
        .map(|s| (s.name.clone(), Store::new(&s.root)))
        .collect();
    let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let mut model = Model::new(services.iter().map(|s| s.name.clone()).collect(), color);
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    terminal.clear()?;

    // Keys come from a blocking reader thread; it ends with the process.
    let (keys_tx, mut keys) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Ok(ev) = event::read() {
            if keys_tx.send(ev).is_err() {
                break;
            }
        }
    });
    // The serving archive of each service, from `live` events.
    let mut serving: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = vec![Msg::Now(now_secs())];
    if let Ok(size) = terminal.size() {
        queue.push(Msg::Resize {
            width: size.width,
            height: size.height,
        });
    }
    for svc in services {
        if let Some(url) = crate::deploy::url_of(svc).filter(|_| svc.serves()) {
            queue.push(Msg::Engine {
                service: svc.name.clone(),
                event: EngineEvent::Url { url },
            });
        }
    }
    for (name, store) in &stores {
        if let Some((id, archive, lines)) = live_log(store) {
            queue.push(Msg::Engine {
                service: name.clone(),
                event: EngineEvent::LiveLog { id, archive, lines },
            });
        }
        queue.push(Msg::Builds {
            service: name.clone(),
            builds: builds_of(store, None),
        });
    }
    let mut minute = tokio::time::interval(Duration::from_secs(60));
    minute.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        for msg in std::mem::take(&mut queue) {
            for command in ui::update(&mut model, msg) {
                match command {
                    ui::Command::Quit => return Ok(()),
                    ui::Command::Rollback { service, archive } => {
                        if let Some(tx) = sender(commands, &service) {
                            let _ = tx.send(Command::Rollback {
                                build: Some(archive),
                                reply: None,
                            });
                        }
                    }
                    ui::Command::Rebuild { service } => {
                        if let Some(tx) = sender(commands, &service) {
                            let _ = tx.send(Command::Build {
                                force: true,
                                reply: None,
                            });
                        }
                    }
                    ui::Command::Restart { service } => {
                        if let Some(tx) = sender(commands, &service) {
                            let _ = tx.send(Command::Restart { reply: None });
                        }
                    }
                    ui::Command::LoadLog { service, archive } => {
                        let lines = stores
                            .get(&service)
                            .and_then(|s| {
                                let a = s.archive(&archive)?;
                                let log = a.record?.log?;
                                std::fs::read_to_string(s.log_path(&log)).ok()
                            })
                            .map(|t| t.lines().map(str::to_owned).collect())
                            .unwrap_or_else(|| vec![format!("no log kept for {archive}")]);
                        queue.push(Msg::BuildLog {
                            service,
                            archive,
                            lines,
                        });
                    }
                }
            }
        }
        if !queue.is_empty() {
            continue;
        }
        if model.needs_redraw() {
            terminal.draw(|f| f.render_widget(&model, f.area()))?;
            model.drawn();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            key = keys.recv() => match key {
                Some(event::Event::Key(k)) if k.kind == event::KeyEventKind::Press => {
                    queue.push(Msg::Key(k));
                }
                Some(event::Event::Resize(width, height)) => queue.push(Msg::Resize { width, height }),
                Some(_) => {}
                None => return Ok(()),
            },
            e = events.recv() => match e {
                Some(Received::Event(e)) => {
                    match &e.kind {
                        EventKind::Live { archive, .. } => {
                            serving.insert(e.service.clone(), archive.clone());
                        }
                        EventKind::Crashed { .. } => {
                            serving.remove(&e.service);
                        }
                        _ => {}
                    }
                    if let Some(event) = engine_event(&e.kind) {
                        queue.push(Msg::Engine { service: e.service.clone(), event });
                    }
                    if touches_builds(&e.kind)
                        && let Some(store) = stores.get(&e.service)
                    {
                        queue.push(Msg::Builds {
                            service: e.service.clone(),
                            builds: builds_of(store, serving.get(&e.service).map(String::as_str)),
                        });
                    }
                }
                // Only output lines are ever dropped; the screen says how many.
                Some(Received::Dropped(lines)) => queue.push(Msg::Dropped { lines }),
                None => return Ok(()),
            },
            _ = minute.tick() => queue.push(Msg::Now(now_secs())),
        }
    }
}
