//! Turns a line of program output into plain text with style runs: SGR sequences
//! (`ESC [ ... m`) become ratatui styles, every other escape or control sequence is dropped.

use ratatui::style::{Color, Modifier, Style};

/// A line longer than this (in bytes) is cut, so one minified file cannot fill the memory.
pub(crate) const MAX_LINE_BYTES: usize = 4096;

/// A line of output: its visible text and where each style begins.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct StyledLine {
    /// The text without escape sequences, tabs expanded.
    pub text: String,
    /// `(byte offset in text, style from there on)`, in order; empty when unstyled.
    pub runs: Vec<(usize, Style)>,
}

impl StyledLine {
    /// A line in one style, for the UI's own notes in a log.
    pub fn plain(text: &str, style: Style) -> StyledLine {
        let mut line = StyledLine::default();
        for c in text.chars() {
            line.push(c, style);
        }
        line
    }

    /// `(start, end, style)` for each run of the line, covering all of it.
    pub fn segments(&self) -> impl Iterator<Item = (usize, usize, Style)> + '_ {
        let mut runs = Vec::with_capacity(self.runs.len() + 1);
        if self.runs.first().is_none_or(|r| r.0 != 0) {
            runs.push((0, Style::new()));
        }
        runs.extend(self.runs.iter().copied());
        let len = self.text.len();
        (0..runs.len()).map(move |i| {
            let end = runs.get(i + 1).map_or(len, |r| r.0);
            (runs[i].0, end, runs[i].1)
        })
    }

    fn push(&mut self, c: char, style: Style) -> bool {
        if self.text.len() + c.len_utf8() > MAX_LINE_BYTES {
            return false;
        }
        if self.runs.last().map_or(Style::new(), |r| r.1) != style {
            self.runs.push((self.text.len(), style));
        }
        self.text.push(c);
        true
    }
}

/// Parses one line. `pen` is the style in effect, carried from line to line as a terminal does.
pub(crate) fn parse(input: &str, pen: &mut Style) -> StyledLine {
    let input = input.strip_suffix('\n').unwrap_or(input);
    let input = input.strip_suffix('\r').unwrap_or(input);
    let mut line = StyledLine::default();
    let mut chars = input.chars().peekable();
    let mut column = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => escape(&mut chars, pen),
            // A carriage return starts the line over: the text after it is what a terminal shows.
            '\r' => {
                line = StyledLine::default();
                column = 0;
            }
            '\t' => {
                let spaces = 8 - column % 8;
                for _ in 0..spaces {
                    line.push(' ', *pen);
                }
                column += spaces;
            }
            c if c.is_control() => {}
            c => {
                if !line.push(c, *pen) {
                    line.text.push('…');
                    break;
                }
                column += 1;
            }
        }
    }
    line
}

fn escape(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, pen: &mut Style) {
    match chars.next() {
        Some('[') => {
            let mut params = String::new();
            for c in chars.by_ref() {
                if ('\x40'..='\x7e').contains(&c) {
                    if c == 'm' {
                        sgr(&params, pen);
                    }
                    return;
                }
                if params.len() < 64 {
                    params.push(c);
                }
            }
        }
        // OSC, DCS, SOS, PM, APC: a string ended by BEL or ESC \.
        Some(']' | 'P' | 'X' | '^' | '_') => {
            while let Some(c) = chars.next() {
                if c == '\x07' || (c == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                    return;
                }
            }
        }
        // ESC, intermediate bytes, one final byte (charset selection and the like).
        Some(c) if ('\x20'..='\x2f').contains(&c) => {
            while chars.next_if(|c| ('\x20'..='\x2f').contains(c)).is_some() {}
            chars.next();
        }
        _ => {}
    }
}

