//! Just enough JSON for a measurement module: a parser for the run's parameters (and
//! for what the built-in `ping` and `http` calls return) and a writer for its result.
//!
//! The parser takes any JSON text (objects, arrays, strings, numbers, booleans, null;
//! nesting up to [`MAX_DEPTH`] levels) and never panics: every malformed input is an
//! `Err` naming the byte where it went wrong. Numbers keep their text ([`Number`]):
//! integers are read exactly, without floating point. An object keeps its fields in
//! order; a key that appears twice is an error.
//!
//! The writer ([`ObjectWriter`]) escapes strings as RFC 8259 requires (quote,
//! backslash, every control character) and writes non-finite numbers as `null`.
//! Durations go best through [`ObjectWriter::ms_from_ns`] / [`ObjectWriter::fixed`],
//! integer arithmetic only: `f64` formatting (what [`ObjectWriter::float`] uses) adds
//! some 15 KiB to a module.
//!
//! ```
//! use imn_guest::json::{self, ObjectWriter, Params};
//!
//! let p = Params::parse(r#"{"server": "stun.example.net", "port": 3478}"#).unwrap();
//! assert_eq!(p.integer("port", 3478, 1, 65535).unwrap(), 3478);
//! assert_eq!(p.required_string("server", 253).unwrap(), "stun.example.net");
//!
//! let mut w = ObjectWriter::new();
//! w.string("banner", "SSH-2.0 \"x\"\n").int("port", 22).float("rtt_ms", 1.5);
//! assert_eq!(w.finish(), r#"{"banner":"SSH-2.0 \"x\"\n","port":22,"rtt_ms":1.5}"#);
//! assert!(json::parse("[1, 2,]").is_err());
//! ```

use std::fmt::Write as _;

/// Deepest nesting the parser accepts (arrays and objects).
pub const MAX_DEPTH: usize = 32;

/// A JSON number, kept as written (valid JSON number syntax): integers stay exact,
/// and a module that never asks for an `f64` links no float parsing.
#[derive(Debug, Clone, PartialEq)]
pub struct Number(String);

impl Number {
    /// The number's text, as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number as an integer, if it is one exactly (`3478`, `3478.0`, `3.478e3`)
    /// within the range of i64. No floating point involved.
    pub fn as_i64(&self) -> Option<i64> {
        let t = self.0.as_bytes();
        let (neg, t) = match t.split_first() {
            Some((b'-', rest)) => (true, rest),
            _ => (false, t),
        };
        let mant_end = t
            .iter()
            .position(|&b| b == b'e' || b == b'E')
            .unwrap_or(t.len());
        let (mant, exp) = t.split_at(mant_end);
        let mut scale: i64 = 0;
        if let Some(e) = exp.get(1..) {
            let (eneg, e) = match e.split_first() {
                Some((b'-', r)) => (true, r),
                Some((b'+', r)) => (false, r),
                _ => (false, e),
            };
            for &d in e {
                scale = (scale * 10 + i64::from(d - b'0')).min(100_000);
            }
            if eneg {
                scale = -scale;
            }
        }
        // The digits without the point; each fraction digit scales down by 10.
        let mut digits: Vec<u8> = Vec::with_capacity(mant.len());
        let mut in_fraction = false;
        for &b in mant {
            if b == b'.' {
                in_fraction = true;
            } else {
                digits.push(b - b'0');
                if in_fraction {
                    scale -= 1;
                }
            }
        }
        // Trailing zeros only scale up; leading zeros count for nothing.
        while digits.last() == Some(&0) && scale < 0 {
            digits.pop();
            scale += 1;
        }
        let first = digits.iter().position(|&d| d != 0).unwrap_or(digits.len());
        let digits = &digits[first..];
        if digits.is_empty() {
            return Some(0);
        }
        if scale < 0 || digits.len() as i64 + scale > 19 {
            return None;
        }
        let mut v: i128 = 0;
        for &d in digits {
            v = v * 10 + i128::from(d);
        }
        for _ in 0..scale {
            v *= 10;
        }
        i64::try_from(if neg { -v } else { v }).ok()
    }

