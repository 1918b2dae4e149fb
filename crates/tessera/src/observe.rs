//! Seeing the network: `/metrics`, `/api/status`, `/dashboard`, and the
//! `tessera status` and `tessera provider status` commands.
//!
//! A gateway serves, next to its API and without an API key:
//! - `GET /metrics`: every count of the process (`tessera-metrics`) plus the
//!   ledger's totals, in the OpenMetrics text format Prometheus scrapes;
//! - `GET /api/status`: the network as this gateway sees it, as JSON (the
//!   fields are documented in docs/status-api.md): a summary, every
//!   provider it has seen with its figures and earnings, ten-second traffic
//!   buckets (the gateway's life so far, 5 to 30 minutes). Anything a
//!   provider could use to tell audits or canaries from ordinary work
//!   (per-provider audit counts, reputation, verified throughput, canary
//!   misses, the audit totals and the recent audits) is shown only to the
//!   operator (`Authorization: Bearer` the gateway's operator token) and,
//!   for its own entry, to a provider signing the request with its node
//!   key (as `tessera provider earnings` does);
//! - `GET /dashboard`: one self-contained page (HTML, CSS and script
//!   embedded in the binary, nothing fetched from elsewhere) that reads
//!   `/api/status` every two seconds and draws it.
//!
//! Only counts, prices, node ids and durations are shown; never prompt or
//! completion text, never API keys or client accounts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Args;
use serde_json::{json, Value};
use tessera_api::{ApiError, Metrics};
use tessera_backend::Backend;
use tessera_ledger::Ledger;
use tessera_net::directory::Directory;
use tessera_net::node;

use crate::accounts::credits;

/// The gateway's status, public or (signed, or with the operator token) private.
const STATUS_PATH: &str = "/api/status";

/// The dashboard page, embedded.
const DASHBOARD: &str = include_str!("../assets/dashboard.html");
/// History the status shows: the gateway's life so far, at least 5 and at
/// most 30 minutes.
const WINDOW: (Duration, Duration) = (Duration::from_secs(5 * 60), Duration::from_secs(30 * 60));

/// What the status routes read.
pub struct View {
    pub metrics: Arc<Metrics>,
    pub ledger: Ledger,
    pub backend: Arc<dyn Backend>,
    /// The gateway's providers (`None` for `tessera serve`).
    pub directory: Option<Arc<Directory>>,
    /// Where the gateway's audits run (the operator sees its auditors).
    pub auditors: Option<Arc<tessera_net::auditors::AuditorPool>>,
    pub node: String,
    pub network: String,
    pub started: Instant,
    /// The token that unlocks the operator's view of `/api/status`.
    pub operator_token: Option<String>,
    /// Federated training tasks (a gateway's).
    pub training: Option<Arc<tessera_net::federated::Coordinator>>,
}

/// Who asked for the status, and so what they see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Viewer {
    /// Everyone: no figure that moves with audits or canaries.
    Public,
    /// A provider, signed with its node key: its own figures too.
    Provider(tessera_core::NodeId),
    /// The gateway's operator: everything.
    Operator,
}

/// Per-provider figures that move when an answer is audited or a canary
/// runs: a provider watching them could tell audits from ordinary work.
const PRIVATE_PROVIDER_FIELDS: [&str; 5] = [
    "audits_passed",
    "audits_failed",
    "reputation",
    "verified_tok_s",
    "canary_misses",
];

fn viewer(view: &View, headers: &HeaderMap) -> Result<Viewer, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let (Some(given), Some(token)) = (bearer, &view.operator_token) {
        // Every byte compared, whatever differs first.
        let same = given.len() == token.len()
            && given
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            return Ok(Viewer::Operator);
        }
        return Err(ApiError::unauthorized(
            "That is not this gateway's operator token.",
        ));
    }
    if headers.contains_key("x-tessera-node") {
        return Ok(Viewer::Provider(crate::earnings::signed_by(
            headers,
            STATUS_PATH,
        )?));
    }
    Ok(Viewer::Public)
}

