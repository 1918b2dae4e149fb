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

/// A small decoder-only transformer language model over bytes (GPT-style:
/// token and position embeddings, pre-norm blocks of causal self-attention
/// and a GELU MLP, a final norm, the output head tied to the token
/// embedding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmSpec {
    /// Token vocabulary (256: bytes).
    pub vocab: usize,
    /// Tokens of context (the window trained on).
    pub context: usize,
    /// Width of the residual stream.
    pub width: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads (dividing `width`).
    pub heads: usize,
}

impl Default for LmSpec {
    fn default() -> Self {
        LmSpec {
            vocab: 256,
            context: 64,
            width: 128,
            layers: 2,
            heads: 4,
        }
    }
}

impl LmSpec {
    /// Its parameter tensors, in the flat vector's order, by name.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, t, d) = (self.vocab, self.context, self.width);
        let mut out = vec![
            ("tok_emb".to_string(), vec![v, d]),
            ("pos_emb".to_string(), vec![t, d]),
        ];
        for l in 0..self.layers {
            for (name, shape) in [
                ("ln1.g", vec![d]),
                ("ln1.b", vec![d]),
                ("attn.w_qkv", vec![d, 3 * d]),
                ("attn.b_qkv", vec![3 * d]),
                ("attn.w_o", vec![d, d]),
                ("attn.b_o", vec![d]),
                ("ln2.g", vec![d]),
                ("ln2.b", vec![d]),
                ("mlp.w_fc", vec![d, 4 * d]),
                ("mlp.b_fc", vec![4 * d]),
                ("mlp.w_proj", vec![4 * d, d]),
                ("mlp.b_proj", vec![d]),
            ] {
                out.push((format!("block{l}.{name}"), shape));
            }
        }
        out.push(("ln_f.g".to_string(), vec![d]));
        out.push(("ln_f.b".to_string(), vec![d]));
        out
    }

    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Why the spec cannot be built, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if !(2..=65_536).contains(&self.vocab) {
            return Err(format!("vocab {} outside 2–65536", self.vocab));
        }
        if !(2..=1024).contains(&self.context) {
            return Err(format!("context {} outside 2–1024", self.context));
        }
        if self.heads == 0
            || self.width == 0
            || !self.width.is_multiple_of(self.heads)
            || self.width > 2048
        {
            return Err(format!(
                "width {} must be a multiple of heads {} (at most 2048)",
                self.width, self.heads
            ));
        }
        if !(1..=48).contains(&self.layers) {
            return Err(format!("layers {} outside 1–48", self.layers));
        }
        Ok(())
    }
}

/// A worker's inner optimizer in a DiLoCo task: AdamW, its learning rate
/// warmed up linearly then decayed by a cosine over the task's inner steps.
/// Its moments start from zero every outer step, so each (worker, outer
/// step) can be re-executed from public inputs alone.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InnerOptimizer {
    /// Peak learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    /// Decoupled weight decay (of matrices and embeddings, not of biases
    /// and norm gains).
    pub weight_decay: f32,
    /// Steps of linear warm-up (counted over the whole task).
    pub warmup: u64,
    /// Steps of the whole task (where the cosine ends).
    pub total_steps: u64,
    /// The learning rate at the end, as a share of the peak.
    pub min_lr_ratio: f32,
}

impl Default for InnerOptimizer {
    fn default() -> Self {
        InnerOptimizer {
            lr: 3e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            warmup: 100,
            total_steps: 10_000,
            min_lr_ratio: 0.1,
        }
    }
}

impl InnerOptimizer {
    /// The learning rate at task-wide step `step` (from 0).
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.lr * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total_steps.saturating_sub(self.warmup).max(1);
        let done = (step - self.warmup).min(span) as f64 / span as f64;
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * done).cos());
        let min = f64::from(self.min_lr_ratio);
        (f64::from(self.lr) * (min + (1.0 - min) * cos)) as f32
    }
}

/// One worker's share of a DiLoCo outer step: from the checkpoint, `steps`
/// inner AdamW steps of `batch` windows drawn (from `seed`) in its shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InnerWork {
    /// The model.
    pub spec: LmSpec,
    /// The outer step (from 1).
    pub outer_step: u32,
    /// BLAKE3 (hex) of the global parameters to start from: the checkpoint.
    pub checkpoint: String,
    /// Its shard: a byte range of the training text.
    pub shard: (u64, u64),
    /// Inner steps to take.
    pub steps: u32,
    /// Windows per step.
    pub batch: usize,
    /// Seed of the windows drawn.
    pub seed: u64,
    /// The task-wide number of its first step (for the schedule).
    pub first_step: u64,
    /// The optimizer.
    pub optimizer: InnerOptimizer,
    /// States (parameters and moments) are committed every this many steps.
    pub checkpoint_every: u32,
}

/// Where a training task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting for enough providers.
    Waiting,
    /// Running rounds.
    Running,
    /// Every round ran.
    Completed,
    /// Stopped by its owner.
    Cancelled,
    /// Stopped by a failure (see `error`).
    Failed,
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
