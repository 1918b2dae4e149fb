//! The one harness every end-to-end test uses: it starts the real `tessera`
//! binary on loopback with the real default model, waits for it to write its
//! endpoint.json, and stops it when dropped.
//!
//! The model comes from `$TESSERA_TEST_MODEL` (a GGUF path; `make test` sets
//! it after pulling the default model), or else from the store under
//! `$HOME/.cache/tessera/home`, which `make test` fills.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const MODEL: &str = "smollm2-135m-instruct";

/// Path to the default model's GGUF file.
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TESSERA_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/tessera/home");
    let store = tessera_models::ModelStore::open(&home).expect("model store");
    match store.resolve(MODEL) {
        Ok(m) => m.path,
        Err(e) => panic!(
            "the end-to-end tests need the default model: run `make test`, or \
             `tessera models pull {MODEL}` with TESSERA_HOME={} ({e})",
            home.display()
        ),
    }
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tessera"))
}

/// A running `tessera serve`.
pub struct Server {
    child: Child,
    pub home: tempfile::TempDir,
    /// e.g. `http://127.0.0.1:43123/v1`
    pub api_base: String,
    /// e.g. `http://127.0.0.1:43123`
    pub root: String,
    /// The demo account's API key from endpoint.json.
    pub key: String,
}

impl Server {
    /// Start `tessera serve` with extra flags (slots, context, limits…).
    pub fn start(extra: &[&str]) -> Server {
        let home = tempfile::tempdir().expect("temp home");
        let child = Command::new(binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--model"])
            .arg(model_path())
            .args(extra)
            .env("TESSERA_HOME", home.path())
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tessera serve");
        let mut server = Server {
            child,
            home,
            api_base: String::new(),
            root: String::new(),
            key: String::new(),
        };
        let endpoint = server.home.path().join("endpoint.json");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(bytes) = std::fs::read(&endpoint) {
                if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
                    server.api_base = v["api_base"].as_str().expect("api_base").to_string();
                    server.key = v["api_key"].as_str().expect("api_key").to_string();
                    server.root = server.api_base.trim_end_matches("/v1").to_string();
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("tessera serve exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "tessera serve did not start within 120 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.root)
    }

    /// A client that sends the demo account's key.
    pub fn client(&self) -> reqwest::blocking::Client {
        client_for(&self.key)
    }

    /// POST a JSON body; returns (status, parsed body).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().into_bytes())
    }

    pub fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let resp = self
            .client()
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().expect("body");
        let value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, value)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.client().get(self.url(path)).send().expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().expect("JSON body"))
    }

    /// POST with `"stream": true` and return every `data:` payload in order.
    pub fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let mut resp = self
            .client()
            .post(self.url(path))
            .json(body)
            .send()
            .expect("request");
        assert_eq!(resp.status().as_u16(), 200, "stream request failed");
        let ct = resp.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        let mut text = String::new();
        resp.read_to_string(&mut text).expect("read stream");
        sse_data(&text)
    }

    /// Block until `/health` reports no active or waiting requests.
    pub fn wait_idle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let (_, h) = self.get("/health");
            if h["backend"]["active"] == 0 && h["backend"]["waiting"] == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Ask the server to stop (SIGTERM) and wait for it (its grace period
    /// for answers in flight and the closing of their bills included).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Anything that serves the API: `tessera serve`, a devnet's gateway, a
/// gateway. Lets one suite run against each.
pub trait Target {
    /// e.g. `http://127.0.0.1:43123`
    fn root(&self) -> String;
    /// The demo account's key.
    fn api_key(&self) -> String;

    /// POST raw bytes as JSON; returns (status, parsed body).
    fn post_bytes(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let resp = client_for(&self.api_key())
            .post(format!("{}{path}", self.root()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().expect("body");
        let value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
        (status, value)
    }

    /// POST a JSON body.
    fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_bytes(path, body.to_string().into_bytes())
    }

    /// GET with the key.
    fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = client_for(&self.api_key())
            .get(format!("{}{path}", self.root()))
            .send()
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().expect("JSON body"))
    }
}

impl Target for Server {
    fn root(&self) -> String {
        self.root.clone()
    }
    fn api_key(&self) -> String {
        self.key.clone()
    }
}

impl Target for Devnet {
    fn root(&self) -> String {
        self.api_base.trim_end_matches("/v1").to_string()
    }
    fn api_key(&self) -> String {
        self.key.clone()
    }
}

