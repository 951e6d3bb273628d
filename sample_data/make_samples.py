"""Regenerate the sample datasets (deterministic): `uv run python sample_data/make_samples.py`.

articles.parquet  300 short news-style articles: id, title, category, text
articles.jsonl    the same rows as JSON lines
questions.jsonl   200 support questions with a chat `messages` list: id, messages
tickets.jsonl     120 customer-support tickets to extract fields from: id, channel, text
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent

SUBJECTS = {
    "energy": [
        ("the regional grid operator", "battery storage"),
        ("a coalition of municipal utilities", "offshore wind"),
        ("the national energy regulator", "heat pumps"),
        ("a start-up from the northern industrial belt", "green hydrogen"),
    ],
    "health": [
        ("researchers at a university hospital", "a new screening test"),
        ("the public health agency", "a vaccination campaign"),
        ("a consortium of rural clinics", "remote consultations"),
        ("a pharmaceutical company", "an antibiotic trial"),
    ],
    "technology": [
        ("a chip maker", "a low-power processor"),
        ("an open-source foundation", "a database engine"),
        ("a logistics firm", "warehouse robots"),
        ("the city's transport authority", "a ticketing app"),
    ],
    "finance": [
        ("the central bank", "interest rates"),
        ("a group of pension funds", "infrastructure bonds"),
        ("a mid-sized lender", "small-business loans"),
        ("the stock exchange", "a new listing rule"),
    ],
    "science": [
        ("astronomers", "a distant comet"),
        ("marine biologists", "coral recovery"),
        ("a team of geologists", "an underground aquifer"),
        ("climate scientists", "glacier melt rates"),
    ],
}
VERBS = ["announced", "published", "unveiled", "reported", "presented", "confirmed"]
OPENERS = [
    "On {day}, {who} {verb} results on {what} that surprised many observers.",
    "{Who} {verb} a long-awaited update on {what} on {day}.",
    "After two years of work, {who} {verb} findings about {what} on {day}.",
]
MIDDLES = [
    "The figures show a {pct} percent change compared with the previous year, "
    "well above the forecast of most analysts.",
    "According to the report, costs fell by {pct} percent while output rose steadily "
    "across all {n} sites involved.",
    "Early data from {n} participating sites suggest the effect holds across regions, "
    "although the sample is still small.",
    "Critics point out that {n} of the original targets were quietly dropped, and that "
    "independent review is still pending.",
    "The project received {money} million in public funding and employs about {n} people.",
]
CLOSERS = [
    "A full evaluation is expected before the end of the year.",
    "Officials said the next phase would start in spring, subject to approval.",
    "Several competitors are expected to respond with plans of their own.",
    "The authors cautioned that the results still need to be replicated.",
    "Local residents will be consulted before any further expansion.",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
QUESTIONS = [
    "How do I reset my password if I no longer have access to my email address?",
    "My invoice shows two charges for the same month. Can you explain why?",
    "Is it possible to export all my data as a CSV file?",
    "The mobile app crashes when I open the settings page. What should I do?",
    "Can I change the billing currency after the account was created?",
    "How long are deleted files kept before they are removed permanently?",
    "What is the difference between the team plan and the business plan?",
    "Why does the dashboard show different numbers than the monthly report?",
    "How can I add a second administrator to our organisation?",
    "Does the API support pagination for the list endpoints?",
]
SYSTEMS = [
    "You are a concise, friendly support agent. Answer in at most three sentences.",
    "You are a support agent for a software company. Be precise and polite.",
]


def articles(count: int, rng: random.Random) -> list[dict[str, object]]:
    rows = []
    categories = sorted(SUBJECTS)
    for i in range(1, count + 1):
        category = categories[(i - 1) % len(categories)]
        who, what = rng.choice(SUBJECTS[category])
        values = {
            "who": who,
            "Who": who[0].upper() + who[1:],
            "what": what,
            "verb": rng.choice(VERBS),
            "day": rng.choice(DAYS),
            "pct": rng.randint(2, 48),
            "n": rng.randint(3, 120),
            "money": rng.randint(2, 900),
        }
        sentences = [rng.choice(OPENERS)]
        sentences += rng.sample(MIDDLES, k=rng.randint(1, 3))
        sentences.append(rng.choice(CLOSERS))
        text = " ".join(s.format(**values) for s in sentences)
        title = f"{what[0].upper() + what[1:]}: {who} {values['verb']} new results"
        rows.append({"id": i, "title": title, "category": category, "text": text})
    return rows


def questions(count: int, rng: random.Random) -> list[dict[str, object]]:
    rows = []
    for i in range(1, count + 1):
        question = rng.choice(QUESTIONS)
        if rng.random() < 0.4:
            question += f" This is for account #{rng.randint(10000, 99999)}."
        rows.append(
            {
                "id": f"q-{i:04d}",
                "messages": [
                    {"role": "system", "content": rng.choice(SYSTEMS)},
                    {"role": "user", "content": question},
                ],
            }
        )
    return rows


CUSTOMERS = [
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Katherine Johnson",
    "Linus Pauling",
    "Marie Curie",
    "Niels Bohr",
    "Rosalind Franklin",
    "Claude Shannon",
    "Hedy Lamarr",
]
PRODUCTS = [
    "the Model S kettle",
    "a 27-inch monitor",
    "the annual Pro plan",
    "a pair of trail shoes",
    "the smart thermostat",
    "a standing desk",
    "the family photo book",
]
PROBLEMS = [
    ("my parcel is {days} days late and tracking has not moved", "shipping"),
    ("I was charged twice for {product}, {total} EUR each time", "billing"),
    ("{product} stops working after a few minutes", "technical"),
    ("I cannot log in since I changed my email address", "account"),
    ("I would like to return {product}; it arrived damaged", "shipping"),
    ("the invoice for {product} shows the wrong VAT number", "billing"),
]
MOODS = [
    "Thanks in advance.",
    "This is really frustrating.",
    "Please help as soon as possible!",
    "Otherwise I am very happy with your service.",
    "I am considering cancelling.",
]


def tickets(count: int, rng: random.Random) -> list[dict[str, object]]:
    rows = []
    for i in range(1, count + 1):
        product = rng.choice(PRODUCTS)
        problem, _ = rng.choice(PROBLEMS)
        problem = problem.format(
            days=rng.randint(3, 21),
            product=product,
            total=f"{rng.randint(10, 900)}.{rng.randint(0, 99):02d}",
        )
        account = f" My account is #{rng.randint(10000, 99999)}." if rng.random() < 0.6 else ""
        customer = rng.choice(CUSTOMERS)
        mood = rng.choice(MOODS)
        text = f"Hello, this is {customer}. {problem[0].upper()}{problem[1:]}.{account} {mood}"
        rows.append(
            {"id": f"t-{i:04d}", "channel": rng.choice(["email", "chat", "phone"]), "text": text}
        )
    return rows


def main() -> None:
    rng = random.Random(20261124)
    rows = articles(300, rng)
    pq.write_table(pa.Table.from_pylist(rows), HERE / "articles.parquet")
    with (HERE / "articles.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    with (HERE / "questions.jsonl").open("w") as handle:
        for row in questions(200, rng):
            handle.write(json.dumps(row) + "\n")
    with (HERE / "tickets.jsonl").open("w") as handle:
        for row in tickets(120, random.Random(20261130)):
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
