//! Prices.

use serde::{Deserialize, Serialize};

/// What a provider charges, in micro-credits per token (which is the same
/// number as credits per million tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Price {
    /// Per prompt (input) token.
    pub input: u64,
    /// Per generated (output) token.
    pub output: u64,
}

impl Price {
    /// The cost of these tokens at this price, exactly (saturating, so an
    /// absurd price costs more than any balance rather than wrapping).
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        prompt_tokens
            .saturating_mul(self.input)
            .saturating_add(completion_tokens.saturating_mul(self.output))
    }

    /// The dearer of two prices on each side.
    pub fn max(self, other: Price) -> Price {
        Price {
            input: self.input.max(other.input),
            output: self.output.max(other.output),
        }
    }

    /// Whether this price is within `cap` on both sides.
    pub fn within(&self, cap: &Price) -> bool {
        self.input <= cap.input && self.output <= cap.output
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_exact_and_saturates() {
        let p = Price {
            input: 20,
            output: 80,
        };
        assert_eq!(p.cost(10, 5), 600);
        let absurd = Price {
            input: u64::MAX,
            output: 1,
        };
        assert_eq!(absurd.cost(2, 0), u64::MAX);
        assert!(p.within(&Price {
            input: 20,
            output: 80
        }));
        assert!(!p.within(&Price {
            input: 19,
            output: 100
        }));
    }
}
