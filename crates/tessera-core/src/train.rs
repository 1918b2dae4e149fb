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

#[cfg(test)]
mod tests {
    use super::*;

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