    /// The number as an f64 (None if it is out of f64's range).
    pub fn as_f64(&self) -> Option<f64> {
        self.0.parse::<f64>().ok().filter(|n| n.is_finite())
    }
}

impl From<i64> for Number {
    fn from(n: i64) -> Number {
        Number(n.to_string())
    }
}

/// A parsed JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Value>),
    /// Fields in the order of the text; keys are unique.
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The field `key` of an object (None for anything else).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number as an f64 (see [`Number::as_f64`]).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => n.as_f64(),
            _ => None,
        }
    }

    /// The number as an integer, if it is one exactly (see [`Number::as_i64`]).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// "null", "boolean", "number", "string", "array" or "object".
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    /// Appends the value as compact JSON.
    pub fn write_json(&self, out: &mut String) {
        match self {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(&n.0),
            Value::String(s) => write_str(out, s),
            Value::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write_json(out);
                }
                out.push(']');
            }
            Value::Object(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, k);
                    out.push(':');
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }

    /// The value as compact JSON text.
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }
}

/// Parses one JSON text (surrounding whitespace allowed, nothing else after it).
pub fn parse(text: &str) -> Result<Value, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("unexpected text after the JSON value"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> String {
        format!("invalid JSON at byte {}: {what}", self.i)
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn literal(&mut self, word: &str, v: Value) -> Result<Value, String> {
        match self.s.get(self.i..self.i + word.len()) {
            Some(w) if w == word.as_bytes() => {
                self.i += word.len();
                Ok(v)
            }
            _ => Err(self.err("unknown literal")),
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        match self.peek() {
            None => Err(self.err("unexpected end of text")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.err("expected a value")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        self.i += 1; // '{'
        let mut fields: Vec<(String, Value)> = Vec::new();
        self.ws();
        if self.eat(b'}') {
            return Ok(Value::Object(fields));
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a string key"));
            }
            let key = self.string()?;
            if fields.iter().any(|(k, _)| *k == key) {
                return Err(self.err(&format!("duplicate key {}", Quoted(&key))));
            }
            self.ws();
            if !self.eat(b':') {
                return Err(self.err("expected ':'"));
            }
            self.ws();
            let v = self.value(depth)?;
            fields.push((key, v));
            self.ws();
            if self.eat(b',') {
                continue;
            }
            if self.eat(b'}') {
                return Ok(Value::Object(fields));
            }
            return Err(self.err("expected ',' or '}'"));
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        self.i += 1; // '['
        let mut items = Vec::new();
        self.ws();
        if self.eat(b']') {
            return Ok(Value::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth)?);
            self.ws();
            if self.eat(b',') {
                continue;
            }
            if self.eat(b']') {
                return Ok(Value::Array(items));
            }
            return Err(self.err("expected ',' or ']'"));
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(b @ b'0'..=b'9') => b - b'0',
                Some(b @ b'a'..=b'f') => b - b'a' + 10,
                Some(b @ b'A'..=b'F') => b - b'A' + 10,
                _ => return Err(self.err("expected 4 hex digits after \\u")),
            };
            v = v * 16 + u32::from(d);
            self.i += 1;
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // '"'
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                return Err(self.err("unterminated string"));
            };
            match b {
                b'"' => {
                    self.i += 1;
                    // The input is a &str and escapes add whole characters: still UTF-8.
                    return String::from_utf8(out).map_err(|_| self.err("string is not UTF-8"));
                }
                b'\\' => {
                    self.i += 1;
                    let Some(e) = self.peek() else {
                        return Err(self.err("unterminated escape"));
                    };
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) {
                                if !(self.eat(b'\\') && self.eat(b'u')) {
                                    return Err(self.err("lone surrogate in \\u escape"));
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(self.err("lone surrogate in \\u escape"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            match char::from_u32(code) {
                                Some(c) => c,
                                None => return Err(self.err("lone surrogate in \\u escape")),
                            }
                        }
                        _ => return Err(self.err("unknown escape")),
                    };
                    let mut tmp = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
                }
                0..=0x1f => return Err(self.err("control character in string")),
                _ => {
                    out.push(b);
                    self.i += 1;
                }
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.i;
        self.eat(b'-');
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("expected a digit")),
        }
        if self.eat(b'.') && self.digits() == 0 {
            return Err(self.err("expected a digit after '.'"));
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return Err(self.err("expected a digit in the exponent"));
            }
        }
        // Only ASCII digits, signs, '.' and 'e' were consumed: valid UTF-8.
        let text =
            std::str::from_utf8(&self.s[start..self.i]).map_err(|_| self.err("bad number"))?;
        Ok(Value::Number(Number(text.to_string())))
    }
}

/// Appends `s` as a JSON string: quoted, with `"`, `\` and every control character
/// (U+0000 to U+001F, and U+007F) escaped.
pub fn write_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    // Runs of characters that need no escape are copied whole.
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f | 0x7f => "",
            _ => continue,
        };
        // `b` is ASCII, so `i` is on a character boundary (`get` to link no panic).
        out.push_str(s.get(start..i).unwrap_or_default());
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(s.get(start..).unwrap_or_default());
    out.push('"');
}

