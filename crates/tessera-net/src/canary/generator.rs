//! Canary requests a provider cannot tell from clients' requests.
//!
//! A canary that always looked alike (one prompt shape, one sampling
//! setting, one length, `ignore_eos`) would let a provider answer canaries
//! honestly and cheat on everything else. Each canary here is drawn from a
//! large space: one of many task templates, filled with random words,
//! names and numbers, asked as a chat or as a plain completion, with a
//! random sampling setting (greedy or tempered, with or without top-k,
//! top-p, min-p), a random length and sometimes stop sequences — the same
//! mix clients send. An operator who wants prompts nobody can read in the
//! source gives a file of their own (`--canary-prompts`, one prompt per
//! line), kept outside the repository; its lines are then used instead of
//! the templates, with the same random settings.

use tessera_core::SamplingParams;

/// Unguessable randomness for one canary.
pub struct Dice {
    state: [u64; 4],
}

impl Dice {
    /// Seeded from the operating system's random source.
    pub fn new() -> Result<Dice, tessera_core::RandomError> {
        let b = tessera_core::secret_bytes::<32>()?;
        let mut state = [0u64; 4];
        for (i, s) in state.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            *s = u64::from_le_bytes(w) | 1;
        }
        Ok(Dice { state })
    }

    /// xoshiro256**.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// A number in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next_u64() as usize % items.len()]
    }
}

const TEMPLATES: &[&str] = &[
    "Write a short poem about {a}.",
    "Explain how {a} is related to {b}, in simple words.",
    "List three facts about {a}.",
    "What is {n} plus {m}?",
    "What is {n} times {m}? Show your work.",
    "Write a story about {name} and a {a}.",
    "Give me a recipe that uses {a} and {b}.",
    "Describe a {a} to someone who has never seen one.",
    "Why do people like {a}?",
    "Write a haiku about {a} in the {season}.",
    "Compare {a} and {b}.",
    "Write a Python function that returns the {n}th Fibonacci number.",
    "Write a letter from {name} to {name2} about {a}.",
    "Summarize the history of {a} in two sentences.",
    "Translate into French: I saw a {a} near the {b}.",
    "Give {name} three tips for learning about {a}.",
    "Is a {a} bigger than a {b}? Answer briefly.",
    "Write a dialogue between a {a} and a {b}.",
    "Count from {n} to {m2}.",
    "Name five things you can do with a {a}.",
    "What would happen if every {a} turned into a {b}?",
    "Write an advertisement for a {a}.",
    "Tell me a joke about {a}.",
    "Describe the {season} in a town famous for its {a}.",
    "Write the first paragraph of a mystery novel set in a {b}.",
    "Explain {a} to a five-year-old.",
    "Make a list of questions to ask about {a}.",
    "Write a product review of a {a}, {n} stars out of 5.",
    "{name} has {n} apples and buys {m} more. How many now?",
    "Describe a day in the life of a {a} keeper named {name}.",
];

const COMPLETIONS: &[&str] = &[
    "The {a} was the first thing {name} noticed when",
    "Once upon a time, in a land of {a} and {b},",
    "Here are {n} reasons why {a} matters:\n1.",
    "Dear {name},\n\nI am writing to you about the {a}",
    "def {a}_count(items):\n    \"\"\"Count the {b} in items.\"\"\"\n",
    "In the {season} of that year, the {a}",
];

const WORDS: &[&str] = &[
    "river",
    "copper",
    "lantern",
    "orbit",
    "meadow",
    "violin",
    "harbor",
    "pepper",
    "glacier",
    "ember",
    "tunnel",
    "falcon",
    "quartz",
    "saddle",
    "thistle",
    "canyon",
    "velvet",
    "magnet",
    "bicycle",
    "teapot",
    "volcano",
    "library",
    "garden",
    "robot",
    "whale",
    "castle",
    "forest",
    "piano",
    "bridge",
    "comet",
    "desert",
    "island",
    "kettle",
    "ladder",
    "mirror",
    "needle",
    "ocean",
    "pillow",
    "rocket",
    "spoon",
    "tiger",
    "umbrella",
    "village",
    "window",
    "zebra",
    "apple",
    "basket",
    "candle",
    "dragon",
    "engine",
    "feather",
    "guitar",
    "hammer",
    "jacket",
    "kite",
    "lemon",
    "mountain",
    "notebook",
    "owl",
    "parrot",
    "rabbit",
    "sandwich",
    "tractor",
    "valley",
    "wagon",
    "yacht",
    "anchor",
    "bakery",
    "cactus",
    "dolphin",
    "elephant",
    "fountain",
    "giraffe",
    "helmet",
    "iceberg",
    "jungle",
    "koala",
    "lighthouse",
    "museum",
    "nest",
    "oven",
    "penguin",
    "quilt",
    "rainbow",
    "satellite",
    "telescope",
    "unicorn",
    "vase",
    "windmill",
    "bread",
    "cheese",
    "clock",
    "cloud",
    "coffee",
    "compass",
    "crystal",
    "diamond",
    "drum",
    "farm",
    "flower",
    "honey",
    "lake",
    "map",
    "moon",
    "music",
    "paper",
    "planet",
    "school",
    "ship",
    "star",
    "storm",
    "sugar",
    "train",
    "tree",
    "wind",
    "winter",
    "wolf",
];

const NAMES: &[&str] = &[
    "Ada", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ines", "Jonas", "Kofi",
    "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Viktor",
];

const SEASONS: &[&str] = &["spring", "summer", "autumn", "winter"];

