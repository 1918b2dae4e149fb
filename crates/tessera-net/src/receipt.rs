//! Signed receipts: what a provider did for a job, in words both sides sign.
//!
//! At the end of every job the provider signs a [`Receipt`] (job id,
//! gateway, model, hashes of prompt and output tokens, token counts, price,
//! time) with its node key. The gateway accepts it only if the signature is
//! the provider's and every field matches what the gateway itself saw for
//! that job — which also refuses a receipt replayed from another job, since
//! job ids are unique per part of an answer — and then countersigns it. The
//! countersigned receipt is stored with the charge in the ledger; `tessera
//! provider earnings` fetches a provider's receipts and checks both
//! signatures.

use anyhow::{anyhow, bail};
use iroh::{PublicKey, SecretKey, Signature};
use sha2::{Digest, Sha256};
use tessera_core::{now_ms, NodeId, SamplingParams, Token};
use tessera_protocol::{Receipt, Signed};

use crate::node::node_id;

/// sha256 (hex) of tokens, each as 4 little-endian bytes.
pub fn tokens_sha256(tokens: &[Token]) -> String {
    let mut h = Sha256::new();
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// sha256 (hex) of a job's proof and the sampling it claims: the tokens,
/// the sampling settings and seed, the commitments and the logprobs.
pub fn proof_sha256(sampling: &SamplingParams, proof: &tessera_protocol::JobProof) -> String {
    let mut h = Sha256::new();
    h.update(b"tessera proof 1\n");
    for t in &proof.tokens {
        h.update(t.to_le_bytes());
    }
    h.update(serde_json::to_vec(sampling).unwrap_or_default());
    h.update(&proof.proof.commitments);
    for lp in &proof.proof.logprobs {
        h.update(lp.to_le_bytes());
    }
    hex::encode(h.finalize())
}

fn key_of(node: &NodeId) -> anyhow::Result<PublicKey> {
    PublicKey::from_bytes(node.as_bytes()).map_err(|e| anyhow!("bad node id {node}: {e}"))
}

fn signature_of(hex_sig: &str) -> anyhow::Result<Signature> {
    let bytes: [u8; 64] = hex::decode(hex_sig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow!("a signature is 64 bytes of hex"))?;
    Ok(Signature::from_bytes(&bytes))
}

/// Sign `receipt` as its provider.
pub fn sign(receipt: &Receipt, key: &SecretKey) -> Signed {
    // Serializing plain strings and numbers cannot fail.
    let body = serde_json::to_string(receipt).unwrap_or_default();
    let signature = hex::encode(key.sign(body.as_bytes()).to_bytes());
    Signed {
        body,
        signature,
        countersignature: None,
    }
}

/// The receipt in `signed`, if its provider signature is good.
pub fn open(signed: &Signed) -> anyhow::Result<Receipt> {
    let receipt: Receipt =
        serde_json::from_str(&signed.body).map_err(|e| anyhow!("malformed receipt: {e}"))?;
    key_of(&receipt.provider)?
        .verify(signed.body.as_bytes(), &signature_of(&signed.signature)?)
        .map_err(|_| anyhow!("the provider's signature does not match the receipt"))?;
    Ok(receipt)
}

/// Check both signatures of a countersigned receipt.
pub fn verify(signed: &Signed) -> anyhow::Result<Receipt> {
    let receipt = open(signed)?;
    let counter = signed
        .countersignature
        .as_deref()
        .ok_or_else(|| anyhow!("the receipt has no gateway countersignature"))?;
    key_of(&receipt.gateway)?
        .verify(signed.body.as_bytes(), &signature_of(counter)?)
        .map_err(|_| anyhow!("the gateway's countersignature does not match the receipt"))?;
    Ok(receipt)
}

/// Accept a provider's receipt only if it says exactly what the gateway
/// saw; then countersign it.
pub fn accept(
    signed: &Signed,
    expected: &Receipt,
    gateway_key: &SecretKey,
) -> anyhow::Result<Signed> {
    let got = open(signed)?;
    let same = |what: &str, ok: bool| {
        if ok {
            Ok(())
        } else {
            Err(anyhow!("the receipt's {what} does not match the job"))
        }
    };
    same("job id", got.job_id == expected.job_id)?;
    same("gateway", got.gateway == node_id(&gateway_key.public()))?;
    same("provider", got.provider == expected.provider)?;
    same("model", got.model_sha256 == expected.model_sha256)?;
    same("prompt hash", got.prompt_sha256 == expected.prompt_sha256)?;
    same("output hash", got.output_sha256 == expected.output_sha256)?;
    same("prompt tokens", got.prompt_tokens == expected.prompt_tokens)?;
    same(
        "completion tokens",
        got.completion_tokens == expected.completion_tokens,
    )?;
    same("price", got.price == expected.price)?;
    same("proof hash", got.proof_sha256 == expected.proof_sha256)?;
    if got.issued_ms.abs_diff(now_ms()) > 10 * 60 * 1000 {
        bail!("the receipt's time is more than 10 minutes off");
    }
    Ok(Signed {
        countersignature: Some(hex::encode(
            gateway_key.sign(signed.body.as_bytes()).to_bytes(),
        )),
        ..signed.clone()
    })
}

/// What a provider signs to ask a gateway for `path` (its receipts, its
/// own view of the status) at `time_ms`.
fn signed_request(node: &NodeId, time_ms: u64, path: &str) -> String {
    format!("tessera request {node} {time_ms} {path}")
}

/// How long a signed request is valid either side of now.
const REQUEST_WINDOW_MS: u64 = 5 * 60 * 1000;
/// Signatures remembered to refuse replays (the oldest are forgotten first,
/// and all of them once out of the window).
const SEEN_MAX: usize = 100_000;

/// Signatures already served, and in the order they expire (with when).
type Seen = (
    std::collections::BTreeSet<String>,
    std::collections::VecDeque<(u64, String)>,
);

/// Signatures of requests already served.
static SEEN: std::sync::Mutex<Seen> = std::sync::Mutex::new((
    std::collections::BTreeSet::new(),
    std::collections::VecDeque::new(),
));

/// Sign a request for `path` by this node (hex signature).
pub fn sign_request(key: &SecretKey, time_ms: u64, path: &str) -> String {
    let node = node_id(&key.public());
    hex::encode(
        key.sign(signed_request(&node, time_ms, path).as_bytes())
            .to_bytes(),
    )
}

/// Check a provider's signed request for `path`: signed by `node` for this
/// path, within five minutes of now, and never seen before (a signature
/// is good for one request: one read off the wire cannot be replayed).
pub fn verify_request(
    node: &NodeId,
    time_ms: u64,
    path: &str,
    signature: &str,
) -> anyhow::Result<()> {
    let now = now_ms();
    if time_ms.abs_diff(now) > REQUEST_WINDOW_MS {
        bail!("the request's time is more than 5 minutes off");
    }
    key_of(node)?
        .verify(
            signed_request(node, time_ms, path).as_bytes(),
            &signature_of(signature)?,
        )
        .map_err(|_| anyhow!("the signature is not {node}'s for {path}"))?;
    let mut guard = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let (seen, order) = &mut *guard;
    while order
        .front()
        .is_some_and(|(expiry, _)| *expiry < now || seen.len() >= SEEN_MAX)
    {
        if let Some((_, old)) = order.pop_front() {
            seen.remove(&old);
        }
    }
    let key = signature.to_ascii_lowercase();
    if !seen.insert(key.clone()) {
        bail!("this signed request was already used (sign each request afresh)");
    }
    order.push_back((time_ms.saturating_add(REQUEST_WINDOW_MS), key));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_core::Price;

    fn receipt(provider: &SecretKey, gateway: &SecretKey) -> Receipt {
        Receipt {
            job_id: "0123.1".into(),
            gateway: node_id(&gateway.public()),
            provider: node_id(&provider.public()),
            model_sha256: "ab".repeat(32),
            prompt_sha256: tokens_sha256(&[1, 2, 3]),
            output_sha256: tokens_sha256(&[4, 5]),
            prompt_tokens: 3,
            completion_tokens: 2,
            price: Price {
                input: 20,
                output: 80,
            },
            issued_ms: now_ms(),
            proof_sha256: None,
        }
    }

    #[test]
    fn only_the_provider_may_ask_for_its_receipts() {
        let key = SecretKey::generate();
        let node = node_id(&key.public());
        let t = now_ms();
        let path = "/v1/provider/receipts";
        let sig = sign_request(&key, t, path);
        let other = node_id(&SecretKey::generate().public());
        assert!(verify_request(&other, t, path, &sig).is_err());
        assert!(verify_request(&node, t + 1, path, &sig).is_err());
        assert!(
            verify_request(&node, t, "/api/status", &sig).is_err(),
            "a signature for one path is not good for another"
        );
        assert!(verify_request(&node, t, path, &sig).is_ok());
        assert!(
            verify_request(&node, t, path, &sig).is_err(),
            "a signed request seen once is refused the second time (a replay)"
        );
        let old = t - 3_600_000;
        assert!(verify_request(&node, old, path, &sign_request(&key, old, path)).is_err());
    }

    #[test]
    fn an_honest_receipt_is_countersigned_and_verifies() {
        let (p, g) = (SecretKey::generate(), SecretKey::generate());
        let r = receipt(&p, &g);
        let signed = accept(&sign(&r, &p), &r, &g).unwrap();
        assert_eq!(verify(&signed).unwrap(), r);
    }

    #[test]
    fn forged_altered_and_replayed_receipts_are_rejected() {
        let (p, g) = (SecretKey::generate(), SecretKey::generate());
        let r = receipt(&p, &g);
        // Forged: signed by someone else in the provider's name.
        let forged = sign(&r, &SecretKey::generate());
        assert!(accept(&forged, &r, &g).is_err());
        // Altered after signing: more tokens than were produced.
        let mut altered = sign(&r, &p);
        altered.body = altered
            .body
            .replace("\"completion_tokens\":2", "\"completion_tokens\":200");
        let e = accept(&altered, &r, &g).unwrap_err();
        assert!(e.to_string().contains("signature"), "{e}");
        // Honestly signed but inflated: it does not match what the gateway saw.
        let inflated = Receipt {
            completion_tokens: 200,
            ..r.clone()
        };
        let e = accept(&sign(&inflated, &p), &r, &g).unwrap_err();
        assert!(e.to_string().contains("completion tokens"), "{e}");
        // Replayed: a good receipt of another job.
        let other_job = Receipt {
            job_id: "0123.2".into(),
            ..r.clone()
        };
        let e = accept(&sign(&r, &p), &other_job, &g).unwrap_err();
        assert!(e.to_string().contains("job id"), "{e}");
        // A countersignature by another gateway does not verify.
        let mut stolen = accept(&sign(&r, &p), &r, &g).unwrap();
        stolen.countersignature = Some(hex::encode(
            SecretKey::generate()
                .sign(stolen.body.as_bytes())
                .to_bytes(),
        ));
        assert!(verify(&stolen).is_err());
        // Garbage.
        let garbage = Signed {
            body: "{".into(),
            signature: "00".into(),
            countersignature: None,
        };
        assert!(open(&garbage).is_err());
    }
}
