//! A client's provider preferences (OpenRouter's `provider` object).

use tessera_core::Price;

/// How the router should choose providers for one request. Providers are
/// named by node id or any prefix of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePrefs {
    /// Try these first, in this order.
    pub order: Vec<String>,
    /// Use no provider outside this list (empty: any).
    pub only: Vec<String>,
    /// Never use these.
    pub ignore: Vec<String>,
    /// When `order` is given: may other providers be used if those fail?
    pub allow_fallbacks: bool,
    /// Rank by this instead of the default blend.
    pub sort: Option<Sort>,
    /// Providers above this price are not used (`None`: no cap).
    pub max_price: Option<Price>,
}

/// Ranking asked for by `provider.sort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// Cheapest first (output price, then input price).
    Price,
    /// Lowest measured time to first token first.
    Latency,
    /// Highest verified tokens per second first.
    Throughput,
}

impl RoutePrefs {
    /// No preferences: any provider, fallbacks allowed.
    pub fn any() -> Self {
        RoutePrefs {
            allow_fallbacks: true,
            ..RoutePrefs::default()
        }
    }

    /// Whether the provider `node` (hex) matches `pattern` (a node id or a
    /// prefix of one, case-insensitive).
    pub fn names(pattern: &str, node: &str) -> bool {
        !pattern.is_empty()
            && node
                .get(..pattern.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(pattern))
    }

    /// Whether these preferences let the router use provider `node` at all.
    pub fn allows(&self, node: &str) -> bool {
        let named = |list: &[String]| list.iter().any(|p| Self::names(p, node));
        (self.only.is_empty() || named(&self.only))
            && !named(&self.ignore)
            && (self.order.is_empty() || self.allow_fallbacks || named(&self.order))
    }

    /// Whether `price` is within `max_price`.
    pub fn affords(&self, price: &Price) -> bool {
        self.max_price.is_none_or(|cap| price.within(&cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ignore_order_and_fallbacks() {
        let prefs = |f: fn(&mut RoutePrefs)| {
            let mut p = RoutePrefs::any();
            f(&mut p);
            p
        };
        assert!(prefs(|p| p.only = vec!["bb".into()]).allows("bb22"));
        assert!(!prefs(|p| p.only = vec!["bb".into()]).allows("aa11"));
        assert!(!prefs(|p| p.ignore = vec!["AA1".into()]).allows("aa11"));
        assert!(!prefs(|p| {
            p.order = vec!["bb".into()];
            p.allow_fallbacks = false;
        })
        .allows("aa11"));
        assert!(!RoutePrefs::names("", "aa"));
        assert!(!RoutePrefs::names("aaa", "aa"));
    }
}
