//! What the HTTP sinks (webhook, healthcheck) share: their URLs, which carry tokens and so
//! are read from a private file or the environment and shown redacted, and requests retried
//! while a retry may help.

use std::path::Path;
use std::time::Duration;

use bk_core::error::{Error, Result};
use bk_core::private::check_private_file;

/// Attempts per request: a receiver restarting or answering 5xx gets two more chances.
const ATTEMPTS: u32 = 3;
/// The wait before the second attempt; doubled before each next one.
const BACKOFF: Duration = Duration::from_millis(500);
/// No sink may hold a cron job for longer than this per attempt.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The URL a reference names: `@FILE` (a private file) or `env:VAR`. A URL itself is refused
/// without being repeated, since it carries a token that `ps` and logs would show.
pub fn read_url(option: &str, reference: &str) -> Result<String> {
    let (url, from) = if let Some(file) = reference.strip_prefix('@') {
        let path = Path::new(file);
        check_private_file(path, &format!("{option} file"))?;
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {option} file {file}"), e))?;
        (text.trim().to_string(), format!("{option} file {file}"))
    } else if let Some(var) = reference.strip_prefix("env:") {
        let value = std::env::var(var)
            .map_err(|_| Error::config(format!("{option} env:{var}: the environment variable {var} is not set")))?;
        (value.trim().to_string(), format!("{option} env:{var}"))
    } else {
        return Err(Error::usage(format!(
            "{option} takes @FILE or env:VAR, not a URL: a URL on the command line shows its token to anyone running ps"
        )));
    };
    let scheme_ok = url.starts_with("https://") || url.starts_with("http://");
    if !scheme_ok || url.contains(char::is_whitespace) {
        return Err(Error::config(format!("{from}: not one http:// or https:// URL")));
    }
    Ok(url)
}

/// The URL without what may be secret: userinfo, path and query (the token of a Slack hook
/// or a healthcheck lives there).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host = rest[..end].rsplit('@').next().unwrap_or_default();
    let hidden = if rest[end..].trim_start_matches('/').is_empty() {
        ""
    } else {
        "/(redacted)"
    };
    format!("{scheme}://{host}{hidden}")
}

/// How a request went: the last HTTP status, and why it failed if it did (the URL redacted).
pub struct Sent {
    pub status: Option<u16>,
    pub outcome: Result<()>,
}

/// POSTs `body`, retrying what may pass on its own (5xx, a refused connection, a timeout)
/// with a growing wait; a 4xx, or an answer that is not HTTP, will not pass by retrying and
/// is reported at once.
pub fn post(url: &str, content_type: &str, body: &str) -> Sent {
    request(url, |agent| {
        agent.post(url).header("Content-Type", content_type).send(body)
    })
}

/// GETs `url` with `query` appended (its values URL-encoded), retried as `post` does.
pub fn get(url: &str, query: &[(&str, &str)]) -> Sent {
    request(url, |agent| {
        query
            .iter()
            .fold(agent.get(url), |request, (key, value)| request.query(*key, *value))
            .call()
    })
}

fn request(
    url: &str,
    send: impl Fn(&ureq::Agent) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Sent {
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(TIMEOUT))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let target = redact_url(url);
    let mut wait = BACKOFF;
    for attempt in 1..=ATTEMPTS {
        let last = attempt == ATTEMPTS;
        let sent = send(&agent);
        let (status, failure, transient) = match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let ok = (200..300).contains(&status);
                let failure = (!ok).then(|| format!("answered HTTP {status}"));
                (Some(status), failure, status >= 500)
            }
            Err(e) => {
                let transient = matches!(
                    e,
                    ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::Timeout(_)
                );
                let why = match e {
                    ureq::Error::Protocol(_) => format!("answered something that is not HTTP ({e})"),
                    _ => e.to_string(),
                };
                (None, Some(why.replace(url, &target)), transient)
            }
        };
        match failure {
            Some(why) if transient && !last => {
                eprintln!("bk-notify: {target}: {why}; trying again in {wait:?}");
                std::thread::sleep(wait);
                wait *= 2;
            }
            Some(why) => {
                let tries = if attempt > 1 {
                    format!(" (after {attempt} attempts)")
                } else {
                    String::new()
                };
                return Sent {
                    status,
                    outcome: Err(Error::unavailable(format!("{why}{tries}"))),
                };
            }
            None => {
                return Sent {
                    status,
                    outcome: Ok(()),
                }
            }
        }
    }
    unreachable!("the last attempt returns")
}