/// A client that sends no key (for `/health`, and to check refusals).
/// `/api/status` of the gateway at `base` (its URL without `/v1`) as its
/// operator sees it (with the token from the endpoint.json at `endpoint`).
pub fn operator_status(base: &str, endpoint: &std::path::Path) -> Value {
    let v: Value = serde_json::from_slice(&std::fs::read(endpoint).expect("endpoint.json"))
        .expect("endpoint.json is JSON");
    let token = v["operator_token"].as_str().expect("an operator token");
    let s: Value = client()
        .get(format!("{}/api/status", base.trim_end_matches("/v1")))
        .bearer_auth(token)
        .send()
        .expect("status")
        .json()
        .expect("status JSON");
    assert_eq!(s["view"], "operator", "{s}");
    s
}

/// Wait until each of `nodes` has finished a job (its first canary, at
/// least) according to the operator status `status` returns; until then a
/// provider is on trial and ranks like a full one, so sequential requests
/// would not reach it. Returns the last status when time runs out.
pub fn wait_proven(
    status: impl Fn() -> Value,
    nodes: &[String],
    within: Duration,
) -> Result<(), Value> {
    let deadline = Instant::now() + within;
    loop {
        let s = status();
        let done = |node: &String| {
            s["providers"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["node"] == node.as_str()))
                .and_then(|p| p["jobs_done"].as_u64())
                .is_some_and(|n| n > 0)
        };
        if nodes.iter().all(done) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The node id a provider started in `home` wrote to its `provider.json`.
pub fn provider_node(home: &std::path::Path) -> String {
    let v: Value = serde_json::from_slice(&std::fs::read(home.join("provider.json")).unwrap())
        .expect("provider.json is JSON");
    v["node"].as_str().expect("a node id").to_string()
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client")
}

/// A client that sends `key` as its bearer token.
pub fn client_for(key: &str) -> reqwest::blocking::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().expect("header"),
    );
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .default_headers(headers)
        .build()
        .expect("client")
}

/// The `data:` payloads of a server-sent-event body.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(str::to_string)
        .collect()
}

/// A chat request for the default model.
pub fn chat(content: &str, extra: Value) -> Value {
    let mut body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

/// Check an error body has OpenAI's shape; returns the error object.
pub fn assert_openai_error(body: &Value) -> &Value {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "no message in {body}"
    );
    assert!(e["type"].is_string(), "no type in {body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "param/code missing in {body}"
    );
    e
}

