use super::{IDS, NOW, archive, ch, ev, live, row, rows};
use crate::log::MAX_LOG_LINES;
use crate::model::{EngineEvent, LogSource, Model, Msg, ServiceState};
use crate::update;

fn id(n: usize) -> String {
    IDS[n].to_owned()
}

fn last_line(log: &crate::log::LogBuffer) -> String {
    log.end()
        .checked_sub(1)
        .and_then(|n| log.get(n))
        .map(|l| l.text.clone())
        .unwrap_or_default()
}

#[test]
fn watching_marks_an_idle_service() {
    let mut m = Model::new(vec!["web".into()], true);
    ev(&mut m, EngineEvent::Watching);
    assert!(m.services[0].watching);
    assert_eq!(m.services[0].state, ServiceState::Idle);
}

#[test]
fn build_started_clears_the_build_output_and_shows_it() {
    let mut m = live();
    m.drawn();
    ev(&mut m, EngineEvent::BuildStarted { id: id(2) });
    let svc = &m.services[0];
    assert_eq!(svc.state, ServiceState::Building);
    assert_eq!(svc.building.as_deref(), Some(IDS[2]));
    assert_eq!(
        svc.build_log.end() - svc.build_log.first(),
        1,
        "only the 'started' note"
    );
    assert!(m.needs_redraw());
}

#[test]
fn build_started_replaces_an_opened_log_unless_scrolled() {
    let mut m = live();
    update(
        &mut m,
        crate::tests::key(ratatui::crossterm::event::KeyCode::Enter),
    );
    ev(&mut m, EngineEvent::BuildStarted { id: id(2) });
    assert!(m.services[0].opened.is_none());

    let mut m = live();
    update(
        &mut m,
        crate::tests::key(ratatui::crossterm::event::KeyCode::Enter),
    );
    m.services[0].build_view.follow = false;
    ev(&mut m, EngineEvent::BuildStarted { id: id(2) });
    assert!(m.services[0].opened.is_some(), "the user is reading it");
}

#[test]
fn build_output_is_appended_and_redraws_only_when_shown() {
    let mut m = live();
    m.drawn();
    ev(
        &mut m,
        EngineEvent::BuildOutput {
            line: "\x1b[32mcompiling\x1b[0m".into(),
        },
    );
    assert_eq!(last_line(&m.services[0].build_log), "compiling");
    assert!(m.needs_redraw());
    update(&mut m, ch('l'));
    m.drawn();
    ev(
        &mut m,
        EngineEvent::BuildOutput {
            line: "more".into(),
        },
    );
    assert!(!m.needs_redraw(), "the runtime log is shown");
}

#[test]
fn build_finished_ok_starts_and_failed_shows_the_error() {
    let mut m = live();
    ev(&mut m, EngineEvent::BuildStarted { id: id(2) });
    let ok = EngineEvent::BuildFinished {
        id: id(2),
        ok: true,
        duration_ms: 1500,
        archive: Some(archive(2)),
        error: None,
    };
    ev(&mut m, ok);
    assert_eq!(m.services[0].state, ServiceState::Starting);
    assert!(m.services[0].building.is_none());
    assert!(last_line(&m.services[0].build_log).contains("done in 1.5s"));

    ev(&mut m, EngineEvent::BuildStarted { id: id(1) });
    let error = Some("step `make` exited with 2".to_owned());
    let failed = EngineEvent::BuildFinished {
        id: id(1),
        ok: false,
        duration_ms: 300,
        archive: None,
        error,
    };
    ev(&mut m, failed);
    let svc = &m.services[0];
    assert_eq!(svc.state, ServiceState::Failed);
    assert_eq!(svc.problem.as_deref(), Some("step `make` exited with 2"));
    assert!(svc.instance.is_some(), "the old instance still serves");
}

