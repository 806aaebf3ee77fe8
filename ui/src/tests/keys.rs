use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::{archive, ch, ctrl, key, live};
use crate::keys::{KEYS, Pane, binding_for, parse_key};
use crate::model::{Command, LogSource, Mode, Msg};
use crate::update;

fn web() -> String {
    "web".to_owned()
}

#[test]
fn tab_and_shift_tab_cycle_the_focus_starting_on_builds() {
    let mut m = live();
    assert_eq!(m.focus, Pane::Builds);
    update(&mut m, key(KeyCode::Tab));
    assert_eq!(m.focus, Pane::Log);
    update(&mut m, key(KeyCode::Tab));
    assert_eq!(m.focus, Pane::Services);
    update(&mut m, key(KeyCode::Tab));
    assert_eq!(m.focus, Pane::Builds);
    update(
        &mut m,
        Msg::Key(KeyEvent::new(KeyCode::BackTab, KeyModifiers::SHIFT)),
    );
    assert_eq!(m.focus, Pane::Services);
}

#[test]
fn up_down_j_k_move_the_build_selection_off_the_live_build() {
    let mut m = live();
    let selected = |m: &crate::Model| m.services[0].selected_build;
    assert_eq!(selected(&m), 0, "the live build is selected at start");
    update(&mut m, ch('j'));
    assert_eq!(selected(&m), 1);
    assert!(!m.services[0].follow_run);
    update(&mut m, key(KeyCode::Down));
    update(&mut m, key(KeyCode::Down));
    assert_eq!(selected(&m), 2, "stops at the last build");
    update(&mut m, ch('k'));
    assert_eq!(selected(&m), 1);
    update(&mut m, key(KeyCode::Up));
    update(&mut m, key(KeyCode::Up));
    assert_eq!(selected(&m), 0);
}

#[test]
fn up_down_in_the_services_pane_select_a_service() {
    let mut m = live();
    m.focus = Pane::Services;
    update(&mut m, ch('j'));
    assert_eq!(m.selected, 1);
    update(&mut m, ch('j'));
    assert_eq!(m.selected, 1);
    update(&mut m, ch('k'));
    assert_eq!(m.selected, 0);
}

#[test]
fn up_down_in_the_log_pane_scroll_and_the_end_follows_again() {
    let mut m = live();
    update(&mut m, ch('l'));
    m.focus = Pane::Log;
    let rows = m.rows(Pane::Log);
    let view = |m: &crate::Model| m.services[0].runtime_view;
    update(&mut m, ch('k'));
    assert!(!view(&m).follow);
    assert_eq!(view(&m).top, 101 - rows - 1);
    update(&mut m, key(KeyCode::Down));
    assert!(view(&m).follow);
}

#[test]
fn page_home_and_end_in_the_log() {
    let mut m = live();
    update(&mut m, ch('l'));
    m.focus = Pane::Log;
    let rows = m.rows(Pane::Log);
    let view = |m: &crate::Model| m.services[0].runtime_view;
    update(&mut m, key(KeyCode::PageUp));
    assert_eq!(view(&m).top, 101 - rows - (rows - 1));
    update(&mut m, key(KeyCode::PageDown));
    assert!(view(&m).follow);
    update(&mut m, key(KeyCode::Home));
    assert_eq!((view(&m).top, view(&m).follow), (0, false));
    update(&mut m, key(KeyCode::End));
    assert!(view(&m).follow);
}

#[test]
fn page_home_and_end_in_the_lists() {
    let mut m = live();
    update(&mut m, key(KeyCode::End));
    assert_eq!(m.services[0].selected_build, 2);
    update(&mut m, key(KeyCode::Home));
    assert_eq!(m.services[0].selected_build, 0);
    update(&mut m, key(KeyCode::PageDown));
    assert_eq!(
        m.services[0].selected_build, 2,
        "a page down reaches the last build"
    );
    update(&mut m, key(KeyCode::PageUp));
    assert_eq!(m.services[0].selected_build, 0);
}

#[test]
fn enter_on_a_build_asks_for_its_log_and_shows_it() {
    let mut m = live();
    update(&mut m, ch('l'));
    update(&mut m, ch('j'));
    let commands = update(&mut m, key(KeyCode::Enter));
    assert_eq!(
        commands,
        vec![Command::LoadLog {
            service: web(),
            archive: archive(2)
        }]
    );
    let svc = &m.services[0];
    assert_eq!(svc.source, LogSource::Build, "Enter shows the build log");
    assert!(svc.log().is_none(), "loading");
    let stale = Msg::BuildLog {
        service: web(),
        archive: archive(1),
        lines: vec!["x".into()],
    };
    update(&mut m, stale);
    assert!(
        m.services[0].log().is_none(),
        "an answer for another build is ignored"
    );
    let answer = Msg::BuildLog {
        service: web(),
        archive: archive(2),
        lines: vec!["compiled".into()],
    };
    update(&mut m, answer);
    let log = m.services[0]
        .log()
        .map(|l| l.get(0).map(|l| l.text.clone()));
    assert_eq!(log, Some(Some("compiled".to_owned())));
}

