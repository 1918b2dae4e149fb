//! Gossip floods against a real discovery node on loopback: a stranger
//! joins the network's topic and broadcasts announcements from thousands of
//! fresh node keys (keys are free). What the node remembers stays bounded,
//! and a node that knows the network's operator keeps no uncertified
//! gateway at all.

// The flooder is `tessera_net::flood`, built with the `testing` feature
// (as `make test` builds the workspace).
#![cfg(feature = "testing")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use iroh::SecretKey;
use tessera_net::admission::Admission;
use tessera_net::discovery::{Role, GOSSIP_ALPN, MAX_KNOWN};
use tessera_net::flood::{self, Flood, FloodConfig};
use tessera_net::node::{self, node_id, Ticket};
use tessera_net::{Discovery, DiscoveryConfig};

async fn loopback() -> iroh::Endpoint {
    node::bind(
        SecretKey::generate(),
        "127.0.0.1:0".parse().unwrap(),
        vec![GOSSIP_ALPN.to_vec()],
    )
    .await
    .unwrap()
}

/// `n` announcements of `role`, each from a fresh key, broadcast on the
/// topic of `target`'s network by the benchmark's flooder (no connections).
async fn flood(target: &Ticket, n: usize, role: Role) -> Flood {
    flood::start(
        target,
        FloodConfig {
            network: "flood".into(),
            sybils: n,
            role,
            connections: 0,
            model_sha256: "ab".repeat(32),
        },
    )
    .await
    .unwrap()
}

async fn node(admission: Option<Admission>) -> (Discovery, Ticket) {
    let ep = loopback().await;
    let ticket = Ticket::of(&ep, None);
    let d = Discovery::start(
        &ep,
        SecretKey::generate(),
        DiscoveryConfig {
            network: "flood".into(),
            role: Role::Gateway,
            addrs: ticket.addrs.clone(),
            models: vec![],
            bootstrap: vec![],
            certificate: None,
            admission,
            revocations_file: None,
        },
    );
    tokio::spawn(d.clone().accept(ep));
    (d, ticket)
}

/// Wait until `d` stops learning (its count is still for 2 s).
async fn settle(d: &Discovery) -> usize {
    let mut last = usize::MAX;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = d.known();
        if now == last && now > 0 {
            break;
        }
        last = now;
    }
    d.known()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sybil_flood_of_announcements_is_remembered_up_to_a_bound() {
    let (d, ticket) = node(None).await;
    let _flooder = flood(&ticket, 3 * MAX_KNOWN, Role::Provider).await;
    let known = settle(&d).await;
    assert!(known > 0, "the flood reached the node");
    assert!(
        known <= MAX_KNOWN,
        "{known} sybil records kept (bound {MAX_KNOWN})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_a_network_keeps_no_uncertified_gateway() {
    let operator = node_id(&SecretKey::generate().public());
    let (d, ticket) = node(Some(Admission::new("flood", operator))).await;
    let _gateways = flood(&ticket, 200, Role::Gateway).await;
    // And some providers, which it does keep, to know the flood arrived.
    let _providers = flood(&ticket, 20, Role::Provider).await;
    settle(&d).await;
    assert!(
        d.gateways().is_empty(),
        "{} rogue gateways kept",
        d.gateways().len()
    );
    assert!(d.known() > 0, "the flood reached the node");
}
