//! Logs kept in memory: a bounded buffer of styled lines, a scroll position that follows the
//! end unless the user scrolled, and search.

use std::collections::VecDeque;

use ratatui::style::Style;

use crate::ansi::{self, StyledLine};

/// Lines kept per log (a service's runtime output, a build's output, an opened build log).
pub const MAX_LOG_LINES: usize = 5000;

/// A bounded log. Lines are numbered from the first ever pushed, so a scroll position stays
/// on the same line while old lines are dropped.
#[derive(Debug, Clone, Default)]
pub(crate) struct LogBuffer {
    lines: VecDeque<StyledLine>,
    /// How many lines were dropped from the front: the number of the first kept line.
    dropped: usize,
    /// The SGR style in effect at the end of the last line.
    pen: Style,
}

impl LogBuffer {
    /// Appends a line of program output, with its escape sequences.
    pub fn push(&mut self, raw: &str) {
        let line = ansi::parse(raw, &mut self.pen);
        self.push_line(line);
    }

    /// Appends a line of the UI's own, in one style.
    pub fn note(&mut self, text: &str, style: Style) {
        self.push_line(StyledLine::plain(text, style));
    }

    fn push_line(&mut self, line: StyledLine) {
        if self.lines.len() == MAX_LOG_LINES {
            self.lines.pop_front();
            self.dropped += 1;
        }
        self.lines.push_back(line);
    }

    /// A buffer holding `lines` (the last `MAX_LOG_LINES` of them).
    pub fn from_lines(lines: &[String]) -> LogBuffer {
        let mut log = LogBuffer::default();
        let skip = lines.len().saturating_sub(MAX_LOG_LINES);
        log.dropped = skip;
        for line in &lines[skip..] {
            log.push(line);
        }
        log
    }

    /// Empties the buffer; line numbers go on from where they were.
    pub fn clear(&mut self) {
        self.dropped += self.lines.len();
        self.lines.clear();
        self.pen = Style::new();
    }

    /// The number of the first kept line.
    pub fn first(&self) -> usize {
        self.dropped
    }

    /// One past the number of the last line.
    pub fn end(&self) -> usize {
        self.dropped + self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The line numbered `n`, if it is kept.
    pub fn get(&self, n: usize) -> Option<&StyledLine> {
        self.lines.get(n.checked_sub(self.dropped)?)
    }

    /// The number of the line where `query` next occurs strictly after (`forward`) or before
    /// line `from`, wrapping around the ends; from `None`, the first (or last) match.
    pub fn find(&self, query: &Query, from: Option<usize>, forward: bool) -> Option<usize> {
        let len = isize::try_from(self.lines.len()).ok()?;
        if len == 0 {
            return None;
        }
        let start = match from {
            None if forward => -1,
            None => len,
            Some(n) => {
                isize::try_from(n.clamp(self.dropped, self.end() - 1) - self.dropped).ok()?
            }
        };
        (1..=len)
            .map(|step| if forward { start + step } else { start - step }.rem_euclid(len))
            .filter_map(|i| usize::try_from(i).ok())
            .find(|&i| query.matches(&self.lines[i].text).next().is_some())
            .map(|i| i + self.dropped)
    }
}

/// A search query: smart case, so it ignores ASCII case unless it has an upper-case letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    text: String,
    ignore_case: bool,
}

impl Query {
    pub fn new(text: &str) -> Query {
        let ignore_case = !text.chars().any(char::is_uppercase);
        Query {
            text: text.to_owned(),
            ignore_case,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The byte ranges of `line` where the query occurs, without overlaps.
    pub fn matches<'a>(&'a self, line: &'a str) -> impl Iterator<Item = (usize, usize)> + 'a {
        let hay = if self.ignore_case {
            line.to_ascii_lowercase()
        } else {
            line.to_owned()
        };
        let len = self.text.len();
        let found: Vec<(usize, usize)> = if len == 0 {
            Vec::new()
        } else {
            hay.match_indices(self.text.as_str())
                .map(|(i, _)| (i, i + len))
                .collect()
        };
        found.into_iter()
    }
}

/// Where a log pane looks: following the end, or at a line the user scrolled to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogView {
    pub follow: bool,
    /// The number of the top line when not following.
    pub top: usize,
}

impl Default for LogView {
    fn default() -> Self {
        LogView {
            follow: true,
            top: 0,
        }
    }
}

impl LogView {
    /// The number of the top line shown in a pane of `rows` lines.
    pub fn top(&self, log: &LogBuffer, rows: usize) -> usize {
        let last_top = last_top(log, rows);
        if self.follow {
            last_top
        } else {
            self.top.clamp(log.first(), last_top)
        }
    }

