//! The view: `impl Widget for &Model` draws the whole screen from the model, borrowing it.

mod lists;
mod log_pane;
mod status;
mod theme;

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::Widget;
use unicode_width::UnicodeWidthChar;

use crate::layout::layout;
use crate::model::{Mode, Model};
use theme::Theme;

impl Widget for &Model {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let area = area.intersection(buf.area);
        let theme = Theme::new(self.color);
        let builds = self.service().map_or(0, |s| s.builds.len());
        let areas = layout(area, self.services.len(), builds, self.focus);
        if let Some(status) = areas.status {
            status::status_line(self, &theme, status, buf);
        }
        if self.mode == Mode::Help {
            let body = Rect {
                height: area.height.saturating_sub(1),
                ..area
            };
            status::help(&theme, body, buf);
            return;
        }
        if let Some(rect) = areas.services {
            lists::services(self, &theme, rect, areas.services_compact, buf);
        }
        if let Some(rect) = areas.builds {
            lists::builds(self, &theme, rect, buf);
        }
        if let Some(rect) = areas.log {
            log_pane::log(self, &theme, rect, buf);
        }
    }
}

/// Draws a pane's title bar on the first row of `rect`: a rule with `left` at its start and
/// `right` at its end, `right` left out when both do not fit.
fn title_bar<'a>(
    buf: &mut Buffer,
    rect: Rect,
    focused: bool,
    theme: &Theme,
    left: Line<'a>,
    right: Line<'a>,
) {
    if rect.is_empty() {
        return;
    }
    let rule = if focused { "━" } else { "─" };
    let y = rect.y;
    for x in rect.left()..rect.right() {
        buf[(x, y)].set_symbol(rule).set_style(theme.rule(focused));
    }
    let title = theme.title(focused);
    let padded = |line: Line<'a>| -> Line<'a> {
        let mut spans = vec![Span::raw(" ")];
        spans.extend(line.spans);
        spans.push(Span::raw(" "));
        Line::from(spans).style(title)
    };
    let left = padded(left);
    let right = padded(right);
    let inner = rect.width.saturating_sub(2);
    let (x, _) = buf.set_line(rect.x + 1.min(rect.width), y, &left, inner);
    let right_width = u16::try_from(right.width()).unwrap_or(u16::MAX);
    if right.width() > 2 && x.saturating_add(right_width) < rect.right().saturating_sub(1) {
        buf.set_line(rect.right() - 1 - right_width, y, &right, right_width);
    }
}

/// One column of a row that drops columns when it does not fit.
pub(crate) struct Col {
    text: String,
    style: Style,
    /// Display width; 0 for the flexible last column, which takes what is left.
    width: u16,
    /// Columns with a lower number stay longest.
    priority: u8,
    right: bool,
}

impl Col {
    fn new(text: impl Into<String>, style: Style, width: u16, priority: u8) -> Col {
        Col {
            text: text.into(),
            style,
            width,
            priority,
            right: false,
        }
    }

    fn right(mut self) -> Col {
        self.right = true;
        self
    }
}

/// Lays `cols` out in `width` cells, one space apart, leaving out the least important
/// columns that do not fit; a cut text ends in `…`. Only the last column may be flexible.
fn fit(cols: Vec<Col>, width: u16) -> Line<'static> {
    let mut order: Vec<usize> = (0..cols.len()).collect();
    order.sort_by_key(|&i| cols[i].priority);
    let mut keep = vec![false; cols.len()];
    let mut used = 0u16;
    for i in order {
        // The flexible column is worth showing with at least a few cells.
        let need = u16::from(used > 0) + if cols[i].width == 0 { 4 } else { cols[i].width };
        if used + need <= width {
            keep[i] = true;
            used += need;
        }
    }
    let mut spans = Vec::new();
    let mut x = 0u16;
    for (col, _) in cols.into_iter().zip(&keep).filter(|(_, k)| **k) {
        if x > 0 {
            spans.push(Span::raw(" "));
            x += 1;
        }
        let w = if col.width == 0 {
            width.saturating_sub(x)
        } else {
            col.width
        };
        let text = pad(&col.text, w, col.right);
        spans.push(Span::styled(text, col.style));
        x += w;
    }
    Line::from(spans)
}

/// `text` cut or padded to exactly `width` cells.
fn pad(text: &str, width: u16, right: bool) -> String {
    let width = usize::from(width);
    let cut = truncate(text, width);
    let fill = " ".repeat(width.saturating_sub(display_width(&cut)));
    if right { fill + &cut } else { cut + &fill }
}

/// `text` in at most `width` cells, ending in `…` when cut.
pub(crate) fn truncate(text: &str, width: usize) -> String {
    if display_width(text) <= width {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > width {
            break;
        }
        out.push(c);
        used += w;
    }
    if width > 0 {
        out.push('…');
    }
    out
}

fn display_width(text: &str) -> usize {
    text.chars().map(|c| c.width().unwrap_or(0)).sum()
}

/// Paints `style` over row `y` of `rect`.
fn highlight_row(buf: &mut Buffer, rect: Rect, y: u16, style: Style) {
    buf.set_style(Rect::new(rect.x, y, rect.width, 1), style);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_drop_by_priority_and_keep_their_order() {
        let cols = || {
            vec![
                Col::new("a", Style::new(), 1, 0),
                Col::new("12", Style::new(), 4, 1).right(),
                Col::new("long text", Style::new(), 0, 3),
            ]
        };
        let text = |l: Line| {
            l.spans
                .iter()
                .map(|s| s.content.to_string())
                .collect::<String>()
        };
        assert_eq!(text(fit(cols(), 20)), "a   12 long text    ");
        assert_eq!(text(fit(cols(), 12)), "a   12 long…");
        assert_eq!(text(fit(cols(), 6)), "a   12");
        assert_eq!(text(fit(cols(), 1)), "a");
        assert_eq!(text(fit(cols(), 0)), "");
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abc", 0), "");
        assert_eq!(pad("ab", 4, true), "  ab");
    }
}
