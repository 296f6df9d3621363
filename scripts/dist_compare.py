#!/usr/bin/env python3
"""Compares two result files of the same batch: for every custom_id, the status, the texts,
the finish reasons and the usage must be equal (ids and times may differ).

    scripts/dist_compare.py EXPECTED.jsonl ACTUAL.jsonl
"""

import json
import sys


def outcomes(path):
    """custom_id -> what must match, for every line of a result file."""
    found = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            resp = r.get("response") or {}
            body = resp.get("body") or {}
            found[r["custom_id"]] = {
                "status": resp.get("status_code"),
                "error": r.get("error"),
                "choices": [
                    {
                        "text": (c.get("message") or {}).get("content", c.get("text")),
                        "finish_reason": c.get("finish_reason"),
                    }
                    for c in body.get("choices", [])
                ],
                "usage": body.get("usage"),
            }
    return found


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    want, got = outcomes(sys.argv[1]), outcomes(sys.argv[2])
    bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
    for k in bad:
        print(f"{k}: expected {json.dumps(want.get(k))}\n{' ' * len(k)}  got      {json.dumps(got.get(k))}")
    if not want or bad:
        sys.exit(f"{len(bad)} of {len(want)} results differ" if want else "no results")
    texts = sum(len(v["choices"]) for v in want.values())
    print(f"{len(want)} results equal ({texts} texts, finish reasons and usage)")


if __name__ == "__main__":
    main()
