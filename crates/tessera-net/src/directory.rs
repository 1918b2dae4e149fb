//! The gateway's directory: every provider connected now, and what the
//! gateway has seen of every provider so far.
//!
//! All of it sits behind one lock and changes only through methods —
//! [`Directory::join`], [`Directory::pick`] (which claims a slot in the
//! same breath as it chooses), [`Directory::observe_latency`],
//! [`Directory::record_part`], [`Directory::record_audit`], … — so that no
//! caller writes a provider's fields and no two picks can take the same
//! last slot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iroh::endpoint::Connection;
use serde::Serialize;
use tessera_backend::{JobError, Quote};
use tessera_core::{NodeId, PartOutcome, Price, ProviderState};
use tessera_metrics::Metrics;
use tessera_protocol::ModelOffer;

use crate::prefix::{PrefixIndex, BLOCK};
use crate::router::{self, Candidate, Need};

/// Audits a provider must pass in a row after a failure before another
/// failure no longer confirms it.
pub const WATCH: u32 = 10;
/// Canary jobs missed in a row that make a provider unroutable.
pub const CANARY_MISSES: u32 = 3;
/// A provider whose heartbeats stopped this long ago is not routed to.
const STALE: Duration = Duration::from_secs(6);

/// One provider's connection to this gateway, as it introduced itself.
pub struct Session {
    /// Who it is.
    pub node: NodeId,
    /// `node` in hex, kept once: routing preferences match prefixes of it.
    pub node_hex: String,
    /// This connection's id: a job that saw it fail avoids it, but not the
    /// same node reconnected after a restart.
    pub id: u64,
    /// The QUIC connection jobs are opened on (`None` only for simulated
    /// providers in benchmarks and tests).
    pub conn: Option<Connection>,
    /// Models it serves, at what price and context.
    pub offers: Vec<ModelOffer>,
    /// Jobs it runs at once.
    pub slots: usize,
    /// Its one-line description of its machine.
    pub hardware: String,
}

impl Session {
    /// Its offer for the model `sha256`.
    pub fn offer(&self, sha256: &str) -> Option<&ModelOffer> {
        self.offers.iter().find(|o| o.sha256 == sha256)
    }
}

/// A live session and what changes while it lives. What a pick reads is
/// held here inline (not behind the session's `Arc`), so that a pick over
/// thousands of providers scans one contiguous list.
struct Live {
    session: Arc<Session>,
    /// The session's id and slots, copied from it.
    id: u64,
    slots: usize,
    /// 1 ÷ slots, so a pick multiplies instead of dividing.
    per_slot: f64,
    /// Slots it has shown it can run at once (≤ `slots`); `per_slot` is
    /// 1 ÷ this.
    proven: usize,
    /// Its first offer inline (most providers serve one model), the others
    /// in `more`; models interned ([`State::model_id`]).
    offer: Option<RouteOffer>,
    more: Vec<RouteOffer>,
    inflight: usize,
    last_heartbeat: Instant,
    /// `last_heartbeat` as milliseconds of the directory's clock
    /// ([`Directory::clock_ms`]): an integer a pick compares cheaply.
    beat_ms: u64,
    /// What it reported in its last heartbeat (shown, never routed on).
    reported_tok_s: f64,
    /// Moving average of time to first token seen by this gateway (ms).
    latency_ms: f64,
    /// Prompt tokens its prefix cache served, and in all, as it reports.
    reused_tokens: u64,
    prompt_tokens: u64,
    /// Its record's facts the router weighs, copied here whenever the
    /// record changes (and on heartbeats, for uptime), so that a pick
    /// reads one compact list and looks nothing up.
    routing: Routing,
}

/// One offer as a pick reads it.
#[derive(Clone, Copy)]
struct RouteOffer {
    model: u32,
    price: Price,
    context: usize,
}

/// A record's facts the router weighs.
#[derive(Clone, Copy, Default)]
struct Routing {
    quarantined: bool,
    unroutable: bool,
    tok_s: f64,
    reputation: f64,
    /// The reputation's share of the default ranking
    /// ([`router::reputation_term`]) plus its trial term
    /// ([`router::trial_term`]), computed once per change.
    penalty: f64,
    /// The trial term alone (for the router's slow path).
    trial: f64,
}

impl Live {
    fn healthy(&self) -> bool {
        self.last_heartbeat.elapsed() < STALE
    }
}

/// What this gateway has seen of one provider, kept across its sessions
/// (and after it left) for routing, operators and the dashboard.
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
    /// Its account at the ledger holds the bond (read after its audits).
    bonded: bool,
    /// Canary jobs missed in a row, and the delivered tok/s of its last
    /// answered canary.
    canary_misses: u32,
    verified_tok_s: Option<f64>,
    /// When its last session ended (`None`: connected, or never left).
    left: Option<Instant>,
    /// Its parts that failed since the last one it finished.
    fails_in_a_row: u32,
    /// The most jobs it has been seen to finish with that many in flight:
    /// its load counts against this, not the slots it announces.
    proven_slots: usize,
}

impl Record {
    fn new(now: Instant) -> Self {
        Record {
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
            bonded: false,
            canary_misses: 0,
            verified_tok_s: None,
            left: None,
            fails_in_a_row: 0,
            proven_slots: 1,
        }
    }

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

    /// Whether its price counts toward the market cap: it holds its bond
    /// and passed an audit with none failed (see `State::recompute_market`).
    fn trusted(&self) -> bool {
        self.bonded && self.audits_passed > 0 && self.audits_failed == 0 && !self.quarantined
    }

    /// The throughput routing may trust: verified by canaries, else measured
    /// by this gateway on its jobs.
    fn trusted_tok_s(&self) -> f64 {
        self.verified_tok_s.unwrap_or(self.tok_s)
    }