#[test]
fn enter_outside_the_builds_pane_does_nothing() {
    let mut m = live();
    m.focus = Pane::Log;
    m.drawn();
    assert!(update(&mut m, key(KeyCode::Enter)).is_empty());
    assert!(!m.needs_redraw());
}

#[test]
fn r_asks_and_y_rolls_back_to_the_selected_build() {
    let mut m = live();
    update(&mut m, ch('j'));
    assert!(
        update(&mut m, ch('r')).is_empty(),
        "nothing happens before the answer"
    );
    assert!(matches!(m.mode, Mode::Confirm { .. }));
    assert!(
        update(&mut m, ch('x')).is_empty(),
        "other keys wait for an answer"
    );
    let commands = update(&mut m, ch('y'));
    assert_eq!(
        commands,
        vec![Command::Rollback {
            service: web(),
            archive: archive(2)
        }]
    );
    assert_eq!(m.mode, Mode::Normal);
    assert!(m.services[0].follow_run, "the selection follows .run again");
}

#[test]
fn n_or_esc_cancel_the_rollback() {
    for answer in [ch('n'), key(KeyCode::Esc)] {
        let mut m = live();
        update(&mut m, ch('j'));
        update(&mut m, ch('r'));
        assert!(update(&mut m, answer).is_empty());
        assert_eq!(m.mode, Mode::Normal);
    }
}

#[test]
fn r_on_the_build_run_points_to_only_says_so() {
    let mut m = live();
    assert!(update(&mut m, ch('r')).is_empty());
    assert_eq!(m.mode, Mode::Normal);
    assert!(
        m.message
            .as_ref()
            .is_some_and(|(_, t)| t.contains("already runs"))
    );
}

#[test]
fn b_rebuilds_and_shift_r_restarts() {
    let mut m = live();
    assert_eq!(
        update(&mut m, ch('b')),
        vec![Command::Rebuild { service: web() }]
    );
    assert_eq!(
        update(&mut m, ch('R')),
        vec![Command::Restart { service: web() }]
    );
    let no_shift = Msg::Key(KeyEvent::new(KeyCode::Char('R'), KeyModifiers::NONE));
    assert_eq!(
        update(&mut m, no_shift),
        vec![Command::Restart { service: web() }]
    );
    let shift_r = Msg::Key(KeyEvent::new(KeyCode::Char('r'), KeyModifiers::SHIFT));
    assert_eq!(
        update(&mut m, shift_r),
        vec![Command::Restart { service: web() }]
    );
}

#[test]
fn l_switches_between_build_and_runtime_log() {
    let mut m = live();
    assert_eq!(m.services[0].source, LogSource::Build);
    update(&mut m, ch('l'));
    assert_eq!(m.services[0].source, LogSource::Runtime);
    update(&mut m, ch('l'));
    assert_eq!(m.services[0].source, LogSource::Build);
}

fn search(m: &mut crate::Model, text: &str) {
    update(m, ch('/'));
    for c in text.chars() {
        update(m, ch(c));
    }
    update(m, key(KeyCode::Enter));
}

#[test]
fn slash_searches_from_the_bottom_and_n_shift_n_move_between_matches() {
    let mut m = live();
    update(&mut m, ch('l'));
    update(&mut m, ch('/'));
    assert!(matches!(m.mode, Mode::Search { .. }));
    for c in "request 4x".chars() {
        update(&mut m, ch(c));
    }
    update(&mut m, key(KeyCode::Backspace));
    assert_eq!(
        m.mode,
        Mode::Search {
            draft: "request 4".to_owned()
        }
    );
    update(&mut m, key(KeyCode::Enter));
    assert_eq!(m.focus, Pane::Log);
    // Line 0 is the "live" note; "request i" is line i + 1.
    let current = |m: &crate::Model| m.search.as_ref().and_then(|s| s.current);
    assert_eq!(current(&m), Some(50), "the newest match: request 49");
    assert!(
        !m.services[0].runtime_view.follow,
        "a match stops the following"
    );
    update(&mut m, ch('n'));
    assert_eq!(current(&m), Some(5), "wraps to request 4");
    update(&mut m, ch('n'));
    assert_eq!(current(&m), Some(41));
    update(&mut m, ch('N'));
    update(&mut m, ch('N'));
    assert_eq!(current(&m), Some(50));
}

#[test]
fn search_without_a_match_says_so_and_esc_cancels_typing() {
    let mut m = live();
    update(&mut m, ch('l'));
    search(&mut m, "nowhere");
    assert!(
        m.message
            .as_ref()
            .is_some_and(|(_, t)| t == "no match for nowhere")
    );
    update(&mut m, ch('/'));
    update(&mut m, ch('z'));
    update(&mut m, ctrl('u'));
    update(&mut m, ch('q'));
    assert_eq!(
        m.mode,
        Mode::Search {
            draft: "q".to_owned()
        },
        "q is typed, not quit"
    );
    update(&mut m, key(KeyCode::Esc));
    assert_eq!(m.mode, Mode::Normal);
    assert_eq!(m.search.as_ref().map(|s| s.query.as_str()), Some("nowhere"));
}

