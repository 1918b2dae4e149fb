//! The gateway side: accept providers, keep a directory, route jobs.
//!
//! Providers dial in. Each connection starts with a control stream
//! (Hello → Welcome or Refused, then heartbeats); the provider stays in the
//! [`Directory`] while that stream lives and its heartbeats are recent. A job
//! goes to the least-loaded healthy provider serving the model's sha256,
//! on a fresh bi-stream; a provider that fails before the first token is
//! replaced by another (at most [`MAX_TRIES`] in all). A client that goes
//! away resets the job stream, which cancels the job on the provider.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use iroh::endpoint::{Connection, SendStream};
use iroh::Endpoint;
use serde::Serialize;
use serde_json::{json, Value};
use tessera_api::{
    ApiError, Backend, BoxFuture, Dispatch, JobTicket, RoutePrefs, ServedModel, Sort,
};
use tessera_engine::{GenerationRequest, Price};
use tessera_metrics::Metrics;
use tessera_protocol::{read_frame, write_frame, Frame, ModelOffer, PROTOCOL_VERSION};

use crate::audit::Audits;
use crate::discovery::{Discovery, GOSSIP_ALPN};
use crate::job::RoutedJob;
use crate::node::node_id;

/// Providers tried for one job before the client gets a 503.
pub const MAX_TRIES: usize = 3;
/// How often providers are asked to send a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Audits a provider must pass in a row after a failure before another
/// failure no longer confirms it.
pub const WATCH: u32 = 10;
/// Canary jobs missed in a row that make a provider unroutable.
pub const CANARY_MISSES: u32 = 3;
/// A provider whose heartbeats stopped this long ago is not routed to.
const STALE: Duration = Duration::from_secs(6);

/// One connected provider.
pub(crate) struct Provider {
    pub(crate) node: String,
    /// This session (node + connection): a job that saw it fail avoids it,
    /// but not the same node reconnected after a restart.
    pub(crate) session: String,
    pub(crate) conn: Connection,
    offers: Vec<ModelOffer>,
    slots: usize,
    hardware: String,
    /// Jobs this gateway has in flight on it.
    pub(crate) inflight: AtomicUsize,
    last_heartbeat: Mutex<Instant>,
    /// Its own measured tok/s from the last heartbeat.
    tok_s: Mutex<f64>,
    /// Moving average of time to first token seen by this gateway (ms).
    pub(crate) latency_ms: Mutex<f64>,
}

impl Provider {
    /// Its context per request for the model `sha256`.
    pub(crate) fn context(&self, sha256: &str) -> usize {
        self.offers
            .iter()
            .find(|o| o.sha256 == sha256)
            .map_or(0, |o| o.context_length)
    }

    /// Its price for the model `sha256`.
    pub(crate) fn price(&self, sha256: &str) -> Price {
        self.offers
            .iter()
            .find(|o| o.sha256 == sha256)
            .map(|o| o.price)
            .unwrap_or_default()
    }

    fn healthy(&self) -> bool {
        self.last_heartbeat
            .lock()
            .is_ok_and(|t| t.elapsed() < STALE)
    }
}

/// What this gateway has seen of one provider, kept across its sessions
/// (and after it left) for operators and the dashboard.
struct Record {
    first_seen: Instant,
    /// Time connected in earlier sessions, and since when it is connected
    /// now (`None`: offline).
    online: Duration,
    connected_since: Option<Instant>,
    /// Its last offers, slots and hardware line.
    offers: Vec<ModelOffer>,
    slots: usize,
    hardware: String,
    /// Job parts by outcome, and the tokens they generated.
    done: u64,
    failed: u64,
    cancelled: u64,
    tokens: u64,
    /// Moving average of the delivered tokens/s per stream this gateway
    /// measured on its parts (0: not measured yet).
    tok_s: f64,
    audits_passed: u32,
    audits_failed: u32,
    /// Moving average of its audit results (1 passed, 0 failed).
    audit_score: Option<f64>,
    /// Audits it must still pass in a row to clear its last failure (every
    /// part is audited meanwhile); a failure in that time confirms the
    /// first.
    on_watch: u32,
    /// Failed a confirmed second audit: never routed to again here.
    quarantined: bool,
    /// Canary jobs missed in a row (3 make it unroutable until it answers
    /// one again), and the delivered tok/s of its last answered canary.
    canary_misses: u32,
    verified_tok_s: Option<f64>,
}