/// `/metrics` only (for `tessera serve`).
pub fn metrics_route(view: Arc<View>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(view)
}

/// `/metrics`, `/api/status` and `/dashboard` (for a gateway).
pub fn routes(view: Arc<View>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(STATUS_PATH, get(status))
        .route("/dashboard", get(|| async { Html(DASHBOARD) }))
        .route(
            "/dashboard/",
            get(|| async { Redirect::permanent("/dashboard") }),
        )
        .with_state(view)
}

fn ledger_error(e: tessera_ledger::LedgerError) -> ApiError {
    ApiError::internal(format!("ledger: {e}"))
}

async fn metrics(State(view): State<Arc<View>>) -> Result<Response, ApiError> {
    let t = view.ledger.totals().await.map_err(ledger_error)?;
    view.metrics.set_ledger(&[
        ("issued", t.issued),
        ("escrow", t.escrow),
        ("revenue", t.revenue),
        ("provider_earnings", t.provider_earnings),
        ("fees", t.fees),
    ]);
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        view.metrics.encode(),
    )
        .into_response())
}

async fn status(
    State(view): State<Arc<View>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let viewer = viewer(&view, &headers)?;
    let totals = view.ledger.totals().await.map_err(ledger_error)?;
    let earnings = view
        .ledger
        .provider_earnings()
        .await
        .map_err(ledger_error)?;
    let reports = view
        .directory
        .as_ref()
        .map(|d| d.report())
        .unwrap_or_default();
    let mut online = 0;
    let (mut slots, mut inflight) = (0, 0);
    let providers: Vec<Value> = reports
        .iter()
        .map(|p| {
            if p.state != tessera_core::ProviderState::Offline {
                online += 1;
                slots += p.slots;
                inflight += p.inflight;
            }
            let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
            v["earnings"] = json!(earnings
                .iter()
                .find(|(n, _)| *n == p.node.to_string())
                .map_or(0, |e| e.1));
            let sees = viewer == Viewer::Operator || viewer == Viewer::Provider(p.node);
            if let (false, Some(o)) = (sees, v.as_object_mut()) {
                for field in PRIVATE_PROVIDER_FIELDS {
                    o.remove(field);
                }
            }
            v
        })
        .collect();
    let buckets = view
        .metrics
        .history(view.started.elapsed().clamp(WINDOW.0, WINDOW.1));
    // The last minute: the six most recent buckets (the newest still filling).
    let minute = &buckets[buckets.len().saturating_sub(6)..];
    let [passed, failed, not_audited] = view.metrics.audit_counts().map(|(_, n)| n);
    let models: Vec<Value> = view
        .backend
        .models()
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "sha256": m.sha256,
                "providers": m.providers,
                "price": m.prices.map(|(lo, hi)| json!({
                    "prompt": {"min": lo.input, "max": hi.input},
                    "completion": {"min": lo.output, "max": hi.output},
                })),
            })
        })
        .collect();
    let mut status = json!({
        "unit": "micro-credits",
        "view": match viewer {
            Viewer::Public => "public",
            Viewer::Provider(_) => "provider",
            Viewer::Operator => "operator",
        },
        "gateway": {
            "node": view.node,
            "network": view.network,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": view.started.elapsed().as_secs_f64(),
        },
        "summary": {
            "providers_online": online,
            "providers_known": reports.len(),
            "models": models,
            "tokens_per_minute": minute.iter().map(|b| b.completion_tokens).sum::<u64>(),
            "requests_per_minute": minute.iter().map(|b| b.requests).sum::<u64>(),
            "active_generations": view.metrics.active(),
            "slots": slots,
            "inflight": inflight,
            "utilization": if slots > 0 { inflight as f64 / slots as f64 } else { 0.0 },
            "revenue": totals.revenue,
            "provider_earnings": totals.provider_earnings,
            "fees": totals.fees,
            "escrow": totals.escrow,
            "settled_requests": totals.settled,
            "refunded_requests": totals.refunded,
            "forfeited": totals.forfeited,
            "audits": {"passed": passed, "failed": failed, "not_audited": not_audited},
            "audit_backlog": view.metrics.audit_backlog(),
            "audit_pass_rate": (passed + failed > 0).then(|| passed as f64 / (passed + failed) as f64),
        },
        "providers": providers,
        "series": {
            "bucket_s": tessera_metrics::BUCKET_S,
            "buckets": buckets,
        },
        "audits": view.metrics.recent_audits(),
        "auditors": view.auditors.as_ref().map(|p| p.describe()),
        "training": view.training.as_ref().map(|c| json!({
            "providers": c.trainers(),
            "workers": c.workers(),
            "tasks": c.overview(),
        })),
    });
    if viewer != Viewer::Operator {
        if let Some(o) = status.as_object_mut() {
            o.remove("audits");
            o.remove("auditors");
        }
        if let Some(o) = status["summary"].as_object_mut() {
            o.remove("audits");
            o.remove("audit_pass_rate");
            o.remove("audit_backlog");
        }
    }
    Ok(Json(status))
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The gateway, e.g. http://127.0.0.1:8080 (a trailing /v1 is fine);
    /// default: the api_base in the home folder's endpoint.json.
    #[arg(long, env = "TESSERA_API")]
    pub api: Option<String>,
    /// Print the gateway's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// The gateway's operator token, for its full view (audit figures);
    /// default: the one in the home folder's endpoint.json when --api is
    /// not given. `tessera provider status` signs with the node key instead.
    #[arg(long, env = "TESSERA_OPERATOR_TOKEN")]
    pub operator_token: Option<String>,
}

