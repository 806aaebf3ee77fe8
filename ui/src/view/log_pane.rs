//! The log pane: the selected service's build output, an opened build log, or its runtime
//! output, with search matches highlighted.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};

use super::theme::Theme;
use super::title_bar;
use crate::ansi::StyledLine;
use crate::format::short_id;
use crate::keys::Pane;
use crate::log::{LogBuffer, Query};
use crate::model::{LogSource, Model, Service};

pub(super) fn log(model: &Model, theme: &Theme, rect: Rect, buf: &mut Buffer) {
    let focused = model.focus == Pane::Log;
    let Some(svc) = model.service() else {
        title_bar(
            buf,
            rect,
            focused,
            theme,
            Line::from("Log"),
            Line::default(),
        );
        return;
    };
    let rows = usize::from(rect.height - 1);
    let log = svc.log();
    let top = log.map(|log| svc.view().top(log, rows));
    title_bar(
        buf,
        rect,
        focused,
        theme,
        title(svc),
        position(model, log, top, rows),
    );
    let body = Rect {
        y: rect.y + 1,
        height: rect.height - 1,
        ..rect
    };
    if body.is_empty() {
        return;
    }
    let (Some(log), Some(top)) = (log, top) else {
        buf.set_line(
            body.x,
            body.y,
            &Line::styled("loading…", theme.dim()),
            body.width,
        );
        return;
    };
    if log.is_empty() {
        let text = match svc.source {
            LogSource::Runtime => "no output yet",
            LogSource::Build if svc.opened.is_some() => "empty log",
            LogSource::Build => "no build yet",
        };
        buf.set_line(body.x, body.y, &Line::styled(text, theme.dim()), body.width);
        return;
    }
    let query = model.search.as_ref().map(|s| (&s.query, s.current));
    for (y, n) in (body.y..body.bottom()).zip(top..log.end()) {
        let Some(line) = log.get(n) else { continue };
        let matches = query.map(|(q, current)| (q, current == Some(n)));
        buf.set_line(body.x, y, &styled(line, matches, theme), body.width);
    }
}

fn title(svc: &Service) -> Line<'static> {
    let text = match (svc.source, &svc.opened) {
        (LogSource::Runtime, _) => format!("Runtime output · {}", svc.name),
        (LogSource::Build, Some(opened)) => {
            format!("Build log · {} · {}", short_id(&opened.id), opened.archive)
        }
        (LogSource::Build, None) => match (&svc.build_log_id, &svc.building) {
            (Some(id), Some(building)) if id == building => {
                format!("Build output · {} · building", short_id(id))
            }
            (Some(id), _) => format!("Build output · {}", short_id(id)),
            (None, _) => "Build output".to_owned(),
        },
    };
    Line::from(text)
}

/// The right of the title: the search and where the pane is in the log.
fn position(
    model: &Model,
    log: Option<&LogBuffer>,
    top: Option<usize>,
    rows: usize,
) -> Line<'static> {
    let mut spans = Vec::new();
    if let Some(search) = &model.search {
        spans.push(Span::raw(format!("/{}  ", search.query.as_str())));
    }
    let (Some(log), Some(top)) = (log, top) else {
        return Line::from(spans);
    };
    let following = model.service().is_some_and(|s| s.view().follow);
    if following {
        spans.push(Span::raw("following"));
    } else if !log.is_empty() {
        let bottom = (top + rows).min(log.end());
        spans.push(Span::raw(format!(
            "{}-{} of {}",
            top + 1,
            bottom,
            log.end()
        )));
    }
    Line::from(spans)
}

/// A log line as spans: its own styles, with the search matches painted over.
fn styled<'a>(line: &'a StyledLine, search: Option<(&Query, bool)>, theme: &Theme) -> Line<'a> {
    let matches: Vec<(usize, usize)> = search
        .map(|(q, _)| q.matches(&line.text).collect())
        .unwrap_or_default();
    let current = search.is_some_and(|(_, c)| c);
    let mut spans = Vec::new();
    for (start, end, style) in line.segments() {
        let mut cuts = vec![start, end];
        for &(a, b) in &matches {
            cuts.extend([a, b].into_iter().filter(|&c| c > start && c < end));
        }
        cuts.sort_unstable();
        for pair in cuts.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let Some(text) = line.text.get(a..b).filter(|t| !t.is_empty()) else {
                continue;
            };
            let mut style = theme.log(style);
            if matches.iter().any(|&(m0, m1)| m0 <= a && a < m1) {
                style = style.patch(theme.matched(current));
            }
            spans.push(Span::styled(text, style));
        }
    }
    Line::from(spans)
}
