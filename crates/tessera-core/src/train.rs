//! What a training round is, as every layer names it: a model's
//! architecture ([`ModelSpec`]), a client's local recipe ([`Recipe`]) and
//! parameters on the wire ([`Weights`]). The training itself is in
//! `tessera-train`; these types live here so that the provider protocol can
//! carry them without depending on the ML crate.

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A model's architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSpec {
    /// Multinomial logistic regression: one linear layer and softmax.
    Logistic {
        /// Values per sample.
        inputs: usize,
        /// Classes.
        classes: usize,
    },
    /// One hidden ReLU layer.
    Mlp {
        /// Values per sample.
        inputs: usize,
        /// Hidden units.
        hidden: usize,
        /// Classes.
        classes: usize,
    },
}

impl ModelSpec {
    /// Shapes of its parameter tensors, in the flat vector's order
    /// (weights as inputs × outputs, then biases, layer by layer).
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        match *self {
            ModelSpec::Logistic { inputs, classes } => vec![vec![inputs, classes], vec![classes]],
            ModelSpec::Mlp {
                inputs,
                hidden,
                classes,
            } => vec![
                vec![inputs, hidden],
                vec![hidden],
                vec![hidden, classes],
                vec![classes],
            ],
        }
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.shapes()
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// Values per sample it takes.
    pub fn inputs(&self) -> usize {
        match *self {
            ModelSpec::Logistic { inputs, .. } | ModelSpec::Mlp { inputs, .. } => inputs,
        }
    }

    /// Classes it tells apart.
    pub fn classes(&self) -> usize {
        match *self {
            ModelSpec::Logistic { classes, .. } | ModelSpec::Mlp { classes, .. } => classes,
        }
    }
}

/// How a client trains locally in one round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Passes over the local data.
    pub epochs: u32,
    /// Samples per step.
    pub batch_size: usize,
    /// SGD step size.
    pub learning_rate: f32,
    /// FedProx's proximal term μ (0: plain local SGD): each step also pulls
    /// the parameters toward the round's global ones by μ·(w − w_global).
    pub proximal: f32,
    /// Seed of the shuffles (a round's seed, so the round can be re-executed).
    pub seed: u64,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.1,
            proximal: 0.0,
            seed: 0,
        }
    }
}

/// Parameters on the wire: a flat `f32` vector, sent as the base64 of its
/// little-endian bytes (5.33 bytes a parameter, exact, where JSON numbers
/// would take about 11).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Weights(pub Vec<f32>);

impl Weights {
    /// Bytes of the raw vector (4 a parameter): what `bytes moved` counts.
    pub fn raw_bytes(&self) -> usize {
        self.0.len() * 4
    }
}

impl Serialize for Weights {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = self.0.iter().flat_map(|v| v.to_le_bytes()).collect();
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for Weights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)?;
        if bytes.len() % 4 != 0 {
            return Err(serde::de::Error::custom(
                "weights must be a whole number of f32 values",
            ));
        }
        Ok(Weights(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }
}

/// SecAgg+'s messages as they cross the wire (the protocol is in
/// `tessera_train::secagg`): keys hex, byte strings and masked vectors
/// base64 (4 bytes a value, as compact as the plain update).
pub mod secagg {
    use serde::{Deserialize, Serialize};

    /// Limbs of a shared 32-byte secret (7 bytes each, below the prime).
    pub const SHARE_LIMBS: usize = 5;

    /// Stage 1: a client's public keys.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct AdvertiseKeys {
        /// The client.
        pub id: u32,
        /// Key the shares it receives are encrypted to.
        #[serde(with = "hex32")]
        pub c_pk: [u8; 32],
        /// Key its pairwise masks are agreed with.
        #[serde(with = "hex32")]
        pub s_pk: [u8; 32],
    }

    impl AdvertiseKeys {
        /// What the client's node key signs: round, id and both keys.
        pub fn signed_bytes(&self, round: u64) -> Vec<u8> {
            let mut b = b"tessera secagg v1 keys".to_vec();
            b.extend_from_slice(&round.to_le_bytes());
            b.extend_from_slice(&self.id.to_le_bytes());
            b.extend_from_slice(&self.c_pk);
            b.extend_from_slice(&self.s_pk);
            b
        }
    }

    /// Stage 2: one share pair, encrypted from `from` to `to`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct EncryptedShare {
        /// Sender.
        pub from: u32,
        /// Recipient.
        pub to: u32,
        /// ChaCha20 ciphertext of the two shares.
        #[serde(with = "b64_bytes")]
        pub ciphertext: Vec<u8>,
        /// BLAKE3 keyed MAC over nonce, ends and ciphertext.
        #[serde(with = "hex32")]
        pub tag: [u8; 32],
    }

    /// Stage 3: a client's masked, quantized vector.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MaskedInput {
        /// The client.
        pub id: u32,
        /// Its vector plus its masks, modulo 2^32.
        #[serde(with = "b64_u32")]
        pub masked: Vec<u32>,
    }

    /// A Shamir share of a 32-byte secret: the holder's x and five limbs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Share {
        /// The evaluation point (the holder's id + 1).
        pub x: u64,
        /// The polynomial's values, one per limb.
        pub y: [u64; SHARE_LIMBS],
    }

    /// Stage 4: what one survivor reveals.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Unmasking {
        /// The client revealing.
        pub id: u32,
        /// Shares of survivors' self-mask seeds, by owner.
        pub seed_shares: Vec<(u32, Share)>,
        /// Shares of dropped clients' mask keys, by owner.
        pub key_shares: Vec<(u32, Share)>,
    }

    mod hex32 {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&hex::encode(v))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
            let text = String::deserialize(d)?;
            hex::decode(text)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| serde::de::Error::custom("expected 32 bytes of hex"))
        }
    }

    mod b64_bytes {
        use base64::Engine as _;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            let text = String::deserialize(d)?;
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(serde::de::Error::custom)
        }
    }

    mod b64_u32 {
        use serde::{Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            super::b64_bytes::serialize(&bytes, s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
            let bytes = super::b64_bytes::deserialize(d)?;
            if bytes.len() % 4 != 0 {
                return Err(serde::de::Error::custom("a whole number of u32 values"));
            }
            Ok(bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secagg_messages_round_trip_compactly() {
        use super::secagg::*;
        let m = MaskedInput {
            id: 3,
            masked: vec![0, u32::MAX, 7],
        };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.len() < 40, "{text}");
        assert_eq!(serde_json::from_str::<MaskedInput>(&text).unwrap(), m);
        let k = AdvertiseKeys {
            id: 1,
            c_pk: [7; 32],
            s_pk: [9; 32],
        };
        let text = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<AdvertiseKeys>(&text).unwrap(), k);
        assert!(
            serde_json::from_str::<AdvertiseKeys>(r#"{"id":1,"c_pk":"07","s_pk":"09"}"#).is_err()
        );
    }

    #[test]
    fn weights_round_trip_exactly_and_refuse_a_torn_vector() {
        let w = Weights(vec![0.1, -3.5e-8, f32::MAX, 0.0]);
        let text = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<Weights>(&text).unwrap(), w);
        assert_eq!(
            serde_json::from_str::<Weights>("\"AAAAAA==\"").unwrap(),
            Weights(vec![0.0])
        );
        assert!(
            serde_json::from_str::<Weights>("\"AAA=\"").is_err(),
            "3 bytes"
        );
        assert!(serde_json::from_str::<Weights>("\"not base64!\"").is_err());
    }
}