/// How many bytes [`write_str`] writes for `s` (quotes included), without writing.
pub fn escaped_len(s: &str) -> usize {
    s.bytes().fold(2, |n, b| {
        n + match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0x00..=0x1f | 0x7f => 6,
            _ => 1,
        }
    })
}

/// `s` as a JSON string literal, for messages (e.g. naming a parameter).
pub struct Quoted<'a>(pub &'a str);

impl std::fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = String::with_capacity(self.0.len() + 2);
        write_str(&mut out, self.0);
        f.write_str(&out)
    }
}

/// `scaled / 10^decimals` as a JSON number, exactly (no floating point): trailing
/// zeros of the fraction left out. `decimals` at most 18.
pub fn write_fixed(out: &mut String, scaled: i64, decimals: u32) {
    let p = 10u64.pow(decimals.min(18));
    let a = scaled.unsigned_abs();
    let (int, mut frac) = (a / p, a % p);
    if scaled < 0 {
        out.push('-');
    }
    let _ = write!(out, "{int}");
    if frac != 0 {
        let mut width = decimals.min(18) as usize;
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        let _ = write!(out, ".{frac:0width$}");
    }
}

/// Appends a number; NaN and infinities (which JSON cannot carry) as `null`.
pub fn write_f64(out: &mut String, n: f64) {
    if n.is_finite() {
        // Rust's Display never uses an exponent: always a valid JSON number.
        let _ = write!(out, "{n}");
    } else {
        out.push_str("null");
    }
}

/// Writes one JSON object field by field, in call order.
///
/// Keys are not checked for duplicates: write each once.
#[derive(Debug, Clone)]
pub struct ObjectWriter {
    out: String,
    fields: usize,
}

impl Default for ObjectWriter {
    fn default() -> Self {
        ObjectWriter::new()
    }
}

impl ObjectWriter {
    pub fn new() -> ObjectWriter {
        let mut out = String::with_capacity(256);
        out.push('{');
        ObjectWriter { out, fields: 0 }
    }

    fn key(&mut self, key: &str) -> &mut String {
        if self.fields > 0 {
            self.out.push(',');
        }
        self.fields += 1;
        write_str(&mut self.out, key);
        self.out.push(':');
        &mut self.out
    }

    pub fn string(&mut self, key: &str, v: &str) -> &mut Self {
        write_str(self.key(key), v);
        self
    }

    pub fn int(&mut self, key: &str, v: i64) -> &mut Self {
        let _ = write!(self.key(key), "{v}");
        self
    }

    pub fn uint(&mut self, key: &str, v: u64) -> &mut Self {
        let _ = write!(self.key(key), "{v}");
        self
    }

