//! SecAgg+ (Bell, Bonawitz, Gascón, Lepoint and Raykova 2020; the protocol
//! Flower implements): the aggregator learns the sum of the clients'
//! vectors and nothing else, and the round survives clients that drop out.
//!
//! Stages, each with a deadline in the networked protocol (the server takes
//! what arrived by then):
//! 1. **Advertise keys.** Each client makes two X25519 key pairs: one to
//!    encrypt the shares it sends (`c`), one to agree on pairwise masks
//!    (`s`). The network layer signs the advertisement with the client's
//!    node key ([`AdvertiseKeys::signed_bytes`]) and checks the signature.
//! 2. **Share keys.** Each client draws a 256-bit self-mask seed `b` and
//!    splits `b` and its `s` secret key t-of-k among its k neighbours
//!    (Shamir over GF(2⁶¹ − 1), each 32-byte secret as five 7-byte limbs);
//!    each share is encrypted (ChaCha20, then a BLAKE3 keyed MAC) under a
//!    key agreed with that neighbour's `c` key, so the server that relays
//!    them reads none.
//! 3. **Masked input.** Each client quantizes its vector (values clipped to
//!    ±`clip`, mapped to integers so that the sum of all clients' values
//!    fits below the modulus 2³²), adds its self mask and, for every
//!    neighbour that shared keys, plus or minus a pairwise mask; masks are
//!    ChaCha20 keystreams from 256-bit seeds (the pairwise seed derived from
//!    the X25519 agreement), so the pairwise masks cancel in the sum.
//! 4. **Unmask.** The server names who sent a masked input and who dropped
//!    after sharing keys. Each survivor reveals, for each neighbour, a share
//!    of its self-mask seed if it survived or of its mask key if it dropped
//!    — never both for one client (a client refuses a request that asks for
//!    both). With t shares the server removes the self masks of survivors
//!    and the pairwise masks of the dropped, and dequantizes the sum.
//!
//! Against whom: the server is trusted to follow the protocol but not to
//! look (honest-but-curious), clients may vanish at any stage. A client
//! refuses a request that names one neighbour both surviving and dropped,
//! but a malicious server could still tell *different* clients different
//! lists; the paper's consistency check (clients sign the survivor list and
//! check each other's signatures before unmasking) is not built yet.
//!
//! Neighbourhoods (the "+" of SecAgg+): each client is joined to the k/2
//! clients before and after it in id order (all others when k ≥ n − 1), so
//! the work per client grows with k, not n.

use std::collections::{BTreeMap, BTreeSet};

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;
use curve25519_dalek::montgomery::MontgomeryPoint;

pub use tessera_core::train::secagg::{
    AdvertiseKeys, EncryptedShare, MaskedInput, Share, Unmasking, SHARE_LIMBS,
};

use crate::TrainError;

/// Sums are computed modulo 2^32 (u32 wrapping arithmetic).
pub const MODULUS_BITS: u32 = 32;

/// The prime of the field the secrets are shared over: 2^61 − 1.
pub const FIELD_PRIME: u64 = (1 << 61) - 1;

/// Limbs of a 32-byte secret (7 bytes each, below the prime).
const LIMBS: usize = SHARE_LIMBS;

/// One round's settings, the same at the server and every client.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The round (it keys the masks and the share encryption's nonces).
    pub round: u64,
    /// Every client invited to the round.
    pub clients: Vec<u32>,
    /// Neighbours per client (k).
    pub neighbours: usize,
    /// Shares needed to rebuild a secret (t, at most k).
    pub threshold: usize,
    /// Values are clipped to ±`clip` before quantization.
    pub clip: f32,
    /// Length of the vectors summed.
    pub length: usize,
}

impl Config {
    fn err(msg: String) -> TrainError {
        TrainError::Aggregate(format!("secure aggregation: {msg}"))
    }

    /// Check the settings: distinct clients, 1 ≤ t ≤ k, a positive clip.
    pub fn check(&self) -> Result<(), TrainError> {
        let distinct: BTreeSet<u32> = self.clients.iter().copied().collect();
        if distinct.len() != self.clients.len() || self.clients.len() < 2 {
            return Err(Self::err("need two or more distinct clients".into()));
        }
        let k = self.neighbours.min(self.clients.len() - 1);
        if self.threshold == 0 || self.threshold > k {
            return Err(Self::err(format!(
                "threshold {} must be between 1 and the {k} neighbours",
                self.threshold
            )));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return Err(Self::err("the clipping range must be positive".into()));
        }
        Ok(())
    }

