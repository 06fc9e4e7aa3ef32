//! Tool calling: tool definitions in OpenAI's `tools` shape go into the prompt, the reply is parsed into tool
//! calls (a name and JSON arguments), and with a constraint the calls' arguments must match each tool's schema.
//!
//! Two conventions, chosen by the model's chat template:
//! - [`ToolFormat::Tagged`] (Qwen2.5, Hermes): the template has a tools section and writes a call as
//!   `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`; tool results go back as `tool` messages, which
//!   the template renders itself.
//! - [`ToolFormat::Json`] (templates without tools: SmolLM2, Gemma 3): the tools are described in the system
//!   prompt (see [`json_system_prompt`]), a call is a bare JSON object `{"name": …, "arguments": {…}}` (one per
//!   line for several), and tool results go back as user turns `Tool result (NAME): …`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::chat::ChatMessage;
use crate::constraint::{with_layout, Constraint};
use crate::{EngineError, Result};

/// Most tools one request may define.
pub const MAX_TOOLS: usize = 128;

/// A function the model may call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// `[A-Za-z0-9_-]{1,64}` (OpenAI's rule; templates write it unescaped).
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    pub parameters: Value,
}

impl Tool {
    /// OpenAI's shape, as chat templates expect it.
    pub fn to_openai(&self) -> Value {
        json!({"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}})
    }
}

/// A call the model made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// `call_N`, unique within a reply.
    pub id: String,
    pub name: String,
    /// The arguments as JSON text (an object).
    pub arguments: String,
}

impl ToolCall {
    /// OpenAI's shape (`arguments` a JSON string).
    pub fn to_openai(&self) -> Value {
        json!({"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// Whether and how the model must call a tool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// A reply in text or tool calls, as the model decides.
    Auto,
    /// Text only: the tools are shown, no call is parsed.
    None,
    /// One or more tool calls.
    Required,
    /// One call of this tool.
    Function(String),
}

impl ToolChoice {
    /// `auto`, `none`, `required`, or a tool's name.
    pub fn parse(s: &str) -> Self {
        match s {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            name => ToolChoice::Function(name.to_string()),
        }
    }
}

/// How a model's template shows tools and how its replies call them (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    Tagged,
    Json,
}

impl ToolFormat {
    /// Tagged when the template renders `tools` and writes `<tool_call>` itself.
    pub fn of_template(source: &str) -> Self {
        if source.contains("tools") && source.contains("<tool_call>") {
            ToolFormat::Tagged
        } else {
            ToolFormat::Json
        }
    }
}

/// The tools of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
    /// Constrain the reply to the calls' grammar (arguments matching each tool's schema); false: the model
    /// writes freely and its reply is parsed as it is.
    pub constrain: bool,
    /// Several calls in one reply (OpenAI's `parallel_tool_calls`, on by default); off: at most one.
    pub parallel: bool,
}

fn bad(detail: impl Into<String>) -> EngineError {
    EngineError::Tools(detail.into())
}

impl Tools {
    /// Tools from OpenAI's JSON (`[{"type": "function", "function": {"name", "description", "parameters"}}]`).
    pub fn from_json(tools_json: &str, choice: ToolChoice, constrain: bool) -> Result<Self> {
        let v: Value = serde_json::from_str(tools_json).map_err(|e| bad(format!("not JSON: {e}")))?;
        Self::from_value(&v, choice, constrain)
    }

