//! Mistral's syntax (v3 tokenizer templates): `[TOOL_CALLS]` (one special token), then a JSON
//! list of calls `[{"name": ..., "arguments": {...}}, ...]`.

use super::ToolSyntax;

#[derive(Debug)]
pub(super) struct Mistral;

impl ToolSyntax for Mistral {
    fn detect(&self, template: &str) -> bool {
        template.contains("[TOOL_CALLS]")
    }
    fn name(&self) -> &'static str {
        "mistral"
    }
    fn start(&self) -> &'static str {
        "[TOOL_CALLS]"
    }
    fn open(&self) -> &'static str {
        "["
    }
    fn between(&self) -> &'static str {
        ", "
    }
    fn close(&self) -> &'static str {
        "]"
    }
}
