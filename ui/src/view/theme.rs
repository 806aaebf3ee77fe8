//! The styles of the screen, with and without colour. Without colour (`NO_COLOR`) only bold,
//! dim, reverse and underline tell things apart, so the screen stays legible.

use ratatui::style::{Color, Modifier, Style};

use crate::model::{ServiceState, Severity};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Theme {
    color: bool,
}

const BOLD: Modifier = Modifier::BOLD;

impl Theme {
    pub fn new(color: bool) -> Theme {
        Theme { color }
    }

    /// `fg` in colour, and `mono` modifiers without.
    fn pick(&self, fg: Color, mono: Modifier) -> Style {
        if self.color {
            Style::new().fg(fg)
        } else {
            Style::new().add_modifier(mono)
        }
    }

    pub fn state(&self, state: ServiceState) -> Style {
        match state {
            ServiceState::Idle => self.dim(),
            ServiceState::Building => self.pick(Color::Yellow, Modifier::empty()),
            ServiceState::Starting | ServiceState::Restarting => {
                self.pick(Color::Cyan, Modifier::empty())
            }
            ServiceState::Live => self.pick(Color::Green, BOLD).add_modifier(BOLD),
            ServiceState::Unhealthy | ServiceState::Crashed | ServiceState::Failed => {
                self.pick(Color::Red, BOLD).add_modifier(BOLD)
            }
        }
    }

    /// The status of an archived build: `ok` or `unhealthy`.
    pub fn build_status(&self, status: &str) -> Style {
        match status {
            "ok" => self.pick(Color::Green, Modifier::empty()),
            _ => self.pick(Color::Red, BOLD),
        }
    }

    /// The mark of the build `.run` points to.
    pub fn run_mark(&self) -> Style {
        self.pick(Color::Green, BOLD).add_modifier(BOLD)
    }

    /// The mark of the build that is serving.
    pub fn serving_mark(&self) -> Style {
        self.pick(Color::Cyan, BOLD).add_modifier(BOLD)
    }

    /// A pane's title and rule; the focused pane's stand out.
    pub fn title(&self, focused: bool) -> Style {
        match (focused, self.color) {
            (true, true) => Style::new().fg(Color::Cyan).add_modifier(BOLD),
            (true, false) => Style::new().add_modifier(BOLD),
            (false, _) => Style::new(),
        }
    }

    pub fn rule(&self, focused: bool) -> Style {
        match (focused, self.color) {
            (true, true) => Style::new().fg(Color::Cyan),
            (false, true) => Style::new().fg(Color::DarkGray),
            (_, false) => Style::new(),
        }
    }

    /// The selected row: reversed in the focused pane, bold elsewhere.
    pub fn selected(&self, focused: bool) -> Style {
        if focused {
            Style::new().add_modifier(Modifier::REVERSED | BOLD)
        } else {
            Style::new().add_modifier(BOLD)
        }
    }

    pub fn dim(&self) -> Style {
        self.pick(Color::DarkGray, Modifier::DIM)
    }

    /// A key name in the status line and the help.
    pub fn key(&self) -> Style {
        self.pick(Color::Cyan, BOLD).add_modifier(BOLD)
    }

    pub fn severity(&self, severity: Severity) -> Style {
        match severity {
            Severity::Info => self.pick(Color::Cyan, Modifier::empty()),
            Severity::Warning => self.pick(Color::Yellow, BOLD),
        }
    }

    /// Problems next to a service's state.
    pub fn problem(&self) -> Style {
        self.pick(Color::Red, Modifier::empty())
    }

    /// The confirmation prompt.
    pub fn prompt(&self) -> Style {
        if self.color {
            Style::new()
                .fg(Color::Black)
                .bg(Color::Yellow)
                .add_modifier(BOLD)
        } else {
            Style::new().add_modifier(Modifier::REVERSED | BOLD)
        }
    }

    /// A search match in the log; the current one stands out more.
    pub fn matched(&self, current: bool) -> Style {
        match (current, self.color) {
            (true, true) => Style::new()
                .fg(Color::Black)
                .bg(Color::LightYellow)
                .add_modifier(BOLD),
            (false, true) => Style::new().fg(Color::Black).bg(Color::Yellow),
            (true, false) => {
                Style::new().add_modifier(Modifier::REVERSED | BOLD | Modifier::UNDERLINED)
            }
            (false, false) => Style::new().add_modifier(Modifier::REVERSED),
        }
    }

    /// A style from a log line: kept in colour, stripped of colours without.
    pub fn log(&self, style: Style) -> Style {
        if self.color {
            style
        } else {
            Style {
                fg: None,
                bg: None,
                ..style
            }
        }
    }
}
