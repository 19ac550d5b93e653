//! Manifest text → JSON values, read the way kubectl and the kubelet read it: YAML 1.1 scalars
//! resolved by go-yaml v2's rules (what `sigs.k8s.io/yaml`'s `YAMLToJSON` uses), so
//! `defaultMode: 0400` is 256, `0x1F` is 31, `yes`/`on`/`off` are booleans, `1_000` is 1000,
//! and a quoted scalar stays a string. The JSON is then decoded into the typed object with the
//! same type errors upstream gives (a boolean where a string is expected is an error). Input that
//! starts with `{` is JSON and is read as JSON, as upstream's `ToJSON` does.
//!
//! The YAML event parser is `granit-parser` (already in the tree through `serde-saphyr`); the
//! tree is built here by hand because no maintained crate resolves YAML 1.1 scalars to JSON,
//! and building it ourselves is what lets every cost be bounded while parsing: the file's size
//! is checked before it is read, nesting is refused past [`Limits::max_depth`] without reading
//! further, and an alias is expanded only while the nodes and scalar bytes it would add keep
//! the document under [`Limits::max_nodes`] and [`Limits::max_scalar_bytes`].

use std::collections::HashMap;

use granit_parser::{Event, Parser, ScalarStyle};
use serde_json::{Map, Number, Value};

/// Bounds on one manifest file.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The file's size: the API server's request body limit (3 MiB).
    pub max_bytes: u64,
    /// Collections nested in each other; a Pod needs about a dozen.
    pub max_depth: usize,
    /// Nodes of a document, counting every alias expansion.
    pub max_nodes: usize,
    /// Bytes of scalars of a document, counting every alias expansion.
    pub max_scalar_bytes: usize,
}

/// The limits the manifest folder applies.
pub const LIMITS: Limits = Limits {
    max_bytes: 3 * 1024 * 1024,
    max_depth: 64,
    max_nodes: 250_000,
    max_scalar_bytes: 8 * 1024 * 1024,
};

/// Why a file's text gives no JSON.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum YamlError {
    /// The file is larger than [`Limits::max_bytes`].
    #[error("the file is {size} bytes, more than the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    /// Not YAML (or not JSON, for text starting with `{`).
    #[error("{0}")]
    Syntax(String),
    /// Nesting deeper than [`Limits::max_depth`].
    #[error("line {line}: nesting deeper than {limit} levels")]
    TooDeep { line: usize, limit: usize },
    /// Alias expansion (or plain size) past [`Limits::max_nodes`].
    #[error("line {line}: more than {limit} nodes (aliases expanded)")]
    TooManyNodes { line: usize, limit: usize },
    /// Alias expansion past [`Limits::max_scalar_bytes`].
    #[error("line {line}: more than {limit} bytes of scalars (aliases expanded)")]
    TooManyBytes { line: usize, limit: usize },
    /// A scalar whose explicit tag does not fit its value (`!!int abc`).
    #[error("line {line}: cannot decode {found} `{value}` as a {tag}")]
    Tag {
        line: usize,
        found: &'static str,
        value: String,
        tag: &'static str,
    },
    /// What JSON cannot hold: a null or collection as a map key, NaN or infinity.
    #[error("line {line}: {detail}")]
    NotJson { line: usize, detail: String },
}

/// One resolved scalar, before it becomes JSON.
#[derive(Clone, Debug, PartialEq)]
enum Scalar {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
}

