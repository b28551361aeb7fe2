//! JSON written as Python's `json.dumps(v, ensure_ascii=False)` writes it: `", "` and `": "`
//! separators (or an indent), keys in their order. Chat templates' `tojson` and the
//! tool-call grammars use this spelling, which is the one models saw in training.

use serde_json::Value;

/// Appends `v` to `out`; with `indent`, one item per line at `depth` levels.
pub(crate) fn write(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `v` in Python's spelling, on one line.
pub(crate) fn dumps(v: &Value) -> String {
    let mut out = String::new();
    write(v, None, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_pythons_spelling() {
        let v = json!({"b": [1, "é<>"], "a": {}, "c": {"x": null}});
        assert_eq!(dumps(&v), r#"{"b": [1, "é<>"], "a": {}, "c": {"x": null}}"#);
        let mut out = String::new();
        write(&json!({"a": [1, 2]}), Some(2), 0, &mut out);
        assert_eq!(out, "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
    }
}
