//! Turning the toml crate's errors into operator messages: the file, the dotted key, the line
//! and column, and what was expected.

use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Every key of the document with its byte span and dotted path (`network.inbound[0].port`),
/// in no particular order. `None` when the text is not valid TOML.
pub(crate) fn key_paths(text: &str) -> Option<Vec<(Range<usize>, String)>> {
    let mut out = Vec::new();
    let deserializer = toml::Deserializer::new(text);
    PathCollector {
        prefix: String::new(),
        out: &mut out,
    }
    .deserialize(deserializer)
    .ok()?;
    Some(out)
}

struct PathCollector<'a> {
    prefix: String,
    out: &'a mut Vec<(Range<usize>, String)>,
}

impl<'de> DeserializeSeed<'de> for PathCollector<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PathCollector<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Spanned<String>>()? {
            let path = if self.prefix.is_empty() {
                key.get_ref().clone()
            } else {
                format!("{}.{}", self.prefix, key.get_ref())
            };
            self.out.push((key.span(), path.clone()));
            map.next_value_seed(PathCollector {
                prefix: path,
                out: self.out,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let seed = PathCollector {
                prefix: format!("{}[{index}]", self.prefix),
                out: self.out,
            };
            if seq.next_element_seed(seed)?.is_none() {
                break;
            }
            index += 1;
        }
        Ok(())
    }
}

/// The dotted key at `span`: the key whose span contains its start, else the last key that
/// starts before it (the key of a badly typed value).
fn path_at(paths: &[(Range<usize>, String)], span: &Range<usize>) -> Option<String> {
    if let Some((_, path)) = paths
        .iter()
        .filter(|(s, _)| s.start <= span.start && span.start < s.end.max(s.start + 1))
        .max_by_key(|(s, _)| s.start)
    {
        return Some(path.clone());
    }
    paths
        .iter()
        .filter(|(s, _)| s.start <= span.start)
        .max_by_key(|(s, _)| s.start)
        .map(|(_, path)| path.clone())
}

/// Rewrites serde's type words into TOML's.
fn tomlish(message: &str) -> String {
    let mut out = message.trim().replace('\n', "; ");
    for (from, to) in [
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
        ("expected a boolean", "expected a boolean (true or false)"),
        ("invalid type: sequence", "invalid type: array"),
        ("invalid type: map", "invalid type: table"),
    ] {
        out = out.replace(from, to);
    }
    // `expected struct RawVolume` and the like.
    while let Some(start) = out.find("expected struct Raw") {
        let end = out[start + "expected struct ".len()..]
            .find(|c: char| !c.is_ascii_alphanumeric())
            .map_or(out.len(), |i| start + "expected struct ".len() + i);
        out.replace_range(start..end, "expected a table");
    }
    out
}

/// One line for a toml error in the file called `label` whose text is `text`.
pub(crate) fn toml_problem(label: &str, text: &str, error: &toml::de::Error) -> String {
    let message = error.message();
    let Some(span) = error.span() else {
        return format!("{label}: {}", tomlish(message));
    };
    let (line, column) = line_column(text, span.start);
    let path = key_paths(text).and_then(|paths| path_at(&paths, &span));
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let key = path.unwrap_or_else(|| field.to_string());
        let expected = expected.trim_start_matches(',').trim();
        let hint = if expected == "there are no fields" {
            "this table takes no keys".to_string()
        } else {
            expected.replace('`', "")
        };
        return format!("{label}: unknown key `{key}` at line {line}, column {column}; {hint}");
    }
    match path {
        Some(path) => format!(
            "{label}: `{path}` at line {line}, column {column}: {}",
            tomlish(message)
        ),
        None => format!(
            "{label}: invalid TOML at line {line}, column {column}: {}",
            tomlish(message)
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, 10), (2, 4));
    }

    #[test]
    fn key_paths_name_nested_and_array_keys() {
        let text = "[workload]\nexec = [\"/x\"]\n[network]\ninbound = [{ port = 1 }]\n[[volume]]\nname = \"a\"\n[[volume]]\nname = \"b\"\n";
        let mut paths: Vec<String> = key_paths(text)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        paths.sort();
        paths.dedup();
        assert_eq!(
            paths,
            [
                "network",
                "network.inbound",
                "network.inbound[0].port",
                "volume",
                "volume[0].name",
                "volume[1].name",
                "workload",
                "workload.exec"
            ]
        );
    }
}