    fn routing(&self, latency_ms: f64) -> Routing {
        let reputation = self.reputation(latency_ms);
        let trial = router::trial_term(self.done, self.fails_in_a_row);
        Routing {
            quarantined: self.quarantined,
            unroutable: self.canary_misses >= CANARY_MISSES,
            tok_s: self.trusted_tok_s(),
            reputation,
            penalty: router::reputation_term(reputation) + trial,
            trial,
        }
    }
}

/// One provider as operators see it (`/api/status`, the dashboard).
#[derive(Clone, Debug, Serialize)]
pub struct ProviderReport {
    /// Node id.
    pub node: NodeId,
    /// What the router makes of it now.
    pub state: ProviderState,
    /// Aliases of the models it serves.
    pub models: Vec<String>,
    /// Its price per model (credits per million tokens).
    pub prices: Vec<ModelPrice>,
    /// Jobs it runs at once.
    pub slots: usize,
    /// Jobs this gateway has in flight on it.
    pub inflight: usize,
    /// Its description of its machine.
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
    /// Seconds since this gateway first saw it.
    pub known_s: f64,
    /// Job parts it finished.
    pub jobs_done: u64,
    /// Job parts it failed.
    pub jobs_failed: u64,
    /// Job parts the client abandoned.
    pub jobs_cancelled: u64,
    /// Tokens it generated for this gateway.
    pub tokens: u64,
    /// Audits it passed.
    pub audits_passed: u32,
    /// Audits it failed.
    pub audits_failed: u32,
    /// Moving average of its audit results (1 = every audit passed) times
    /// its uptime and a latency factor; `None` before its first audit.
    pub reputation: Option<f64>,
    /// Delivered tokens/s per stream of its last answered canary job.
    pub verified_tok_s: Option<f64>,
    /// Canary jobs missed in a row.
    pub canary_misses: u32,
    /// Share of the prompt tokens its prefix cache served (reported by it;
    /// `None` before any prompt).
    pub prefix_hit_rate: Option<f64>,
    /// Prompt tokens its prefix cache served, and prompt tokens in all,
    /// since it started (reported by it).
    pub prefix_reused_tokens: u64,
    /// See `prefix_reused_tokens`.
    pub prefix_prompt_tokens: u64,
}

/// A model's price at one provider.
#[derive(Clone, Debug, Serialize)]
pub struct ModelPrice {
    /// The model's alias.
    pub model: String,
    /// Per prompt token.
    pub input: u64,
    /// Per generated token.
    pub output: u64,
}

/// A provider connected now, for `/health`.
#[derive(Clone, Debug, Serialize)]
pub struct LiveSummary {
    /// Node id.
    pub node: NodeId,
    /// Aliases of the models it serves.
    pub models: Vec<String>,
    /// Jobs it runs at once.
    pub slots: usize,
    /// Jobs in flight on it.
    pub inflight: usize,
    /// Heartbeats recent.
    pub healthy: bool,
    /// Its prices.
    pub prices: Vec<ModelPrice>,
    /// Its description of its machine.
    pub hardware: String,
}

fn prices(offers: &[ModelOffer]) -> Vec<ModelPrice> {
    offers
        .iter()
        .map(|o| ModelPrice {
            model: o.alias.clone(),
            input: o.price.input,
            output: o.price.output,
        })
        .collect()
}

/// A request naming no `provider.max_price` is held and routed within this
/// many times the median price of trusted providers (see
/// `State::recompute_market`).
pub const MARKET_MULTIPLE: u64 = 4;

/// Records of gone providers kept at most (see `State::evict_gone`).
pub const MAX_GONE: usize = 1024;
/// A provider gone this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Live sessions in a compact list (what every pick scans), an index into
/// it, and the records.
#[derive(Default)]
struct State {
    live: Vec<Live>,
    index: HashMap<NodeId, usize>,
    records: HashMap<NodeId, Record>,
    /// What the providers keep in their prefix caches.
    prefixes: PrefixIndex,
    /// Model sha256 → a small id, so a pick compares integers.
    models: HashMap<String, u32>,
    /// The dearest output price of each model among live providers (the
    /// default ranking weighs price in proportion to it).
    dearest: HashMap<u32, u64>,
    /// Each model's market cap ([`MARKET_MULTIPLE`] × the median price of
    /// trusted providers), for requests that name no `max_price`.
    market: HashMap<u32, Price>,
}

impl State {
    fn model_id(&mut self, sha256: &str) -> u32 {
        let next = self.models.len() as u32;
        *self.models.entry(sha256.to_string()).or_insert(next)
    }

