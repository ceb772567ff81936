//! containerd's filter syntax, as its `filters` package parses it, over snapshots' fields.
//!
//! ```text
//! selectors := selector ("," selector)*        all must match
//! selector  := fieldpath [operator value]      no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="             "~=": a regular expression
//! value     := quoted | [^\s,]+
//! quoted    := "..." with Go escapes; /.../ and |...| too after "~="
//! ```
//!
//! Several filters in one request match when any of them does. A snapshot's fields are `kind`
//! (`active`, `view`, `committed`), `name`, `parent` and `labels.<key>` (a key with dots may
//! be quoted: `labels."containerd.io/gc.root"`).

use regex::Regex;

use crate::engine::SnapshotInfo;
use crate::records::SnapshotKind;

/// Filters from one request: a snapshot matches when any of them matches.
#[derive(Debug)]
pub struct Filters(Vec<Vec<Selector>>);

#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

#[derive(Debug)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

impl Filters {
    /// Parse each filter; an empty list (or an empty filter) matches everything.
    pub fn parse(filters: &[String]) -> Result<Filters, String> {
        let mut any = Vec::new();
        for filter in filters {
            if filter.is_empty() {
                return Ok(Filters(Vec::new()));
            }
            any.push(
                Parser::new(filter)
                    .selectors()
                    .map_err(|(pos, msg)| format!("filter {filter:?}: {msg} at byte {pos}"))?,
            );
        }
        Ok(Filters(any))
    }

