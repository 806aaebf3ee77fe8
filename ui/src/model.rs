//! The state of the UI and the messages and commands it exchanges with the engine.

use ratatui::crossterm::event::KeyEvent;

use crate::keys::Pane;
use crate::log::{LogBuffer, LogView, Query};

/// Everything the UI shows, built only from the messages it was sent.
#[derive(Debug)]
pub struct Model {
    pub(crate) services: Vec<Service>,
    /// Index into `services` of the service the builds and log panes show.
    pub(crate) selected: usize,
    pub(crate) focus: Pane,
    pub(crate) mode: Mode,
    /// False when colours are off (`NO_COLOR`): only bold, reverse and the like are used.
    pub(crate) color: bool,
    pub(crate) width: u16,
    pub(crate) height: u16,
    /// Seconds since the Unix epoch, as last sent; 0 until the first `Msg::Now`.
    pub(crate) now: u64,
    /// The accepted search and the line of its current match.
    pub(crate) search: Option<Search>,
    /// A one-line note for the status line, cleared by the next key.
    pub(crate) message: Option<(Severity, String)>,
    /// Set once `Quit` was sent: the status line says the instances are stopping.
    pub(crate) quitting: bool,
    pub(crate) dirty: bool,
}

/// A message to `update`: a key, a resize, the time, or news from the engine.
#[derive(Debug, Clone)]
pub enum Msg {
    Key(KeyEvent),
    /// The terminal's size; the glue sends it once at start and on every resize.
    Resize {
        width: u16,
        height: u16,
    },
    /// Wall-clock now, as seconds since the Unix epoch (for ages/uptime); sent at most about
    /// once a minute by the glue, and with each engine message.
    Now(u64),
    /// One engine event for `service`.
    Engine {
        service: String,
        event: EngineEvent,
    },
    /// The archived builds of a service, newest first (the glue re-reads them after
    /// builds/rollbacks).
    Builds {
        service: String,
        builds: Vec<BuildRow>,
    },
    /// The text of a build's log, answering `Command::LoadLog`.
    BuildLog {
        service: String,
        archive: String,
        lines: Vec<String>,
    },
    /// A front end too slow for the output dropped this many of its lines (never a state
    /// event).
    Dropped {
        lines: u64,
    },
}

/// What the engine reports about one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// The service's tree is watched.
    Watching,
    /// Where the service is reached: its proxy's address, which stays the same across swaps.
    Url {
        url: String,
    },
    /// At start: the log of the build that is live, so that the screen opens on it.
    LiveLog {
        id: String,
        archive: String,
        lines: Vec<String>,
    },
    BuildStarted {
        id: String,
    },
    /// A line a build step printed, escape sequences and all.
    BuildOutput {
        line: String,
    },
    /// A build ended; `archive` is set once the archive exists and `.run` points to it.
    BuildFinished {
        id: String,
        ok: bool,
        duration_ms: u64,
        archive: Option<String>,
        error: Option<String>,
    },
    Cancelled {
        id: String,
    },
    /// The tree is the live build's (`id`) again: a failure shown before no longer stands.
    UpToDate {
        id: String,
    },
    /// An instance of build `id` serves on `port` since `since` (seconds since the epoch).
    Live {
        id: String,
        archive: String,
        port: u16,
        since: u64,
    },
    /// An instance never became healthy; `.run` went back and the old instance serves.
    Unhealthy {
        id: String,
        archive: String,
        reason: String,
    },
    /// The serving instance exited on its own.
    Crashed {
        id: String,
        reason: String,
    },
    /// An instance is being started again (after a crash, or asked with `Restart`).
    /// An addition to the list: the engine's crash restarts show as "restarting".
    Restarting {
        id: String,
    },
    /// An instance was stopped. `port` (an addition) tells an old instance stopped after a
    /// swap from the one serving, when both run the same build.
    Stopped {
        id: String,
        archive: String,
        port: u16,
    },
    /// A line the running instance printed.
    RunOutput {
        line: String,
    },
    /// `.run` moved back to the archive `to`.
    Rollback {
        to: String,
    },
    Warning {
        message: String,
    },
}

/// One archived build, as `pmesh-dev builds` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRow {
    /// The archive's directory name, `.build-<ts>`.
    pub name: String,
    /// The build id, lowercase hex.
    pub id: String,
    /// `"ok"` or `"unhealthy"`.
    pub status: String,
    /// When it was archived, in seconds since the epoch.
    pub created: u64,
    pub duration_ms: Option<u64>,
    /// `.run` points to this build.
    pub run: bool,
    /// An instance of this build is serving.
    pub serving: bool,
}

/// What the UI asks the engine to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Rollback { service: String, archive: String },
    Rebuild { service: String },
    Restart { service: String },
    LoadLog { service: String, archive: String },
    Quit,
}

/// What a service is doing, as the services pane shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// Nothing runs and nothing builds.
    Idle,
    Building,
    /// A build finished and its instance is starting.
    Starting,
    Live,
    /// The last build's instance never became healthy (an older one may still serve).
    Unhealthy,
    Crashed,
    Restarting,
    /// The last build failed (an older instance may still serve).
    Failed,
}

impl ServiceState {
    pub fn label(self) -> &'static str {
        match self {
            ServiceState::Idle => "idle",
            ServiceState::Building => "building",
            ServiceState::Starting => "starting",
            ServiceState::Live => "live",
            ServiceState::Unhealthy => "unhealthy",
            ServiceState::Crashed => "crashed",
            ServiceState::Restarting => "restarting",
            ServiceState::Failed => "build failed",
        }
    }
}

