//! Plain aligned text tables for the operator commands.

/// Renders rows as left-aligned columns separated by two spaces; the first
/// row is the header.
pub fn render<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            line.push_str(cell);
            if i + 1 < N {
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_line_up() {
        let rows = [
            ["A".to_owned(), "BB".to_owned()],
            ["ccc".to_owned(), "d".to_owned()],
        ];
        assert_eq!(super::render(&rows), "A    BB\nccc  d\n");
    }
}
