//! The conversation of a multi-step plan, independent of any endpoint's wire format: what the model
//! was told, which tools it may call, and what one model turn asked for.
//!
//! The worker keeps a [`Conversation`] per task; [`super::openai`] and [`super::anthropic`] turn it
//! into their request bodies and their replies back into a [`Turn`]. Tools are offered to the model
//! under a name that joins server and tool ([`model_tool_name`]), because both APIs allow only
//! `[A-Za-z0-9_-]{1,64}` there and a plan's tools come from several servers.

use serde_json::{Map, Value};

/// Separator between the server and the tool in the name the model sees.
pub const TOOL_NAME_SEPARATOR: &str = "__";

/// Longest tool name both OpenAI and Anthropic accept.
const MAX_MODEL_TOOL_NAME: usize = 64;

/// A tool as offered to the model.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolSpec {
    /// `server__tool` (see [`model_tool_name`]).
    pub name: String,
    pub description: String,
    /// The tool's JSON Schema for its arguments, as the MCP server listed it.
    pub input_schema: Map<String, Value>,
}

/// One tool call the model asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// The endpoint's id for the call (`tool_calls[].id`, `tool_use.id`), echoed with its result.
    pub id: String,
    /// The name the model used (`server__tool`).
    pub name: String,
    pub arguments: Map<String, Value>,
}

/// One message of the conversation.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    User(String),
    /// A model turn that asked for tools (its text, if any, comes along).
    Assistant {
        text: Option<String>,
        calls: Vec<ToolCall>,
    },
    /// The result of one tool call; `is_error` when it was refused or failed, so the model can
    /// recover instead of the task crashing.
    ToolResult {
        call_id: String,
        content: String,
        is_error: bool,
    },
}

/// The whole conversation so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Conversation {
    pub messages: Vec<Message>,
}

/// What one model turn produced.
#[derive(Clone, Debug, PartialEq)]
pub enum Turn {
    /// A final answer: the plan ends.
    Answer { text: String },
    /// Tool calls to run before asking the model again.
    ToolCalls {
        text: Option<String>,
        calls: Vec<ToolCall>,
    },
}

/// A model turn and the tokens it took.
#[derive(Clone, Debug, PartialEq)]
pub struct TurnReply {
    pub turn: Turn,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The name a tool is offered to the model under, or `None` when server and tool do not fit the
/// APIs' `[A-Za-z0-9_-]{1,64}` (such a tool is not offered).
pub fn model_tool_name(server: &str, tool: &str) -> Option<String> {
    let name = format!("{server}{TOOL_NAME_SEPARATOR}{tool}");
    let ok = name.len() <= MAX_MODEL_TOOL_NAME
        && !server.contains(TOOL_NAME_SEPARATOR)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(name)
}

/// Splits a model-facing tool name back into server and tool. Server names never contain `__`
/// (they are DNS labels), so the first separator is the boundary.
pub fn split_model_tool_name(name: &str) -> Option<(&str, &str)> {
    let (server, tool) = name.split_once(TOOL_NAME_SEPARATOR)?;
    (!server.is_empty() && !tool.is_empty()).then_some((server, tool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_round_trip_and_refuse_what_the_apis_refuse() {
        let n = model_tool_name("files", "delete_file").unwrap();
        assert_eq!(n, "files__delete_file");
        assert_eq!(split_model_tool_name(&n), Some(("files", "delete_file")));
        // A tool whose own name contains the separator still splits at the server boundary.
        let n = model_tool_name("rec", "a__b").unwrap();
        assert_eq!(split_model_tool_name(&n), Some(("rec", "a__b")));
        assert_eq!(model_tool_name("files", "has space"), None);
        assert_eq!(model_tool_name("files", &"x".repeat(60)), None);
        assert_eq!(split_model_tool_name("nosplit"), None);
        assert_eq!(split_model_tool_name("__tool"), None);
    }
}
