"""Drive a running Tessera with the official `openai` Python package.

Usage: openai_check.py API_BASE MODEL API_KEY
Exits non-zero (with a traceback) if any check fails.
"""
import sys

import openai
from openai import OpenAI

base, model, key = sys.argv[1], sys.argv[2], sys.argv[3]
# No retries: a failure must show, not be papered over by the SDK.
client = OpenAI(base_url=base, api_key=key, max_retries=0)

# Non-stream chat.
r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0,
    max_tokens=32,
)
text = r.choices[0].message.content
assert "Paris" in text, text
assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
assert r.choices[0].finish_reason in ("stop", "length")

# Stream chat with usage: the deltas join to the non-stream answer.
parts, usage, finish = [], None, None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    temperature=0,
    max_tokens=32,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == text, ("".join(parts), text)
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens
assert finish == r.choices[0].finish_reason

# Legacy completions, both ways.
c = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0)
assert c.choices[0].text, c
joined = "".join(
    ch.choices[0].text
    for ch in client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=6, temperature=0, stream=True)
    if ch.choices
)
assert joined == c.choices[0].text, (joined, c.choices[0].text)

# Models list.
ids = [m.id for m in client.models.list()]
assert model in ids, ids

# Errors arrive as the SDK's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    client.chat.completions.create(model=model, messages=[])
    raise AssertionError("empty messages accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400

# A wrong key is the SDK's AuthenticationError; the usage is billed.
try:
    OpenAI(base_url=base, api_key="tsk_wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401
raw = client.chat.completions.with_raw_response.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
)
body = raw.http_response.json()
assert body["tessera"]["cost"] > 0 and body["tessera"]["receipt"], body

print("openai client checks passed")
