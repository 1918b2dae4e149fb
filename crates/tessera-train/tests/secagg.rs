//! SecAgg+ run in one process, every message passing through the server as
//! it would over the network: the aggregate equals the plaintext sum to
//! quantization precision, the round completes when 30% of the clients
//! vanish after sharing keys, and — reading every message the server
//! received — it never held t or more shares of both secrets of any client.
//! A server that asks for both secrets of one client, or asks twice, is
//! refused, and a tampered share is refused by its recipient.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use tessera_train::secagg::{Client, Config, EncryptedShare, MaskedInput, Server, Unmasking};
use tessera_train::Rng;

fn config(n: u32, length: usize) -> Config {
    Config {
        round: 7,
        clients: (100..100 + n).collect(),
        neighbours: 6,
        threshold: 4,
        clip: 1.0,
        length,
    }
}

fn vectors(config: &Config) -> BTreeMap<u32, Vec<f32>> {
    let mut rng = Rng::new(3);
    config
        .clients
        .iter()
        .map(|&c| {
            let v = (0..config.length)
                .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
                .collect();
            (c, v)
        })
        .collect()
}

/// Everything the server received, for inspection.
#[derive(Default)]
struct Seen {
    inputs: Vec<MaskedInput>,
    unmaskings: Vec<Unmasking>,
}

/// Stages 1 and 2 of a round: the server, every client, and the shares the
/// server relays (ciphertexts under keys it never has).
struct Shared {
    server: Server,
    clients: BTreeMap<u32, Client>,
    relayed: Vec<EncryptedShare>,
}

fn share_keys(config: &Config) -> Shared {
    let mut server = Server::new(config.clone()).unwrap();
    let mut clients = BTreeMap::new();
    let mut ads = Vec::new();
    for &id in &config.clients {
        let (c, k) = Client::new(config.clone(), id).unwrap();
        clients.insert(id, c);
        ads.push(k);
    }
    let keys = server.collect_keys(ads);
    let mut sent = Vec::new();
    for c in clients.values_mut() {
        sent.extend(c.share_keys(&keys).unwrap());
    }
    let relayed = server.collect_shares(sent);
    Shared {
        server,
        clients,
        relayed,
    }
}

/// One round; the clients in `vanish` die after sharing keys.
fn round(
    config: &Config,
    values: &BTreeMap<u32, Vec<f32>>,
    vanish: &[u32],
) -> (
    Result<tessera_train::secagg::Aggregate, tessera_train::TrainError>,
    Seen,
) {
    let Shared {
        mut server,
        mut clients,
        relayed,
    } = share_keys(config);
    let mut seen = Seen::default();
    for id in vanish {
        clients.remove(id);
    }
    let mut inputs = Vec::new();
    for (id, c) in clients.iter_mut() {
        inputs.push(c.masked_input(&relayed, &values[id]).unwrap());
    }
    seen.inputs = inputs.clone();
    let (survivors, dropped) = server.collect_inputs(inputs);
    let mut unmaskings = Vec::new();
    for c in clients.values_mut() {
        unmaskings.push(c.unmask(&survivors, &dropped).unwrap());
    }
    seen.unmaskings = unmaskings.clone();
    (server.finish(&unmaskings), seen)
}

fn plain_sum(values: &BTreeMap<u32, Vec<f32>>, who: &[u32], length: usize) -> Vec<f32> {
    let mut s = vec![0f32; length];
    for id in who {
        for (a, v) in s.iter_mut().zip(&values[id]) {
            *a += v;
        }
    }
    s
}

fn assert_close(got: &[f32], want: &[f32], tolerance: f32) {
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= tolerance, "off by {worst} (tolerance {tolerance})");
}

/// The server's view: per client, how many shares of its seed and of its
/// key it was shown in the clear (the stage-2 shares it relayed are
/// ciphertexts under keys it never had).
fn revealed(seen: &Seen) -> BTreeMap<u32, (usize, usize)> {
    let mut out: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    for u in &seen.unmaskings {
        for (owner, _) in &u.seed_shares {
            out.entry(*owner).or_default().0 += 1;
        }
        for (owner, _) in &u.key_shares {
            out.entry(*owner).or_default().1 += 1;
        }
    }
    out
}

