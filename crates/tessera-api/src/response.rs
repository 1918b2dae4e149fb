//! Writing OpenAI responses from a stream of engine events.
//!
//! Streaming is its own path, not a variant of the blocking one: chunks go
//! out as the engine produces tokens, the final chunk carries the finish
//! reason, an optional usage chunk follows, and `[DONE]` ends the stream. An
//! engine failure mid-stream is sent as an `error` event.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, Sse};
use futures::stream::{self, Stream};
use serde_json::{json, Value};
use tessera_backend::{JobError, JobEvent as Event};
use tessera_core::{FinishReason, TokenEvent, Usage};

use crate::error::ApiError;
use tessera_metrics::Outcome;

use crate::{Job, Kind};

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

impl Job {
    /// The `tessera` extension object: who served it and how to reproduce it.
    fn extension(&self) -> Value {
        let mut v = json!({
            "provider": self.providers.last(),
            "providers": self.providers,
            "model_sha256": self.model.sha256,
            "seed": self.checked.sampling.seed,
            "audit": self.backend.audit_status(&self.id),
        });
        if let Some(s) = &self.bill.settled {
            v["cost"] = json!(s.cost);
            v["receipt"] = json!(s.receipt);
        }
        v
    }

    fn token_text(&self, token: i32) -> (String, Vec<u8>) {
        let bytes = self.model.tokenizer.token_bytes(token);
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// One chat `logprobs.content` entry.
    fn chat_logprob(&self, t: &TokenEvent) -> Value {
        let (text, bytes) = self.token_text(t.token);
        let top: Vec<Value> = t
            .top_logprobs
            .iter()
            .map(|&(id, lp)| {
                let (text, bytes) = self.token_text(id);
                json!({ "token": text, "logprob": lp, "bytes": bytes })
            })
            .collect();
        json!({ "token": text, "logprob": t.logprob, "bytes": bytes, "top_logprobs": top })
    }

    /// Legacy completions' column-wise logprobs for some tokens.
    fn completion_logprobs(&self, tokens: &[TokenEvent], offset: usize) -> Value {
        let mut texts = Vec::new();
        let mut lps = Vec::new();
        let mut tops = Vec::new();
        let mut offsets = Vec::new();
        let mut at = offset;
        for t in tokens {
            let (text, _) = self.token_text(t.token);
            offsets.push(at);
            at += text.len();
            texts.push(text);
            lps.push(t.logprob);
            let top: serde_json::Map<String, Value> = t
                .top_logprobs
                .iter()
                .map(|&(id, lp)| (self.token_text(id).0, json!(lp)))
                .collect();
            tops.push(Value::Object(top));
        }
        json!({ "tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets })
    }

    fn chunk(&self, choice: Value, with_extension: bool) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model.id,
            "choices": [choice],
        });
        if self.checked.include_usage {
            v["usage"] = Value::Null;
        }
        if with_extension {
            v["tessera"] = self.extension();
        }
        v
    }

    /// The chunk carrying one token's text (and logprobs, if asked).
    fn token_chunk(&self, t: &TokenEvent, text_offset: usize, first: bool) -> Option<Value> {
        let want_logprobs = self.checked.logprobs.is_some();
        if t.text.is_empty() && !want_logprobs {
            return None;
        }
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "delta": { "content": t.text },
                "logprobs": if want_logprobs { json!({ "content": [self.chat_logprob(t)] }) } else { Value::Null },
                "finish_reason": Value::Null,
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": t.text,
                "logprobs": if want_logprobs { self.completion_logprobs(std::slice::from_ref(t), text_offset) } else { Value::Null },
                "finish_reason": Value::Null,
            }),
        };
        Some(self.chunk(choice, first))
    }
}

/// The blocking answer's body, without the `tessera` extension (what a
/// replay stores; the extension is added when it is sent).
fn answer_body(
    job: &Job,
    text: &str,
    tokens: &[TokenEvent],
    finish: FinishReason,
    usage: &Usage,
) -> Value {
    let want_logprobs = job.checked.logprobs.is_some() && !tokens.is_empty();
    let choice = match job.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": if want_logprobs {
                json!({ "content": tokens.iter().map(|t| job.chat_logprob(t)).collect::<Vec<_>>() })
            } else { Value::Null },
            "finish_reason": finish_str(finish),
        }),
        Kind::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": if want_logprobs { job.completion_logprobs(tokens, 0) } else { Value::Null },
            "finish_reason": finish_str(finish),
        }),
    };
    let object = match job.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    json!({
        "id": job.id,
        "object": object,
        "created": job.created,
        "model": job.model.id,
        "choices": [choice],
        "usage": usage_json(usage),
    })
}