    /// Whether `info` matches.
    pub fn matches(&self, info: &SnapshotInfo) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|all| all.iter().all(|selector| selector.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &SnapshotInfo) -> bool {
        let value = field(info, &self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(wanted) => value.as_deref() == Some(wanted.as_str()),
            // As containerd: an absent field is "" here.
            Op::NotEqual(unwanted) => value.as_deref().unwrap_or("") != unwanted,
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

/// A snapshot's field, as containerd's snapshot adaptor gives it.
fn field(info: &SnapshotInfo, path: &[String]) -> Option<String> {
    match path.first().map(String::as_str)? {
        "kind" => Some(
            match info.kind {
                SnapshotKind::Active => "active",
                SnapshotKind::View => "view",
                SnapshotKind::Committed => "committed",
            }
            .to_string(),
        ),
        "name" => Some(info.key.clone()),
        "parent" => Some(info.parent.clone()),
        "labels" => info.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

type ParseResult<T> = Result<T, (usize, String)>;

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser { input, pos: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.input[self.pos..].chars().next()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek().filter(|c| c.is_whitespace()) {
            self.pos += c.len_utf8();
        }
    }

    fn error<T>(&self, msg: impl Into<String>) -> ParseResult<T> {
        Err((self.pos, msg.into()))
    }

    fn selectors(&mut self) -> ParseResult<Vec<Selector>> {
        let mut all = vec![self.selector()?];
        loop {
            self.skip_space();
            match self.peek() {
                None => return Ok(all),
                Some(',') => {
                    self.pos += 1;
                    all.push(self.selector()?);
                }
                Some(c) => return self.error(format!("unexpected {c:?}")),
            }
        }
    }

    fn selector(&mut self) -> ParseResult<Selector> {
        let mut path = vec![self.field()?];
        loop {
            self.skip_space();
            if self.peek() != Some('.') {
                break;
            }
            self.pos += 1;
            path.push(self.field()?);
        }
        self.skip_space();
        let op = match self.peek() {
            None | Some(',') => {
                return Ok(Selector {
                    path,
                    op: Op::Present,
                })
            }
            Some('=' | '!' | '~') => self.operator()?,
            Some(c) => {
                return self.error(format!("expected an operator (==, != or ~=), found {c:?}"))
            }
        };
        self.skip_space();
        let regex = op == "~=";
        let value = match self.peek() {
            Some('"') => self.quoted()?,
            Some('/' | '|') if regex => self.quoted()?,
            Some('/' | '|') => return self.error("invalid quote encountered"),
            Some(c) if is_value_char(c) => self.take_while(is_value_char),
            _ => return self.error("expected a value"),
        };
        let op = match op.as_str() {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => Op::Matches(
                Regex::new(&value)
                    .map_err(|e| (self.pos, format!("bad regular expression: {e}")))?,
            ),
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> ParseResult<String> {
        self.skip_space();
        match self.peek() {
            Some('"') => self.quoted(),
            Some(c) if is_field_char(c) => Ok(self.take_while(is_field_char)),
            _ => self.error("expected a field name or a quoted string"),
        }
    }

    fn operator(&mut self) -> ParseResult<String> {
        let op = self.take_while(|c| matches!(c, '=' | '!' | '~'));
        match op.as_str() {
            "==" | "!=" | "~=" => Ok(op),
            _ => Err((self.pos - op.len(), format!("unsupported operator {op:?}"))),
        }
    }

    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> String {
        let start = self.pos;
        while let Some(c) = self.peek().filter(|c| keep(*c)) {
            self.pos += c.len_utf8();
        }
        self.input[start..self.pos].to_string()
    }

    /// A quoted string (its quote is the next character), with Go's escapes.
    fn quoted(&mut self) -> ParseResult<String> {
        let quote = self.peek().expect("a quote");
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return self.error("quoted string not terminated");
            };
            self.pos += c.len_utf8();
            match c {
                c if c == quote => return Ok(out),
                '\n' => return self.error("quoted string not terminated"),
                '\\' => out.push(self.escape(quote)?),
                c => out.push(c),
            }
        }
    }

    fn escape(&mut self, quote: char) -> ParseResult<char> {
        let Some(c) = self.peek() else {
            return self.error("quoted string not terminated");
        };
        self.pos += c.len_utf8();
        let simple = match c {
            'a' => Some('\x07'),
            'b' => Some('\x08'),
            'f' => Some('\x0c'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            'v' => Some('\x0b'),
            '\\' => Some('\\'),
            c if c == quote => Some(c),
            _ => None,
        };
        if let Some(c) = simple {
            return Ok(c);
        }
        let (digits, radix) = match c {
            '0'..='7' => {
                self.pos -= 1;
                (3, 8)
            }
            'x' => (2, 16),
            'u' => (4, 16),
            'U' => (8, 16),
            _ => return self.error(format!("illegal escape sequence \\{c}")),
        };
        let text = self.input.get(self.pos..self.pos + digits).unwrap_or("");
        let code = (text.len() == digits)
            .then(|| u32::from_str_radix(text, radix).ok())
            .flatten()
            .and_then(char::from_u32);
        match code {
            Some(c) => {
                self.pos += digits;
                Ok(c)
            }
            None => self.error("illegal numeric escape sequence"),
        }
    }
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn is_value_char(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control() && c != '\0'
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn info(key: &str, parent: &str, kind: SnapshotKind, labels: &[(&str, &str)]) -> SnapshotInfo {
        SnapshotInfo {
            key: key.into(),
            parent: parent.into(),
            kind,
            created_ns: 0,
            updated_ns: 0,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    /// containerd's own Walk test (snapshots/testsuite checkWalk), on the same snapshots.
    #[test]
    fn containerd_walk_cases_select_what_containerd_selects() {
        use SnapshotKind::*;
        let gc = ("containerd.io/gc.root", "check-walk");
        let all = [
            info("a-np", "", Active, &[gc]),
            info("p", "", Committed, &[gc]),
            info("a", "p", Active, &[gc]),
            info("v", "p", View, &[gc]),
            info("p-wl", "", Committed, &[("l", "1"), gc]),
            info("a-wl", "p-wl", Active, &[("l", "2"), gc]),
            info("v-wl", "p-wl", View, &[("l", "3"), gc]),
            info("a-np-wl", "", Active, &[("l", "2"), gc]),
        ];
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["labels.\"containerd.io/gc.root\"==check-walk"],
                &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
            (
                &["kind==active,labels.\"containerd.io/gc.root\"==check-walk"],
                &["a-np", "a", "a-wl", "a-np-wl"],
            ),
            (
                &["kind==view,labels.\"containerd.io/gc.root\"==check-walk"],
                &["v", "v-wl"],
            ),
            (
                &["kind==committed,labels.\"containerd.io/gc.root\"==check-walk"],
                &["p", "p-wl"],
            ),
            (&["name==p", "name==a-np-wl"], &["p", "a-np-wl"]),
            (&["name==a-wl,labels.l"], &["a-wl"]),
            (&["parent==p"], &["a", "v"]),
            (
                &["parent!=\"\",labels.\"containerd.io/gc.root\"==check-walk"],
                &["a", "v", "a-wl", "v-wl"],
            ),
            (&["labels.l"], &["p-wl", "a-wl", "v-wl", "a-np-wl"]),
            (&["labels.l==2"], &["a-wl", "a-np-wl"]),
            (&["name~=/^a-.*wl$/"], &["a-wl", "a-np-wl"]),
            (&[" kind == view "], &["v", "v-wl"]),
            (
                &[],
                &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
        ];
        for (filters, expected) in cases {
            let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
            let parsed = Filters::parse(&filters).unwrap();
            let got: Vec<&str> = all
                .iter()
                .filter(|i| parsed.matches(i))
                .map(|i| i.key.as_str())
                .collect();
            let mut expected = expected.to_vec();
            let mut got_sorted = got.clone();
            expected.sort();
            got_sorted.sort();
            assert_eq!(got_sorted, expected, "{filters:?}");
        }
    }

    #[test]
    fn quoted_values_take_go_escapes() {
        let f = Filters::parse(&[r#"labels."a.b"=="x\"y\n\u00e9\x41""#.into()]).unwrap();
        assert!(f.matches(&info(
            "k",
            "",
            SnapshotKind::Active,
            &[("a.b", "x\"y\né\x41")]
        )));
    }

    #[test]
    fn malformed_filters_are_refused_with_where() {
        for bad in [
            "name==",
            "==x",
            "name=x",
            "name==\"open",
            "name==/x/",
            "name==a b",
            "labels.",
            "name~=\"(\"",
            "a,,b",
        ] {
            let err = Filters::parse(&[bad.to_string()]).unwrap_err();
            assert!(
                err.contains(&format!("{bad:?}")) && err.contains("at byte"),
                "{bad}: {err}"
            );
        }
    }
}
