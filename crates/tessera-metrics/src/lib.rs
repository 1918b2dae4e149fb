//! What a gateway counts about itself: Prometheus metrics and a short
//! history for charts.
//!
//! One [`Metrics`] per process is shared by the HTTP API, which records
//! every request and every generation, and by the router, which records
//! each provider's jobs. The counts are shown two ways: `/metrics` in the
//! OpenMetrics text format Prometheus scrapes ([`Metrics::encode`]), and
//! [`Metrics::history`], ten-second buckets of the last hour that the
//! dashboard draws as charts. Nothing here ever sees prompt or completion
//! text: only counts, durations, verdicts and node ids.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Width of one history bucket, in seconds.
pub const BUCKET_S: u64 = 10;
/// Buckets kept: one hour.
const BUCKETS: usize = 360;
/// Audits kept for "recent audits".
const RECENT_AUDITS: usize = 50;
/// Providers given their own label values in the per-provider series;
/// the rest share `provider="other"` (node keys are free, and each label
/// value is memory for as long as the gateway runs).
pub const MAX_PROVIDER_LABELS: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderJobLabels {
    provider: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LedgerLabels {
    account: &'static str,
}

/// How a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The answer was delivered to the end.
    Completed,
    /// No provider could finish it; nothing was charged.
    Failed,
    /// The client went away before the end.
    Abandoned,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// An answer's audit status, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The auditor reproduced the answer.
    Passed,
    /// The auditor caught it.
    Failed,
    /// Not audited.
    NotAudited,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Failed => "failed",
            Verdict::NotAudited => "not_audited",
        }
    }
}

/// One audit, for the dashboard's "recent audits".
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord {
    /// The request (response id).
    pub job: String,
    /// Who served it (node id).
    pub provider: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    /// Why, in a few words (the evidence is kept with the job).
    pub reason: String,
}

/// Ten seconds of traffic.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Bucket {
    /// Start of the bucket, seconds since the epoch.
    pub start_s: u64,
    /// Generations that ended in it, and how many of them failed.
    pub requests: u64,
    /// Of those, failed ones.
    pub failed: u64,
    /// Prompt tokens of those generations.
    pub prompt_tokens: u64,
    /// Tokens they generated.
    pub completion_tokens: u64,
    /// Sums for the averages below (count, milliseconds).
    #[serde(skip)]
    ttft_n: u64,
    #[serde(skip)]
    ttft_sum_ms: f64,
    #[serde(skip)]
    latency_n: u64,
    #[serde(skip)]
    latency_sum_ms: f64,
    /// Mean time to first token and mean duration of the generations that
    /// ended in it (`None` when none did).
    pub ttft_ms: Option<f64>,
    /// Mean duration of those generations.
    pub latency_ms: Option<f64>,
}

