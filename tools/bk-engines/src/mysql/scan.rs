//! A streaming scanner of mysqldump / mariadb-dump output: counts the rows each INSERT
//! adds, per table, and sees the completion marker, while the bytes pass. It keeps a few
//! bytes of state, whatever the size of the dump or of one statement.

use std::collections::BTreeMap;

/// What may follow a `-- ` comment at the start of the dump's last line.
const COMPLETION_MARKER: &[u8] = b"-- Dump completed";
/// Bytes that matter inside a row, outside strings: everything else is skipped in bulk.
static IN_ROW_STOPS: [bool; 256] = {
    let mut stops = [false; 256];
    let special = b"()'\"`-/#\n";
    let mut i = 0;
    while i < special.len() {
        stops[special[i] as usize] = true;
        i += 1;
    }
    stops
};
/// The start of a statement kept to classify it (`INSERT INTO `name` VALUES`).
const HEAD_LIMIT: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Code,
    Quoted(u8),
    Escaped(u8),
    LineComment,
    BlockComment,
    BlockCommentStar,
    /// A `DELIMITER xyz` client command, read to the end of its line.
    Delimiter,
}

#[derive(Debug)]
pub struct SqlScanner {
    database: String,
    state: State,
    /// The statement so far, outside strings and comments, lower-cased, capped.
    head: Vec<u8>,
    depth: u32,
    /// The table this INSERT fills, once VALUES was seen.
    inserting: Option<String>,
    delimiter: Vec<u8>,
    matched: usize,
    /// The current line, capped at the marker's length, to spot the completion marker.
    line: Vec<u8>,
    line_is_marker: bool,
    last_line_is_marker: bool,
    /// Dashes seen in code, which may open a `-- ` comment.
    dashes: u8,
    pending_slash: bool,
    counts: BTreeMap<String, u64>,
}

impl SqlScanner {
    /// `database` prefixes the counts' keys: `<database>.<table>`.
    pub fn new(database: &str) -> Self {
        SqlScanner {
            database: database.to_string(),
            state: State::Code,
            head: Vec::new(),
            depth: 0,
            inserting: None,
            delimiter: b";".to_vec(),
            matched: 0,
            line: Vec::new(),
            line_is_marker: false,
            last_line_is_marker: false,
            dashes: 0,
            pending_slash: false,
            counts: BTreeMap::new(),
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            i += self.skippable(&data[i..]);
            if let Some(&b) = data.get(i) {
                self.track_line(b);
                self.step(b);
                i += 1;
            }
        }
    }

    /// How many of the next bytes change nothing but could be stepped one by one: the inside
    /// of a string, or of a row between its punctuation. Most of a dump is such bytes, so
    /// skipping them in bulk keeps the scanner well ahead of the dump program.
    fn skippable(&self, data: &[u8]) -> usize {
        // Only where the line's start is already known (the completion marker check).
        if self.line.len() < COMPLETION_MARKER.len() {
            return 0;
        }
        match self.state {
            State::Quoted(q) if !(q == b'`' && self.inserting.is_none()) => {
                memchr::memchr3(q, b'\\', b'\n', data).unwrap_or(data.len())
            }
            State::Code if self.inserting.is_some() && self.depth > 0 && self.dashes == 0 && !self.pending_slash => {
                data.iter()
                    .position(|&b| IN_ROW_STOPS[b as usize])
                    .unwrap_or(data.len())
            }
            _ => 0,
        }
    }