    /// Scrolls by `delta` lines; reaching the end follows it again.
    pub fn scroll(&mut self, log: &LogBuffer, rows: usize, delta: isize) {
        let top = self.top(log, rows).saturating_add_signed(delta);
        self.goto(log, rows, top);
    }

    /// Puts line `top` at the top (clamped); at the end, follows it.
    pub fn goto(&mut self, log: &LogBuffer, rows: usize, top: usize) {
        let last_top = last_top(log, rows);
        self.top = top.clamp(log.first(), last_top);
        self.follow = self.top == last_top;
    }

    /// Shows line `n` a third of the way down the pane, and stops following.
    pub fn reveal(&mut self, log: &LogBuffer, rows: usize, n: usize) {
        let top = self.top(log, rows);
        if n < top || n >= top + rows || self.follow {
            self.top = n
                .saturating_sub(rows / 3)
                .clamp(log.first(), last_top(log, rows));
        } else {
            self.top = top;
        }
        self.follow = false;
    }

    /// `f`: follow the end, or freeze where the pane is.
    pub fn toggle_follow(&mut self, log: &LogBuffer, rows: usize) {
        if self.follow {
            self.top = self.top(log, rows);
            self.follow = false;
        } else {
            self.follow = true;
        }
    }
}

fn last_top(log: &LogBuffer, rows: usize) -> usize {
    log.end().saturating_sub(rows.max(1)).max(log.first())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(n: usize) -> LogBuffer {
        let mut log = LogBuffer::default();
        for i in 0..n {
            log.push(&format!("line {i}"));
        }
        log
    }

    #[test]
    fn bounded_and_numbered_from_the_first_line_ever() {
        let log = numbered(MAX_LOG_LINES + 10);
        assert_eq!(log.first(), 10);
        assert_eq!(log.end(), MAX_LOG_LINES + 10);
        assert_eq!(log.get(10).map(|l| l.text.as_str()), Some("line 10"));
        assert!(log.get(9).is_none());
        let loaded = LogBuffer::from_lines(
            &(0..MAX_LOG_LINES + 3)
                .map(|i| i.to_string())
                .collect::<Vec<_>>(),
        );
        assert_eq!((loaded.first(), loaded.end()), (3, MAX_LOG_LINES + 3));
    }

    #[test]
    fn scrolled_view_stays_on_its_line_and_resumes_following_at_the_end() {
        let mut log = numbered(100);
        let mut view = LogView::default();
        assert_eq!(view.top(&log, 10), 90);
        view.scroll(&log, 10, -5);
        assert_eq!((view.top(&log, 10), view.follow), (85, false));
        log.push("more");
        assert_eq!(view.top(&log, 10), 85);
        view.scroll(&log, 10, 100);
        assert!(view.follow);
        assert_eq!(view.top(&log, 10), 91);
    }

    #[test]
    fn short_logs_keep_following() {
        let log = numbered(3);
        let mut view = LogView::default();
        view.scroll(&log, 10, -1);
        assert!(view.follow);
        assert_eq!(view.top(&log, 10), 0);
    }

    #[test]
    fn find_wraps_and_is_smart_case() {
        let mut log = LogBuffer::default();
        for l in ["Error one", "fine", "error two", "ERROR three"] {
            log.push(l);
        }
        let q = Query::new("error");
        assert_eq!(log.find(&q, Some(0), true), Some(2));
        assert_eq!(log.find(&q, Some(3), true), Some(0));
        assert_eq!(log.find(&q, Some(0), false), Some(3));
        assert_eq!(log.find(&q, None, true), Some(0));
        assert_eq!(log.find(&q, None, false), Some(3));
        let exact = Query::new("ERROR");
        assert_eq!(log.find(&exact, Some(0), true), Some(3));
        assert_eq!(
            log.find(&exact, Some(3), true),
            Some(3),
            "a lone match is found again"
        );
        assert_eq!(log.find(&Query::new("nothing"), None, true), None);
        assert_eq!(
            q.matches("an error, another ERROR").collect::<Vec<_>>(),
            vec![(3, 8), (18, 23)]
        );
        assert_eq!(LogBuffer::default().find(&q, None, true), None);
    }
}