/// Applies the parameters of one `ESC [ ... m` to `pen`.
fn sgr(params: &str, pen: &mut Style) {
    let params: Vec<&str> = params.split(';').collect();
    let mut i = 0;
    while i < params.len() {
        let param = params[i];
        i += 1;
        if param.contains(':') {
            let sub: Vec<u16> = param.split(':').map(number).collect();
            match sub.as_slice() {
                [4, 0, ..] => pen.add_modifier.remove(Modifier::UNDERLINED),
                [4, ..] => pen.add_modifier.insert(Modifier::UNDERLINED),
                [38, rest @ ..] => pen.fg = extended(rest, true).or(pen.fg),
                [48, rest @ ..] => pen.bg = extended(rest, true).or(pen.bg),
                _ => {}
            }
            continue;
        }
        let code = number(param);
        match code {
            0 => *pen = Style::new(),
            1 => pen.add_modifier.insert(Modifier::BOLD),
            2 => pen.add_modifier.insert(Modifier::DIM),
            3 => pen.add_modifier.insert(Modifier::ITALIC),
            4 => pen.add_modifier.insert(Modifier::UNDERLINED),
            5 => pen.add_modifier.insert(Modifier::SLOW_BLINK),
            6 => pen.add_modifier.insert(Modifier::RAPID_BLINK),
            7 => pen.add_modifier.insert(Modifier::REVERSED),
            8 => pen.add_modifier.insert(Modifier::HIDDEN),
            9 => pen.add_modifier.insert(Modifier::CROSSED_OUT),
            21 | 22 => pen.add_modifier.remove(Modifier::BOLD | Modifier::DIM),
            23 => pen.add_modifier.remove(Modifier::ITALIC),
            24 => pen.add_modifier.remove(Modifier::UNDERLINED),
            25 => pen
                .add_modifier
                .remove(Modifier::SLOW_BLINK | Modifier::RAPID_BLINK),
            27 => pen.add_modifier.remove(Modifier::REVERSED),
            28 => pen.add_modifier.remove(Modifier::HIDDEN),
            29 => pen.add_modifier.remove(Modifier::CROSSED_OUT),
            30..=37 => pen.fg = Some(BASIC[usize::from(code - 30)]),
            39 => pen.fg = None,
            40..=47 => pen.bg = Some(BASIC[usize::from(code - 40)]),
            49 => pen.bg = None,
            90..=97 => pen.fg = Some(BRIGHT[usize::from(code - 90)]),
            100..=107 => pen.bg = Some(BRIGHT[usize::from(code - 100)]),
            38 | 48 | 58 => {
                let rest: Vec<u16> = params[i..].iter().map(|p| number(p)).collect();
                let used = match rest.first() {
                    Some(5) => 2,
                    Some(2) => 4,
                    _ => 1,
                };
                let color = extended(&rest[..used.min(rest.len())], false);
                i += used;
                match code {
                    38 => pen.fg = color.or(pen.fg),
                    48 => pen.bg = color.or(pen.bg),
                    _ => {} // underline colour: not kept
                }
            }
            _ => {}
        }
    }
}

/// The colour of `5;n` or `2;r;g;b` (with the colon form's optional colour-space id).
fn extended(rest: &[u16], colon: bool) -> Option<Color> {
    let byte = |v: u16| u8::try_from(v).ok();
    match rest {
        [5, n, ..] => Some(Color::Indexed(byte(*n)?)),
        [2, _, r, g, b, ..] if colon => Some(Color::Rgb(byte(*r)?, byte(*g)?, byte(*b)?)),
        [2, r, g, b, ..] => Some(Color::Rgb(byte(*r)?, byte(*g)?, byte(*b)?)),
        _ => None,
    }
}

/// A parameter's value; empty or unreadable counts as 0, as terminals do.
fn number(param: &str) -> u16 {
    param.parse().unwrap_or(0)
}

const BASIC: [Color; 8] = [
    Color::Black,
    Color::Red,
    Color::Green,
    Color::Yellow,
    Color::Blue,
    Color::Magenta,
    Color::Cyan,
    Color::Gray,
];

