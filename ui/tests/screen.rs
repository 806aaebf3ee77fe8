//! The whole screen, drawn into ratatui's `TestBackend` and compared with insta snapshots.
//! Ids, times and ports are fixed data (the model reads no clock), so no filter is needed.

use pmesh_dev_ui::{BuildRow, Command, EngineEvent, KEYS, Model, Msg, update};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;

const NOW: u64 = 1_790_000_000;
const IDS: [&str; 4] = [
    "0000000000000000000000000000000",
    "1a2b3c4d5e6f708192a3b4c5d6e7f801",
    "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "c0ffee15900dd00d5eedf00dcafe4242",
];

fn send(m: &mut Model, service: &str, event: EngineEvent) -> Vec<Command> {
    update(
        m,
        Msg::Engine {
            service: service.to_owned(),
            event,
        },
    )
}

fn key(m: &mut Model, code: KeyCode) {
    update(m, Msg::Key(KeyEvent::new(code, KeyModifiers::NONE)));
}

fn keys(m: &mut Model, chars: &str) {
    for c in chars.chars() {
        let mods = if c.is_ascii_uppercase() {
            KeyModifiers::SHIFT
        } else {
            KeyModifiers::NONE
        };
        update(m, Msg::Key(KeyEvent::new(KeyCode::Char(c), mods)));
    }
}

fn archive(n: usize) -> String {
    format!(".build-20261125T1{n}0000")
}

fn build(n: usize, status: &str, run: bool, serving: bool) -> BuildRow {
    BuildRow {
        name: archive(n),
        id: IDS[n].to_owned(),
        status: status.to_owned(),
        created: NOW - 60 * 17 * (4 - n as u64),
        duration_ms: Some(2300 * n as u64 + 150),
        run,
        serving,
    }
}

fn builds(m: &mut Model, rows: Vec<BuildRow>) {
    update(
        m,
        Msg::Builds {
            service: "web".to_owned(),
            builds: rows,
        },
    );
}

/// The steps of a small build, with the colours a compiler prints.
fn build_output(m: &mut Model, n: usize) {
    let lines = [
        "$ npm run build".to_owned(),
        "\x1b[2m> web@1.0.0 build\x1b[22m".to_owned(),
        format!("\x1b[1;32m   Compiling\x1b[0m web v1.0.{n}"),
        "\x1b[33mwarning\x1b[0m: unused variable `x` in src/server.js:14".to_owned(),
        "bundle: \x1b[36m3 files\x1b[0m, 48.2 kB".to_owned(),
    ];
    for line in lines {
        send(m, "web", EngineEvent::BuildOutput { line });
    }
}

fn finish(m: &mut Model, n: usize) {
    let event = EngineEvent::BuildFinished {
        id: IDS[n].to_owned(),
        ok: true,
        duration_ms: 2300 * n as u64 + 150,
        archive: Some(archive(n)),
        error: None,
    };
    send(m, "web", event);
}

fn start(color: bool) -> Model {
    let mut m = Model::new(vec!["web".to_owned(), "api".to_owned()], color);
    update(
        &mut m,
        Msg::Resize {
            width: 80,
            height: 24,
        },
    );
    update(&mut m, Msg::Now(NOW));
    send(&mut m, "web", EngineEvent::Watching);
    send(
        &mut m,
        "web",
        EngineEvent::Url {
            url: "http://127.0.0.1:8081".to_owned(),
        },
    );
    send(&mut m, "api", EngineEvent::Watching);
    m
}

/// `web` serving build 3 on port 8080 for 42 minutes, with requests in its runtime log.
fn live(color: bool) -> Model {
    let mut m = start(color);
    send(
        &mut m,
        "web",
        EngineEvent::BuildStarted {
            id: IDS[3].to_owned(),
        },
    );
    build_output(&mut m, 3);
    finish(&mut m, 3);
    let live = EngineEvent::Live {
        id: IDS[3].to_owned(),
        archive: archive(3),
        port: 8080,
        since: NOW - 42 * 60,
    };
    send(&mut m, "web", live);
    builds(
        &mut m,
        vec![
            build(3, "ok", true, true),
            build(2, "ok", false, false),
            build(1, "unhealthy", false, false),
        ],
    );
    for i in 0..6 {
        let line = format!(
            "\x1b[32mGET\x1b[0m /api/items/{i} \x1b[32m200\x1b[0m {}ms",
            3 + i
        );
        send(&mut m, "web", EngineEvent::RunOutput { line });
    }
    send(
        &mut m,
        "web",
        EngineEvent::RunOutput {
            line: "\x1b[31mGET /favicon.ico 404\x1b[0m".to_owned(),
        },
    );
    m
}

fn draw(m: &Model, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("a test terminal");
    terminal
        .draw(|frame| frame.render_widget(m, frame.area()))
        .expect("drawn");
    terminal
}

