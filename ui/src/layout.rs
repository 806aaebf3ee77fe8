//! Where each pane goes. `update` uses the same layout as the view to know a page's height.

use ratatui::layout::Rect;

use crate::keys::Pane;
use crate::model::Model;

/// The areas of the screen; a pane that does not fit is `None`. Each pane's first row is its
/// title bar, except the one-row services summary of a small screen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Areas {
    pub services: Option<Rect>,
    /// The services pane is one row showing only the selected service, without a title.
    pub services_compact: bool,
    pub builds: Option<Rect>,
    pub log: Option<Rect>,
    pub status: Option<Rect>,
}

/// Rows of a body at least this tall hold all three panes in full.
const FULL: u16 = 12;
/// Rows of a body at least this tall hold a summary row, the builds and the log.
const COMPACT: u16 = 5;

/// Lays out `area` for `services` services, `builds` builds of the selected one and `focus`.
pub(crate) fn layout(area: Rect, services: usize, builds: usize, focus: Pane) -> Areas {
    let mut areas = Areas::default();
    if area.is_empty() {
        return areas;
    }
    let body = area.height - 1;
    areas.status = Some(Rect::new(area.x, area.y + body, area.width, 1));
    let row = |y: u16, height: u16| Rect::new(area.x, area.y + y, area.width, height);
    let count = |n: usize, max: u16| u16::try_from(n).unwrap_or(max).clamp(1, max);
    if body >= FULL {
        let services = 1 + count(services, 4);
        let builds = (1 + count(builds, 6)).min(body - services - 4);
        areas.services = Some(row(0, services));
        areas.builds = Some(row(services, builds));
        areas.log = Some(row(services + builds, body - services - builds));
    } else if body >= COMPACT {
        let builds = (1 + count(builds, 2)).min(body - 3);
        areas.services = Some(row(0, 1));
        areas.services_compact = true;
        areas.builds = Some(row(1, builds));
        areas.log = Some(row(1 + builds, body - 1 - builds));
    } else if body > 0 {
        let whole = Some(row(0, body));
        match focus {
            Pane::Services => areas.services = whole,
            Pane::Builds => areas.builds = whole,
            Pane::Log => areas.log = whole,
        }
    }
    areas
}

impl Model {
    pub(crate) fn areas(&self) -> Areas {
        let builds = self.service().map_or(0, |s| s.builds.len());
        let area = Rect::new(0, 0, self.width, self.height);
        layout(area, self.services.len(), builds, self.focus)
    }

    /// The rows of content `pane` has (at least 1, so paging always moves).
    pub(crate) fn rows(&self, pane: Pane) -> usize {
        let areas = self.areas();
        let (rect, title) = match pane {
            Pane::Services => (areas.services, !areas.services_compact),
            Pane::Builds => (areas.builds, true),
            Pane::Log => (areas.log, true),
        };
        let height = rect.map_or(0, |r| r.height - u16::from(title));
        usize::from(height.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(w: u16, h: u16) -> Areas {
        layout(Rect::new(0, 0, w, h), 1, 3, Pane::Builds)
    }

    #[test]
    fn standard_terminal_has_every_pane() {
        let a = full(80, 24);
        assert_eq!(a.services, Some(Rect::new(0, 0, 80, 2)));
        assert_eq!(a.builds, Some(Rect::new(0, 2, 80, 4)));
        assert_eq!(a.log, Some(Rect::new(0, 6, 80, 17)));
        assert_eq!(a.status, Some(Rect::new(0, 23, 80, 1)));
    }

    #[test]
    fn small_terminals_drop_panes_but_keep_the_focused_one() {
        let a = full(40, 10);
        assert!(a.services_compact);
        assert_eq!(a.log.map(|r| r.height), Some(5));
        let tiny = layout(Rect::new(0, 0, 20, 3), 1, 3, Pane::Log);
        assert_eq!(tiny.log, Some(Rect::new(0, 0, 20, 2)));
        assert_eq!((tiny.services, tiny.builds), (None, None));
        assert_eq!(full(1, 1).status, Some(Rect::new(0, 0, 1, 1)));
        assert_eq!(full(0, 0), Areas::default());
        assert_eq!(full(5, 0), Areas::default());
    }

    #[test]
    fn every_size_fits_inside_the_screen() {
        for w in 0..30 {
            for h in 0..30 {
                for focus in [Pane::Services, Pane::Builds, Pane::Log] {
                    let area = Rect::new(0, 0, w, h);
                    let a = layout(area, 9, 9, focus);
                    for r in [a.services, a.builds, a.log, a.status]
                        .into_iter()
                        .flatten()
                    {
                        assert_eq!(area.intersection(r), r, "{w}x{h}");
                        assert!(r.height > 0);
                    }
                }
            }
        }
    }
}
