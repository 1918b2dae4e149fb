//! `tessera bench diloco`: DiLoCo over real worker processes against one
//! process training the same model on the same tokens.
//!
//! 1. A devnet (`tessera devnet --diloco-demo --json`) with `--workers`
//!    worker processes, `--slow-workers` of them at half speed, runs one
//!    task: the validation loss after each outer step, bytes both ways,
//!    utilization, audits.
//! 2. With `--churn`, the same again with a worker SIGKILLed a third of the
//!    way through and a new one joining two thirds of the way: the loss
//!    penalty.
//! 3. The baseline: AdamW in one process with a batch of all workers'
//!    windows (what per-step synchronous data parallelism computes), for as
//!    many tokens as the workers trained on, the same schedule and the
//!    learning rate `--baseline-lr` (by default the workers' inner one).
//!
//! It prints both loss curves, the bytes ratio (per-step data parallelism
//! at fp32 ÷ DiLoCo, both ways), utilization and audit cost; `--chart`
//! writes the curves as an SVG; `--json` ends with one JSON line.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use tessera_train::corpus::{Corpus, FORTUNES_DIR, VAL_SHARE};
use tessera_train::diloco::{Baseline, InnerOptimizer};
use tessera_train::lm::LmSpec;

#[derive(Args, Debug)]
pub struct DilocoBench {
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Of which this many at half speed.
    #[arg(long, default_value_t = 1)]
    pub slow_workers: usize,
    /// Outer steps.
    #[arg(long, default_value_t = 16)]
    pub outer_steps: u32,
    /// Inner steps per outer step (H).
    #[arg(long, default_value_t = 400)]
    pub inner_steps: u32,
    /// Warm-up: H starts here and doubles each outer step.
    #[arg(long)]
    pub first_inner_steps: Option<u32>,
    /// Peak inner learning rate.
    #[arg(long, default_value_t = 3e-3)]
    pub inner_lr: f32,
    /// Outer learning rate.
    #[arg(long, default_value_t = 0.85)]
    pub outer_lr: f32,
    /// Outer Nesterov momentum.
    #[arg(long, default_value_t = 0.5)]
    pub outer_momentum: f32,
    /// Windows per inner step per worker (the baseline's batch is the
    /// workers' together).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Peak learning rate of the baseline.
    #[arg(long, default_value_t = 3e-3)]
    pub baseline_lr: f32,
    /// Share of (worker, outer step) pairs audited.
    #[arg(long, default_value_t = 0.08)]
    pub audit_rate: f64,
    /// Model width (context 32, 2 layers, 4 heads).
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Also run with a worker killed and a new one joining.
    #[arg(long)]
    pub churn: bool,
    /// Skip the baseline (the DiLoCo figures only).
    #[arg(long)]
    pub no_baseline: bool,
    /// Write the loss curves as an SVG chart here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// End with one JSON line.
    #[arg(long)]
    pub json: bool,
}

