//! The services pane and the builds pane.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};

use super::theme::Theme;
use super::{Col, display_width, fit, highlight_row, title_bar};
use crate::format::{age, duration, minutes, short_id};
use crate::keys::Pane;
use crate::model::{Model, Service, ServiceState};

/// The mark of the build `.run` points to.
pub(crate) const RUN_MARK: &str = "●";
/// The mark of the build an instance serves from.
pub(crate) const SERVING_MARK: &str = "▸";
/// The mark of the selected row, for screens without colour or reverse video.
const CURSOR: &str = "›";

/// The index of the first row shown so that `selected` is among `rows` rows.
fn first_row(selected: usize, rows: usize) -> usize {
    (selected + 1).saturating_sub(rows.max(1))
}

pub(super) fn services(model: &Model, theme: &Theme, rect: Rect, compact: bool, buf: &mut Buffer) {
    let focused = model.focus == Pane::Services;
    let body = if compact {
        rect
    } else {
        title_bar(
            buf,
            rect,
            focused,
            theme,
            Line::from("Services"),
            Line::default(),
        );
        Rect {
            y: rect.y + 1,
            height: rect.height - 1,
            ..rect
        }
    };
    if body.is_empty() {
        return;
    }
    if model.services.is_empty() {
        buf.set_line(
            body.x,
            body.y,
            &Line::styled("no services", theme.dim()),
            body.width,
        );
        return;
    }
    let name_width = model
        .services
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0);
    let name_width = u16::try_from(name_width.clamp(4, 20)).unwrap_or(20);
    let rows = usize::from(body.height);
    let first = if compact {
        model.selected
    } else {
        first_row(model.selected, rows)
    };
    for (y, (i, svc)) in (body.y..body.bottom()).zip(model.services.iter().enumerate().skip(first))
    {
        let selected = i == model.selected;
        let line = service_row(model, svc, selected, name_width, theme, body.width);
        buf.set_line(body.x, y, &line, body.width);
        if selected && (focused || !compact) {
            highlight_row(buf, body, y, theme.selected(focused));
        }
    }
}

fn service_row(
    model: &Model,
    svc: &Service,
    selected: bool,
    name_width: u16,
    theme: &Theme,
    width: u16,
) -> Line<'static> {
    let cursor = if selected { CURSOR } else { " " };
    let instance = svc.instance.as_ref();
    let id = instance
        .map(|i| short_id(&i.id).to_owned())
        .unwrap_or_default();
    let port = instance
        .and_then(|i| i.port)
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let uptime = match instance.and_then(|i| i.since) {
        Some(since) if model.now > 0 => format!("up {}", minutes(model.now.saturating_sub(since))),
        _ => String::new(),
    };
    let (note, note_style) = match (&svc.problem, &svc.building) {
        (Some(problem), _) => (problem.clone(), theme.problem()),
        (None, Some(id)) => (
            format!("→ {}", short_id(id)),
            theme.state(ServiceState::Building),
        ),
        (None, None) if svc.state == ServiceState::Idle && svc.watching => {
            ("watching for changes".to_owned(), theme.dim())
        }
        _ => (String::new(), theme.dim()),
    };
    let mut cols = vec![
        Col::new(cursor, theme.selected(false), 1, 0),
        Col::new(svc.name.clone(), theme.title(false), name_width, 0),
        Col::new(svc.state.label(), theme.state(svc.state), 12, 0),
    ];
    // The address to open first; the instance's own port (it changes with every swap) second.
    if let Some(url) = &svc.url {
        let w = u16::try_from(display_width(url)).unwrap_or(u16::MAX);
        cols.push(Col::new(url.clone(), theme.title(false), w, 1));
        cols.push(Col::new(id, theme.dim(), 12, 2));
        cols.push(Col::new(port, theme.dim(), 6, 3));
    } else {
        cols.push(Col::new(id, theme.dim(), 12, 2));
        cols.push(Col::new(port, theme.title(false), 6, 1));
    }
    cols.push(Col::new(uptime, theme.dim(), 9, 3));
    cols.push(Col::new(note, note_style, 0, 4));
    fit(cols, width)
}

pub(super) fn builds(model: &Model, theme: &Theme, rect: Rect, buf: &mut Buffer) {
    let focused = model.focus == Pane::Builds;
    let svc = model.service();
    let title = match svc {
        Some(svc) => Line::from(vec![Span::raw("Builds · "), Span::raw(svc.name.clone())]),
        None => Line::from("Builds"),
    };
    let legend = Line::from(vec![
        Span::styled(RUN_MARK, theme.run_mark()),
        Span::raw(" .run  "),
        Span::styled(SERVING_MARK, theme.serving_mark()),
        Span::raw(" serving"),
    ]);
    title_bar(buf, rect, focused, theme, title, legend);
    let body = Rect {
        y: rect.y + 1,
        height: rect.height - 1,
        ..rect
    };
    let Some(svc) = svc else { return };
    if body.is_empty() {
        return;
    }
    if svc.builds.is_empty() {
        let text = if svc.building.is_some() {
            "building the first one…"
        } else {
            "no archived builds yet"
        };
        buf.set_line(
            body.x + 2.min(body.width),
            body.y,
            &Line::styled(text, theme.dim()),
            body.width.saturating_sub(2),
        );
        return;
    }
    let first = first_row(svc.selected_build, usize::from(body.height));
    for (y, (i, build)) in (body.y..body.bottom()).zip(svc.builds.iter().enumerate().skip(first)) {
        let selected = i == svc.selected_build;
        let mark = |on: bool, mark: &'static str| if on { mark } else { " " };
        let line = fit(
            vec![
                Col::new(mark(selected, CURSOR), theme.selected(false), 1, 0),
                Col::new(mark(build.run, RUN_MARK), theme.run_mark(), 1, 0),
                Col::new(
                    mark(build.serving, SERVING_MARK),
                    theme.serving_mark(),
                    1,
                    0,
                ),
                Col::new(short_id(&build.id), theme.title(false), 12, 0),
                Col::new(
                    age(model.now, build.created).unwrap_or_default(),
                    theme.dim(),
                    9,
                    2,
                ),
                Col::new(
                    build.duration_ms.map(duration).unwrap_or_default(),
                    theme.dim(),
                    6,
                    3,
                )
                .right(),
                Col::new(
                    build.status.clone(),
                    theme.build_status(&build.status),
                    9,
                    1,
                ),
                Col::new(build.name.clone(), theme.dim(), 0, 4),
            ],
            body.width,
        );
        buf.set_line(body.x, y, &line, body.width);
        if selected {
            highlight_row(buf, body, y, theme.selected(focused));
        }
    }
}