/// Poll `GET {jobs_url}` (a `/v1/jobs/{id}` URL) until its audit is no
/// longer pending (at most 120 s) and return the report.
pub fn final_audit(client: &reqwest::blocking::Client, jobs_url: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let resp = client.get(jobs_url).send().unwrap();
        assert_eq!(resp.status(), 200, "GET {jobs_url}");
        let v: Value = resp.json().unwrap();
        if v["audit"] != "pending" {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "audit at {jobs_url} still pending: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Gateways audit by default. A test about audits says `--audit` (taken
/// off: it is the default); every other one runs with `--no-audit`, which
/// keeps `make test` short on 2 cores (an auditor is a second engine).
/// `--default-audit` asks for exactly what a user gets with no flag.
pub fn audit_flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let wants = |f: &str| extra.contains(&f);
    let mut out: Vec<&str> = extra
        .iter()
        .copied()
        .filter(|f| *f != "--audit" && *f != "--default-audit")
        .collect();
    if !wants("--audit") && !wants("--default-audit") {
        out.push("--no-audit");
    }
    out
}

/// A running `tessera devnet`: a gateway and providers as separate processes.
pub struct Devnet {
    child: Child,
    pub home: tempfile::TempDir,
    pub api_base: String,
    pub key: String,
    pub ticket: String,
    /// (pid, node id) of each provider the devnet started.
    pub providers: Vec<(u32, String)>,
    /// Home folder of each of those providers (restarting a provider there
    /// brings it back with the same node key).
    pub provider_homes: Vec<PathBuf>,
}

impl Devnet {
    pub fn start(providers: usize) -> Devnet {
        Devnet::start_with(providers, &[])
    }

    /// `tessera devnet` with extra flags (e.g. `--audit`).
    pub fn start_with(providers: usize, extra: &[&str]) -> Devnet {
        Devnet::start_env(providers, extra, &[])
    }

    /// `tessera devnet` with extra flags and environment (which its gateway
    /// and providers inherit, e.g. `TESSERA_FRAME_DEADLINE`).
    pub fn start_env(providers: usize, extra: &[&str], env: &[(&str, &str)]) -> Devnet {
        let extra = audit_flags(extra);
        let home = tempfile::tempdir().expect("temp home");
        let child = Command::new(binary())
            .args([
                "devnet",
                "--listen",
                "127.0.0.1:0",
                "--threads",
                "1",
                "--slots",
                "4",
            ])
            .args(["--providers", &providers.to_string(), "--model"])
            .arg(model_path())
            .args(extra)
            .envs(env.iter().copied())
            .env("TESSERA_HOME", home.path())
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tessera devnet");
        let mut net = Devnet {
            child,
            home,
            api_base: String::new(),
            key: String::new(),
            ticket: String::new(),
            providers: vec![],
            provider_homes: vec![],
        };
        let endpoint = net.home.path().join("endpoint.json");
        let deadline = Instant::now() + Duration::from_secs(180);
        let v: Value = loop {
            if let Some(v) = std::fs::read(&endpoint)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                break v;
            }
            if let Ok(Some(status)) = net.child.try_wait() {
                panic!("tessera devnet exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the devnet did not start within 180 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        net.api_base = v["api_base"].as_str().unwrap().to_string();
        net.ticket = v["ticket"].as_str().unwrap().to_string();
        net.key = v["api_key"].as_str().expect("api_key").to_string();
        net.provider_homes = v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| PathBuf::from(p["home"].as_str().unwrap()))
            .collect();
        net.providers = v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["pid"].as_u64().unwrap() as u32,
                    p["node"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        net
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_base.trim_end_matches("/v1"))
    }

    pub fn client(&self) -> reqwest::blocking::Client {
        client_for(&self.key)
    }

    /// `/api/status` as the devnet's operator sees it (audit figures too).
    pub fn operator_status(&self) -> Value {
        operator_status(&self.api_base, &self.home.path().join("endpoint.json"))
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client()
            .post(self.url(path))
            .json(body)
            .send()
            .expect("request");
        let status = resp.status().as_u16();
        (status, resp.json().expect("JSON body"))
    }

    /// Node ids the gateway lists as connected.
    pub fn listed(&self) -> Vec<String> {
        listed(&self.url("/health"))
    }

    /// Wait until the gateway lists exactly `n` providers.
    pub fn wait_listed(&self, n: usize, within: Duration) -> bool {
        wait_listed(&self.url("/health"), n, within)
    }
}

/// Node ids of the providers a gateway's `/health` lists as connected.
pub fn listed(health_url: &str) -> Vec<String> {
    let Ok(v) = client()
        .get(health_url)
        .send()
        .and_then(|r| r.json::<Value>())
    else {
        return vec![];
    };
    v["backend"]["providers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["node"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Wait until a gateway lists exactly `n` providers.
pub fn wait_listed(health_url: &str, n: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if listed(health_url).len() == n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

impl Drop for Devnet {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start a `tessera provider` for the gateway `ticket`, with its home at
/// `home` (the same home means the same node key).
pub fn spawn_provider(ticket: &str, home: &std::path::Path, slots: usize) -> Child {
    spawn_provider_with(ticket, home, slots, &[])
}

/// `spawn_provider` with extra flags (prices, …).
pub fn spawn_provider_with(
    ticket: &str,
    home: &std::path::Path,
    slots: usize,
    extra: &[&str],
) -> Child {
    Command::new(binary())
        .args([
            "provider",
            "--gateway",
            ticket,
            "--bind",
            "127.0.0.1:0",
            "--threads",
            "1",
        ])
        .args(["--slots", &slots.to_string(), "--model"])
        .arg(model_path())
        .args(extra)
        .env("TESSERA_HOME", home)
        .env("TESSERA_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("start tessera provider")
}

/// Run `tessera ARGS…` to completion with `home`; returns stdout, panics
/// with its stderr when it fails.
pub fn tessera(home: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(binary())
        .args(args)
        .env("TESSERA_HOME", home)
        .env("TESSERA_LOG", "error")
        .output()
        .expect("run tessera");
    assert!(
        out.status.success(),
        "tessera {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tessera ARGS… --json`, parsed.
pub fn tessera_json(home: &std::path::Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = tessera(home, &all);
    serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("not JSON: {out}"))
}

/// Send a signal to a process by pid.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// A running `tessera gateway` (no providers of its own) with a demo
/// account.
pub struct Gateway {
    pub child: Child,
    pub home: tempfile::TempDir,
    pub api_base: String,
    pub ticket: String,
    pub key: String,
    extra: Vec<String>,
}

/// The home folder of this test binary's network operator (`tessera
/// network init` ran there once), which certifies every gateway
/// [`Gateway::start`] starts.
pub fn operator_home() -> &'static std::path::Path {
    static HOME: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        let home = tempfile::tempdir().expect("operator home");
        tessera(home.path(), &["network", "init"]);
        home
    })
    .path()
}

/// Certify the gateway whose home is `home` by the test operator, through
/// the CLI an operator uses: `tessera gateway --print-id` and `tessera
/// network certify NODEID --out HOME/gateway.cert`.
pub fn certify(home: &std::path::Path) {
    let node = tessera(home, &["gateway", "--print-id"]);
    let out = home.join("gateway.cert");
    tessera(
        operator_home(),
        &[
            "network",
            "certify",
            node.trim(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
}

impl Gateway {
    /// Start a gateway on loopback with extra flags (e.g. `--join TICKET`),
    /// certified by the test network's operator.
    pub fn start(extra: &[&str]) -> Gateway {
        let home = tempfile::tempdir().expect("temp home");
        certify(home.path());
        Self::start_in(home, extra)
    }

    /// Start a gateway nobody certified (a stranger's).
    pub fn start_uncertified(extra: &[&str]) -> Gateway {
        Self::start_in(tempfile::tempdir().expect("temp home"), extra)
    }

    /// Start a gateway in `home` (which may hold a gateway.cert).
    pub fn start_in(home: tempfile::TempDir, extra: &[&str]) -> Gateway {
        let extra: Vec<String> = audit_flags(extra).iter().map(|s| s.to_string()).collect();
        let (child, v) = Self::spawn(home.path(), "127.0.0.1:0", &extra);
        Gateway {
            child,
            home,
            api_base: v["api_base"].as_str().unwrap().to_string(),
            ticket: v["ticket"].as_str().unwrap().to_string(),
            key: v["api_key"].as_str().expect("api_key").to_string(),
            extra,
        }
    }

    fn spawn(home: &std::path::Path, bind: &str, extra: &[String]) -> (Child, Value) {
        let endpoint = home.join("endpoint.json");
        let _ = std::fs::remove_file(&endpoint);
        let mut child = Command::new(binary())
            .args(["gateway", "--listen", "127.0.0.1:0", "--bind", bind])
            .arg("--demo-account")
            .arg("--model")
            .arg(model_path())
            .args(extra)
            .env("TESSERA_HOME", home)
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tessera gateway");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = std::fs::read(&endpoint)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                return (child, v);
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("tessera gateway exited early: {status}");
            }
            assert!(Instant::now() < deadline, "the gateway did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill the gateway with SIGKILL and start it again in the same home
    /// (same node key, same ledger) on the same UDP address, so providers
    /// redialling its ticket find it.
    pub fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (node, addrs) = self.ticket.split_once('@').expect("ticket");
        let addrs = addrs.split('#').next().expect("addresses");
        let bind = addrs.split('+').next().expect("an address").to_string();
        let (child, v) = Self::spawn(self.home.path(), &bind, &self.extra);
        self.child = child;
        self.api_base = v["api_base"].as_str().unwrap().to_string();
        let ticket = v["ticket"].as_str().unwrap();
        assert!(ticket.starts_with(&format!("{node}@{bind}")), "{ticket}");
        assert_eq!(v["api_key"].as_str(), Some(self.key.as_str()));
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_base.trim_end_matches("/v1"))
    }

    pub fn client(&self) -> reqwest::blocking::Client {
        client_for(&self.key)
    }

    /// `/api/status` as this gateway's operator sees it.
    pub fn operator_status(&self) -> Value {
        operator_status(&self.api_base, &self.home.path().join("endpoint.json"))
    }

    /// Where this gateway keeps its ledger (another gateway may share it).
    pub fn database_url(&self) -> String {
        format!("sqlite://{}", self.home.path().join("ledger.db").display())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Child processes killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves nothing running.
pub struct KillOnDrop(pub Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Debian's chromium (or another Chromium on PATH).
pub fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
        {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !path.is_empty() {
                return PathBuf::from(path);
            }
        }
    }
    panic!("no Chromium found: `make test` installs Debian's `chromium` (scripts/deps.sh)");
}

/// Run headless Chromium on `url` with the flags a sandboxed root machine
/// needs, letting the page's script run for a while first; returns stdout.
pub fn headless(url: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success(), "chromium failed: {status}");
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().expect("reader")
}

/// The page at `url` as headless Chromium leaves it after its scripts ran.
pub fn headless_dom(url: &str) -> String {
    headless(url, &["--dump-dom"])
}
