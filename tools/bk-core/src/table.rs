//! The `--format table` output of the tools that list (bk-ls, bk-prune): columns aligned for
//! a person, never parsed (JSON Lines is for programs).

/// The lines of a table, its header first: each cell padded to its column's widest, two
/// spaces between columns, no trailing blanks.
pub fn aligned_lines<const N: usize>(header: [String; N], rows: &[[String; N]]) -> Vec<String> {
    let mut widths = header.clone().map(|h| h.len());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    std::iter::once(&header)
        .chain(rows)
        .map(|row| {
            let cells: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_lines_end_without_blanks() {
        let s = |v: [&str; 3]| v.map(String::from);
        let lines = aligned_lines(
            s(["ID", "SIZE", "NOTE"]),
            &[s(["a.1", "10 B", ""]), s(["b", "1.5 KiB", "x"])],
        );
        assert_eq!(lines, ["ID   SIZE     NOTE", "a.1  10 B", "b    1.5 KiB  x"]);
    }
}
