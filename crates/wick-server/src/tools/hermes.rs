//! Hermes' syntax (Qwen 2.5, Qwen 3, Hermes, many fine-tunes): each call is
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`. Small models often write
//! the call's JSON alone (Qwen2.5-Coder-0.5B does, greedily): a bare call as the whole
//! answer is read too, as llama.cpp's Hermes parser does.

use super::ToolSyntax;

#[derive(Debug)]
pub(super) struct Hermes;

impl ToolSyntax for Hermes {
    fn detect(&self, template: &str) -> bool {
        template.contains("<tool_call>")
    }
    fn name(&self) -> &'static str {
        "hermes"
    }
    fn start(&self) -> &'static str {
        "<tool_call>"
    }
    fn open(&self) -> &'static str {
        "\n"
    }
    fn between(&self) -> &'static str {
        "\n</tool_call>\n<tool_call>\n"
    }
    fn close(&self) -> &'static str {
        "\n</tool_call>"
    }
    fn bare_json(&self) -> bool {
        true
    }
}