    pub fn from_value(v: &Value, choice: ToolChoice, constrain: bool) -> Result<Self> {
        let items = v.as_array().ok_or_else(|| bad("tools must be an array of function definitions"))?;
        if items.is_empty() || items.len() > MAX_TOOLS {
            return Err(bad(format!("{} tools (1..={MAX_TOOLS})", items.len())));
        }
        let mut tools: Vec<Tool> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = |d: &str| bad(format!("tools[{i}]: {d}"));
            if item.get("type").and_then(Value::as_str) != Some("function") {
                return Err(at("\"type\" must be \"function\""));
            }
            let f = item.get("function").and_then(Value::as_object).ok_or_else(|| at("\"function\" must be an object"))?;
            let name = f.get("name").and_then(Value::as_str).ok_or_else(|| at("\"function.name\" must be a string"))?;
            if !valid_name(name) {
                return Err(at(&format!("name {name:?} is not 1-64 of [A-Za-z0-9_-]")));
            }
            if tools.iter().any(|t| t.name == name) {
                return Err(at(&format!("a second tool named {name:?}")));
            }
            let description = match f.get("description") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err(at("\"function.description\" must be a string")),
            };
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => return Err(at("\"function.parameters\" must be a JSON Schema object")),
            };
            tools.push(Tool { name: name.to_string(), description, parameters });
        }
        if let ToolChoice::Function(name) = &choice {
            if !tools.iter().any(|t| &t.name == name) {
                return Err(bad(format!("tool_choice names {name:?}, which is not among the tools")));
            }
        }
        Ok(Tools { tools, choice, constrain, parallel: true })
    }

    /// The tools in OpenAI's shape.
    pub fn openai(&self) -> Vec<Value> {
        self.tools.iter().map(Tool::to_openai).collect()
    }

    /// The grammar of a reply under this request's choice (`None`: unconstrained). Each call's arguments must
    /// be an instance of its tool's parameter schema.
    pub fn constraint(&self, format: ToolFormat) -> Option<Constraint> {
        if !self.constrain || self.choice == ToolChoice::None {
            return None;
        }
        let lit = |s: &str| serde_json::to_string(s).expect("a string serializes");
        let chosen: Vec<&Tool> = match &self.choice {
            ToolChoice::Function(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            _ => self.tools.iter().collect(),
        };
        let mut g = String::new();
        // A call in the family's form, or as the JSON small models often write instead (bare, or in a Markdown
        // fence): every form has its arguments checked. A text reply (`auto`) therefore starts with none of
        // `<`, `{` or a backtick: otherwise a call written in another form would pass unchecked as text.
        let fenced = format!("{} body {}", lit("```json\n"), lit("\n```"));
        let call = match format {
            ToolFormat::Tagged => format!("{} body {} | body | {fenced}", lit("<tool_call>\n"), lit("\n</tool_call>")),
            ToolFormat::Json => format!("body | {fenced}"),
        };
        let text = "/[^<{`\\s](.|\\n)*/";
        let many = if self.parallel { "calls" } else { "call" };
        match self.choice {
            ToolChoice::Auto => g.push_str(&format!("start: {many} | TEXT\n")),
            ToolChoice::Function(_) => g.push_str("start: call\n"),
            _ => g.push_str(&format!("start: {many}\n")),
        }
        g.push_str(&format!("calls: call ({} call)*\ncall: {call}\nTEXT: {text}\n", lit("\n")));
        let bodies: Vec<String> = (0..chosen.len()).map(|i| format!("body{i}")).collect();
        g.push_str(&format!("body: {}\n", bodies.join(" | ")));
        for (i, t) in chosen.iter().enumerate() {
            let head = format!("{{\"name\": {}, \"arguments\": ", lit(&t.name));
            g.push_str(&format!("body{i}: {} args{i} {}\n", lit(&head), lit("}")));
            g.push_str(&format!("args{i}: %json {}\n", with_layout(t.parameters.clone())));
        }
        Some(Constraint::Lark(g))
    }
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The system-prompt text that describes the tools to a model whose template has no tools section.
pub fn json_system_prompt(tools: &Tools) -> String {
    let list: Vec<Value> =
        tools.tools.iter().map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters})).collect();
    let list = serde_json::to_string(&list).expect("JSON values serialize");
    format!(
        "You can call these tools; each one's \"parameters\" is the JSON Schema of its arguments:\n{list}\n\
         To call a tool, reply with only a JSON object on one line: {{\"name\": \"TOOL_NAME\", \"arguments\": {{...}}}}. \
         Otherwise, reply to the user normally."
    )
}

/// The conversation as a template without a tools section sees it: the tools described in the system prompt,
/// the assistant's calls as JSON lines, tool results as user turns.
pub fn json_messages(messages: &[ChatMessage], tools: Option<&Tools>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    if let Some(t) = tools {
        let prompt = json_system_prompt(t);
        match messages.first() {
            Some(m) if m.role == "system" => out.push(ChatMessage::new("system", &format!("{}\n\n{prompt}", m.content))),
            _ => out.push(ChatMessage::new("system", &prompt)),
        }
    }
    let skip = usize::from(tools.is_some() && messages.first().is_some_and(|m| m.role == "system"));
    for m in &messages[skip..] {
        match m.role.as_str() {
            "tool" => {
                let name = m.name.as_deref().unwrap_or("tool");
                let text = format!("Tool result ({name}): {}", m.content);
                // Results of several calls become one user turn (templates that need alternating roles).
                match out.last_mut() {
                    Some(prev) if prev.role == "user" && prev.content.starts_with("Tool result") => {
                        prev.content.push('\n');
                        prev.content.push_str(&text);
                    }
                    _ => out.push(ChatMessage::new("user", &text)),
                }
            }
            "assistant" if !m.tool_calls.is_empty() => {
                let mut lines: Vec<String> = Vec::new();
                if !m.content.is_empty() {
                    lines.push(m.content.clone());
                }
                for c in &m.tool_calls {
                    let args: Value = serde_json::from_str(&c.arguments).unwrap_or(Value::String(c.arguments.clone()));
                    lines.push(json!({"name": c.name, "arguments": args}).to_string());
                }
                out.push(ChatMessage::new("assistant", &lines.join("\n")));
            }
            _ => out.push(ChatMessage { tool_calls: Vec::new(), ..m.clone() }),
        }
    }
    out
}