/// The screen as text, one line per row, trailing blanks cut.
fn text(buffer: &Buffer) -> String {
    let width = usize::from(buffer.area.width);
    let rows: Vec<String> = buffer
        .content
        .chunks(width.max(1))
        .map(|row| {
            row.iter()
                .map(|c| c.symbol())
                .collect::<String>()
                .trim_end()
                .to_owned()
        })
        .collect();
    rows.join("\n")
}

fn screen(m: &Model, width: u16, height: u16) -> String {
    text(draw(m, width, height).backend().buffer())
}

#[test]
fn live_service() {
    let mut m = live(true);
    keys(&mut m, "l");
    insta::assert_snapshot!("live", screen(&m, 80, 24));
}

#[test]
fn building_a_new_version() {
    let mut m = live(true);
    send(
        &mut m,
        "web",
        EngineEvent::BuildStarted {
            id: IDS[0].to_owned(),
        },
    );
    build_output(&mut m, 4);
    send(
        &mut m,
        "api",
        EngineEvent::BuildStarted {
            id: IDS[1].to_owned(),
        },
    );
    insta::assert_snapshot!("building", screen(&m, 80, 24));
}

#[test]
fn unhealthy_build_rolled_back() {
    let mut m = live(true);
    send(
        &mut m,
        "web",
        EngineEvent::BuildStarted {
            id: IDS[0].to_owned(),
        },
    );
    build_output(&mut m, 4);
    let mut rows = vec![build(3, "ok", true, true), build(2, "ok", false, false)];
    rows.insert(
        0,
        BuildRow {
            name: ".build-20261125T150000".into(),
            id: IDS[0].into(),
            ..build(3, "unhealthy", false, false)
        },
    );
    let finished = EngineEvent::BuildFinished {
        id: IDS[0].into(),
        ok: true,
        duration_ms: 9100,
        archive: Some(rows[0].name.clone()),
        error: None,
    };
    send(&mut m, "web", finished);
    let reason = "no answer on GET /healthz within 30s".to_owned();
    send(
        &mut m,
        "web",
        EngineEvent::Unhealthy {
            id: IDS[0].into(),
            archive: rows[0].name.clone(),
            reason,
        },
    );
    builds(&mut m, rows);
    send(
        &mut m,
        "api",
        EngineEvent::Crashed {
            id: IDS[1].into(),
            reason: "exit status 137".into(),
        },
    );
    insta::assert_snapshot!("unhealthy", screen(&m, 80, 24));
}

#[test]
fn long_log_scrolled_and_searched() {
    let mut m = live(true);
    keys(&mut m, "l");
    for i in 0..300 {
        let line = format!("GET /api/items/{i} 200 {}ms", i % 17);
        send(&mut m, "web", EngineEvent::RunOutput { line });
    }
    keys(&mut m, "/items/25");
    key(&mut m, KeyCode::Enter);
    keys(&mut m, "N");
    let terminal = draw(&m, 80, 24);
    let buffer = terminal.backend().buffer();
    insta::assert_snapshot!("long_log", text(buffer));
    // Enter went to the newest match (items/259), N to the one before: the current match.
    let at = |needle: &str| find(buffer, needle).unwrap_or_else(|| panic!("{needle} is on screen"));
    let (x, y) = at("items/258");
    assert_eq!(buffer[(x + 1, y)].bg, Color::LightYellow);
    let (x, y) = at("items/254");
    assert_eq!(buffer[(x + 1, y)].bg, Color::Yellow);
    assert_eq!(
        buffer[(x - 1, y)].bg,
        Color::Reset,
        "the match starts after the slash"
    );
}

#[test]
fn an_opened_build_log() {
    let mut m = live(true);
    keys(&mut m, "jj");
    let commands = update(
        &mut m,
        Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)),
    );
    assert_eq!(
        commands,
        vec![Command::LoadLog {
            service: "web".into(),
            archive: archive(1)
        }]
    );
    let lines = vec![
        "$ npm run build".to_owned(),
        "\x1b[31merror\x1b[0m: Cannot find module './routes'".to_owned(),
        "npm ERR! code 1".to_owned(),
    ];
    update(
        &mut m,
        Msg::BuildLog {
            service: "web".into(),
            archive: archive(1),
            lines,
        },
    );
    insta::assert_snapshot!("opened_log", screen(&m, 80, 24));
}

#[test]
fn help_screen() {
    let mut m = live(true);
    keys(&mut m, "?");
    insta::assert_snapshot!("help", screen(&m, 80, 24));
}

#[test]
fn rollback_confirmation() {
    let mut m = live(true);
    keys(&mut m, "jr");
    insta::assert_snapshot!("confirm", screen(&m, 80, 24));
    assert_eq!(
        update(
            &mut m,
            Msg::Key(KeyEvent::new(KeyCode::Char('y'), KeyModifiers::NONE))
        ),
        vec![Command::Rollback {
            service: "web".into(),
            archive: archive(2)
        }]
    );
}

