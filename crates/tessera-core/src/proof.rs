//! The proof a provider sends with a finished job.
//!
//! The commitment scheme (TOPLOC-style: top-k entries of the final hidden
//! states of each chunk of tokens, as a polynomial over a prime field) is
//! computed and checked in `tessera_engine::commit`; this is the data that
//! travels, and its sizes.

use serde::{Deserialize, Serialize};

/// Generated tokens per commitment chunk.
pub const CHUNK: usize = 32;
/// Hidden-state entries kept per full chunk.
pub const TOP_K: usize = 128;

/// Entries kept for a chunk of `tokens` tokens (TOP_K for a full chunk; a
/// shorter last chunk keeps them in proportion, 4 per token).
pub fn entries_for(tokens: usize) -> usize {
    (TOP_K * tokens).div_ceil(CHUNK).min(TOP_K)
}

/// What a provider sends with a finished job so that it can be audited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Proof {
    /// Tokens per chunk the commitments were made with.
    pub chunk: u32,
    /// Entries per full chunk.
    pub top_k: u32,
    /// Little-endian `u16` coefficients: `top_k` per full chunk, fewer for
    /// a short last one ([`entries_for`]); base64 in JSON.
    #[serde(with = "base64_bytes")]
    pub commitments: Vec<u8>,
    /// Log-probability of each generated token (the raw distribution).
    pub logprobs: Vec<f32>,
}

impl Proof {
    /// The commitment of chunk `i`, if there is one.
    pub fn chunk_commitment(&self, i: usize) -> Option<Vec<u16>> {
        if self.chunk as usize != CHUNK || self.top_k as usize != TOP_K {
            return None;
        }
        let tokens = self.logprobs.len().checked_sub(i * CHUNK)?.min(CHUNK);
        if tokens == 0 {
            return None;
        }
        let start = i * TOP_K * 2;
        let bytes = self
            .commitments
            .get(start..start + entries_for(tokens) * 2)?;
        Some(
            bytes
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect(),
        )
    }

    /// Chunks the generated tokens make.
    pub fn chunks(&self) -> usize {
        self.logprobs.len().div_ceil(CHUNK)
    }

    /// Whether the commitments have exactly the size the tokens call for.
    pub fn well_formed(&self) -> bool {
        let n = self.logprobs.len();
        let expected: usize = (0..self.chunks())
            .map(|i| entries_for((n - i * CHUNK).min(CHUNK)) * 2)
            .sum();
        self.chunk as usize == CHUNK
            && self.top_k as usize == TOP_K
            && self.commitments.len() == expected
    }
}

mod base64_bytes {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}
