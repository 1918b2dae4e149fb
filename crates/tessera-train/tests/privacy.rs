//! The privacy accountant against Google's `dp-accounting` package (PyPI,
//! installed in the test clients' virtualenv): the same Poisson-subsampled
//! Gaussian rounds give the same ε within 1%.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tessera_train::privacy::Accountant;

/// (sampling rate, noise multiplier, rounds, δ): client sampling from 1%
/// to all, noise from below 1 to 5, tens to a thousand rounds.
const CASES: &[(f64, f64, u32, f64)] = &[
    (0.1, 1.0, 100, 1e-5),
    (0.01, 1.1, 1000, 1e-5),
    (0.5, 2.0, 20, 1e-5),
    (0.25, 0.8, 30, 1e-5),
    (1.0, 5.0, 50, 1e-6),
    (0.4, 1.3, 10, 1e-3),
];

const SCRIPT: &str = r#"
import json, sys
import dp_accounting
out = []
for q, sigma, rounds, delta in json.loads(sys.argv[1]):
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds))
    out.append(acc.get_epsilon(delta))
print(json.dumps(out))
"#;

#[test]
fn epsilon_agrees_with_dp_accounting_within_one_percent() {
    let python = std::env::var("TESSERA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let cases: Vec<serde_json::Value> = CASES
        .iter()
        .map(|&(q, s, n, d)| serde_json::json!([q, s, n, d]))
        .collect();
    let out = std::process::Command::new(&python)
        .args(["-c", SCRIPT, &serde_json::to_string(&cases).unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("run {python}: {e}"));
    assert!(
        out.status.success(),
        "dp-accounting (in {python}; `make test` installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
    for (&(q, sigma, rounds, delta), want) in CASES.iter().zip(theirs) {
        let mut a = Accountant::default();
        a.compose(q, sigma, rounds);
        let (ours, _) = a.epsilon(delta);
        eprintln!(
            "q {q}, σ {sigma}, {rounds} rounds, δ {delta}: ε {ours:.4} (dp-accounting {want:.4})"
        );
        assert!(
            (ours - want).abs() <= 0.01 * want,
            "q {q}, σ {sigma}, {rounds} rounds, δ {delta}: ours {ours}, dp-accounting {want}"
        );
    }
}
