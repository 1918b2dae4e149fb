//! Request bodies and the one place they are checked.
//!
//! Bodies are parsed from raw bytes (not through axum's `Json` extractor) so
//! that every mistake, including a wrong type deep in the body, becomes an
//! OpenAI-shaped 400 that names the offending parameter. Unknown fields are
//! ignored, as OpenAI's own API does.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tessera_backend::{RoutePrefs, Sort};
use tessera_core::{Price, SamplingParams};
use tessera_engine::ChatMessage;

use crate::error::ApiError;

/// Most stop sequences one request may carry.
pub const MAX_STOP: usize = tessera_core::generation::MAX_STOP_SEQUENCES;
/// Most alternatives per token in `top_logprobs`.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The model's alias or sha256.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Return the chosen tokens' log-probabilities.
    #[serde(default)]
    pub logprobs: bool,
    /// With `logprobs`: this many alternatives per token.
    pub top_logprobs: Option<u32>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The model's alias or sha256.
    pub model: String,
    /// The text to continue.
    pub prompt: Prompt,
    /// Legacy completions take a number: alternatives per token.
    pub logprobs: Option<u32>,
    /// Echo the prompt back (refused: not supported).
    #[serde(default)]
    pub echo: bool,
}

/// Parameters shared by both endpoints (parsed from the same body as the
/// endpoint's own fields, so an error still names its parameter).
#[derive(Debug, Deserialize)]
pub struct CommonParams {
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Sampling temperature, 0–2 (0: greedy).
    pub temperature: Option<f64>,
    /// Nucleus filter, (0, 1].
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; accepted as llama.cpp's server does.
    pub top_k: Option<i64>,
    /// Not in OpenAI's API; as llama.cpp's server: drop tokens below this
    /// share of the best one's probability.
    pub min_p: Option<f64>,
    /// The seed of seeded sampling (a random one when absent).
    pub seed: Option<i64>,
    /// Stop sequences.
    pub stop: Option<Stop>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// `include_usage`: a last chunk with the usage.
    pub stream_options: Option<StreamOptions>,
    /// Choices per request: only 1.
    pub n: Option<i64>,
    /// Not in OpenAI's API; as llama.cpp's server: keep generating past the
    /// end-of-generation token (until `max_tokens`), for benchmarks.
    #[serde(default)]
    pub ignore_eos: bool,
    /// OpenRouter-style provider preferences.
    pub provider: Option<ProviderPrefs>,
}

/// The request's `provider` object, as OpenRouter defines it.
#[derive(Debug, Default, Deserialize)]
pub struct ProviderPrefs {
    /// Providers (node ids or prefixes) to try first, in order.
    pub order: Option<Vec<String>>,
    /// Providers that may serve, no others.
    pub only: Option<Vec<String>>,
    /// Providers that may not serve.
    pub ignore: Option<Vec<String>>,
    /// With `order`: may others serve when those cannot?
    pub allow_fallbacks: Option<bool>,
    /// `price`, `latency` or `throughput`.
    pub sort: Option<String>,
    /// Highest price accepted, in credits per million tokens (= micro-credits
    /// per token), per prompt and per completion token.
    pub max_price: Option<MaxPrice>,
}

/// `provider.max_price`: either side may be left out (no cap).
#[derive(Debug, Default, Deserialize)]
pub struct MaxPrice {
    /// Per prompt token.
    pub prompt: Option<f64>,
    /// Per generated token.
    pub completion: Option<f64>,
}

/// `stream_options`.
#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    /// End the stream with a chunk that carries the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// `stop`: one sequence or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop sequence.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// A completion's `prompt`: one text (a list must hold exactly one).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    One(String),
    /// A list of texts.
    Many(Vec<String>),
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or `tool`).
    pub role: String,
    /// Its text.
    #[serde(default)]
    pub content: Option<Content>,
}

/// Message content: a string, or an array of parts of which only text is
/// supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts.
    Parts(Vec<Part>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub struct Part {
    /// Only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// Parse a JSON body into the endpoint's fields and the shared parameters;
/// a syntax or type error names where it happened.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, CommonParams), ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "The request body is empty; send a JSON object.",
            None,
        ));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(format!("The request body is not valid JSON: {e}."), None)
            .with_code("invalid_json")
    })?;
    if !value.is_object() {
        return Err(ApiError::invalid(
            "The request body must be a JSON object.",
            None,
        ));
    }
    Ok((from_value(&value)?, from_value(&value)?))
}

fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let param = if path == "." {
            None
        } else {
            Some(path.as_str())
        };
        let message = match param {
            Some(p) => format!("Invalid value for '{p}': {inner}."),
            None => format!("Invalid request: {inner}."),
        };
        ApiError::invalid(message, param)
    })
}

/// Everything a generation needs, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Temperature, filters and seed.
    pub sampling: SamplingParams,
    /// `None` = until the context is full.
    pub max_tokens: Option<u32>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Answer as server-sent events.
    pub stream: bool,
    /// End a stream with the usage.
    pub include_usage: bool,
    /// `None` = no logprobs; `Some(n)` = chosen token plus `n` alternatives.
    pub logprobs: Option<u32>,
    /// Generate past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Provider preferences.
    pub route: RoutePrefs,
}

fn check_route(p: Option<&ProviderPrefs>) -> Result<RoutePrefs, ApiError> {
    let Some(p) = p else {
        return Ok(RoutePrefs {
            allow_fallbacks: true,
            ..RoutePrefs::default()
        });
    };
    let sort = match p.sort.as_deref() {
        None => None,
        Some("price") => Some(Sort::Price),
        Some("latency") => Some(Sort::Latency),
        Some("throughput") => Some(Sort::Throughput),
        Some(other) => {
            return Err(ApiError::invalid(
                format!("'provider.sort' must be price, latency or throughput (got '{other}')."),
                Some("provider.sort"),
            ))
        }
    };
    let max_price = match &p.max_price {
        None => None,
        Some(m) => {
            let cap = |v: Option<f64>, side: &'static str| -> Result<u64, ApiError> {
                match v {
                    None => Ok(u64::MAX),
                    Some(x) if x.is_finite() && x >= 0.0 => {
                        Ok(x.floor().min(u64::MAX as f64) as u64)
                    }
                    Some(x) => Err(ApiError::invalid(
                        format!("'provider.max_price.{side}' must be a number ≥ 0 (got {x})."),
                        Some(match side {
                            "prompt" => "provider.max_price.prompt",
                            _ => "provider.max_price.completion",
                        }),
                    )),
                }
            };
            Some(Price {
                input: cap(m.prompt, "prompt")?,
                output: cap(m.completion, "completion")?,
            })
        }
    };
    Ok(RoutePrefs {
        order: p.order.clone().unwrap_or_default(),
        only: p.only.clone().unwrap_or_default(),
        ignore: p.ignore.clone().unwrap_or_default(),
        allow_fallbacks: p.allow_fallbacks.unwrap_or(true),
        sort,
        max_price,
    })
}

/// Check the shared parameters. `context` is the model's context per
/// request: larger `max_tokens` values are refused as absurd.
pub fn check_common(
    p: &CommonParams,
    max_tokens_override: Option<i64>,
    logprobs: Option<u32>,
    context: usize,
) -> Result<Checked, ApiError> {
    if let Some(n) = p.n {
        if n != 1 {
            return Err(ApiError::invalid(
                format!(
                    "Only n = 1 is supported (got {n}); send separate requests for more choices."
                ),
                Some("n"),
            ));
        }
    }
    let (max_tokens, param) = match (max_tokens_override, p.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let max_tokens = match max_tokens {
        None => None,
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                format!("'{param}' must be at least 1 (got {m})."),
                Some(param),
            ))
        }
        Some(m) if m as u64 > context as u64 => {
            return Err(ApiError::invalid(
                format!("'{param}' is {m}, more than this model's context of {context} tokens."),
                Some(param),
            ))
        }
        Some(m) => Some(m as u32),
    };
    let temperature = p.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("'temperature' must be between 0 and 2 (got {temperature})."),
            Some("temperature"),
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("'top_p' must be in (0, 1] (got {top_p})."),
            Some("top_p"),
        ));
    }
    let min_p = p.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid(
            format!("'min_p' must be in [0, 1] (got {min_p})."),
            Some("min_p"),
        ));
    }
    let top_k = p.top_k.unwrap_or(0);
    if !(0..=1_000_000).contains(&top_k) {
        return Err(ApiError::invalid(
            format!("'top_k' must be between 0 and 1000000 (got {top_k})."),
            Some("top_k"),
        ));
    }
    let stop = match &p.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid(
            format!("At most {MAX_STOP} stop sequences are allowed."),
            Some("stop"),
        ));
    }
    let longest = tessera_core::generation::MAX_STOP_BYTES;
    if stop.iter().any(|s| s.len() > longest || s.is_empty()) {
        return Err(ApiError::invalid(
            format!("Each stop sequence must be 1 to {longest} bytes long."),
            Some("stop"),
        ));
    }
    if let Some(n) = logprobs {
        if n > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(
                format!("'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS} (got {n})."),
                Some("top_logprobs"),
            ));
        }
    }
    // Without a seed one is drawn; the response reports it (`tessera.seed`)
    // so the answer can be reproduced.
    let seed = p.seed.map_or_else(tessera_core::unique_u64, |s| s as u64);
    let include_usage = p.stream_options.as_ref().is_some_and(|o| o.include_usage);
    Ok(Checked {
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k: top_k as u32,
            top_p: top_p as f32,
            min_p: min_p as f32,
            seed,
        },
        max_tokens,
        stop,
        stream: p.stream,
        include_usage,
        logprobs,
        ignore_eos: p.ignore_eos,
        route: check_route(p.provider.as_ref())?,
    })
}