/// The modal state of the screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mode {
    Normal,
    /// Asking whether to roll `service` back to `archive`.
    Confirm {
        service: String,
        archive: String,
        id: String,
    },
    /// Typing a search query.
    Search {
        draft: String,
    },
    Help,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Severity {
    Info,
    Warning,
}

#[derive(Debug, Clone)]
pub(crate) struct Search {
    pub query: Query,
    pub current: Option<usize>,
}

/// Which log the log pane shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogSource {
    Build,
    Runtime,
}

/// The instance that serves (or last served) a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Instance {
    pub id: String,
    pub archive: String,
    /// `None` once it crashed.
    pub port: Option<u16>,
    pub since: Option<u64>,
}

/// A build log opened with Enter; `log` is `None` until the engine sends it.
#[derive(Debug, Clone)]
pub(crate) struct OpenedLog {
    pub archive: String,
    pub id: String,
    pub log: Option<LogBuffer>,
}

/// One service's part of the model.
#[derive(Debug, Clone)]
pub(crate) struct Service {
    pub name: String,
    pub state: ServiceState,
    pub watching: bool,
    /// The id of the build in progress.
    pub building: Option<String>,
    pub instance: Option<Instance>,
    /// Its proxy's address, if it has one.
    pub url: Option<String>,
    /// The last failure (build error, unhealthy or crash reason), shown next to the state.
    pub problem: Option<String>,
    pub builds: Vec<BuildRow>,
    pub selected_build: usize,
    /// The selection follows the build `.run` points to until the user moves it.
    pub follow_run: bool,
    /// The output of the current or last build, and its id.
    pub build_log: LogBuffer,
    pub build_log_id: Option<String>,
    pub opened: Option<OpenedLog>,
    pub runtime: LogBuffer,
    pub source: LogSource,
    pub build_view: LogView,
    pub runtime_view: LogView,
}

impl Service {
    pub fn new(name: String) -> Service {
        Service {
            name,
            state: ServiceState::Idle,
            watching: false,
            building: None,
            instance: None,
            url: None,
            problem: None,
            builds: Vec::new(),
            selected_build: 0,
            follow_run: true,
            build_log: LogBuffer::default(),
            build_log_id: None,
            opened: None,
            runtime: LogBuffer::default(),
            source: LogSource::Build,
            build_view: LogView::default(),
            runtime_view: LogView::default(),
        }
    }

    /// The log the log pane shows, if there is one yet.
    pub fn log(&self) -> Option<&LogBuffer> {
        match (self.source, &self.opened) {
            (LogSource::Runtime, _) => Some(&self.runtime),
            (LogSource::Build, Some(opened)) => opened.log.as_ref(),
            (LogSource::Build, None) => Some(&self.build_log),
        }
    }

    /// The log shown and its scroll position, for changing the position.
    pub fn log_and_view(&mut self) -> (Option<&LogBuffer>, &mut LogView) {
        match (self.source, &self.opened) {
            (LogSource::Runtime, _) => (Some(&self.runtime), &mut self.runtime_view),
            (LogSource::Build, Some(opened)) => (opened.log.as_ref(), &mut self.build_view),
            (LogSource::Build, None) => (Some(&self.build_log), &mut self.build_view),
        }
    }

    pub fn view(&self) -> &LogView {
        match self.source {
            LogSource::Runtime => &self.runtime_view,
            LogSource::Build => &self.build_view,
        }
    }

    pub fn selected_build(&self) -> Option<&BuildRow> {
        self.builds.get(self.selected_build)
    }
}

impl Model {
    /// A model for `services`; `color: false` (for `NO_COLOR`) draws without any colour.
    pub fn new(services: Vec<String>, color: bool) -> Model {
        Model {
            services: services.into_iter().map(Service::new).collect(),
            selected: 0,
            focus: Pane::Builds,
            mode: Mode::Normal,
            color,
            width: 80,
            height: 24,
            now: 0,
            search: None,
            message: None,
            quitting: false,
            dirty: true,
        }
    }

    /// Whether something changed since the last `drawn`; the glue draws only then.
    pub fn needs_redraw(&self) -> bool {
        self.dirty
    }

    /// Tells the model the screen now shows its state.
    pub fn drawn(&mut self) {
        self.dirty = false;
    }

    /// The pane that has the focus.
    pub fn focus(&self) -> Pane {
        self.focus
    }

    /// The state of the service `name`, if the model knows it.
    pub fn service_state(&self, name: &str) -> Option<ServiceState> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.state)
    }

    /// Whether `Quit` was sent.
    pub fn is_quitting(&self) -> bool {
        self.quitting
    }

    pub(crate) fn service(&self) -> Option<&Service> {
        self.services.get(self.selected)
    }

    pub(crate) fn service_mut(&mut self) -> Option<&mut Service> {
        self.services.get_mut(self.selected)
    }

    /// The index of `name`, adding the service if the model did not know it.
    pub(crate) fn service_index(&mut self, name: &str) -> usize {
        match self.services.iter().position(|s| s.name == name) {
            Some(i) => i,
            None => {
                self.services.push(Service::new(name.to_owned()));
                self.services.len() - 1
            }
        }
    }
}
