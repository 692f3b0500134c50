//! Gathering the facts a routing decision reads: every place a prompt can hide, the
//! firewall's verdict, the sensitivity scan over them, the complexity score, the
//! classification label, and the signals of the local models and cloud pools.

use serde_json::Value;

use crate::sensitivity::Scan;
use crate::state::Routing;

/// The parts of a request that routing reads.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub path: &'a str,
    /// Path and query as received (percent-encoded): what the firewall inspects.
    pub target: &'a str,
    pub method: &'a str,
    /// Names lower case.
    pub headers: &'a [(&'a str, &'a str)],
    /// The API key id, when authenticated by key.
    pub caller: Option<&'a str>,
    /// The requested model (body or Azure deployment).
    pub model: Option<&'a str>,
    pub body: &'a [u8],
}

/// The OpenAI path of the operation `path` names another way (`/openai/deployments/D/chat/
/// completions`, `/openai/v1/embeddings`, `/v1/completions/`), so that a rule's `paths`
/// cannot be sidestepped by a spelling the router takes; `None` for the path itself or
/// one that names no model operation.
pub fn operation_path(path: &str) -> Option<&'static str> {
    let trimmed = path.trim_end_matches('/');
    let path_v1 = match trimmed.strip_prefix("/openai") {
        Some(rest) if rest.starts_with("/v1/") => rest,
        _ => trimmed,
    };
    let action = match path_v1.strip_prefix("/openai/deployments/") {
        Some(rest) => rest.split_once('/').map_or("", |(_, action)| action),
        None => path_v1.strip_prefix("/v1/").unwrap_or(match path_v1 {
            "/openai/responses" => "responses",
            _ => "",
        }),
    };
    let operation = match action {
        "chat/completions" => "/v1/chat/completions",
        "completions" => "/v1/completions",
        "embeddings" => "/v1/embeddings",
        "responses" => "/v1/responses",
        _ => return None,
    };
    (operation != path).then_some(operation)
}

/// The request's headers as text, for routing and the firewall: each value as UTF-8, bytes
/// that are not replaced by U+FFFD. None is left out: a byte the firewall cannot read must
/// not hide the rest of the value from it (`User-Agent: sqlmap\x80`).
pub fn header_texts(headers: &http::HeaderMap) -> Vec<(&str, std::borrow::Cow<'_, str>)> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes())))
        .collect()
}

/// [`header_texts`] as the pairs of text that routing and the firewall take.
pub fn header_pairs<'a>(
    texts: &'a [(&'a str, std::borrow::Cow<'a, str>)],
) -> Vec<(&'a str, &'a str)> {
    texts
        .iter()
        .map(|(name, value)| (*name, value.as_ref()))
        .collect()
}

/// Path and query as received, the firewall's view of the request target.
pub fn request_target(uri: &http::Uri) -> &str {
    uri.path_and_query()
        .map_or_else(|| uri.path(), |target| target.as_str())
}

/// A decision with the facts it was made from.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub outcome: router_policies::Outcome,
    /// The firewall's verdict; a blocked request is refused whatever `outcome` says.
    pub waf: router_policies::waf::WafVerdict,
    pub scan: Scan,
    pub complexity: f32,
    /// Kinds of attached content the scan could not read ([`attachments`]).
    pub attachments: Vec<&'static str>,
    /// The body as redact-then-cloud would send it and the map to restore the answer with,
    /// when the scan found something and the redacted body scans clean (so a redacted
    /// forward does not redact twice).
    pub redacted: Option<(bytes::Bytes, router_policies::redact::RedactionMap)>,
    /// The answer's token limit the request asked for (`max_tokens`,
    /// `max_completion_tokens`, `max_output_tokens`), if any.
    pub max_tokens: Option<u32>,
    /// Answers the request may generate: its choices (`n`) for each of its prompts.
    pub answers: u32,
}

