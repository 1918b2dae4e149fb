//! The providers connected now that offer DiLoCo compute.

use std::collections::BTreeMap;
use std::sync::Mutex;

use iroh::endpoint::Connection;
use tessera_core::NodeId;
use tessera_protocol::ComputeOffer;

/// One provider that offers compute.
#[derive(Clone, Debug)]
pub struct Worker {
    /// Its node id.
    pub node: NodeId,
    /// Its session (a reconnect replaces it).
    pub session: u64,
    /// The connection to open step streams on.
    pub conn: Connection,
    /// What it said of its text and price.
    pub offer: ComputeOffer,
}

/// Every provider offering compute, connected now, by node id.
#[derive(Debug, Default)]
pub struct Workers {
    members: Mutex<BTreeMap<NodeId, Worker>>,
}

impl Workers {
    /// A provider joined (a new session replaces the old).
    pub fn join(&self, worker: Worker) {
        if let Ok(mut m) = self.members.lock() {
            m.insert(worker.node, worker);
        }
    }

    /// A session ended (a newer session of the same node stays).
    pub fn leave(&self, node: &NodeId, session: u64) {
        if let Ok(mut m) = self.members.lock() {
            if m.get(node).is_some_and(|w| w.session == session) {
                m.remove(node);
            }
        }
    }

    /// Workers holding text `corpus` at `max_price` per step or less, in
    /// node-id order.
    pub fn eligible(&self, corpus: &str, max_price: u64) -> Vec<Worker> {
        self.members.lock().map_or_else(
            |_| Vec::new(),
            |m| {
                m.values()
                    .filter(|w| w.offer.corpus == corpus && w.offer.price_per_step <= max_price)
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
