//! Tessera's OpenAI-compatible HTTP API.
//!
//! The API is the edge of the system: a request is parsed and checked once
//! ([`validation`]), its prompt is rendered with the model's own chat
//! template and tokenized, and the job goes to a [`Backend`], which answers
//! with a stream of engine [`Event`]s. The same stream feeds both the
//! streaming (server-sent events, ending in `[DONE]`) and the blocking
//! response. Every failure leaves through [`ApiError`] in OpenAI's shape.
//!
//! `tessera serve` puts an in-process engine behind [`Backend`]; the network
//! gateway puts its router there. Dropping the event receiver (the client
//! went away) cancels the job.
//!
//! Every `/v1` call needs an API key (`Authorization: Bearer KEY`), checked
//! by [`Accounts`]. A generation is paid from escrow: the largest possible
//! cost (prompt × input price + max output × output price, at the highest
//! price of the providers that may serve it) is held before dispatch and
//! settled at the real cost when the answer ends ([`billing`]).

pub mod accounts;
mod billing;
pub mod error;
mod response;
mod training;
pub mod validation;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
pub use futures::future::BoxFuture;
use serde_json::{json, Value};
use tessera_backend::{Backend, JobError, JobEvent, JobTicket, ServedModel};
use tessera_core::{GenerationRequest, Token};
pub use tessera_metrics::Metrics;
use tessera_metrics::{Generation, Outcome, Verdict};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

pub use billing::{Accounts, Caller, Held, Part, Settled};
pub use error::ApiError;
use validation::{check_common, check_messages, check_prompt, parse_body, Checked};

/// `listener` with TCP_NODELAY on every connection it accepts. Streamed
/// tokens are small writes, and with Nagle's algorithm each waits for the
/// client to acknowledge the previous one: 20–40 ms per token with delayed
/// acknowledgements (measured: time to first token +25 ms over the engine
/// through reqwest, +1 ms with this).
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    fn set(stream: &mut tokio::net::TcpStream) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    }
    listener.tap_io(set as fn(&mut tokio::net::TcpStream))
}

/// Settings of the HTTP layer.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Largest request body accepted (413 beyond).
    pub body_limit: usize,
    /// Where requests and generations are counted (`/metrics` is served by
    /// whoever assembles the process).
    pub metrics: Arc<Metrics>,
    /// Cancelled when the process stops for good: answers still running
    /// end at once (a stream with an error event, a blocking request with
    /// a 503) and their holds are released.
    pub shutdown: CancellationToken,
    /// Tracks every answer in flight and every bill still closing, so the
    /// process can wait until nothing is held before it exits.
    pub tasks: TaskTracker,
    /// Federated training tasks, when this gateway runs them.
    pub training: Option<Arc<dyn tessera_backend::Training>>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: 4 * 1024 * 1024,
            metrics: Metrics::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            training: None,
        }
    }
}

struct Api {
    backend: Arc<dyn Backend>,
    accounts: Arc<dyn Accounts>,
    config: ApiConfig,
}

