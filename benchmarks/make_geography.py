"""Write benchmarks/data/{capitals,continents}.jsonl: multiple-choice tasks of the kind a user brings.

    pip install countryinfo && python benchmarks/make_geography.py

From the countryinfo package's data (MIT; country names, capitals and regions, no download),
one line per country, in the chat format {"messages": [...]}:
- capitals.jsonl: "What is the capital of X?", the right capital and three capitals of other
  countries of the same region as choices, in a seeded order;
- continents.jsonl: "Which continent is X in?", choices Africa, America, Asia, Europe, Oceania.
SmolLM2-135M often picks a wrong one (benchmarks/learning_user_task.py measures it).  The files
are committed, so the benchmark needs nothing but qes-edge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
QUESTION = "What is the capital of {country}? Reply with the city name only."
CONTINENT = "Which continent is {country} in? Reply with one word: Africa, America, Asia, Europe or Oceania."
CONTINENTS = {"Africa": "Africa", "Americas": "America", "Asia": "Asia", "Europe": "Europe", "Oceania": "Oceania"}


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


def write(name: str, lines: list[dict]) -> None:
    out = DATA / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    print(f"{out}: {len(lines)} questions")


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
    write("capitals.jsonl", lines)
    labels = list(CONTINENTS.values())
    write("continents.jsonl", [{"messages": [{"role": "user", "content": CONTINENT.format(country=country)}],
                                "choices": labels, "answer": labels.index(CONTINENTS[region])}
                               for country, _, region in data if region in CONTINENTS])


if __name__ == "__main__":
    main()