/// Gathers the facts and signals of `request` and lets `decide` decide (the data plane
/// carries the routing state over; explanations only read it).
pub fn evaluate(
    routing: &Routing,
    request: &RequestView<'_>,
    loads: &[(String, u64, f32)],
    decide: impl FnOnce(
        &router_policies::Policy,
        &router_policies::RequestFacts<'_>,
        &router_policies::Signals<'_>,
    ) -> router_policies::Outcome,
) -> Result<Evaluation, crate::error::GatewayError> {
    let policy_config = &routing.config.policy;
    let classification = classification_of(request, policy_config);
    let prompt =
        prompt_texts(request.body).map_err(|error| crate::error::GatewayError::InvalidJson {
            message: format!(
                "the request body cannot be read whole ({error}); the sensitivity scan reads \
                 every value of a body, and one it cannot read is not served"
            ),
        })?;
    let waf = firewall(routing, request, &prompt);
    let mut scan = routing.sensitivity.scan(&prompt);
    let keys = scan
        .entity_types
        .iter()
        .any(|entity| entity == "private_key");
    let redacted = if scan.entity_types.is_empty() || (keys && unterminated_key(&prompt, routing)) {
        None
    } else {
        redacted_clean(request.body, routing)
    };
    scan.redactable = redacted.is_some();
    let complexity = routing.complexity.score(&prompt);
    let entity_names: Vec<&str> = scan.entity_types.iter().map(String::as_str).collect();
    let attachments = attachments(request.body);
    let facts = router_policies::RequestFacts {
        path: request.path,
        operation_path: operation_path(request.path),
        method: request.method,
        headers: request.headers,
        requested_model: request.model,
        caller: request.caller,
        sensitivity: router_policies::Sensitivity {
            entities: &entity_names,
            classification: classification.as_deref(),
            redactable: scan.redactable,
        },
        attachments: &attachments,
        complexity,
    };
    let local: Vec<router_policies::LocalLoad<'_>> = loads
        .iter()
        .map(|(model, queue_depth, kv_use)| router_policies::LocalLoad {
            model,
            queue_depth: *queue_depth,
            kv_use: *kv_use,
        })
        .collect();
    let availability = routing.pools.availability();
    let pools: Vec<(&str, bool)> = availability
        .iter()
        .map(|(pool, available)| (pool.as_str(), *available))
        .collect();
    let signals = router_policies::Signals {
        local: &local,
        pools: &pools,
    };
    let outcome = decide(&routing.policy, &facts, &signals);
    Ok(Evaluation {
        outcome,
        waf,
        scan,
        complexity,
        attachments,
        redacted,
        max_tokens: prompt.max_tokens,
        answers: prompt.choices.max(1).saturating_mul(prompt.prompts.max(1)),
    })
}

/// The kinds of content in a body that the scan cannot read, sorted and without repeats:
/// in a chat body's message parts `image` (`image_url`), `audio` (`input_audio`,
/// `audio_url`), `video` (`video_url`) and `file` (`file`, and any other part type that is not
/// text); and `tokens`, a top-level `prompt` or `input` given as token ids (an array of
/// integers, or of such arrays: what LangChain's `OpenAIEmbeddings` sends by default). A body
/// in which no key can be `type`, `prompt` or `input` (none written, none escaped) is not
/// parsed again.
pub fn attachments(body: &[u8]) -> Vec<&'static str> {
    let has = |marker: &[u8]| memchr::memmem::find(body, marker).is_some();
    if !has(b"\"type\"") && !has(b"\"prompt\"") && !has(b"\"input\"") && !has(b"\\u") {
        return Vec::new();
    }
    // Every copy of a repeated key counts: a backend may read another copy than this one.
    let Ok(Node::Object(fields)) = serde_json::from_slice::<Node>(body) else {
        return Vec::new();
    };
    let mut kinds: Vec<&'static str> = Vec::new();
    for messages in Node::all(&fields, "messages") {
        let Node::Array(messages) = messages else {
            continue;
        };
        for message in messages {
            let Node::Object(message) = message else {
                continue;
            };
            for content in Node::all(message, "content") {
                let Node::Array(parts) = content else {
                    continue;
                };
                for part in parts {
                    let Node::Object(part) = part else {
                        continue;
                    };
                    let types: Vec<&Node> = Node::all(part, "type").collect();
                    if types.is_empty() {
                        kinds.push("file");
                    }
                    kinds.extend(types.into_iter().filter_map(|kind| match kind {
                        Node::String(kind) => match kind.as_str() {
                            "text" | "input_text" | "output_text" | "refusal" => None,
                            "image_url" | "input_image" => Some("image"),
                            "input_audio" | "audio_url" => Some("audio"),
                            "video_url" => Some("video"),
                            _ => Some("file"),
                        },
                        _ => Some("file"),
                    }));
                }
            }
        }
    }
    let token_ids = |value: &Node| match value {
        Node::Array(items) => items.iter().any(|item| match item {
            Node::Number => true,
            Node::Array(inner) => inner.iter().any(|inner| matches!(inner, Node::Number)),
            _ => false,
        }),
        _ => false,
    };
    if ["prompt", "input"]
        .iter()
        .any(|key| Node::all(&fields, key).any(token_ids))
    {
        kinds.push("tokens");
    }
    kinds.sort_unstable();
    kinds.dedup();
    kinds
}

/// A JSON value that keeps every copy of a repeated key (what [`attachments`] reads).
enum Node {
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
    String(String),
    Number,
    Other,
}

impl Node {
    /// Every value of `key` in `fields`, in order.
    fn all<'a>(fields: &'a [(String, Node)], key: &'a str) -> impl Iterator<Item = &'a Node> {
        fields
            .iter()
            .filter(move |(name, _)| name == key)
            .map(|(_, value)| value)
    }
}

