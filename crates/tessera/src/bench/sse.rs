//! Reading an OpenAI-style server-sent-event stream as the benchmarks'
//! clients do: every `data:` line that holds JSON, as soon as it arrives
//! (so a timestamp taken in the callback is when the client saw it).

use futures::StreamExt;
use serde_json::Value;

/// Call `on` with each JSON event of `resp`'s stream, in order, until it
/// ends; `[DONE]` and anything else that is not JSON is skipped.
pub(crate) async fn each_event(
    resp: reqwest::Response,
    mut on: impl FnMut(&Value),
) -> anyhow::Result<()> {
    let mut bytes = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                on(&v);
            }
        }
    }
    Ok(())
}