/// Resolves a plain (untagged) scalar as go-yaml v2 does.
fn resolve_plain(s: &str) -> Scalar {
    let Some(&first) = s.as_bytes().first() else {
        return Scalar::Null;
    };
    match s {
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return Scalar::Bool(true)
        }
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return Scalar::Bool(false)
        }
        "~" | "null" | "Null" | "NULL" => return Scalar::Null,
        ".nan" | ".NaN" | ".NAN" => return Scalar::Float(f64::NAN),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Scalar::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Scalar::Float(f64::NEG_INFINITY),
        _ => {}
    }
    match first {
        b'.' if is_yaml_float(s) => {
            if let Ok(f) = s.parse::<f64>() {
                return Scalar::Float(f);
            }
        }
        b'0'..=b'9' | b'+' | b'-' => {
            if starts_like_timestamp(s) {
                // go-yaml reads it as a timestamp and hands it back as its text.
                return Scalar::Str(s.to_string());
            }
            let plain: String = s.chars().filter(|&c| c != '_').collect();
            if let Some(n) = parse_go_int(&plain) {
                return n;
            }
            if is_yaml_float(&plain) {
                if let Ok(f) = plain.parse::<f64>() {
                    return Scalar::Float(f);
                }
            }
        }
        _ => {}
    }
    Scalar::Str(s.to_string())
}

/// go-yaml tries a timestamp first for unquoted scalars; any that starts with four digits and a
/// dash is either a timestamp or a string, never a number, so it stays text either way.
fn starts_like_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() > 4 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-'
}

/// `strconv.ParseInt(s, 0, 64)`, then `ParseUint`: an optional sign, then `0x`/`0o`/`0b`
/// prefixes, a leading `0` for octal, or decimal digits.
fn parse_go_int(s: &str) -> Option<Scalar> {
    let (negative, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) =
        if let Some(d) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            (16, d)
        } else if let Some(d) = body.strip_prefix("0o").or_else(|| body.strip_prefix("0O")) {
            (8, d)
        } else if let Some(d) = body.strip_prefix("0b").or_else(|| body.strip_prefix("0B")) {
            (2, d)
        } else if body.len() > 1 && body.starts_with('0') {
            (8, &body[1..])
        } else {
            (10, body)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = u64::from_str_radix(digits, radix).ok()?;
    if negative {
        if magnitude <= i64::MAX as u64 + 1 {
            return Some(Scalar::Int((magnitude as i128).wrapping_neg() as i64));
        }
        return None;
    }
    match i64::try_from(magnitude) {
        Ok(n) => Some(Scalar::Int(n)),
        // Past i64 only ParseUint reads it, and ParseUint takes no sign.
        Err(_) if s.starts_with('+') => None,
        Err(_) => Some(Scalar::Uint(magnitude)),
    }
}

/// go-yaml's `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`.
fn is_yaml_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    } else {
        if digits(&mut i) == 0 {
            return false;
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            digits(&mut i);
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

fn tag_name(s: &Scalar) -> &'static str {
    match s {
        Scalar::Null => "!!null",
        Scalar::Bool(_) => "!!bool",
        Scalar::Int(_) | Scalar::Uint(_) => "!!int",
        Scalar::Float(_) => "!!float",
        Scalar::Str(_) => "!!str",
    }
}

/// A scalar with its style and explicit core tag (if any) resolved as go-yaml does.
fn resolve(
    value: &str,
    style: ScalarStyle,
    tag: Option<&str>,
    line: usize,
) -> Result<Scalar, YamlError> {
    let tag = match tag {
        Some(t) => t,
        None if style == ScalarStyle::Plain => return Ok(resolve_plain(value)),
        None => return Ok(Scalar::Str(value.to_string())),
    };
    let wanted: &'static str = match tag {
        "null" => "!!null",
        "bool" => "!!bool",
        "int" => "!!int",
        "float" => "!!float",
        // !!str, !!binary, !!timestamp and custom tags: the text.
        _ => return Ok(Scalar::Str(value.to_string())),
    };
    let resolved = resolve_plain(value);
    match (&resolved, wanted) {
        (r, w) if tag_name(r) == w => Ok(resolved),
        (Scalar::Int(n), "!!float") => Ok(Scalar::Float(*n as f64)),
        (Scalar::Uint(n), "!!float") => Ok(Scalar::Float(*n as f64)),
        (r, _) => Err(YamlError::Tag {
            line,
            found: tag_name(r),
            value: value.chars().take(64).collect(),
            tag: wanted,
        }),
    }
}