/// Turn API messages into template input; refuse empty or unsupported ones.
pub fn check_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "'messages' must contain at least one message.",
            Some("messages"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role '{other}' is not supported; use system, developer, user or assistant."),
                        Some(&format!("messages[{i}].role")),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}] of type '{kind}' is not supported; only text parts are."),
                                    Some(&format!("messages[{i}].content")),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            if content.contains('\0') {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content contains a NUL character."),
                    Some(&format!("messages[{i}].content")),
                ));
            }
            Ok(ChatMessage { role: role.into(), content })
        })
        .collect()
}

/// The single prompt of a legacy completion request.
pub fn check_prompt(prompt: &Prompt) -> Result<String, ApiError> {
    let text = match prompt {
        Prompt::One(s) => s.clone(),
        Prompt::Many(v) if v.len() == 1 => v[0].clone(),
        Prompt::Many(v) => {
            return Err(ApiError::invalid(
                format!(
                    "Only one prompt per request is supported (got {}).",
                    v.len()
                ),
                Some("prompt"),
            ))
        }
    };
    if text.is_empty() {
        return Err(ApiError::invalid(
            "'prompt' must not be empty.",
            Some("prompt"),
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<(ChatRequest, CommonParams), ApiError> {
        parse_body(body.as_bytes())
    }

    #[test]
    fn wrong_types_name_the_parameter() {
        let e = chat(r#"{"model":"m","messages":[],"max_tokens":"ten"}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = chat(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = chat(r#"{"messages":[]}"#).unwrap_err();
        assert!(e.message.contains("model"), "{}", e.message);
    }

    #[test]
    fn malformed_and_non_object_bodies_are_400() {
        assert_eq!(chat("{nope").unwrap_err().code, Some("invalid_json"));
        assert_eq!(chat("[1,2]").unwrap_err().status, 400);
        assert_eq!(chat("  ").unwrap_err().status, 400);
    }

    #[test]
    fn unknown_fields_are_ignored_and_parts_are_joined() {
        let r = chat(r#"{"model":"m","frequency_penalty":0.5,"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#).unwrap();
        assert_eq!(check_messages(&r.0.messages).unwrap()[0].content, "ab");
    }

    #[test]
    fn limits_are_enforced() {
        let p = |body: &str| -> Result<Checked, ApiError> {
            let (r, common) = chat(body).unwrap();
            check_common(&common, r.max_completion_tokens, None, 2048)
        };
        assert!(p(r#"{"model":"m","messages":[],"max_tokens":-1}"#).is_err());
        assert!(p(r#"{"model":"m","messages":[],"max_tokens":100000000}"#).is_err());
        assert!(p(r#"{"model":"m","messages":[],"temperature":3}"#).is_err());
        assert!(p(r#"{"model":"m","messages":[],"top_p":0}"#).is_err());
        assert!(p(r#"{"model":"m","messages":[],"n":2}"#).is_err());
        let ok = p(r#"{"model":"m","messages":[],"max_completion_tokens":7,"seed":5,"stop":"x"}"#)
            .unwrap();
        assert_eq!(ok.max_tokens, Some(7));
        assert_eq!(ok.sampling.seed, 5);
        assert_eq!(ok.stop, vec!["x".to_string()]);
        assert!(check_messages(&[]).is_err());
    }
}
