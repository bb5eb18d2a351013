"""The bag-of-words reference row: what the words of a prompt alone predict (bag_of_words.py),
and its place in the results table beside the majority class."""
import random
import re

import pytest

from finteam import bag_of_words, report


def words(text: str) -> list[str]:
    return re.findall(bag_of_words.WORD, text.lower())


def test_words_keep_numbers_tickers_and_contractions_whole():
    assert words("Inflation at 3.1%; $LULU looked good. Don't sell!") == [
        "inflation", "at", "3.1%", "$lulu", "looked", "good", "don't", "sell"]


def prompts(n: int, seed: int, signal: bool) -> list[tuple[str, str]]:
    """n prompts of random filler words; with `signal`, one word among them names the label."""
    rng = random.Random(seed)
    filler = [f"w{i}" for i in range(40)]
    out = []
    for _ in range(n):
        label = rng.choice(["Rise", "Fall"])
        text = rng.sample(filler, 6)
        if signal:
            text.insert(rng.randrange(7), "gains" if label == "Rise" else "losses")
        out.append((" ".join(text), label))
    return out


def accuracy(answers: list[str], pairs: list[tuple[str, str]]) -> float:
    return sum(a == gold for a, (_, gold) in zip(answers, pairs)) / len(pairs)


def test_a_word_that_names_the_label_is_learnt():
    train, valid, test = prompts(300, 0, True), prompts(60, 1, True), prompts(200, 2, True)
    assert accuracy(bag_of_words.answers(train, valid, [p for p, _ in test]), test) == 1.0


def test_words_unrelated_to_the_label_teach_nothing():
    train, valid, test = prompts(300, 0, False), prompts(60, 1, False), prompts(400, 2, False)
    # 400 balanced items: chance is 0.5 with a standard error of 0.025.
    assert 0.4 < accuracy(bag_of_words.answers(train, valid, [p for p, _ in test]), test) < 0.6


def test_degenerate_training_sets_answer_the_training_prior():
    one_label = [("a b c", "Yes"), ("b c d", "Yes"), ("c d e", "Yes")]
    assert bag_of_words.answers(one_label, [], ["a b", "z"]) == ["Yes", "Yes"]
    no_shared_word = [("alpha", "No"), ("beta", "No"), ("gamma", "Yes")]
    assert bag_of_words.answers(no_shared_word, [], ["alpha"]) == ["No"]
    assert bag_of_words.answers(prompts(50, 0, True), [], []) == []
    with pytest.raises(ValueError, match="no training examples"):
        bag_of_words.answers([], [], ["a"])


def test_the_same_splits_give_the_same_answers():
    train, valid, test = prompts(200, 3, True), prompts(40, 4, True), [p for p, _ in prompts(100, 5, False)]
    assert bag_of_words.answers(train, valid, test) == bag_of_words.answers(train, valid, test)


def test_reference_rows_follow_the_models_in_the_table():
    meta = {"sentiment": {"metric": "classification"}, "numeric": {"metric": "numeric"}}
    c = {"value": 0.5, "low": 0.4, "high": 0.6}
    summary = {"seeds": 2, "scores": {"team (MoE)": {"sentiment": c, "numeric": c, "mean": {**c, "seeds": [0.4, 0.6]}}}}
    table = report.interval_table(summary, meta, {}, report.references({"majority": {"sentiment": 0.219},
                                                                         "bag_of_words": {"sentiment": 0.8}}))
    lines = table.splitlines()
    assert lines[-2:] == ["| majority class | 0.219 | - | - | |", "| bag of words | 0.800 | - | - | |"]
    # A run written before the bag-of-words row existed shows the majority class alone.
    assert "bag of words" not in report.interval_table(summary, meta, {}, report.references({"majority": {"sentiment": 0.2}}))
