//! The text batch and the statement helpers every renderer shares.

use std::fmt;

use crate::TABLE;

/// At most this many elements go into one `add element`/`delete element` statement, so a huge
/// batch stays a sequence of reasonably sized statements (nft reports errors per statement).
pub const ELEMENTS_PER_STATEMENT: usize = 1000;

/// One `nft -f -` script: the kernel applies it as a single transaction, all or nothing.
/// Empty when there is nothing to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    text: String,
}

impl Batch {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    fn line(&mut self, args: fmt::Arguments<'_>) {
        use fmt::Write;
        // Writing into a String cannot fail.
        let _ = self.text.write_fmt(args);
        self.text.push('\n');
    }

    /// A batch that deletes our table if it exists (`add table` first: `delete table` fails
    /// on a missing one), and everything in it.
    pub fn drop_table() -> Batch {
        let mut b = Batch::default();
        b.line(format_args!("add table {TABLE}"));
        b.line(format_args!("delete table {TABLE}"));
        b
    }

    pub(crate) fn append(&mut self, other: &Batch) {
        self.text.push_str(&other.text);
    }

    /// Drops our table, if present, and creates it empty again, within this transaction:
    /// `add table` first, because `delete table` fails on a missing table.
    pub(crate) fn recreate_table(&mut self) {
        self.line(format_args!("add table {TABLE}"));
        self.line(format_args!("delete table {TABLE}"));
        self.line(format_args!("add table {TABLE}"));
    }

    /// `add set`/`add map` with its type, e.g. `type mark : verdict`.
    pub(crate) fn add_set(&mut self, kind: &str, name: &str, spec: &str) {
        self.line(format_args!("add {kind} {TABLE} {name} {{ {spec}; }}"));
    }

    /// A base chain: `spec` is its `type … hook … priority …` part.
    pub(crate) fn add_base_chain(&mut self, name: &str, spec: &str) {
        self.line(format_args!(
            "add chain {TABLE} {name} {{ {spec}; policy accept; }}"
        ));
    }

    pub(crate) fn add_chain(&mut self, name: &str) {
        self.line(format_args!("add chain {TABLE} {name}"));
    }

    pub(crate) fn add_rule(&mut self, chain: &str, rule: fmt::Arguments<'_>) {
        self.line(format_args!("add rule {TABLE} {chain} {rule}"));
    }

    pub(crate) fn flush_chain(&mut self, name: &str) {
        self.line(format_args!("flush chain {TABLE} {name}"));
    }

    /// Flushes first: older kernels refuse to delete a chain that still holds rules.
    pub(crate) fn delete_chain(&mut self, name: &str) {
        self.flush_chain(name);
        self.line(format_args!("delete chain {TABLE} {name}"));
    }

    /// `add element`/`delete element` statements for `elements`, chunked.
    pub(crate) fn elements(&mut self, verb: &str, set: &str, elements: &[String]) {
        for chunk in elements.chunks(ELEMENTS_PER_STATEMENT) {
            self.line(format_args!(
                "{verb} element {TABLE} {set} {{ {} }}",
                chunk.join(", ")
            ));
        }
    }
}

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_statements_are_chunked() {
        let mut b = Batch::default();
        let elems: Vec<String> = (0..2 * ELEMENTS_PER_STATEMENT + 1)
            .map(|i| i.to_string())
            .collect();
        b.elements("add", "s", &elems);
        let lines: Vec<&str> = b.as_str().lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("add element ip meshnet s { 0, 1, "));
        assert_eq!(
            lines[2],
            format!(
                "add element ip meshnet s {{ {} }}",
                2 * ELEMENTS_PER_STATEMENT
            )
        );
        b.elements("delete", "s", &[]);
        assert_eq!(
            b.as_str().lines().count(),
            3,
            "no statement for no elements"
        );
    }

    #[test]
    fn drop_table_deletes_ours_whether_or_not_it_exists() {
        assert_eq!(
            Batch::drop_table().as_str(),
            "add table ip meshnet\ndelete table ip meshnet\n"
        );
    }
}