impl Record {
    /// Share of the time since first seen that it was connected.
    fn uptime(&self) -> f64 {
        let known = self.first_seen.elapsed().as_secs_f64();
        let online = self.online + self.connected_since.map_or(Duration::ZERO, |s| s.elapsed());
        (online.as_secs_f64() / known.max(1e-9)).min(1.0)
    }

    /// Its audit score (1 before any audit) times its uptime, times a
    /// latency factor (1 up to 1 s to the first answer, falling to 0.5 at
    /// 10 s): what the router weighs.
    fn reputation(&self, latency_ms: f64) -> f64 {
        let latency = 1.0 - (latency_ms / 1000.0 - 1.0).clamp(0.0, 9.0) / 18.0;
        self.audit_score.unwrap_or(1.0) * self.uptime() * latency
    }
}

/// One provider as operators see it (`/api/status`, the dashboard).
#[derive(Clone, Debug, Serialize)]
pub struct ProviderReport {
    pub node: String,
    /// `online`, `busy` (every slot taken), `stale` (heartbeats late),
    /// `unroutable` (missed 3 canaries in a row), `quarantined` (failed two
    /// audits) or `offline`.
    pub state: &'static str,
    pub models: Vec<String>,
    /// Its price per model (credits per million tokens).
    pub prices: Vec<Value>,
    pub slots: usize,
    pub inflight: usize,
    pub hardware: String,
    /// Delivered tokens/s per stream as this gateway measured it.
    pub tok_s: f64,
    /// What it reported itself in its last heartbeat.
    pub reported_tok_s: f64,
    /// Moving average of its time to first answer (ms).
    pub latency_ms: f64,
    /// Share of the time since this gateway first saw it that it was
    /// connected (0–1).
    pub uptime: f64,
    pub known_s: f64,
    pub jobs_done: u64,
    pub jobs_failed: u64,
    pub jobs_cancelled: u64,
    pub tokens: u64,
    pub audits_passed: u32,
    pub audits_failed: u32,
    /// Moving average of its audit results (1 = every audit passed) times
    /// its uptime and a latency factor; `None` before its first audit.
    pub reputation: Option<f64>,
    /// Delivered tokens/s per stream of its last answered canary job.
    pub verified_tok_s: Option<f64>,
    /// Canary jobs missed in a row.
    pub canary_misses: u32,
}

/// Every provider this gateway can reach right now, and what it has seen
/// of every provider so far.
#[derive(Default)]
pub struct Directory {
    providers: Mutex<HashMap<String, Arc<Provider>>>,
    records: Mutex<HashMap<String, Record>>,
    /// Breaks ties between equally loaded providers in turn.
    turn: AtomicUsize,
    metrics: Option<Arc<Metrics>>,
}

impl Directory {
    fn insert(&self, p: Arc<Provider>) {
        if let Ok(mut records) = self.records.lock() {
            let now = Instant::now();
            let r = records.entry(p.node.clone()).or_insert_with(|| Record {
                first_seen: now,
                online: Duration::ZERO,
                connected_since: None,
                offers: vec![],
                slots: 0,
                hardware: String::new(),
                done: 0,
                failed: 0,
                cancelled: 0,
                tokens: 0,
                tok_s: 0.0,
                audits_passed: 0,
                audits_failed: 0,
                audit_score: None,
                on_watch: 0,
                quarantined: false,
                canary_misses: 0,
                verified_tok_s: None,
            });
            r.connected_since.get_or_insert(now);
            r.offers = p.offers.clone();
            r.slots = p.slots;
            r.hardware = p.hardware.clone();
        }
        if let Ok(mut map) = self.providers.lock() {
            if let Some(old) = map.insert(p.node.clone(), p) {
                old.conn.close(0u32.into(), b"replaced by a newer session");
            }
        }
    }

    /// Remove `node` if its entry is still the session `conn` belongs to.
    fn remove(&self, node: &str, conn: &Connection) {
        if let Ok(mut map) = self.providers.lock() {
            if map
                .get(node)
                .is_some_and(|p| p.conn.stable_id() == conn.stable_id())
            {
                map.remove(node);
                if let Some(r) = self
                    .records
                    .lock()
                    .ok()
                    .as_mut()
                    .and_then(|r| r.get_mut(node))
                {
                    if let Some(since) = r.connected_since.take() {
                        r.online += since.elapsed();
                    }
                }
            }
        }
    }