fn devnet(home: &Path, b: &DilocoBench, churn: bool) -> anyhow::Result<Value> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(&exe)
        .args([
            "devnet",
            "--diloco-demo",
            "--json",
            "--listen",
            "127.0.0.1:18081",
        ])
        .args(["--providers", &b.workers.to_string()])
        .args(["--slow-workers", &b.slow_workers.to_string()])
        .args(["--outer-steps", &b.outer_steps.to_string()])
        .args(["--inner-steps", &b.inner_steps.to_string()])
        .args(["--inner-lr", &b.inner_lr.to_string()])
        .args(["--outer-lr", &b.outer_lr.to_string()])
        .args(["--outer-momentum", &b.outer_momentum.to_string()])
        .args(["--batch", &b.batch.to_string()])
        .args(["--audit-rate", &b.audit_rate.to_string()])
        .args(["--width", &b.width.to_string()])
        .args(churn.then_some("--churn"))
        .args(
            b.first_inner_steps
                .iter()
                .flat_map(|f| ["--first-inner-steps".to_string(), f.to_string()]),
        )
        .env("TESSERA_HOME", home)
        .env("TESSERA_LOG", "error")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|_| {
        anyhow::anyhow!(
            "the devnet printed no result: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn run(home: &Path, b: DilocoBench) -> anyhow::Result<()> {
    let spec = LmSpec {
        vocab: 256,
        context: 32,
        width: b.width,
        layers: 2,
        heads: 4,
    };
    println!(
        "DiLoCo: {} worker processes ({} at half speed), a {}-parameter transformer, {} outer steps of H = {}",
        b.workers,
        b.slow_workers,
        spec.parameters(),
        b.outer_steps,
        b.inner_steps
    );
    let started = std::time::Instant::now();
    let d = devnet(home, &b, false)?;
    let diloco_s = started.elapsed().as_secs_f64();
    let val = d["val_loss"].as_f64().context("no validation loss")?;
    let curve: Vec<f64> = d["val_curve"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    let tokens = d["tokens"].as_u64().unwrap_or(0);
    println!(
        "  done in {diloco_s:.0} s: validation loss {val:.4}; {} tokens; {} bytes both ways, {:.0}× less than per-step data parallelism; utilization {:.1}%; {} audits ({} failed), audit cost {:.1}%",
        tokens,
        d["bytes"],
        d["bytes_ratio"].as_f64().unwrap_or(0.0),
        d["utilization"].as_f64().unwrap_or(0.0) * 100.0,
        d["audits"],
        d["audits_failed"],
        d["audit_cost"].as_f64().unwrap_or(0.0) * 100.0
    );
    let churn = if b.churn {
        let c = devnet(home, &b, true)?;
        let cv = c["val_loss"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  with a worker killed after outer step {} and one joining after {}: {} ({}), validation loss {cv:.4}, penalty {:+.4} ({:+.2}%)",
            c["churn"]["killed_after"],
            c["churn"]["joined_after"],
            c["status"],
            c["workers_per_step"],
            cv - val,
            (cv / val - 1.0) * 100.0
        );
        Some(
            json!({"val_loss": cv, "penalty": cv - val, "status": c["status"], "workers_per_step": c["workers_per_step"], "result": c}),
        )
    } else {
        None
    };
    let mut baseline_curve = Vec::new();
    let mut baseline_val = None;
    if !b.no_baseline && tokens > 0 {
        let corpus = Corpus::fortunes(Path::new(FORTUNES_DIR), VAL_SHARE)?;
        let batch = b.batch * b.workers;
        let steps = tokens / (batch * spec.context) as u64;
        let started = std::time::Instant::now();
        let run = Baseline {
            spec,
            steps,
            batch,
            optimizer: InnerOptimizer {
                lr: b.baseline_lr,
                warmup: 100,
                total_steps: steps,
                ..InnerOptimizer::default()
            },
            seed: 1,
            eval_every: steps.div_ceil(u64::from(b.outer_steps.max(1))).max(1),
            val_windows: 256,
        };
        baseline_curve = run.train(&corpus, 2)?;
        baseline_val = baseline_curve.last().map(|(_, l)| *l);
        println!(
            "  baseline (one process, AdamW, batch {batch}, {steps} steps, lr {}): validation loss {:.4} in {:.0} s",
            b.baseline_lr,
            baseline_val.unwrap_or(f64::NAN),
            started.elapsed().as_secs_f64()
        );
        println!("  {:>10}  {:>10}  {:>10}", "tokens", "DiLoCo", "baseline");
        for (k, l) in curve.iter().enumerate() {
            let at = baseline_curve.get(k).map_or(f64::NAN, |(_, v)| *v);
            println!(
                "  {:>10}  {l:>10.4}  {at:>10.4}",
                (k as u64 + 1) * tokens / curve.len().max(1) as u64
            );
        }
    }
    let gap = baseline_val.map(|bv| val / bv - 1.0);
    if let Some(g) = gap {
        println!("  DiLoCo ÷ baseline − 1: {:+.2}% (target ≤ +2%)", g * 100.0);
    }
    if let Some(path) = &b.chart {
        let base: Vec<f64> = baseline_curve.iter().map(|(_, l)| *l).collect();
        std::fs::write(path, chart(&curve, &base, &b))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("  chart: {}", path.display());
    }
    let result = json!({
        "bench": "diloco",
        "workers": b.workers,
        "slow_workers": b.slow_workers,
        "parameters": spec.parameters(),
        "outer_steps": b.outer_steps,
        "inner_steps": b.inner_steps,
        "batch": b.batch,
        "inner_lr": b.inner_lr,
        "outer_lr": b.outer_lr,
        "outer_momentum": b.outer_momentum,
        "baseline_lr": b.baseline_lr,
        "tokens": tokens,
        "val_loss": val,
        "baseline_val_loss": baseline_val,
        "gap": gap,
        "val_curve": curve,
        "baseline_curve": baseline_curve.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
        "bytes": d["bytes"],
        "data_parallel_bytes": d["data_parallel_bytes"],
        "bytes_ratio": d["bytes_ratio"],
        "utilization": d["utilization"],
        "audits": d["audits"],
        "audits_failed": d["audits_failed"],
        "audit_cost": d["audit_cost"],
        "seconds": diloco_s,
        "churn": churn,
    });
    if b.json {
        println!("{result}");
    }
    Ok(())
}

/// Both validation-loss curves over the outer steps, as an SVG.
fn chart(diloco: &[f64], baseline: &[f64], b: &DilocoBench) -> String {
    let (w, h, l, r, t, bot) = (640.0, 360.0, 56.0, 16.0, 36.0, 40.0);
    let all: Vec<f64> = diloco
        .iter()
        .chain(baseline)
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let hi = all.iter().copied().fold(f64::MIN, f64::max).max(0.1);
    let lo = all.iter().copied().fold(f64::MAX, f64::min).min(hi - 0.1);
    let n = diloco.len().max(baseline.len()).max(2);
    let x = |i: usize| l + (w - l - r) * i as f64 / (n - 1) as f64;
    let y = |v: f64| t + (h - t - bot) * (hi - v) / (hi - lo);
    let mut s = String::new();
    let _ = write!(s, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">");
    let _ = write!(s, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = write!(
        s,
        "<text x=\"{l}\" y=\"20\" font-size=\"14\">Validation loss: DiLoCo ({} workers, {} slow, H = {}) vs one process, equal tokens</text>",
        b.workers, b.slow_workers, b.inner_steps
    );
    for g in 0..=4 {
        let v = lo + (hi - lo) * f64::from(g) / 4.0;
        let _ = write!(
            s,
            "<line x1=\"{l}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
            w - r,
            y(v),
            y(v)
        );
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.2}</text>",
            l - 6.0,
            y(v) + 4.0
        );
    }
    let _ = write!(s, "<text x=\"{l}\" y=\"{}\">outer step 1</text>", h - 12.0);
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">outer step {n} (equal tokens)</text>",
        w - r,
        h - 12.0
    );
    for (series, color, name, at) in [
        (diloco, "#1f77b4", "DiLoCo", 0.0),
        (baseline, "#d62728", "baseline", 1.0),
    ] {
        let pts: Vec<String> = series
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            pts.join(" ")
        );
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>",
            w - r - 120.0,
            t + 16.0 + 16.0 * at
        );
    }
    s.push_str("</svg>\n");
    s
}
