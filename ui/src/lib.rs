//! The terminal UI of pmesh-dev, as a pure state machine: `Msg`s from the terminal and the
//! engine go into `update`, which changes the `Model` and returns `Command`s for the engine;
//! `&Model` is a ratatui `Widget` that draws the whole screen, borrowing the model.
//!
//! Nothing here does I/O or reads the clock or the environment. The glue (`src/tui.rs`):
//! - sends `Msg::Resize` once at start (the model assumes 80x24 until then) and on every
//!   resize, so that paging matches the screen;
//! - sends `Msg::Now` about once a minute and with engine messages (ages and uptimes show
//!   minutes, so an idle screen needs no redraw in between);
//! - re-sends `Msg::Builds` after builds and rollbacks, and answers `Command::LoadLog` with
//!   `Msg::BuildLog`;
//! - draws only when `Model::needs_redraw`, then calls `Model::drawn`;
//! - decides colour: `Model::new(services, false)` for `NO_COLOR` draws with no colour at all.
//!
//! Behaviour worth knowing:
//! - One table, `KEYS`, drives the key handling, the status line and the help screen.
//! - The log pane follows the end of the log until the user scrolls up; scrolling back to the
//!   end (or `End`, or `f`) follows again. A new build replaces an opened build log only while
//!   the pane follows.
//! - `/` searches the log shown, smart case (ASCII case is ignored unless the query has an
//!   upper-case letter). Enter jumps to the last match at or above the bottom of the pane (the
//!   newest one when following); `n` goes down, `N` up, both wrapping.
//! - Each log keeps its last `MAX_LOG_LINES` lines, each line at most 4 KiB. SGR colours
//!   (`ESC [ ... m`, 16, 256 and RGB colours, bold, underline, ...) become styles, carried
//!   from line to line as in a terminal; every other escape sequence is dropped, and a carriage
//!   return keeps only the text after it (progress bars).
//! - Lines are cut at the pane's width, not wrapped.

mod ansi;
mod format;
mod keys;
mod layout;
mod log;
mod model;
mod update;
mod view;

#[cfg(test)]
mod tests;

pub use keys::{Action, KEYS, KeyBinding, Pane, binding_for};
pub use log::MAX_LOG_LINES;
pub use model::{BuildRow, Command, EngineEvent, Model, Msg, ServiceState};
pub use update::update;