    /// One job part on `node` ended (`done`, `failed` or `cancelled`)
    /// after generating `tokens`, at `tok_s` when it could be measured.
    pub(crate) fn record_part(
        &self,
        node: &str,
        outcome: &'static str,
        tokens: u64,
        tok_s: Option<f64>,
    ) {
        let mut average = None;
        if let Some(r) = self
            .records
            .lock()
            .ok()
            .as_mut()
            .and_then(|r| r.get_mut(node))
        {
            match outcome {
                "done" => r.done += 1,
                "failed" => r.failed += 1,
                _ => r.cancelled += 1,
            }
            r.tokens += tokens;
            if let Some(t) = tok_s {
                r.tok_s = if r.tok_s > 0.0 {
                    0.7 * r.tok_s + 0.3 * t
                } else {
                    t
                };
                average = Some(r.tok_s);
            }
        }
        if let Some(m) = &self.metrics {
            m.provider_part(node, outcome, tokens, average);
        }
    }

    /// The chance that a part `node` served is audited under `policy`.
    pub(crate) fn audit_odds(&self, node: &str, policy: &crate::audit::AuditPolicy) -> f64 {
        let records = self.records.lock();
        match records.ok().as_ref().and_then(|r| r.get(node)) {
            Some(r) if r.on_watch == 0 && r.audits_passed >= policy.probation => policy.base_rate,
            _ => 1.0,
        }
    }

    /// An audit of `node` passed or failed; true when this failure confirms
    /// an earlier one (it came before [`WATCH`] passes in a row cleared
    /// that) and the provider is now quarantined.
    pub(crate) fn record_audit(&self, node: &str, passed: bool) -> bool {
        let Some(mut records) = self.records.lock().ok() else {
            return false;
        };
        let Some(r) = records.get_mut(node) else {
            return false;
        };
        let x = if passed { 1.0 } else { 0.0 };
        r.audit_score = Some(r.audit_score.map_or(x, |old| 0.8 * old + 0.2 * x));
        if passed {
            r.audits_passed += 1;
            r.on_watch = r.on_watch.saturating_sub(1);
            return false;
        }
        r.audits_failed += 1;
        if r.on_watch > 0 && !r.quarantined {
            r.quarantined = true;
            return true;
        }
        r.on_watch = WATCH;
        false
    }

    /// Quarantined, or (unless `probe`) 3 canaries missed in a row.
    fn barred(&self, node: &str, probe: bool) -> bool {
        self.records
            .lock()
            .ok()
            .and_then(|r| {
                r.get(node)
                    .map(|r| r.quarantined || (!probe && r.canary_misses >= CANARY_MISSES))
            })
            .unwrap_or(false)
    }

    /// A canary job to `node` was answered at `tok_s`, or missed (`None`).
    pub(crate) fn record_canary(&self, node: &str, tok_s: Option<f64>) {
        if let Some(r) = self
            .records
            .lock()
            .ok()
            .as_mut()
            .and_then(|r| r.get_mut(node))
        {
            match tok_s {
                Some(t) => {
                    r.canary_misses = 0;
                    r.verified_tok_s = Some(t);
                }
                None => r.canary_misses += 1,
            }
        }
    }

    /// Node ids of providers serving `sha256` now.
    pub(crate) fn serving_nodes(&self, sha256: &str) -> Vec<String> {
        self.snapshot()
            .iter()
            .filter(|p| p.offers.iter().any(|o| o.sha256 == sha256))
            .map(|p| p.node.clone())
            .collect()
    }

