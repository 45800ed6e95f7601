"""Writes dags/data/tweets.jsonl: the example DAG's input, synthetic tweets (seeded, so the file is stable).

Run: python tools/make_tweets.py [COUNT]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = (
    *("airflow", "cluster", "spot", "queue", "worker", "data", "lake", "batch", "coffee", "monday"),
    *("deploy", "cloud", "pipeline", "retry", "weekend", "launch", "python", "rust", "sunset"),
    *("teardown", "idle", "budget", "friday", "metrics", "dashboard"),
)
FACES = (":)", ":(", ";)", ":D", ":)")


def tweet(rng: random.Random, number: int) -> dict:
    words = rng.choices(WORDS, k=rng.randint(4, 14))
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        words.insert(rng.randrange(len(words) + 1), rng.choice(FACES))
    return {"id": f"tw{number:05d}", "user": f"user{rng.randrange(500):03d}", "text": " ".join(words)}


def main(count: int = 3000) -> None:
    rng = random.Random(20261124)
    path = Path(__file__).resolve().parent.parent / "dags" / "data" / "tweets.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for number in range(count):
            out.write(json.dumps(tweet(rng, number)) + "\n")
    print(f"wrote {count} tweets to {path}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