    /// True when the dump's last non-empty line is the completion marker.
    pub fn completed(&self) -> bool {
        self.line_is_marker || (self.line.is_empty() && self.last_line_is_marker)
    }

    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.counts
    }

    fn track_line(&mut self, b: u8) {
        if b == b'\n' {
            if !self.line.is_empty() {
                self.last_line_is_marker = self.line_is_marker;
            }
            self.line.clear();
            self.line_is_marker = false;
        } else if self.line.len() < COMPLETION_MARKER.len() {
            self.line.push(b);
            self.line_is_marker = self.line == COMPLETION_MARKER;
        }
    }

    fn step(&mut self, b: u8) {
        match self.state {
            State::Quoted(q) => {
                let in_name = q == b'`' && self.inserting.is_none();
                if in_name && self.head.len() < HEAD_LIMIT {
                    self.head.push(b);
                }
                if b == b'\\' && q != b'`' {
                    self.state = State::Escaped(q);
                } else if b == q {
                    // A doubled quote ('') reopens at once: same as leaving and re-entering.
                    self.state = State::Code;
                }
            }
            State::Escaped(q) => self.state = State::Quoted(q),
            State::LineComment => {
                if b == b'\n' {
                    self.state = State::Code;
                }
            }
            State::BlockComment => {
                if b == b'*' {
                    self.state = State::BlockCommentStar;
                }
            }
            State::BlockCommentStar => {
                self.state = match b {
                    b'/' => State::Code,
                    b'*' => State::BlockCommentStar,
                    _ => State::BlockComment,
                }
            }
            State::Delimiter => {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(&self.head["delimiter".len()..])
                        .trim()
                        .to_string();
                    if !text.is_empty() {
                        self.delimiter = text.into_bytes();
                    }
                    self.end_statement();
                    self.state = State::Code;
                } else if self.head.len() < HEAD_LIMIT {
                    self.head.push(b);
                }
            }
            State::Code => self.code(b),
        }
    }

    fn code(&mut self, b: u8) {
        // Openers of more than one byte: "-- " (or "--" ending a line) and "/*".
        if self.dashes > 0 {
            if self.dashes == 1 && b == b'-' {
                self.dashes = 2;
                return;
            }
            let dashes = std::mem::take(&mut self.dashes);
            if dashes == 2 && matches!(b, b' ' | b'\t' | b'\r') {
                self.state = State::LineComment;
                return;
            }
            if dashes == 2 && b == b'\n' {
                return;
            }
            for _ in 0..dashes {
                self.plain(b'-');
            }
        }
        if self.pending_slash {
            self.pending_slash = false;
            if b == b'*' {
                self.state = State::BlockComment;
                return;
            }
            self.plain(b'/');
        }
        match b {
            b'-' => self.dashes = 1,
            b'/' => self.pending_slash = true,
            b'#' => self.state = State::LineComment,
            b'\'' | b'"' | b'`' => {
                self.state = State::Quoted(b);
                if self.inserting.is_none() && self.head.len() < HEAD_LIMIT {
                    self.head.push(b);
                }
            }
            _ => self.plain(b),
        }
    }

    fn plain(&mut self, b: u8) {
        if self.check_delimiter(b) {
            return;
        }
        if self.inserting.is_some() {
            match b {
                b'(' => {
                    if self.depth == 0 {
                        let table = self.inserting.clone().expect("checked");
                        *self.counts.entry(table).or_insert(0) += 1;
                    }
                    self.depth += 1;
                }
                b')' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
            return;
        }
        if self.head.is_empty() && b.is_ascii_whitespace() {
            return;
        }
        if self.head.len() < HEAD_LIMIT {
            self.head.push(b.to_ascii_lowercase());
        }
        if self.head == b"delimiter " || self.head == b"delimiter\t" {
            self.state = State::Delimiter;
        } else if self.head.ends_with(b"values") {
            self.inserting = self.insert_target();
        } else if self.head.starts_with(b"create table `") && self.head.ends_with(b"` (") {
            // A table with no rows has no INSERT; its CREATE puts it in the counts.
            if let Some(table) = self.table_after(b"create table ".len()) {
                self.counts.entry(table).or_insert(0);
            }
        }
    }

    /// Ends the statement when the delimiter is complete. The delimiter's bytes are also
    /// ordinary bytes, so matching never swallows them.
    fn check_delimiter(&mut self, b: u8) -> bool {
        if self.depth > 0 {
            return false;
        }
        if b == self.delimiter[self.matched] {
            self.matched += 1;
        } else {
            self.matched = usize::from(b == self.delimiter[0]);
        }
        if self.matched == self.delimiter.len() {
            self.end_statement();
            return true;
        }
        false
    }

    fn end_statement(&mut self) {
        self.head.clear();
        self.inserting = None;
        self.depth = 0;
        self.matched = 0;
    }

    /// `insert [ignore] into `t` [(cols)] values` or `replace into ...` -> `db.t`.
    fn insert_target(&self) -> Option<String> {
        let head = String::from_utf8_lossy(&self.head);
        if !(head.starts_with("insert") || head.starts_with("replace")) {
            return None;
        }
        self.table_after(head.find(" into ")? + 6)
    }

    /// `db.name` of the table named at `at` in the statement's head.
    fn table_after(&self, at: usize) -> Option<String> {
        let head = String::from_utf8_lossy(&self.head);
        let name = head.get(at..)?.trim_start();
        let table = if let Some(quoted) = name.strip_prefix('`') {
            let mut out = String::new();
            let mut chars = quoted.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '`' {
                    if chars.peek() == Some(&'`') {
                        chars.next();
                        out.push('`');
                        continue;
                    }
                    break;
                }
                out.push(c);
            }
            out
        } else {
            name.split(|c: char| c.is_whitespace() || c == '(').next()?.to_string()
        };
        Some(format!("{}.{}", self.database, table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> SqlScanner {
        let mut s = SqlScanner::new("db");
        // Byte at a time and in odd chunks must agree.
        for chunk in text.as_bytes().chunks(3) {
            s.feed(chunk);
        }
        let mut whole = SqlScanner::new("db");
        whole.feed(text.as_bytes());
        assert_eq!(whole.counts(), s.counts());
        assert_eq!(whole.completed(), s.completed());
        s
    }

    #[test]
    fn counts_rows_of_extended_inserts() {
        let s = scan(
            "INSERT INTO `t` VALUES\n(1,'a\\'b\\\\c\\n',0x00FF),\n(2,NULL,NULL);\nINSERT INTO `t` VALUES (3,'(x)',1);\n-- Dump completed on 2026-11-22  5:30:07\n",
        );
        assert_eq!(s.counts()["db.t"], 3);
        assert!(s.completed());
    }

    #[test]
    fn strings_comments_and_odd_names_do_not_fool_it() {
        let s = scan(concat!(
            "/*!40101 SET NAMES utf8mb4 */;\n",
            "-- INSERT INTO `fake` VALUES (1);\n",
            "INSERT INTO `we``ird; name` VALUES ('it''s ); INSERT INTO x VALUES (9)', \"q\"), ('(', ')');\n",
            "INSERT IGNORE INTO `c` (`a`,`b`) VALUES (1,2);\n",
            "REPLACE INTO `r` VALUES (1);\n",
            "INSERT INTO `n` VALUES (1, -1, 2--3);\n",
            "/* INSERT INTO `fake` VALUES (1) */;\n",
        ));
        let expected: BTreeMap<String, u64> = [("db.we`ird; name", 2), ("db.c", 1), ("db.r", 1), ("db.n", 1)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        assert_eq!(s.counts(), &expected);
        assert!(!s.completed());
    }

    #[test]
    fn trigger_and_routine_bodies_are_not_data() {
        let s = scan(concat!(
            "DELIMITER ;;\n",
            "/*!50003 CREATE*/ /*!50003 TRIGGER tr AFTER INSERT ON t FOR EACH ROW INSERT INTO log VALUES (NEW.id) */;;\n",
            "CREATE PROCEDURE p()\nBEGIN\n INSERT INTO log VALUES (1); INSERT INTO log VALUES (2);\nEND ;;\n",
            "DELIMITER ;\n",
            "INSERT INTO `log` VALUES (5);\n",
            "\n-- Dump completed on 2026-11-22\n\n",
        ));
        assert_eq!(s.counts().get("db.log"), Some(&1));
        assert!(s.completed());
    }

    #[test]
    fn empty_tables_count_zero_and_views_are_not_tables() {
        let s = scan(concat!(
            "CREATE TABLE `Empty` (\n  `x` int(11) DEFAULT NULL,\n  KEY `k` (`x`)\n) ENGINE=InnoDB;\n",
            "/*!50001 CREATE VIEW `v` AS SELECT 1 AS `id` */;\n",
            "CREATE TABLE `full` (`a` int);\nINSERT INTO `full` VALUES (1),(2);\n",
        ));
        let expected: BTreeMap<String, u64> = [("db.Empty", 0), ("db.full", 2)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        assert_eq!(s.counts(), &expected);
    }

    #[test]
    fn a_truncated_dump_is_not_complete() {
        assert!(!scan("INSERT INTO `t` VALUES (1);\n-- Dump completed on x\nINSERT").completed());
        assert!(!scan("-- Dump comp").completed());
    }

    /// Pieces a dump is made of, so that random streams reach the scanner's states.
    fn sql_piece() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("INSERT INTO `t` VALUES ".to_string()),
            Just("(1,'a\\'b',0x00FF),".to_string()),
            Just("(2,NULL);\n".to_string()),
            Just("CREATE TABLE `x` (\n  `a` int\n);\n".to_string()),
            Just("DELIMITER ;;\n".to_string()),
            Just("/*!50003 CREATE TRIGGER x */;;\n".to_string()),
            Just("-- Dump completed on 2026\n".to_string()),
            Just("'".to_string()),
            Just("\\".to_string()),
            Just("`".to_string()),
            Just("\"".to_string()),
            Just("/*".to_string()),
            Just("*/".to_string()),
            "\\PC{0,12}",
        ]
    }

    proptest::proptest! {
        /// Whatever the bytes (a corrupt or hostile artifact), the scanner never panics and
        /// counts the same however the stream is cut into reads.
        #[test]
        fn any_stream_scans_the_same_in_any_chunks(
            pieces in proptest::collection::vec(sql_piece(), 0..40),
            noise in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            cut in 1usize..17,
        ) {
            let mut bytes = pieces.concat().into_bytes();
            bytes.extend(noise);
            let mut whole = SqlScanner::new("db");
            whole.feed(&bytes);
            let mut chunked = SqlScanner::new("db");
            for chunk in bytes.chunks(cut) {
                chunked.feed(chunk);
            }
            proptest::prop_assert_eq!(whole.counts(), chunked.counts());
            proptest::prop_assert_eq!(whole.completed(), chunked.completed());
        }
    }
}