    /// Every provider seen so far, connected ones first, then by node id.
    pub fn report(&self) -> Vec<ProviderReport> {
        let live: HashMap<String, Arc<Provider>> =
            self.providers.lock().map(|m| m.clone()).unwrap_or_default();
        let Ok(records) = self.records.lock() else {
            return vec![];
        };
        let mut list: Vec<ProviderReport> = records
            .iter()
            .map(|(node, r)| {
                let p = live.get(node);
                let inflight = p.map_or(0, |p| p.inflight.load(Ordering::Relaxed));
                let state = match p {
                    _ if r.quarantined => "quarantined",
                    Some(_) if r.canary_misses >= CANARY_MISSES => "unroutable",
                    None => "offline",
                    Some(p) if !p.healthy() => "stale",
                    Some(p) if inflight >= p.slots => "busy",
                    Some(_) => "online",
                };
                let latency_ms = p
                    .and_then(|p| p.latency_ms.lock().ok().map(|t| *t))
                    .unwrap_or(0.0);
                ProviderReport {
                    node: node.clone(),
                    state,
                    models: r.offers.iter().map(|o| o.alias.clone()).collect(),
                    prices: r
                        .offers
                        .iter()
                        .map(|o| json!({"model": o.alias, "input": o.price.input, "output": o.price.output}))
                        .collect(),
                    slots: r.slots,
                    inflight,
                    hardware: r.hardware.clone(),
                    tok_s: r.tok_s,
                    reported_tok_s: p.and_then(|p| p.tok_s.lock().ok().map(|t| *t)).unwrap_or(0.0),
                    latency_ms,
                    uptime: r.uptime(),
                    known_s: r.first_seen.elapsed().as_secs_f64(),
                    jobs_done: r.done,
                    jobs_failed: r.failed,
                    jobs_cancelled: r.cancelled,
                    tokens: r.tokens,
                    audits_passed: r.audits_passed,
                    audits_failed: r.audits_failed,
                    reputation: r.audit_score.map(|_| r.reputation(latency_ms)),
                    verified_tok_s: r.verified_tok_s,
                    canary_misses: r.canary_misses,
                }
            })
            .collect();
        list.sort_by(|a, b| (a.state == "offline", &a.node).cmp(&(b.state == "offline", &b.node)));
        list
    }

    fn snapshot(&self) -> Vec<Arc<Provider>> {
        self.providers
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Healthy providers of `sha256` with room for `tokens` that `route`
    /// allows and `tried` does not name (slots not considered).
    fn eligible(
        &self,
        sha256: &str,
        tokens: usize,
        tried: &[String],
        route: &RoutePrefs,
    ) -> Vec<Arc<Provider>> {
        let mut list: Vec<Arc<Provider>> = self
            .snapshot()
            .into_iter()
            .filter(|p| !tried.contains(&p.session) && p.healthy() && allowed(&p.node, route))
            .filter(|p| !self.barred(&p.node, route.probe))
            .filter(|p| {
                p.offers.iter().any(|o| {
                    o.sha256 == sha256 && o.context_length > tokens && within(o.price, route)
                })
            })
            .collect();
        list.sort_by(|a, b| a.node.cmp(&b.node));
        list
    }

    /// The provider to try next, or `None` when every eligible one is busy
    /// (or none exists).
    pub(crate) fn pick(
        &self,
        sha256: &str,
        tokens: usize,
        tried: &[String],
        route: &RoutePrefs,
    ) -> Option<Arc<Provider>> {
        let free: Vec<Arc<Provider>> = self
            .eligible(sha256, tokens, tried, route)
            .into_iter()
            .filter(|p| p.inflight.load(Ordering::Relaxed) < p.slots)
            .collect();
        let records = self.records.lock().ok();
        let candidates: Vec<Candidate<'_>> = free
            .iter()
            .map(|p| Candidate {
                node: &p.node,
                load: p.inflight.load(Ordering::Relaxed) as f64 / p.slots.max(1) as f64,
                tok_s: p.tok_s.lock().map_or(0.0, |t| *t),
                latency_ms: p.latency_ms.lock().map_or(0.0, |t| *t),
                price: p.price(sha256),
                reputation: records
                    .as_ref()
                    .and_then(|r| {
                        let latency = p.latency_ms.lock().map_or(0.0, |t| *t);
                        r.get(&p.node).map(|r| r.reputation(latency))
                    })
                    .unwrap_or(1.0),
            })
            .collect();
        drop(records);
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        choose(&candidates, route, turn).map(|i| free[i].clone())
    }

    /// Whether some provider could serve the job once it has a free slot.
    pub(crate) fn could_serve(
        &self,
        sha256: &str,
        tokens: usize,
        tried: &[String],
        route: &RoutePrefs,
    ) -> bool {
        !self.eligible(sha256, tokens, tried, route).is_empty()
    }

    /// Providers serving `sha256` now, the largest context among them, and
    /// their lowest and highest prices.
    fn serving(&self, sha256: &str) -> (usize, usize, Option<(Price, Price)>) {
        let mut count = 0;
        let mut context = 0;
        let mut prices: Option<(Price, Price)> = None;
        for p in self.snapshot().iter().filter(|p| p.healthy()) {
            if let Some(o) = p.offers.iter().find(|o| o.sha256 == sha256) {
                count += 1;
                context = context.max(o.context_length);
                let (lo, hi) = prices.get_or_insert((o.price, o.price));
                lo.input = lo.input.min(o.price.input);
                lo.output = lo.output.min(o.price.output);
                hi.input = hi.input.max(o.price.input);
                hi.output = hi.output.max(o.price.output);
            }
        }
        (count, context, prices)
    }

    /// The highest price (per side) among providers that may serve
    /// `sha256` under `route`, slots aside.
    fn quote(&self, sha256: &str, route: &RoutePrefs) -> Option<Price> {
        self.eligible(sha256, 0, &[], route)
            .iter()
            .map(|p| p.price(sha256))
            .reduce(|a, b| Price {
                input: a.input.max(b.input),
                output: a.output.max(b.output),
            })
    }

    /// The directory as JSON, for `/health` and operators.
    pub fn describe(&self) -> Value {
        let mut list: Vec<Value> = self
            .snapshot()
            .iter()
            .map(|p| {
                json!({
                    "node": p.node,
                    "models": p.offers.iter().map(|o| o.alias.clone()).collect::<Vec<_>>(),
                    "slots": p.slots,
                    "inflight": p.inflight.load(Ordering::Relaxed),
                    "healthy": p.healthy(),
                    "tok_s": p.tok_s.lock().map_or(0.0, |t| *t),
                    "prices": p.offers.iter().map(|o| json!({"model": o.alias, "input": o.price.input, "output": o.price.output})).collect::<Vec<_>>(),
                    "hardware": p.hardware,
                })
            })
            .collect();
        list.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        Value::Array(list)
    }
}

/// Whether `price` is within the request's `max_price`.
fn within(price: Price, route: &RoutePrefs) -> bool {
    route
        .max_price
        .is_none_or(|cap| price.input <= cap.input && price.output <= cap.output)
}

/// Whether `route` lets the router use provider `node` at all.
fn allowed(node: &str, route: &RoutePrefs) -> bool {
    let named = |list: &[String]| list.iter().any(|p| RoutePrefs::names(p, node));
    (route.only.is_empty() || named(&route.only))
        && !named(&route.ignore)
        && (route.order.is_empty() || route.allow_fallbacks || named(&route.order))
}

/// What the router weighs about one provider with a free slot.
pub struct Candidate<'a> {
    pub node: &'a str,
    /// Jobs in flight ÷ slots.
    pub load: f64,
    /// Tokens per second it reported in its last heartbeat.
    pub tok_s: f64,
    /// Moving average of its time to first token (0: not measured yet).
    pub latency_ms: f64,
    /// Its price for the requested model.
    pub price: Price,
    /// Moving average of its audit results (1 until it has been audited).
    pub reputation: f64,
}

