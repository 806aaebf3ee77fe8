//! What open pages are told about their service: a new build is live (they reload), or a build
//! failed or is unhealthy (they show an overlay until the next live build). The deployer says
//! it; the proxy's `/.pmesh/events` streams and the script injected into HTML pages listen.
//!
//! A page knows which build it came from by a token written into its script: the generation
//! of the instance that answered it (see [`Upstream`]), so a page served by the old instance
//! just before a swap still reloads once the swap is announced. A generation counts live
//! builds; it moves only when a different build goes live (or a problem was shown), never for a
//! fresh instance of the same build, so a restart does not reload anything.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use super::switch::Upstream;

/// What the pages of a service are told; cheap to clone. Created by the deployer, attached
/// to the service's [`Switch`](super::Switch) when the service reloads pages.
#[derive(Clone)]
pub struct Notices {
    service: String,
    /// Tells every event stream the new state; written only by the deployer's calls below.
    tx: Arc<watch::Sender<State>>,
    /// Set once per process: a page from an earlier run of pmesh-dev has another token even
    /// when its generation number matches, and reloads.
    epoch: u64,
}

/// The state every event stream sends, whole, each time it changes.
#[derive(Clone, Debug, Default)]
pub(super) struct State {
    pub(super) generation: u64,
    /// The build id that went live last.
    live_id: Option<String>,
    pub(super) problem: Option<Problem>,
}

/// A build that failed or an instance that never became healthy, as the overlay shows it.
#[derive(Clone, Debug, Serialize)]
pub(super) struct Problem {
    service: String,
    /// "the build failed", "not healthy", ...
    what: String,
    /// The failed step or the reason, in one line.
    reason: String,
    /// The step's (or the instance's) last lines of output.
    lines: Vec<String>,
}

/// One event's data: the live token and the problem, if any.
#[derive(Serialize)]
struct Message<'a> {
    live: String,
    problem: Option<&'a Problem>,
}

impl Notices {
    /// Notices for `service`: nothing live yet, no problem.
    pub fn new(service: &str) -> Notices {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Notices {
            service: service.to_owned(),
            tx: Arc::new(watch::Sender::new(State::default())),
            epoch,
        }
    }

    /// Build `id` serves from `upstream` now (call it right after the switch points there):
    /// pages reload if it is another build than the last live one, or a problem was shown.
    pub fn live(&self, upstream: &Upstream, id: &str) {
        self.tx.send_modify(|s| {
            if s.live_id.as_deref() != Some(id) || s.problem.is_some() {
                s.generation += 1;
            }
            s.live_id = Some(id.to_owned());
            s.problem = None;
            upstream.set_generation(s.generation);
        });
    }

    /// Shows `what` on open pages with `detail`: its first line is the reason, the lines after
    /// a "; its last lines:" (as builder and supervisor write them) the log.
    pub fn problem(&self, what: &str, detail: &str) {
        let mut lines = detail.lines();
        let first = lines.next().unwrap_or("");
        let reason = first.strip_suffix("; its last lines:").unwrap_or(first);
        let lines = lines
            .map(|l| l.strip_prefix("    ").unwrap_or(l).to_owned())
            .collect();
        let problem = Problem {
            service: self.service.clone(),
            what: what.to_owned(),
            reason: reason.to_owned(),
            lines,
        };
        self.tx.send_modify(|s| s.problem = Some(problem));
    }

    /// The last problem no longer stands (the tree is the live build's again): the overlay
    /// goes, with nothing to reload.
    pub fn recovered(&self) {
        self.tx.send_if_modified(|s| s.problem.take().is_some());
    }

    /// The token of `generation`, as a page's script and the event stream write it.
    pub(super) fn token(&self, generation: u64) -> String {
        format!("{:x}-{generation}", self.epoch)
    }

    /// The token of what is live now (for the proxy's own pages, which no instance served).
    pub(super) fn current_token(&self) -> String {
        self.token(self.tx.borrow().generation)
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<State> {
        self.tx.subscribe()
    }

    /// One server-sent event carrying `state`.
    pub(super) fn event(&self, state: &State) -> String {
        let message = Message {
            live: self.token(state.generation),
            problem: state.problem.as_ref(),
        };
        // Serializing strings and numbers cannot fail; an empty object would be ignored.
        let json = serde_json::to_string(&message).unwrap_or_else(|_| "{}".to_owned());
        format!("data: {json}\n\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generation_moves_for_another_build_or_after_a_problem_only() {
        let n = Notices::new("web");
        let up = Upstream::new("127.0.0.1:1".parse().expect("addr"));
        n.live(&up, "a");
        assert_eq!((n.tx.borrow().generation, up.generation()), (1, 1));
        // A fresh instance of the same build (a restart): nothing to reload.
        let again = Upstream::new("127.0.0.1:2".parse().expect("addr"));
        n.live(&again, "a");
        assert_eq!((n.tx.borrow().generation, again.generation()), (1, 1));
        n.live(&up, "b");
        assert_eq!(n.tx.borrow().generation, 2);
        n.problem(
            "the build failed",
            "step 1 of 1 (`x`) failed; its last lines:\n    <b>\n      y",
        );
        {
            let s = n.tx.borrow();
            let p = s.problem.as_ref().expect("a problem");
            assert_eq!(p.reason, "step 1 of 1 (`x`) failed");
            assert_eq!(p.lines, ["<b>", "  y"]);
            assert_eq!(s.generation, 2, "a problem alone reloads nothing");
        }
        // The same build again, after the problem: the overlay must go, so pages reload.
        n.live(&up, "b");
        assert_eq!(n.tx.borrow().generation, 3);
        assert!(n.tx.borrow().problem.is_none());
    }

    #[test]
    fn an_event_is_one_line_of_json() {
        let n = Notices::new("web");
        n.problem("not healthy", "exited\nline \"one\"\n");
        let event = n.event(&n.tx.borrow());
        assert!(
            event.starts_with("data: {") && event.ends_with("}\n\n"),
            "{event}"
        );
        assert_eq!(event.matches('\n').count(), 2, "{event}");
    }
}
