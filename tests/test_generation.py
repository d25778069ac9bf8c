"""The synthetic generation tasks: determinism, balance, and every response checked independently."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from datainf.data.generation import MATH_CLASSES, SENTENCE_CLASSES, TASKS, make_task, split_task
from datainf.errors import DataInfError


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_and_seeded(name):
    a = make_task(name, classes=10, per_class=20, seed=3)
    assert a == make_task(name, classes=10, per_class=20, seed=3)
    assert a != make_task(name, classes=10, per_class=20, seed=4)
    # class k does not depend on how many classes are generated
    assert make_task(name, classes=3, per_class=20, seed=3) == a[:60]


@pytest.mark.parametrize("name", TASKS)
def test_balanced_distinct_and_split(name):
    records = make_task(name)
    assert len(records) == 1000
    assert Counter(r["label"] for r in records) == {k: 100 for k in range(10)}
    for k in range(10):
        prompts = [r["prompt"] for r in records if r["label"] == k]
        assert len(set(prompts)) == 100
        assert len({r["class_name"] for r in records if r["label"] == k}) == 1
    assert len({r["class_name"] for r in records}) == 10
    train, test = split_task(records)
    assert len(train) == 900 and len(test) == 100
    assert Counter(r["label"] for r in train) == {k: 90 for k in range(10)}
    assert Counter(r["label"] for r in test) == {k: 10 for k in range(10)}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in records:
        assert set(r) >= {"prompt", "response", "label", "class_name"}
        assert r["response"].startswith(" ") and r["response"].strip()


# Independent re-implementations, written differently from the module (regexes, index arithmetic).
def _expected(instruction: str, s: str) -> str:
    words = s.split(" ")
    if "reverse" in instruction:
        return " ".join(words[::-1])
    if "every other letter" in instruction:
        letters = [c for c in s if c != " "]
        cased = iter(c.lower() if i % 2 else c.upper() for i, c in enumerate(letters))
        return "".join(c if c == " " else next(cased) for c in s)
    if "number 1" in instruction:
        return re.sub(" ", " 1 ", s)
    if "vowel with *" in instruction:
        return re.sub("[aeiou]", "*", s)
    if "double every consonant" in instruction:
        return re.sub("([b-df-hj-np-tv-z])", r"\1\1", s)
    if "capitalize every word" in instruction:
        return re.sub(r"\b([a-z])", lambda m: m.group(1).upper(), s)
    if "remove all vowels" in instruction:
        return re.sub("[aeiou]", "", s)
    if "'ly'" in instruction:
        return re.sub(r"(\w+)", r"\1ly", s)
    if "remove all consonants" in instruction:
        return re.sub("[b-df-hj-np-tv-z]", "", s)
    if "repeat each word" in instruction:
        return re.sub(r"(\w+)", r"\1 \1", s)
    raise AssertionError(instruction)


def test_sentence_transformations_are_right():
    records = make_task("sentences", per_class=50, seed=1)
    for r in records:
        bot, instruction, _ = SENTENCE_CLASSES[r["label"]]
        sentence = re.search(r"Sentence: (.*)\n", r["prompt"]).group(1)
        assert sentence == r["input"] and re.fullmatch("[a-z ]+", sentence)
        assert bot in r["prompt"] and instruction in r["prompt"]
        assert r["response"] == " " + _expected(instruction, sentence), (instruction, sentence)


def test_sentence_transformations_hand_made():
    funcs = {instruction: f for _, instruction, f in SENTENCE_CLASSES}
    s = "the red fox"
    want = {
        "reverse the order of the words": "fox red the",
        "capitalize every other letter": "ThE rEd FoX",
        "insert the number 1 between every word": "the 1 red 1 fox",
        "replace every vowel with *": "th* r*d f*x",
        "double every consonant": "tthhe rredd ffoxx",
        "capitalize every word": "The Red Fox",
        "remove all vowels": "th rd fx",
        "add 'ly' to the end of each word": "thely redly foxly",
        "remove all consonants": "e e o",
        "repeat each word twice": "the the red red fox fox",
    }
    assert set(want) == set(funcs)
    for instruction, expected in want.items():
        assert funcs[instruction](s) == expected


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _math_answer(class_name: str, q: list[int]) -> int:
    """The answer from the numbers in the question, in the order they appear."""
    if class_name == "pizza slices":
        return q[0] * q[1] - q[2]
    if class_name == "field trip":
        return (q[0] + q[1]) * q[2]
    if class_name in ("aquarium", "time challenge"):
        return q[0] * q[1] + q[2]
    if class_name == "basketball game":
        return 2 * q[0] + 3 * q[1]
    if class_name == "discount day":
        return (q[0] - q[1]) * q[2]
    if class_name == "garden layout":
        return q[0] * q[1]
    if class_name == "savings plan":
        return q[0] + q[1] * q[2]
    if class_name == "bakery":
        return q[0] // q[1]
    if class_name == "simple interest":
        return q[0] * q[1] * q[2] // 100
    raise AssertionError(class_name)


@pytest.mark.parametrize("name", ["math", "math-reasoning"])
def test_math_answers_are_right(name):
    records = make_task(name, per_class=60, seed=2)
    names = [n for n, _ in MATH_CLASSES]
    for r in records:
        assert r["class_name"] == names[r["label"]]
        question = re.search(r"Problem: (.*)\n", r["prompt"]).group(1)
        numbers = _numbers(question)
        assert all(1 <= x <= 99 for x in numbers if r["class_name"] != "simple interest")
        answer = _math_answer(r["class_name"], numbers)
        assert answer >= 0 and r["answer"] == answer
        if name == "math":
            assert r["response"] == f" {answer}"
        else:
            assert r["response"].endswith(f" The answer is {answer}.")
            # every "a op b = c" step of the reasoning is arithmetically right
            for a, op, b, c in re.findall(r"(\d+) ([x+\-]) (\d+) = (\d+)", r["response"]):
                a, b, c = int(a), int(b), int(c)
                assert c == {"x": a * b, "+": a + b, "-": a - b}[op], r["response"]


def test_bad_input():
    with pytest.raises(DataInfError):
        make_task("poetry")
    with pytest.raises(DataInfError):
        make_task("math", classes=11)
    with pytest.raises(DataInfError):
        split_task(make_task("math", classes=2, per_class=5), train_per_class=5, test_per_class=1)
