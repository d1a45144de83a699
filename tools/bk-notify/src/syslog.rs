//! --syslog: every record to the local log, one datagram each, facility user (as `logger`'s,
//! which it replaces): a record that says the backup failed at priority err, the others at
//! info. The message is the record's JSON line as it came, so that what `| logger -t bk`
//! logged before is logged still, and `journalctl -t bk -o cat | jq` reads it.
//!
//! On /dev/log (or a PATH) it speaks the format syslog(3) writes there,
//! `<PRI>Mmm dd hh:mm:ss TAG[PID]: MSG`, the one every local daemon parses: journald and
//! rsyslog's default socket parser take an RFC 5424 header on /dev/log for message text
//! (systemd issue 19251, rsyslog issue 4749), and the tag would be lost. On journald's own
//! socket (`journal:PATH`, and the default when there is no /dev/log) it speaks journald's
//! native protocol: KEY=VALUE lines.

use std::io::ErrorKind;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use bk_core::error::{Error, Result};
use bk_core::record::{Input, Output};

const DEV_LOG: &str = "/dev/log";
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Facility user, as `logger`'s.
const FACILITY: u8 = 1;
const ERR: u8 = 3;
const INFO: u8 = 6;
/// The longest message sent: rsyslog keeps 8 KiB by default anyway, and a datagram much
/// longer would be refused; a longer record (a dump of thousands of tables) is cut.
const MAX_MESSAGE: usize = 64 << 10;

/// The tag: what `journalctl -t` and syslog filters match. Printable ASCII without blanks,
/// `[` or `:` (which end a tag), at most 48 characters (RFC 5424's APP-NAME).
pub fn parse_tag(tag: &str) -> std::result::Result<String, String> {
    let ok = !tag.is_empty() && tag.len() <= 48 && tag.bytes().all(|b| b.is_ascii_graphic() && b != b'[' && b != b':');
    if ok {
        Ok(tag.to_string())
    } else {
        Err("a tag is 1 to 48 printable ASCII characters without blanks, '[' or ':'".to_string())
    }
}

/// How a socket is spoken to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// syslog(3)'s format, on /dev/log.
    Syslog,
    /// journald's native protocol, on its socket.
    Journal,
}

/// The socket and its protocol: `--syslog-socket PATH` or `journal:PATH`, else /dev/log,
/// else journald's socket when only it exists (a container, a host without a syslog
/// daemon), else /dev/log, whose absence the sending then reports.
fn socket(given: Option<&str>) -> (String, Protocol) {
    match given {
        Some(given) => match given.strip_prefix("journal:") {
            Some(path) => (path.to_string(), Protocol::Journal),
            None => (given.to_string(), Protocol::Syslog),
        },
        None if !Path::new(DEV_LOG).exists() && Path::new(JOURNAL_SOCKET).exists() => {
            (JOURNAL_SOCKET.to_string(), Protocol::Journal)
        }
        None => (DEV_LOG.to_string(), Protocol::Syslog),
    }
}

/// The syslog sink: each record is sent as it comes (a pipeline killed later has logged what
/// it did so far), and the first failure stops the sending and is reported at the end.
pub struct Syslog {
    tag: String,
    path: String,
    protocol: Protocol,
    socket: Result<UnixDatagram>,
    pid: u32,
}

impl Syslog {
    pub fn new(tag: &str, socket_option: Option<&str>) -> Self {
        let (path, protocol) = socket(socket_option);
        let socket = UnixDatagram::unbound().map_err(|e| Error::io("opening a datagram socket", e));
        Syslog {
            tag: tag.to_string(),
            path,
            protocol,
            socket,
            pid: std::process::id(),
        }
    }

    /// Sends one record, unless an earlier one failed.
    pub fn log(&mut self, input: &Input) {
        let Ok(socket) = &self.socket else { return };
        let severity = if crate::failed(input) { ERR } else { INFO };
        let message = cut(&input.line);
        let tag = &self.tag;
        let datagram = match self.protocol {
            Protocol::Syslog => {
                let time = chrono::Local::now().format("%b %e %H:%M:%S");
                format!("<{}>{time} {tag}[{}]: {message}", FACILITY * 8 + severity, self.pid)
            }
            Protocol::Journal => [
                ("PRIORITY", severity.to_string()),
                ("SYSLOG_FACILITY", FACILITY.to_string()),
                ("SYSLOG_IDENTIFIER", tag.to_string()),
                ("MESSAGE", message.to_string()),
            ]
            .iter()
            .map(|(key, value)| format!("{key}={value}\n"))
            .collect(),
        };
        if let Err(e) = socket.send_to(datagram.as_bytes(), &self.path) {
            self.socket = Err(match e.kind() {
                ErrorKind::NotFound => Error::unavailable("no such socket: is a syslog daemon or journald running?"),
                _ => Error::io("sending", e),
            });
        }
    }

    /// Prints the `notified` record, and the failure if there was one.
    pub fn finish(self, failed: bool, out: &mut Output) -> Result<()> {
        let outcome = self.socket.map(|_| ());
        crate::sink::finish(out, "syslog", &self.path, None, outcome, failed)
    }
}

/// The line, cut to [`MAX_MESSAGE`] bytes at a character boundary. A record line has no
/// line feed (JSON escapes it), so it is one journald value as is.
fn cut(line: &str) -> std::borrow::Cow<'_, str> {
    if line.len() <= MAX_MESSAGE {
        return line.into();
    }
    let end = (0..=MAX_MESSAGE).rev().find(|&i| line.is_char_boundary(i)).unwrap_or(0);
    format!("{} (cut at {MAX_MESSAGE} bytes)", &line[..end]).into()
}
