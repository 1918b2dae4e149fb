//! Routing policy: which providers may take a job, what the job may cost,
//! and which one takes it. Pure functions over [`Candidate`]s, so the
//! policy is tested without a network and benchmarked at 10,000 providers;
//! the [`crate::directory::Directory`] builds the candidates under its lock
//! and claims the chosen one's slot in the same breath.

use tessera_backend::{JobError, Quote, RoutePrefs, Sort};
use tessera_core::Price;

/// What a job needs from a provider.
#[derive(Clone, Debug)]
pub struct Need<'a> {
    /// The model's sha256.
    pub sha256: &'a str,
    /// Positions the job's prompt takes (the provider's context must be
    /// larger).
    pub tokens: usize,
    /// Sessions that already failed this job (never asked again).
    pub exclude: &'a [u64],
    /// The client's preferences.
    pub prefs: &'a RoutePrefs,
    /// The gateway's own canary job: it may go to a provider that missed
    /// its canaries (never set for a client's job).
    pub probe: bool,
    /// The prompt's cache key and block hashes, to find providers that keep
    /// a prefix of it (`crate::prefix`).
    pub prefix: Option<(u64, &'a [u64])>,
}

/// How much a prompt entirely in a provider's cache counts for in the
/// default ranking, against load (jobs in flight ÷ slots): a provider that
/// keeps the whole prompt wins over an idle one until it is three quarters
/// full.
pub const PREFIX_WEIGHT: f64 = 0.75;

/// What the router weighs about one provider.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    /// Node id, hex (what preferences name).
    pub node: &'a str,
    /// Its session (a reconnected provider is a new session).
    pub session: u64,
    /// Serves the model with room for the prompt (context > tokens).
    pub serves: bool,
    /// Its price for the model.
    pub price: Price,
    /// Its price is above the market cap: only a request naming its own
    /// `max_price` may go to it.
    pub over_market: bool,
    /// Heartbeats recent.
    pub healthy: bool,
    /// Quarantined (caught cheating): never routed to.
    pub quarantined: bool,
    /// Missed its last canaries: routed to only by canaries.
    pub unroutable: bool,
    /// Jobs in flight and slots.
    pub inflight: usize,
    /// Jobs it runs at once, as it announced (a bound on its load).
    pub slots: usize,
    /// Jobs it has been seen to finish with that many in flight: its load
    /// is counted against this, so announcing many slots never makes a
    /// provider look idle.
    pub proven: usize,
    /// Tokens per second per stream the gateway verified (canaries) or
    /// measured on its jobs; never what the provider says of itself.
    pub tok_s: f64,
    /// Moving average of its time to first token (0: not measured yet).
    pub latency_ms: f64,
    /// Audit record × uptime × latency factor, 0–1 (1 before any audit).
    pub reputation: f64,
    /// Its [`trial_term`]: what it has yet to show.
    pub trial: f64,
    /// Share of the prompt it keeps in its KV cache (0–1).
    pub cached: f64,
}

impl Candidate<'_> {
    /// Jobs in flight ÷ the slots it has shown it can run.
    pub fn load(&self) -> f64 {
        self.inflight as f64 / self.proven.clamp(1, self.slots.max(1)) as f64
    }

    fn free(&self) -> bool {
        self.inflight < self.slots
    }
}

/// Whether `c` may take the job at all (slots aside).
pub fn eligible(c: &Candidate<'_>, need: &Need<'_>) -> bool {
    c.serves
        && c.healthy
        && !c.quarantined
        && (need.probe || !c.unroutable)
        && !need.exclude.contains(&c.session)
        && need.prefs.allows(c.node)
        && need.prefs.affords(&c.price)
        && (need.prefs.max_price.is_some() || !c.over_market)
}

/// The prices among providers that may serve the job, slots aside: the
/// highest (per side) is the ceiling the router is then held to; the
/// cheapest one's (by output, then input price) is what the hold is sized
/// by when no provider is free to preview the route with
/// (`Directory::quote`). The error says why none may.
pub fn quote<'a>(
    candidates: impl IntoIterator<Item = Candidate<'a>>,
    need: &Need<'_>,
) -> Result<Quote, JobError> {
    let (mut serving, mut allowed) = (false, false);
    let mut best: Option<Price> = None;
    let mut cheapest: Option<Price> = None;
    for c in candidates {
        if !(c.serves && c.healthy && !c.quarantined && (need.probe || !c.unroutable)) {
            continue;
        }
        serving = true;
        if !need.prefs.allows(c.node) {
            continue;
        }
        allowed = true;
        if need.prefs.affords(&c.price) && (need.prefs.max_price.is_some() || !c.over_market) {
            best = Some(best.map_or(c.price, |b| b.max(c.price)));
            let key = |p: &Price| (p.output, p.input);
            if cheapest.is_none_or(|k| key(&c.price) < key(&k)) {
                cheapest = Some(c.price);
            }
        }
    }
    match (best, serving, allowed) {
        (Some(ceiling), _, _) => {
            let cheapest = cheapest.unwrap_or(ceiling);
            Ok(Quote {
                hold: cheapest,
                cheapest,
                ceiling,
            })
        }
        (None, false, _) => Err(JobError::NoProvider),
        (None, true, false) => Err(JobError::Excluded),
        (None, true, true) => Err(JobError::OverPriceCap),
    }
}

