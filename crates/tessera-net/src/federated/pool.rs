//! The providers connected now that train, as their `Hello` described
//! them.

use std::collections::BTreeMap;
use std::sync::Mutex;

use iroh::endpoint::Connection;
use tessera_core::NodeId;
use tessera_protocol::TrainingOffer;

/// One provider that trains.
#[derive(Clone, Debug)]
pub struct Trainer {
    /// Its node id.
    pub node: NodeId,
    /// Its session (a reconnect replaces it).
    pub session: u64,
    /// The connection to open round streams on.
    pub conn: Connection,
    /// What it said of its data and price.
    pub offer: TrainingOffer,
}

/// Every provider that trains, connected now, by node id.
#[derive(Debug, Default)]
pub struct Trainers {
    members: Mutex<BTreeMap<NodeId, Trainer>>,
}

impl Trainers {
    /// A provider joined (or rejoined: its new session replaces the old).
    pub fn join(&self, trainer: Trainer) {
        if let Ok(mut m) = self.members.lock() {
            m.insert(trainer.node, trainer);
        }
    }

    /// A session ended (a newer session of the same node stays).
    pub fn leave(&self, node: &NodeId, session: u64) {
        if let Ok(mut m) = self.members.lock() {
            if m.get(node).is_some_and(|t| t.session == session) {
                m.remove(node);
            }
        }
    }

    /// Providers whose data fits a model of `inputs` values and `classes`
    /// classes, at `max_price` per round or less, in node-id order.
    pub fn eligible(&self, inputs: usize, classes: usize, max_price: u64) -> Vec<Trainer> {
        self.members.lock().map_or_else(
            |_| Vec::new(),
            |m| {
                m.values()
                    .filter(|t| {
                        t.offer.inputs == inputs
                            && t.offer.classes == classes
                            && t.offer.price <= max_price
                    })
                    .cloned()
                    .collect()
            },
        )
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.members.lock().map_or(0, |m| m.len())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