/// Go's `strconv.FormatFloat(f, 'g', -1, 32)` closely enough for map keys.
fn float_key(f: f64) -> String {
    if f.is_nan() {
        ".nan".into()
    } else if f == f64::INFINITY {
        ".inf".into()
    } else if f == f64::NEG_INFINITY {
        "-.inf".into()
    } else {
        (f as f32).to_string()
    }
}

fn scalar_to_json(s: Scalar, line: usize) -> Result<Value, YamlError> {
    Ok(match s {
        Scalar::Null => Value::Null,
        Scalar::Bool(b) => Value::Bool(b),
        Scalar::Int(n) => Value::from(n),
        Scalar::Uint(n) => Value::from(n),
        Scalar::Str(s) => Value::String(s),
        Scalar::Float(f) if !f.is_finite() => {
            let text = if f.is_nan() {
                "NaN"
            } else if f > 0.0 {
                "+Inf"
            } else {
                "-Inf"
            };
            return Err(YamlError::NotJson {
                line,
                detail: format!("json: unsupported value: {text}"),
            });
        }
        // encoding/json writes an integral float without a fraction, so it decodes into an
        // integer field.
        Scalar::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e18 => Value::from(f as i64),
        Scalar::Float(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
    })
}

/// A map key: strings as they are, numbers and booleans as text, anything else refused (as
/// `YAMLToJSON` refuses it).
fn key_text(key: &Value, line: usize) -> Result<String, YamlError> {
    match key {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) if n.is_f64() => Ok(float_key(n.as_f64().unwrap_or_default())),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(YamlError::NotJson {
            line,
            detail: format!("unsupported map key: {}", truncate(&other.to_string(), 64)),
        }),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// A map key waiting for its value: `<<` (plain) is a merge.
enum Key {
    Merge,
    Plain(String),
}

enum Frame {
    Seq {
        items: Vec<Value>,
        anchor: usize,
        start: Counts,
        height: usize,
    },
    Map {
        map: Map<String, Value>,
        key: Option<Key>,
        anchor: usize,
        start: Counts,
        height: usize,
    },
}

#[derive(Clone, Copy, Default)]
struct Counts {
    nodes: usize,
    bytes: usize,
}

/// An anchored node: its value, what it costs to expand, and its height.
struct Anchored {
    value: Value,
    cost: Counts,
    height: usize,
}

/// Builds one stream's documents.
struct Builder {
    limits: Limits,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Anchored>,
    counts: Counts,
    docs: Vec<Value>,
    line: usize,
}

impl Builder {
    fn charge(&mut self, nodes: usize, bytes: usize) -> Result<(), YamlError> {
        self.counts.nodes = self.counts.nodes.saturating_add(nodes);
        self.counts.bytes = self.counts.bytes.saturating_add(bytes);
        if self.counts.nodes > self.limits.max_nodes {
            return Err(YamlError::TooManyNodes {
                line: self.line,
                limit: self.limits.max_nodes,
            });
        }
        if self.counts.bytes > self.limits.max_scalar_bytes {
            return Err(YamlError::TooManyBytes {
                line: self.line,
                limit: self.limits.max_scalar_bytes,
            });
        }
        Ok(())
    }

    fn open(&mut self, map: bool, anchor: usize) -> Result<(), YamlError> {
        self.charge(1, 0)?;
        if self.stack.len() >= self.limits.max_depth {
            return Err(YamlError::TooDeep {
                line: self.line,
                limit: self.limits.max_depth,
            });
        }
        let start = self.counts;
        self.stack.push(if map {
            Frame::Map {
                map: Map::new(),
                key: None,
                anchor,
                start,
                height: 1,
            }
        } else {
            Frame::Seq {
                items: Vec::new(),
                anchor,
                start,
                height: 1,
            }
        });
        Ok(())
    }

    fn close(&mut self) -> Result<(), YamlError> {
        let Some(frame) = self.stack.pop() else {
            return Ok(());
        };
        let (value, anchor, start, height) = match frame {
            Frame::Seq {
                items,
                anchor,
                start,
                height,
            } => (Value::Array(items), anchor, start, height),
            Frame::Map {
                map,
                anchor,
                start,
                height,
                ..
            } => (Value::Object(map), anchor, start, height),
        };
        if anchor != 0 {
            let cost = Counts {
                nodes: self.counts.nodes - start.nodes + 1,
                bytes: self.counts.bytes - start.bytes,
            };
            self.anchors.insert(
                anchor,
                Anchored {
                    value: value.clone(),
                    cost,
                    height,
                },
            );
        }
        self.add(value, height, false)
    }

    /// Adds a finished node to the collection being built (or ends a document).
    fn add(&mut self, value: Value, height: usize, merge_key: bool) -> Result<(), YamlError> {
        let line = self.line;
        match self.stack.last_mut() {
            None => self.docs.push(value),
            Some(Frame::Seq {
                items, height: h, ..
            }) => {
                *h = (*h).max(height + 1);
                items.push(value);
            }
            Some(Frame::Map {
                map,
                key,
                height: h,
                ..
            }) => {
                *h = (*h).max(height + 1);
                match key.take() {
                    None if merge_key => *key = Some(Key::Merge),
                    None => *key = Some(Key::Plain(key_text(&value, line)?)),
                    Some(Key::Plain(k)) => {
                        map.insert(k, value);
                    }
                    Some(Key::Merge) => merge(map, value, line)?,
                }
            }
        }
        Ok(())
    }

    fn scalar(
        &mut self,
        text: &str,
        style: ScalarStyle,
        tag: Option<&str>,
        anchor: usize,
    ) -> Result<(), YamlError> {
        self.charge(1, text.len())?;
        let merge_key = style == ScalarStyle::Plain
            && tag.is_none()
            && text == "<<"
            && matches!(self.stack.last(), Some(Frame::Map { key: None, .. }));
        let value = scalar_to_json(resolve(text, style, tag, self.line)?, self.line)?;
        if anchor != 0 {
            self.anchors.insert(
                anchor,
                Anchored {
                    value: value.clone(),
                    cost: Counts {
                        nodes: 1,
                        bytes: text.len(),
                    },
                    height: 0,
                },
            );
        }
        self.add(value, 0, merge_key)
    }

    fn alias(&mut self, id: usize) -> Result<(), YamlError> {
        let Some(anchored) = self.anchors.get(&id) else {
            return Err(YamlError::Syntax(format!(
                "line {}: unknown anchor",
                self.line
            )));
        };
        let (cost, height) = (anchored.cost, anchored.height);
        if self.stack.len() + height > self.limits.max_depth {
            return Err(YamlError::TooDeep {
                line: self.line,
                limit: self.limits.max_depth,
            });
        }
        self.charge(cost.nodes, cost.bytes)?;
        let value = self.anchors[&id].value.clone();
        self.add(value, height, false)
    }
}

/// `<<: value` in a map: a map's keys (or each map's of a list, the first winning) are set.
fn merge(map: &mut Map<String, Value>, value: Value, line: usize) -> Result<(), YamlError> {
    let refused = || YamlError::NotJson {
        line,
        detail: "map merge requires map or sequence of maps as the value".into(),
    };
    match value {
        Value::Object(m) => {
            for (k, v) in m {
                map.insert(k, v);
            }
        }
        Value::Array(items) => {
            for item in items.into_iter().rev() {
                let Value::Object(m) = item else {
                    return Err(refused());
                };
                for (k, v) in m {
                    map.insert(k, v);
                }
            }
        }
        _ => return Err(refused()),
    }
    Ok(())
}

/// The documents of a manifest file, as JSON. Empty documents are `null`.
pub fn documents(text: &str, limits: Limits) -> Result<Vec<Value>, YamlError> {
    if text.len() as u64 > limits.max_bytes {
        return Err(YamlError::TooLarge {
            size: text.len() as u64,
            limit: limits.max_bytes,
        });
    }
    if text.trim_start().starts_with('{') {
        return json_documents(text);
    }
    let mut builder = Builder {
        limits,
        stack: Vec::new(),
        anchors: HashMap::new(),
        counts: Counts::default(),
        docs: Vec::new(),
        line: 1,
    };
    let mut parser = Parser::new_from_str(text);
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| YamlError::Syntax(e.to_string()))?;
        builder.line = span.start.line();
        match event {
            Event::DocumentStart(..) => {
                builder.anchors.clear();
                builder.counts = Counts::default();
            }
            Event::MappingStart(_, anchor, _) => builder.open(true, anchor)?,
            Event::SequenceStart(_, anchor, _) => builder.open(false, anchor)?,
            Event::MappingEnd | Event::SequenceEnd => builder.close()?,
            Event::Scalar(text, style, anchor, tag) => {
                // A tag outside the core schema (`!!binary`, `!foo`) keeps the text.
                let tag = tag
                    .as_deref()
                    .map(|t| t.core_suffix().unwrap_or("other").to_string());
                builder.scalar(&text, style, tag.as_deref(), anchor)?
            }
            Event::Alias(id) => builder.alias(id)?,
            _ => {}
        }
    }
    Ok(builder.docs)
}