    /// `id`'s neighbours (never itself).
    pub fn neighbours_of(&self, id: u32) -> Vec<u32> {
        let mut ids = self.clients.clone();
        ids.sort_unstable();
        let n = ids.len();
        let Some(at) = ids.iter().position(|&c| c == id) else {
            return Vec::new();
        };
        if self.neighbours >= n - 1 {
            return ids.into_iter().filter(|&c| c != id).collect();
        }
        let half = self.neighbours.div_ceil(2).max(1);
        let mut out = BTreeSet::new();
        for d in 1..=half {
            out.insert(ids[(at + d) % n]);
            out.insert(ids[(at + n - d) % n]);
        }
        out.remove(&id);
        out.into_iter().collect()
    }

    /// Quantization levels per value: the sum of every client's values
    /// stays below 2^32.
    fn levels(&self) -> u64 {
        ((1u64 << MODULUS_BITS) - 1) / self.clients.len().max(1) as u64
    }

    /// Quantize one value.
    fn quantize(&self, v: f32) -> u32 {
        let r = f64::from(self.clip);
        let v = f64::from(v).clamp(-r, r);
        (((v + r) / (2.0 * r)) * self.levels() as f64).round() as u32
    }

    /// Dequantize a sum of `count` quantized values.
    fn dequantize(&self, sum: u32, count: usize) -> f32 {
        let r = f64::from(self.clip);
        (f64::from(sum) * 2.0 * r / self.levels() as f64 - count as f64 * r) as f32
    }

    /// The largest error dequantizing adds per value of the sum of `count`
    /// clients (half a level each).
    pub fn precision(&self, count: usize) -> f32 {
        (count as f64 * f64::from(self.clip) / self.levels() as f64) as f32
    }
}

fn random32() -> Result<[u8; 32], TrainError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| TrainError::Engine(format!("random source: {e}")))?;
    Ok(b)
}

fn agree(secret: &[u8; 32], public: &[u8; 32]) -> [u8; 32] {
    MontgomeryPoint(*public).mul_clamped(*secret).to_bytes()
}

fn public_of(secret: &[u8; 32]) -> [u8; 32] {
    MontgomeryPoint::mul_base_clamped(*secret).to_bytes()
}

/// `length` words of the ChaCha20 keystream of `seed` for `round`.
fn expand(seed: &[u8; 32], round: u64, length: usize) -> Vec<u32> {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&round.to_le_bytes());
    let mut bytes = vec![0u8; length * 4];
    ChaCha20::new(seed.into(), &nonce.into()).apply_keystream(&mut bytes);
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The seed of the pairwise mask between two clients, from their agreement.
fn pair_seed(shared: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("tessera secagg v1 pairwise mask", shared)
}

// --- Shamir over GF(2^61 - 1) ---------------------------------------------

fn fmul(a: u64, b: u64) -> u64 {
    ((u128::from(a) * u128::from(b)) % u128::from(FIELD_PRIME)) as u64
}

fn fadd(a: u64, b: u64) -> u64 {
    (a + b) % FIELD_PRIME
}

fn fsub(a: u64, b: u64) -> u64 {
    (a + FIELD_PRIME - b % FIELD_PRIME) % FIELD_PRIME
}

fn finv(a: u64) -> u64 {
    // Fermat: a^(p-2).
    let (mut base, mut exp, mut out) = (a % FIELD_PRIME, FIELD_PRIME - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            out = fmul(out, base);
        }
        base = fmul(base, base);
        exp >>= 1;
    }
    out
}

fn limbs(secret: &[u8; 32]) -> [u64; LIMBS] {
    let mut out = [0u64; LIMBS];
    for (i, chunk) in secret.chunks(7).enumerate() {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        out[i] = u64::from_le_bytes(b);
    }
    out
}

fn unlimbs(l: &[u64; LIMBS]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(7).enumerate() {
        let b = l[i].to_le_bytes();
        if b[chunk.len()..].iter().any(|&x| x != 0) {
            return None;
        }
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    Some(out)
}

fn random_field() -> Result<u64, TrainError> {
    loop {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).map_err(|e| TrainError::Engine(format!("random source: {e}")))?;
        let v = u64::from_le_bytes(b) >> 3;
        if v < FIELD_PRIME {
            return Ok(v);
        }
    }
}

