"""Collect audit evidence of honest answers from a devnet (preliminary calibration).

Usage (the devnet's home must be /tmp/dn4 or edit EP below):
    TESSERA_HOME=/tmp/dn4 tessera devnet --audit --listen 127.0.0.1:0 --threads 1 --slots 4 --providers 2
    python3 calibration/devnet_audits.py N OUT.json

Sends N chat requests (64-128 tokens, five sampling settings, 6 at once) and
saves every part's audit status and evidence from GET /v1/jobs/{id}, then
prints the extremes the thresholds in tessera_engine::audit must leave room for.
"""
import json, random, threading, time, urllib.request, sys
import os
EP = os.path.join(os.environ.get('TESSERA_HOME', '/tmp/dn4'), 'endpoint.json')
ep = json.load(open(EP))
base, key = ep['api_base'], ep['api_key']
H = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
topics = ["cats", "rivers", "the moon", "bread", "trains", "music", "gardens", "rain", "chess", "volcanoes"]
settings = [{"temperature": 0}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 1.0}, {"temperature": 1.3, "top_p": 0.95},
            {"temperature": 0.8, "stop": ["."]}]
ids = []; lock = threading.Lock()
N = int(sys.argv[1])
def worker():
    while True:
        with lock:
            if len(ids) >= N: return
            ids.append(None); i = len(ids) - 1
        s = dict(random.choice(settings))
        body = {"model": "smollm2-135m-instruct", "max_tokens": random.randint(64, 128), "seed": random.randint(0, 2**31),
                "messages": [{"role": "user", "content": "Write a paragraph about " + random.choice(topics)}], **s}
        req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(), headers=H)
        try:
            r = json.loads(urllib.request.urlopen(req, timeout=300).read()); ids[i] = (r["id"], s)
        except Exception as e:
            print("ERR", e); ids[i] = ("", s)
ts = [threading.Thread(target=worker) for _ in range(6)]
[t.start() for t in ts]; [t.join() for t in ts]
time.sleep(5)
out = []
for rid, s in ids:
    if not rid: continue
    req = urllib.request.Request(base + "/jobs/" + rid, headers=H)
    try: j = json.loads(urllib.request.urlopen(req).read())
    except Exception as e: print("ERR job", e); continue
    for p in j["parts"]:
        ev = p.get("evidence")
        out.append({"status": p["status"], "settings": s, "evidence": ev, "note": p.get("note")})
json.dump(out, open(sys.argv[2], "w"))
st = {}
for o in out: st[o["status"]] = st.get(o["status"], 0) + 1
print(st)
evs = [o["evidence"] for o in out if o["evidence"]]
def mx(k): return max(e[k] for e in evs)
print("tokens", sum(e["tokens"] for e in evs), "max_gap", mx("max_gap"), "hard", sum(e["sampling_mismatches"] for e in evs), "tolerated share max", max(e["tolerated"]/e["tokens"] for e in evs),
      "lp max", mx("logprob_max_error"), "lp mean max", mx("logprob_mean_error"), "exp share min", min(e["worst_exponent_share"] for e in evs), "mant mean max", mx("worst_mantissa_mean"))
for o in out:
    if o["status"] == "failed": print("FAILED", o["settings"], o["evidence"]["failures"])