    /// Each model's market cap: [`MARKET_MULTIPLE`] × the median price
    /// (per side) of live providers that hold their bond and have passed
    /// an audit with none failed. Node keys are free but bonds and audits
    /// are not, so sybils cannot move it; no trusted provider, no cap (the
    /// gateway's `--max-*-price` still bounds every offer).
    fn recompute_market(&mut self) {
        let mut prices: HashMap<u32, (Vec<u64>, Vec<u64>)> = HashMap::new();
        for l in &self.live {
            if !self
                .records
                .get(&l.session.node)
                .is_some_and(Record::trusted)
            {
                continue;
            }
            for o in l.offer.iter().chain(&l.more) {
                let e = prices.entry(o.model).or_default();
                e.0.push(o.price.input);
                e.1.push(o.price.output);
            }
        }
        let median = |v: &mut Vec<u64>| {
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        self.market = prices
            .into_iter()
            .map(|(model, (mut input, mut output))| {
                let cap = Price {
                    input: median(&mut input).saturating_mul(MARKET_MULTIPLE),
                    output: median(&mut output).saturating_mul(MARKET_MULTIPLE),
                };
                (model, cap)
            })
            .collect();
    }

    /// `node`'s record changed, and it was `trusted_before`: recompute the
    /// market cap only if a live provider's trust changed (the cap is
    /// O(providers) to compute; audits and bonds change often, trust rarely).
    fn trust_changed(&mut self, node: &NodeId, trusted_before: bool) {
        let trusted = self.records.get(node).is_some_and(Record::trusted);
        if trusted != trusted_before && self.index.contains_key(node) {
            self.recompute_market();
        }
    }

    /// Whether `price` of `model` is above the market cap.
    fn over_market(&self, model: u32, price: &Price) -> bool {
        self.market
            .get(&model)
            .is_some_and(|cap| !price.within(cap))
    }

    fn recompute_dearest(&mut self) {
        self.recompute_market();
        self.dearest.clear();
        for l in &self.live {
            for o in l.offer.iter().chain(&l.more) {
                let d = self.dearest.entry(o.model).or_insert(0);
                *d = (*d).max(o.price.output);
            }
        }
    }

    fn live(&self, node: &NodeId) -> Option<&Live> {
        self.index.get(node).and_then(|&i| self.live.get(i))
    }

    fn live_mut(&mut self, node: &NodeId) -> Option<&mut Live> {
        let i = *self.index.get(node)?;
        self.live.get_mut(i)
    }

    /// Forget providers gone a while, so node keys (which are free) cannot
    /// grow the directory without limit: records of providers gone longer
    /// than [`FORGET_AFTER`] go, and beyond [`MAX_GONE`] gone ones the
    /// least useful go first (never served a job, then gone longest). A
    /// provider that ever failed an audit is never forgotten here (its
    /// standing is also in the ledger).
    fn evict_gone(&mut self) {
        let now = Instant::now();
        let forgettable = |r: &Record| {
            r.connected_since.is_none() && r.audits_failed == 0 && !r.quarantined && r.on_watch == 0
        };
        self.records.retain(|_, r| {
            !(forgettable(r) && r.left.is_some_and(|t| now.duration_since(t) > FORGET_AFTER))
        });
        let gone = self
            .records
            .values()
            .filter(|r| r.connected_since.is_none())
            .count();
        if gone <= MAX_GONE {
            return;
        }
        let mut candidates: Vec<(bool, Instant, NodeId)> = self
            .records
            .iter()
            .filter(|(_, r)| forgettable(r))
            .map(|(n, r)| {
                (
                    r.done > 0 || r.audits_passed > 0,
                    r.left.unwrap_or(r.first_seen),
                    *n,
                )
            })
            .collect();
        candidates.sort();
        for (_, _, node) in candidates.into_iter().take(gone - MAX_GONE) {
            self.records.remove(&node);
        }
    }

    fn remove(&mut self, node: &NodeId) -> Option<Live> {
        let i = self.index.remove(node)?;
        let gone = self.live.swap_remove(i);
        if let Some(moved) = self.live.get(i) {
            self.index.insert(moved.session.node, i);
        }
        Some(gone)
    }

    /// Copy `node`'s record into its live entry's routing facts.
    fn refresh(&mut self, node: &NodeId) {
        let Some(&i) = self.index.get(node) else {
            return;
        };
        if let (Some(r), Some(l)) = (self.records.get(node), self.live.get_mut(i)) {
            l.routing = r.routing(l.latency_ms);
            l.proven = r.proven_slots.clamp(1, l.slots.max(1));
            l.per_slot = 1.0 / l.proven as f64;
        }
    }
}

/// Every provider this gateway can reach right now, and what it has seen
/// of every provider so far.
pub struct Directory {
    state: Mutex<State>,
    /// Start of the directory's millisecond clock (heartbeat ages).
    epoch: Instant,
    /// Breaks ties between equally ranked providers in turn.
    turn: AtomicUsize,
    metrics: Option<Arc<Metrics>>,
}

/// A slot claimed on a provider for one job part; released when dropped,
/// however the part ends.
pub struct Claim {
    /// The provider's session.
    pub session: Arc<Session>,
    /// Its price for the model.
    pub price: Price,
    /// Its context per request for the model.
    pub context: usize,
    directory: Arc<Directory>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut state = self.directory.lock();
        if let Some(live) = state.live_mut(&self.session.node) {
            if live.session.id == self.session.id {
                live.inflight = live.inflight.saturating_sub(1);
            }
        }
    }
}

/// What an audit verdict did to a provider's standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Nothing changed beyond its record.
    Unchanged,
    /// A first failure: every part is audited until it passes [`WATCH`].
    OnWatch,
    /// A failure confirmed the first: never routed to again here.
    Quarantined,
}

impl Default for Directory {
    fn default() -> Self {
        Directory::new(None)
    }
}

impl Directory {
    /// A directory that counts provider jobs in `metrics`.
    pub fn new(metrics: Option<Arc<Metrics>>) -> Self {
        Directory {
            state: Mutex::default(),
            epoch: Instant::now(),
            turn: AtomicUsize::new(0),
            metrics,
        }
    }