/// Split `secret` so that any `t` of the shares at `xs` rebuild it and
/// fewer tell nothing.
pub fn split(secret: &[u8; 32], t: usize, xs: &[u64]) -> Result<Vec<Share>, TrainError> {
    let values = limbs(secret);
    let mut coefs = vec![[0u64; LIMBS]; t.max(1)];
    coefs[0] = values;
    for c in coefs.iter_mut().skip(1) {
        for l in c.iter_mut() {
            *l = random_field()?;
        }
    }
    Ok(xs
        .iter()
        .map(|&x| {
            let mut y = [0u64; LIMBS];
            for (l, yl) in y.iter_mut().enumerate() {
                // Horner.
                let mut acc = 0;
                for c in coefs.iter().rev() {
                    acc = fadd(fmul(acc, x), c[l]);
                }
                *yl = acc;
            }
            Share { x, y }
        })
        .collect())
}

/// Rebuild a secret from shares at distinct points (any `t` of them).
pub fn combine(shares: &[Share]) -> Option<[u8; 32]> {
    let xs: BTreeSet<u64> = shares.iter().map(|s| s.x).collect();
    if xs.len() != shares.len() || shares.is_empty() || xs.contains(&0) {
        return None;
    }
    let mut out = [0u64; LIMBS];
    for (i, si) in shares.iter().enumerate() {
        // Lagrange basis at 0.
        let mut num = 1;
        let mut den = 1;
        for (j, sj) in shares.iter().enumerate() {
            if i != j {
                num = fmul(num, sj.x);
                den = fmul(den, fsub(sj.x, si.x));
            }
        }
        let basis = fmul(num, finv(den));
        for (o, y) in out.iter_mut().zip(&si.y) {
            *o = fadd(*o, fmul(*y, basis));
        }
    }
    unlimbs(&out)
}

// --- Share encryption -------------------------------------------------------

fn share_keys(shared: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
    (
        blake3::derive_key("tessera secagg v1 share encryption", shared),
        blake3::derive_key("tessera secagg v1 share mac", shared),
    )
}

fn share_nonce(round: u64, from: u32, to: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&round.to_le_bytes());
    n[8] = u8::from(from > to);
    n
}

fn share_tag(mac: &[u8; 32], nonce: &[u8; 12], from: u32, to: u32, ct: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(mac);
    h.update(nonce);
    h.update(&from.to_le_bytes());
    h.update(&to.to_le_bytes());
    h.update(ct);
    *h.finalize().as_bytes()
}

fn share_bytes(s: &Share) -> Vec<u8> {
    let mut b = s.x.to_le_bytes().to_vec();
    for y in s.y {
        b.extend_from_slice(&y.to_le_bytes());
    }
    b
}

fn share_from(b: &[u8]) -> Option<Share> {
    if b.len() != 8 * (LIMBS + 1) {
        return None;
    }
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    let mut y = [0u64; LIMBS];
    for (l, v) in y.iter_mut().enumerate() {
        *v = word(l + 1);
        if *v >= FIELD_PRIME {
            return None;
        }
    }
    Some(Share { x: word(0), y })
}

// --- The client ----------------------------------------------------------------

/// A client's side of one round.
pub struct Client {
    config: Config,
    id: u32,
    c_sk: [u8; 32],
    s_sk: [u8; 32],
    seed: [u8; 32],
    /// Neighbours' advertised keys.
    peers: BTreeMap<u32, AdvertiseKeys>,
    /// Shares received from neighbours that shared keys: (of seed, of key).
    received: BTreeMap<u32, (Share, Share)>,
    /// Whether it sent its masked input (then it will not unmask twice).
    unmasked: bool,
}

impl Client {
    /// Stage 1: a client of the round, and its advertisement.
    pub fn new(config: Config, id: u32) -> Result<(Client, AdvertiseKeys), TrainError> {
        config.check()?;
        if !config.clients.contains(&id) {
            return Err(Config::err(format!("client {id} is not in the round")));
        }
        let (c_sk, s_sk, seed) = (random32()?, random32()?, random32()?);
        let keys = AdvertiseKeys {
            id,
            c_pk: public_of(&c_sk),
            s_pk: public_of(&s_sk),
        };
        Ok((
            Client {
                config,
                id,
                c_sk,
                s_sk,
                seed,
                peers: BTreeMap::new(),
                received: BTreeMap::new(),
                unmasked: false,
            },
            keys,
        ))
    }

