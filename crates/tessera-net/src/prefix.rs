//! Which providers hold which prompt prefixes in their KV caches.
//!
//! Chats and agents resend the same system prompt and history on every
//! turn. A provider keeps the KV cache of a finished answer (tagged with the
//! job's id) until it needs the slot; the gateway remembers what it sent
//! where, as a chain of hashes of whole [`BLOCK`]-token blocks, and forgets
//! an entry when the provider reports its eviction on the control stream.
//! The router then prefers the provider holding the longest prefix of a new
//! request, when that outweighs its load.
//!
//! Entries are kept per cache key — one account at this gateway, hashed
//! with the gateway's secret so providers cannot link accounts — and a
//! request only ever matches entries of its own key: a cached prefix never
//! speeds up (and so never reveals) another client's prompt.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use tessera_core::{NodeId, Token};

/// Tokens per hashed block.
pub const BLOCK: usize = 32;

/// The chained hashes of the whole blocks of `tokens`: element i stands for
/// the first (i + 1) × [`BLOCK`] tokens.
pub fn chain(tokens: &[Token]) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() / BLOCK);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for block in tokens.chunks_exact(BLOCK) {
        for t in block {
            for b in t.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        out.push(h);
    }
    out
}

/// SplitMix64's finaliser: a cheap, well-mixed permutation of a `u64`.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The cache key of `account` at the gateway whose secret is `secret`.
pub fn cache_key(secret: &[u8], account: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"tessera prefix cache\n");
    h.update(secret);
    h.update(account.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// One kept entry: its key and block hashes.
struct Entry {
    key: u64,
    chain: Vec<u64>,
}

/// What the gateway believes each provider keeps.
#[derive(Default)]
pub struct PrefixIndex {
    /// (key, block hash) → providers holding it, with how many of their
    /// entries do.
    blocks: HashMap<(u64, u64), HashMap<NodeId, u32>>,
    /// Provider → its entries by tag.
    entries: HashMap<NodeId, HashMap<String, Entry>>,
}

/// Entries remembered per provider at most (its slots bound what it keeps;
/// this bounds what a provider's reports can make the gateway hold).
const PER_PROVIDER: usize = 256;

impl PrefixIndex {
    /// `node` keeps the entry `tag` (of `key`) holding `tokens`.
    pub fn insert(&mut self, node: NodeId, tag: &str, key: u64, tokens: &[Token]) {
        let chain = chain(tokens);
        if chain.is_empty() {
            return;
        }
        self.evict(node, tag);
        let entries = self.entries.entry(node).or_default();
        if entries.len() >= PER_PROVIDER {
            return;
        }
        for h in &chain {
            *self
                .blocks
                .entry((key, *h))
                .or_default()
                .entry(node)
                .or_default() += 1;
        }
        entries.insert(tag.to_string(), Entry { key, chain });
    }

    /// `node` evicted the entry `tag`.
    pub fn evict(&mut self, node: NodeId, tag: &str) {
        let Some(e) = self.entries.get_mut(&node).and_then(|m| m.remove(tag)) else {
            return;
        };
        for h in e.chain {
            if let Some(holders) = self.blocks.get_mut(&(e.key, h)) {
                if let Some(n) = holders.get_mut(&node) {
                    *n -= 1;
                    if *n == 0 {
                        holders.remove(&node);
                    }
                }
                if holders.is_empty() {
                    self.blocks.remove(&(e.key, h));
                }
            }
        }
    }

    /// `node` is gone: forget all it kept.
    pub fn forget(&mut self, node: NodeId) {
        let tags: Vec<String> = self
            .entries
            .get(&node)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for t in tags {
            self.evict(node, &t);
        }
        self.entries.remove(&node);
    }

    /// For each provider holding a prefix of `chain` (of `key`), how many
    /// leading blocks it holds.
    pub fn matches(&self, key: u64, chain: &[u64]) -> HashMap<NodeId, usize> {
        let mut out: HashMap<NodeId, usize> = HashMap::new();
        let Some(first) = chain.first().and_then(|h| self.blocks.get(&(key, *h))) else {
            return out;
        };
        for node in first.keys() {
            out.insert(*node, 1);
        }
        for (i, h) in chain.iter().enumerate().skip(1) {
            let Some(holders) = self.blocks.get(&(key, *h)) else {
                break;
            };
            let mut any = false;
            for (node, n) in out.iter_mut() {
                if *n == i && holders.contains_key(node) {
                    *n = i + 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    #[test]
    fn longest_prefixes_per_provider_and_key_and_evictions() {
        let convo: Vec<Token> = (0..200).collect();
        let mut idx = PrefixIndex::default();
        idx.insert(node(1), "a", 7, &convo[..100]); // 3 blocks
        idx.insert(node(2), "b", 7, &convo[..40]); // 1 block
        idx.insert(node(3), "c", 8, &convo[..200]); // another key
        let m = idx.matches(7, &chain(&convo));
        assert_eq!(m.get(&node(1)), Some(&3));
        assert_eq!(m.get(&node(2)), Some(&1));
        assert_eq!(
            m.get(&node(3)),
            None,
            "another account's entry never matches"
        );
        // A different conversation shares nothing.
        let other: Vec<Token> = (1000..1200).collect();
        assert!(idx.matches(7, &chain(&other)).is_empty());
        idx.evict(node(1), "a");
        assert_eq!(idx.matches(7, &chain(&convo)).get(&node(1)), None);
        idx.forget(node(2));
        assert!(idx.matches(7, &chain(&convo)).is_empty());
        assert!(
            idx.blocks.keys().all(|(k, _)| *k == 8),
            "nothing of key 7 left"
        );
        assert_ne!(cache_key(b"s", "acct"), cache_key(b"s", "other"));
        assert_ne!(cache_key(b"s", "acct"), cache_key(b"t", "acct"));
    }
}
