//! Keeps only some tables of a mysqldump stream (bk-restore --table), by the section
//! comments the dump is made of: `-- Table structure for table `t``, `-- Dumping data for
//! table `t``, and the view, event and routine sections. Everything before the first
//! section (session settings) is kept. Memory stays bounded: only comment lines are held.

use std::io::{self, Read};

const LINE_LIMIT: usize = 4096;

pub struct TableFilter<'a> {
    inner: &'a mut dyn Read,
    tables: Vec<String>,
    seen: Vec<String>,
    keep: bool,
    at_line_start: bool,
    /// A line starting with '-', held until its end decides what it is.
    comment: Option<Vec<u8>>,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    eof: bool,
}

impl<'a> TableFilter<'a> {
    pub fn new(inner: &'a mut dyn Read, tables: &[String]) -> Self {
        TableFilter {
            inner,
            tables: tables.to_vec(),
            seen: Vec::new(),
            keep: true,
            at_line_start: true,
            comment: None,
            input: vec![0; 256 * 1024],
            output: Vec::new(),
            sent: 0,
            eof: false,
        }
    }

    /// The tables asked for that the dump did not hold.
    pub fn missing(&self) -> Vec<String> {
        self.tables.iter().filter(|t| !self.seen.contains(t)).cloned().collect()
    }

    fn section(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        const TABLE_SECTIONS: [&str; 4] = [
            "-- Table structure for table `",
            "-- Dumping data for table `",
            "-- Temporary table structure for view `",
            "-- Final view structure for view `",
        ];
        if let Some(rest) = TABLE_SECTIONS.iter().find_map(|p| text.strip_prefix(p)) {
            let name = rest.strip_suffix('`').unwrap_or(rest).replace("``", "`");
            self.keep = self.tables.contains(&name);
            if self.keep && !self.seen.contains(&name) {
                self.seen.push(name);
            }
        } else if text.starts_with("-- Dumping events for database")
            || text.starts_with("-- Dumping routines for database")
        {
            self.keep = true;
        }
    }

    fn process(&mut self, data_len: usize) {
        for i in 0..data_len {
            let b = self.input[i];
            if let Some(line) = &mut self.comment {
                line.push(b);
                if b == b'\n' || line.len() >= LINE_LIMIT {
                    let line = self.comment.take().expect("held");
                    self.section(&line);
                    if self.keep {
                        self.output.extend_from_slice(&line);
                    }
                    self.at_line_start = b == b'\n';
                }
                continue;
            }
            if self.at_line_start && b == b'-' {
                self.comment = Some(vec![b]);
                continue;
            }
            if self.keep {
                self.output.push(b);
            }
            self.at_line_start = b == b'\n';
        }
    }
}

impl Read for TableFilter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.sent == self.output.len() {
            self.output.clear();
            self.sent = 0;
            if self.eof {
                return Ok(0);
            }
            let n = self.inner.read(&mut self.input)?;
            if n == 0 {
                self.eof = true;
                if let Some(line) = self.comment.take() {
                    if self.keep {
                        self.output.extend_from_slice(&line);
                    }
                }
            } else {
                self.process(n);
            }
        }
        let n = buf.len().min(self.output.len() - self.sent);
        buf[..n].copy_from_slice(&self.output[self.sent..self.sent + n]);
        self.sent += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_header_and_the_tables_asked_for() {
        let dump = "SET NAMES utf8mb4;\n--\n-- Table structure for table `a`\n--\nCREATE TABLE `a` (x int);\n--\n-- Dumping data for table `a`\n--\nINSERT INTO `a` VALUES (1);\n--\n-- Table structure for table `b``c`\n--\nCREATE TABLE `b``c` (y int);\nINSERT INTO `b``c` VALUES (-1);\n--\n-- Dumping routines for database 'd'\n--\nSET x=1;\n-- Dump completed\n";
        let mut input = dump.as_bytes();
        let mut f = TableFilter::new(&mut input, &["b`c".to_string(), "zz".to_string()]);
        let mut out = String::new();
        f.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("SET NAMES utf8mb4;\n--\n-- Table structure for table `b``c`\n"),
            "{out}"
        );
        assert!(!out.contains("`a`"), "{out}");
        assert!(out.contains("INSERT INTO `b``c` VALUES (-1);\n"));
        assert!(out.ends_with("SET x=1;\n-- Dump completed\n"));
        assert_eq!(f.missing(), vec!["zz".to_string()]);
    }
}