    /// Stage 2: given the advertisements the server relays (only the
    /// client's neighbours' are used), share the seed and the mask key
    /// among the neighbours that advertised, encrypted to each.
    pub fn share_keys(
        &mut self,
        keys: &[AdvertiseKeys],
    ) -> Result<Vec<EncryptedShare>, TrainError> {
        let mine: BTreeSet<u32> = self.config.neighbours_of(self.id).into_iter().collect();
        for k in keys {
            if mine.contains(&k.id) {
                self.peers.insert(k.id, k.clone());
            }
        }
        if self.peers.len() < self.config.threshold {
            return Err(Config::err(format!(
                "{} of client {}'s neighbours advertised keys; {} are needed",
                self.peers.len(),
                self.id,
                self.config.threshold
            )));
        }
        let xs: Vec<u64> = self.peers.keys().map(|&j| u64::from(j) + 1).collect();
        let seed_shares = split(&self.seed, self.config.threshold, &xs)?;
        let key_shares = split(&self.s_sk, self.config.threshold, &xs)?;
        let mut out = Vec::with_capacity(xs.len());
        for ((peer, s), k) in self.peers.values().zip(&seed_shares).zip(&key_shares) {
            let (enc, mac) = share_keys(&agree(&self.c_sk, &peer.c_pk));
            let nonce = share_nonce(self.config.round, self.id, peer.id);
            let mut ct = share_bytes(s);
            ct.extend(share_bytes(k));
            ChaCha20::new((&enc).into(), (&nonce).into()).apply_keystream(&mut ct);
            let tag = share_tag(&mac, &nonce, self.id, peer.id, &ct);
            out.push(EncryptedShare {
                from: self.id,
                to: peer.id,
                ciphertext: ct,
                tag,
            });
        }
        Ok(out)
    }

    /// Stage 3: read the shares neighbours sent (those that fail their
    /// MAC are refused), then mask `values`: its self mask, and a pairwise
    /// mask with every neighbour whose shares it holds.
    pub fn masked_input(
        &mut self,
        shares: &[EncryptedShare],
        values: &[f32],
    ) -> Result<MaskedInput, TrainError> {
        if values.len() != self.config.length {
            return Err(Config::err(format!(
                "{} values for a round of {}",
                values.len(),
                self.config.length
            )));
        }
        for e in shares.iter().filter(|e| e.to == self.id) {
            let Some(peer) = self.peers.get(&e.from) else {
                continue;
            };
            let (enc, mac) = share_keys(&agree(&self.c_sk, &peer.c_pk));
            let nonce = share_nonce(self.config.round, e.from, e.to);
            if share_tag(&mac, &nonce, e.from, e.to, &e.ciphertext) != e.tag {
                return Err(Config::err(format!(
                    "the shares from client {} fail their MAC",
                    e.from
                )));
            }
            let mut pt = e.ciphertext.clone();
            ChaCha20::new((&enc).into(), (&nonce).into()).apply_keystream(&mut pt);
            let half = pt.len() / 2;
            match (share_from(&pt[..half]), share_from(&pt[half..])) {
                (Some(s), Some(k)) if s.x == u64::from(self.id) + 1 && k.x == s.x => {
                    self.received.insert(e.from, (s, k));
                }
                _ => {
                    return Err(Config::err(format!(
                        "malformed shares from client {}",
                        e.from
                    )))
                }
            }
        }
        if self.received.len() < self.config.threshold {
            return Err(Config::err(format!(
                "client {} holds shares of {} neighbours; {} are needed",
                self.id,
                self.received.len(),
                self.config.threshold
            )));
        }
        let round = self.config.round;
        let mut masked: Vec<u32> = values.iter().map(|&v| self.config.quantize(v)).collect();
        let length = masked.len();
        add_into(&mut masked, &expand(&self.seed, round, length), true);
        for j in self.received.keys() {
            let Some(peer) = self.peers.get(j) else {
                continue;
            };
            let mask = expand(&pair_seed(&agree(&self.s_sk, &peer.s_pk)), round, length);
            add_into(&mut masked, &mask, self.id < *j);
        }
        Ok(MaskedInput {
            id: self.id,
            masked,
        })
    }

