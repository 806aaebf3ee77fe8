//! The watch's decisions, with no I/O: when a quiet period ends, which tree to build, when to
//! cancel, when to stop rebuilding a service that keeps triggering itself. The loop in
//! `engine/mod.rs` feeds it what happened and carries out what it returns.
//!
//! - The newest tree wins: at most one build runs; a change during it cancels it, and the tree
//!   as it is when that build has stopped is built next.
//! - A tree whose build failed, was unhealthy, or was rolled back from is not built again on
//!   its own until the tree changes (or a build is asked for).
//! - A forced build (the `b` key, `build --force`) builds even what is live.
//! - Builds triggered only by files written while the previous build's steps ran are counted;
//!   after [`LOOP_LIMIT`] in a row rebuilding pauses until something else changes.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use crate::hash::BuildId;

/// Builds in a row triggered only by files written while the previous build ran, after which
/// rebuilding pauses.
pub const LOOP_LIMIT: u32 = 3;

/// What the loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start building `id`, naming what changed.
    Start {
        id: BuildId,
        force: bool,
        changed: Vec<String>,
    },
    /// Cancel the running build (a newer tree, or a forced build, waits for it to stop).
    Cancel,
    /// The tree is the live build's again after a failure: say so (`up_to_date`).
    Recovered { id: BuildId },
    /// Rebuilding paused: builds kept writing these paths into their own tree.
    LoopDetected {
        paths: Vec<String>,
        patterns: Vec<String>,
    },
}

/// How a build ended, as far as decisions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Archived and handed to the deployer, or `.run` held it already.
    Good,
    /// A step failed.
    Failed(BuildId),
    /// Stopped by a cancel; the newer tree is decided on next.
    Cancelled,
    /// The build could not be carried out (a file-system error).
    Error,
}

/// The build that runs.
#[derive(Debug, Clone, Copy)]
struct Building {
    id: BuildId,
    cancelled: bool,
}

/// Detects builds that keep triggering themselves.
#[derive(Debug, Default)]
struct LoopGuard {
    /// Paths events named while the current build's steps ran (relative to the root).
    written_now: BTreeSet<String>,
    /// Those of the previous build.
    written_by_last: BTreeSet<String>,
    /// Builds in a row triggered only by such paths.
    count: u32,
    /// Set while rebuilding is paused.
    paused: bool,
}

/// The decision state of one service's watch.
#[derive(Debug)]
pub struct Core {
    debounce: Duration,
    /// When the pending changes are quiet long enough to be looked at.
    deadline: Option<Instant>,
    building: Option<Building>,
    /// A tree id not to build on its own; see the module's doc.
    skip: Option<BuildId>,
    /// The next build is forced.
    force_next: bool,
    /// Paths changed since the last build started, for `build_started`.
    changed: BTreeSet<String>,
    guard: LoopGuard,
    /// The newest build failed or was unhealthy and nothing has replaced that news yet: once
    /// the tree is back at the live build, that is worth saying.
    failing: bool,
}

impl Core {
    pub fn new(debounce: Duration) -> Core {
        Core {
            debounce,
            deadline: None,
            building: None,
            skip: None,
            force_next: false,
            changed: BTreeSet::new(),
            guard: LoopGuard::default(),
            failing: false,
        }
    }

    /// A change was seen at `now`: the quiet period (re)starts. True for the first change of a
    /// period.
    pub fn touched(&mut self, now: Instant) -> bool {
        let first = self.deadline.is_none();
        self.deadline = Some(now + self.debounce);
        first
    }

    /// When the quiet period ends, if one runs.
    pub fn quiet_at(&self) -> Option<Instant> {
        self.deadline
    }

    /// The quiet period ended and its changes are being looked at.
    pub fn quiet(&mut self) {
        self.deadline = None;
    }

    pub fn is_building(&self) -> bool {
        self.building.is_some()
    }

    /// Paths events named while a build's steps ran: they may be the build's own writes.
    pub fn written_while_building(&mut self, paths: impl IntoIterator<Item = String>) {
        self.guard.written_now.extend(paths);
    }

    /// The tree changed: these paths differ (relative to the root).
    pub fn changed(&mut self, changed: Vec<String>) {
        let guard = &mut self.guard;
        let self_triggered = changed
            .iter()
            .all(|p| guard.written_now.contains(p) || guard.written_by_last.contains(p));
        self.changed.extend(changed);
        if guard.paused {
            // Nothing builds while paused, so whatever changed now came from elsewhere.
            *guard = LoopGuard::default();
        } else if self_triggered {
            guard.count += 1;
        } else {
            guard.count = 0;
        }
    }

