//! One answer's parts as they are billed, and the rule of what a client
//! pays for — one place, for the API's bills and the gateway's canaries.
//!
//! An answer has a part per provider (several when it was continued after
//! a provider failed), each with its price and the tokens it produced. The
//! prompt is paid once. On the network only parts that ended verifiable
//! (with a countersigned receipt: a proof of exactly what they streamed)
//! are paid, the prompt going with the first of them; locally every part
//! is paid.

use tessera_core::Price;

/// One provider's stretch of an answer, as billed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BilledPart {
    /// Who served it (node id, or `local`).
    pub provider: String,
    /// At what price.
    pub price: Price,
    /// Prompt tokens billed to it (the first paid part's only).
    pub prompt_tokens: u64,
    /// Tokens it generated.
    pub completion_tokens: u64,
    /// The provider's receipt for this part, countersigned by the gateway
    /// (JSON), when it sent one.
    pub receipt: Option<String>,
}

/// An answer's parts so far.
#[derive(Debug, Default)]
pub struct Parts {
    parts: Vec<BilledPart>,
    prompt_tokens: u64,
    receipts_required: bool,
}

impl Parts {
    /// No part yet, for a prompt of `prompt_tokens`.
    pub fn new(prompt_tokens: u64) -> Parts {
        Parts {
            prompt_tokens,
            ..Parts::default()
        }
    }

    /// Pay only parts with a countersigned receipt (the network).
    pub fn require_receipts(&mut self, required: bool) {
        self.receipts_required = required;
    }

    /// A provider starts (or takes over) the answer at `price`.
    pub fn start(&mut self, provider: String, price: Price) {
        let prompt_tokens = if self.parts.is_empty() {
            self.prompt_tokens
        } else {
            0
        };
        self.parts.push(BilledPart {
            provider,
            price,
            prompt_tokens,
            completion_tokens: 0,
            receipt: None,
        });
    }

    /// One more token from the current provider.
    pub fn token(&mut self) {
        if let Some(p) = self.parts.last_mut() {
            p.completion_tokens += 1;
        }
    }

    /// The current provider's countersigned receipt for its part.
    pub fn receipt(&mut self, receipt: String) {
        if let Some(p) = self.parts.last_mut() {
            p.receipt = Some(receipt);
        }
    }

    /// The answer ended with `completion_tokens` in all: tokens not seen
    /// one by one (a final end-of-generation token) go to the last part.
    pub fn ended(&mut self, completion_tokens: u64) {
        let counted: u64 = self.parts.iter().map(|p| p.completion_tokens).sum();
        if let Some(last) = self.parts.last_mut() {
            last.completion_tokens += completion_tokens.saturating_sub(counted);
        }
    }

    /// The parts the client pays for, taken out (none are left).
    pub fn payable(&mut self) -> Vec<BilledPart> {
        let parts = std::mem::take(&mut self.parts);
        if !self.receipts_required {
            return parts;
        }
        let mut paid: Vec<BilledPart> = parts
            .into_iter()
            .filter(|p| p.receipt.is_some())
            .map(|p| BilledPart {
                prompt_tokens: 0,
                ..p
            })
            .collect();
        if let Some(first) = paid.first_mut() {
            first.prompt_tokens = self.prompt_tokens;
        }
        paid
    }

    /// Move these parts out, leaving none.
    pub fn take(&mut self) -> Parts {
        Parts {
            parts: std::mem::take(&mut self.parts),
            prompt_tokens: self.prompt_tokens,
            receipts_required: self.receipts_required,
        }
    }

    /// Forget every part (the answer failed: nothing is paid).
    pub fn clear(&mut self) {
        self.parts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Price = Price {
        input: 20,
        output: 80,
    };

    #[test]
    fn on_the_network_only_proven_parts_are_paid_and_the_prompt_once() {
        let mut parts = Parts::new(10);
        parts.require_receipts(true);
        parts.start("a".into(), P); // dies without a proof
        parts.token();
        parts.token();
        parts.start("b".into(), P);
        parts.token();
        parts.receipt("r".into());
        parts.ended(4); // one end-of-generation token not streamed
        let paid = parts.payable();
        assert_eq!(paid.len(), 1);
        assert_eq!(paid[0].provider, "b");
        assert_eq!((paid[0].prompt_tokens, paid[0].completion_tokens), (10, 2));
        assert!(parts.payable().is_empty(), "taken out");
    }

    #[test]
    fn locally_every_part_is_paid() {
        let mut parts = Parts::new(3);
        parts.start("local".into(), P);
        parts.token();
        let paid = parts.payable();
        assert_eq!((paid[0].prompt_tokens, paid[0].completion_tokens), (3, 1));
    }
}