    /// Stage 4: reveal, for each neighbour whose shares it holds, a share of
    /// its seed if it is among `survivors` or of its mask key if among
    /// `dropped`. Refused when the lists overlap, when fewer than the
    /// threshold survived, or when asked a second time.
    pub fn unmask(&mut self, survivors: &[u32], dropped: &[u32]) -> Result<Unmasking, TrainError> {
        let alive: BTreeSet<u32> = survivors.iter().copied().collect();
        let gone: BTreeSet<u32> = dropped.iter().copied().collect();
        if let Some(both) = alive.intersection(&gone).next() {
            return Err(Config::err(format!(
                "client {both} is named both surviving and dropped: revealing both its secrets would unmask it"
            )));
        }
        if alive.len() < self.config.threshold || !alive.contains(&self.id) {
            return Err(Config::err(format!(
                "{} survivors; {} are needed",
                alive.len(),
                self.config.threshold
            )));
        }
        if self.unmasked {
            return Err(Config::err("asked to unmask a second time".into()));
        }
        self.unmasked = true;
        let mut out = Unmasking {
            id: self.id,
            seed_shares: Vec::new(),
            key_shares: Vec::new(),
        };
        for (&j, (s, k)) in &self.received {
            if alive.contains(&j) {
                out.seed_shares.push((j, *s));
            } else if gone.contains(&j) {
                out.key_shares.push((j, *k));
            }
        }
        Ok(out)
    }
}

fn add_into(acc: &mut [u32], mask: &[u32], plus: bool) {
    for (a, m) in acc.iter_mut().zip(mask) {
        *a = if plus {
            a.wrapping_add(*m)
        } else {
            a.wrapping_sub(*m)
        };
    }
}

// --- The server ------------------------------------------------------------------

/// What the aggregator learns: the sum of the survivors' vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregate {
    /// The sum, dequantized.
    pub sum: Vec<f32>,
    /// Clients whose vectors it includes.
    pub survivors: Vec<u32>,
    /// Clients that shared keys but sent no masked input.
    pub dropped: Vec<u32>,
}

/// The server's side: it relays messages and unmasks the sum.
pub struct Server {
    config: Config,
    keys: BTreeMap<u32, AdvertiseKeys>,
    /// Who sent shares (stage 2), and to whom.
    shared: BTreeMap<u32, BTreeSet<u32>>,
    inputs: BTreeMap<u32, Vec<u32>>,
}

impl Server {
    /// The server of a round.
    pub fn new(config: Config) -> Result<Server, TrainError> {
        config.check()?;
        Ok(Server {
            config,
            keys: BTreeMap::new(),
            shared: BTreeMap::new(),
            inputs: BTreeMap::new(),
        })
    }

    /// Stage 1 ends: the advertisements that arrived (signatures checked
    /// by the network layer), to relay to every client.
    pub fn collect_keys(&mut self, keys: Vec<AdvertiseKeys>) -> Vec<AdvertiseKeys> {
        for k in keys {
            if self.config.clients.contains(&k.id) {
                self.keys.entry(k.id).or_insert(k);
            }
        }
        self.keys.values().cloned().collect()
    }

    /// Stage 2 ends: the shares that arrived, to relay to their recipients.
    pub fn collect_shares(&mut self, shares: Vec<EncryptedShare>) -> Vec<EncryptedShare> {
        let mut out = Vec::new();
        for s in shares {
            if self.keys.contains_key(&s.from) && self.keys.contains_key(&s.to) {
                self.shared.entry(s.from).or_default().insert(s.to);
                out.push(s);
            }
        }
        out
    }

    /// Stage 3 ends: the masked inputs that arrived. Returns the survivors
    /// and the dropped (shared keys, sent no input) to ask for unmasking.
    pub fn collect_inputs(&mut self, inputs: Vec<MaskedInput>) -> (Vec<u32>, Vec<u32>) {
        for m in inputs {
            if self.shared.contains_key(&m.id) && m.masked.len() == self.config.length {
                self.inputs.entry(m.id).or_insert(m.masked);
            }
        }
        self.outcome()
    }

    /// Who sent a masked input, and who shared keys but sent none.
    fn outcome(&self) -> (Vec<u32>, Vec<u32>) {
        let survivors = self.inputs.keys().copied().collect();
        let dropped = self
            .shared
            .keys()
            .filter(|c| !self.inputs.contains_key(c))
            .copied()
            .collect();
        (survivors, dropped)
    }

