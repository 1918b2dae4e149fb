"""Parse a gateway's /metrics with the Prometheus project's own parser.

Usage: metrics_parse.py URL
Prints every sample as JSON: [{"name", "labels", "value"}, ...]. The strict
OpenMetrics parser from the `prometheus_client` package raises on anything
that is not valid OpenMetrics text, so a malformed exposition fails the test.
"""

import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> None:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as resp:
        content_type = resp.headers.get("Content-Type", "")
        text = resp.read().decode("utf-8")
    samples = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.append(
                {"name": s.name, "labels": s.labels, "value": s.value, "type": family.type}
            )
    json.dump({"content_type": content_type, "samples": samples}, sys.stdout)


if __name__ == "__main__":
    main()
