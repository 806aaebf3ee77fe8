//! The key table. One list drives key handling, the status line and the help screen, so the
//! three cannot drift apart.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// One of the three panes of the main screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pane {
    /// The services and their state.
    Services,
    /// The archived builds of the selected service.
    Builds,
    /// The build log or the runtime output of the selected service.
    Log,
}

impl Pane {
    /// The pane after this one, in `Tab` order.
    pub fn next(self) -> Pane {
        match self {
            Pane::Services => Pane::Builds,
            Pane::Builds => Pane::Log,
            Pane::Log => Pane::Services,
        }
    }

    /// The pane before this one, in `Tab` order.
    pub fn prev(self) -> Pane {
        match self {
            Pane::Services => Pane::Log,
            Pane::Builds => Pane::Services,
            Pane::Log => Pane::Builds,
        }
    }

    /// The pane's name as the help screen shows it.
    pub fn name(self) -> &'static str {
        match self {
            Pane::Services => "services",
            Pane::Builds => "builds",
            Pane::Log => "log",
        }
    }
}

/// What a key does. `update` runs every action through one `match`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    FocusNext,
    FocusPrev,
    Up,
    Down,
    PageUp,
    PageDown,
    Home,
    End,
    OpenLog,
    Rollback,
    Rebuild,
    Restart,
    ToggleLog,
    Search,
    NextMatch,
    PrevMatch,
    Follow,
    Back,
    Help,
    Quit,
}

/// One row of the key table.
#[derive(Debug, Clone, Copy)]
pub struct KeyBinding {
    /// The keys, separated by spaces: a character (`r`, `R`, `/`), a named key (`Tab`, `S-Tab`,
    /// `Up`, `Down`, `PgUp`, `PgDn`, `Home`, `End`, `Enter`, `Esc`) or `Ctrl-<char>`.
    pub keys: &'static str,
    /// What the keys do.
    pub action: Action,
    /// The sentence the help screen shows.
    pub help: &'static str,
    /// The pane the keys work in; `None` for every pane.
    pub pane: Option<Pane>,
    /// The short label of the status line; empty to show the binding only in the help screen.
    pub hint: &'static str,
}

const fn bind(
    keys: &'static str,
    action: Action,
    pane: Option<Pane>,
    hint: &'static str,
    help: &'static str,
) -> KeyBinding {
    KeyBinding {
        keys,
        action,
        help,
        pane,
        hint,
    }
}

const BUILDS: Option<Pane> = Some(Pane::Builds);
const LOG: Option<Pane> = Some(Pane::Log);

/// Every key of the main screen. The status line shows the focused pane's hints first, then
/// the others in this order, as many as fit.
pub const KEYS: &[KeyBinding] = &[
    bind(
        "Enter",
        Action::OpenLog,
        BUILDS,
        "log",
        "open the selected build's log",
    ),
    bind(
        "r",
        Action::Rollback,
        BUILDS,
        "rollback",
        "roll back to the selected build (asks y/n)",
    ),
    bind("n", Action::NextMatch, LOG, "next", "next search match"),
    bind("N", Action::PrevMatch, LOG, "prev", "previous search match"),
    bind(
        "f",
        Action::Follow,
        LOG,
        "follow",
        "follow the end of the log, or stop following",
    ),
    bind(
        "Tab",
        Action::FocusNext,
        None,
        "pane",
        "focus the next pane",
    ),
    bind(
        "S-Tab",
        Action::FocusPrev,
        None,
        "",
        "focus the previous pane",
    ),
    bind(
        "Up k",
        Action::Up,
        None,
        "",
        "move up, or scroll the log up",
    ),
    bind(
        "Down j",
        Action::Down,
        None,
        "",
        "move down, or scroll the log down",
    ),
    bind("PgUp", Action::PageUp, None, "", "one page up"),
    bind("PgDn", Action::PageDown, None, "", "one page down"),
    bind(
        "Home",
        Action::Home,
        None,
        "",
        "first row, or the top of the log",
    ),
    bind(
        "End",
        Action::End,
        None,
        "",
        "last row, or the end of the log (following it)",
    ),
    bind(
        "l",
        Action::ToggleLog,
        None,
        "logs",
        "switch between the build log and the runtime output",
    ),
    bind(
        "/",
        Action::Search,
        None,
        "search",
        "search the log (Enter accepts, Esc cancels)",
    ),
    bind(
        "b",
        Action::Rebuild,
        None,
        "rebuild",
        "rebuild the selected service now",
    ),
    bind(
        "q Ctrl-C",
        Action::Quit,
        None,
        "quit",
        "quit: stop every instance and build",
    ),
    bind(
        "R",
        Action::Restart,
        None,
        "restart",
        "restart the selected service's instance",
    ),
    bind(
        "Esc",
        Action::Back,
        None,
        "",
        "close the opened build log, clear the search",
    ),
    bind("?", Action::Help, None, "help", "show or hide this help"),
];

/// The first binding of `KEYS` that `key` triggers while `focus` has the focus.
pub fn binding_for(key: &KeyEvent, focus: Pane) -> Option<&'static KeyBinding> {
    KEYS.iter()
        .find(|b| b.pane.is_none_or(|p| p == focus) && b.matches(key))
}

impl KeyBinding {
    /// Whether `key` is one of this binding's keys (key releases never are).
    pub fn matches(&self, key: &KeyEvent) -> bool {
        if key.kind == KeyEventKind::Release {
            return false;
        }
        let pressed = normalize(key);
        self.keys
            .split(' ')
            .filter_map(parse_key)
            .any(|k| k == pressed)
    }

    /// The keys as the help and the status line show them, e.g. `Up/k`.
    pub fn label(&self) -> String {
        self.keys.replace(' ', "/")
    }
}

/// A key with its modifiers, Shift folded into the character as terminals report it.
pub(crate) fn normalize(key: &KeyEvent) -> (KeyCode, KeyModifiers) {
    let mods = key.modifiers & (KeyModifiers::CONTROL | KeyModifiers::ALT);
    let code = match key.code {
        KeyCode::Char(c) if key.modifiers.contains(KeyModifiers::SHIFT) => {
            KeyCode::Char(c.to_ascii_uppercase())
        }
        code => code,
    };
    (code, mods)
}

/// One key name of `KeyBinding::keys`; `None` for a name this parser does not know.
pub(crate) fn parse_key(name: &str) -> Option<(KeyCode, KeyModifiers)> {
    let none = KeyModifiers::NONE;
    let code = match name {
        "Tab" => KeyCode::Tab,
        "S-Tab" => KeyCode::BackTab,
        "Up" => KeyCode::Up,
        "Down" => KeyCode::Down,
        "PgUp" => KeyCode::PageUp,
        "PgDn" => KeyCode::PageDown,
        "Home" => KeyCode::Home,
        "End" => KeyCode::End,
        "Enter" => KeyCode::Enter,
        "Esc" => KeyCode::Esc,
        _ => {
            if let Some(rest) = name.strip_prefix("Ctrl-") {
                let c = single_char(rest)?;
                return Some((KeyCode::Char(c.to_ascii_lowercase()), KeyModifiers::CONTROL));
            }
            KeyCode::Char(single_char(name)?)
        }
    };
    Some((code, none))
}

fn single_char(s: &str) -> Option<char> {
    let mut chars = s.chars();
    let c = chars.next()?;
    chars.next().is_none().then_some(c)
}
