//! The agent's config file: TOML, restricted to what the config uses. Every key is
//! top-level, one `key = value` per line; values are strings (basic `"…"` with escapes,
//! or literal `'…'`), integers, floats, booleans and arrays of those (which may span
//! lines); `#` comments and blank lines anywhere. Anything else TOML has (tables,
//! inline tables, dotted keys, multi-line strings, dates) is refused with an error
//! that names the line and the rule, never skipped or misread.
//!
//! This replaced the `toml` crate (toml, toml_edit, winnow: about 90 KiB of firmware)
//! for a format with no nesting. Parsed values are handed to serde as JSON, one key
//! per line, so a value of the wrong type is reported with its key and its line in
//! the file.

use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Most entries a config may have: far above the settings there are, so any real file
/// fits, and a file of garbage stops early.
const MAX_ENTRIES: usize = 1024;
/// Largest file read: a real config is a few KiB. Parsing holds a few times this.
pub const MAX_TEXT_BYTES: usize = 256 * 1024;
/// Most values (array elements included) in one file.
const MAX_VALUES: usize = 16_384;
/// Deepest nesting of arrays.
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct Error {
    /// 1-based line of the file (0: not about one line).
    pub line: usize,
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, Error> {
    Err(Error {
        line,
        message: message.into(),
    })
}

/// One `key = value` of a file, with the line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    pub line: usize,
}

/// Reads a config file into `T` (the keys are its fields).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    from_entries(parse(text)?)
}

/// Deserializes `T` from entries (a parsed file, or the UCI reader's). An error names
/// the key and the line it came from.
pub fn from_entries<T: DeserializeOwned>(entries: Vec<Entry>) -> Result<T, Error> {
    // One entry per line of the JSON text: serde_json's error line is the entry's.
    let mut json = String::from("{\n");
    for (i, e) in entries.iter().enumerate() {
        json.push_str(&Value::String(e.key.clone()).to_string());
        json.push(':');
        json.push_str(&e.value.to_string());
        json.push_str(if i + 1 < entries.len() { ",\n" } else { "\n" });
    }
    json.push('}');
    serde_json::from_str(&json).map_err(|e| {
        let text = e.to_string();
        let message = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        match e.line().checked_sub(2).and_then(|i| entries.get(i)) {
            Some(entry) if !message.contains(&format!("`{}`", entry.key)) => Error {
                line: entry.line,
                message: format!("{}: {message}", entry.key),
            },
            Some(entry) => Error {
                line: entry.line,
                message,
            },
            None => Error { line: 0, message },
        }
    })
}

/// Writes `value` (a struct of plain fields) as TOML, in field order; `None` fields
/// are left out, as TOML has no null.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, Error> {
    let json = serde_json::to_string(value).map_err(|e| Error {
        line: 0,
        message: e.to_string(),
    })?;
    let Ordered(fields) = serde_json::from_str(&json).map_err(|e| Error {
        line: 0,
        message: format!("only a struct or map can be written as a config file: {e}"),
    })?;
    let mut out = String::new();
    for (key, v) in fields {
        if v.is_null() {
            continue;
        }
        if !is_bare_key(&key) {
            return err(0, format!("key {key:?} is not a bare key"));
        }
        out.push_str(&key);
        out.push_str(" = ");
        write_value(&mut out, &key, &v)?;
        out.push('\n');
    }
    Ok(out)
}

/// A JSON object's fields in the order they were written.
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    v.push(entry);
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_map(V)
    }
}