/// The API's routes, ready to serve.
pub fn router(backend: Arc<dyn Backend>, accounts: Arc<dyn Accounts>, config: ApiConfig) -> Router {
    let limit = config.body_limit;
    let state = Arc::new(Api {
        backend,
        accounts,
        config,
    });
    let paid = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/account", get(account))
        .route("/v1/jobs/{id}", get(job_report))
        .route(
            "/v1/training/tasks",
            post(training::create).get(training::list),
        )
        .route("/v1/training/tasks/{id}", get(training::status))
        .route("/v1/training/tasks/{id}/cancel", post(training::cancel))
        .route("/v1/training/tasks/{id}/model", get(training::model))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(paid)
        .route("/health", get(health))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|uri: Uri| async move {
            let mut e = ApiError::not_found(uri.path());
            e.status = StatusCode::METHOD_NOT_ALLOWED;
            e.message = format!("Method not allowed on {}.", uri.path());
            e.code = Some("method_not_allowed");
            e
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(middleware::from_fn(close_after_refused_body))
        .with_state(state)
}

/// A request refused with a body the server may not have read (a 401
/// before a 4 MiB prompt, a 413) is answered with `Connection: close`:
/// the server drops the unread rest with the connection, and a client
/// that pools connections (the `openai` package, browsers) must not send
/// its next request on it, or that request fails with a connection error.
async fn close_after_refused_body(req: Request, next: Next) -> Response {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let mut response = next.run(req).await;
    if has_body && response.status().is_client_error() {
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// Count every answered request by route pattern and status.
async fn count(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let response = next.run(req).await;
    api.config
        .metrics
        .request(&route, response.status().as_u16());
    response
}

/// Every `/v1` route: find the account behind the bearer key, or 401.
async fn authenticate(
    State(api): State<Arc<Api>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty());
    let Some(key) = key else {
        return Err(ApiError::unauthorized(
            "No API key: send 'Authorization: Bearer KEY' (`tessera account create` makes one; \
             devnet and serve write a demo key to endpoint.json).",
        ));
    };
    let caller = api.accounts.authenticate(key).await?;
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

fn body(api: &Api, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(api.config.body_limit)
        } else {
            ApiError::invalid(format!("The request body could not be read: {r}."), None)
        }
    })
}

fn find_model(api: &Api, name: &str) -> Result<ServedModel, ApiError> {
    api.backend
        .models()
        .into_iter()
        .find(|m| m.id == name || m.sha256 == name)
        .ok_or_else(|| ApiError::unknown_model(name))
}

/// Seconds since the epoch, for `created`.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What kind of response to build.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

/// Everything the response writers need about one request.
pub(crate) struct Job {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: ServedModel,
    pub checked: Checked,
    /// Providers that served the answer, in order (more than one when an
    /// answer was continued after a provider failed).
    pub providers: Vec<String>,
    /// The request's escrow and what it has used so far.
    pub bill: billing::Bill,
    /// Counts the generation for `/metrics` and the dashboard.
    pub track: Generation,
    /// Where the answer came from (asked for its audit status).
    pub backend: Arc<dyn Backend>,
    /// Ends the answer early when the process stops.
    pub shutdown: CancellationToken,
    /// Counts this answer as in flight until it is dropped.
    pub _in_flight: TaskTrackerToken,
    /// The request carried an idempotency key: its answer is stored with
    /// its charge, so that a retry gets it again.
    pub replayable: bool,
    /// The job's events.
    pub events: UnboundedReceiver<JobEvent>,
    /// Ends the job early but properly (the network); see
    /// [`Dispatch::wrap_up`](tessera_backend::Dispatch).
    pub wrap_up: Option<CancellationToken>,
}

impl Drop for Job {
    /// The client went away before the end: on the network the job wraps
    /// up and its bill settles in the background for what was proven;
    /// locally the bill's own drop charges what was generated.
    fn drop(&mut self) {
        if let Some(wrap_up) = self.wrap_up.take() {
            if self.bill.is_open() {
                let (_, closed) = tokio::sync::mpsc::unbounded_channel();
                let events = std::mem::replace(&mut self.events, closed);
                self.bill.drain(events, wrap_up);
            }
        }
    }
}

impl Job {
    /// The answer was delivered: count it (a backend that audits counts
    /// the verdicts itself).
    pub(crate) fn completed(&mut self, completion_tokens: u32) {
        self.track
            .finish(Outcome::Completed, Some(u64::from(completion_tokens)));
        if !self.backend.audits() {
            self.track.metrics().audit(Verdict::NotAudited, None);
        }
    }
}

