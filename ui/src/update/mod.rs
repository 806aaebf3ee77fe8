//! `update`: the only place the model changes. Keys go through the key table; engine news
//! goes to the service it names.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

mod engine;

use crate::format::short_id;
use crate::keys::{Action, Pane, binding_for, normalize};
use crate::log::{LogBuffer, LogView, Query};
use crate::model::{Command, LogSource, Mode, Model, Msg, OpenedLog, Search, Severity};

/// The longest search query kept.
const MAX_QUERY: usize = 200;

/// Applies `msg` to `model` and returns what the engine should do.
pub fn update(model: &mut Model, msg: Msg) -> Vec<Command> {
    match msg {
        Msg::Key(key) => on_key(model, key),
        Msg::Resize { width, height } => {
            model.width = width;
            model.height = height;
            model.dirty = true;
            Vec::new()
        }
        Msg::Now(now) => {
            // Ages and uptimes show minutes: a redraw is needed only when the minute changes.
            if now / 60 != model.now / 60 {
                model.dirty = true;
            }
            model.now = now;
            Vec::new()
        }
        Msg::Engine { service, event } => {
            engine::on_engine(model, &service, event);
            Vec::new()
        }
        Msg::Builds { service, builds } => {
            engine::on_builds(model, &service, builds);
            Vec::new()
        }
        Msg::BuildLog {
            service,
            archive,
            lines,
        } => {
            let i = model.service_index(&service);
            if let Some(opened) = model.services[i]
                .opened
                .as_mut()
                .filter(|o| o.archive == archive)
            {
                opened.log = Some(LogBuffer::from_lines(&lines));
                model.dirty = true;
            }
            Vec::new()
        }
        Msg::Dropped { lines } => {
            model.message = Some((
                Severity::Warning,
                format!("{lines} lines of output were dropped (printed too fast to show)"),
            ));
            model.dirty = true;
            Vec::new()
        }
    }
}

fn on_key(model: &mut Model, key: KeyEvent) -> Vec<Command> {
    if key.kind == KeyEventKind::Release {
        return Vec::new();
    }
    if model.message.take().is_some() {
        model.dirty = true;
    }
    let (code, mods) = normalize(&key);
    let ctrl_c = code == KeyCode::Char('c') && mods == KeyModifiers::CONTROL;
    match &mut model.mode {
        Mode::Normal => match binding_for(&key, model.focus) {
            Some(binding) => {
                model.dirty = true;
                run(model, binding.action)
            }
            None => Vec::new(),
        },
        _ if ctrl_c => run(model, Action::Quit),
        Mode::Help => {
            if matches!(
                code,
                KeyCode::Esc | KeyCode::Enter | KeyCode::Char('?' | 'q')
            ) {
                model.mode = Mode::Normal;
                model.dirty = true;
            }
            Vec::new()
        }
        Mode::Confirm {
            service,
            archive,
            id,
        } => match code {
            KeyCode::Char('y' | 'Y') => {
                let (service, archive) = (service.clone(), archive.clone());
                let text = format!("rolling {service} back to {} ({archive})", short_id(id));
                model.mode = Mode::Normal;
                model.message = Some((Severity::Info, text));
                model.dirty = true;
                let i = model.service_index(&service);
                model.services[i].follow_run = true;
                vec![Command::Rollback { service, archive }]
            }
            KeyCode::Char('n' | 'N') | KeyCode::Esc => {
                model.mode = Mode::Normal;
                model.dirty = true;
                Vec::new()
            }
            _ => Vec::new(),
        },
        Mode::Search { draft } => {
            match code {
                KeyCode::Char('u') if mods == KeyModifiers::CONTROL => draft.clear(),
                KeyCode::Char(c) if mods.is_empty() && draft.chars().count() < MAX_QUERY => {
                    draft.push(c)
                }
                KeyCode::Backspace => {
                    draft.pop();
                }
                KeyCode::Esc => model.mode = Mode::Normal,
                KeyCode::Enter => {
                    let query = std::mem::take(draft);
                    model.mode = Mode::Normal;
                    accept_search(model, &query);
                }
                _ => return Vec::new(),
            }
            model.dirty = true;
            Vec::new()
        }
    }
}

/// Runs one action of the key table in `Mode::Normal`.
fn run(model: &mut Model, action: Action) -> Vec<Command> {
    let name = model.service().map(|s| s.name.clone());
    match action {
        Action::FocusNext => model.focus = model.focus.next(),
        Action::FocusPrev => model.focus = model.focus.prev(),
        Action::Up => move_by(model, -1),
        Action::Down => move_by(model, 1),
        Action::PageUp => move_by(model, -page(model)),
        Action::PageDown => move_by(model, page(model)),
        Action::Home => move_by(model, isize::MIN),
        Action::End => move_by(model, isize::MAX),
        Action::OpenLog => return open_log(model),
        Action::Rollback => ask_rollback(model),
        Action::Rebuild | Action::Restart => {
            let Some(service) = name else {
                return Vec::new();
            };
            let (verb, command) = if action == Action::Rebuild {
                (
                    "rebuilding",
                    Command::Rebuild {
                        service: service.clone(),
                    },
                )
            } else {
                (
                    "restarting",
                    Command::Restart {
                        service: service.clone(),
                    },
                )
            };
            model.message = Some((Severity::Info, format!("{verb} {service}")));
            return vec![command];
        }
        Action::ToggleLog => {
            if let Some(svc) = model.service_mut() {
                svc.source = match svc.source {
                    LogSource::Build => LogSource::Runtime,
                    LogSource::Runtime => LogSource::Build,
                };
            }
            forget_match(model);
        }
        Action::Search => {
            model.mode = Mode::Search {
                draft: String::new(),
            }
        }
        Action::NextMatch => next_match(model, true),
        Action::PrevMatch => next_match(model, false),
        Action::Follow => {
            let rows = model.rows(Pane::Log);
            if let Some((Some(log), view)) = model.service_mut().map(|s| s.log_and_view()) {
                view.toggle_follow(log, rows);
            }
        }
        Action::Back => {
            let svc = model.service_mut();
            if let Some(svc) = svc.filter(|s| s.opened.is_some()) {
                svc.opened = None;
                svc.build_view = LogView::default();
                forget_match(model);
            } else {
                model.search = None;
            }
        }
        Action::Help => model.mode = Mode::Help,
        Action::Quit => {
            model.quitting = true;
            return vec![Command::Quit];
        }
    }
    Vec::new()
}