/// Choose among allowed providers with a free slot: the first match of
/// `route.order`, else by `route.sort`, else by load weighed with price
/// and reputation (load ÷ slots, plus a quarter for the dearest output
/// price, in proportion, plus half the shortfall of its reputation from a
/// perfect 1, counted in hundredths so that near-equal providers still
/// tie); `turn` rotates ties so equal providers share the work.
pub fn choose(candidates: &[Candidate<'_>], route: &RoutePrefs, turn: usize) -> Option<usize> {
    for pattern in &route.order {
        if let Some(i) = candidates
            .iter()
            .position(|c| RoutePrefs::names(pattern, c.node))
        {
            return Some(i);
        }
    }
    if !route.order.is_empty() && !route.allow_fallbacks {
        return None;
    }
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    // Lower is better; one pass (after finding the dearest price), starting
    // at `turn` so the first of equals changes from call to call.
    let per_price = if route.sort.is_none() {
        let dearest = candidates.iter().map(|c| c.price.output).max().unwrap_or(0);
        0.25 / dearest.max(1) as f64
    } else {
        0.0
    };
    let key = |c: &Candidate<'_>| match route.sort {
        Some(Sort::Throughput) => -c.tok_s,
        Some(Sort::Latency) if c.latency_ms > 0.0 => c.latency_ms,
        Some(Sort::Latency) => f64::MAX,
        Some(Sort::Price) => c.price.output as f64 * 1e6 + c.price.input as f64 + c.load,
        None => {
            let shortfall = ((1.0 - c.reputation) * 100.0).round() / 100.0;
            c.load + per_price * c.price.output as f64 + 0.5 * shortfall
        }
    };
    let start = turn % n;
    let mut best = (start, key(&candidates[start]));
    for i in (start + 1..n).chain(0..start) {
        let k = key(&candidates[i]);
        if k < best.1 {
            best = (i, k);
        }
    }
    Some(best.0)
}