/// Tokenize off the async threads: a multi-megabyte prompt takes a while.
async fn tokenize(model: &ServedModel, render: Render) -> Result<Vec<Token>, ApiError> {
    let tokenizer = model.tokenizer.clone();
    tokio::task::spawn_blocking(move || {
        let text = match render {
            Render::Chat(messages) => tokenizer.apply_chat_template(&messages)?,
            Render::Raw(text) => text,
        };
        tokenizer.tokenize(&text, true)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
    .map_err(ApiError::from)
}

enum Render {
    Chat(Vec<tessera_engine::ChatMessage>),
    Raw(String),
}

/// The request's `Idempotency-Key` header, if any.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) if !k.trim().is_empty() && k.len() <= 255 => Ok(Some(k.trim().to_string())),
            _ => Err(ApiError::invalid(
                "The Idempotency-Key header must be 1–255 visible ASCII characters.",
                None,
            )),
        },
    }
}

async fn run(
    api: &Api,
    kind: Kind,
    model: ServedModel,
    mut checked: Checked,
    render: Render,
    caller: Caller,
    idempotency: Option<String>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let prompt = tokenize(&model, render).await?;
    let limit = model.context_length;
    if prompt.len() >= limit {
        return Err(JobError::ContextLength {
            prompt: prompt.len(),
            limit,
        }
        .into());
    }
    // Escrow: hold the most this request can cost on the route the router
    // would take now (or, when the account cannot cover that, at the
    // cheapest provider's price); the router goes no higher than the
    // quote's ceiling, and to a dearer provider than the hold covers only
    // after raising it (`HoldBudget`).
    let quote = api.backend.quote(&model, &checked.route)?;
    checked.route.max_price = Some(quote.ceiling);
    let room = limit - prompt.len();
    let max_out = checked.max_tokens.map_or(room, |m| (m as usize).min(room));
    let most = |price: tessera_core::Price| price.cost(prompt.len() as u64, max_out as u64);
    let mut held_at = quote.hold;
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let id = format!("{prefix}-{:016x}", tessera_core::unique_u64());
    let mut held = api
        .accounts
        .hold(&caller, most(held_at), idempotency.clone())
        .await;
    if matches!(&held, Err(e) if e.status == StatusCode::PAYMENT_REQUIRED)
        && most(quote.cheapest) < most(held_at)
    {
        held_at = quote.cheapest;
        held = api
            .accounts
            .hold(&caller, most(held_at), idempotency.clone())
            .await;
    }
    let hold = match held? {
        Held::New(hold) => hold,
        // The retry of an answer that was charged: the same answer again,
        // never a second charge.
        Held::Duplicate {
            cost: Some(cost),
            response: Some(stored),
            receipt,
        } => {
            return response::replay(
                &stored,
                cost,
                receipt,
                checked.stream,
                checked.include_usage,
            );
        }
        Held::Duplicate { cost, .. } => {
            let what = match cost {
                Some(c) => format!("it was settled for {c} micro-credits"),
                None => "it is still running".into(),
            };
            return Err(ApiError::conflict(
                format!(
                    "Idempotency-Key '{}' was already used by this account and {what}; \
                     it is never charged twice. Use a new key for a new request.",
                    idempotency.unwrap_or_default()
                ),
                "idempotency_key_reused",
            ));
        }
    };
    let budget = billing::HoldBudget::new(
        api.accounts.clone(),
        hold.clone(),
        held_at,
        prompt.len() as u64,
        max_out as u64,
    );
    let mut bill = billing::Bill::new(
        api.accounts.clone(),
        api.config.tasks.clone(),
        hold,
        id.clone(),
        model.sha256.clone(),
        prompt.len() as u64,
    );
    let prompt_tokens = prompt.len() as u64;
    let request = GenerationRequest {
        prompt,
        sampling: checked.sampling.clone(),
        max_tokens: checked.max_tokens,
        stop: checked.stop.clone(),
        top_logprobs: checked.logprobs.unwrap_or(0) as usize,
        ignore_eos: checked.ignore_eos,
        cache: None,
    };
    let ticket = JobTicket {
        id: id.clone(),
        account: caller.account.clone(),
        budget: Some(Arc::new(budget)),
    };
    let dispatch = match api
        .backend
        .submit(&model, request, &checked.route, &ticket)
        .await
    {
        Ok(d) => d,
        Err(e) => {
            bill.release().await;
            return Err(e.into());
        }
    };
    bill.require_receipts(dispatch.receipts_required);
    bill.part(dispatch.provider.clone(), dispatch.price);
    let job = Job {
        kind,
        id,
        created: now(),
        model,
        checked,
        providers: vec![dispatch.provider],
        bill,
        track: api.config.metrics.generation(arrived, prompt_tokens),
        backend: api.backend.clone(),
        shutdown: api.config.shutdown.clone(),
        _in_flight: api.config.tasks.token(),
        replayable: idempotency.is_some(),
        events: dispatch.events,
        wrap_up: dispatch.wrap_up,
    };
    if job.checked.stream {
        Ok(response::stream(job).into_response())
    } else {
        response::collect(job)
            .await
            .map(|v| Json(v).into_response())
    }
}

