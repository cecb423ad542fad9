"""VQAv2 accuracy (also used for OK-VQA): answer normalisation and the leave-one-out consensus score.

Normalisation, applied to the prediction and to every annotator answer alike: newlines and tabs become spaces,
punctuation is removed (or turned into a space where it joins two words), a period is dropped unless a digit
follows it, text is lowercased, number words "none", "zero" .. "ten" become digits, the articles "a", "an", "the"
are dropped, and contractions written without their apostrophe ("dont", "whats") get it back. A comma between two
digits ("1,000") is removed rather than spaced.

Score of one question with 10 annotator answers: for each annotator i, min(#matches among the other 9 / 3, 1),
averaged over the 10 leave-one-out subsets (so 3 or more matching annotators give 100%, 2 give 60%, 1 gives 30%).
Results are percentages, overall and per answer type ("yes/no", "number", "other").
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence

ANSWER_TYPES = ("yes/no", "number", "other")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Punctuation that is deleted when it touches a space (or the answer has a digit,digit comma), else spaced out.
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The canonical forms; every spelling with some of their apostrophes left out maps back to them. Spellings that are
# ordinary words ("ill", "well", "were", "its", ...) are excluded below so that they are never rewritten.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd've", "i'm",
    "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd", "she'd've", "she'll",
    "she's", "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll",
    "somebody's", "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've",
    "something'll", "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll",
    "they're", "they've", "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's",
    "what've", "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've",
    "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll",
    "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)
_ORDINARY_WORDS = frozenset({"its", "lets", "shed", "shell", "well", "were", "wed", "ill", "hell"})


def _apostrophe_variants(word: str) -> set[str]:
    """Every spelling of ``word`` with a non-empty subset of its apostrophes removed."""
    pieces = word.split("'")
    variants = set()
    for keep in itertools.product((True, False), repeat=len(pieces) - 1):
        if all(keep):
            continue
        text = pieces[0]
        for kept, piece in zip(keep, pieces[1:]):
            text += ("'" if kept else "") + piece
        variants.add(text)
    return variants


CONTRACTIONS = {variant: word for word in _CONTRACTIONS for variant in _apostrophe_variants(word)
                if variant not in _ORDINARY_WORDS and variant}


def _strip_punctuation(text: str) -> str:
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_answer(answer: str) -> str:
    """The normalised form of one answer (see the module docstring): "Two dogs." -> "2 dogs"."""
    if not isinstance(answer, str):
        raise TypeError(f"normalize_answer: answer must be a str, got {type(answer).__name__}")
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _strip_punctuation(text).lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def question_accuracy(prediction: str, annotator_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one prediction against the annotators' answers (any number >= 1; VQAv2 has 10):
    the mean over annotators i of min(#(other annotators whose answer equals the prediction) / 3, 1)."""
    if not annotator_answers:
        raise ValueError("question_accuracy: annotator_answers is empty")
    predicted = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in annotator_answers]
    matches = sum(a == predicted for a in answers)
    total = 0.0
    for answer in answers:
        others = matches - (answer == predicted)
        total += min(others / 3.0, 1.0)
    return total / len(answers)


def vqa_accuracy(predictions: Mapping[int, str], annotations: Mapping[int, dict]) -> dict:
    """Percentages {"overall", "yes/no", "number", "other"} over the questions of ``annotations``
    ({question_id: {"answers": [str, ...], "answer_type": str}}); ``predictions`` {question_id: answer} must
    cover every annotated question (else ValueError naming the missing ids). An answer type without questions
    scores None."""
    missing = [qid for qid in annotations if qid not in predictions]
    if missing:
        raise ValueError(f"vqa_accuracy: {len(missing)} annotated questions have no prediction "
                         f"(first: {missing[:5]}); predict every question or score a subset of the annotations")
    if not annotations:
        raise ValueError("vqa_accuracy: no annotated question to score")
    by_type: dict[str, list[float]] = {kind: [] for kind in ANSWER_TYPES}
    every = []
    for qid, entry in annotations.items():
        accuracy = question_accuracy(predictions[qid], entry["answers"])
        every.append(accuracy)
        by_type.setdefault(entry.get("answer_type", "other"), []).append(accuracy)
    percent = lambda values: 100.0 * sum(values) / len(values) if values else None
    result = {"overall": percent(every)}
    result.update({kind: percent(values) for kind, values in by_type.items()})
    return result