/// A gateway: its endpoint, the models it can tokenize, its directory.
#[derive(Clone)]
pub struct Gateway {
    pub(crate) endpoint: Endpoint,
    /// Models this gateway knows (it needs their tokenizer to take requests).
    pub(crate) models: Arc<Vec<ServedModel>>,
    directory: Arc<Directory>,
    discovery: Option<Discovery>,
    /// The auditor of each model (by sha256) this gateway audits.
    pub(crate) audits: Arc<HashMap<String, Arc<Audits>>>,
}

impl Gateway {
    pub fn new(endpoint: Endpoint, models: Vec<ServedModel>) -> Self {
        Gateway {
            endpoint,
            models: Arc::new(models),
            directory: Arc::default(),
            discovery: None,
            audits: Arc::default(),
        }
    }

    /// Audit answers of these models (sha256 → their auditor).
    pub fn with_audits(mut self, audits: HashMap<String, Arc<Audits>>) -> Self {
        self.audits = Arc::new(audits);
        self
    }

    /// Take part in gossip discovery (the endpoint must accept its ALPN).
    pub fn with_discovery(mut self, discovery: Discovery) -> Self {
        self.discovery = Some(discovery);
        self
    }

    /// Record provider jobs in `metrics` (call before [`Gateway::accept`]).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.directory = Arc::new(Directory {
            metrics: Some(metrics),
            ..Directory::default()
        });
        self
    }

    pub fn directory(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// This gateway's node id.
    pub fn node(&self) -> String {
        node_id(&self.endpoint.id())
    }

    /// Accept providers (and gossip peers) until the endpoint closes.
    pub async fn accept(self) {
        while let Some(incoming) = self.endpoint.accept().await {
            let gw = self.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "incoming connection failed");
                        return;
                    }
                };
                if conn.alpn() == GOSSIP_ALPN {
                    match &gw.discovery {
                        Some(d) => d.handle(conn).await,
                        None => conn.close(1u32.into(), b"no discovery here"),
                    }
                    return;
                }
                let node = node_id(&conn.remote_id());
                if let Err(e) = gw.provider_session(conn, &node).await {
                    tracing::warn!(provider = %&node[..12], error = %e, "provider session ended");
                }
            });
        }
    }

    async fn provider_session(&self, conn: Connection, node: &str) -> anyhow::Result<()> {
        let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
            .await
            .map_err(|_| anyhow!("no control stream within 10 s"))?
            .map_err(|e| anyhow!("control stream: {e}"))?;
        let hello = match read_frame(&mut recv).await {
            Ok(Some(Frame::Hello(h))) => h,
            Ok(other) => {
                conn.close(2u32.into(), b"expected Hello");
                return Err(anyhow!("expected Hello, got {other:?}"));
            }
            Err(e) => {
                conn.close(2u32.into(), b"bad frame");
                return Err(anyhow!("garbage instead of Hello: {e}"));
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            let reason = format!(
                "protocol version {} is not supported; this gateway speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            );
            return refuse(&mut send, &conn, node, reason).await;
        }
        let known: Vec<ModelOffer> = hello
            .models
            .iter()
            .filter(|o| self.models.iter().any(|m| m.sha256 == o.sha256))
            .cloned()
            .collect();
        if known.is_empty() {
            let hashes: Vec<&str> = hello.models.iter().map(|o| o.sha256.as_str()).collect();
            let reason =
                format!("unknown model hash(es) {hashes:?}; this gateway serves other models");
            return refuse(&mut send, &conn, node, reason).await;
        }
        if hello.slots == 0 {
            return refuse(
                &mut send,
                &conn,
                node,
                "a provider must offer at least one slot".into(),
            )
            .await;
        }
        let welcome = Frame::Welcome {
            gateway: node_id(&self.endpoint.id()),
            heartbeat_ms: HEARTBEAT.as_millis() as u64,
        };
        write_frame(&mut send, &welcome).await?;
        let provider = Arc::new(Provider {
            node: node.to_string(),
            session: format!("{node}/{}", conn.stable_id()),
            conn: conn.clone(),
            offers: known,
            slots: hello.slots,
            hardware: hello.hardware,
            inflight: AtomicUsize::new(0),
            last_heartbeat: Mutex::new(Instant::now()),
            tok_s: Mutex::new(0.0),
            latency_ms: Mutex::new(0.0),
        });
        self.directory.insert(provider.clone());
        tracing::info!(provider = %&node[..12], slots = hello.slots, "provider joined");
        let result = loop {
            match read_frame(&mut recv).await {
                Ok(Some(Frame::Heartbeat(beat))) => {
                    if let Ok(mut t) = provider.last_heartbeat.lock() {
                        *t = Instant::now();
                    }
                    if let Ok(mut t) = provider.tok_s.lock() {
                        *t = beat.tok_s;
                    }
                }
                Ok(Some(other)) => {
                    conn.close(2u32.into(), b"unexpected frame");
                    break Err(anyhow!("unexpected frame on the control stream: {other:?}"));
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    conn.close(2u32.into(), b"bad frame");
                    break Err(anyhow!("bad control frame: {e}"));
                }
            }
        };
        self.directory.remove(node, &conn);
        tracing::info!(provider = %&node[..12], "provider left");
        result
    }
}

/// Tell a provider why it is refused, then close its connection.
async fn refuse(
    send: &mut SendStream,
    conn: &Connection,
    node: &str,
    reason: String,
) -> anyhow::Result<()> {
    tracing::warn!(provider = %&node[..12], %reason, "refusing provider");
    let _ = write_frame(
        send,
        &Frame::Refused {
            reason: reason.clone(),
        },
    )
    .await;
    let _ = send.finish();
    // Give the frame time to arrive before the connection goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    conn.close(3u32.into(), b"refused");
    Err(anyhow!("refused: {reason}"))
}

/// `Backend` that routes jobs to providers over the network.
pub struct NetworkBackend {
    gateway: Gateway,
}

impl NetworkBackend {
    pub fn new(gateway: Gateway) -> Self {
        NetworkBackend { gateway }
    }
}

impl Backend for NetworkBackend {
    fn models(&self) -> Vec<ServedModel> {
        self.gateway
            .models
            .iter()
            .map(|m| {
                let (providers, context, prices) = self.gateway.directory.serving(&m.sha256);
                let mut m = m.clone();
                m.providers = providers;
                m.prices = prices;
                if context > 0 {
                    m.context_length = context;
                }
                m
            })
            .collect()
    }

    fn submit(
        &self,
        model: &ServedModel,
        request: GenerationRequest,
        route: &RoutePrefs,
        ticket: &JobTicket,
    ) -> BoxFuture<'static, Result<Dispatch, ApiError>> {
        let job = RoutedJob::new(
            self.gateway.directory.clone(),
            model.clone(),
            request,
            route.clone(),
            self.gateway.endpoint.secret_key().clone(),
        )
        .audited(
            self.gateway.audits.get(&model.sha256).cloned(),
            ticket.clone(),
        );
        Box::pin(job.dispatch())
    }

    fn audits(&self) -> bool {
        !self.gateway.audits.is_empty()
    }

    fn audit_status(&self, id: &str) -> &'static str {
        self.gateway
            .audits
            .values()
            .find_map(|a| a.status(id))
            .unwrap_or("not_audited")
    }

    fn audit_report(&self, id: &str, account: &str) -> Option<Value> {
        self.gateway
            .audits
            .values()
            .find_map(|a| a.report(id, account))
    }

    fn quote(&self, model: &ServedModel, route: &RoutePrefs) -> Result<Price, ApiError> {
        self.gateway
            .directory
            .quote(&model.sha256, route)
            .ok_or_else(|| {
                ApiError::unavailable(if route.max_price.is_some() {
                    "No provider of this model is available within the request's provider.max_price."
                } else {
                    "No provider serving this model is available right now; retry shortly."
                })
            })
    }

    fn health(&self) -> Value {
        let mut health =
            json!({ "kind": "gateway", "providers": self.gateway.directory.describe() });
        if let Some(d) = &self.gateway.discovery {
            health["discovered"] = d.describe();
        }
        health
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: &str, load: f64, tok_s: f64, latency_ms: f64) -> Candidate<'_> {
        Candidate {
            node,
            load,
            tok_s,
            latency_ms,
            price: Price::default(),
            reputation: 1.0,
        }
    }

    fn prefs() -> RoutePrefs {
        RoutePrefs {
            allow_fallbacks: true,
            ..RoutePrefs::default()
        }
    }

    #[test]
    fn least_loaded_wins_and_ties_take_turns() {
        let list = [
            c("aa", 0.5, 0.0, 0.0),
            c("bb", 0.0, 0.0, 0.0),
            c("cc", 0.0, 0.0, 0.0),
        ];
        let picks: Vec<usize> = (0..4)
            .map(|t| choose(&list, &prefs(), t).unwrap())
            .collect();
        assert!(picks.iter().all(|&i| i != 0), "{picks:?}");
        assert!(
            picks.contains(&1) && picks.contains(&2),
            "ties should rotate: {picks:?}"
        );
    }

    #[test]
    fn order_only_ignore_and_fallbacks() {
        let list = [c("aa11", 0.0, 0.0, 0.0), c("bb22", 0.9, 0.0, 0.0)];
        let order = RoutePrefs {
            order: vec!["bb".into()],
            ..prefs()
        };
        assert_eq!(choose(&list, &order, 0), Some(1), "order beats load");
        let missing = RoutePrefs {
            order: vec!["zz".into()],
            ..prefs()
        };
        assert_eq!(
            choose(&list, &missing, 0),
            Some(0),
            "falls back when allowed"
        );
        let strict = RoutePrefs {
            allow_fallbacks: false,
            ..missing
        };
        assert_eq!(choose(&list, &strict, 0), None);
        assert!(allowed(
            "bb22",
            &RoutePrefs {
                only: vec!["bb".into()],
                ..prefs()
            }
        ));
        assert!(!allowed(
            "aa11",
            &RoutePrefs {
                only: vec!["bb".into()],
                ..prefs()
            }
        ));
        assert!(!allowed(
            "aa11",
            &RoutePrefs {
                ignore: vec!["aa1".into()],
                ..prefs()
            }
        ));
        assert!(!allowed(
            "aa11",
            &RoutePrefs {
                order: vec!["bb".into()],
                allow_fallbacks: false,
                ..prefs()
            }
        ));
    }

    #[test]
    fn a_provider_that_failed_audits_loses_ties() {
        let mut list = [c("a", 0.0, 0.0, 0.0), c("b", 0.0, 0.0, 0.0)];
        list[0].reputation = 0.6;
        for turn in 0..4 {
            assert_eq!(choose(&list, &prefs(), turn), Some(1));
        }
        // Uptimes a hair apart are still a tie.
        list[0].reputation = 0.99999;
        list[1].reputation = 0.99998;
        let picks: Vec<_> = (0..4).map(|t| choose(&list, &prefs(), t)).collect();
        assert!(
            picks.contains(&Some(0)) && picks.contains(&Some(1)),
            "{picks:?}"
        );
        // Reputation weighs less than a full slot table.
        list[1].load = 0.75;
        assert_eq!(choose(&list, &prefs(), 0), Some(0));
    }

    #[test]
    fn price_is_weighed_by_default_and_sorts_when_asked() {
        let priced = |node, load, input, output| Candidate {
            price: Price { input, output },
            ..c(node, load, 0.0, 0.0)
        };
        let list = [
            priced("dear", 0.0, 20, 80),
            priced("cheap", 0.0, 5, 10),
            priced("mid", 0.1, 10, 40),
        ];
        for turn in 0..3 {
            assert_eq!(
                choose(&list, &prefs(), turn),
                Some(1),
                "equal load: cheaper wins"
            );
        }
        // Load still matters more than a small price gap.
        let busy_cheap = [priced("dear", 0.0, 20, 80), priced("cheap", 0.9, 5, 10)];
        assert_eq!(choose(&busy_cheap, &prefs(), 0), Some(0));
        let by_price = RoutePrefs {
            sort: Some(Sort::Price),
            ..prefs()
        };
        assert_eq!(
            choose(&busy_cheap, &by_price, 0),
            Some(1),
            "sort=price ignores load"
        );
        let capped = RoutePrefs {
            max_price: Some(Price {
                input: 10,
                output: 20,
            }),
            ..prefs()
        };
        assert!(within(
            Price {
                input: 5,
                output: 10
            },
            &capped
        ));
        assert!(!within(
            Price {
                input: 20,
                output: 80
            },
            &capped
        ));
        assert!(!within(
            Price {
                input: 11,
                output: 10
            },
            &capped
        ));
        assert!(within(
            Price {
                input: 999,
                output: 999
            },
            &prefs()
        ));
    }

    #[test]
    fn sort_by_throughput_and_latency() {
        let list = [
            c("aa", 0.0, 50.0, 90.0),
            c("bb", 0.5, 80.0, 0.0),
            c("cc", 0.0, 20.0, 40.0),
        ];
        let by = |sort| RoutePrefs {
            sort: Some(sort),
            ..prefs()
        };
        assert_eq!(choose(&list, &by(Sort::Throughput), 0), Some(1));
        assert_eq!(
            choose(&list, &by(Sort::Latency), 0),
            Some(2),
            "unmeasured latency ranks last"
        );
    }
}