    /// A number; NaN and infinities as `null`.
    pub fn float(&mut self, key: &str, v: f64) -> &mut Self {
        write_f64(self.key(key), v);
        self
    }

    /// `scaled / 10^decimals`, exactly, without floating point (see [`write_fixed`]).
    pub fn fixed(&mut self, key: &str, scaled: i64, decimals: u32) -> &mut Self {
        write_fixed(self.key(key), scaled, decimals);
        self
    }

    /// A duration given in nanoseconds, as milliseconds with 3 decimals (rounded to
    /// the microsecond), without floating point.
    pub fn ms_from_ns(&mut self, key: &str, ns: i64) -> &mut Self {
        self.fixed(key, ns.saturating_add(500).div_euclid(1000), 3)
    }

    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.key(key).push_str(if v { "true" } else { "false" });
        self
    }

    pub fn null(&mut self, key: &str) -> &mut Self {
        self.key(key).push_str("null");
        self
    }

    /// An array of strings.
    pub fn strings<I, S>(&mut self, key: &str, items: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let out = self.key(key);
        out.push('[');
        for (i, s) in items.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_str(out, s.as_ref());
        }
        out.push(']');
        self
    }

    /// Any parsed value (e.g. part of what `ping` returned).
    pub fn value(&mut self, key: &str, v: &Value) -> &mut Self {
        v.write_json(self.key(key));
        self
    }

    /// A nested object.
    pub fn object(&mut self, key: &str, v: ObjectWriter) -> &mut Self {
        let inner = v.finish();
        self.key(key).push_str(&inner);
        self
    }

    /// The object's JSON text.
    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

/// A run's parameters: a JSON object, with typed, bounded getters whose errors name the
/// parameter (fit to return from a module's run function as they are).
///
/// A field whose value is `null` counts as absent.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    fields: Vec<(String, Value)>,
}

impl Params {
    /// The run's parameters, from the host.
    pub fn load() -> Result<Params, String> {
        let text = crate::try_params().map_err(|e| format!("reading the parameters: {e}"))?;
        Params::parse(&text)
    }

    /// Parameters from JSON text, which must be an object.
    pub fn parse(text: &str) -> Result<Params, String> {
        match parse(text).map_err(|e| format!("parameters: {e}"))? {
            Value::Object(fields) => Ok(Params { fields }),
            v => Err(format!(
                "parameters: expected a JSON object, not {}",
                v.type_name()
            )),
        }
    }

    /// The field `key`, unless absent or null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    /// Every field as parsed.
    pub fn fields(&self) -> &[(String, Value)] {
        &self.fields
    }