    /// The ignore rules were edited: earlier writes no longer say anything.
    pub fn rules_reloaded(&mut self) {
        self.guard = LoopGuard::default();
    }

    /// What to do so that the newest tree (`tree`) ends up live, `live` being what `.run`
    /// holds.
    pub fn decide(&mut self, tree: BuildId, live: Option<BuildId>, stopping: bool) -> Vec<Effect> {
        if let Some(b) = &mut self.building {
            if b.id != tree && !b.cancelled {
                // A newer tree: this build is stale. The next starts once it has stopped.
                b.cancelled = true;
                return vec![Effect::Cancel];
            }
            return Vec::new();
        }
        let force = std::mem::take(&mut self.force_next);
        if stopping {
            return Vec::new();
        }
        if !force && (Some(tree) == live || Some(tree) == self.skip) {
            self.changed.clear();
            if Some(tree) == live && std::mem::take(&mut self.failing) {
                return vec![Effect::Recovered { id: tree }];
            }
            return Vec::new();
        }
        if self.guard.count >= LOOP_LIMIT {
            self.guard.paused = true;
            self.guard.count = 0;
            let paths: Vec<String> = std::mem::take(&mut self.changed).into_iter().collect();
            let patterns = suggest_patterns(&paths);
            return vec![Effect::LoopDetected { paths, patterns }];
        }
        self.guard.written_now.clear();
        self.building = Some(Building {
            id: tree,
            cancelled: false,
        });
        vec![Effect::Start {
            id: tree,
            force,
            changed: std::mem::take(&mut self.changed).into_iter().collect(),
        }]
    }

    /// The running build ended.
    pub fn build_done(&mut self, ended: Ended) {
        self.building = None;
        self.guard.written_by_last = std::mem::take(&mut self.guard.written_now);
        match ended {
            Ended::Good => {
                self.skip = None;
                self.failing = false;
            }
            Ended::Failed(id) => {
                self.skip = Some(id);
                self.failing = true;
            }
            Ended::Cancelled | Ended::Error => {}
        }
    }

    /// The deployer undid build `id`: it never became healthy.
    pub fn unhealthy(&mut self, id: BuildId) {
        self.skip = Some(id);
        self.failing = true;
    }

    /// A build was asked for (`force`: even if `.run` holds it). Returns a cancel when a build
    /// runs that a forced one must replace; otherwise the caller decides.
    pub fn build_requested(&mut self, force: bool) -> Vec<Effect> {
        if force {
            self.force_next = true;
        } else {
            self.skip = None;
        }
        match &mut self.building {
            Some(b) if force && !b.cancelled => {
                b.cancelled = true;
                vec![Effect::Cancel]
            }
            _ => Vec::new(),
        }
    }

    /// `.run` was rolled back while the tree was `tree`: that tree is not rebuilt on its own.
    /// Returns a cancel for a running build, which would flip `.run` away again.
    pub fn rolled_back(&mut self, tree: BuildId) -> Vec<Effect> {
        self.skip = Some(tree);
        self.failing = false;
        match &mut self.building {
            Some(b) if !b.cancelled => {
                b.cancelled = true;
                vec![Effect::Cancel]
            }
            _ => Vec::new(),
        }
    }
}

