#!/usr/bin/env python3
"""Writes a deterministic seed-shaped batch: one rubric-like system prompt of about S tokens,
N candidate-profile user messages of about U tokens each, and max_tokens M.

Presets:
  ci          S=1000 U=100 M=32  N=16   (a minute on 2 cores)
  seed-shape  S=2400 U=600 M=300 N=1000 (the real job's shape)

Token counts are approximate (about 1.3 tokens per word for English text); the run's usage
lines give the measured counts.
"""
import argparse
import json
import random
import sys

PRESETS = {
    "ci": dict(system=1000, user=100, max_tokens=32, n=16),
    "seed-shape": dict(system=2400, user=600, max_tokens=300, n=1000),
}
TOKENS_PER_WORD = 1.3

CRITERIA = [
    ("Systems depth", "experience with storage engines, networking, concurrency or operating systems"),
    ("Language proficiency", "years of production work in the team's main language, with reviewed code"),
    ("Distributed systems", "consensus, replication, partitioning and handling of partial failure"),
    ("Reliability", "testing discipline, incident response, and care for observability"),
    ("Communication", "clear writing, design documents, and mentoring of colleagues"),
    ("Ownership", "carrying work from idea to production and owning its outcomes"),
    ("Product sense", "understanding users and trading scope against time"),
    ("Security", "threat modelling, secure defaults, and handling of secrets"),
]
LEVELS = ["none", "basic exposure", "solid working knowledge", "deep, proven expertise"]
NAMES = ["Maria", "Tom", "Aiko", "Sam", "Priya", "Lee", "Omar", "Eva", "Jonas", "Fatima", "Chen",
         "Lucia", "Kwame", "Ines", "Ravi", "Noor", "Pavel", "Sofia", "Diego", "Hana"]
ROLES = ["backend engineer", "site reliability engineer", "data engineer", "frontend developer",
         "embedded engineer", "platform engineer", "security engineer", "machine learning engineer"]
LANGS = ["Rust", "Go", "C++", "Python", "Java", "TypeScript", "Kotlin", "C"]
COMPANIES = ["a payments company", "a cloud provider", "a logistics startup", "a bank",
             "a game studio", "a telecom operator", "a health-care platform", "a search engine"]
WORK = [
    "built a log-structured storage engine",
    "led the migration of a monolith to services",
    "cut p99 latency of the checkout API by half",
    "maintained the CI system for two hundred engineers",
    "designed the partitioning scheme of an event store",
    "wrote the on-call runbooks and ran incident reviews",
    "implemented a Raft-based replication layer",
    "shipped a mobile app used by a million people",
    "tuned a Postgres cluster under heavy write load",
    "introduced property-based testing to a legacy codebase",
    "mentored three junior engineers to promotion",
    "owned the billing pipeline end to end",
]


def rubric(words: int, rng: random.Random) -> str:
    lines = [
        "You are a careful hiring assistant. You evaluate exactly one candidate profile against "
        "the rubric below. Judge only what the profile states; never invent facts and never "
        "compare with other candidates.",
        "",
        "Rubric:",
    ]
    i = 0
    while sum(len(l.split()) for l in lines) < words - 40:
        name, what = CRITERIA[i % len(CRITERIA)]
        level = LEVELS[rng.randrange(len(LEVELS))]
        lines.append(
            f"{i + 1}. {name} (0-3), round {i // len(CRITERIA) + 1}: assess {what}. Give 3 only "
            f"for {LEVELS[3]}, 2 for {LEVELS[2]}, 1 for {LEVELS[1]} and 0 for {LEVELS[0]}; "
            f"the typical candidate shows {level}."
        )
        i += 1
    lines += [
        "",
        'Answer in this form: "Score: N. Verdict: hire | maybe | no. Reason: one sentence."',
    ]
    return "\n".join(lines)


def profile(i: int, words: int, rng: random.Random) -> str:
    name = f"{NAMES[i % len(NAMES)]} #{i}"
    parts = [
        f"Candidate {name}: {rng.randint(1, 15)} years as a {rng.choice(ROLES)}, mostly in "
        f"{rng.choice(LANGS)} and {rng.choice(LANGS)}."
    ]
    while sum(len(p.split()) for p in parts) < words:
        parts.append(
            f"At {rng.choice(COMPANIES)} for {rng.randint(1, 6)} years, {name.split()[0]} "
            f"{rng.choice(WORK)} and {rng.choice(WORK)}."
        )
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    ap.add_argument("-n", type=int, help="requests")
    ap.add_argument("-s", "--system-tokens", type=int, help="system prompt tokens (about)")
    ap.add_argument("-u", "--user-tokens", type=int, help="user message tokens (about)")
    ap.add_argument("-m", "--max-tokens", type=int, help="max_tokens per request")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--output", default="-")
    a = ap.parse_args()
    p = dict(PRESETS[a.preset])
    for key, val in [("n", a.n), ("system", a.system_tokens), ("user", a.user_tokens), ("max_tokens", a.max_tokens)]:
        if val is not None:
            p[key] = val
    rng = random.Random(a.seed)
    system = rubric(int(p["system"] / TOKENS_PER_WORD), rng)
    out = sys.stdout if a.output == "-" else open(a.output, "w")
    for i in range(p["n"]):
        line = {
            "custom_id": f"cand-{i:06d}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": profile(i, int(p["user"] / TOKENS_PER_WORD), rng)},
                ],
                "max_tokens": p["max_tokens"],
                "temperature": 0,
            },
        }
        out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