#[test]
fn cancelled_goes_back_to_live_or_idle() {
    let mut m = live();
    ev(&mut m, EngineEvent::BuildStarted { id: id(2) });
    ev(&mut m, EngineEvent::Cancelled { id: id(2) });
    assert_eq!(m.services[0].state, ServiceState::Live);
    let mut m = Model::new(vec!["web".into()], true);
    ev(&mut m, EngineEvent::BuildStarted { id: id(2) });
    ev(&mut m, EngineEvent::Cancelled { id: id(2) });
    assert_eq!(m.services[0].state, ServiceState::Idle);
    assert!(last_line(&m.services[0].build_log).contains("cancelled"));
}

#[test]
fn live_records_the_instance() {
    let m = live();
    let svc = &m.services[0];
    assert_eq!(svc.state, ServiceState::Live);
    let instance = svc
        .instance
        .as_ref()
        .map(|i| (i.id.as_str(), i.port, i.since));
    assert_eq!(instance, Some((IDS[3], Some(8080), Some(NOW - 3600))));
    assert_eq!(m.service_state("web"), Some(ServiceState::Live));
}

#[test]
fn unhealthy_keeps_the_old_instance_and_says_why() {
    let mut m = live();
    let reason = "no answer on GET /healthz within 30s".to_owned();
    ev(
        &mut m,
        EngineEvent::Unhealthy {
            id: id(2),
            archive: archive(2),
            reason: reason.clone(),
        },
    );
    let svc = &m.services[0];
    assert_eq!(svc.state, ServiceState::Unhealthy);
    assert_eq!(svc.problem.as_ref(), Some(&reason));
    assert_eq!(svc.instance.as_ref().map(|i| i.id.as_str()), Some(IDS[3]));
    assert!(last_line(&svc.runtime).contains("unhealthy"));
}

#[test]
fn crashed_and_restarting() {
    let mut m = live();
    ev(
        &mut m,
        EngineEvent::Crashed {
            id: id(3),
            reason: "exit status 1".into(),
        },
    );
    let svc = &m.services[0];
    assert_eq!(svc.state, ServiceState::Crashed);
    assert_eq!(
        svc.instance.as_ref().map(|i| i.port),
        Some(None),
        "no port once crashed"
    );
    ev(&mut m, EngineEvent::Restarting { id: id(3) });
    assert_eq!(m.services[0].state, ServiceState::Restarting);
    ev(
        &mut m,
        EngineEvent::Live {
            id: id(3),
            archive: archive(3),
            port: 8081,
            since: NOW,
        },
    );
    assert_eq!(m.services[0].state, ServiceState::Live);
    assert!(m.services[0].problem.is_none());
}

#[test]
fn stopped_forgets_only_the_serving_instance() {
    let mut m = live();
    ev(
        &mut m,
        EngineEvent::Stopped {
            id: id(3),
            archive: archive(3),
            port: 9999,
        },
    );
    assert_eq!(
        m.services[0].state,
        ServiceState::Live,
        "an old instance of the same build"
    );
    ev(
        &mut m,
        EngineEvent::Stopped {
            id: id(3),
            archive: archive(3),
            port: 8080,
        },
    );
    assert_eq!(m.services[0].state, ServiceState::Idle);
    assert!(m.services[0].instance.is_none());
}

#[test]
fn run_output_goes_to_the_bounded_runtime_log() {
    let mut m = live();
    for i in 0..MAX_LOG_LINES + 50 {
        ev(
            &mut m,
            EngineEvent::RunOutput {
                line: format!("line {i}"),
            },
        );
    }
    let runtime = &m.services[0].runtime;
    assert_eq!(runtime.end() - runtime.first(), MAX_LOG_LINES);
    assert_eq!(last_line(runtime), format!("line {}", MAX_LOG_LINES + 49));
    for i in 0..MAX_LOG_LINES + 1 {
        ev(
            &mut m,
            EngineEvent::BuildOutput {
                line: format!("b {i}"),
            },
        );
    }
    let build = &m.services[0].build_log;
    assert_eq!(build.end() - build.first(), MAX_LOG_LINES);
}