#[test]
fn n_without_a_search_explains() {
    let mut m = live();
    m.focus = Pane::Log;
    update(&mut m, ch('n'));
    assert!(
        m.message
            .as_ref()
            .is_some_and(|(_, t)| t.contains("press /"))
    );
    update(&mut m, ch('N'));
    assert!(m.message.is_some());
}

#[test]
fn f_stops_and_resumes_following() {
    let mut m = live();
    update(&mut m, ch('l'));
    m.focus = Pane::Log;
    update(&mut m, ch('f'));
    let view = m.services[0].runtime_view;
    assert!(!view.follow);
    super::ev(&mut m, crate::EngineEvent::RunOutput { line: "new".into() });
    assert_eq!(m.services[0].runtime_view, view, "a frozen view stays put");
    update(&mut m, ch('f'));
    assert!(m.services[0].runtime_view.follow);
}

#[test]
fn esc_closes_the_opened_log_then_clears_the_search() {
    let mut m = live();
    search(&mut m, "step");
    m.focus = Pane::Builds;
    update(&mut m, key(KeyCode::Enter));
    assert!(m.services[0].opened.is_some());
    update(&mut m, key(KeyCode::Esc));
    assert!(m.services[0].opened.is_none());
    assert!(m.search.is_some());
    update(&mut m, key(KeyCode::Esc));
    assert!(m.search.is_none());
}

#[test]
fn question_mark_opens_the_help_and_esc_q_or_question_mark_close_it() {
    for close in [key(KeyCode::Esc), ch('q'), ch('?')] {
        let mut m = live();
        update(&mut m, ch('?'));
        assert_eq!(m.mode, Mode::Help);
        assert!(
            update(&mut m, ch('b')).is_empty(),
            "keys do not act behind the help"
        );
        assert!(update(&mut m, close).is_empty());
        assert_eq!(m.mode, Mode::Normal);
    }
}

#[test]
fn q_and_ctrl_c_quit_from_anywhere() {
    let mut m = live();
    assert_eq!(update(&mut m, ch('q')), vec![Command::Quit]);
    assert!(m.is_quitting());
    for setup in [None, Some(ch('?')), Some(ch('/')), Some(ch('r'))] {
        let mut m = live();
        update(&mut m, ch('j'));
        if let Some(setup) = setup {
            update(&mut m, setup);
        }
        assert_eq!(update(&mut m, ctrl('c')), vec![Command::Quit]);
    }
}

#[test]
fn releases_and_unknown_keys_change_nothing() {
    let mut m = live();
    m.drawn();
    let release = KeyEvent::new_with_kind(
        KeyCode::Char('q'),
        KeyModifiers::NONE,
        KeyEventKind::Release,
    );
    assert!(update(&mut m, Msg::Key(release)).is_empty());
    assert!(update(&mut m, ch('z')).is_empty());
    assert!(
        update(
            &mut m,
            Msg::Key(KeyEvent::new(KeyCode::Char('q'), KeyModifiers::ALT))
        )
        .is_empty()
    );
    assert!(!m.needs_redraw());
}

#[test]
fn a_message_lasts_until_the_next_key() {
    let mut m = live();
    update(&mut m, ch('b'));
    assert!(m.message.is_some());
    m.drawn();
    update(&mut m, ch('z'));
    assert!(m.message.is_none());
    assert!(m.needs_redraw());
}

#[test]
fn every_key_of_the_table_is_handled() {
    for binding in KEYS {
        for name in binding.keys.split(' ') {
            let (code, mods) = parse_key(name).unwrap_or_else(|| panic!("unknown key name {name}"));
            let event = KeyEvent::new(code, mods);
            let focus = binding.pane.unwrap_or(Pane::Builds);
            assert_eq!(
                binding_for(&event, focus).map(|b| b.action),
                Some(binding.action),
                "{name}"
            );
            let mut m = live();
            m.focus = focus;
            m.drawn();
            update(&mut m, Msg::Key(event));
            assert!(m.needs_redraw(), "{name} changed nothing");
        }
    }
}

#[test]
fn no_key_means_two_things_in_one_pane() {
    for pane in [Pane::Services, Pane::Builds, Pane::Log] {
        let keys: Vec<_> = KEYS
            .iter()
            .filter(|b| b.pane.is_none_or(|p| p == pane))
            .flat_map(|b| b.keys.split(' ').filter_map(parse_key))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            assert!(
                !keys[i + 1..].contains(k),
                "{k:?} is bound twice in the {pane:?} pane"
            );
        }
    }
}