impl<'de> serde::Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        struct NodeVisitor;
        impl<'de> serde::de::Visitor<'de> for NodeVisitor {
            type Value = Node;
            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Number)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Number)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Number)
            }
            fn visit_str<E>(self, text: &str) -> Result<Node, E> {
                Ok(Node::String(text.to_owned()))
            }
            fn visit_string<E>(self, text: String) -> Result<Node, E> {
                Ok(Node::String(text))
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut fields = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Node>()? {
                    fields.push((key, value));
                }
                Ok(Node::Object(fields))
            }
        }
        deserializer.deserialize_any(NodeVisitor)
    }
}

/// The firewall's verdict on `request`, whose body's strings are `prompt`.
pub fn firewall(
    routing: &Routing,
    request: &RequestView<'_>,
    prompt: &PromptTexts,
) -> router_policies::waf::WafVerdict {
    // A control token or an override phrase split between two text parts is whole in the
    // joined run; copying the texts is paid only by requests with such runs.
    let with_runs: Vec<String>;
    let prompt_texts = if prompt.joined.is_empty() {
        &prompt.texts
    } else {
        with_runs = prompt.texts.iter().chain(&prompt.joined).cloned().collect();
        &with_runs
    };
    router_policies::waf::inspect(
        &routing.config.waf,
        &router_policies::waf::WafRequest {
            method: request.method,
            target: request.target,
            headers: request.headers,
            prompt_texts,
            other_text: &prompt.elsewhere,
            caller: request.caller,
        },
    )
}

/// The firewall's verdict as JSON: action, score, and each matched rule with where it
/// matched (never what).
pub fn waf_explanation(verdict: &router_policies::waf::WafVerdict) -> Value {
    let rules: Vec<Value> = verdict
        .matches
        .iter()
        .map(|found| {
            serde_json::json!({
                "id": found.rule.id,
                "severity": found.rule.severity.as_str(),
                "message": found.rule.message,
                "location": found.location.to_string(),
                "detail": found.detail,
            })
        })
        .collect();
    serde_json::json!({
        "action": verdict.action.as_str(),
        "score": verdict.score,
        "rules": rules,
    })
}

/// Whether a text holds a private key without its end (see
/// [`router_policies::sensitivity::Finding::may_continue`]): redaction replaces what was
/// found, and the rest of the key, in the next text a model reads, would leave with nothing
/// to show what it is. Such a request cannot be redacted safely.
fn unterminated_key(prompt: &PromptTexts, routing: &Routing) -> bool {
    prompt.texts.iter().any(|text| {
        routing
            .sensitivity
            .findings(text)
            .iter()
            .any(|finding| finding.may_continue(text))
    })
}

/// The body redact-then-cloud would send, if it leaves nothing sensitive: the body is
/// redacted as it would be sent and every string of the result scanned again. Redaction
/// replaces values in the prompt-bearing places; a finding anywhere else (a `user` field,
/// `metadata`, a key) stays, and such a request must not go to the cloud redacted either.
fn redacted_clean(
    body: &[u8],
    routing: &Routing,
) -> Option<(bytes::Bytes, router_policies::redact::RedactionMap)> {
    let (redacted, map) = crate::redaction::redact_body(body, &routing.sensitivity).ok()?;
    routing
        .sensitivity
        .scan(&prompt_texts(&redacted).ok()?)
        .entity_types
        .is_empty()
        .then_some((redacted, map))
}

/// The request's data classification: a sensitive label wherever one is given (any copy
/// or comma-separated entry of the classification header, or the caller's default), else
/// the header's first label, else the caller's default. A client can so raise its
/// classification but never lower one the operator set for it, nor hide a sensitive label
/// behind a harmless first copy of the header.
fn classification_of(
    request: &RequestView<'_>,
    policy_config: &crate::config::PolicyConfig,
) -> Option<String> {
    let from_header: Vec<String> = request
        .headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(&policy_config.classification_header))
        .flat_map(|(_, value)| value.split(','))
        .map(|label| label.trim().to_ascii_lowercase())
        .filter(|label| !label.is_empty())
        .collect();
    let from_caller = request.caller.and_then(|caller| {
        policy_config
            .caller_classifications
            .get(caller)
            .map(|label| label.to_ascii_lowercase())
    });
    let sensitive = |label: &&String| {
        policy_config
            .sensitive_classifications
            .iter()
            .any(|known| known.eq_ignore_ascii_case(label))
    };
    from_header
        .iter()
        .chain(&from_caller)
        .find(sensitive)
        .or(from_header.first())
        .or(from_caller.as_ref())
        .cloned()
}

/// Where `isthmus explain` and `POST /admin/api/explain` take a request to be sent unless
/// told otherwise.
pub const EXPLAIN_TARGET_DEFAULT: &str = "/v1/chat/completions";