fn write_value(out: &mut String, key: &str, v: &Value) -> Result<(), Error> {
    match v {
        Value::String(s) => write_string(out, s),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if n.as_u64().is_some() {
                // Past i64: TOML has no such integer, and a float would not read back.
                return err(
                    0,
                    format!("{key}: {n} is larger than a TOML integer can be"),
                );
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                // `{:?}` always has a point or an exponent, so it reads back as a float.
                out.push_str(&format!("{f:?}"));
            }
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                if item.is_null() {
                    return err(0, format!("{key}: an array cannot hold a missing value"));
                }
                write_value(out, key, item)?;
            }
            out.push(']');
        }
        Value::Null => {}
        Value::Object(_) => return err(0, format!("{key}: tables are not written")),
    }
    Ok(())
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn is_bare_key(k: &str) -> bool {
    !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Parses a file into its entries, in file order.
pub fn parse(text: &str) -> Result<Vec<Entry>, Error> {
    if text.len() > MAX_TEXT_BYTES {
        return err(
            0,
            format!(
                "the file is {} bytes; a config is at most {MAX_TEXT_BYTES}",
                text.len()
            ),
        );
    }
    // A byte-order mark, as some editors write, is not part of the text.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut p = Parser {
        s: text.as_bytes(),
        text,
        i: 0,
        line: 1,
        values: 0,
    };
    let mut entries: Vec<Entry> = Vec::new();
    loop {
        p.skip_blank_lines();
        let Some(c) = p.peek() else { break };
        let line = p.line;
        if c == b'[' {
            return err(
                line,
                "tables ([section]) are not part of the agent's config: every key is top-level",
            );
        }
        let key = p.key()?;
        p.skip_space();
        match p.peek() {
            Some(b'.') => {
                return err(
                    line,
                    format!("dotted keys ({key}.…) are not part of the agent's config"),
                )
            }
            Some(b'=') => p.i += 1,
            _ => return err(line, format!("expected `=` after the key {key}")),
        }
        p.skip_space();
        let value = p.value(0)?;
        p.end_of_line()?;
        if let Some(first) = entries.iter().find(|e| e.key == key) {
            return err(
                line,
                format!("key {key} is set twice (first on line {})", first.line),
            );
        }
        if entries.len() == MAX_ENTRIES {
            return err(line, format!("more than {MAX_ENTRIES} keys"));
        }
        entries.push(Entry { key, value, line });
    }
    Ok(entries)
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
    line: usize,
    /// Values read so far (bounded by MAX_VALUES).
    values: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn skip_comment(&mut self) {
        if self.peek() == Some(b'#') {
            while !matches!(self.peek(), None | Some(b'\n')) {
                self.i += 1;
            }
        }
    }

    /// Spaces, comments and newlines (also `\r\n`).
    fn skip_blank_lines(&mut self) {
        loop {
            self.skip_space();
            self.skip_comment();
            match self.peek() {
                Some(b'\n') => {
                    self.i += 1;
                    self.line += 1;
                }
                Some(b'\r') if self.s.get(self.i + 1) == Some(&b'\n') => self.i += 1,
                _ => return,
            }
        }
    }

    fn end_of_line(&mut self) -> Result<(), Error> {
        self.skip_space();
        self.skip_comment();
        if self.peek() == Some(b'\r') && self.s.get(self.i + 1) == Some(&b'\n') {
            self.i += 1;
        }
        match self.peek() {
            None | Some(b'\n') => Ok(()),
            Some(_) => err(
                self.line,
                "expected the end of the line after the value (one key = value per line)",
            ),
        }
    }

    fn key(&mut self) -> Result<String, Error> {
        match self.peek() {
            Some(b'"') | Some(b'\'') => {
                let k = self.string()?;
                if k.is_empty() {
                    return err(self.line, "a key cannot be empty");
                }
                Ok(k)
            }
            _ => {
                let start = self.i;
                while self
                    .peek()
                    .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    self.i += 1;
                }
                if start == self.i {
                    return err(
                        self.line,
                        "expected a key (letters, digits, _ and -) at the start of the line",
                    );
                }
                Ok(self.text[start..self.i].to_string())
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, Error> {
        let line = self.line;
        self.values += 1;
        if self.values > MAX_VALUES {
            return err(line, format!("more than {MAX_VALUES} values"));
        }
        match self.peek() {
            None | Some(b'\n' | b'\r' | b'#') => err(line, "expected a value after `=`"),
            Some(b'"' | b'\'') => self.string().map(Value::String),
            Some(b'[') => self.array(depth),
            Some(b'{') => err(
                line,
                "inline tables ({ … }) are not part of the agent's config",
            ),
            Some(_) => self.scalar(),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, Error> {
        if depth >= MAX_DEPTH {
            return err(
                self.line,
                format!("arrays nested more than {MAX_DEPTH} deep"),
            );
        }
        self.i += 1; // [
        let mut items = Vec::new();
        loop {
            self.skip_blank_lines();
            match self.peek() {
                None => return err(self.line, "an array is not closed with `]`"),
                Some(b']') => {
                    self.i += 1;
                    return Ok(Value::Array(items));
                }
                _ => {}
            }
            items.push(self.value(depth + 1)?);
            self.skip_blank_lines();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {}
                None => return err(self.line, "an array is not closed with `]`"),
                Some(_) => return err(self.line, "expected `,` or `]` in an array"),
            }
        }
    }

    fn string(&mut self) -> Result<String, Error> {
        let quote = self.s[self.i];
        let line = self.line;
        if self.s[self.i..].starts_with(if quote == b'"' { b"\"\"\"" } else { b"'''" }) {
            return err(
                line,
                "multi-line strings are not part of the agent's config",
            );
        }
        self.i += 1;
        let mut out = String::new();
        loop {
            let rest = &self.text[self.i..];
            let Some(c) = rest.chars().next() else {
                return err(line, "a string is not closed");
            };
            self.i += c.len_utf8();
            match c {
                '\n' => return err(line, "a string is not closed on its line"),
                c if c as u32 == quote as u32 => return Ok(out),
                '\\' if quote == b'"' => out.push(self.escape()?),
                c if c != '\t' && ((c as u32) < 0x20 || c == '\u{7f}') => {
                    return err(line, "control characters must be escaped in a string")
                }
                c => out.push(c),
            }
        }
    }

    fn escape(&mut self) -> Result<char, Error> {
        let line = self.line;
        let Some(c) = self.peek() else {
            return err(line, "a string is not closed");
        };
        self.i += 1;
        let hex = |p: &mut Self, n: usize| -> Result<char, Error> {
            let digits = p.text.get(p.i..p.i + n).unwrap_or("");
            let code = (digits.len() == n && digits.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(digits, 16).ok())
                .flatten();
            p.i += digits.len();
            match code.and_then(char::from_u32) {
                Some(c) => Ok(c),
                None => err(
                    line,
                    format!("\\u escape needs {n} hex digits of a valid character"),
                ),
            }
        };
        Ok(match c {
            b'b' => '\u{8}',
            b't' => '\t',
            b'n' => '\n',
            b'f' => '\u{c}',
            b'r' => '\r',
            b'"' => '"',
            b'\\' => '\\',
            b'u' => hex(self, 4)?,
            b'U' => hex(self, 8)?,
            other => {
                return err(
                    line,
                    format!("unknown escape \\{} in a string", other as char),
                )
            }
        })
    }

    /// true, false, an integer or a float.
    fn scalar(&mut self) -> Result<Value, Error> {
        let line = self.line;
        let start = self.i;
        while self.peek().is_some_and(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.' | b':')
        }) {
            self.i += 1;
        }
        let tok = &self.text[start..self.i];
        if tok.is_empty() {
            return err(
                line,
                "expected a value (a string in quotes, a number, true or false, or an array)",
            );
        }
        match tok {
            "true" => return Ok(Value::Bool(true)),
            "false" => return Ok(Value::Bool(false)),
            _ => {}
        }
        let digits_first = tok.as_bytes()[0].is_ascii_digit();
        if digits_first
            && (tok.contains(':')
                || (tok.len() >= 10
                    && tok.as_bytes()[4] == b'-'
                    && tok[..4].bytes().all(|b| b.is_ascii_digit())))
        {
            return err(
                line,
                format!("{tok}: dates and times are not part of the agent's config"),
            );
        }
        number(tok).ok_or_else(|| Error {
            line,
            message: format!(
                "{tok} is not a value: a string must be in quotes; numbers are like 10, -3, 2.5 or 1e3"
            ),
        })
    }
}

/// A TOML integer (decimal, or 0x/0o/0b) or float, with `_` between digits.
fn number(tok: &str) -> Option<Value> {
    for (prefix, radix) in [("0x", 16), ("0o", 8), ("0b", 2)] {
        if let Some(digits) = tok.strip_prefix(prefix) {
            // No sign anywhere, digits of the radix, `_` only between two of them.
            let ok = |b: u8| (b as char).is_digit(radix);
            if !underscores_between(digits, ok) {
                return None;
            }
            let clean: String = digits.chars().filter(|&c| c != '_').collect();
            if clean.is_empty() || !clean.bytes().all(ok) {
                return None;
            }
            return i64::from_str_radix(&clean, radix).ok().map(Value::from);
        }
    }
    let (negative, body) = match tok.as_bytes().first()? {
        b'+' => (false, &tok[1..]),
        b'-' => (true, &tok[1..]),
        _ => (false, tok),
    };
    // inf and nan are TOML, but no setting takes them (nor can JSON hold them).
    if matches!(body, "inf" | "nan") {
        return None;
    }
    // Decimal: `_` only between two decimal digits; the integer part has no leading
    // zero (TOML), whether the number is an integer or a float.
    if !underscores_between(body, |b| b.is_ascii_digit()) {
        return None;
    }
    let clean: String = body.chars().filter(|&c| c != '_').collect();
    let int_part = clean.split(['.', 'e', 'E']).next().unwrap_or("");
    if int_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || (int_part.len() > 1 && int_part.starts_with('0'))
    {
        return None;
    }
    let sign = if negative { "-" } else { "" };
    if !clean.contains(['.', 'e', 'E']) {
        return format!("{sign}{clean}")
            .parse::<i64>()
            .ok()
            .map(Value::from);
    }
    // A float: digits after the point; an exponent of digits with an optional sign.
    let rest = &clean[int_part.len()..];
    let (frac, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if let Some(f) = frac.strip_prefix('.') {
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    } else if !frac.is_empty() {
        return None;
    }
    if let Some(e) = exp {
        let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    let f: f64 = format!("{sign}{clean}").parse().ok()?;
    // Too large for a double (1e400) is refused, not read as infinity.
    if !f.is_finite() {
        return None;
    }
    serde_json::Number::from_f64(f).map(Value::Number)
}

/// Every `_` in `s` has a digit (by `digit`) on each side.
fn underscores_between(s: &str, digit: impl Fn(u8) -> bool) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().all(|(k, &c)| {
        c != b'_' || (k > 0 && k + 1 < b.len() && digit(b[k - 1]) && digit(b[k + 1]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(text: &str) -> Vec<(String, Value)> {
        parse(text)
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.value))
            .collect()
    }

    #[test]
    fn reads_what_the_config_uses() {
        let text = "# a comment\n\nid = \"dev-1\" # trailing\nbroker='mqtt://h:1883'\r\nmax_runs = 4\nrate = 2_000.5\nneg = -3\nbig = 1e3\nflag = true\noff=false\ntags = [\"a\",\n  'b', # c\n]\nempty = []\nhex = 0xff\nnested = [[1, 2], [3]]\n\"quoted-key\" = \"\\u00e9\\t\\\"x\\\"\"\n";
        assert_eq!(
            values(text),
            vec![
                ("id".into(), json!("dev-1")),
                ("broker".into(), json!("mqtt://h:1883")),
                ("max_runs".into(), json!(4)),
                ("rate".into(), json!(2000.5)),
                ("neg".into(), json!(-3)),
                ("big".into(), json!(1000.0)),
                ("flag".into(), json!(true)),
                ("off".into(), json!(false)),
                ("tags".into(), json!(["a", "b"])),
                ("empty".into(), json!([])),
                ("hex".into(), json!(255)),
                ("nested".into(), json!([[1, 2], [3]])),
                ("quoted-key".into(), json!("é\t\"x\"")),
            ]
        );
        let lines: Vec<usize> = parse(text).unwrap().iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![3, 4, 5, 6, 7, 8, 9, 10, 11, 14, 15, 16, 17]);
    }

    /// What TOML has and the config does not is refused by line and rule, as are
    /// malformed values; nothing is skipped.
    #[test]
    fn refuses_what_it_does_not_read() {
        let cases: &[(&str, usize, &str)] = &[
            ("a = 1\n[agent]\nb = 2\n", 2, "tables"),
            ("a.b = 1\n", 1, "dotted keys"),
            ("a = { b = 1 }\n", 1, "inline tables"),
            ("a = \"\"\"x\"\"\"\n", 1, "multi-line"),
            ("a = 1979-05-27\n", 1, "dates"),
            ("a = 07:32:00\n", 1, "dates"),
            ("a = 1\na = 2\n", 2, "set twice (first on line 1)"),
            ("a = \"open\n", 1, "not closed"),
            ("a = [1, 2\n", 2, "not closed"),
            ("a = [1 2]\n", 1, "expected `,` or `]`"),
            ("a = 1 b = 2\n", 1, "end of the line"),
            ("a = mqtt://x\n", 1, "must be in quotes"),
            ("a = hello\n", 1, "must be in quotes"),
            ("a = 012\n", 1, "not a value"),
            ("a = 1__0\n", 1, "not a value"),
            ("a = _1\n", 1, "not a value"),
            ("a = .5\n", 1, "not a value"),
            ("a = 99999999999999999999\n", 1, "not a value"),
            ("a = nan\n", 1, "not a value"),
            ("a = -inf\n", 1, "not a value"),
            ("a = 0x-1\n", 1, "not a value"),
            ("a = 0x+ff\n", 1, "not a value"),
            ("a = 0b-1\n", 1, "not a value"),
            ("a = 0x_ff\n", 1, "not a value"),
            ("a = 1_e3\n", 1, "not a value"),
            ("a = 1e_3\n", 1, "not a value"),
            ("a = 00.5\n", 1, "not a value"),
            ("a = -01.5\n", 1, "not a value"),
            ("a = 01e3\n", 1, "not a value"),
            ("a = 1.\n", 1, "not a value"),
            ("a = 1e\n", 1, "not a value"),
            ("a = 1e400\n", 1, "not a value"),
            ("a = 1.5.2\n", 1, "not a value"),
            ("a =\n", 1, "expected a value"),
            ("= 1\n", 1, "expected a key"),
            ("a 1\n", 1, "expected `=`"),
            ("a = \"\\q\"\n", 1, "unknown escape"),
            ("a = \"\\uD800\"\n", 1, "valid character"),
            ("a = \"\u{1}\"\n", 1, "control characters"),
            ("\n\n\"\" = 1\n", 3, "cannot be empty"),
        ];
        for (text, line, rule) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, *line, "{text:?}: {e}");
            assert!(e.message.contains(rule), "{text:?}: {e}");
        }
        let deep = format!("a = {}{}\n", "[".repeat(20), "]".repeat(20));
        assert!(parse(&deep).unwrap_err().message.contains("nested"));
        let many: String = (0..2000).map(|i| format!("k{i} = 1\n")).collect();
        assert!(parse(&many).unwrap_err().message.contains("more than"));
        let wide = format!("a = [{}]\n", "[],".repeat(20_000));
        assert!(parse(&wide)
            .unwrap_err()
            .message
            .contains("more than 16384 values"));
        let huge = format!("a = \"{}\"\n", "x".repeat(MAX_TEXT_BYTES));
        assert!(parse(&huge).unwrap_err().message.contains("at most"));
        // A byte-order mark is skipped.
        assert_eq!(parse("\u{feff}a = 1\n").unwrap()[0].key, "a");
        // Nothing panics on arbitrary bytes cut anywhere.
        let sample = "a = [\"x\\u00e9\", 'y', 1_000, -2.5e3, true] # c\nb = \"\\U0001F600\"\n";
        for cut in 0..=sample.len() {
            if let Some(s) = sample.get(..cut) {
                let _ = parse(s);
            }
        }
    }

    /// Random texts over TOML's punctuation: every one parses or is refused with a
    /// line inside the text, and none panics.
    #[test]
    fn random_texts_never_panic() {
        const ALPHABET: &[&str] = &[
            "a", "k_1", " ", "\t", "=", "\"", "'", "[", "]", "{", "}", ",", "#", "\n", "\r\n",
            "\\", "u", "U", "0", "1", "9", "_", ".", "e", "+", "-", "x", "o", "b", ":", "é",
            "true", "false", "inf", "nan", "\u{0}", "\u{7f}",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let text: String = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            if let Err(e) = parse(&text) {
                assert!(
                    e.line >= 1 && e.line <= text.lines().count().max(1) + 1,
                    "{text:?}: {e}"
                );
            }
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        name: String,
        count: u32,
        rate: f64,
        on: bool,
        tags: Vec<String>,
        opt: Option<String>,
    }

    /// Typed reading names the key and its line; writing reads back the same.
    #[test]
    fn typed_errors_name_the_key_and_line_and_writing_round_trips() {
        let ok: Cfg =
            from_str("name = \"n\"\ncount = 3\nrate = 2\non = true\ntags = [\"a\"]\n").unwrap();
        assert_eq!(
            ok,
            Cfg {
                name: "n".into(),
                count: 3,
                rate: 2.0,
                on: true,
                tags: vec!["a".into()],
                opt: None
            }
        );
        let e = from_str::<Cfg>("name = \"n\"\n\ncount = \"three\"\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.starts_with("count: invalid type"), "{e}");
        let e = from_str::<Cfg>("name = \"n\"\ncount = -1\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("count"), "{e}");
        let e = from_str::<Cfg>("name = \"n\"\nwhat = 1\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("unknown field `what`"), "{e}");

        let full = Cfg {
            name: "q\"\\\n\u{1}é".into(),
            count: 7,
            rate: 2000.0,
            on: false,
            tags: vec!["x".into(), "y z".into()],
            opt: Some("o".into()),
        };
        let text = to_string(&full).unwrap();
        assert!(text.starts_with("name = "), "field order: {text}");
        assert!(text.contains("rate = 2000.0\n"), "{text}");
        assert_eq!(from_str::<Cfg>(&text).unwrap(), full);
        let none = Cfg { opt: None, ..full };
        assert!(!to_string(&none).unwrap().contains("opt"));
        // What would not read back is refused.
        assert!(to_string(&json!({"big": u64::MAX})).is_err());
        let nums =
            "a = 1_000\nb = -0\nc = +7\nd = 0.5\ne = -2.5e-3\nf = 1E+2\ng = 0o17\nh = 0b1_0\n";
        let vals: Vec<Value> = parse(nums).unwrap().into_iter().map(|e| e.value).collect();
        assert_eq!(
            vals,
            vec![
                json!(1000),
                json!(0),
                json!(7),
                json!(0.5),
                json!(-0.0025),
                json!(100.0),
                json!(15),
                json!(2),
            ]
        );
        assert!(to_string(&json!({"a": {"b": 1}})).is_err());
    }
}