    /// Errs on the first field whose name is not in `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), String> {
        match self
            .fields
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((k, _)) => Err(format!(
                "unknown parameter {} (known: {})",
                Quoted(k),
                known.join(", ")
            )),
            None => Ok(()),
        }
    }

    /// A string of at most `max_len` bytes, if present.
    pub fn string(&self, key: &str, max_len: usize) -> Result<Option<&str>, String> {
        let k = Quoted(key);
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.len() <= max_len => Ok(Some(s)),
            Some(Value::String(_)) => Err(format!("parameter {k} is longer than {max_len} bytes")),
            Some(v) => Err(format!(
                "parameter {k} must be a string, not {}",
                v.type_name()
            )),
        }
    }

    /// A non-empty string of at most `max_len` bytes that must be present.
    pub fn required_string(&self, key: &str, max_len: usize) -> Result<&str, String> {
        let k = Quoted(key);
        match self.string(key, max_len)? {
            Some("") => Err(format!("parameter {k} must not be empty")),
            Some(s) => Ok(s),
            None => Err(format!("parameter {k} is required")),
        }
    }

    /// An integer in `min..=max`, `default` if absent.
    pub fn integer(&self, key: &str, default: i64, min: i64, max: i64) -> Result<i64, String> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.required_integer(key, min, max),
        }
    }

    /// An integer in `min..=max` that must be present.
    pub fn required_integer(&self, key: &str, min: i64, max: i64) -> Result<i64, String> {
        let k = Quoted(key);
        let v = self
            .get(key)
            .ok_or_else(|| format!("parameter {k} is required"))?;
        match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            Some(_) => Err(format!("parameter {k} must be {min} to {max}")),
            None => Err(match v {
                Value::Number(_) => format!("parameter {k} must be an integer"),
                v => format!("parameter {k} must be an integer, not {}", v.type_name()),
            }),
        }
    }

    /// A boolean, `default` if absent.
    pub fn boolean(&self, key: &str, default: bool) -> Result<bool, String> {
        let k = Quoted(key);
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(format!(
                "parameter {k} must be a boolean, not {}",
                v.type_name()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_json_allows() {
        let v = parse(
            r#" {"a": [1, -2.5e3, 0.25, true, false, null], "b": {"c": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"}, "d": ""} "#,
        )
        .unwrap();
        let a = v.get("a").unwrap().as_array().unwrap();
        assert_eq!(a[0].as_i64(), Some(1));
        assert_eq!(a[1].as_f64(), Some(-2500.0));
        assert_eq!(a[2].as_i64(), None);
        assert_eq!(a[3], Value::Bool(true));
        assert!(a[5].is_null());
        assert_eq!(
            v.get("b").unwrap().get("c").unwrap().as_str(),
            Some("x\"\\/\u{8}\u{c}\n\r\té😀")
        );
        assert_eq!(parse("\"é\"").unwrap().as_str(), Some("é"));
        assert_eq!(parse("[]").unwrap(), Value::Array(vec![]));
        assert_eq!(parse("{}").unwrap(), Value::Object(vec![]));
    }

    #[test]
    fn rejects_what_json_does_not() {
        for bad in [
            "",
            " ",
            "{",
            "}",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{a:1}",
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "+1",
            "tru",
            "nul",
            "\"abc",
            "\"\\x\"",
            "\"\\u12\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "\"a\nb\"",
            "1 2",
            "{\"a\":1}x",
            "{\"a\":1,\"a\":2}",
            "NaN",
            "[\"\\",
            "\"\\u",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(parse(&deep).unwrap_err().contains("deeply"));
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse(&ok).is_ok());
        // Truncations of a valid text never panic.
        let text = r#"{"a":[1,2.5e-3,"\u00e9\ud83d\ude00",{"b":null}],"c":true}"#;
        for i in 0..text.len() {
            if let Some(t) = text.get(..i) {
                assert!(parse(t).is_err());
            }
        }
    }

    #[test]
    fn numbers_are_exact() {
        let int = |t: &str| parse(t).unwrap().as_i64();
        assert_eq!(int("3478"), Some(3478));
        assert_eq!(int("3478.0"), Some(3478));
        assert_eq!(int("3.478e3"), Some(3478));
        assert_eq!(int("3478E+0"), Some(3478));
        assert_eq!(int("100e-2"), Some(1));
        assert_eq!(int("-0"), Some(0));
        assert_eq!(int("0.000"), Some(0));
        assert_eq!(int("0e99999999999999999999"), Some(0));
        assert_eq!(int("-12"), Some(-12));
        assert_eq!(int("3.4785e3"), None);
        assert_eq!(int("1e-2"), None);
        assert_eq!(int("0.5"), None);
        assert_eq!(int("9223372036854775807"), Some(i64::MAX));
        assert_eq!(int("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(int("9223372036854775808"), None);
        assert_eq!(int("1e18"), Some(1_000_000_000_000_000_000));
        assert_eq!(int("1e19"), None);
        assert_eq!(int("12e1000000"), None);
        assert_eq!(int("0.0001e4"), Some(1));
        assert_eq!(parse("1e999").unwrap().as_f64(), None);
        assert_eq!(parse("0.25").unwrap().as_f64(), Some(0.25));
        assert_eq!(parse("[1.50,-0]").unwrap().to_json(), "[1.50,-0]");
        let fixed = |v: i64, d: u32| {
            let mut s = String::new();
            write_fixed(&mut s, v, d);
            s
        };
        assert_eq!(fixed(1234, 3), "1.234");
        assert_eq!(fixed(1200, 3), "1.2");
        assert_eq!(fixed(1000, 3), "1");
        assert_eq!(fixed(5, 3), "0.005");
        assert_eq!(fixed(-5, 3), "-0.005");
        assert_eq!(fixed(0, 3), "0");
        assert_eq!(fixed(i64::MIN, 0), "-9223372036854775808");
        assert_eq!(fixed(42, 0), "42");
        let mut w = ObjectWriter::new();
        w.ms_from_ns("a", 1_234_567)
            .ms_from_ns("b", 499)
            .ms_from_ns("c", 2_000_000_000);
        assert_eq!(w.finish(), r#"{"a":1.235,"b":0,"c":2000}"#);
    }

    #[test]
    fn writes_valid_escaped_json() {
        let mut w = ObjectWriter::new();
        w.string("s", "a\"b\\c\n\u{1}\u{7f}é")
            .int("i", -3)
            .uint("u", 7)
            .float("f", 0.125)
            .float("nan", f64::NAN)
            .bool("b", true)
            .null("n")
            .strings("l", ["x", "y\""]);
        let mut inner = ObjectWriter::new();
        inner.int("k", 1);
        w.object("o", inner);
        let text = w.finish();
        assert_eq!(
            text,
            r#"{"s":"a\"b\\c\n\u0001\u007fé","i":-3,"u":7,"f":0.125,"nan":null,"b":true,"n":null,"l":["x","y\""],"o":{"k":1}}"#
        );
        for s in [
            "",
            "plain",
            "é\"😀\u{1f}x\\",
            "a\"b\\c\n\u{1}\u{7f}é",
            "\t\r\u{8}\u{c}",
        ] {
            let mut out = String::new();
            write_str(&mut out, s);
            assert_eq!(out.len(), escaped_len(s), "{s:?}");
            assert_eq!(parse(&out).unwrap().as_str(), Some(s));
        }
        let back = parse(&text).unwrap();
        assert_eq!(
            back.get("s").unwrap().as_str(),
            Some("a\"b\\c\n\u{1}\u{7f}é")
        );
        assert_eq!(back.to_json(), text);
        assert_eq!(ObjectWriter::new().finish(), "{}");
        let mut big = String::new();
        write_f64(&mut big, 1e300);
        assert!(parse(&big).is_ok());
    }

    #[test]
    fn params_are_typed_and_bounded() {
        let p =
            Params::parse(r#"{"host":"h","port":22,"t":1.5,"s":"","n":null,"b":true,"big":70000}"#)
                .unwrap();
        assert_eq!(p.required_string("host", 253).unwrap(), "h");
        assert!(p.required_string("host", 0).unwrap_err().contains("longer"));
        assert!(p.required_string("s", 10).unwrap_err().contains("empty"));
        assert!(p.required_string("n", 10).unwrap_err().contains("required"));
        assert!(p
            .required_string("port", 10)
            .unwrap_err()
            .contains("string"));
        assert_eq!(p.integer("port", 1, 1, 65535).unwrap(), 22);
        assert_eq!(p.integer("absent", 9, 1, 65535).unwrap(), 9);
        assert_eq!(p.integer("n", 9, 1, 65535).unwrap(), 9);
        assert!(p
            .integer("big", 1, 1, 65535)
            .unwrap_err()
            .contains("1 to 65535"));
        assert!(p
            .integer("t", 1, 1, 65535)
            .unwrap_err()
            .contains("must be an integer"));
        assert!(p
            .integer("host", 1, 1, 65535)
            .unwrap_err()
            .contains("string"));
        assert!(p.boolean("b", false).unwrap());
        assert!(p.only(&["host"]).unwrap_err().contains("\"port\""));
        assert!(Params::parse("[]").is_err());
        assert!(Params::parse("{").is_err());
    }
}
