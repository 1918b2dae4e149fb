//! `tessera models …` through the real binary: pulling the default model
//! with pip, listing, and refusing corrupt or foreign files.

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