/// Splits a reply into its text and its tool calls, per `format`. Unconstrained replies are read leniently:
/// a Markdown code fence around the JSON, `parameters` for `arguments`, arguments given as a JSON string, and a
/// tagged model's call written as bare JSON (small models drop the tags).
pub fn parse_calls(reply: &str, format: ToolFormat) -> (String, Vec<ToolCall>) {
    let mut calls = Vec::new();
    let content = match format {
        ToolFormat::Tagged if !reply.contains("<tool_call>") => return parse_calls(reply, ToolFormat::Json),
        ToolFormat::Tagged => {
            let mut text = String::new();
            let mut rest = reply;
            while let Some(a) = rest.find("<tool_call>") {
                text.push_str(&rest[..a]);
                let after = &rest[a + "<tool_call>".len()..];
                let (inner, next) = match after.find("</tool_call>") {
                    Some(b) => (&after[..b], &after[b + "</tool_call>".len()..]),
                    None => (after, ""),
                };
                match call_of(inner) {
                    Some((name, args)) => calls.push((name, args)),
                    // Not a call after all: keep the text.
                    None => text.push_str(&rest[a..rest.len() - next.len()]),
                }
                rest = next;
            }
            text.push_str(rest);
            text
        }
        ToolFormat::Json => {
            let body = strip_fence(reply.trim());
            match serde_json::from_str::<Value>(body) {
                Ok(Value::Array(items)) if !items.is_empty() && items.iter().all(|v| call_of_value(v).is_some()) => {
                    calls.extend(items.iter().filter_map(call_of_value));
                    String::new()
                }
                Ok(v) if call_of_value(&v).is_some() => {
                    calls.extend(call_of_value(&v));
                    String::new()
                }
                _ => {
                    // One call per line (fence lines around them dropped).
                    let lines: Vec<&str> =
                        body.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("```")).collect();
                    let parsed: Vec<_> = lines.iter().filter_map(|l| call_of(l)).collect();
                    // A reply cut by the length limit inside its last call: the complete calls before it.
                    let cut = lines.last().is_some_and(|l| serde_json::from_str::<Value>(l).is_err_and(|e| e.is_eof()));
                    if !lines.is_empty() && (parsed.len() == lines.len() || (cut && parsed.len() + 1 == lines.len())) {
                        calls.extend(parsed);
                        String::new()
                    } else {
                        reply.to_string()
                    }
                }
            }
        }
    };
    let calls = calls
        .into_iter()
        .enumerate()
        .map(|(i, (name, arguments))| ToolCall { id: format!("call_{i}"), name, arguments })
        .collect();
    (content.trim().to_string(), calls)
}

fn strip_fence(s: &str) -> &str {
    let Some(inner) = s.strip_prefix("```") else { return s };
    let inner = inner.strip_prefix("json").unwrap_or(inner);
    inner.strip_suffix("```").unwrap_or(inner).trim()
}

fn call_of(text: &str) -> Option<(String, String)> {
    call_of_value(&serde_json::from_str::<Value>(text.trim()).ok()?)
}

