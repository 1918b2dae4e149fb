//! `tessera bench economics`: does any cheating strategy earn more per job
//! than honest work?
//!
//! Simulated providers serve a stream of jobs, and the gateway's own policy
//! code judges them: the [`Directory`]'s probation, watch, quarantine and
//! bond rules decide which answers are audited ([`Directory::audit_odds`],
//! [`Directory::record_audit`], [`Directory::set_bonded`]), and
//! [`AuditPolicy::slash`] sizes every slash. Money moves as the ledger moves
//! it: an answer is paid its value less the fee when it ends; a failed
//! audit refunds it, slashes the provider's account (never below zero) and,
//! at a quarantine, forfeits the rest. A verdict arrives some jobs after
//! its answer (`--verdict-lag`), so a cheater can act before it is caught.
//!
//! Each strategy's profit is what it was paid, less refunds, slashes and
//! forfeits, less its compute: `--cost-share` of an answer's value for an
//! honest answer, `1 - --saved` of that for a cheated one. The compute a
//! cheat saves comes from measured cost ratios (see the flags' help and
//! BENCHMARKS.md). The figure printed is profit per job offered, relative
//! to an honest provider's; a quarantined provider earns nothing more.

use clap::Args;
use std::collections::VecDeque;
use std::sync::Arc;
use tessera_core::{NodeId, Price};
use tessera_net::audit::AuditPolicy;
use tessera_net::directory::{Directory, Session, Standing};
use tessera_protocol::ModelOffer;

#[derive(Args, Debug)]
pub struct EconomicsBench {
    /// Jobs offered to each strategy.
    #[arg(long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Share of a trusted provider's answers audited (`--audit-rate`).
    #[arg(long, default_value_t = 0.05)]
    pub audit_rate: f64,
    /// Audits to pass before the base rate (`--audit-probation`).
    #[arg(long, default_value_t = 20)]
    pub probation: u32,
    /// Bond in credits (`--bond`).
    #[arg(long, default_value_t = 10.0)]
    pub bond: f64,
    /// Fixed part of a slash in credits (`--slash-penalty`).
    #[arg(long, default_value_t = 1.0)]
    pub slash_penalty: f64,
    /// The gateway's fee in basis points (`--fee-bps`).
    #[arg(long, default_value_t = 500)]
    pub fee_bps: u64,
    /// An honest provider's compute cost as a share of what it charges.
    #[arg(long, default_value_t = 0.5)]
    pub cost_share: f64,
    /// Share of that compute a cheat saves. 0.13: decode with the Q4_0
    /// file (0.63× Q8_0's cost at 8 streams, `bench quality`) plus one
    /// prefill of the real model for a passable proof (0.24 of a
    /// generation, `bench audit`).
    #[arg(long, default_value_t = 0.13)]
    pub saved: f64,
    /// Chance an audit catches a cheated answer. 0.99: the cheat above
    /// (Q4_0 decode, proof from a real prefill) is caught in 99 of 100
    /// audited answers (`bench audit --modes cheaper-model`; the one missed
    /// was a greedy answer the Q4_0 file decoded as the real model does but
    /// for 5 near-ties, which saved its cheater nothing in quality).
    #[arg(long, default_value_t = 0.99)]
    pub detection: f64,
    /// Jobs a provider serves between an answer and its verdict.
    #[arg(long, default_value_t = 8)]
    pub verdict_lag: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// How a simulated provider behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    /// Never cheats.
    Honest,
    /// Cheats on every answer.
    AlwaysCheat,
    /// Knows its own standing exactly: cheats only when its answers are
    /// audited at the base rate, honest on probation and on watch.
    Adaptive,
    /// Honest until it leaves probation, then cheats on every answer.
    AfterProbation,
    /// Adaptive, and after a quarantine comes back under a fresh key.
    Sybil,
    /// Passes probation on its own requests at price 0, then cheats.
    SelfDealing,
    /// Honest until it leaves probation, then cheats on everything for as
    /// long as no verdict has come back, and leaves.
    HitAndRun,
}

const STRATEGIES: [Strategy; 7] = [
    Strategy::Honest,
    Strategy::AlwaysCheat,
    Strategy::Adaptive,
    Strategy::AfterProbation,
    Strategy::Sybil,
    Strategy::SelfDealing,
    Strategy::HitAndRun,
];

/// xorshift64*: reproducible, fast, good enough for a simulation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// An answer waiting for its verdict.
struct Pending {
    due: usize,
    node: NodeId,
    cheated: bool,
    value: u64,
    paid: i64,
}

/// What a strategy ended with.
#[derive(Default)]
struct Outcome {
    paid: i64,
    refunded: i64,
    slashed: i64,
    compute: f64,
    served: usize,
    cheated: usize,
    caught: usize,
    identities: usize,
}

impl Outcome {
    fn profit(&self) -> f64 {
        (self.paid - self.refunded - self.slashed) as f64 - self.compute
    }
}

/// Default prices (micro-credits per token).
const PRICE: Price = Price {
    input: 20,
    output: 80,
};

fn session(directory: &Directory, n: u64) -> NodeId {
    let mut bytes = [7u8; 32];
    bytes[..8].copy_from_slice(&n.to_le_bytes());
    let node = NodeId::from_bytes(bytes);
    directory.join(Session {
        node,
        node_hex: node.to_string(),
        id: n,
        conn: None,
        offers: vec![ModelOffer {
            sha256: "ab".repeat(32),
            alias: "model".into(),
            context_length: 4096,
            price: PRICE,
        }],
        slots: 4,
        hardware: String::new(),
    });
    node
}