/// Run the generation to the end and build the blocking response.
pub(crate) async fn collect(mut job: Job) -> Result<Value, ApiError> {
    let mut text = String::new();
    let mut tokens: Vec<TokenEvent> = Vec::new();
    let (finish, usage) = loop {
        let next = tokio::select! {
            e = job.events.recv() => e,
            _ = job.shutdown.cancelled() => Some(Event::Error(JobError::ShuttingDown)),
        };
        match next {
            Some(Event::Token(t)) => {
                job.bill.token();
                job.track.token();
                text.push_str(&t.text);
                tokens.push(t);
            }
            Some(Event::Done {
                finish_reason,
                usage,
                text: tail,
            }) => {
                text.push_str(&tail);
                break (finish_reason, usage);
            }
            Some(Event::Error(e)) => {
                job.bill.release().await;
                job.track.finish(Outcome::Failed, None);
                return Err(ApiError::from(e));
            }
            Some(Event::Provider { node, price }) => {
                job.bill.part(node.clone(), price);
                job.providers.push(node);
            }
            Some(Event::Receipt(r)) => job.bill.receipt(r),
            None => {
                job.bill.release().await;
                job.track.finish(Outcome::Failed, None);
                return Err(ApiError::internal(
                    "the engine stopped before the answer was complete",
                ));
            }
        }
    };
    let mut body = answer_body(&job, &text, &tokens, finish, &usage);
    let replay = job.replayable.then(|| body.to_string());
    job.bill.settle(&usage, replay).await;
    job.completed(usage.completion_tokens);
    body["tessera"] = job.extension();
    Ok(body)
}

