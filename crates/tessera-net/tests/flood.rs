//! Gossip floods against a real discovery node on loopback: a stranger
//! joins the network's topic and broadcasts announcements from thousands of
//! fresh node keys (keys are free). What the node remembers stays bounded,
//! and a node that knows the network's operator keeps no uncertified
//! gateway at all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use iroh::SecretKey;
use iroh_gossip::Gossip;
use tessera_core::now_ms;
use tessera_net::admission::Admission;
use tessera_net::discovery::{self, Announcement, Role, GOSSIP_ALPN, MAX_KNOWN};
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

fn announcement(key: &SecretKey, role: Role) -> bytes::Bytes {
    Announcement {
        network: "flood".into(),
        role,
        node: node_id(&key.public()),
        addrs: vec!["127.0.0.1:9".parse().unwrap()],
        models: vec!["ab".repeat(32)],
        issued_ms: now_ms(),
        ttl_ms: discovery::TTL.as_millis() as u64,
        certificate: None,
    }
    .sign(key)
}

/// Join `target`'s topic from a fresh endpoint and broadcast `n`
/// announcements of `role`, each from a fresh key.
async fn flood(target: &Ticket, n: usize, role: Role) -> iroh::Endpoint {
    let ep = loopback().await;
    let gossip = Gossip::builder().spawn(ep.clone());
    {
        let (ep, gossip) = (ep.clone(), gossip.clone());
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                if let Ok(conn) = incoming.await {
                    let _ = gossip.handle_connection(conn).await;
                }
            }
        });
    }
    if let Ok(lookup) = ep.address_lookup() {
        let memory = iroh::address_lookup::memory::MemoryLookup::new();
        memory.add_endpoint_info(target.endpoint_addr());
        lookup.add(memory);
    }
    let topic = gossip
        .subscribe_and_join(discovery::topic("flood"), vec![target.id])
        .await
        .unwrap();
    let (sender, _receiver) = topic.split();
    for _ in 0..n {
        sender
            .broadcast(announcement(&SecretKey::generate(), role))
            .await
            .unwrap();
    }
    // Keep the flooder's endpoint (and its gossip) alive for the caller.
    std::mem::forget(gossip);
    ep
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