/// The default ranking (lower is better): load (jobs in flight ÷ slots),
/// plus the price term (a quarter at the dearest output price, in
/// proportion), plus half the shortfall of reputation from a perfect 1
/// (counted in hundredths, so near-equal providers still tie), minus
/// [`PREFIX_WEIGHT`] × the share of the prompt the provider keeps cached.
pub fn default_key(load: f64, price_term: f64, reputation: f64, cached: f64) -> f64 {
    load + price_term + reputation_term(reputation) - PREFIX_WEIGHT * cached
}

/// What a provider that has not shown it serves adds to its ranking: 1 (as
/// much as being fully loaded) until it finishes a job, and half as much
/// again for each part it failed since its last finished one (up to 4).
/// Node keys are free, so a provider that says Hello and lets jobs hang
/// gets work only when every proven provider is busy, and less after each
/// job it fails.
pub fn trial_term(done: u64, fails_in_a_row: u32) -> f64 {
    let unproven = if done == 0 { 1.0 } else { 0.0 };
    unproven + 0.5 * f64::from(fails_in_a_row.min(4))
}

/// Reputation's part of [`default_key`]: half its shortfall from 1, in
/// hundredths.
pub fn reputation_term(reputation: f64) -> f64 {
    0.5 * ((1.0 - reputation) * 100.0).round() / 100.0
}

