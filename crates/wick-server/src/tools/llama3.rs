//! Llama 3.1-3.3's JSON syntax: the answer is a call `{"name": ..., "parameters": {...}}`,
//! optionally after `<|python_tag|>`; several are separated by `; `.

use super::ToolSyntax;

#[derive(Debug)]
pub(super) struct Llama3;

impl ToolSyntax for Llama3 {
    fn detect(&self, template: &str) -> bool {
        template.contains("<|python_tag|>")
            || (template.contains("<|eot_id|>") && template.contains("\"parameters\""))
    }
    fn name(&self) -> &'static str {
        "llama3_json"
    }
    fn start(&self) -> &'static str {
        "<|python_tag|>"
    }
    fn open(&self) -> &'static str {
        ""
    }
    fn between(&self) -> &'static str {
        "; "
    }
    fn close(&self) -> &'static str {
        ""
    }
    fn args_key(&self) -> &'static str {
        "parameters"
    }
    fn bare_json(&self) -> bool {
        true
    }
    fn bare_between(&self) -> Option<&'static str> {
        Some("; ")
    }
    fn marker_optional(&self) -> bool {
        true
    }
}
