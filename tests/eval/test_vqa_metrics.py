"""VQA accuracy against hand-computed values (normalisation cases and the leave-one-out consensus)."""

import pytest

from libra_model.eval.vqa_metrics import normalize_answer, question_accuracy, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),                      # number words become digits, case folded
    ("none", "0"),
    ("The dog.", "dog"),               # article dropped, final period dropped
    ("an apple", "apple"),
    ("dont", "don't"),                 # contraction without its apostrophe gets it back
    ("whats that", "what's that"),
    ("couldnt've", "couldn't've"),
    ("well", "well"),                  # an ordinary word is never rewritten as a contraction
    ("yes!", "yes"),
    ("1,000", "1000"),                 # a comma between digits is removed
    ("3.5", "3.5"),                    # a period before a digit stays
    ("black/white", "black white"),    # punctuation inside a word becomes a space
    ("left - right", "left right"),    # punctuation next to a space is removed
    ("  red\tball\n", "red ball"),
])
def test_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalisation_rejects_non_strings():
    with pytest.raises(TypeError, match="answer must be a str"):
        normalize_answer(3)


# 10 annotators; accuracy = mean over the 10 leave-one-out subsets of min(matches among the other 9 / 3, 1).
@pytest.mark.parametrize("matching, expected", [
    (0, 0.0),
    (1, 0.3),    # the matching annotator's subset: 0; the 9 others: 1/3 each -> 3/10
    (2, 0.6),    # 2 subsets with 1/3, 8 with 2/3 -> (2/3 + 16/3) / 10
    (3, 0.9),    # 3 subsets with 2/3, 7 with 1 -> (2 + 7) / 10
    (4, 1.0),
    (10, 1.0),
])
def test_leave_one_out_consensus(matching, expected):
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert question_accuracy("two", answers) == pytest.approx(expected)


def test_normalisation_applies_to_annotator_answers():
    # "The Cat." and "cat" are the same answer after normalisation: 3 matches -> 0.9.
    answers = ["The Cat.", "cat", "cat!", "dog", "dog", "dog", "dog", "dog", "dog", "dog"]
    assert question_accuracy("a cat", answers) == pytest.approx(0.9)


def test_overall_and_per_answer_type():
    annotations = {
        1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},                   # pred yes: 1.0
        2: {"answers": ["no"] * 9 + ["yes"], "answer_type": "yes/no"},           # pred yes: 1 match -> 0.3
        3: {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number"},          # pred "two": 0.6
        4: {"answers": ["red"] * 10, "answer_type": "other"},                    # pred blue: 0.0
    }
    predictions = {1: "Yes", 2: "yes.", 3: "two", 4: "blue"}
    result = vqa_accuracy(predictions, annotations)
    assert result["overall"] == pytest.approx(100 * (1.0 + 0.3 + 0.6 + 0.0) / 4)
    assert result["yes/no"] == pytest.approx(100 * (1.0 + 0.3) / 2)
    assert result["number"] == pytest.approx(60.0)
    assert result["other"] == pytest.approx(0.0)


def test_an_answer_type_without_questions_scores_none():
    result = vqa_accuracy({7: "x"}, {7: {"answers": ["x"] * 10, "answer_type": "other"}})
    assert result == {"overall": 100.0, "yes/no": None, "number": None, "other": 100.0}


def test_errors():
    with pytest.raises(ValueError, match="no prediction"):
        vqa_accuracy({}, {1: {"answers": ["a"], "answer_type": "other"}})
    with pytest.raises(ValueError, match="no annotated question"):
        vqa_accuracy({}, {})
    with pytest.raises(ValueError, match="annotator_answers is empty"):
        question_accuracy("a", [])
