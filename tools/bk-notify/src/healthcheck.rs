//! The healthcheck sink. Healthchecks' push protocol: `URL/start` when the job starts, then
//! `URL` on success or `URL/fail` on failure. Uptime Kuma's push monitors (a URL whose path
//! holds `/api/push/`) have one URL and no start: `URL?status=up|down&msg=...`. Either monitor
//! alerts when the final ping does not come in time, so it also catches the job that never
//! ran or was killed.

use std::thread::JoinHandle;

use crate::http::{get, post, redact_url, Sent};

const TEXT: &str = "text/plain; charset=utf-8";
/// The longest `msg` sent to Uptime Kuma, which shows it in a one-line list.
const KUMA_MESSAGE: usize = 250;

pub struct Healthcheck {
    url: String,
    protocol: Protocol,
    /// The start ping, sent in the background so that no record waits for it.
    start: Option<JoinHandle<Sent>>,
}

impl Healthcheck {
    pub fn new(url: String) -> Self {
        let protocol = if url.contains("/api/push/") {
            Protocol::UptimeKuma
        } else {
            Protocol::Healthchecks
        };
        Healthcheck {
            url,
            protocol,
            start: None,
        }
    }

    /// Where the pings go, as shown.
    pub fn target(&self) -> String {
        redact_url(&self.url)
    }

    /// Sends the start ping (the monitor then shows the job running and times it), once.
    pub fn start(&mut self) {
        if self.start.is_none() && self.protocol == Protocol::Healthchecks {
            let url = ping_url(&self.url, "/start");
            self.start = Some(std::thread::spawn(move || post(&url, TEXT, "")));
        }
    }

    /// Sends the final ping with `summary` as its body, after the start ping has gone: a
    /// monitor that got them the other way round would show the job still running. A start
    /// ping that failed is only a warning; the final ping is the one that matters.
    pub fn finish(mut self, failed: bool, summary: &str) -> Sent {
        if let Some(start) = self.start.take() {
            let sent = start.join().expect("the start ping does not panic");
            if let Err(e) = sent.outcome {
                eprintln!(
                    "bk-notify: warning: healthcheck {}: start ping: {}",
                    self.target(),
                    e.message
                );
            }
        }
        match self.protocol {
            Protocol::Healthchecks => post(&ping_url(&self.url, if failed { "/fail" } else { "" }), TEXT, summary),
            Protocol::UptimeKuma => {
                // The URL Uptime Kuma shows ends in its own `?status=up&msg=OK&ping=`.
                let base = self.url.split(['?', '#']).next().unwrap_or_default();
                let status = if failed { "down" } else { "up" };
                get(
                    base,
                    &[("status", status), ("msg", &kuma_message(summary)), ("ping", "")],
                )
            }
        }
    }
}

/// Which push protocol the monitor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Healthchecks,
    UptimeKuma,
}

/// The summary on one line (its first, which names a failure first), cut on a character
/// boundary.
fn kuma_message(summary: &str) -> String {
    let first = summary.lines().next().unwrap_or_default();
    let more = if summary.lines().nth(1).is_some() { " ..." } else { "" };
    let cut: String = first.chars().take(KUMA_MESSAGE).collect();
    format!("{cut}{more}")
}

/// The URL of a ping: `suffix` appended to the path, before any query
/// (`https://hc-ping.com/KEY/backup/fail?create=1`).
fn ping_url(url: &str, suffix: &str) -> String {
    let (path, query) = match url.find(['?', '#']) {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    format!("{}{suffix}{query}", path.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::ping_url;

    #[test]
    fn pings_append_to_the_path_before_the_query() {
        for (url, suffix, ping) in [
            ("https://hc-ping.com/uuid", "/start", "https://hc-ping.com/uuid/start"),
            ("https://hc-ping.com/uuid/", "/fail", "https://hc-ping.com/uuid/fail"),
            ("https://hc-ping.com/uuid/", "", "https://hc-ping.com/uuid"),
            (
                "https://hc.example/ping/key/db?create=1",
                "/fail",
                "https://hc.example/ping/key/db/fail?create=1",
            ),
        ] {
            assert_eq!(ping_url(url, suffix), ping, "{url} {suffix:?}");
        }
    }
}
