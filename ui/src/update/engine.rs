//! Engine news into the model: events change a service's state and logs; build lists keep
//! the selection on the live build until the user moves it.

use ratatui::style::{Color, Style};

use crate::format::{duration, short_id};
use crate::log::LogView;
use crate::model::{BuildRow, EngineEvent, Instance, LogSource, Model, ServiceState, Severity};

pub(super) fn on_builds(model: &mut Model, service: &str, builds: Vec<BuildRow>) {
    let i = model.service_index(service);
    let svc = &mut model.services[i];
    let before = svc.selected_build().map(|b| b.name.clone());
    let run = builds.iter().position(|b| b.run);
    let kept = before.and_then(|name| builds.iter().position(|b| b.name == name));
    svc.selected_build = match (svc.follow_run, run, kept) {
        (true, Some(run), _) => run,
        (_, _, Some(kept)) => kept,
        _ => svc.selected_build.min(builds.len().saturating_sub(1)),
    };
    svc.builds = builds;
    model.dirty = true;
}

pub(super) fn on_engine(model: &mut Model, service: &str, event: EngineEvent) {
    let i = model.service_index(service);
    let shown = i == model.selected;
    let svc = &mut model.services[i];
    let dim = Style::new().fg(Color::DarkGray);
    let good = Style::new().fg(Color::Green);
    let bad = Style::new().fg(Color::Red);
    let mut visible = true;
    match event {
        EngineEvent::Watching => svc.watching = true,
        EngineEvent::Url { url } => svc.url = Some(url),
        EngineEvent::LiveLog { id, archive, lines } => {
            // Only while nothing newer was shown.
            if svc.build_log_id.is_none() && svc.building.is_none() {
                svc.build_log.note(
                    &format!("── log of the live build {} ({archive}) ──", short_id(&id)),
                    dim,
                );
                for line in &lines {
                    svc.build_log.push(line);
                }
                svc.build_log_id = Some(id);
            }
        }
        EngineEvent::BuildStarted { id } => {
            svc.state = ServiceState::Building;
            svc.problem = None;
            svc.build_log.clear();
            svc.build_log
                .note(&format!("── build {} started ──", short_id(&id)), dim);
            svc.build_log_id = Some(id.clone());
            svc.building = Some(id);
            // A new build replaces an opened log, unless the user scrolled in it.
            if svc.build_view.follow {
                svc.opened = None;
            }
            if svc.opened.is_none() {
                svc.build_view = LogView::default();
            }
        }
        EngineEvent::BuildOutput { line } => {
            svc.build_log.push(&line);
            // Output of a log that is not on screen changes nothing there.
            visible = shown && svc.source == LogSource::Build && svc.opened.is_none();
        }
        EngineEvent::BuildFinished {
            id,
            ok,
            duration_ms,
            archive,
            error,
        } => {
            svc.building = None;
            let took = duration(duration_ms);
            if ok {
                svc.state = ServiceState::Starting;
                let into = archive.map(|a| format!(" into {a}")).unwrap_or_default();
                let note = format!("── build {} done in {took}{into} ──", short_id(&id));
                svc.build_log.note(&note, good);
            } else {
                svc.state = ServiceState::Failed;
                let error = error.unwrap_or_else(|| "a build step failed".to_owned());
                let note = format!("── build {} failed after {took}: {error} ──", short_id(&id));
                svc.build_log.note(&note, bad);
                svc.problem = Some(error);
            }
        }
        EngineEvent::Cancelled { id } => {
            svc.building = None;
            svc.state = match &svc.instance {
                Some(Instance { port: Some(_), .. }) => ServiceState::Live,
                _ => ServiceState::Idle,
            };
            svc.build_log
                .note(&format!("── build {} cancelled ──", short_id(&id)), dim);
        }
        EngineEvent::UpToDate { id } => {
            if matches!(svc.state, ServiceState::Failed | ServiceState::Unhealthy) {
                svc.state = match &svc.instance {
                    Some(Instance { port: Some(_), .. }) => ServiceState::Live,
                    _ => ServiceState::Idle,
                };
                svc.problem = None;
                let note = format!("── the tree is {} again, the live build ──", short_id(&id));
                svc.build_log.note(&note, good);
            }
        }
        EngineEvent::Live {
            id,
            archive,
            port,
            since,
        } => {
            svc.state = ServiceState::Live;
            svc.problem = None;
            svc.runtime.note(
                &format!("── {} live on port {port} ──", short_id(&id)),
                good,
            );
            svc.instance = Some(Instance {
                id,
                archive,
                port: Some(port),
                since: Some(since),
            });
        }
        EngineEvent::Unhealthy {
            id,
            archive,
            reason,
        } => {
            svc.state = ServiceState::Unhealthy;
            // The reason's first line in the note, the instance's last lines under it, one a
            // line (they name the file and line that failed).
            let mut lines = reason.lines();
            let first = lines.next().unwrap_or("");
            let note = format!("── {} ({archive}) unhealthy: {first} ──", short_id(&id));
            for log in [&mut svc.build_log, &mut svc.runtime] {
                log.note(&note, bad);
                for line in lines.clone() {
                    log.push(line.trim_start());
                }
            }
            svc.problem = Some(first.trim_end_matches("; its last lines:").to_owned());
        }
        EngineEvent::Crashed { id, reason } => {
            svc.state = ServiceState::Crashed;
            svc.runtime
                .note(&format!("── {} crashed: {reason} ──", short_id(&id)), bad);
            if let Some(instance) = svc.instance.as_mut().filter(|i| i.id == id) {
                instance.port = None;
                instance.since = None;
            }
            svc.problem = Some(reason);
        }
        EngineEvent::Restarting { id } => {
            svc.state = ServiceState::Restarting;
            svc.runtime
                .note(&format!("── restarting {} ──", short_id(&id)), dim);
        }
        EngineEvent::Stopped { id, archive, port } => {
            svc.runtime.note(
                &format!("── {} on port {port} stopped ──", short_id(&id)),
                dim,
            );
            let serving = svc
                .instance
                .as_ref()
                .is_some_and(|i| i.archive == archive && i.port == Some(port));
            if serving {
                svc.instance = None;
                if svc.building.is_none() {
                    svc.state = ServiceState::Idle;
                }
            }
        }
        EngineEvent::RunOutput { line } => {
            svc.runtime.push(&line);
            visible = shown && svc.source == LogSource::Runtime;
        }
        EngineEvent::Rollback { to } => {
            svc.runtime
                .note(&format!("── .run rolled back to {to} ──"), dim);
            model.message = Some((
                Severity::Info,
                format!("{service}: .run rolled back to {to}"),
            ));
        }
        EngineEvent::Warning { message } => {
            model.message = Some((Severity::Warning, format!("{service}: {message}")));
        }
    }
    model.dirty |= visible;
}