/// One canary's request, before tokenization.
#[derive(Clone, Debug, PartialEq)]
pub struct CanaryRequest {
    /// The text: a user message (`chat`) or a raw completion prompt.
    pub text: String,
    /// Asked as a chat (the model's template) or as a plain completion.
    pub chat: bool,
    /// Sampling, seed included.
    pub sampling: SamplingParams,
    /// Tokens asked for.
    pub max_tokens: u32,
    /// Stop sequences.
    pub stop: Vec<String>,
}

fn fill(template: &str, dice: &mut Dice) -> String {
    let n = dice.range(2, 99);
    let mut out = template.to_string();
    for (key, value) in [
        ("{a}", dice.pick(WORDS).to_string()),
        ("{b}", dice.pick(WORDS).to_string()),
        ("{name}", dice.pick(NAMES).to_string()),
        ("{name2}", dice.pick(NAMES).to_string()),
        ("{season}", dice.pick(SEASONS).to_string()),
        ("{n}", n.to_string()),
        ("{m}", dice.range(2, 999).to_string()),
        ("{m2}", (n + dice.range(3, 20)).to_string()),
    ] {
        out = out.replace(key, &value);
    }
    out
}

/// Draw one canary. `prompts`: the operator's own (used instead of the
/// templates when given); `max_tokens`: the longest canary.
pub fn draw(dice: &mut Dice, prompts: &[String], max_tokens: u32) -> CanaryRequest {
    let (text, chat) = match prompts.is_empty() {
        false => (dice.pick(prompts).clone(), dice.unit() < 0.8),
        true if dice.unit() < 0.85 => {
            let template: &str = dice.pick::<&str>(TEMPLATES);
            (fill(template, dice), true)
        }
        true => {
            let template: &str = dice.pick::<&str>(COMPLETIONS);
            (fill(template, dice), false)
        }
    };
    let greedy = dice.unit() < 0.25;
    let sampling = SamplingParams {
        temperature: if greedy {
            0.0
        } else {
            (0.2 + dice.unit() * 1.1) as f32
        },
        top_k: if dice.unit() < 0.3 {
            dice.range(10, 100) as u32
        } else {
            0
        },
        top_p: if dice.unit() < 0.4 {
            (0.8 + dice.unit() * 0.19) as f32
        } else {
            1.0
        },
        min_p: if dice.unit() < 0.2 {
            (0.02 + dice.unit() * 0.08) as f32
        } else {
            0.0
        },
        seed: dice.next_u64(),
    };
    // Lengths spread from short to the longest allowed, more short ones.
    let longest = max_tokens.max(2);
    let shortest = longest.min(8);
    let spread = (dice.unit() * dice.unit() * f64::from(longest - shortest)) as u32;
    let stop = match dice.range(0, 9) {
        0 => vec!["\n\n".to_string()],
        1 => vec![".".to_string()],
        2 => vec![dice.pick(WORDS).to_string()],
        _ => vec![],
    };
    CanaryRequest {
        text,
        chat,
        sampling,
        max_tokens: shortest + spread,
        stop,
    }
}

/// Whether `text` could have come from the shipped templates: what a
/// provider that read this source would check to recognise canaries (the
/// `canary-aware` adversary does exactly that; only an operator's own
/// prompts defeat it, and client traffic audited at random catches it).
pub fn from_templates(text: &str) -> bool {
    TEMPLATES.iter().chain(COMPLETIONS).any(|t| {
        let fixed: Vec<&str> = t
            .split(['{', '}'])
            .enumerate()
            .filter(|(i, s)| i % 2 == 0 && s.len() >= 4)
            .map(|(_, s)| s)
            .collect();
        !fixed.is_empty() && fixed.iter().all(|part| text.contains(part))
    })
}

#[cfg(test)]
mod tests {
    use crate::canary::generator::{draw, from_templates, CanaryRequest, Dice};

    #[test]
    fn canaries_vary_in_every_respect() {
        let mut dice = Dice::new().unwrap();
        let draws: Vec<CanaryRequest> = (0..400).map(|_| draw(&mut dice, &[], 64)).collect();
        let texts: std::collections::HashSet<&str> =
            draws.iter().map(|d| d.text.as_str()).collect();
        // (Short templates with one word slot repeat now and then.)
        assert!(texts.len() > 350, "only {} distinct prompts", texts.len());
        assert!(draws.iter().any(|d| !d.chat) && draws.iter().any(|d| d.chat));
        assert!(draws.iter().any(|d| d.sampling.temperature == 0.0));
        assert!(draws.iter().any(|d| d.sampling.temperature > 1.0));
        assert!(draws.iter().any(|d| d.sampling.top_k > 0));
        assert!(draws.iter().any(|d| d.sampling.top_p < 1.0));
        assert!(draws.iter().any(|d| d.sampling.min_p > 0.0));
        assert!(draws.iter().any(|d| !d.stop.is_empty()));
        let lengths: std::collections::HashSet<u32> = draws.iter().map(|d| d.max_tokens).collect();
        assert!(lengths.len() > 20, "{lengths:?}");
        assert!(draws.iter().all(|d| (8..=64).contains(&d.max_tokens)));
        assert!(draws.iter().all(|d| !d.text.contains('{')));
        assert!(
            draws.iter().all(|d| from_templates(&d.text)),
            "the recogniser misses some"
        );
        assert!(!from_templates(
            "Write a long story about a dragon who learns to bake bread."
        ));
    }

    #[test]
    fn an_operators_prompts_replace_the_templates() {
        let mut dice = Dice::new().unwrap();
        let mine = vec!["How tall is the tallest tree?".to_string()];
        for _ in 0..20 {
            let d = draw(&mut dice, &mine, 32);
            assert_eq!(d.text, mine[0]);
            assert!(!from_templates(&d.text));
        }
    }
}