fn page(model: &Model) -> isize {
    let rows = model.rows(model.focus);
    // A log page keeps one line of the last page in sight.
    let rows = if model.focus == Pane::Log {
        rows.saturating_sub(1).max(1)
    } else {
        rows
    };
    isize::try_from(rows).unwrap_or(1)
}

/// Moves the selection of the focused list, or scrolls the log, by `delta` rows.
fn move_by(model: &mut Model, delta: isize) {
    match model.focus {
        Pane::Services => {
            let before = model.selected;
            model.selected = step(model.selected, delta, model.services.len());
            if model.selected != before {
                forget_match(model);
            }
        }
        Pane::Builds => {
            if let Some(svc) = model.service_mut() {
                svc.selected_build = step(svc.selected_build, delta, svc.builds.len());
                svc.follow_run = false;
            }
        }
        Pane::Log => {
            let rows = model.rows(Pane::Log);
            if let Some((Some(log), view)) = model.service_mut().map(|s| s.log_and_view()) {
                match delta {
                    isize::MIN => view.goto(log, rows, 0),
                    isize::MAX => view.follow = true,
                    _ => view.scroll(log, rows, delta),
                }
            }
        }
    }
}

fn step(index: usize, delta: isize, len: usize) -> usize {
    index
        .saturating_add_signed(delta)
        .min(len.saturating_sub(1))
}

fn open_log(model: &mut Model) -> Vec<Command> {
    let Some(svc) = model.service_mut() else {
        return Vec::new();
    };
    let Some(build) = svc.selected_build() else {
        model.message = Some((Severity::Info, "no archived build to open".to_owned()));
        return Vec::new();
    };
    let (archive, id) = (build.name.clone(), build.id.clone());
    let service = svc.name.clone();
    svc.source = LogSource::Build;
    svc.build_view = LogView::default();
    svc.opened = Some(OpenedLog {
        archive: archive.clone(),
        id,
        log: None,
    });
    forget_match(model);
    vec![Command::LoadLog { service, archive }]
}

fn ask_rollback(model: &mut Model) {
    let Some(svc) = model.service() else { return };
    let Some(build) = svc.selected_build() else {
        model.message = Some((
            Severity::Info,
            "no archived build to roll back to".to_owned(),
        ));
        return;
    };
    if build.run {
        let text = format!("{} already runs {}", svc.name, short_id(&build.id));
        model.message = Some((Severity::Info, text));
        return;
    }
    model.mode = Mode::Confirm {
        service: svc.name.clone(),
        archive: build.name.clone(),
        id: build.id.clone(),
    };
}

/// Enter in the search prompt: jump to the last match at or above the bottom of the pane, so a
/// followed log shows its newest match; `n` then goes down and `N` up.
fn accept_search(model: &mut Model, text: &str) {
    if text.is_empty() {
        model.search = None;
        return;
    }
    let query = Query::new(text);
    model.focus = Pane::Log;
    let rows = model.rows(Pane::Log);
    let found = model.service_mut().and_then(|s| match s.log_and_view() {
        (Some(log), view) => {
            let bottom = view.top(log, rows) + rows;
            let found = log.find(&query, Some(bottom).filter(|&b| b < log.end()), false)?;
            view.reveal(log, rows, found);
            Some(found)
        }
        _ => None,
    });
    if found.is_none() {
        model.message = Some((Severity::Warning, format!("no match for {text}")));
    }
    model.search = Some(Search {
        query,
        current: found,
    });
}

fn next_match(model: &mut Model, forward: bool) {
    let rows = model.rows(Pane::Log);
    let Some(search) = model.search.as_mut() else {
        model.message = Some((Severity::Info, "press / to search the log".to_owned()));
        return;
    };
    let found = model
        .services
        .get_mut(model.selected)
        .and_then(|s| match s.log_and_view() {
            (Some(log), view) => {
                // Without a current match, start from the pane: its top line down, or its bottom up.
                let top = view.top(log, rows);
                let from = match search.current {
                    Some(current) => Some(current),
                    None if forward => top.checked_sub(1).filter(|&n| n >= log.first()),
                    None => Some(top + rows).filter(|&n| n < log.end()),
                };
                let found = log.find(&search.query, from, forward)?;
                view.reveal(log, rows, found);
                Some(found)
            }
            _ => None,
        });
    match found {
        Some(line) => search.current = Some(line),
        None => {
            let text = format!("no match for {}", search.query.as_str());
            model.message = Some((Severity::Warning, text));
        }
    }
}

/// The shown log changed: the current match belonged to the old one.
fn forget_match(model: &mut Model) {
    if let Some(search) = model.search.as_mut() {
        search.current = None;
    }
}