#[test]
fn rollback_and_warning_tell_the_user() {
    let mut m = live();
    ev(&mut m, EngineEvent::Rollback { to: archive(2) });
    assert!(last_line(&m.services[0].runtime).contains(&archive(2)));
    assert!(
        m.message
            .as_ref()
            .is_some_and(|(_, t)| t.contains("rolled back"))
    );
    ev(
        &mut m,
        EngineEvent::Warning {
            message: "builds keep triggering themselves".into(),
        },
    );
    assert_eq!(
        m.message.as_ref().map(|(_, t)| t.as_str()),
        Some("web: builds keep triggering themselves")
    );
}

#[test]
fn events_for_an_unknown_service_add_it() {
    let mut m = live();
    update(
        &mut m,
        Msg::Engine {
            service: "worker".into(),
            event: EngineEvent::Watching,
        },
    );
    assert_eq!(m.services.len(), 3);
    assert_eq!(m.services[2].name, "worker");
}

#[test]
fn the_selection_follows_the_live_build_until_the_user_moves_it() {
    let mut m = live();
    assert_eq!(m.services[0].selected_build, 0);
    // A rollback: .run now points to build 2.
    let after = vec![
        row(3, false, false),
        row(2, true, true),
        row(1, false, false),
    ];
    update(
        &mut m,
        Msg::Builds {
            service: "web".into(),
            builds: after,
        },
    );
    assert_eq!(m.services[0].selected_build, 1);
    update(&mut m, ch('j'));
    // A new build arrives on top; the user's choice (build 1) stays selected.
    let mut newer = vec![row(3, true, true)];
    newer.extend(rows());
    newer[0].name = ".build-newest".into();
    update(
        &mut m,
        Msg::Builds {
            service: "web".into(),
            builds: newer,
        },
    );
    assert_eq!(m.services[0].selected_build, 3);
    update(
        &mut m,
        Msg::Builds {
            service: "web".into(),
            builds: Vec::new(),
        },
    );
    assert_eq!(m.services[0].selected_build, 0);
}

#[test]
fn now_redraws_only_when_the_minute_changes() {
    let mut m = live();
    m.drawn();
    update(&mut m, Msg::Now(NOW + 1));
    assert_eq!(m.now, NOW + 1);
    let minute = NOW / 60 * 60;
    update(&mut m, Msg::Now(minute + 59));
    assert!(!m.needs_redraw());
    update(&mut m, Msg::Now(minute + 60));
    assert!(m.needs_redraw());
}

#[test]
fn resize_redraws_and_changes_the_page() {
    let mut m = live();
    m.drawn();
    let page = m.rows(crate::Pane::Log);
    update(
        &mut m,
        Msg::Resize {
            width: 100,
            height: 40,
        },
    );
    assert!(m.needs_redraw());
    assert_eq!(m.rows(crate::Pane::Log), page + 16);
    m.drawn();
    assert!(!m.needs_redraw());
}

#[test]
fn a_build_log_for_a_build_not_opened_is_dropped() {
    let mut m = live();
    m.drawn();
    update(
        &mut m,
        Msg::BuildLog {
            service: "web".into(),
            archive: archive(1),
            lines: vec!["x".into()],
        },
    );
    assert!(!m.needs_redraw());
    assert_eq!(m.services[0].source, LogSource::Build);
}

#[test]
fn an_unhealthy_builds_last_lines_are_shown_one_a_line() {
    let mut m = live();
    ev(
        &mut m,
        EngineEvent::Unhealthy {
            id: id(2),
            archive: archive(2),
            reason: "exited with exit status 1 before it was ready; its last lines:\n    /app/server.js:5\n    SyntaxError: Unexpected token ';'".to_owned(),
        },
    );
    let svc = &m.services[0];
    assert_eq!(
        svc.problem.as_deref(),
        Some("exited with exit status 1 before it was ready")
    );
    assert_eq!(
        last_line(&svc.build_log),
        "SyntaxError: Unexpected token ';'"
    );
    assert_eq!(last_line(&svc.runtime), "SyntaxError: Unexpected token ';'");
}
