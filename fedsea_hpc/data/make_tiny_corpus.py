"""Write the tiny shipped corpus: three clients, three record formats, short true statements.

Run ``python -m fedsea_hpc.data.make_tiny_corpus`` to rewrite ``fedsea_hpc/data/tiny/*.jsonl``.
The output is deterministic (fixed seed, sorted pools), so rerunning changes nothing.

- ``client0.jsonl``: ``{"prompt", "response"}`` arithmetic and everyday facts. Prompts end with
  a newline, the separator the model sees before the answer.
- ``client1.jsonl``: ``{"messages"}`` chats (capitals, colours, counting), some with a system turn
  and some with two user/assistant rounds.
- ``client2.jsonl``: ``{"text"}`` short plain sentences.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).parent / "tiny"
N_RECORDS = 300
SEED = 20240607

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Russia": "Moscow", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin",
    "Austria": "Vienna", "Hungary": "Budapest", "Turkey": "Ankara", "Iran": "Tehran",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Australia": "Canberra",
    "New Zealand": "Wellington", "Cuba": "Havana", "Ghana": "Accra", "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa", "Morocco": "Rabat", "Belgium": "Brussels", "Iceland": "Reykjavik",
    "Ukraine": "Kyiv", "Saudi Arabia": "Riyadh", "Colombia": "Bogotá", "the Philippines": "Manila",
}
COLOURS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "coal": "black",
    "a ripe banana": "yellow", "a ripe tomato": "red", "a lemon": "yellow", "milk": "white",
    "an orange": "orange", "a carrot": "orange", "a lime": "green", "milk chocolate": "brown",
    "a crow": "black", "blood": "red",
    "a school bus in the USA": "yellow", "a pumpkin": "orange", "a cucumber": "green",
    "a ripe strawberry": "red", "a flamingo": "pink",
}


def _a(noun: str) -> str:
    """``noun`` with its indefinite article ('an ant', 'a bee')."""
    return ("an " if noun[0] in "aeiou" else "a ") + noun


LEGS = {"dog": 4, "cat": 4, "horse": 4, "cow": 4, "spider": 8, "ant": 6, "bee": 6,
        "chicken": 2, "duck": 2, "human": 2, "beetle": 6, "goat": 4, "sheep": 4}
FACTS = [  # (question, answer) pairs for client0, all true
    ("How many days are in a week?", "A week has 7 days."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("How many minutes are in an hour?", "An hour has 60 minutes."),
    ("How many seconds are in a minute?", "A minute has 60 seconds."),
    ("How many months are in a year?", "A year has 12 months."),
    ("How many days are in a common year?", "A common year has 365 days."),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("At what temperature does water freeze?", "Water freezes at 0 degrees Celsius."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius."),
    ("How many continents are there?", "There are 7 continents."),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("How many sides does a square have?", "A square has 4 sides."),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
    ("How many sides does an octagon have?", "An octagon has 8 sides."),
    ("How many letters are in the English alphabet?", "The English alphabet has 26 letters."),
    ("Which planet is closest to the Sun?", "Mercury is closest to the Sun."),
    ("What is the largest planet?", "Jupiter is the largest planet."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What gas do plants use to make food?", "Plants use carbon dioxide."),
    ("How many centimetres are in a metre?", "A metre has 100 centimetres."),
    ("How many grams are in a kilogram?", "A kilogram has 1000 grams."),
    ("How many metres are in a kilometre?", "A kilometre has 1000 metres."),
] + [(f"How many legs does {_a(a)} have?", f"{_a(a).capitalize()} has {n} legs.")
      for a, n in sorted(LEGS.items())]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
MONTH_DAYS = [31, None, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # February varies
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
            "ninth", "tenth", "eleventh", "twelfth"]


def prompt_records(rng: random.Random) -> list[dict]:
    """Arithmetic (always correct, computed here) plus the fixed facts, as prompt/response."""
    out = [{"prompt": q + "\n", "response": a} for q, a in FACTS]
    seen = set()
    while len(out) < N_RECORDS:
        op = rng.choice(["plus", "minus", "times"])
        a, b = (rng.randint(0, 50), rng.randint(0, 50)) if op != "times" else \
            (rng.randint(0, 12), rng.randint(0, 12))
        if op == "minus" and b > a:  # keep results non-negative
            a, b = b, a
        if (op, a, b) in seen:
            continue
        seen.add((op, a, b))
        c = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        out.append({"prompt": f"What is {a} {op} {b}?\n", "response": f"{a} {op} {b} is {c}."})
    rng.shuffle(out)
    return out


def chat_records(rng: random.Random) -> list[dict]:
    """Single questions, some with a system turn, some two-round chats."""
    qa = []
    for country, city in sorted(CAPITALS.items()):
        qa.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        qa.append((f"{city} is the capital of which country?",
                   f"{city} is the capital of {country}."))
    for thing, colour in sorted(COLOURS.items()):
        qa.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for start in range(1, 40):
        n = rng.randint(3, 6)
        nums = ", ".join(str(i) for i in range(start, start + n))
        qa.append((f"Count from {start} to {start + n - 1}.", f"{nums}."))
        qa.append((f"What number comes after {start}?", f"{start + 1} comes after {start}."))
    for i, day in enumerate(DAYS):
        qa.append((f"What day comes after {day}?", f"{DAYS[(i + 1) % 7]} comes after {day}."))
    out, seen = [], set()
    for k, (q, a) in enumerate(qa):
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if k % 5 == 0 and len(q + a) < 70:  # keep system-prompted chats within 128 bytes
            msgs.insert(0, {"role": "system", "content": "Answer briefly."})
        out.append({"messages": msgs})
    while len(out) < N_RECORDS:  # two-round chats exercise masking of later user turns
        (q1, a1), (q2, a2) = rng.sample(qa, 2)
        # + 42 bytes of ChatML markup: fits seq_len 128 of the byte tokenizer
        if len((q1 + a1 + q2 + a2).encode()) > 70 or (q1, q2) in seen:
            continue
        seen.add((q1, q2))
        out.append({"messages": [{"role": "user", "content": q1},
                                 {"role": "assistant", "content": a1},
                                 {"role": "user", "content": q2},
                                 {"role": "assistant", "content": a2}]})
    rng.shuffle(out)
    return out[:N_RECORDS]


def text_records(rng: random.Random) -> list[dict]:
    """A pool of true sentences, shuffled, first N_RECORDS kept."""
    pool = []
    for i, day in enumerate(DAYS):
        pool.append(f"{DAYS[(i + 1) % 7]} comes after {day}.")
        pool.append(f"{day} is day {i + 1} of the week when the week starts on Monday.")
    for i, month in enumerate(MONTHS):
        pool.append(f"{month} is the {ORDINALS[i]} month of the year.")
        if MONTH_DAYS[i] is not None:
            pool.append(f"{month} has {MONTH_DAYS[i]} days.")
    pool.append("February has 28 days, or 29 in a leap year.")
    for n in range(1, 101):
        pool.append(f"{n} is an {'even' if n % 2 == 0 else 'odd'} number.")
    for n in range(1, 13):
        pool.append(f"{n} tens make {10 * n}.")
    for n in range(1, 21):
        pool.append(f"The square of {n} is {n * n}.")
        pool.append(f"Twice {n} is {2 * n}.")
    for i, ch in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
        pool.append(f"{ch} is letter number {i + 1} of the alphabet.")
    for a, n in sorted(LEGS.items()):
        pool.append(f"{_a(a).capitalize()} has {n} legs.")
    for country, city in sorted(CAPITALS.items()):
        pool.append(f"{city} is the capital of {country}.")
    for thing, colour in sorted(COLOURS.items()):
        pool.append(f"{thing[0].upper() + thing[1:]} is {colour}.")
    pool += ["The Sun rises in the east.", "The Sun sets in the west.",
             "Water freezes at 0 degrees Celsius.", "Fish live in water.",
             "Birds have feathers.", "Ice is frozen water.", "The Moon orbits the Earth.",
             "The Earth orbits the Sun.", "Bees make honey.", "Cows give milk."]
    assert len(pool) >= N_RECORDS, len(pool)
    rng.shuffle(pool)
    return [{"text": t} for t in pool[:N_RECORDS]]


def write(path: Path, records: list[dict]) -> None:
    """One compact JSON object per line; ensure_ascii=False keeps UTF-8 (e.g. 'Brasília')."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    makers = [prompt_records, chat_records, text_records]
    for i, make in enumerate(makers):
        records = make(random.Random(SEED + i))
        write(OUT_DIR / f"client{i}.jsonl", records)
        print(f"wrote {len(records)} records to {OUT_DIR / f'client{i}.jsonl'}")


if __name__ == "__main__":
    main()
