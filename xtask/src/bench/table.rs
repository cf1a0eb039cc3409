//! Plain-text tables with aligned columns, for the demo's and the benches' reports.

/// Column alignment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table printed with every column as wide as its widest cell.
pub struct Table {
    header: Vec<String>,
    align: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles and alignments.
    pub fn new(columns: &[(&str, Align)]) -> Self {
        Self {
            header: columns
                .iter()
                .map(|(title, _)| (*title).to_owned())
                .collect(),
            align: columns.iter().map(|(_, align)| *align).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row; missing cells print empty.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table, each line indented by `indent` spaces and ending with a newline.
    pub fn render(&self, indent: usize) -> String {
        let cell = |row: &[String], c: usize| row.get(c).map_or("", String::as_str).to_owned();
        let widths: Vec<usize> = (0..self.header.len())
            .map(|c| {
                std::iter::once(&self.header)
                    .chain(&self.rows)
                    .map(|row| cell(row, c).chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |row: &[String]| {
            let cells: Vec<String> = (0..self.header.len())
                .map(|c| {
                    let text = cell(row, c);
                    let pad = " ".repeat(widths[c] - text.chars().count());
                    match self.align[c] {
                        Align::Left => format!("{text}{pad}"),
                        Align::Right => format!("{pad}{text}"),
                    }
                })
                .collect();
            format!("{}{}\n", " ".repeat(indent), cells.join("  ").trim_end())
        };
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let mut out = line(&self.header);
        out.push_str(&line(&rule));
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let mut table = Table::new(&[("mode", Align::Left), ("p50", Align::Right)]);
        table.row(vec!["no mesh".into(), "31.2".into()]);
        table.row(vec!["nodemesh mTLS".into(), "112.9".into()]);
        assert_eq!(
            table.render(2),
            "  mode             p50\n  -------------  -----\n  no mesh         31.2\n  nodemesh mTLS  112.9\n"
        );
    }
}
