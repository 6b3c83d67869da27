"""Write benchmarks/data/capitals.jsonl: a multiple-choice task of the kind a user brings.

    pip install countryinfo && python benchmarks/make_capitals.py

One line per country of the countryinfo package (MIT; country names, capitals and regions, no
download): "What is the capital of X?" in the chat format {"messages": [...]}, with the right
capital and three capitals of other countries of the same region as choices, in a seeded order.
SmolLM2-135M often picks a wrong one (benchmarks/learning_capitals.py measures it).  The file is
committed, so the benchmark needs nothing but qes-edge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "data" / "capitals.jsonl"
QUESTION = "What is the capital of {country}? Reply with the city name only."


def rows():
    """(country, capital, region) from the package's own data files, sorted by country."""
    import importlib.util
    spec = importlib.util.find_spec("countryinfo")
    if spec is None:
        raise SystemExit("needs the countryinfo package: pip install countryinfo")
    out = set()
    for f in (Path(spec.origin).parent / "data").glob("*.json"):
        info = json.loads(f.read_text(encoding="utf-8"))
        country, capital, region = info.get("name"), info.get("capital"), info.get("region")
        if all(isinstance(x, str) and x for x in (country, capital, region)) and capital != country:
            out.add((country, capital, region))  # (a few entries list several capitals: left out)
    return sorted(out)


def main() -> None:
    data = rows()
    rng = np.random.default_rng(2026)
    by_region: dict[str, list[str]] = {}
    for _, capital, region in data:
        by_region.setdefault(region, []).append(capital)
    lines = []
    for country, capital, region in data:
        others = sorted({c for c in by_region[region] if c != capital})
        distract = [others[i] for i in rng.choice(len(others), 3, replace=False)]
        choices = [capital, *distract]
        order = rng.permutation(4)
        choices = [choices[i] for i in order]
        lines.append({"messages": [{"role": "user", "content": QUESTION.format(country=country)}],
                      "choices": choices, "answer": int(np.flatnonzero(order == 0)[0])})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    print(f"{OUT}: {len(lines)} questions")


if __name__ == "__main__":
    main()
