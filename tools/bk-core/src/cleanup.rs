//! What to undo if a run is interrupted by SIGINT or SIGTERM: a scratch database to drop, a
//! scratch directory to remove, child programs to stop. Work registers an action and gets a
//! guard; dropping the guard runs the action (the normal path). A signal runs every pending
//! action instead, stops the tracked children first, and exits 128 + the signal's number.

use std::collections::BTreeMap;
use std::sync::{Mutex, Once};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

type Action = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Pending {
    next: u64,
    actions: BTreeMap<u64, Action>,
    children: BTreeMap<u64, u32>,
}

static PENDING: Mutex<Option<Pending>> = Mutex::new(None);
static INSTALL: Once = Once::new();

fn with_pending<T>(f: impl FnOnce(&mut Pending) -> T) -> T {
    let mut guard = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Pending::default))
}

/// Starts watching for SIGINT and SIGTERM (once per process).
pub fn install(tool: &str) {
    let tool = tool.to_string();
    INSTALL.call_once(|| {
        let Ok(mut signals) = Signals::new([SIGINT, SIGTERM]) else {
            return;
        };
        std::thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let (children, actions) =
                    with_pending(|p| (std::mem::take(&mut p.children), std::mem::take(&mut p.actions)));
                for pid in children.values() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::SIGTERM);
                }
                let undone = actions.len();
                for (_, action) in actions.into_iter().rev() {
                    action();
                }
                eprintln!("{tool}: interrupted by signal {signal}; undid {undone} piece(s) of unfinished work");
                std::process::exit(128 + signal);
            }
        });
    });
}

/// Runs its action when dropped, unless a signal ran it first.
pub struct Guard(u64);

/// Registers `action` to run when the guard is dropped, or on SIGINT/SIGTERM.
pub fn on_exit(action: impl FnOnce() + Send + 'static) -> Guard {
    Guard(with_pending(|p| {
        p.next += 1;
        p.actions.insert(p.next, Box::new(action));
        p.next
    }))
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(action) = with_pending(|p| p.actions.remove(&self.0)) {
            action();
        }
    }
}

/// A child program to stop on a signal, for as long as the guard lives.
pub struct ChildGuard(u64);

pub fn track_child(pid: u32) -> ChildGuard {
    ChildGuard(with_pending(|p| {
        p.next += 1;
        p.children.insert(p.next, pid);
        p.next
    }))
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        with_pending(|p| p.children.remove(&self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn dropping_the_guard_runs_the_action_once() {
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let guard = on_exit(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        drop(guard);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
