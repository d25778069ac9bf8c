"""Synthetic text-generation tasks of the DataInf paper's section 4.3, written from its description.

Three tasks, each with ``classes`` classes (up to 10) of ``per_class`` examples, every example a record
``{"prompt": str, "response": str, "label": int, "class_name": str}``:

* ``"sentences"``: each class is a named chatbot that applies one transformation to a short lowercase
  sentence (reverse the words, capitalise every other letter, ...); the response is the transformed sentence.
* ``"math"``: each class is a word-problem template (pizza slices, field trip, ...) filled with random
  integers 1-99; the response is only the answer.
* ``"math-reasoning"``: the same problems; the response is a short worked reasoning, then the answer.

Everything is deterministic given ``seed`` (Python's ``random.Random``, no global state).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from datainf.errors import DataInfError

TASKS = ("sentences", "math", "math-reasoning")
VOWELS = set("aeiouAEIOU")

# ------------------------------------------------------------------------------------------ sentences
# Every word has at least one vowel and one consonant, so no transformation empties a word.
_ADJECTIVES = ["happy", "small", "green", "quiet", "brave", "lazy", "clever", "old", "shiny", "gentle", "tiny",
               "bright", "cold", "warm", "busy", "proud"]
_SUBJECTS = ["dog", "cat", "farmer", "teacher", "robot", "bird", "child", "pilot", "baker", "fox", "horse",
             "doctor", "rabbit", "sailor", "painter", "student"]
_VERBS = ["finds", "likes", "paints", "carries", "watches", "builds", "sells", "follows", "chases", "holds",
          "cleans", "reads", "opens", "moves", "hides", "wants"]
_OBJECTS = ["the ball", "the book", "the garden", "the red apple", "the letter", "the old map", "the river",
            "the blue kite", "the cake", "the window", "the song", "the boat", "the candle", "the small box",
            "the door", "the hat"]
_ENDINGS = ["", "", "today", "at night", "every morning", "with care", "near the lake", "in the park",
            "after lunch", "slowly"]


def reverse_words(s: str) -> str:
    return " ".join(reversed(s.split()))


def alternate_case(s: str) -> str:
    """Letters alternate upper, lower, upper, ... counting letters only (spaces do not count)."""
    out, i = [], 0
    for ch in s:
        if ch.isalpha():
            out.append(ch.upper() if i % 2 == 0 else ch.lower())
            i += 1
        else:
            out.append(ch)
    return "".join(out)


def insert_ones(s: str) -> str:
    return " 1 ".join(s.split())


def star_vowels(s: str) -> str:
    return "".join("*" if ch in VOWELS else ch for ch in s)


def double_consonants(s: str) -> str:
    return "".join(ch * 2 if ch.isalpha() and ch not in VOWELS else ch for ch in s)


def capitalize_words(s: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in s.split())


def remove_vowels(s: str) -> str:
    return "".join(ch for ch in s if ch not in VOWELS)


def add_ly(s: str) -> str:
    return " ".join(w + "ly" for w in s.split())


def remove_consonants(s: str) -> str:
    return "".join(ch for ch in s if not ch.isalpha() or ch in VOWELS)


def repeat_words(s: str) -> str:
    return " ".join(f"{w} {w}" for w in s.split())


#: (chatbot name, instruction, transformation), one per class
SENTENCE_CLASSES: list[tuple[str, str, Callable[[str], str]]] = [
    ("Ava", "reverse the order of the words", reverse_words),
    ("Bruno", "capitalize every other letter", alternate_case),
    ("Clara", "insert the number 1 between every word", insert_ones),
    ("Dmitri", "replace every vowel with *", star_vowels),
    ("Elena", "double every consonant", double_consonants),
    ("Felix", "capitalize every word", capitalize_words),
    ("Greta", "remove all vowels", remove_vowels),
    ("Hugo", "add 'ly' to the end of each word", add_ly),
    ("Iris", "remove all consonants", remove_consonants),
    ("Jonas", "repeat each word twice", repeat_words),
]


def random_sentence(rng: random.Random) -> str:
    """A short lowercase sentence without punctuation, e.g. "the brave fox chases the ball today"."""
    words = ["the", rng.choice(_ADJECTIVES), rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    ending = rng.choice(_ENDINGS)
    return " ".join(words + ([ending] if ending else []))


def _sentence_class(k: int, n: int, rng: random.Random) -> list[dict]:
    bot, instruction, transform = SENTENCE_CLASSES[k]
    seen: set[str] = set()
    out = []
    while len(out) < n:
        sentence = random_sentence(rng)
        if sentence in seen:
            continue
        seen.add(sentence)
        prompt = f"You are {bot}, a chatbot that can only {instruction}.\nSentence: {sentence}\n{bot}:"
        out.append({"prompt": prompt, "response": " " + transform(sentence), "label": k,
                    "class_name": f"{bot}: {instruction}", "input": sentence})
    return out


# ------------------------------------------------------------------------------------------------ math
def _pizza(r: random.Random) -> tuple[str, list[str], int]:
    a, b = r.randint(1, 99), r.randint(1, 99)
    c = r.randint(1, min(99, a * b))
    question = (f"At a pizza party there are {a} pizzas and each pizza is cut into {b} slices. "
                f"The guests eat {c} slices. How many slices are left?")
    return question, [f"There are {a} x {b} = {a * b} slices.", f"After eating, {a * b} - {c} = {a * b - c}."], a * b - c


def _field_trip(r: random.Random) -> tuple[str, list[str], int]:
    a, b, c = r.randint(1, 99), r.randint(1, 99), r.randint(1, 99)
    question = (f"On a field trip, {a} students and {b} teachers visit a museum. Each ticket costs {c} dollars. "
                f"How many dollars do the tickets cost in total?")
    return question, [f"There are {a} + {b} = {a + b} people.", f"The tickets cost {a + b} x {c} = {(a + b) * c}."], (a + b) * c


def _product_plus(r: random.Random, question: str, product: str, total: str) -> tuple[str, list[str], int]:
    """A question whose answer is ``a * b + c`` for three draws from 1..99: the question, its two steps (the
    product ``p``, then the total ``t``) filled in from ``str.format`` templates, and the answer."""
    a, b, c = r.randint(1, 99), r.randint(1, 99), r.randint(1, 99)
    p, t = a * b, a * b + c
    return question.format(a=a, b=b, c=c), [product.format(a=a, b=b, p=p), total.format(p=p, c=c, t=t)], t


def _aquarium(r: random.Random) -> tuple[str, list[str], int]:
    return _product_plus(r, "An aquarium has {a} tanks with {b} fish in each tank. Then {c} new fish arrive. "
                            "How many fish does the aquarium have now?",
                         "The tanks hold {a} x {b} = {p} fish.", "With the new fish, {p} + {c} = {t}.")


def _basketball(r: random.Random) -> tuple[str, list[str], int]:
    a, b = r.randint(1, 99), r.randint(1, 99)
    question = (f"In a basketball game a team scores {a} two-point baskets and {b} three-point baskets. "
                f"How many points does the team score?")
    steps = [f"Two-pointers give 2 x {a} = {2 * a} points.", f"Three-pointers give 3 x {b} = {3 * b} points.",
             f"In total {2 * a} + {3 * b} = {2 * a + 3 * b}."]
    return question, steps, 2 * a + 3 * b


def _time_challenge(r: random.Random) -> tuple[str, list[str], int]:
    return _product_plus(r, "In a time challenge a runner completes {a} laps that take {b} minutes each, then "
                            "rests for {c} minutes. How many minutes does the challenge take?",
                         "The laps take {a} x {b} = {p} minutes.", "With the rest, {p} + {c} = {t}.")


def _discount(r: random.Random) -> tuple[str, list[str], int]:
    a = r.randint(2, 99)
    b, c = r.randint(1, a - 1), r.randint(1, 99)
    question = (f"A jacket costs {a} dollars. On discount day every jacket is {b} dollars cheaper. "
                f"How many dollars do {c} jackets cost on discount day?")
    return question, [f"One jacket costs {a} - {b} = {a - b} dollars.", f"So {c} jackets cost {c} x {a - b} = {c * (a - b)}."], c * (a - b)


def _garden(r: random.Random) -> tuple[str, list[str], int]:
    a, b = r.randint(1, 99), r.randint(1, 99)
    question = (f"A garden layout is a rectangle {a} meters long and {b} meters wide. "
                f"What is the area of the garden in square meters?")
    return question, [f"The area is length x width = {a} x {b} = {a * b}."], a * b


def _savings(r: random.Random) -> tuple[str, list[str], int]:
    a, b, c = r.randint(1, 99), r.randint(1, 99), r.randint(1, 99)
    question = (f"In a savings plan, Sam starts with {a} dollars and saves {b} dollars every week. "
                f"How many dollars does Sam have after {c} weeks?")
    return question, [f"Sam saves {b} x {c} = {b * c} dollars.", f"In total {a} + {b * c} = {a + b * c}."], a + b * c


def _bakery(r: random.Random) -> tuple[str, list[str], int]:
    b = r.randint(1, 99)
    a = r.randint(b, 99)
    question = (f"A bakery has {a} cookies and packs them into boxes of {b} cookies. "
                f"How many boxes can the bakery fill completely?")
    return question, [f"Divide {a} by {b}: {a} = {b} x {a // b} + {a % b}.", f"So {a // b} boxes are full."], a // b


def _interest(r: random.Random) -> tuple[str, list[str], int]:
    a, b, c = r.randint(1, 99), r.randint(1, 99), r.randint(1, 99)
    question = (f"A bank deposit of {a * 100} dollars earns simple interest of {b} percent per year. "
                f"How many dollars of interest does it earn in {c} years?")
    steps = [f"One year earns {a * 100} x {b} / 100 = {a * b} dollars.", f"Over {c} years, {a * b} x {c} = {a * b * c}."]
    return question, steps, a * b * c


#: (class name, generator rng -> (question, reasoning steps, integer answer)), one per class
MATH_CLASSES: list[tuple[str, Callable[[random.Random], tuple[str, list[str], int]]]] = [
    ("pizza slices", _pizza),
    ("field trip", _field_trip),
    ("aquarium", _aquarium),
    ("basketball game", _basketball),
    ("time challenge", _time_challenge),
    ("discount day", _discount),
    ("garden layout", _garden),
    ("savings plan", _savings),
    ("bakery", _bakery),
    ("simple interest", _interest),
]


def _math_class(k: int, n: int, rng: random.Random, reasoning: bool) -> list[dict]:
    name, make = MATH_CLASSES[k]
    seen: set[str] = set()
    out = []
    while len(out) < n:
        question, steps, answer = make(rng)
        if question in seen:
            continue
        seen.add(question)
        prompt = f"Solve the math problem.\nProblem: {question}\nAnswer:"
        response = f" {' '.join(steps)} The answer is {answer}." if reasoning else f" {answer}"
        out.append({"prompt": prompt, "response": response, "label": k, "class_name": name, "answer": answer})
    return out


# ----------------------------------------------------------------------------------------------- API
def make_task(name: str, classes: int = 10, per_class: int = 100, seed: int = 0) -> list[dict]:
    """``classes * per_class`` records of task ``name``, grouped by class (class 0 first).

    Each record: {"prompt", "response", "label" (class index), "class_name"}, plus "input" (the sentence)
    for "sentences" and "answer" (int) for the math tasks. Prompts are distinct within a class.
    """
    if name not in TASKS:
        raise DataInfError(f"unknown generation task {name!r}; choose from {', '.join(TASKS)}")
    if not isinstance(classes, int) or not 2 <= classes <= 10:
        raise DataInfError(f"classes must be an integer from 2 to 10, got {classes!r}")
    if not isinstance(per_class, int) or not 1 <= per_class <= 2000:
        raise DataInfError(f"per_class must be an integer from 1 to 2000, got {per_class!r}")
    records: list[dict] = []
    for k in range(classes):
        rng = random.Random(f"{name}/{seed}/{k}")  # per class, so class k does not depend on `classes`
        if name == "sentences":
            records += _sentence_class(k, per_class, rng)
        else:
            records += _math_class(k, per_class, rng, reasoning=name == "math-reasoning")
    return records


def chat_records(records: Sequence[dict]) -> list[dict]:
    """The same examples as chat ``{"messages": [...]}`` records (TRL's conversational format), keeping
    ``label`` and ``class_name``: for "sentences" the chatbot's description is the system turn and the
    sentence the user turn; for the math tasks the problem is the user turn. The assistant turn is the
    response without its leading space."""
    out = []
    for r in records:
        if "input" in r:  # sentences: "You are {bot}, a chatbot that can only {instruction}.\nSentence: ..."
            system = r["prompt"].split("\n", 1)[0]
            turns = [{"role": "system", "content": system}, {"role": "user", "content": r["input"]}]
        else:
            turns = [{"role": "user", "content": r["prompt"].removesuffix("\nAnswer:")}]
        turns.append({"role": "assistant", "content": r["response"].strip()})
        out.append({"messages": turns, "label": r["label"], "class_name": r["class_name"]})
    return out


def split_task(records: Sequence[dict], train_per_class: int = 90, test_per_class: int = 10) -> tuple[list[dict], list[dict]]:
    """(train, test): the first ``train_per_class`` records of each class and the next ``test_per_class``.

    Records keep their order within each split (grouped by class). A class with too few records raises.
    """
    if train_per_class < 1 or test_per_class < 1:
        raise DataInfError("train_per_class and test_per_class must be >= 1")
    by_class: dict[int, list[dict]] = {}
    for r in records:
        by_class.setdefault(int(r["label"]), []).append(r)
    train, test = [], []
    for k in sorted(by_class):
        rows = by_class[k]
        if len(rows) < train_per_class + test_per_class:
            raise DataInfError(f"class {k} has {len(rows)} examples, fewer than train_per_class + test_per_class = "
                               f"{train_per_class + test_per_class}; generate more per class")
        train += rows[:train_per_class]
        test += rows[train_per_class : train_per_class + test_per_class]
    return train, test


__all__ = ["MATH_CLASSES", "SENTENCE_CLASSES", "TASKS", "chat_records", "make_task", "random_sentence", "split_task"]
