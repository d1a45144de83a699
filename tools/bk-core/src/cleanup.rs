//! What to undo if a run is interrupted by SIGINT, SIGTERM or SIGHUP, or a bug panics: a
//! scratch database to drop, a scratch directory to remove, child programs to stop. Work
//! registers an action and gets a guard; dropping the guard runs the action (the normal
//! path). A signal runs every pending action instead, stops the tracked children first,
//! prints an `error` record (so that the pipeline fails, SPEC §1) and exits 128 + the
//! signal's number; a panic does the same and exits 70.
//! Meanwhile the interrupted work, which sees its children die, must not finish the run
//! its own way (an error record, another exit status): the first guard it drops after the
//! signal holds it until the process exits.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
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
/// Set when a signal arrived: the process is undoing its work and about to exit.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static SIGNAL_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Once a signal arrived, any thread but the signal's own waits here for the exit.
fn hold_if_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) && !SIGNAL_THREAD.with(Cell::get) {
        loop {
            std::thread::park();
        }
    }
}

fn with_pending<T>(f: impl FnOnce(&mut Pending) -> T) -> T {
    let mut guard = PENDING.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Pending::default))
}

/// Starts watching for SIGINT, SIGTERM and SIGHUP, and turns panics into error records
/// (once per process).
pub fn install(tool: &str) {
    let tool = tool.to_string();
    INSTALL.call_once(|| {
        let panic_tool = tool.clone();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let what = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("a panic");
            let at = info.location().map(|l| format!(" at {l}")).unwrap_or_default();
            let message = format!("internal error (a bug in bk, please report it): {what}{at}");
            abort_run(&panic_tool, &message, crate::Kind::Internal.exit_code());
        }));
        let Ok(mut signals) = Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        std::thread::spawn(move || {
            SIGNAL_THREAD.with(|t| t.set(true));
            if let Some(signal) = signals.forever().next() {
                let code = u8::try_from(128 + signal).unwrap_or(u8::MAX);
                abort_run(&tool, &format!("interrupted by signal {signal}"), code);
            }
        });
    });
}

/// Ends the process now: stops the children, runs every pending action, says why on stderr
/// and in an `error` record on stdout, and exits with `code`.
fn abort_run(tool: &str, why: &str, code: u8) -> ! {
    // try_lock: a panic may come from a thread that holds the lock.
    let taken = PENDING.try_lock().ok().map(|mut guard| {
        // Under the lock: whatever registers later sees the flag instead.
        INTERRUPTED.store(true, Ordering::SeqCst);
        let p = guard.get_or_insert_with(Pending::default);
        (std::mem::take(&mut p.children), std::mem::take(&mut p.actions))
    });
    INTERRUPTED.store(true, Ordering::SeqCst);
    let (children, actions) = taken.unwrap_or_default();
    for pid in children.values() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::SIGTERM);
    }
    let undone = actions.len();
    for (_, action) in actions.into_iter().rev() {
        action();
    }
    let message = crate::error::redact(&format!("{why}; undid {undone} piece(s) of unfinished work"));
    eprintln!("{tool}: {message}");
    let record = crate::record::Record::Error(crate::record::ErrorRecord {
        tool: tool.to_string(),
        name: None,
        code,
        message,
    });
    // Straight to fd 1, not through the stdout lock, which a thread blocked on a full pipe
    // may hold. The leading newline ends any line cut in the middle: a reader then sees a
    // malformed line or this record, and fails either way.
    let line = format!("\n{}\n", record.to_line());
    let _ = nix::unistd::write(std::io::stdout(), line.as_bytes());
    std::process::exit(code.into());
}

/// Runs its action when dropped, unless a signal ran it first.
pub struct Guard(u64);

/// Registers `action` to run when the guard is dropped, or on SIGINT/SIGTERM.
pub fn on_exit(action: impl FnOnce() + Send + 'static) -> Guard {
    let action: Action = Box::new(action);
    let registered = with_pending(|p| {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(action);
        }
        p.next += 1;
        p.actions.insert(p.next, action);
        Ok(p.next)
    });
    match registered {
        Ok(id) => Guard(id),
        Err(action) => {
            // Too late: the signal's cleanup already ran.
            action();
            hold_if_interrupted();
            Guard(0)
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        hold_if_interrupted();
        if let Some(action) = with_pending(|p| p.actions.remove(&self.0)) {
            action();
        }
    }
}

/// A child program to stop on a signal, for as long as the guard lives.
pub struct ChildGuard(u64);

pub fn track_child(pid: u32) -> ChildGuard {
    let tracked = with_pending(|p| {
        if INTERRUPTED.load(Ordering::SeqCst) {
            return None;
        }
        p.next += 1;
        p.children.insert(p.next, pid);
        Some(p.next)
    });
    match tracked {
        Some(id) => ChildGuard(id),
        None => {
            // Started as the signal came: stopped like the others.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGTERM);
            hold_if_interrupted();
            ChildGuard(0)
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // The child was stopped by the signal: its failure is no news to report.
        hold_if_interrupted();
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