#[test]
fn small_terminals() {
    let m = live(true);
    insta::assert_snapshot!("tiny_30x8", screen(&m, 30, 8));
    insta::assert_snapshot!("small_40x10", screen(&m, 40, 10));
    let mut log_focus = live(true);
    key(&mut log_focus, KeyCode::Tab);
    insta::assert_snapshot!("tiny_log_20x4", screen(&log_focus, 20, 4));
}

#[test]
fn no_size_is_too_small_to_draw() {
    let mut models = vec![live(true), live(false), Model::new(Vec::new(), true)];
    let mut help = live(true);
    keys(&mut help, "?");
    models.push(help);
    let mut prompt = live(true);
    keys(&mut prompt, "jr");
    models.push(prompt);
    for m in &models {
        for (w, h) in [
            (0, 0),
            (1, 1),
            (0, 5),
            (5, 0),
            (2, 2),
            (3, 7),
            (12, 3),
            (80, 1),
            (1, 24),
            (200, 60),
        ] {
            screen(m, w, h);
        }
        for w in 0..40 {
            for h in 0..14 {
                let mut buffer = Buffer::empty(ratatui::layout::Rect::new(0, 0, w, h));
                ratatui::widgets::Widget::render(m, buffer.area, &mut buffer);
            }
        }
    }
}

/// The cell showing the first occurrence of `needle` on screen.
fn find(buffer: &Buffer, needle: &str) -> Option<(u16, u16)> {
    let text = text(buffer);
    text.lines().enumerate().find_map(|(y, line)| {
        let x = line.find(needle)?;
        // Columns count characters, not bytes (the screen has box-drawing characters).
        let x = line[..x].chars().count();
        Some((u16::try_from(x).ok()?, u16::try_from(y).ok()?))
    })
}

#[test]
fn ansi_colours_in_logs_become_styles() {
    let mut m = live(true);
    keys(&mut m, "l");
    let terminal = draw(&m, 80, 24);
    let buffer = terminal.backend().buffer();
    let at = |needle: &str| find(buffer, needle).unwrap_or_else(|| panic!("{needle} is on screen"));
    assert_eq!(buffer[at("GET /favicon")].fg, Color::Red);
    assert_eq!(buffer[at("GET /api/items/0")].fg, Color::Green);
    let (x, y) = at("/api/items/0");
    assert_eq!(
        buffer[(x, y)].fg,
        Color::Reset,
        "the colour ends with ESC [0m"
    );
    assert!(
        !text(buffer).contains('\u{1b}') && !text(buffer).contains("[0m"),
        "no escape codes shown"
    );
}

#[test]
fn no_color_draws_no_colour_at_all() {
    for setup in ["", "l", "?", "jr", "/GET\n"] {
        let mut m = live(false);
        for c in setup.chars() {
            match c {
                '\n' => key(&mut m, KeyCode::Enter),
                c => keys(&mut m, &c.to_string()),
            }
        }
        let terminal = draw(&m, 80, 24);
        let buffer = terminal.backend().buffer();
        for cell in &buffer.content {
            assert_eq!(
                (cell.fg, cell.bg),
                (Color::Reset, Color::Reset),
                "{setup:?}: {:?}",
                cell
            );
        }
    }
    // The same screens in colour do use colours.
    let terminal = draw(&live(true), 80, 24);
    assert!(
        terminal
            .backend()
            .buffer()
            .content
            .iter()
            .any(|c| c.fg != Color::Reset)
    );
}

#[test]
fn every_key_appears_in_the_help_screen() {
    let mut m = live(true);
    keys(&mut m, "?");
    let help = screen(&m, 80, 24);
    for binding in KEYS {
        let line = help.lines().find(|l| l.contains(binding.help));
        let line = line.unwrap_or_else(|| panic!("{:?} is not in the help:\n{help}", binding.help));
        assert!(
            line.contains(&binding.label()),
            "{} is not next to its help",
            binding.label()
        );
    }
}

#[test]
fn the_status_line_shows_the_focused_panes_keys() {
    let mut m = live(true);
    let status = |m: &Model| {
        screen(m, 80, 24)
            .lines()
            .last()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        status(&m).starts_with("Enter log  r rollback  Tab pane"),
        "{}",
        status(&m)
    );
    key(&mut m, KeyCode::Tab);
    assert!(
        status(&m).starts_with("n next  N prev  f follow"),
        "{}",
        status(&m)
    );
    assert!(status(&m).ends_with("? help"), "{}", status(&m));
}

#[test]
fn redraw_only_when_something_changed() {
    let mut m = live(true);
    keys(&mut m, "l");
    assert!(m.needs_redraw());
    m.drawn();
    update(&mut m, Msg::Now(NOW + 1));
    send(
        &mut m,
        "web",
        EngineEvent::BuildOutput {
            line: "not shown".into(),
        },
    );
    assert!(!m.needs_redraw());
    keys(&mut m, "l");
    assert!(m.needs_redraw());
}