/// Ignore patterns that would keep `paths` out of the tree: their top directory, or the file.
fn suggest_patterns(paths: &[String]) -> Vec<String> {
    let mut out = BTreeSet::new();
    for p in paths {
        match p.split_once('/') {
            Some((dir, _)) => out.insert(format!("/{dir}/")),
            None => out.insert(format!("/{p}")),
        };
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> BuildId {
        format!("{n:032x}").parse().expect("an id")
    }

    fn started(effects: &[Effect]) -> Option<BuildId> {
        effects.iter().find_map(|e| match e {
            Effect::Start { id, .. } => Some(*id),
            _ => None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_quiet_period_restarts_on_each_change_and_ends_after_the_debounce() {
        let mut core = Core::new(Duration::from_millis(50));
        let t0 = Instant::now();
        assert!(core.touched(t0));
        tokio::time::advance(Duration::from_millis(30)).await;
        assert!(
            !core.touched(Instant::now()),
            "not the first change of the period"
        );
        assert_eq!(core.quiet_at(), Some(t0 + Duration::from_millis(80)));
        tokio::time::sleep_until(core.quiet_at().unwrap()).await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(80));
        core.quiet();
        assert_eq!(core.quiet_at(), None);
        assert!(core.touched(Instant::now()), "a new period");
    }

    #[test]
    fn the_newest_tree_wins_one_build_at_a_time() {
        let mut core = Core::new(Duration::ZERO);
        let fx = core.decide(id(1), None, false);
        assert_eq!(started(&fx), Some(id(1)));
        // The tree changes during the build: cancel it, once.
        assert_eq!(core.decide(id(2), None, false), vec![Effect::Cancel]);
        assert_eq!(core.decide(id(3), None, false), Vec::new());
        core.build_done(Ended::Cancelled);
        assert_eq!(started(&core.decide(id(3), None, false)), Some(id(3)));
        core.build_done(Ended::Good);
        // What is live is not built again.
        assert_eq!(core.decide(id(3), Some(id(3)), false), Vec::new());
        // Nothing starts while stopping.
        assert_eq!(core.decide(id(4), Some(id(3)), true), Vec::new());
    }

    #[test]
    fn a_failed_tree_is_skipped_until_it_changes_and_undoing_the_edit_says_so() {
        let mut core = Core::new(Duration::ZERO);
        core.decide(id(2), Some(id(1)), false);
        core.build_done(Ended::Failed(id(2)));
        assert_eq!(core.decide(id(2), Some(id(1)), false), Vec::new());
        // Back at the live build: the failure no longer stands, said once.
        assert_eq!(
            core.decide(id(1), Some(id(1)), false),
            vec![Effect::Recovered { id: id(1) }]
        );
        assert_eq!(core.decide(id(1), Some(id(1)), false), Vec::new());
        // Same after an unhealthy build.
        assert_eq!(
            started(&core.decide(id(3), Some(id(1)), false)),
            Some(id(3))
        );
        core.build_done(Ended::Good);
        core.unhealthy(id(3));
        assert_eq!(core.decide(id(3), Some(id(1)), false), Vec::new());
        assert_eq!(
            core.decide(id(1), Some(id(1)), false),
            vec![Effect::Recovered { id: id(1) }]
        );
        // An explicit build of a skipped tree builds it.
        core.decide(id(3), Some(id(1)), false);
        assert_eq!(core.build_requested(false), Vec::new());
        assert_eq!(
            started(&core.decide(id(3), Some(id(1)), false)),
            Some(id(3))
        );
    }

    #[test]
    fn a_rollback_skips_the_tree_it_left_and_cancels_a_running_build() {
        let mut core = Core::new(Duration::ZERO);
        core.decide(id(2), Some(id(1)), false);
        assert_eq!(core.rolled_back(id(2)), vec![Effect::Cancel]);
        core.build_done(Ended::Cancelled);
        // `.run` holds 1 now; tree 2 is not rebuilt on its own.
        assert_eq!(core.decide(id(2), Some(id(1)), false), Vec::new());
        // A change resumes building.
        assert_eq!(
            started(&core.decide(id(5), Some(id(1)), false)),
            Some(id(5))
        );
    }

    #[test]
    fn a_forced_build_builds_what_is_live_and_replaces_a_running_build() {
        let mut core = Core::new(Duration::ZERO);
        assert_eq!(core.build_requested(true), Vec::new());
        let fx = core.decide(id(1), Some(id(1)), false);
        assert!(
            matches!(fx.as_slice(), [Effect::Start { force: true, .. }]),
            "{fx:?}"
        );
        assert_eq!(core.build_requested(true), vec![Effect::Cancel]);
        core.build_done(Ended::Cancelled);
        let fx = core.decide(id(1), Some(id(1)), false);
        assert!(
            matches!(fx.as_slice(), [Effect::Start { force: true, .. }]),
            "{fx:?}"
        );
        core.build_done(Ended::Good);
        // Forced once only.
        assert_eq!(core.decide(id(1), Some(id(1)), false), Vec::new());
    }

    #[test]
    fn builds_that_trigger_themselves_pause_until_something_else_changes() {
        let mut core = Core::new(Duration::ZERO);
        let mut live = None;
        for n in 1..=LOOP_LIMIT as u8 + 1 {
            let fx = core.decide(id(n), live, false);
            if n <= LOOP_LIMIT as u8 {
                assert_eq!(started(&fx), Some(id(n)), "build {n}");
            } else {
                assert_eq!(
                    fx,
                    vec![Effect::LoopDetected {
                        paths: vec!["out/gen.txt".to_owned()],
                        patterns: vec!["/out/".to_owned()],
                    }]
                );
                break;
            }
            // The build writes into its own tree while its steps run.
            core.written_while_building(["out/gen.txt".to_owned()]);
            core.build_done(Ended::Good);
            live = Some(id(n));
            core.changed(vec!["out/gen.txt".to_owned()]);
        }
        // Paused: nothing builds, so the next change came from elsewhere and resumes.
        core.changed(vec!["src/main.rs".to_owned()]);
        assert_eq!(started(&core.decide(id(9), live, false)), Some(id(9)));
    }
}
