"""Re-score `tessera bench audit --out` data under another tolerated share
(and floor).

Every audit records its evidence; the "near-ties decided against the rule"
check (`max_tolerated`, `min_tolerated`) and the commitment check (at least
75% of a chunk's entries agree in exponent, 2 may always disagree; mantissa
gap at most 6) are recomputed from it, the other failures are kept as they
were, so a verdict under other values follows from the evidence alone (MAX_TOLERATED, then MIN_TOLERATED):

    python3 calibration/rescore.py calibration/audit-bench.jsonl 0.3 3
"""

import collections
import json
import sys


def main(path, max_tolerated, min_tolerated):
    rows = [json.loads(line) for line in open(path)]
    seen = collections.Counter()
    failed = collections.Counter()
    shares = []
    for r in rows:
        ev = r["evidence"]
        others = [
            f for f in ev["failures"] if "near-ties" not in f and "commitment of chunk" not in f
        ]
        for c in ev["chunks"]:
            missed = c["compared"] - c["exponent_matches"]
            few = c["exponent_matches"] / max(c["compared"], 1) < 0.75 and missed > 2
            if few or c["mantissa_mean"] > 6.0:
                others.append("commitment")
        n = max(ev["tokens"], 1)
        fail = bool(others) or ev["tolerated"] > max(max_tolerated * n, min_tolerated)
        key = (r["mode"], r.get("config", ""))
        seen[key] += 1
        failed[key] += fail
        if r["mode"] == "honest":
            shares.append(ev["tolerated"] / n)
    print(f"max_tolerated = {max_tolerated}, min_tolerated = {min_tolerated}")
    for key in sorted(seen):
        print(f"{key[0]:>12} {key[1]:>5}: {failed[key]} of {seen[key]} failed")
    shares.sort()
    if shares:
        print(
            "honest tolerated share: median %.3f, p99 %.3f, max %.3f"
            % (shares[len(shares) // 2], shares[int(len(shares) * 0.99)], shares[-1])
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0], float(args[1]) if len(args) > 1 else 0.3, int(args[2]) if len(args) > 2 else 3)