#[test]
fn the_sum_is_exact_and_no_client_is_unmasked() {
    let config = config(10, 1000);
    let values = vectors(&config);
    let (agg, seen) = round(&config, &values, &[]);
    let agg = agg.unwrap();
    assert_eq!(agg.survivors, config.clients);
    assert_close(
        &agg.sum,
        &plain_sum(&values, &config.clients, 1000),
        config.precision(10) + 1e-4,
    );
    // A masked input alone tells nothing: dequantized as if it were one
    // client's, it is nowhere near that client's vector.
    let m = &seen.inputs[0];
    let levels = f64::from(u32::MAX) / 10.0;
    let near = m
        .masked
        .iter()
        .zip(&values[&m.id])
        .filter(|(q, v)| ((f64::from(**q) / levels * 2.0 - 1.0) as f32 - **v).abs() < 0.1)
        .count();
    assert!(
        near < 50,
        "{near} of 1000 masked values resemble the vector"
    );
    for (client, (seeds, keys)) in revealed(&seen) {
        assert!(
            !(seeds >= config.threshold && keys >= config.threshold),
            "client {client}: {seeds} seed shares and {keys} key shares"
        );
        assert_eq!(keys, 0, "nobody dropped, so no key share is revealed");
    }
}

#[test]
fn the_round_completes_when_thirty_percent_vanish_after_sharing_keys() {
    let config = config(10, 500);
    let values = vectors(&config);
    let vanish = [101, 104, 108];
    let (agg, seen) = round(&config, &values, &vanish);
    let agg = agg.unwrap();
    assert_eq!(agg.dropped, vanish.to_vec());
    let survivors: Vec<u32> = config
        .clients
        .iter()
        .copied()
        .filter(|c| !vanish.contains(c))
        .collect();
    assert_eq!(agg.survivors, survivors);
    assert_close(
        &agg.sum,
        &plain_sum(&values, &survivors, 500),
        config.precision(7) + 1e-4,
    );
    for (client, (seeds, keys)) in revealed(&seen) {
        assert!(
            !(seeds >= config.threshold && keys >= config.threshold),
            "client {client}: {seeds} seed shares and {keys} key shares"
        );
        if vanish.contains(&client) {
            assert_eq!(seeds, 0, "a dropped client's seed is never revealed");
        } else {
            assert_eq!(keys, 0, "a survivor's key is never revealed");
        }
    }
}

#[test]
fn too_few_survivors_give_no_sum() {
    let mut config = config(6, 10);
    config.neighbours = 5;
    config.threshold = 4;
    let values = vectors(&config);
    // Three of six left: fewer than the threshold of four.
    let Shared {
        mut server,
        mut clients,
        relayed,
        ..
    } = share_keys(&config);
    let mut inputs = Vec::new();
    for id in [100, 101, 102] {
        inputs.push(
            clients
                .get_mut(&id)
                .unwrap()
                .masked_input(&relayed, &values[&id])
                .unwrap(),
        );
    }
    let (survivors, dropped) = server.collect_inputs(inputs);
    assert!(clients
        .get_mut(&100)
        .unwrap()
        .unmask(&survivors, &dropped)
        .is_err());
    assert!(server.finish(&[]).is_err());
}

#[test]
fn a_greedy_server_and_a_tampered_share_are_refused() {
    let config = config(5, 4);
    let values = vectors(&config);
    let Shared {
        mut clients,
        relayed,
        ..
    } = share_keys(&config);

    // A share altered in transit: its recipient refuses it.
    let mut tampered = relayed.clone();
    let victim = tampered.iter_mut().find(|s| s.to == 100).unwrap();
    victim.ciphertext[3] ^= 1;
    let c = clients.get_mut(&100).unwrap();
    assert!(c.masked_input(&tampered, &values[&100]).is_err());

    for (id, c) in clients.iter_mut() {
        c.masked_input(&relayed, &values[id]).unwrap();
    }
    let all = config.clients.clone();
    let c = clients.get_mut(&100).unwrap();
    // Asking for both secrets of client 101 (naming it survived and dropped).
    assert!(c.unmask(&all, &[101]).is_err());
    // An honest request once, then never again.
    assert!(c.unmask(&all, &[]).is_ok());
    assert!(c.unmask(&all[1..], &[100]).is_err());
}