/// Fetch `/api/status` from the gateway named by `args` (or endpoint.json).
fn fetch(
    home: &Path,
    args: &StatusArgs,
    signer: Option<&tessera_net::SecretKey>,
) -> anyhow::Result<Value> {
    let mut token = args.operator_token.clone();
    let api = match &args.api {
        Some(a) => a.clone(),
        None => {
            let path = home.join("endpoint.json");
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "no --api given and no {} (is a gateway running here?)",
                    path.display()
                )
            })?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            // The gateway of this home: its operator may see everything.
            if token.is_none() {
                token = v["operator_token"].as_str().map(str::to_string);
            }
            v["api_base"]
                .as_str()
                .context("endpoint.json has no api_base")?
                .to_string()
        }
    };
    let base = api.trim_end_matches('/').trim_end_matches("/v1");
    let url = format!("{base}/api/status");
    let mut request = reqwest::blocking::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(10));
    match signer {
        // A provider asks for its own figures, signed with its node key.
        Some(key) => request = crate::earnings::sign(request, key, STATUS_PATH),
        None => {
            if let Some(t) = &token {
                request = request.bearer_auth(t);
            }
        }
    }
    let resp = request
        .send()
        .with_context(|| format!("cannot reach {url}"))?;
    let code = resp.status();
    let body: Value = resp
        .json()
        .with_context(|| format!("{url} did not answer with JSON"))?;
    if !code.is_success() {
        bail!("{url}: {code} {}", body["error"]["message"]);
    }
    Ok(body)
}

fn short(node: &str) -> &str {
    &node[..node.len().min(12)]
}

