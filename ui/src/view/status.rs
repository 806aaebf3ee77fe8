//! The status line (the focused pane's keys, prompts, messages) and the help screen, both
//! built from `KEYS`.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};

use super::theme::Theme;
use super::{title_bar, truncate};
use crate::format::short_id;
use crate::keys::{Action, KEYS, KeyBinding};
use crate::model::{Mode, Model, Severity};

pub(super) fn status_line(model: &Model, theme: &Theme, rect: Rect, buf: &mut Buffer) {
    let width = usize::from(rect.width);
    let line = match &model.mode {
        _ if model.quitting => Line::styled(
            "stopping every instance and build…",
            theme.severity(Severity::Warning),
        ),
        Mode::Confirm {
            service,
            archive,
            id,
        } => {
            let unhealthy = model
                .service()
                .and_then(|s| s.builds.iter().find(|b| &b.name == archive))
                .is_some_and(|b| b.status != "ok");
            let warning = if unhealthy { " (marked unhealthy)" } else { "" };
            let question = format!(
                " Roll {service} back to {} ({archive}){warning}? ",
                short_id(id)
            );
            let answers = " y yes · n no ";
            let question = truncate(&question, width.saturating_sub(answers.len()));
            Line::from(vec![
                Span::styled(question, theme.prompt()),
                Span::styled(answers, theme.key()),
            ])
        }
        Mode::Search { draft } => {
            let hint = "  Enter search · Esc cancel";
            let room = width.saturating_sub(hint.len() + 2);
            // Show the end of a long query, where the typing happens.
            let shown: String = {
                let n = draft.chars().count();
                draft.chars().skip(n.saturating_sub(room)).collect()
            };
            Line::from(vec![
                Span::styled("/", theme.key()),
                Span::raw(shown),
                Span::styled(" ", theme.selected(true)),
                Span::styled(hint, theme.dim()),
            ])
        }
        Mode::Help => Line::from(vec![
            Span::styled("? Esc q", theme.key()),
            Span::raw(" close the help"),
        ]),
        Mode::Normal => match &model.message {
            Some((severity, text)) => {
                Line::styled(truncate(text, width), theme.severity(*severity))
            }
            None => hints(model, theme, width),
        },
    };
    buf.set_line(rect.x, rect.y, &line, rect.width);
}

/// The focused pane's keys, then the keys of every pane, as many as fit; `? help` always last.
fn hints(model: &Model, theme: &Theme, width: usize) -> Line<'static> {
    let help = KEYS.iter().find(|b| b.action == Action::Help);
    // The last hint needs no trailing gap.
    let reserve = help.map_or(0, |h| hint_width(h) - 2);
    let pane_keys = KEYS.iter().filter(|b| b.pane == Some(model.focus));
    let global = KEYS
        .iter()
        .filter(|b| b.pane.is_none() && b.action != Action::Help);
    let mut spans = Vec::new();
    let mut used = 0;
    for binding in pane_keys.chain(global).filter(|b| !b.hint.is_empty()) {
        let w = hint_width(binding);
        if used + w + reserve > width {
            continue;
        }
        push_hint(&mut spans, binding, theme);
        used += w;
    }
    if let Some(help) = help.filter(|h| used + hint_width(h) - 2 <= width) {
        push_hint(&mut spans, help, theme);
    }
    Line::from(spans)
}

/// The status line names only a binding's first key (`q`, not `q/Ctrl-C`).
fn first_key(binding: &KeyBinding) -> &'static str {
    binding.keys.split(' ').next().unwrap_or(binding.keys)
}

fn hint_width(binding: &KeyBinding) -> usize {
    first_key(binding).chars().count() + 1 + binding.hint.chars().count() + 2
}

fn push_hint(spans: &mut Vec<Span<'static>>, binding: &KeyBinding, theme: &Theme) {
    spans.push(Span::styled(first_key(binding), theme.key()));
    spans.push(Span::raw(format!(" {}  ", binding.hint)));
}

/// The help screen: every row of `KEYS`, those for every pane first.
pub(super) fn help(theme: &Theme, rect: Rect, buf: &mut Buffer) {
    if rect.is_empty() {
        return;
    }
    for y in rect.top()..rect.bottom() {
        for x in rect.left()..rect.right() {
            buf[(x, y)].reset();
        }
    }
    title_bar(
        buf,
        rect,
        true,
        theme,
        Line::from("Keys"),
        Line::from("pmesh-dev"),
    );
    let label_width = KEYS
        .iter()
        .map(|b| b.label().chars().count())
        .max()
        .unwrap_or(0)
        + 2;
    let global = KEYS.iter().filter(|b| b.pane.is_none());
    let scoped = KEYS.iter().filter(|b| b.pane.is_some());
    let mut lines: Vec<Line> = global
        .chain(scoped)
        .map(|b| {
            let scope = b
                .pane
                .map(|p| format!("  ({} pane)", p.name()))
                .unwrap_or_default();
            Line::from(vec![
                Span::raw("  "),
                Span::styled(format!("{:<label_width$}", b.label()), theme.key()),
                Span::raw(b.help),
                Span::styled(scope, theme.dim()),
            ])
        })
        .collect();
    lines.push(Line::default());
    lines.push(Line::styled(
        "  The status line shows the keys of the focused pane. Marks: ● .run  ▸ serving",
        theme.dim(),
    ));
    for (y, line) in (rect.y + 1..rect.bottom()).zip(&lines) {
        buf.set_line(rect.x, y, line, rect.width);
    }
}