async fn chat_completions(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let idempotency = idempotency_key(&headers)?;
    let raw = body(&api, raw)?;
    let (req, common): (validation::ChatRequest, _) = parse_body(&raw)?;
    let model = find_model(&api, &req.model)?;
    let logprobs = req.logprobs.then(|| req.top_logprobs.unwrap_or(0));
    if !req.logprobs && req.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid(
            "'top_logprobs' requires 'logprobs': true.",
            Some("top_logprobs"),
        ));
    }
    let checked = check_common(
        &common,
        req.max_completion_tokens,
        logprobs,
        model.context_length,
    )?;
    let messages = check_messages(&req.messages)?;
    let render = Render::Chat(messages);
    run(
        &api,
        Kind::Chat,
        model,
        checked,
        render,
        caller,
        idempotency,
    )
    .await
}

async fn completions(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let idempotency = idempotency_key(&headers)?;
    let raw = body(&api, raw)?;
    let (req, common): (validation::CompletionRequest, _) = parse_body(&raw)?;
    let model = find_model(&api, &req.model)?;
    if req.echo {
        return Err(ApiError::invalid("'echo' is not supported.", Some("echo")));
    }
    let checked = check_common(&common, None, req.logprobs, model.context_length)?;
    let prompt = check_prompt(&req.prompt)?;
    let render = Render::Raw(prompt);
    run(
        &api,
        Kind::Completion,
        model,
        checked,
        render,
        caller,
        idempotency,
    )
    .await
}

fn model_card(m: &ServedModel) -> Value {
    let price = m.prices.map(|(lo, hi)| {
        json!({
            "unit": "credits per million tokens (= micro-credits per token)",
            "prompt": { "min": lo.input, "max": hi.input },
            "completion": { "min": lo.output, "max": hi.output },
        })
    });
    json!({
        "id": m.id,
        "object": "model",
        "created": 0,
        "owned_by": "tessera",
        "tessera": {
            "sha256": m.sha256,
            "context_length": m.context_length,
            "providers": m.providers,
            "price": price,
        }
    })
}

async fn account(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    api.accounts.account(&caller).await.map(Json)
}

/// A request's audit verdict and evidence, for the account that paid for it.
async fn job_report(
    State(api): State<Arc<Api>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    api.backend
        .audit_report(&id, &caller.account)
        .map(Json)
        .ok_or_else(|| {
            let mut e = ApiError::not_found(&format!("/v1/jobs/{id}"));
            e.message = format!(
                "No job '{id}' of this account is known here (answers of this gateway \
                 since it started, by the response's id)."
            );
            e.code = Some("job_not_found");
            e
        })
}

async fn list_models(State(api): State<Arc<Api>>) -> Json<Value> {
    let data: Vec<Value> = api.backend.models().iter().map(model_card).collect();
    Json(json!({ "object": "list", "data": data }))
}

async fn get_model(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find_model(&api, &id).map(|m| Json(model_card(&m)))
}

async fn health(State(api): State<Arc<Api>>) -> Json<Value> {
    let models: Vec<String> = api.backend.models().into_iter().map(|m| m.id).collect();
    Json(json!({ "status": "ok", "models": models, "backend": api.backend.health() }))
}