const BRIGHT: [Color; 8] = [
    Color::DarkGray,
    Color::LightRed,
    Color::LightGreen,
    Color::LightYellow,
    Color::LightBlue,
    Color::LightMagenta,
    Color::LightCyan,
    Color::White,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> StyledLine {
        parse(s, &mut Style::new())
    }

    #[test]
    fn plain_text_has_no_runs() {
        let l = p("hello world\n");
        assert_eq!(l.text, "hello world");
        assert!(l.runs.is_empty());
    }

    #[test]
    fn sgr_colours_become_styles() {
        let l = p("\x1b[31merror\x1b[0m: \x1b[1;32mok\x1b[m");
        assert_eq!(l.text, "error: ok");
        assert_eq!(
            l.runs,
            vec![
                (0, Style::new().fg(Color::Red)),
                (5, Style::new()),
                (
                    7,
                    Style::new().fg(Color::Green).add_modifier(Modifier::BOLD)
                ),
            ]
        );
    }

    #[test]
    fn extended_colours_in_both_forms() {
        let l = p("\x1b[38;5;196ma\x1b[48;2;1;2;3mb\x1b[38:2::10:20:30mc\x1b[38:5:7md\x1b[39;49me");
        let styles: Vec<Style> = l.runs.iter().map(|r| r.1).collect();
        assert_eq!(styles[0], Style::new().fg(Color::Indexed(196)));
        assert_eq!(
            styles[1],
            Style::new().fg(Color::Indexed(196)).bg(Color::Rgb(1, 2, 3))
        );
        assert_eq!(styles[2].fg, Some(Color::Rgb(10, 20, 30)));
        assert_eq!(styles[3].fg, Some(Color::Indexed(7)));
        assert_eq!(styles[4], Style::new());
        assert_eq!(l.text, "abcde");
    }

    #[test]
    fn bright_and_background_and_attribute_resets() {
        let l = p("\x1b[91;44;4mx\x1b[24;22my");
        assert_eq!(
            l.runs[0].1,
            Style::new()
                .fg(Color::LightRed)
                .bg(Color::Blue)
                .add_modifier(Modifier::UNDERLINED)
        );
        assert_eq!(
            l.runs[1].1,
            Style::new().fg(Color::LightRed).bg(Color::Blue)
        );
    }

    #[test]
    fn other_escapes_are_stripped() {
        let l = p("\x1b[2K\x1b[1Gdone\x1b]8;;http://x\x07link\x1b]8;;\x1b\\ \x1b(B\x1b=end\x07");
        assert_eq!(l.text, "donelink end");
        assert!(l.runs.is_empty());
    }

    #[test]
    fn broken_sequences_do_not_panic() {
        for s in [
            "\x1b",
            "\x1b[",
            "\x1b[38;5",
            "\x1b[38;2;1m",
            "\x1b]unterminated",
            "\x1b[99999999m",
            "\x1b(",
            "a\x1b[38;5;999mb",
        ] {
            let _ = p(s);
        }
        assert_eq!(p("a\x1b[38;5;999mb").text, "ab");
    }

    #[test]
    fn pen_carries_over_lines() {
        let mut pen = Style::new();
        parse("\x1b[33mwarning", &mut pen);
        let next = parse("still yellow\x1b[0m", &mut pen);
        assert_eq!(next.runs, vec![(0, Style::new().fg(Color::Yellow))]);
        assert_eq!(pen, Style::new());
    }

    #[test]
    fn carriage_returns_tabs_and_controls() {
        assert_eq!(p("10%\r100%\r\n").text, "100%");
        assert_eq!(p("a\tb").text, "a       b");
        assert_eq!(p("a\x08b\x00c").text, "abc");
    }

    #[test]
    fn long_lines_are_cut() {
        let l = p(&"x".repeat(MAX_LINE_BYTES * 2));
        assert_eq!(l.text.chars().count(), MAX_LINE_BYTES + 1);
        assert!(l.text.ends_with('…'));
    }

    #[test]
    fn segments_cover_the_line() {
        let l = p("a\x1b[31mbc\x1b[0md");
        let segs: Vec<_> = l.segments().map(|(a, b, _)| (a, b)).collect();
        assert_eq!(segs, vec![(0, 1), (1, 3), (3, 4)]);
        let plain = p("abc");
        assert_eq!(
            plain.segments().map(|(a, b, _)| (a, b)).collect::<Vec<_>>(),
            vec![(0, 3)]
        );
        assert_eq!(StyledLine::default().segments().count(), 1);
    }
}