fn simulate(b: &EconomicsBench, policy: &AuditPolicy, strategy: Strategy) -> Outcome {
    let directory = Arc::new(Directory::default());
    let mut rng = Rng(b.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = Outcome {
        identities: 1,
        ..Outcome::default()
    };
    let mut node = session(&directory, 1);
    // The current identity's account at the ledger, its audits passed,
    // and where its strategy stands.
    let mut balance: i64 = 0;
    let mut passed = 0u32;
    let mut quarantined = false;
    let mut started = false;
    let mut left = false;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let fee = |v: u64| (v as i128 * b.fee_bps as i128 / 10_000) as i64;
    for job in 0..=b.jobs {
        // Verdicts due by now (after the last job: all of them).
        while pending
            .front()
            .is_some_and(|p| p.due <= job || job == b.jobs)
        {
            let Some(p) = pending.pop_front() else { break };
            let failed = p.cheated && rng.unit() < b.detection;
            let standing = directory.record_audit(&p.node, !failed);
            // Verdicts of an identity already abandoned cost it nothing more
            // than its account there, which is gone with it.
            let current = p.node == node;
            if failed {
                out.caught += 1;
                if current {
                    out.refunded += p.paid;
                    balance -= p.paid;
                    let slash = (policy.slash(p.value) as i64).min(balance.max(0));
                    out.slashed += slash;
                    balance -= slash;
                    if standing == Standing::Quarantined {
                        out.slashed += balance.max(0);
                        balance = balance.min(0);
                        quarantined = true;
                    }
                }
            } else if current {
                passed += 1;
            }
            directory.set_bonded(&p.node, balance >= policy.bond as i64);
        }
        if job == b.jobs {
            break;
        }
        if quarantined {
            if strategy != Strategy::Sybil {
                continue;
            }
            // A fresh key: a new identity, nothing at stake, all to prove.
            out.identities += 1;
            node = session(&directory, out.identities as u64);
            (balance, passed, quarantined, started) = (0, 0, false, false);
        }
        if left {
            continue;
        }
        // Audited at the base rate: out of probation, bonded, not on watch.
        let odds = directory.audit_odds(&node, policy.base_rate, policy.probation, policy.bond > 0);
        let trusted = odds < 1.0;
        let self_dealing = strategy == Strategy::SelfDealing && passed < policy.probation;
        let cheat = match strategy {
            Strategy::Honest => false,
            Strategy::AlwaysCheat => true,
            Strategy::Adaptive | Strategy::Sybil => trusted,
            Strategy::AfterProbation => {
                started |= trusted;
                started
            }
            Strategy::SelfDealing => !self_dealing,
            Strategy::HitAndRun => {
                if started && out.caught > 0 {
                    left = true;
                    continue;
                }
                started |= trusted;
                started
            }
        };
        // The answer: prompts and outputs vary as real requests do.
        let worth = PRICE.cost(rng.range(20, 400), rng.range(16, 512));
        let value = if self_dealing { 0 } else { worth };
        let paid = value as i64 - fee(value);
        out.served += 1;
        out.paid += paid;
        balance += paid;
        let work = if cheat { 1.0 - b.saved } else { 1.0 };
        out.compute += b.cost_share * worth as f64 * work;
        if cheat {
            out.cheated += 1;
        }
        if rng.unit() < odds {
            pending.push_back(Pending {
                due: job + b.verdict_lag,
                node,
                cheated: cheat,
                value,
                paid,
            });
        }
    }
    out
}

pub fn run(b: EconomicsBench) -> anyhow::Result<()> {
    let micro = crate::network::micro_credits;
    let policy = AuditPolicy {
        base_rate: b.audit_rate.clamp(1e-6, 1.0),
        probation: b.probation,
        bond: micro(b.bond),
        slash_penalty: micro(b.slash_penalty),
    };
    println!(
        "tessera bench economics: {} jobs per strategy; audit rate {}, probation {}, bond {} credits, slash = value / rate + {} credits, fee {} bps",
        b.jobs, policy.base_rate, policy.probation, b.bond, b.slash_penalty, b.fee_bps
    );
    println!(
        "  compute {:.0}% of the price; a cheat saves {:.0}% of it; detection {:.0}%; verdicts {} jobs late",
        b.cost_share * 100.0,
        b.saved * 100.0,
        b.detection * 100.0,
        b.verdict_lag
    );
    let honest = simulate(&b, &policy, Strategy::Honest);
    let base = honest.profit() / b.jobs as f64;
    let base_served = honest.profit() / honest.served.max(1) as f64;
    println!();
    println!("| strategy | served | cheated | caught | identities | paid | refunded | slashed | profit / job offered | vs honest | profit / job served | vs honest |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in STRATEGIES {
        let o = simulate(&b, &policy, s);
        let per_job = o.profit() / b.jobs as f64;
        let per_served = o.profit() / o.served.max(1) as f64;
        println!(
            "| {s:?} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.3} | {:.1} | {:.3} |",
            o.served,
            o.cheated,
            o.caught,
            o.identities,
            o.paid,
            o.refunded,
            o.slashed,
            per_job,
            per_job / base,
            per_served,
            per_served / base_served
        );
    }
    println!();
    println!("(money in micro-credits; profit = paid − refunded − slashed − compute; a provider quarantined earns nothing for the jobs left)");
    Ok(())
}
