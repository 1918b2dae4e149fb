//! Paying for inference, end to end: keys, escrow, exact charges, 402/429,
//! idempotency and the books, through `tessera serve` and a devnet, with the
//! ledger read back through `tessera account …`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use std::time::Duration;

use serde_json::{json, Value};
use util::{chat, tessera_json, Devnet, Server};

fn cost_of(v: &Value, input: u64, output: u64) -> u64 {
    let u = &v["usage"];
    u["prompt_tokens"].as_u64().unwrap() * input + u["completion_tokens"].as_u64().unwrap() * output
}

/// POST a chat request with `key`; returns (status, body).
fn ask(root: &str, key: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = util::client_for(key)
        .post(format!("{root}/v1/chat/completions"))
        .json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap())
}

#[test]
fn charges_are_usage_times_price_and_the_books_balance() {
    let server = Server::start(&["--input-price", "7", "--output-price", "11"]);
    let home = server.home.path();
    let before = util::tessera_json(home, &["account", "show", "demo"]);
    let mut charged = 0;
    for i in 0..3 {
        let (s, v) = server.post(
            "/v1/chat/completions",
            &chat(&format!("Name {i} fruits."), json!({"max_tokens": 12})),
        );
        assert_eq!(s, 200, "{v}");
        let cost = v["tessera"]["cost"].as_u64().expect("tessera.cost");
        assert_eq!(cost, cost_of(&v, 7, 11), "charge = tokens × price: {v}");
        assert!(v["tessera"]["receipt"]
            .as_str()
            .is_some_and(|r| !r.is_empty()));
        charged += cost;
    }
    // A stream carries the cost on its final chunk.
    let events = server.stream(
        "/v1/chat/completions",
        &chat(
            "Say hi.",
            json!({"max_tokens": 6, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let last = chunks
        .iter()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .expect("final chunk");
    let usage = chunks.iter().find(|c| !c["usage"].is_null()).unwrap();
    let cost = last["tessera"]["cost"]
        .as_u64()
        .expect("cost on the final chunk");
    assert_eq!(cost, cost_of(usage, 7, 11));
    charged += cost;

    let (s, account) = server.get("/v1/account");
    assert_eq!(s, 200, "{account}");
    assert_eq!(account["spent"].as_u64(), Some(charged));
    assert_eq!(account["held"], 0);
    assert_eq!(
        account["balance"].as_i64().unwrap(),
        before["balance"].as_i64().unwrap() - charged as i64
    );
    assert_eq!(account["usage"]["requests"], 4);
    // `serve` takes no fee: the provider earned every credit charged.
    let provider = tessera_json(home, &["account", "show", "provider:local"]);
    assert_eq!(provider["balance"].as_u64(), Some(charged));
    let check = tessera_json(home, &["account", "check"]);
    assert_eq!(check["unbalanced_entries"], 0, "{check}");
    assert_eq!(check["mismatched_accounts"], 0, "{check}");
    assert_eq!(check["total"], 0, "{check}");
    assert_eq!(check["open_holds"], 0, "{check}");
}

#[test]
fn keys_credits_limits_and_retries_are_enforced_on_sqlite() {
    keys_credits_limits_and_retries(None);
}

#[test]
fn keys_credits_limits_and_retries_are_enforced_on_postgres() {
    let pg = tessera_ledger::pg::TempPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    keys_credits_limits_and_retries(Some(&pg.url()));
}

/// The ledger's rules as clients meet them, with the ledger in `database`
/// (default: the server's SQLite file).
fn keys_credits_limits_and_retries(database: Option<&str>) {
    let db: Vec<&str> = database
        .map(|url| vec!["--database-url", url])
        .unwrap_or_default();
    let mut flags = vec!["--input-price", "7", "--output-price", "11"];
    flags.extend(&db);
    let server = Server::start(&flags);
    let home = server.home.path();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(&db);
        tessera_json(home, &all)
    };
    let root = server.url("");
    let body = chat("Say hi.", json!({"max_tokens": 20}));

    // No key, a wrong key: 401 in OpenAI's shape, on every /v1 route.
    for (path, key) in [
        ("/v1/chat/completions", ""),
        ("/v1/chat/completions", "tsk_wrong"),
        ("/v1/models", ""),
        ("/v1/account", "nope"),
    ] {
        let c = if key.is_empty() {
            util::client()
        } else {
            util::client_for(key)
        };
        let resp = if path.ends_with("completions") {
            c.post(format!("{root}{path}")).json(&body).send().unwrap()
        } else {
            c.get(format!("{root}{path}")).send().unwrap()
        };
        assert_eq!(resp.status().as_u16(), 401, "{path}");
        let v: Value = resp.json().unwrap();
        assert_eq!(util::assert_openai_error(&v)["code"], "invalid_api_key");
    }

    // Credits that do not cover the largest possible cost: 402, nothing held.
    let tiny = cli(&["account", "create", "tiny", "--credits", "0.0001"]);
    let tiny_key = tiny["api_key"].as_str().unwrap();
    let (s, v) = ask(&root, tiny_key, &body, &[]);
    assert_eq!(s, 402, "{v}");
    assert_eq!(
        util::assert_openai_error(&v)["code"],
        "insufficient_credits"
    );
    let after = cli(&["account", "show", "tiny"]);
    assert_eq!(
        (after["balance"].as_u64(), after["held"].as_u64()),
        (Some(100), Some(0))
    );

    // A spending limit (an agent's budget): requests run until the next
    // could exceed it, then 402 with its own code; never spent past it.
    let agent = cli(&[
        "account",
        "create",
        "agent",
        "--credits",
        "10",
        "--spend-limit",
        "0.002",
    ]);
    let agent_key = agent["api_key"].as_str().unwrap();
    let mut refused = None;
    for _ in 0..20 {
        let (s, v) = ask(&root, agent_key, &body, &[]);
        if s != 200 {
            refused = Some((s, v));
            break;
        }
    }
    let (s, v) = refused.expect("the spending limit never applied");
    assert_eq!(s, 402, "{v}");
    assert_eq!(
        util::assert_openai_error(&v)["code"],
        "spend_limit_exceeded"
    );
    let spent = cli(&["account", "show", "agent"])["spent"]
        .as_u64()
        .unwrap();
    assert!(spent > 0 && spent <= 2_000, "spent {spent}");

    // A rate limit: the third request in a minute is 429.
    let slow = cli(&[
        "account",
        "create",
        "slow",
        "--credits",
        "1",
        "--rate-limit",
        "2",
    ]);
    let slow_key = slow["api_key"].as_str().unwrap();
    // Limits count per minute of the clock: all three within one.
    let in_minute = tessera_core::now_ms() % 60_000;
    if in_minute > 50_000 {
        std::thread::sleep(std::time::Duration::from_millis(60_000 - in_minute + 200));
    }
    let codes: Vec<u16> = (0..3).map(|_| ask(&root, slow_key, &body, &[]).0).collect();
    assert_eq!(codes, [200, 200, 429]);

    // The same Idempotency-Key twice: one answer, one charge; the retry
    // gets the same answer again (a stream too), marked as a replay.
    let key = server.key.clone();
    let spent_before = server.get("/v1/account").1["spent"].as_u64().unwrap();
    let (s, first) = ask(&root, &key, &body, &[("Idempotency-Key", "order-42")]);
    assert_eq!(s, 200, "{first}");
    let (s, again) = ask(&root, &key, &body, &[("Idempotency-Key", "order-42")]);
    assert_eq!(s, 200, "{again}");
    assert_eq!(again["tessera"]["replayed"], true, "{again}");
    assert_eq!(again["choices"], first["choices"]);
    assert_eq!(again["usage"], first["usage"]);
    assert_eq!(again["tessera"]["cost"], first["tessera"]["cost"]);
    assert_eq!(again["tessera"]["receipt"], first["tessera"]["receipt"]);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = util::client_for(&key)
        .post(format!("{root}/v1/chat/completions"))
        .header("Idempotency-Key", "order-42")
        .json(&streamed)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let events = util::sse_data(&resp.text().unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        text,
        first["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let spent_after = server.get("/v1/account").1["spent"].as_u64().unwrap();
    assert_eq!(
        spent_after - spent_before,
        first["tessera"]["cost"].as_u64().unwrap(),
        "charged exactly once"
    );

    // A price cap below this server's price: nobody may serve it.
    let capped = chat(
        "Say hi.",
        json!({"max_tokens": 5, "provider": {"max_price": {"completion": 10}}}),
    );
    let (s, v) = ask(&root, &key, &capped, &[]);
    assert_eq!(s, 503, "{v}");
    let (s, v) = ask(
        &root,
        &key,
        &chat("Hi", json!({"provider": {"max_price": {"prompt": -1}}})),
        &[],
    );
    assert_eq!(s, 400, "{v}");

    // A client that leaves mid-stream pays for what was generated, and
    // nothing stays held.
    let long = chat(
        "Tell a long story.",
        json!({"max_tokens": 1000, "ignore_eos": true, "stream": true}),
    );
    {
        use std::io::Read;
        let mut resp = server
            .client()
            .post(server.url("/v1/chat/completions"))
            .json(&long)
            .send()
            .unwrap();
        let mut buf = [0u8; 2048];
        let _ = resp.read(&mut buf).unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, a) = server.get("/v1/account");
        if a["held"] == 0 {
            let spent_now = a["spent"].as_u64().unwrap();
            assert!(
                spent_now > spent_after,
                "the abandoned stream was not charged"
            );
            assert!(
                spent_now < spent_after + 7 * 40 + 11 * 1000,
                "charged as if it had finished"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a hold stayed open: {a}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let check = cli(&["account", "check"]);
    assert_eq!(
        (check["total"].as_i64(), check["open_holds"].as_i64()),
        (Some(0), Some(0)),
        "{check}"
    );
}

#[test]
fn providers_set_prices_the_router_honours_caps_and_the_gateway_takes_its_fee() {
    let net = Devnet::start(1);
    let dear = net.providers[0].1.clone();
    let home = tempfile::tempdir().unwrap();
    // Killed however the test ends.
    let _cheap = util::KillOnDrop(vec![util::spawn_provider_with(
        &net.ticket,
        home.path(),
        2,
        &["--input-price", "5", "--output-price", "10"],
    )]);
    assert!(net.wait_listed(2, Duration::from_secs(60)));
    let cheap_node = net.listed().into_iter().find(|n| *n != dear).unwrap();

    let models: Value = net
        .client()
        .get(net.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let price = &models["data"][0]["tessera"]["price"];
    assert_eq!(price["prompt"], json!({"min": 5, "max": 20}), "{models}");
    assert_eq!(price["completion"], json!({"min": 10, "max": 80}));
    assert_eq!(models["data"][0]["tessera"]["providers"], 2);

    let mut earned = 0;
    for prefs in [
        json!({"max_price": {"prompt": 10, "completion": 20}}),
        json!({"sort": "price"}),
    ] {
        for _ in 0..2 {
            let (s, v) = net.post(
                "/v1/chat/completions",
                &chat("Say hi.", json!({"max_tokens": 6, "provider": prefs})),
            );
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["tessera"]["provider"], cheap_node.as_str(), "{prefs}");
            let cost = v["tessera"]["cost"].as_u64().unwrap();
            assert_eq!(cost, cost_of(&v, 5, 10));
            earned += cost - cost * 500 / 10_000;
        }
    }
    // The dear provider is still used when asked for, at its own price.
    let (s, v) = net.post(
        "/v1/chat/completions",
        &chat(
            "Say hi.",
            json!({"max_tokens": 6, "provider": {"only": [&dear]}}),
        ),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["tessera"]["cost"].as_u64(), Some(cost_of(&v, 20, 80)));
    // A cap nobody meets.
    let (s, v) = net.post(
        "/v1/chat/completions",
        &chat(
            "Say hi.",
            json!({"provider": {"max_price": {"completion": 1}}}),
        ),
    );
    assert_eq!(s, 503, "{v}");

    // The gateway's ledger: the cheap provider earned its charges less the
    // 5% fee, and the books balance.
    let gw_home = net.home.path().join("devnet/gateway");
    let account = tessera_json(
        &gw_home,
        &["account", "show", &format!("provider:{cheap_node}")],
    );
    assert_eq!(account["balance"].as_u64(), Some(earned));
    let check = tessera_json(&gw_home, &["account", "check"]);
    assert_eq!(
        (check["total"].as_i64(), check["open_holds"].as_i64()),
        (Some(0), Some(0)),
        "{check}"
    );
    assert_eq!(check["unbalanced_entries"], 0);

    // The provider's own view: every receipt signed by it and countersigned
    // by the gateway, totals equal to what the ledger paid it.
    let mine = tessera_json(
        home.path(),
        &["provider", "earnings", "--api", &net.api_base],
    );
    assert_eq!(mine["provider"], cheap_node.as_str());
    assert_eq!(mine["totals"]["receipts"], 4, "{mine}");
    assert_eq!(
        mine["verified"], 4,
        "unverified receipts: {}",
        mine["unverified"]
    );
    assert_eq!(mine["verified_earned"].as_u64(), Some(earned));
    assert_eq!(mine["totals"]["earned"].as_u64(), Some(earned));
    let receipt = &mine["receipts"][0]["signed"];
    assert!(receipt["signature"].is_string() && receipt["countersignature"].is_string());
    // Nobody else may read them: unsigned, or signed by another key.
    let resp = util::client()
        .get(net.url("/v1/provider/receipts"))
        .header("x-tessera-node", &cheap_node)
        .header("x-tessera-time", "1")
        .header("x-tessera-signature", "00")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

/// Concurrent requests that together need more than an account's balance
/// or its key's spending limit: only the ones the credits cover run. Every
/// request uses its whole hold (end of generation ignored, so the cost is
/// exactly the hold), so exactly three fit whatever order they arrive in.
#[test]
fn concurrent_holds_beyond_the_balance_or_the_limit_refuse_the_rest() {
    let server = Server::start(&[
        "--slots",
        "8",
        "--input-price",
        "1",
        "--output-price",
        "1000",
    ]);
    let home = server.home.path();
    let body = chat(
        "Count.",
        json!({"max_tokens": 10, "ignore_eos": true, "temperature": 0}),
    );
    // One request's hold: its prompt once at 1, ten tokens at 1000.
    let (s, probe) = server.post("/v1/chat/completions", &body);
    assert_eq!(s, 200, "{probe}");
    let hold = probe["tessera"]["cost"].as_u64().unwrap();
    assert_eq!(
        hold,
        probe["usage"]["prompt_tokens"].as_u64().unwrap() + 10_000
    );
    let credits = |micro: u64| format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000);
    for (name, args) in [
        (
            "short",
            vec!["--credits".to_string(), credits(hold * 7 / 2)],
        ),
        (
            "limited",
            vec![
                "--credits".to_string(),
                credits(hold * 20),
                "--spend-limit".to_string(),
                credits(hold * 7 / 2),
            ],
        ),
    ] {
        let mut cmd = vec!["account", "create", name];
        cmd.extend(args.iter().map(String::as_str));
        let key = tessera_json(home, &cmd)["api_key"]
            .as_str()
            .unwrap()
            .to_string();
        let codes: Vec<u16> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ask(&server.root, &key, &body, &[]).0))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok = codes.iter().filter(|&&c| c == 200).count();
        assert_eq!(ok, 3, "{name}: {codes:?}");
        assert!(
            codes.iter().all(|&c| c == 200 || c == 402),
            "{name}: {codes:?}"
        );
        let a = tessera_json(home, &["account", "show", name]);
        assert_eq!(a["held"], 0, "{name}: {a}");
        assert_eq!(a["spent"].as_u64(), Some(3 * hold), "{name}: {a}");
        assert!(a["balance"].as_i64().unwrap() >= 0, "{name}: {a}");
    }
    let check = tessera_json(home, &["account", "check"]);
    assert_eq!(
        (check["total"].as_i64(), check["open_holds"].as_i64()),
        (Some(0), Some(0)),
        "{check}"
    );
}