    /// Stage 4 ends: rebuild the survivors' seeds and the dropped clients'
    /// mask keys from the revealed shares, strip every mask, dequantize.
    pub fn finish(&self, unmaskings: &[Unmasking]) -> Result<Aggregate, TrainError> {
        let (survivors, dropped) = self.outcome();
        if survivors.len() < self.config.threshold {
            return Err(Config::err(format!(
                "{} survivors; {} are needed",
                survivors.len(),
                self.config.threshold
            )));
        }
        let mut seeds: BTreeMap<u32, Vec<Share>> = BTreeMap::new();
        let mut keys: BTreeMap<u32, Vec<Share>> = BTreeMap::new();
        for u in unmaskings
            .iter()
            .filter(|u| self.inputs.contains_key(&u.id))
        {
            for (owner, s) in &u.seed_shares {
                if self.inputs.contains_key(owner) {
                    seeds.entry(*owner).or_default().push(*s);
                }
            }
            for (owner, s) in &u.key_shares {
                if dropped.contains(owner) {
                    keys.entry(*owner).or_default().push(*s);
                }
            }
        }
        let t = self.config.threshold;
        let round = self.config.round;
        let length = self.config.length;
        let mut sum = vec![0u32; length];
        for m in self.inputs.values() {
            add_into(&mut sum, m, true);
        }
        for &i in &survivors {
            let shares = seeds.get(&i).map(Vec::as_slice).unwrap_or(&[]);
            let seed = rebuild(shares, t)
                .ok_or_else(|| Config::err(format!("too few seed shares of client {i}")))?;
            add_into(&mut sum, &expand(&seed, round, length), false);
        }
        for &j in &dropped {
            let shares = keys.get(&j).map(Vec::as_slice).unwrap_or(&[]);
            let s_sk = rebuild(shares, t)
                .ok_or_else(|| Config::err(format!("too few key shares of dropped client {j}")))?;
            // The masks survivors added for j (j's own input never came).
            for &i in &survivors {
                let shared_with = self.shared.get(&i).is_some_and(|to| to.contains(&j))
                    && self.shared.get(&j).is_some_and(|to| to.contains(&i));
                let Some(pk) = self.keys.get(&i).map(|k| k.s_pk) else {
                    continue;
                };
                if shared_with {
                    let mask = expand(&pair_seed(&agree(&s_sk, &pk)), round, length);
                    // i added +mask when i < j: remove it.
                    add_into(&mut sum, &mask, i > j);
                }
            }
        }
        Ok(Aggregate {
            sum: sum
                .into_iter()
                .map(|v| self.config.dequantize(v, survivors.len()))
                .collect(),
            survivors,
            dropped,
        })
    }
}

/// A secret from at least `t` shares (the first `t` distinct ones).
fn rebuild(shares: &[Share], t: usize) -> Option<[u8; 32]> {
    let mut seen = BTreeSet::new();
    let distinct: Vec<Share> = shares
        .iter()
        .filter(|s| seen.insert(s.x))
        .copied()
        .collect();
    if distinct.len() < t {
        return None;
    }
    combine(&distinct[..t])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_t_shares_rebuild_a_secret_and_fewer_do_not() {
        let secret = random32().unwrap();
        let xs: Vec<u64> = (1..=6).collect();
        let shares = split(&secret, 3, &xs).unwrap();
        assert_eq!(combine(&shares[..3]), Some(secret));
        assert_eq!(combine(&[shares[5], shares[1], shares[3]]), Some(secret));
        assert_ne!(combine(&shares[..2]), Some(secret));
    }

    #[test]
    fn neighbourhoods_are_symmetric_and_sized() {
        let config = Config {
            round: 1,
            clients: (10..20).collect(),
            neighbours: 4,
            threshold: 3,
            clip: 1.0,
            length: 1,
        };
        for &i in &config.clients {
            let n = config.neighbours_of(i);
            assert_eq!(n.len(), 4, "{i}: {n:?}");
            for j in n {
                assert!(config.neighbours_of(j).contains(&i));
            }
        }
    }

    #[test]
    fn quantization_round_trips_within_its_precision() {
        let config = Config {
            round: 1,
            clients: (0..10).collect(),
            neighbours: 9,
            threshold: 5,
            clip: 2.0,
            length: 1,
        };
        for v in [-2.0f32, -0.3, 0.0, 0.7, 1.999] {
            let back = config.dequantize(config.quantize(v), 1);
            assert!((back - v).abs() <= config.precision(1), "{v} → {back}");
        }
        assert_eq!(config.dequantize(config.quantize(5.0), 1), 2.0, "clipped");
    }
}
