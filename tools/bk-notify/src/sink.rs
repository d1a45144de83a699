//! What every sink does when it is done: a `notified` record, and its failure said without
//! hiding the backup's own.

use serde_json::Map;

use bk_core::error::{Error, Result};
use bk_core::record::{Output, Record};

/// Prints the sink's `notified` record and, if it failed, an error record. A failed sink is
/// exit 69 whatever went wrong in it (a receiver down, a file that cannot be written): 69
/// says "only the notification failed". When the backup failed too (`failed`), the exit
/// status stays the backup's (1).
pub fn finish(
    out: &mut Output,
    sink: &str,
    target: &str,
    status: Option<u16>,
    outcome: Result<()>,
    failed: bool,
) -> Result<()> {
    let mut notified = Map::new();
    notified.insert("sink".into(), sink.into());
    notified.insert("target".into(), target.into());
    notified.insert("status".into(), status.into());
    notified.insert("ok".into(), outcome.is_ok().into());
    out.emit(&Record::Notified(notified))?;
    if let Err(e) = outcome {
        let e = Error::unavailable(format!("{sink} {target}: {}", e.message));
        if failed {
            out.report(&e)?;
        } else {
            out.error(&e)?;
        }
    }
    Ok(())
}