    /// The state, even if a panic elsewhere poisoned the lock (every
    /// update is a few field writes that leave it consistent).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A provider's session starts; a session of the same node it replaces
    /// is closed.
    pub fn join(&self, session: Session) -> Arc<Session> {
        let session = Arc::new(session);
        let now = Instant::now();
        let mut state = self.lock();
        let r = state
            .records
            .entry(session.node)
            .or_insert_with(|| Record::new(now));
        r.connected_since.get_or_insert(now);
        r.offers = session.offers.clone();
        r.slots = session.slots;
        r.hardware = session.hardware.clone();
        let routing = r.routing(0.0);
        let proven = r.proven_slots.clamp(1, session.slots.max(1));
        let old = state.remove(&session.node);
        let mut offers: Vec<RouteOffer> = session
            .offers
            .iter()
            .map(|o| RouteOffer {
                model: state.model_id(&o.sha256),
                price: o.price,
                context: o.context_length,
            })
            .collect();
        let offer = (!offers.is_empty()).then(|| offers.remove(0));
        for o in offer.iter().chain(&offers) {
            let d = state.dearest.entry(o.model).or_insert(0);
            *d = (*d).max(o.price.output);
        }
        let at = state.live.len();
        state.index.insert(session.node, at);
        state.live.push(Live {
            id: session.id,
            slots: session.slots,
            per_slot: 1.0 / proven as f64,
            proven,
            offer,
            more: offers,
            session: session.clone(),
            inflight: 0,
            last_heartbeat: now,
            beat_ms: u64::try_from(now.duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX),
            reported_tok_s: 0.0,
            latency_ms: 0.0,
            reused_tokens: 0,
            prompt_tokens: 0,
            routing,
        });
        if old.is_some() {
            state.recompute_dearest();
        } else {
            // A newcomer moves the market only if it is trusted already.
            state.trust_changed(&session.node, false);
        }
        drop(state);
        if let Some(conn) = old.and_then(|o| o.session.conn.clone()) {
            conn.close(0u32.into(), b"replaced by a newer session");
        }
        session
    }

    /// Session `id` of `node` ended (a newer session of it stays).
    pub fn leave(&self, node: &NodeId, id: u64) {
        let mut state = self.lock();
        if state.live(node).is_some_and(|l| l.session.id == id) {
            state.remove(node);
            state.recompute_dearest();
            state.prefixes.forget(*node);
            if let Some(r) = state.records.get_mut(node) {
                if let Some(since) = r.connected_since.take() {
                    r.online += since.elapsed();
                }
                r.left = Some(Instant::now());
            }
            state.evict_gone();
        }
    }

    /// A heartbeat from session `id` of `node`.
    pub fn heartbeat(&self, node: &NodeId, id: u64, reported_tok_s: f64) {
        let mut state = self.lock();
        let Some(live) = state.live_mut(node).filter(|l| l.session.id == id) else {
            return;
        };
        let now = Instant::now();
        live.last_heartbeat = now;
        live.beat_ms =
            u64::try_from(now.duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        live.reported_tok_s = reported_tok_s;
        state.refresh(node);
    }

    /// What session `id` of `node` says of its prefix cache (totals since
    /// it started).
    pub fn cache_stats(&self, node: &NodeId, id: u64, reused: u64, prompt: u64) {
        let mut state = self.lock();
        if let Some(live) = state.live_mut(node).filter(|l| l.session.id == id) {
            live.reused_tokens = reused;
            live.prompt_tokens = prompt;
        }
    }

    /// Every live provider as the router sees it for the model `sha256`,
    /// in the order of the live list (index i is `state.live[i]`).
    fn candidates<'s>(
        state: &'s State,
        sha256: &'s str,
        tokens: usize,
        prefix: Option<(u64, &[u64])>,
    ) -> impl Iterator<Item = Candidate<'s>> + 's {
        let kept = prefix
            .map(|(key, chain)| state.prefixes.matches(key, chain))
            .unwrap_or_default();
        state.live.iter().map(move |l| {
            let offer = l.session.offer(sha256);
            let blocks = kept.get(&l.session.node).copied().unwrap_or(0);
            Candidate {
                node: &l.session.node_hex,
                session: l.session.id,
                serves: offer.is_some_and(|o| o.context_length > tokens),
                price: offer.map(|o| o.price).unwrap_or_default(),
                over_market: offer.is_some_and(|o| {
                    state
                        .models
                        .get(&o.sha256)
                        .is_some_and(|m| state.over_market(*m, &o.price))
                }),
                healthy: l.healthy(),
                quarantined: l.routing.quarantined,
                unroutable: l.routing.unroutable,
                inflight: l.inflight,
                slots: l.session.slots,
                proven: l.proven,
                tok_s: l.routing.tok_s,
                latency_ms: l.latency_ms,
                reputation: l.routing.reputation,
                trial: l.routing.trial,
                cached: ((blocks * BLOCK) as f64 / tokens.max(1) as f64).min(1.0),
            }
        })
    }