/// Every count of one process; see the crate docs.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    generations: Family<OutcomeLabels, Counter>,
    tokens: Family<KindLabels, Counter>,
    ttft: Histogram,
    duration: Histogram,
    active: Gauge,
    provider_jobs: Family<ProviderJobLabels, Counter>,
    provider_tokens: Family<ProviderLabels, Counter>,
    /// Providers with label values of their own.
    labelled: Mutex<std::collections::HashSet<String>>,
    provider_tok_s: Family<ProviderLabels, Gauge<f64, AtomicU64>>,
    audits: Family<VerdictLabels, Counter>,
    audit_backlog: Gauge,
    ledger: Family<LedgerLabels, Gauge>,
    history: Mutex<VecDeque<Bucket>>,
    recent_audits: Mutex<VecDeque<AuditRecord>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status code",
            requests.clone(),
        );
        let generations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "generations",
            "Generations that ended, by outcome (completed, failed, abandoned by the client)",
            generations.clone(),
        );
        let tokens = Family::<KindLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens processed: prompt (in) and completion (out)",
            tokens.clone(),
        );
        // 5 ms … ~164 s.
        let ttft = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        registry.register(
            "time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            ttft.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "generation_duration_seconds",
            "From the request's arrival to the end of its answer",
            duration.clone(),
        );
        let active = Gauge::default();
        registry.register(
            "active_generations",
            "Generations (streamed or not) in progress",
            active.clone(),
        );
        let provider_jobs = Family::<ProviderJobLabels, Counter>::default();
        registry.register(
            "provider_jobs",
            "Job parts run by each provider, by outcome (done, failed, cancelled)",
            provider_jobs.clone(),
        );
        let provider_tokens = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "provider_tokens",
            "Tokens each provider generated for this gateway",
            provider_tokens.clone(),
        );
        let provider_tok_s = Family::<ProviderLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "provider_tokens_per_second",
            "Each provider's delivered tokens per second per stream, as this gateway measured it",
            provider_tok_s.clone(),
        );
        let audits = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "audits",
            "Answers by audit verdict (not_audited: delivered without an audit)",
            audits.clone(),
        );
        let audit_backlog = Gauge::default();
        registry.register(
            "audit_backlog",
            "Audits queued or running on this gateway's auditors",
            audit_backlog.clone(),
        );
        let ledger = Family::<LedgerLabels, Gauge>::default();
        registry.register(
            "ledger_micro_credits",
            "Ledger totals in micro-credits: issued, escrow (held now), revenue (paid by clients), provider_earnings, fees",
            ledger.clone(),
        );
        Metrics {
            registry,
            requests,
            generations,
            tokens,
            ttft,
            duration,
            active,
            provider_jobs,
            provider_tokens,
            labelled: Mutex::default(),
            provider_tok_s,
            audits,
            audit_backlog,
            ledger,
            history: Mutex::new(VecDeque::with_capacity(BUCKETS)),
            recent_audits: Mutex::new(VecDeque::new()),
        }
    }
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl Metrics {
    /// A fresh set of counters.
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// One HTTP request answered. `route` is the matched route pattern (not
    /// the raw path, which a client controls).
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                status,
            })
            .inc();
    }

    /// A generation starts (its request arrived at `started`); the returned
    /// guard records it when it ends, however it ends.
    pub fn generation(self: &Arc<Self>, started: Instant, prompt_tokens: u64) -> Generation {
        self.active.inc();
        Generation {
            metrics: self.clone(),
            started,
            prompt_tokens,
            completion_tokens: 0,
            first_token: None,
            ended: false,
        }
    }

    /// One job part on `provider` ended: `outcome` is `done`, `failed` or
    /// `cancelled`; `tok_s` is its delivered speed when it produced enough
    /// tokens to measure one.
    pub fn provider_part(
        &self,
        provider: &str,
        outcome: &'static str,
        tokens: u64,
        tok_s: Option<f64>,
    ) {
        let provider = self.provider_label(provider);
        let label = ProviderLabels {
            provider: provider.clone(),
        };
        self.provider_jobs
            .get_or_create(&ProviderJobLabels { provider, outcome })
            .inc();
        self.provider_tokens.get_or_create(&label).inc_by(tokens);
        if let Some(t) = tok_s {
            self.provider_tok_s.get_or_create(&label).set(t);
        }
    }

    /// The label value of `provider`: its own while fewer than
    /// [`MAX_PROVIDER_LABELS`] providers have one, else "other".
    fn provider_label(&self, provider: &str) -> String {
        let Ok(mut labelled) = self.labelled.lock() else {
            return "other".into();
        };
        if labelled.contains(provider) {
            return provider.to_string();
        }
        if labelled.len() < MAX_PROVIDER_LABELS {
            labelled.insert(provider.to_string());
            return provider.to_string();
        }
        "other".into()
    }

    /// An answer's audit verdict; real audits (not `NotAudited`) are also
    /// kept among the recent ones.
    pub fn audit(&self, verdict: Verdict, record: Option<AuditRecord>) {
        self.audits
            .get_or_create(&VerdictLabels {
                verdict: verdict.label(),
            })
            .inc();
        if let (Some(r), Ok(mut recent)) = (record, self.recent_audits.lock()) {
            if recent.len() == RECENT_AUDITS {
                recent.pop_back();
            }
            recent.push_front(r);
        }
    }

    /// Audits queued or running now.
    pub fn set_audit_backlog(&self, n: usize) {
        self.audit_backlog.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Audits queued or running, as last set.
    pub fn audit_backlog(&self) -> i64 {
        self.audit_backlog.get()
    }

    /// Answers counted per verdict so far.
    pub fn audit_counts(&self) -> [(Verdict, u64); 3] {
        [Verdict::Passed, Verdict::Failed, Verdict::NotAudited].map(|v| {
            let n = self
                .audits
                .get_or_create(&VerdictLabels { verdict: v.label() })
                .get();
            (v, n)
        })
    }

    /// The most recent audits, newest first.
    pub fn recent_audits(&self) -> Vec<AuditRecord> {
        self.recent_audits
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Set the ledger totals shown on `/metrics` (micro-credits).
    pub fn set_ledger(&self, totals: &[(&'static str, i64)]) {
        for &(account, value) in totals {
            self.ledger
                .get_or_create(&LedgerLabels { account })
                .set(value);
        }
    }

    /// Generations in progress now.
    pub fn active(&self) -> i64 {
        self.active.get()
    }

    /// Everything, in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Buckets of the last `window`, oldest first, with empty ones filled in
    /// (the current, still filling bucket last).
    pub fn history(&self, window: Duration) -> Vec<Bucket> {
        let now_s = now().as_secs() / BUCKET_S * BUCKET_S;
        let n = (window.as_secs() / BUCKET_S).clamp(1, BUCKETS as u64);
        let first = now_s - (n - 1) * BUCKET_S;
        let kept: Vec<Bucket> = self
            .history
            .lock()
            .map(|h| h.iter().filter(|b| b.start_s >= first).cloned().collect())
            .unwrap_or_default();
        (0..n)
            .map(|i| {
                let start_s = first + i * BUCKET_S;
                let mut b = kept
                    .iter()
                    .find(|b| b.start_s == start_s)
                    .cloned()
                    .unwrap_or(Bucket {
                        start_s,
                        ..Bucket::default()
                    });
                b.ttft_ms = (b.ttft_n > 0).then(|| b.ttft_sum_ms / b.ttft_n as f64);
                b.latency_ms = (b.latency_n > 0).then(|| b.latency_sum_ms / b.latency_n as f64);
                b
            })
            .collect()
    }

    fn record(&self, g: &Generation, outcome: Outcome) {
        let elapsed = g.started.elapsed();
        self.generations
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
        self.tokens
            .get_or_create(&KindLabels { kind: "prompt" })
            .inc_by(g.prompt_tokens);
        self.tokens
            .get_or_create(&KindLabels { kind: "completion" })
            .inc_by(g.completion_tokens);
        if let Some(t) = g.first_token {
            self.ttft.observe(t.as_secs_f64());
        }
        if outcome == Outcome::Completed {
            self.duration.observe(elapsed.as_secs_f64());
        }
        let Ok(mut history) = self.history.lock() else {
            return;
        };
        let start_s = now().as_secs() / BUCKET_S * BUCKET_S;
        if history.back().is_none_or(|b| b.start_s != start_s) {
            if history.len() == BUCKETS {
                history.pop_front();
            }
            history.push_back(Bucket {
                start_s,
                ..Bucket::default()
            });
        }
        if let Some(b) = history.back_mut() {
            b.requests += 1;
            b.failed += u64::from(outcome == Outcome::Failed);
            b.prompt_tokens += g.prompt_tokens;
            b.completion_tokens += g.completion_tokens;
            if let Some(t) = g.first_token {
                b.ttft_n += 1;
                b.ttft_sum_ms += t.as_secs_f64() * 1e3;
            }
            if outcome == Outcome::Completed {
                b.latency_n += 1;
                b.latency_sum_ms += elapsed.as_secs_f64() * 1e3;
            }
        }
    }
}

/// One generation in progress; records itself when finished or dropped
/// (dropped unfinished = the client went away).
pub struct Generation {
    metrics: Arc<Metrics>,
    started: Instant,
    prompt_tokens: u64,
    completion_tokens: u64,
    first_token: Option<Duration>,
    ended: bool,
}

impl Generation {
    /// The metrics it records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// One more generated token.
    pub fn token(&mut self) {
        if self.first_token.is_none() {
            self.first_token = Some(self.started.elapsed());
        }
        self.completion_tokens += 1;
    }

    /// The generation ended; `completion_tokens` is the final usage when
    /// known (it may count a token that was not streamed).
    pub fn finish(&mut self, outcome: Outcome, completion_tokens: Option<u64>) {
        if self.ended {
            return;
        }
        self.ended = true;
        if let Some(n) = completion_tokens {
            self.completion_tokens = self.completion_tokens.max(n);
        }
        self.metrics.record(self, outcome);
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.ended {
            self.ended = true;
            self.metrics.record(self, Outcome::Abandoned);
        }
        self.metrics.active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_is_counted_once_and_leaves_the_active_gauge() {
        let m = Metrics::new();
        let mut g = m.generation(Instant::now(), 7);
        assert_eq!(m.active(), 1);
        g.token();
        g.token();
        g.finish(Outcome::Completed, Some(3));
        g.finish(Outcome::Failed, None);
        drop(g);
        assert_eq!(m.active(), 0);
        let text = m.encode();
        assert!(
            text.contains("tessera_generations_total{outcome=\"completed\"} 1"),
            "{text}"
        );
        assert!(!text.contains("outcome=\"failed\""), "{text}");
        assert!(
            text.contains("tessera_tokens_total{kind=\"prompt\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("tessera_tokens_total{kind=\"completion\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("tessera_time_to_first_token_seconds_count 1"),
            "{text}"
        );
        let last = m.history(Duration::from_secs(60)).pop().unwrap();
        assert_eq!((last.requests, last.completion_tokens), (1, 3));
        assert!(last.ttft_ms.is_some() && last.latency_ms.is_some());
    }

    #[test]
    fn a_dropped_generation_counts_as_abandoned() {
        let m = Metrics::new();
        let mut g = m.generation(Instant::now(), 2);
        g.token();
        drop(g);
        let text = m.encode();
        assert!(
            text.contains("tessera_generations_total{outcome=\"abandoned\"} 1"),
            "{text}"
        );
        // Abandoned answers have no duration.
        assert!(
            text.contains("tessera_generation_duration_seconds_count 0"),
            "{text}"
        );
        assert_eq!(m.active(), 0);
    }

    #[test]
    fn history_fills_gaps_and_keeps_its_window() {
        let m = Metrics::new();
        let h = m.history(Duration::from_secs(120));
        assert_eq!(h.len(), 12);
        assert!(h
            .windows(2)
            .all(|w| w[1].start_s == w[0].start_s + BUCKET_S));
        assert!(h.iter().all(|b| b.requests == 0 && b.ttft_ms.is_none()));
    }

    #[test]
    fn only_real_audits_are_kept_as_recent() {
        let m = Metrics::new();
        m.audit(Verdict::NotAudited, None);
        m.audit(
            Verdict::Failed,
            Some(AuditRecord {
                job: "j".into(),
                provider: "p".into(),
                verdict: Verdict::Failed,
                at_ms: 1,
                reason: "logprobs differ".into(),
            }),
        );
        assert_eq!(m.recent_audits().len(), 1);
        assert_eq!(
            m.audit_counts(),
            [
                (Verdict::Passed, 0),
                (Verdict::Failed, 1),
                (Verdict::NotAudited, 1)
            ]
        );
    }

    /// A sybil flood of providers that each served a part makes at most
    /// MAX_PROVIDER_LABELS label values (the rest fold into "other"), and
    /// the providers labelled first keep their own.
    #[test]
    fn provider_labels_are_bounded() {
        let m = Metrics::new();
        m.provider_part("honest", "done", 10, Some(5.0));
        for i in 0..MAX_PROVIDER_LABELS + 300 {
            m.provider_part(&format!("sybil-{i}"), "failed", 1, None);
        }
        m.provider_part("honest", "done", 10, Some(5.0));
        let text = m.encode();
        let values: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("tessera_provider_tokens_total{"))
            .filter_map(|l| l.split("provider=\"").nth(1)?.split('"').next())
            .collect();
        assert!(
            values.len() <= MAX_PROVIDER_LABELS + 1,
            "{} provider label values",
            values.len()
        );
        assert!(
            values.contains("honest") && values.contains("other"),
            "{values:?}"
        );
        assert!(text.contains("tessera_provider_tokens_total{provider=\"honest\"} 20"));
    }
}