/// Choose among eligible providers with a free slot: the first match of
/// `prefs.order`, else by `prefs.sort`, else by load weighed with price,
/// reputation and cached prefix (load ÷ slots, plus a quarter for the
/// dearest output price, in proportion, plus half the shortfall of its
/// reputation from a perfect 1, counted in hundredths so that near-equal
/// providers still tie, minus [`PREFIX_WEIGHT`] × the share of the prompt
/// it keeps);
/// `turn` rotates ties so equal providers share the work. Returns an index
/// into `candidates`.
pub fn choose(candidates: &[Candidate<'_>], prefs: &RoutePrefs, turn: usize) -> Option<usize> {
    for pattern in &prefs.order {
        if let Some(i) = candidates
            .iter()
            .position(|c| c.free() && RoutePrefs::names(pattern, c.node))
        {
            return Some(i);
        }
    }
    if !prefs.order.is_empty() && !prefs.allow_fallbacks {
        return None;
    }
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let per_price = if prefs.sort.is_none() {
        let dearest = candidates.iter().map(|c| c.price.output).max().unwrap_or(0);
        0.25 / dearest.max(1) as f64
    } else {
        0.0
    };
    let key = |c: &Candidate<'_>| match prefs.sort {
        Some(Sort::Throughput) => -c.tok_s,
        Some(Sort::Latency) if c.latency_ms > 0.0 => c.latency_ms,
        Some(Sort::Latency) => f64::MAX,
        Some(Sort::Price) => c.price.output as f64 * 1e6 + c.price.input as f64 + c.load(),
        None => {
            default_key(
                c.load(),
                per_price * c.price.output as f64,
                c.reputation,
                c.cached,
            ) + c.trial
        }
    };
    // Lower is better; one pass starting at `turn`, so the first of equals
    // changes from call to call.
    let start = turn % n;
    let mut best: Option<(usize, f64)> = None;
    for i in (start..n).chain(0..start) {
        let c = &candidates[i];
        if !c.free() {
            continue;
        }
        let k = key(c);
        if best.is_none_or(|(_, b)| k < b) {
            best = Some((i, k));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(node: &str, load: f64, tok_s: f64, latency_ms: f64) -> Candidate<'_> {
        Candidate {
            node,
            session: 0,
            serves: true,
            price: Price::default(),
            over_market: false,
            healthy: true,
            quarantined: false,
            unroutable: false,
            inflight: (load * 100.0) as usize,
            slots: 100,
            proven: 100,
            tok_s,
            latency_ms,
            reputation: 1.0,
            trial: 0.0,
            cached: 0.0,
        }
    }

    fn prefs() -> RoutePrefs {
        RoutePrefs::any()
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
    fn a_full_provider_is_never_chosen() {
        let mut list = [c("aa", 0.0, 0.0, 0.0), c("bb", 0.5, 0.0, 0.0)];
        list[0].inflight = list[0].slots;
        for t in 0..3 {
            assert_eq!(choose(&list, &prefs(), t), Some(1));
        }
        list[1].inflight = list[1].slots;
        assert_eq!(choose(&list, &prefs(), 0), None);
    }

    #[test]
    fn order_and_fallbacks() {
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
        assert_eq!(choose(&list, &missing, 0), Some(0), "falls back");
        let strict = RoutePrefs {
            allow_fallbacks: false,
            ..missing
        };
        assert_eq!(choose(&list, &strict, 0), None);
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
        list[1].inflight = 75;
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
            assert_eq!(choose(&list, &prefs(), turn), Some(1), "cheaper wins");
        }
        let busy_cheap = [priced("dear", 0.0, 20, 80), priced("cheap", 0.9, 5, 10)];
        assert_eq!(choose(&busy_cheap, &prefs(), 0), Some(0));
        let by_price = RoutePrefs {
            sort: Some(Sort::Price),
            ..prefs()
        };
        assert_eq!(choose(&busy_cheap, &by_price, 0), Some(1), "ignores load");
    }

    #[test]
    fn a_provider_keeping_the_prompt_wins_until_it_is_busy() {
        let mut list = [c("idle", 0.0, 0.0, 0.0), c("keeps", 0.5, 0.0, 0.0)];
        list[1].cached = 1.0;
        for t in 0..3 {
            assert_eq!(choose(&list, &prefs(), t), Some(1));
        }
        list[1].inflight = 90; // 0.9 of its slots
        assert_eq!(choose(&list, &prefs(), 0), Some(0));
        // Explicit sorts ignore the cache.
        list[1].inflight = 0;
        let by_latency = RoutePrefs {
            sort: Some(Sort::Latency),
            ..prefs()
        };
        list[0].latency_ms = 10.0;
        list[1].latency_ms = 20.0;
        assert_eq!(choose(&list, &by_latency, 0), Some(0));
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

    #[test]
    fn eligibility_and_quotes_say_why_nobody_may_serve() {
        let exclude = [7u64];
        let p = prefs();
        let need = Need {
            sha256: "m",
            tokens: 10,
            exclude: &exclude,
            prefs: &p,
            probe: false,
            prefix: None,
        };
        let mut a = c("aa", 0.0, 0.0, 0.0);
        assert!(eligible(&a, &need));
        a.unroutable = true;
        assert!(!eligible(&a, &need));
        assert!(eligible(
            &a,
            &Need {
                probe: true,
                ..need.clone()
            }
        ));
        a.unroutable = false;
        a.session = 7;
        assert!(!eligible(&a, &need), "a session that failed the job");
        a.session = 0;
        a.quarantined = true;
        assert!(!eligible(&a, &need));
        assert!(!eligible(
            &a,
            &Need {
                probe: true,
                ..need.clone()
            }
        ));

        let dear = Candidate {
            price: Price {
                input: 50,
                output: 90,
            },
            ..c("bb", 0.0, 0.0, 0.0)
        };
        let cheap = Candidate {
            price: Price {
                input: 10,
                output: 20,
            },
            ..c("cc", 0.0, 0.0, 0.0)
        };
        assert_eq!(
            quote([dear.clone(), cheap.clone()], &need),
            Ok(Quote {
                hold: Price {
                    input: 10,
                    output: 20
                },
                cheapest: Price {
                    input: 10,
                    output: 20
                },
                ceiling: Price {
                    input: 50,
                    output: 90
                }
            })
        );
        let capped = RoutePrefs {
            max_price: Some(Price {
                input: 10,
                output: 20,
            }),
            ..prefs()
        };
        let capped_need = Need {
            prefs: &capped,
            ..need.clone()
        };
        let within = Price {
            input: 10,
            output: 20,
        };
        assert_eq!(
            quote([dear.clone(), cheap], &capped_need),
            Ok(Quote {
                hold: within,
                cheapest: within,
                ceiling: within
            })
        );
        assert_eq!(
            quote([dear.clone()], &capped_need),
            Err(JobError::OverPriceCap)
        );
        assert_eq!(quote([], &need), Err(JobError::NoProvider));
        let only = RoutePrefs {
            only: vec!["zz".into()],
            ..prefs()
        };
        assert_eq!(
            quote(
                [dear],
                &Need {
                    prefs: &only,
                    ..need
                }
            ),
            Err(JobError::Excluded)
        );
    }
}