/// Concatenated JSON values (what upstream reads as JSON), with serde_json's own depth limit.
fn json_documents(text: &str) -> Result<Vec<Value>, YamlError> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map(|v| v.map_err(|e| YamlError::Syntax(e.to_string())))
        .collect()
}

/// Decodes a JSON value into a typed object; the error names the field's path.
pub fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> Value {
        let mut docs = documents(text, LIMITS).unwrap();
        assert_eq!(docs.len(), 1, "{text:?}");
        docs.remove(0)
    }

    fn value(scalar: &str) -> Value {
        one(&format!("v: {scalar}\n"))["v"].clone()
    }

    #[test]
    fn plain_scalars_resolve_as_go_yaml_v2_resolves_them() {
        let cases = [
            ("0400", json!(256)),
            ("0o17", json!(15)),
            ("0x1F", json!(31)),
            ("-0x1F", json!(-31)),
            ("0b101", json!(5)),
            ("-0b101", json!(-5)),
            ("1_000", json!(1000)),
            ("+12", json!(12)),
            ("0", json!(0)),
            ("09", json!(9)),
            ("1.5", json!(1.5)),
            ("1e3", json!(1000)),
            (".5", json!(0.5)),
            ("18446744073709551615", json!(18446744073709551615u64)),
            ("-9223372036854775808", json!(i64::MIN)),
            ("yes", json!(true)),
            ("Yes", json!(true)),
            ("on", json!(true)),
            ("y", json!(true)),
            ("TRUE", json!(true)),
            ("no", json!(false)),
            ("off", json!(false)),
            ("N", json!(false)),
            ("~", json!(null)),
            ("null", json!(null)),
            ("", json!(null)),
            ("yES", json!("yES")),
            ("0x", json!("0x")),
            ("08x", json!("08x")),
            ("2001-12-14", json!("2001-12-14")),
            ("1.2.3", json!("1.2.3")),
            ("64Mi", json!("64Mi")),
            ("'0400'", json!("0400")),
            ("\"yes\"", json!("yes")),
            ("!!str 12", json!("12")),
            ("!!int \"12\"", json!(12)),
            ("!!float 3", json!(3)),
            ("99999999999999999999", json!(1e20)),
        ];
        for (scalar, expected) in cases {
            assert_eq!(value(scalar), expected, "{scalar:?}");
        }
    }

    #[test]
    fn what_json_cannot_hold_is_refused_as_upstream_refuses_it() {
        for (text, expected) in [
            ("v: .nan\n", "unsupported value: NaN"),
            ("v: -.inf\n", "unsupported value: -Inf"),
            ("? [a]\n: b\n", "unsupported map key"),
            ("~: b\n", "unsupported map key"),
            ("v: !!int abc\n", "cannot decode !!str `abc` as a !!int"),
        ] {
            let err = documents(text, LIMITS).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn keys_are_text_merges_apply_and_documents_split() {
        assert_eq!(
            one("1: a\ntrue: b\n0x10: c\n"),
            json!({"1": "a", "true": "b", "16": "c"})
        );
        assert_eq!(
            one("base: &b {x: 1, q: 2}\nv:\n  <<: *b\n  q: 3\n")["v"],
            json!({"x": 1, "q": 3})
        );
        assert_eq!(
            one("a: &a {x: 1}\nb: &b {x: 2, z: 2}\nv:\n  <<: [*a, *b]\n")["v"],
            json!({"x": 1, "z": 2})
        );
        assert_eq!(one("'<<': 1\n"), json!({"<<": 1}));
        let docs = documents("a: 1\n---\n---\nb: 2\n", LIMITS).unwrap();
        assert_eq!(docs, vec![json!({"a": 1}), json!(null), json!({"b": 2})]);
    }

    #[test]
    fn json_text_is_read_as_json() {
        let docs = documents("{\"a\": 1.0, \"b\": \"yes\"}\n{\"c\": 2}", LIMITS).unwrap();
        assert_eq!(docs, vec![json!({"a": 1.0, "b": "yes"}), json!({"c": 2})]);
    }

    #[test]
    fn typed_decoding_gives_upstreams_type_errors_with_the_path() {
        use k8s_openapi::api::core::v1::Pod;
        let pod = |c: &str| {
            one(&format!(
                "kind: Pod\nmetadata: {{name: p}}\nspec:\n  containers:\n  - name: c\n    image: i\n{c}"
            ))
        };
        let ok: Pod = typed(pod("    tty: yes\n")).unwrap();
        assert_eq!(ok.spec.unwrap().containers[0].tty, Some(true));
        let err = typed::<Pod>(pod("    workingDir: yes\n")).unwrap_err();
        assert!(err.contains("spec.containers[0].workingDir"), "{err}");
        assert!(err.contains("invalid type: boolean `true`"), "{err}");
        let err = typed::<Pod>(pod("    tty: \"yes\"\n")).unwrap_err();
        assert!(err.contains("invalid type: string"), "{err}");
        let modes = one("kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: i}]\n  volumes:\n  - name: s\n    secret: {secretName: s, defaultMode: 0400}\n");
        let p: Pod = typed(modes).unwrap();
        let vols = p.spec.unwrap().volumes.unwrap();
        assert_eq!(vols[0].secret.as_ref().unwrap().default_mode, Some(256));
    }

    #[test]
    fn size_depth_and_alias_bombs_are_refused_cheaply_with_a_reason() {
        let big = "[".repeat(5 * 1024 * 1024);
        assert!(matches!(
            documents(&big, LIMITS),
            Err(YamlError::TooLarge { .. })
        ));
        // The scanner itself stops an unclosed flow at 255 levels.
        let open = "[".repeat(400 * 1024);
        assert!(matches!(
            documents(&open, LIMITS),
            Err(YamlError::Syntax(_))
        ));
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(matches!(
            documents(&deep, LIMITS),
            Err(YamlError::TooDeep { limit: 64, .. })
        ));
        let nested_maps: String = (0..100)
            .map(|i| format!("{}k:\n", "  ".repeat(i)))
            .collect();
        assert!(matches!(
            documents(&nested_maps, LIMITS),
            Err(YamlError::TooDeep { .. })
        ));
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(matches!(
            documents(&bomb, LIMITS),
            Err(YamlError::TooManyNodes { .. })
        ));
        let mut strings = format!("a0: &a0 \"{}\"\n", "x".repeat(1024 * 1024));
        strings.push_str("b: [*a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0]\n");
        assert!(matches!(
            documents(&strings, LIMITS),
            Err(YamlError::TooManyBytes { .. })
        ));
        let deep_alias = format!(
            "a: &a {}{}\nb: {}*a{}\n",
            "[".repeat(40),
            "]".repeat(40),
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(matches!(
            documents(&deep_alias, LIMITS),
            Err(YamlError::TooDeep { .. })
        ));
    }
}
