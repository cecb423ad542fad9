"""Caption metrics: BLEU and ROUGE-L against hand-computed values, METEOR and CIDEr against the reference scorer
called directly on the pre-tokenised captions, and the PTB tokenisation of raw captions."""

import math

import pytest

from libra_model.eval import caption_metrics
from libra_model.eval.caption_metrics import (
    CAPTION_METRICS,
    ScorerUnavailable,
    check_scorer_available,
    ptb_tokenize,
    score_captions,
)

# Two images, one reference each. Tokenised (lowercase, no punctuation) they read:
#   1: hyp "a red circle on the left"  ref "a red circle on the right"
#   2: hyp "a blue square"             ref "a blue square in the middle"
RAW_REFERENCES = {1: ["A red circle, on the right."], 2: ["A blue square in the middle!"]}
RAW_PREDICTIONS = {1: "a red circle on the LEFT", 2: "A blue square."}
TOKENIZED_REFERENCES = {1: ["a red circle on the right"], 2: ["a blue square in the middle"]}
TOKENIZED_PREDICTIONS = {1: ["a red circle on the left"], 2: ["a blue square"]}


def hand_bleu():
    # Corpus BLEU: clipped n-gram matches over both hypotheses, brevity penalty exp(1 - 12/9) (9 hypothesis
    # words, closest reference lengths 6 + 6).
    precisions = [8 / 9, (4 + 2) / (5 + 2), (3 + 1) / (4 + 1), (2 + 0) / (3 + 0)]
    brevity = math.exp(1 - 12 / 9)
    return [brevity * math.prod(precisions[:n]) ** (1 / n) for n in range(1, 5)]


def hand_rouge_l():
    # ROUGE-L F with beta 1.2 per image, averaged: LCS 5 of 6/6 words; LCS 3 of 3 (hyp) / 6 (ref) words.
    beta2 = 1.2 ** 2
    f = lambda p, r: (1 + beta2) * p * r / (r + beta2 * p)
    return (f(5 / 6, 5 / 6) + f(3 / 3, 3 / 6)) / 2


def test_ptb_tokenisation_of_raw_captions():
    assert ptb_tokenize(RAW_REFERENCES) == TOKENIZED_REFERENCES
    assert ptb_tokenize({k: [v] for k, v in RAW_PREDICTIONS.items()}) == TOKENIZED_PREDICTIONS


def test_scores_against_hand_values_and_the_reference_scorer():
    from pycocoevalcap.cider.cider import Cider

    scores = score_captions(RAW_REFERENCES, RAW_PREDICTIONS)
    assert list(scores) == list(CAPTION_METRICS)
    for n, expected in enumerate(hand_bleu(), start=1):
        assert scores[f"Bleu_{n}"] == pytest.approx(expected, rel=1e-6), n
    assert scores["ROUGE_L"] == pytest.approx(hand_rouge_l(), rel=1e-9)
    cider, _ = Cider().compute_score(TOKENIZED_REFERENCES, TOKENIZED_PREDICTIONS)
    # pycocoevalcap's Meteor object itself (one Java process per test run: starting one takes seconds).
    meteor, _ = caption_metrics.meteor_scorer().compute_score(TOKENIZED_REFERENCES, TOKENIZED_PREDICTIONS)
    assert scores["CIDEr"] == pytest.approx(cider, rel=1e-12)
    assert scores["METEOR"] == pytest.approx(meteor, rel=1e-12)
    assert 0 < scores["METEOR"] < 1 and scores["CIDEr"] > 0


def test_perfect_and_empty_predictions():
    perfect = score_captions(TOKENIZED_REFERENCES, {k: v[0] for k, v in TOKENIZED_REFERENCES.items()})
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L"):
        assert perfect[name] == pytest.approx(1.0, abs=1e-6), name
    # An empty caption scores zero on its image; the other image still counts (ROUGE-L is a mean over images).
    empty = score_captions(TOKENIZED_REFERENCES, {1: "a red circle on the right", 2: ""})
    assert empty["ROUGE_L"] == pytest.approx(0.5)


def test_coverage_errors():
    with pytest.raises(ValueError, match="have no prediction"):
        score_captions(RAW_REFERENCES, {1: "a red circle"})
    with pytest.raises(ValueError, match="no reference caption"):
        score_captions(RAW_REFERENCES, {**RAW_PREDICTIONS, 3: "a cat"})


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    with pytest.raises(ScorerUnavailable, match="default-jre-headless"):
        check_scorer_available()
    with pytest.raises(ScorerUnavailable, match="Java"):
        score_captions(RAW_REFERENCES, RAW_PREDICTIONS)
