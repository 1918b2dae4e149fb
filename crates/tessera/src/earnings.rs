//! A provider's earnings: the gateway endpoint and `tessera provider earnings`.
//!
//! `GET /v1/provider/receipts` on a gateway lists one provider's receipts
//! from the ledger, with their totals. It is authenticated by the provider's
//! node key, not an API key: the request carries the node id, the time and
//! an ed25519 signature of both and the path (`X-Tessera-Node`,
//! `X-Tessera-Time`, `X-Tessera-Signature`), good for one request: the
//! gateway refuses a signature it has seen (a replay). The command fetches them and checks every
//! receipt's provider signature and gateway countersignature itself, so a
//! provider need not trust the gateway's totals.

use std::path::Path;

use anyhow::{bail, Context};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use clap::Args;
use serde_json::{json, Value};
use tessera_api::ApiError;
use tessera_ledger::Ledger;
use tessera_net::node;
use tessera_net::receipt;
use tessera_protocol::Signed;

/// Where a provider's receipts are.
pub(crate) const RECEIPTS_PATH: &str = "/v1/provider/receipts";

/// The gateway's receipts endpoint, to merge into its API.
pub fn route(ledger: Ledger) -> Router {
    Router::new()
        .route(RECEIPTS_PATH, get(receipts))
        .with_state(ledger)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::unauthorized(format!(
                "Missing {name}: sign this request with the provider's node key \
                 (`tessera provider earnings` does)."
            ))
        })
}

/// The provider a request for `path` is signed by (`X-Tessera-Node`,
/// `X-Tessera-Time`, `X-Tessera-Signature`: one signature per request, for
/// that path), or why it is not.
pub(crate) fn signed_by(headers: &HeaderMap, path: &str) -> Result<tessera_core::NodeId, ApiError> {
    let node: tessera_core::NodeId = header(headers, "x-tessera-node")?
        .parse()
        .map_err(|e| ApiError::unauthorized(format!("X-Tessera-Node: {e}.")))?;
    let time: u64 = header(headers, "x-tessera-time")?.parse().map_err(|_| {
        ApiError::invalid("X-Tessera-Time must be milliseconds since the epoch.", None)
    })?;
    let signature = header(headers, "x-tessera-signature")?;
    receipt::verify_request(&node, time, path, signature)
        .map_err(|e| ApiError::unauthorized(format!("Not signed by provider {node}: {e}.")))?;
    Ok(node)
}

/// `request` for `path` signed with the provider's node `key`, as
/// [`signed_by`] checks it.
pub(crate) fn sign(
    request: reqwest::blocking::RequestBuilder,
    key: &tessera_net::SecretKey,
    path: &str,
) -> reqwest::blocking::RequestBuilder {
    let time = tessera_core::now_ms();
    request
        .header("x-tessera-node", node::node_id(&key.public()).to_string())
        .header("x-tessera-time", time.to_string())
        .header(
            "x-tessera-signature",
            receipt::sign_request(key, time, path),
        )
}

async fn receipts(
    State(ledger): State<Ledger>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let node = signed_by(&headers, RECEIPTS_PATH)?;
    let list = ledger
        .provider_receipts(&node.to_string())
        .await
        .map_err(|e| ApiError::internal(format!("ledger: {e}")))?;
    let sum = |k: &str| list.iter().filter_map(|r| r[k].as_i64()).sum::<i64>();
    Ok(Json(json!({
        "provider": node,
        "unit": "micro-credits",
        "totals": {
            "receipts": list.len(),
            "cost": sum("cost"),
            "fee": sum("fee"),
            "earned": sum("earned"),
            "prompt_tokens": sum("prompt_tokens"),
            "completion_tokens": sum("completion_tokens"),
        },
        "receipts": list,
    })))
}

#[derive(Args, Debug)]
pub struct EarningsArgs {
    /// The gateway's API, e.g. http://127.0.0.1:8080/v1.
    #[arg(long, env = "TESSERA_API")]
    pub api: String,
    #[arg(long)]
    pub json: bool,
}

/// What checking one receipt found.
fn check(row: &Value, me: &tessera_core::NodeId) -> Result<(), String> {
    let signed: Signed = serde_json::from_value(row["signed"].clone())
        .map_err(|_| "no signed receipt (the part ended without one)".to_string())?;
    let r = receipt::verify(&signed).map_err(|e| e.to_string())?;
    // (The ledger files it under the API's response id; the receipt names
    // the network job of this part.) A continued answer's later parts read
    // the prompt again but bill it once, so the ledger may bill fewer
    // prompt tokens than the provider signed for, never more.
    let same = r.provider == *me
        && row["completion_tokens"].as_u64() == Some(r.completion_tokens)
        && row["prompt_tokens"]
            .as_u64()
            .is_some_and(|billed| billed <= r.prompt_tokens)
        && row["input_price"].as_u64() == Some(r.price.input)
        && row["output_price"].as_u64() == Some(r.price.output);
    if same {
        Ok(())
    } else {
        Err("the ledger's record differs from the signed receipt".into())
    }
}

pub fn run(home: &Path, args: EarningsArgs) -> anyhow::Result<()> {
    let key = node::load_or_create_key(home)?;
    let me = node::node_id(&key.public());
    let url = format!("{}/provider/receipts", args.api.trim_end_matches('/'));
    let resp = sign(
        reqwest::blocking::Client::new().get(&url),
        &key,
        RECEIPTS_PATH,
    )
    .send()
    .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .context("the gateway did not answer with JSON")?;
    if !status.is_success() {
        bail!("the gateway refused: {status} {}", body["error"]["message"]);
    }
    let rows = body["receipts"].as_array().cloned().unwrap_or_default();
    let mut verified = 0;
    let mut verified_earned = 0i64;
    let mut problems = Vec::new();
    for row in &rows {
        match check(row, &me) {
            Ok(()) => {
                verified += 1;
                verified_earned += row["earned"].as_i64().unwrap_or(0);
            }
            Err(e) => problems.push(json!({"receipt": row["id"], "problem": e})),
        }
    }
    let totals = &body["totals"];
    if args.json {
        println!(
            "{}",
            json!({
                "provider": me,
                "unit": "micro-credits",
                "totals": totals,
                "verified": verified,
                "verified_earned": verified_earned,
                "unverified": problems,
                "receipts": rows,
            })
        );
    } else {
        println!("provider {me}");
        println!(
            "  {} receipts, {} prompt + {} completion tokens",
            rows.len(),
            totals["prompt_tokens"],
            totals["completion_tokens"]
        );
        println!(
            "  charged {} credits, fee {} credits, earned {} credits",
            crate::accounts::credits(totals["cost"].as_i64().unwrap_or(0)),
            crate::accounts::credits(totals["fee"].as_i64().unwrap_or(0)),
            crate::accounts::credits(totals["earned"].as_i64().unwrap_or(0)),
        );
        println!(
            "  {verified} receipts carry valid provider and gateway signatures ({} credits)",
            crate::accounts::credits(verified_earned)
        );
        let audits = |status: &str| rows.iter().filter(|r| r["audit"] == status).count();
        println!(
            "  audits: {} passed, {} failed (refunded), {} not audited",
            audits("passed"),
            audits("failed"),
            audits("not_audited")
        );
        for p in &problems {
            println!("  NOT VERIFIED {}: {}", p["receipt"], p["problem"]);
        }
    }
    Ok(())
}