/// An answer replayed for a retry with the same idempotency key: the body
/// stored with its charge, the charge added back, as a JSON response or as
/// a stream of one content chunk, the final chunk and `[DONE]`.
pub(crate) fn replay(
    stored: &str,
    cost: u64,
    receipt: Option<String>,
    stream: bool,
    include_usage: bool,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let mut body: Value = serde_json::from_str(stored)
        .map_err(|e| ApiError::internal(format!("a stored answer is unreadable: {e}")))?;
    body["tessera"] = json!({"cost": cost, "receipt": receipt, "replayed": true});
    if !stream {
        return Ok(axum::Json(body).into_response());
    }
    let chat = body["object"] == "chat.completion";
    let choice = &body["choices"][0];
    let base = |choice: Value, extension: bool| {
        let mut v = json!({
            "id": body["id"],
            "object": if chat { "chat.completion.chunk" } else { "text_completion" },
            "created": body["created"],
            "model": body["model"],
            "choices": [choice],
        });
        if extension {
            v["tessera"] = body["tessera"].clone();
        }
        v
    };
    let mut events = Vec::new();
    if chat {
        let content = choice["message"]["content"].clone();
        events.push(base(json!({"index": 0, "delta": {"role": "assistant", "content": content}, "logprobs": null, "finish_reason": null}), true));
        events.push(base(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": choice["finish_reason"]}), true));
    } else {
        events.push(base(
            json!({"index": 0, "text": choice["text"], "logprobs": null, "finish_reason": null}),
            true,
        ));
        events.push(base(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": choice["finish_reason"]}), true));
    }
    if include_usage {
        let mut u = base(Value::Null, false);
        u["choices"] = json!([]);
        u["usage"] = body["usage"].clone();
        events.push(u);
    }
    let mut out: Vec<Result<SseEvent, Infallible>> = events.iter().map(|v| Ok(data(v))).collect();
    out.push(Ok(SseEvent::default().data("[DONE]")));
    Ok(Sse::new(stream::iter(out)).into_response())
}

/// Where a stream is in its life.
struct StreamState {
    job: Job,
    out: VecDeque<SseEvent>,
    started: bool,
    finished: bool,
    /// Bytes of text sent so far (legacy completions' `text_offset`).
    sent: usize,
    /// A new provider took over: the next chunk names it.
    handoff: bool,
    /// The answer's text so far, kept when the answer is stored for a
    /// replay.
    text: String,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

impl StreamState {
    fn start(&mut self) {
        self.started = true;
        if self.job.kind == Kind::Chat {
            let choice = json!({
                "index": 0,
                "delta": { "role": "assistant", "content": "" },
                "logprobs": Value::Null,
                "finish_reason": Value::Null,
            });
            self.out.push_back(data(&self.job.chunk(choice, true)));
        }
    }

    fn on_event(&mut self, event: Option<Event>) {
        let first_text = (self.job.kind == Kind::Completion && self.sent == 0) || self.handoff;
        match event {
            Some(Event::Token(t)) => {
                self.job.bill.token();
                self.job.track.token();
                if let Some(chunk) = self.job.token_chunk(&t, self.sent, first_text) {
                    self.out.push_back(data(&chunk));
                    self.handoff = false;
                }
                self.sent += t.text.len();
                if self.job.replayable {
                    self.text.push_str(&t.text);
                }
            }
            Some(Event::Provider { node, price }) => {
                self.job.bill.part(node.clone(), price);
                self.job.providers.push(node);
                self.handoff = true;
            }
            Some(Event::Receipt(r)) => self.job.bill.receipt(r),
            Some(Event::Done {
                finish_reason,
                usage,
                text,
            }) => {
                self.job.completed(usage.completion_tokens);
                let delta = if text.is_empty() {
                    json!({})
                } else {
                    json!({ "content": text })
                };
                let choice = match self.job.kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "delta": delta,
                        "logprobs": Value::Null,
                        "finish_reason": finish_str(finish_reason),
                    }),
                    Kind::Completion => json!({
                        "index": 0,
                        "text": text,
                        "logprobs": Value::Null,
                        "finish_reason": finish_str(finish_reason),
                    }),
                };
                self.out.push_back(data(&self.job.chunk(choice, true)));
                if self.job.checked.include_usage {
                    let mut u = self.job.chunk(Value::Null, false);
                    u["choices"] = json!([]);
                    u["usage"] = usage_json(&usage);
                    self.out.push_back(data(&u));
                }
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.finished = true;
            }
            Some(Event::Error(e)) => {
                self.job.track.finish(Outcome::Failed, None);
                let e = ApiError::from(e);
                tracing::warn!(message = %e.message, "generation failed mid-stream");
                self.out
                    .push_back(data(&serde_json::to_value(e.body()).unwrap_or(Value::Null)));
                self.finished = true;
            }
            None => {
                self.job.track.finish(Outcome::Failed, None);
                let e = ApiError::internal("the engine stopped before the answer was complete");
                self.out
                    .push_back(data(&serde_json::to_value(e.body()).unwrap_or(Value::Null)));
                self.finished = true;
            }
        }
    }
}

/// The server-sent-event response of a streamed generation.
pub(crate) fn stream(job: Job) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let state = StreamState {
        job,
        out: VecDeque::new(),
        started: false,
        finished: false,
        sent: 0,
        handoff: false,
        text: String::new(),
    };
    Sse::new(stream::unfold(state, |mut st| async move {
        loop {
            if !st.started {
                st.start();
            }
            if let Some(ev) = st.out.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.finished {
                return None;
            }
            let next = tokio::select! {
                e = st.job.events.recv() => e,
                _ = st.job.shutdown.cancelled() => Some(Event::Error(JobError::ShuttingDown)),
            };
            // Settle before the final chunk, which carries the cost.
            match &next {
                Some(Event::Done {
                    usage,
                    finish_reason,
                    text,
                }) => {
                    let replay = st.job.replayable.then(|| {
                        let mut all = st.text.clone();
                        all.push_str(text);
                        answer_body(&st.job, &all, &[], *finish_reason, usage).to_string()
                    });
                    st.job.bill.settle(usage, replay).await
                }
                Some(Event::Error(_)) | None => st.job.bill.release().await,
                _ => {}
            }
            st.on_event(next);
        }
    }))
}
