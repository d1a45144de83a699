//! Progress on stderr for long work: bytes and rate, redrawn in place, only on a TTY.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

const REDRAW_EVERY: Duration = Duration::from_millis(200);

pub struct Progress {
    label: String,
    enabled: bool,
    start: Instant,
    last_draw: Instant,
    bytes: u64,
}

impl Progress {
    /// Shown when stderr is a terminal and the user did not ask for quiet.
    pub fn new(label: impl Into<String>, quiet: bool) -> Self {
        let now = Instant::now();
        Progress {
            label: label.into(),
            enabled: !quiet && std::io::stderr().is_terminal(),
            start: now,
            last_draw: now,
            bytes: 0,
        }
    }

    pub fn hidden() -> Self {
        let mut p = Self::new("", true);
        p.enabled = false;
        p
    }

    pub fn add(&mut self, n: u64) {
        self.bytes += n;
        if self.enabled && self.last_draw.elapsed() >= REDRAW_EVERY {
            self.last_draw = Instant::now();
            self.draw("");
        }
    }

    /// Draws the final figures and ends the line.
    pub fn finish(&mut self) {
        if self.enabled {
            self.draw("\n");
            self.enabled = false;
        }
    }

    fn draw(&self, end: &str) {
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let line = format!(
            "\r\x1b[K{}: {} at {}/s{end}",
            self.label,
            human_bytes(self.bytes),
            human_bytes((self.bytes as f64 / secs) as u64)
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// 1536 -> "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn bytes_read_like_a_human_wrote_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }
}