/// Explains `body` as if it were POSTed to `target` (a data-plane path with its query): a
/// Responses API body is first translated into its chat body as the data plane translates
/// it, so the decision explained is the one serving would make.
pub fn explain(
    routing: &Routing,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    loads: &[(String, u64, f32)],
    state: router_policies::RouteState,
) -> Result<Value, crate::error::GatewayError> {
    let translated;
    let body = if crate::data_plane::explain_target(target)? {
        if crate::openai::responses::previous_response_id(body)?.is_some() {
            return Err(crate::error::GatewayError::unsupported(
                "previous_response_id",
                "explain reads one request body, not stored responses: send the whole conversation in `input`",
            ));
        }
        translated = crate::openai::responses::to_chat(body, "explain", 0, None)?.chat_body;
        translated.as_slice()
    } else {
        body
    };
    let envelope = crate::openai::parse_envelope(body)?;
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    // As serving reads it: an Azure deployment path names the model, whatever the body says.
    let deployment = path
        .strip_prefix("/openai/deployments/")
        .and_then(|rest| rest.split_once('/'))
        .map(|(deployment, _)| deployment)
        .filter(|deployment| !deployment.is_empty());
    let request = RequestView {
        path,
        target,
        method: "POST",
        headers,
        caller: None,
        model: deployment.or(envelope.model.as_deref()),
        body,
    };
    let evaluation = evaluate(routing, &request, loads, |policy, facts, signals| {
        router_policies::decide(policy, facts, signals, state)
    })?;
    let mut explained = explanation(&evaluation, &routing.policy);
    explained["path"] = Value::String(path.to_owned());
    Ok(explained)
}

/// The JSON explanation of an evaluation: decision, rule, complexity, entity types, and each
/// rule's verdict (rules after the deciding one were not evaluated).
pub fn explanation(evaluation: &Evaluation, policy: &router_policies::Policy) -> Value {
    use router_policies::Decision;
    let outcome = &evaluation.outcome;
    let decision = match &outcome.decision {
        Decision::Local { model, .. } => serde_json::json!({"route": "local", "model": model}),
        Decision::Cloud {
            pool,
            model,
            redact,
            ..
        } => serde_json::json!({"route": "cloud", "pool": pool, "model": model, "redact": redact}),
        Decision::Reject { reason, .. } => {
            serde_json::json!({"route": "rejected", "reason": format!("{reason:?}")})
        }
    };
    let verdicts: Vec<Value> = policy
        .rules()
        .iter()
        .map(|rule| {
            let verdict = outcome
                .verdicts
                .iter()
                .find(|verdict| verdict.rule == rule.name)
                .map_or_else(
                    || "not evaluated".to_owned(),
                    |verdict| match verdict.failed {
                        None => "matched".to_owned(),
                        Some(condition) => format!("failed: {condition}"),
                    },
                );
            serde_json::json!({"rule": rule.name, "verdict": verdict})
        })
        .collect();
    serde_json::json!({
        "decision": decision,
        "rule": outcome.decision.rule(),
        "complexity": evaluation.complexity,
        "sensitive": outcome.sensitive,
        "entities": evaluation.scan.entity_types,
        "attachments": evaluation.attachments,
        // Whether this request's model is spilling (each local model spills by its own queue).
        "spillover": match &outcome.decision {
            Decision::Local { model, .. } => policy.spilling_for(outcome.state, model),
            other => other.rule() == router_policies::SPILLOVER_RULE,
        },
        "rules": verdicts,
        "waf": waf_explanation(&evaluation.waf),
    })
}

/// The strings of a chat or completions body. `texts` are the prompt-bearing ones, in order:
/// message content (strings and text parts), legacy `prompt` strings and arrays, tool-call
/// and function-call arguments, tool outputs, and the `tools` definitions' descriptions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PromptTexts {
    pub texts: Vec<String>,
    /// Every other string of the body, the keys of unknown objects and the decimal text of
    /// numbers outside the sampling parameters, one per line: the scan reads them too (the
    /// cloud leg forwards the whole body), the score does not.
    pub elsewhere: String,
    /// Each run of two or more consecutive text parts of a message, joined as a model reads
    /// them, and the seams between adjacent messages: the scan reads them, and the firewall
    /// reads them as prompt text (not as the other fields, whose query-language and script
    /// rules a coding question would trip).
    pub joined: Vec<String>,
    /// Conversation turns (messages), 1 for a legacy prompt.
    pub turns: u32,
    pub tools: u32,
    pub max_tokens: Option<u32>,
    /// `n`, the choices asked for (1 when absent).
    pub choices: u32,
    /// Prompts in the body: the strings of a legacy `prompt` array, else 1.
    pub prompts: u32,
}

mod prompt;

pub use prompt::prompt_texts;

#[cfg(test)]
mod tests;