fn call_of_value(v: &Value) -> Option<(String, String)> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => json!({}),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok().filter(Value::is_object)?,
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => return None,
    };
    Some((name, args.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(choice: ToolChoice) -> Tools {
        let j = r#"[{"type":"function","function":{"name":"set_temperature","description":"Set cabin temperature",
            "parameters":{"type":"object","properties":{"zone":{"enum":["driver","passenger"]},"celsius":{"type":"number"}},
            "required":["zone","celsius"]}}},{"type":"function","function":{"name":"play","parameters":{"type":"object",
            "properties":{"song":{"type":"string"}}}}}]"#;
        Tools::from_json(j, choice, true).unwrap()
    }

    #[test]
    fn bad_tool_definitions_are_errors() {
        for (j, why) in [
            (r#"{"type":"function"}"#, "array"),
            ("[]", "0 tools"),
            (r#"[{"type":"function","function":{"name":"a b"}}]"#, "not 1-64"),
            (r#"[{"type":"tool","function":{"name":"a"}}]"#, "\"type\""),
            (r#"[{"type":"function","function":{"name":"a","parameters":3}}]"#, "JSON Schema"),
            (r#"[{"type":"function","function":{"name":"a"}},{"type":"function","function":{"name":"a"}}]"#, "second"),
            ("[1,", "not JSON"),
        ] {
            let e = Tools::from_json(j, ToolChoice::Auto, true).unwrap_err().to_string();
            assert!(e.contains(why), "{j}: {e}");
        }
        let e = Tools::from_json(r#"[{"type":"function","function":{"name":"a"}}]"#, ToolChoice::parse("b"), true);
        assert!(e.unwrap_err().to_string().contains("not among the tools"));
    }

    #[test]
    fn calls_are_parsed_in_both_formats() {
        let (text, calls) = parse_calls(
            "Sure.<tool_call>\n{\"name\": \"play\", \"arguments\": {\"song\": \"x\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"set_temperature\", \"arguments\": \"{\\\"zone\\\": \\\"driver\\\"}\"}\n</tool_call>",
            ToolFormat::Tagged,
        );
        assert_eq!(text, "Sure.");
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("play", r#"{"song":"x"}"#));
        assert_eq!(calls[1].arguments, r#"{"zone":"driver"}"#);
        assert_eq!(calls[1].id, "call_1");
        let (text, calls) = parse_calls("```json\n{\"name\": \"play\", \"parameters\": {\"song\": \"y\"}}\n```", ToolFormat::Json);
        assert_eq!((text.as_str(), calls.len(), calls[0].arguments.as_str()), ("", 1, r#"{"song":"y"}"#));
        let (text, calls) = parse_calls("It is 21 degrees {not a call}", ToolFormat::Json);
        assert_eq!((text.as_str(), calls.len()), ("It is 21 degrees {not a call}", 0));
        let (text, calls) = parse_calls("<tool_call>\nbroken", ToolFormat::Tagged);
        assert_eq!((text.as_str(), calls.len()), ("<tool_call>\nbroken", 0));
        // Cut by the length limit inside a repeated call: the complete calls count, the cut one is dropped...
        let cut = "```json\n{\"name\": \"play\", \"arguments\": {}}\n```\n```json\n{\"name\": \"play\", \"argu";
        let (text, calls) = parse_calls(cut, ToolFormat::Json);
        assert_eq!((text.as_str(), calls.len()), ("", 1));
        // ...but a line that is not JSON at all keeps the reply text.
        let (_, calls) = parse_calls("{\"name\": \"play\", \"arguments\": {}}\nand then", ToolFormat::Json);
        assert!(calls.is_empty());
    }

    #[test]
    fn grammar_follows_the_choice() {
        let g = |c: ToolChoice, f| match tools(c).constraint(f) {
            Some(Constraint::Lark(g)) => g,
            other => panic!("{other:?}"),
        };
        let auto = g(ToolChoice::Auto, ToolFormat::Tagged);
        assert!(auto.starts_with("start: calls | TEXT") && auto.contains("<tool_call>") && auto.contains("body1"));
        let named = g(ToolChoice::Function("play".into()), ToolFormat::Json);
        assert!(named.starts_with("start: call\n") && named.contains("\\\"play\\\"") && !named.contains("set_temperature"));
        let single = Tools { parallel: false, ..tools(ToolChoice::Required) }.constraint(ToolFormat::Json).unwrap();
        let Constraint::Lark(single) = single else { panic!("a grammar") };
        assert!(single.starts_with("start: call\n"), "{single}");
        assert!(tools(ToolChoice::None).constraint(ToolFormat::Json).is_none());
        let mut free = tools(ToolChoice::Required);
        free.constrain = false;
        assert!(free.constraint(ToolFormat::Tagged).is_none());
    }

    #[test]
    fn json_format_turns_tool_messages_into_user_turns() {
        let t = tools(ToolChoice::Auto);
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = vec![ToolCall { id: "call_0".into(), name: "play".into(), arguments: r#"{"song":"x"}"#.into() }];
        let mut result = ChatMessage::new("tool", "playing");
        result.name = Some("play".into());
        let msgs = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "music"), call, result];
        let out = json_messages(&msgs, Some(&t));
        assert_eq!(out.len(), 4);
        assert!(out[0].content.starts_with("Be brief.\n\nYou can call these tools") && out[0].content.contains("set_temperature"));
        assert_eq!(out[2].content, r#"{"name":"play","arguments":{"song":"x"}}"#);
        assert_eq!((out[3].role.as_str(), out[3].content.as_str()), ("user", "Tool result (play): playing"));
    }
}
