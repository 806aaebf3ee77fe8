//! Unit tests of `update`: one per key and per engine event, looking at the model's insides.

mod events;
mod keys;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::model::{BuildRow, Command, EngineEvent, Model, Msg};
use crate::update;

pub(crate) const NOW: u64 = 1_790_000_000;
pub(crate) const IDS: [&str; 4] = [
    "00000000000000000000000000000000",
    "1111aaaa2222bbbb3333cccc4444dddd",
    "2222bbbb3333cccc4444dddd5555eeee",
    "3333cccc4444dddd5555eeee6666ffff",
];

pub(crate) fn key(code: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

/// A character key as a terminal reports it (upper case with Shift).
pub(crate) fn ch(c: char) -> Msg {
    let mods = if c.is_ascii_uppercase() || c == '?' {
        KeyModifiers::SHIFT
    } else {
        KeyModifiers::NONE
    };
    Msg::Key(KeyEvent::new(KeyCode::Char(c), mods))
}

pub(crate) fn ctrl(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

pub(crate) fn ev(model: &mut Model, event: EngineEvent) -> Vec<Command> {
    update(
        model,
        Msg::Engine {
            service: "web".to_owned(),
            event,
        },
    )
}

pub(crate) fn archive(n: usize) -> String {
    format!(".build-2026112{n}T120000")
}

/// Build `n` (1 to 3), archived `n` ten-minute steps before the newest.
pub(crate) fn row(n: usize, run: bool, serving: bool) -> BuildRow {
    BuildRow {
        name: archive(n),
        id: IDS[n].to_owned(),
        status: if n == 1 { "unhealthy" } else { "ok" }.to_owned(),
        created: NOW - 600 * (4 - n as u64),
        duration_ms: Some(1200 * n as u64),
        run,
        serving,
    }
}

/// The three builds of `web`, newest first, build 3 live.
pub(crate) fn rows() -> Vec<BuildRow> {
    vec![
        row(3, true, true),
        row(2, false, false),
        row(1, false, false),
    ]
}

/// `web` and `api` on an 80x24 screen, `web` serving build 3 with some output.
pub(crate) fn live() -> Model {
    let mut m = Model::new(vec!["web".to_owned(), "api".to_owned()], true);
    update(
        &mut m,
        Msg::Resize {
            width: 80,
            height: 24,
        },
    );
    update(&mut m, Msg::Now(NOW));
    ev(&mut m, EngineEvent::Watching);
    ev(
        &mut m,
        EngineEvent::BuildStarted {
            id: IDS[3].to_owned(),
        },
    );
    for i in 0..3 {
        ev(
            &mut m,
            EngineEvent::BuildOutput {
                line: format!("step {i}"),
            },
        );
    }
    let done = EngineEvent::BuildFinished {
        id: IDS[3].to_owned(),
        ok: true,
        duration_ms: 3600,
        archive: Some(archive(3)),
        error: None,
    };
    ev(&mut m, done);
    let since = NOW - 3600;
    ev(
        &mut m,
        EngineEvent::Live {
            id: IDS[3].to_owned(),
            archive: archive(3),
            port: 8080,
            since,
        },
    );
    for i in 0..100 {
        ev(
            &mut m,
            EngineEvent::RunOutput {
                line: format!("request {i}"),
            },
        );
    }
    update(
        &mut m,
        Msg::Builds {
            service: "web".to_owned(),
            builds: rows(),
        },
    );
    m
}