fn prices(p: &Value) -> String {
    p["prices"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|x| format!("{}/{}", x["input"], x["output"]))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// `tessera status`: the network as a gateway sees it.
pub fn run(home: &Path, args: StatusArgs) -> anyhow::Result<()> {
    let s = fetch(home, &args, None)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let sum = &s["summary"];
    let g = &s["gateway"];
    println!(
        "gateway {} · network {} · up {:.0} s",
        short(g["node"].as_str().unwrap_or("")),
        g["network"].as_str().unwrap_or(""),
        g["uptime_s"].as_f64().unwrap_or(0.0)
    );
    let rate = sum["audit_pass_rate"]
        .as_f64()
        .map_or("no audits yet".to_string(), |r| {
            format!("{:.1}%", r * 100.0)
        });
    println!(
        "providers {} online / {} known · {} tokens/min · {} requests/min · utilization {:.0}% ({} of {} slots)",
        sum["providers_online"],
        sum["providers_known"],
        sum["tokens_per_minute"],
        sum["requests_per_minute"],
        sum["utilization"].as_f64().unwrap_or(0.0) * 100.0,
        sum["inflight"],
        sum["slots"],
    );
    println!(
        "revenue {} credits ({} to providers, {} fees) · {} settled requests · escrow {} · audit pass rate {rate}",
        credits(sum["revenue"].as_i64().unwrap_or(0)),
        credits(sum["provider_earnings"].as_i64().unwrap_or(0)),
        credits(sum["fees"].as_i64().unwrap_or(0)),
        sum["settled_requests"],
        credits(sum["escrow"].as_i64().unwrap_or(0)),
    );
    for m in sum["models"].as_array().into_iter().flatten() {
        println!(
            "model {} ({}…) on {} providers",
            m["id"].as_str().unwrap_or(""),
            &m["sha256"].as_str().unwrap_or("")[..12.min(m["sha256"].as_str().unwrap_or("").len())],
            m["providers"]
        );
    }
    println!();
    println!(
        "{:<12}  {:<7}  {:>9}  {:>7}  {:>7}  {:>6}  {:>8}  {:>14}  prices in/out",
        "provider", "state", "slots", "tok/s", "uptime", "jobs", "tokens", "earned"
    );
    for p in s["providers"].as_array().into_iter().flatten() {
        println!(
            "{:<12}  {:<7}  {:>9}  {:>7.1}  {:>6.1}%  {:>6}  {:>8}  {:>14}  {}",
            short(p["node"].as_str().unwrap_or("")),
            p["state"].as_str().unwrap_or(""),
            format!("{}/{}", p["inflight"], p["slots"]),
            p["tok_s"].as_f64().unwrap_or(0.0),
            p["uptime"].as_f64().unwrap_or(0.0) * 100.0,
            p["jobs_done"].as_u64().unwrap_or(0),
            p["tokens"].as_u64().unwrap_or(0),
            credits(p["earnings"].as_i64().unwrap_or(0)),
            prices(p),
        );
    }
    Ok(())
}

/// `tessera provider status`: this provider as a gateway sees it.
pub fn provider(home: &Path, args: StatusArgs) -> anyhow::Result<()> {
    let key = node::load_or_create_key(home)?;
    let me = node::node_id(&key.public());
    let s = fetch(home, &args, Some(&key))?;
    let Some(p) = s["providers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["node"] == me.to_string().as_str())
    else {
        bail!("the gateway has not seen provider {me} (this home's node key) since it started");
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(p)?);
        return Ok(());
    }
    println!("provider {me}");
    println!(
        "  state {} · models {} · prices in/out {} (credits per million tokens)",
        p["state"].as_str().unwrap_or(""),
        p["models"],
        prices(p)
    );
    println!(
        "  jobs: {} done, {} failed, {} cancelled by their clients; {} tokens generated",
        p["jobs_done"], p["jobs_failed"], p["jobs_cancelled"], p["tokens"]
    );
    println!(
        "  uptime {:.1}% of the {:.0} s this gateway has known it · measured {:.1} tok/s per stream · {} of {} slots busy",
        p["uptime"].as_f64().unwrap_or(0.0) * 100.0,
        p["known_s"].as_f64().unwrap_or(0.0),
        p["tok_s"].as_f64().unwrap_or(0.0),
        p["inflight"],
        p["slots"],
    );
    println!(
        "  audits: {} passed, {} failed · reputation {} · verified {} tok/s · {} canaries missed in a row (shown to this provider only)",
        p["audits_passed"],
        p["audits_failed"],
        p["reputation"].as_f64().map_or("–".into(), |r| format!("{r:.2}")),
        p["verified_tok_s"].as_f64().map_or("–".into(), |t| format!("{t:.1}")),
        p["canary_misses"],
    );
    println!(
        "  earned {} credits at this gateway (`tessera provider earnings` checks every receipt's signatures)",
        credits(p["earnings"].as_i64().unwrap_or(0))
    );
    Ok(())
}