    /// Choose a provider for a job and claim one of its slots, or `None`
    /// when every eligible provider is busy (or none exists).
    pub fn pick(self: &Arc<Self>, need: &Need<'_>) -> Option<Claim> {
        let prefs = need.prefs;
        let plain = prefs.order.is_empty()
            && prefs.only.is_empty()
            && prefs.ignore.is_empty()
            && prefs.sort.is_none();
        if plain {
            return self.pick_fast(need);
        }
        let mut state = self.lock();
        let (mut slot, mut candidates) = (Vec::new(), Vec::new());
        for (i, c) in Self::candidates(&state, need.sha256, need.tokens, need.prefix).enumerate() {
            if router::eligible(&c, need) {
                slot.push(i);
                candidates.push(c);
            }
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let chosen = router::choose(&candidates, need.prefs, turn).map(|i| slot[i]);
        drop(candidates);
        let live = state.live.get_mut(chosen?)?;
        live.inflight += 1;
        let session = live.session.clone();
        drop(state);
        let offer = session.offer(need.sha256)?;
        let (price, context) = (offer.price, offer.context_length);
        Some(Claim {
            session,
            price,
            context,
            directory: self.clone(),
        })
    }

    /// [`Directory::pick`] for a request without provider preferences (the
    /// usual case): one pass over the live list, eligibility and the
    /// default ranking ([`router::default_key`]) inline, nothing allocated
    /// but the prefix matches. Exact ties go to a pseudo-random one of them
    /// (by `turn`), so equal providers share the work.
    fn pick_fast(self: &Arc<Self>, need: &Need<'_>) -> Option<Claim> {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed) as u64;
        let now_ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let stale_ms = STALE.as_millis() as u64;
        let mut state = self.lock();
        let model = *state.models.get(need.sha256)?;
        let per_price = 0.25 / state.dearest.get(&model).copied().unwrap_or(0).max(1) as f64;
        // The market cap binds a request that names no price cap of its own.
        let market = match need.prefs.max_price {
            None => state.market.get(&model).copied(),
            Some(_) => None,
        };
        let kept = need
            .prefix
            .map(|(key, chain)| state.prefixes.matches(key, chain))
            .unwrap_or_default();
        let mut best: Option<(f64, u64, usize)> = None;
        for (i, l) in state.live.iter().enumerate() {
            let o = match &l.offer {
                Some(o) if o.model == model => o,
                _ => match l.more.iter().find(|o| o.model == model) {
                    Some(o) => o,
                    None => continue,
                },
            };
            if o.context <= need.tokens
                || l.inflight >= l.slots
                || now_ms.saturating_sub(l.beat_ms) >= stale_ms
                || l.routing.quarantined
                || (l.routing.unroutable && !need.probe)
                || !need.prefs.affords(&o.price)
                || market.is_some_and(|cap| !o.price.within(&cap))
                || need.exclude.contains(&l.id)
            {
                continue;
            }
            let cached = if kept.is_empty() {
                0.0
            } else {
                let blocks = kept.get(&l.session.node).copied().unwrap_or(0);
                ((blocks * BLOCK) as f64 / need.tokens.max(1) as f64).min(1.0)
            };
            let key = l.inflight as f64 * l.per_slot
                + per_price * o.price.output as f64
                + l.routing.penalty
                - router::PREFIX_WEIGHT * cached;
            // The tie-break hash only when it decides something.
            let tie = |i: usize| {
                crate::prefix::mix(turn ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            };
            let better = match best {
                None => true,
                Some((k, _, _)) if key < k => true,
                Some((k, b, j)) if key == k => {
                    let t = tie(i);
                    let b = if b == 0 { tie(j) } else { b };
                    best = Some((k, b, j));
                    t < b
                }
                _ => false,
            };
            if better {
                best = Some((key, 0, i));
            }
        }
        let live = state.live.get_mut(best?.2)?;
        live.inflight += 1;
        let session = live.session.clone();
        drop(state);
        let offer = session.offer(need.sha256)?;
        let (price, context) = (offer.price, offer.context_length);
        Some(Claim {
            session,
            price,
            context,
            directory: self.clone(),
        })
    }

    /// Whether some provider could take the job once it has a free slot.
    pub fn could_serve(&self, need: &Need<'_>) -> bool {
        let state = self.lock();
        let any = Self::candidates(&state, need.sha256, need.tokens, None)
            .any(|c| router::eligible(&c, need));
        any
    }

    /// What the job's hold is sized by: the price of the provider the
    /// router would choose now (a preview: its slot is taken and given
    /// back), or, with none free, the cheapest that may serve it; and the
    /// ceiling, the highest price among those that may (see
    /// [`router::quote`]).
    pub fn quote(self: &Arc<Self>, need: &Need<'_>) -> Result<Quote, JobError> {
        let mut quote = {
            let state = self.lock();
            router::quote(Self::candidates(&state, need.sha256, 0, None), need)?
        };
        if let Some(claim) = self.pick(need) {
            quote.hold = claim.price;
        }
        Ok(quote)
    }

    /// `node` keeps the KV cache of the finished part `tag` (of cache
    /// `key`): these tokens.
    pub fn remember_prefix(
        &self,
        node: &NodeId,
        tag: &str,
        key: u64,
        tokens: &[tessera_core::Token],
    ) {
        self.lock().prefixes.insert(*node, tag, key, tokens);
    }

    /// `node` reported these prefix-cache entries evicted.
    pub fn forget_prefixes(&self, node: &NodeId, tags: &[String]) {
        let mut state = self.lock();
        for t in tags {
            state.prefixes.evict(*node, t);
        }
    }

    /// A job part on `node` got its first answer after `ms`.
    pub fn observe_latency(&self, node: &NodeId, ms: f64) {
        let mut state = self.lock();
        if let Some(l) = state.live_mut(node) {
            l.latency_ms = if l.latency_ms > 0.0 {
                0.8 * l.latency_ms + 0.2 * ms
            } else {
                ms
            };
        }
        state.refresh(node);
    }

    /// One job part on `node` ended after generating `tokens`, at `tok_s`
    /// when it could be measured.
    pub fn record_part(
        &self,
        node: &NodeId,
        outcome: PartOutcome,
        tokens: u64,
        tok_s: Option<f64>,
    ) {
        let mut average = None;
        {
            let mut state = self.lock();
            let inflight = state.live(node).map_or(0, |l| l.inflight);
            if let Some(r) = state.records.get_mut(node) {
                match outcome {
                    PartOutcome::Done => {
                        r.done += 1;
                        r.fails_in_a_row = 0;
                        r.proven_slots = r.proven_slots.max(inflight);
                    }
                    PartOutcome::Failed => {
                        r.failed += 1;
                        r.fails_in_a_row += 1;
                    }
                    PartOutcome::Cancelled => r.cancelled += 1,
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
            state.refresh(node);
        }
        if let Some(m) = &self.metrics {
            m.provider_part(&node.to_string(), outcome.as_str(), tokens, average);
        }
    }

    /// The chance that a part `node` served is audited: 1 on probation
    /// (fewer than `probation` passed audits, or, when `needs_bond`, no
    /// bond held yet) or on watch, else `base_rate`.
    pub fn audit_odds(
        &self,
        node: &NodeId,
        base_rate: f64,
        probation: u32,
        needs_bond: bool,
    ) -> f64 {
        let state = self.lock();
        match state.records.get(node) {
            Some(r)
                if r.on_watch == 0 && r.audits_passed >= probation && (r.bonded || !needs_bond) =>
            {
                base_rate
            }
            _ => 1.0,
        }
    }

    /// Whether `node` is still on probation (too few audits passed, or no
    /// bond held when one is needed), and not on watch.
    pub fn on_probation(&self, node: &NodeId, probation: u32, needs_bond: bool) -> bool {
        let state = self.lock();
        state.records.get(node).is_none_or(|r| {
            r.on_watch == 0 && (r.audits_passed < probation || (needs_bond && !r.bonded))
        })
    }

    /// Whether `node`'s account holds its bond.
    pub fn set_bonded(&self, node: &NodeId, bonded: bool) {
        let mut state = self.lock();
        let Some(r) = state.records.get_mut(node) else {
            return;
        };
        let before = r.trusted();
        r.bonded = bonded;
        state.trust_changed(node, before);
    }

    /// Whether `node` has never finished a job here (see
    /// [`router::trial_term`]).
    pub fn unproven(&self, node: &NodeId) -> bool {
        self.lock().records.get(node).is_some_and(|r| r.done == 0)
    }

    /// `node`'s standing with the auditors, to be saved in the ledger.
    pub fn standing(&self, node: &NodeId) -> Option<tessera_ledger::Standing> {
        let state = self.lock();
        state.records.get(node).map(|r| tessera_ledger::Standing {
            provider: node.to_string(),
            audits_passed: r.audits_passed,
            audits_failed: r.audits_failed,
            on_watch: r.on_watch,
            quarantined: r.quarantined,
            updated_ms: 0,
        })
    }

    /// Take in a standing another gateway (or this one before a restart)
    /// saved: the worse of the two wins (a quarantine is never undone, a
    /// watch never shortened), so a restart or a second gateway cannot
    /// give a cheater a fresh start.
    pub fn restore(&self, node: &NodeId, s: &tessera_ledger::Standing) {
        let mut state = self.lock();
        let r = state
            .records
            .entry(*node)
            .or_insert_with(|| Record::new(Instant::now()));
        let before = r.trusted();
        r.audits_passed = r.audits_passed.max(s.audits_passed);
        if s.audits_failed > r.audits_failed {
            r.audits_failed = s.audits_failed;
            r.on_watch = r.on_watch.max(s.on_watch);
        }
        r.quarantined |= s.quarantined;
        state.refresh(node);
        state.trust_changed(node, before);
    }

    /// An audit of `node` passed or failed; what it did to its standing.
    pub fn record_audit(&self, node: &NodeId, passed: bool) -> Standing {
        let mut state = self.lock();
        let Some(r) = state.records.get_mut(node) else {
            return Standing::Unchanged;
        };
        let before = r.trusted();
        let x = if passed { 1.0 } else { 0.0 };
        r.audit_score = Some(r.audit_score.map_or(x, |old| 0.8 * old + 0.2 * x));
        let standing = if passed {
            r.audits_passed += 1;
            r.on_watch = r.on_watch.saturating_sub(1);
            Standing::Unchanged
        } else {
            r.audits_failed += 1;
            if r.on_watch > 0 && !r.quarantined {
                r.quarantined = true;
                Standing::Quarantined
            } else {
                r.on_watch = WATCH;
                Standing::OnWatch
            }
        };
        state.refresh(node);
        state.trust_changed(node, before);
        standing
    }

    /// A canary job to `node` was answered at `tok_s`, or missed (`None`).
    pub fn record_canary(&self, node: &NodeId, tok_s: Option<f64>) {
        let mut state = self.lock();
        if let Some(r) = state.records.get_mut(node) {
            match tok_s {
                Some(t) => {
                    r.canary_misses = 0;
                    r.verified_tok_s = Some(t);
                }
                None => r.canary_misses += 1,
            }
        }
        state.refresh(node);
    }

    /// Providers serving `sha256` now.
    pub fn serving_nodes(&self, sha256: &str) -> Vec<NodeId> {
        let state = self.lock();
        state
            .live
            .iter()
            .filter(|l| l.session.offer(sha256).is_some())
            .map(|l| l.session.node)
            .collect()
    }

    /// Healthy providers serving `sha256` now, the largest context among
    /// them, and their lowest and highest prices.
    pub fn serving(&self, sha256: &str) -> (usize, usize, Option<(Price, Price)>) {
        let state = self.lock();
        let mut count = 0;
        let mut context = 0;
        let mut range: Option<(Price, Price)> = None;
        for l in state.live.iter().filter(|l| l.healthy()) {
            if let Some(o) = l.session.offer(sha256) {
                count += 1;
                context = context.max(o.context_length);
                let (lo, hi) = range.get_or_insert((o.price, o.price));
                lo.input = lo.input.min(o.price.input);
                lo.output = lo.output.min(o.price.output);
                *hi = hi.max(o.price);
            }
        }
        (count, context, range)
    }

    /// Every provider seen so far, connected ones first, then by node id.
    pub fn report(&self) -> Vec<ProviderReport> {
        let state = self.lock();
        let mut list: Vec<ProviderReport> = state
            .records
            .iter()
            .map(|(node, r)| {
                let live = state.live(node);
                let inflight = live.map_or(0, |l| l.inflight);
                let state = match live {
                    _ if r.quarantined => ProviderState::Quarantined,
                    Some(_) if r.canary_misses >= CANARY_MISSES => ProviderState::Unroutable,
                    None => ProviderState::Offline,
                    Some(l) if !l.healthy() => ProviderState::Stale,
                    Some(l) if inflight >= l.session.slots => ProviderState::Busy,
                    Some(_) => ProviderState::Online,
                };
                let latency_ms = live.map_or(0.0, |l| l.latency_ms);
                ProviderReport {
                    node: *node,
                    state,
                    models: r.offers.iter().map(|o| o.alias.clone()).collect(),
                    prices: prices(&r.offers),
                    slots: r.slots,
                    inflight,
                    hardware: r.hardware.clone(),
                    tok_s: r.tok_s,
                    reported_tok_s: live.map_or(0.0, |l| l.reported_tok_s),
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
                    prefix_hit_rate: live
                        .filter(|l| l.prompt_tokens > 0)
                        .map(|l| l.reused_tokens as f64 / l.prompt_tokens as f64),
                    prefix_reused_tokens: live.map_or(0, |l| l.reused_tokens),
                    prefix_prompt_tokens: live.map_or(0, |l| l.prompt_tokens),
                }
            })
            .collect();
        list.sort_by(|a, b| {
            let off = |p: &ProviderReport| p.state == ProviderState::Offline;
            (off(a), a.node).cmp(&(off(b), b.node))
        });
        list
    }

    /// The providers connected now, for `/health`.
    pub fn describe(&self) -> Vec<LiveSummary> {
        let state = self.lock();
        let mut list: Vec<LiveSummary> = state
            .live
            .iter()
            .map(|l| LiveSummary {
                node: l.session.node,
                models: l.session.offers.iter().map(|o| o.alias.clone()).collect(),
                slots: l.session.slots,
                inflight: l.inflight,
                healthy: l.healthy(),
                prices: prices(&l.session.offers),
                hardware: l.session.hardware.clone(),
            })
            .collect();
        list.sort_by_key(|s| s.node);
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_backend::RoutePrefs;

    /// A plain job of model "m" with a 5-token prompt, under `prefs`.
    fn need_of(prefs: &RoutePrefs) -> Need<'_> {
        Need {
            sha256: "m",
            tokens: 5,
            exclude: &[],
            prefs,
            probe: false,
            prefix: None,
        }
    }

    fn session(n: u8, id: u64, slots: usize, price: u64) -> Session {
        let node = NodeId::from_bytes([n; 32]);
        Session {
            node,
            node_hex: node.to_string(),
            id,
            conn: None,
            offers: vec![ModelOffer {
                sha256: "m".into(),
                alias: "model".into(),
                context_length: 100,
                price: Price {
                    input: price,
                    output: price,
                },
            }],
            slots,
            hardware: String::new(),
        }
    }

    #[test]
    fn picks_claim_slots_until_full_and_dropping_a_claim_frees_it() {
        let d = Arc::new(Directory::default());
        d.join(session(1, 1, 2, 10));
        let prefs = RoutePrefs::any();
        let need = need_of(&prefs);
        let a = d.pick(&need).expect("a free slot");
        let b = d.pick(&need).expect("a second slot");
        assert!(d.pick(&need).is_none(), "both slots taken");
        assert!(d.could_serve(&need));
        drop(a);
        let c = d.pick(&need).expect("the freed slot");
        drop((b, c));
        assert!(
            d.pick(&Need {
                tokens: 100,
                ..need.clone()
            })
            .is_none(),
            "context too small"
        );
        let price = Price {
            input: 10,
            output: 10,
        };
        assert_eq!(
            d.quote(&need),
            Ok(Quote {
                hold: price,
                cheapest: price,
                ceiling: price
            })
        );
    }

    /// The hold is sized by the route the router would take now, not by
    /// the dearest provider; the ceiling is the dearest. The preview takes
    /// no slot.
    #[test]
    fn the_quote_holds_at_the_route_the_router_would_take() {
        let d = Arc::new(Directory::default());
        d.join(session(1, 1, 1, 10));
        d.join(session(2, 2, 1, 90));
        let prefs = RoutePrefs::any();
        let need = need_of(&prefs);
        let at = |p: u64| Price {
            input: p,
            output: p,
        };
        let quote = d.quote(&need).unwrap();
        assert_eq!(
            (quote.hold, quote.cheapest, quote.ceiling),
            (at(10), at(10), at(90))
        );
        let cheap = d.pick(&need).expect("the cheap one is free");
        assert_eq!(cheap.price, at(10), "the preview took no slot");
        // The cheap one busy: the route now is the dear one.
        let quote = d.quote(&need).unwrap();
        assert_eq!((quote.hold, quote.cheapest), (at(90), at(10)));
        let dear = d.pick(&need).expect("the dear one is free");
        // Both busy: the cheapest that may serve (the job waits for a slot).
        assert_eq!(d.quote(&need).unwrap().hold, at(10));
        drop((cheap, dear));
    }

    #[test]
    fn a_replaced_session_does_not_release_the_new_ones_slots() {
        let d = Arc::new(Directory::default());
        d.join(session(1, 1, 1, 10));
        let prefs = RoutePrefs::any();
        let need = need_of(&prefs);
        let old = d.pick(&need).expect("slot");
        d.join(session(1, 2, 1, 10));
        let new = d.pick(&need).expect("the new session's slot");
        drop(old);
        assert!(
            d.pick(&need).is_none(),
            "the new session's slot is still taken"
        );
        drop(new);
        d.leave(&NodeId::from_bytes([1; 32]), 1);
        assert!(
            d.pick(&need).is_some(),
            "leaving with an old id keeps the new session"
        );
    }

    #[test]
    fn equal_providers_share_picks_and_the_least_loaded_wins() {
        let d = Arc::new(Directory::default());
        for n in 1..=3 {
            d.join(session(n, u64::from(n), 4, 10));
        }
        let prefs = RoutePrefs::any();
        let need = need_of(&prefs);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..30 {
            let c = d.pick(&need).unwrap();
            seen.insert(c.session.node);
        }
        assert_eq!(seen.len(), 3, "ties are shared");
        // Load two of them: the third takes the next job, by either path.
        let held: Vec<Claim> = (0..2).map(|_| d.pick(&need).unwrap()).collect();
        let busy: std::collections::HashSet<NodeId> = held.iter().map(|c| c.session.node).collect();
        let next = d.pick(&need).unwrap();
        if busy.len() == 2 {
            assert!(
                !busy.contains(&next.session.node),
                "a loaded provider won over an idle one"
            );
        }
        let only = RoutePrefs {
            ignore: vec!["zz".into()],
            ..RoutePrefs::any()
        };
        let general = d
            .pick(&Need {
                prefs: &only,
                ..need.clone()
            })
            .unwrap();
        assert!(!busy.contains(&general.session.node) || busy.len() < 2);
    }

    #[test]
    fn second_failure_within_the_watch_quarantines() {
        let d = Directory::default();
        let node = NodeId::from_bytes([3; 32]);
        d.join(session(3, 1, 1, 10));
        assert_eq!(d.audit_odds(&node, 0.05, 1, false), 1.0, "probation");
        assert_eq!(d.record_audit(&node, true), Standing::Unchanged);
        assert_eq!(d.audit_odds(&node, 0.05, 1, false), 0.05);
        // With a bond required, probation lasts until it is held.
        assert_eq!(d.audit_odds(&node, 0.05, 1, true), 1.0, "no bond yet");
        d.set_bonded(&node, true);
        assert_eq!(d.audit_odds(&node, 0.05, 1, true), 0.05);
        assert_eq!(d.record_audit(&node, false), Standing::OnWatch);
        assert_eq!(d.audit_odds(&node, 0.05, 1, true), 1.0, "on watch");
        assert_eq!(d.record_audit(&node, false), Standing::Quarantined);
        assert_eq!(d.report()[0].state, ProviderState::Quarantined);
    }

    /// Node keys are free: a flood of providers that join and leave keeps
    /// at most MAX_GONE records, the useful ones (jobs done, a failed
    /// audit) outliving the sybils.
    #[test]
    fn records_of_gone_providers_are_bounded() {
        let d = Arc::new(Directory::default());
        let useful = NodeId::from_bytes([0xaa; 32]);
        let failed = NodeId::from_bytes([0xbb; 32]);
        for (i, node) in [useful, failed].into_iter().enumerate() {
            d.join(Session {
                node,
                node_hex: node.to_string(),
                ..session(1, 100 + i as u64, 2, 10)
            });
        }
        d.record_part(&useful, PartOutcome::Done, 10, None);
        d.record_audit(&failed, false);
        d.leave(&useful, 100);
        d.leave(&failed, 101);
        for i in 0..(MAX_GONE as u32 + 500) {
            let mut bytes = [0u8; 32];
            bytes[..4].copy_from_slice(&i.to_be_bytes());
            let node = NodeId::from_bytes(bytes);
            d.join(Session {
                node,
                node_hex: node.to_string(),
                ..session(1, 1000 + u64::from(i), 2, 10)
            });
            d.leave(&node, 1000 + u64::from(i));
        }
        let report = d.report();
        assert!(
            report.len() <= MAX_GONE,
            "{} records of gone providers kept (bound {MAX_GONE})",
            report.len()
        );
        assert!(
            report.iter().any(|r| r.node == useful),
            "the useful provider was forgotten"
        );
        assert!(
            report.iter().any(|r| r.node == failed),
            "the failed audit was forgotten"
        );
    }

    /// Announced slots bound a provider's load but never make it look
    /// idle: a dear provider announcing 64 slots, with one job in flight,
    /// is as loaded as it has shown it can be, so the next job goes to the
    /// honest provider a quarter loaded (before, 1/64 looked idle and won
    /// at four times the price).
    #[test]
    fn huge_announced_slots_do_not_look_idle() {
        let d = Arc::new(Directory::default());
        d.join(session(1, 1, 4, 80));
        d.join(session(2, 2, 64, 320));
        let prefs = RoutePrefs::any();
        let need = need_of(&prefs);
        let only = |n: u8| RoutePrefs {
            only: vec![NodeId::from_bytes([n; 32]).to_string()],
            ..RoutePrefs::any()
        };
        let (p1, p2) = (only(1), only(2));
        let honest = d
            .pick(&Need {
                prefs: &p1,
                ..need.clone()
            })
            .unwrap();
        let dear = d
            .pick(&Need {
                prefs: &p2,
                ..need.clone()
            })
            .unwrap();
        let next = d.pick(&need).unwrap();
        assert_eq!(
            next.session.node,
            NodeId::from_bytes([1; 32]),
            "the next job went to the dear provider announcing 64 slots"
        );
        drop((honest, dear, next));
    }

    /// A request without `provider.max_price` is held and routed within
    /// the market's cap: four times the median price of providers that
    /// are bonded and passed an audit. A gouger within the gateway's
    /// limits no longer sizes every hold at its price; sybils (unbonded,
    /// unaudited) do not move the median; a client who names a cap may
    /// still pick the dear provider.
    #[test]
    fn holds_stay_within_the_market_price() {
        let d = Arc::new(Directory::default());
        for n in 1..=3 {
            d.join(session(n, u64::from(n), 2, 80));
            let node = NodeId::from_bytes([n; 32]);
            d.set_bonded(&node, true);
            d.record_audit(&node, true);
        }
        d.join(session(9, 9, 64, 1000));
        // Cheap sybils, neither bonded nor audited.
        for n in 20..30 {
            d.join(session(n, u64::from(n), 2, 1));
        }
        let prefs = RoutePrefs::any();
        let need = need_of(&prefs);
        assert_eq!(
            d.quote(&need).map(|q| q.ceiling),
            Ok(Price {
                input: 80,
                output: 80
            }),
            "the router is held to the market's prices, not the gouger's"
        );
        let capped = RoutePrefs {
            max_price: Some(Price {
                input: 2000,
                output: 2000,
            }),
            ..RoutePrefs::any()
        };
        assert_eq!(
            d.quote(&Need {
                prefs: &capped,
                ..need.clone()
            })
            .map(|q| q.ceiling),
            Ok(Price {
                input: 1000,
                output: 1000
            }),
            "a client naming its own cap may pay the dear one"
        );
    }
}
