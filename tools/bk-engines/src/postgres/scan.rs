//! A streaming scanner of PostgreSQL SQL scripts (pg_dump's plain format, or what
//! `pg_restore -f -` prints of a custom archive): counts the rows of every COPY block, per
//! table, and sees the completion comment. Only the start of each line is held.

use std::collections::BTreeMap;

const LINE_HEAD: usize = 4096;

#[derive(Debug)]
pub struct CopyScanner {
    /// The completion comment, e.g. `-- PostgreSQL database dump complete`.
    marker: &'static str,
    complete: bool,
    line: Vec<u8>,
    /// True while the current line is longer than what is held.
    truncated: bool,
    copying: Option<String>,
    counts: BTreeMap<String, u64>,
}

impl CopyScanner {
    pub fn new(marker: &'static str) -> Self {
        CopyScanner {
            marker,
            complete: false,
            line: Vec::new(),
            truncated: false,
            copying: None,
            counts: BTreeMap::new(),
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < LINE_HEAD {
                self.line.push(b);
            } else {
                self.truncated = true;
            }
        }
    }

    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }

    /// True when the completion comment came, and after it only what pg_dump writes there.
    pub fn complete(&self) -> bool {
        self.complete && trailer(&self.line)
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let truncated = std::mem::take(&mut self.truncated);
        if let Some(table) = &self.copying {
            if line == b"\\." && !truncated {
                self.copying = None;
            } else {
                *self.counts.get_mut(table).expect("entered when copying starts") += 1;
            }
        } else if !truncated && line.starts_with(b"COPY ") && line.ends_with(b" FROM stdin;") {
            if let Some(table) = copy_target(&String::from_utf8_lossy(&line[5..])) {
                self.counts.entry(table.clone()).or_insert(0);
                self.copying = Some(table);
            }
        }
        if line.starts_with(self.marker.as_bytes()) {
            self.complete = true;
        } else if !trailer(&line) {
            self.complete = false;
        }
    }
}

/// Lines pg_dump writes after its completion comment: blank, `--`, and (since 15.14) the
/// `\unrestrict KEY` closing its `\restrict` guard.
fn trailer(line: &[u8]) -> bool {
    line.is_empty() || line == b"--" || line.starts_with(b"\\unrestrict ")
}

/// `schema.table` of `COPY schema.table (cols) FROM stdin;`, identifiers unquoted.
fn copy_target(rest: &str) -> Option<String> {
    let (schema, rest) = identifier(rest)?;
    let (table, _) = identifier(rest.strip_prefix('.')?)?;
    Some(format!("{schema}.{table}"))
}

/// One identifier, quoted ("a ""b""") or not, and what follows it.
fn identifier(text: &str) -> Option<(String, &str)> {
    if let Some(quoted) = text.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '"' {
                if chars.peek().map(|(_, c)| *c) == Some('"') {
                    chars.next();
                    name.push('"');
                    continue;
                }
                return Some((name, &quoted[i + 1..]));
            }
            name.push(c);
        }
        None
    } else {
        let end = text.find(['.', ' ', '(']).unwrap_or(text.len());
        (end > 0).then(|| (text[..end].to_string(), &text[end..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_copy_rows_per_table() {
        let script = "SET x = 1;\nCOPY public.t (id, b) FROM stdin;\n1\t\\\\x00ff\n2\tline\\nbreak\n\\.\n\nCOPY s2.\"Odd \"\"Name\"\"\" (v) FROM stdin;\n\\.\nCOPY public.p_2024 (x) FROM stdin;\n7\n\\.\n\n--\n-- PostgreSQL database dump complete\n--\n\n\\unrestrict abc\n\n";
        let mut s = CopyScanner::new("-- PostgreSQL database dump complete");
        for chunk in script.as_bytes().chunks(4) {
            s.feed(chunk);
        }
        let expected: BTreeMap<String, u64> = [("public.t", 2), ("s2.Odd \"Name\"", 0), ("public.p_2024", 1)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        assert_eq!(s.counts(), &expected);
        assert!(s.complete());
        let mut cut = CopyScanner::new("-- PostgreSQL database dump complete");
        cut.feed(b"COPY public.t (id) FROM stdin;\n1\n");
        assert!(!cut.complete());
    }

    proptest::proptest! {
        /// Whatever the bytes, the COPY scanner never panics and counts the same however
        /// the stream is cut into reads.
        #[test]
        fn any_script_scans_the_same_in_any_chunks(
            pieces in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("COPY public.t (id) FROM stdin;\n".to_string()),
                    proptest::strategy::Just("COPY \"a\"\"b\".\"c\" (x) FROM stdin;\n".to_string()),
                    proptest::strategy::Just("1\tx\\ty\n".to_string()),
                    proptest::strategy::Just("\\.\n".to_string()),
                    proptest::strategy::Just("-- PostgreSQL database dump complete\n".to_string()),
                    proptest::strategy::Just("\n".to_string()),
                    "\\PC{0,12}",
                ],
                0..40,
            ),
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            cut in 1usize..17,
        ) {
            let mut bytes = pieces.concat().into_bytes();
            bytes.extend(noise);
            let marker = "-- PostgreSQL database dump complete";
            let mut whole = CopyScanner::new(marker);
            whole.feed(&bytes);
            let mut chunked = CopyScanner::new(marker);
            for chunk in bytes.chunks(cut) {
                chunked.feed(chunk);
            }
            proptest::prop_assert_eq!(whole.counts(), chunked.counts());
            proptest::prop_assert_eq!(whole.complete(), chunked.complete());
        }
    }
}
