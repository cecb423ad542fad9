"""Caption metrics as the COCO caption evaluation computes them (``pycocoevalcap``): the Stanford PTB tokeniser
(lowercased, punctuation removed), then BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D. SPICE is not computed.

The tokeniser and METEOR are Java programs shipped inside the ``pycocoevalcap`` package; a ``java`` executable on
PATH is required (``apt-get install default-jre-headless`` on Debian). Scores are fractions, as pycocoevalcap
reports them (multiply by 100 for the papers' tables).
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Mapping, Sequence

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


class ScorerUnavailable(RuntimeError):
    """The caption scorer cannot run here (pycocoevalcap or Java missing); the message says what to install."""


def check_scorer_available() -> None:
    """Raise :class:`ScorerUnavailable` saying what to install when pycocoevalcap or Java is missing."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise ScorerUnavailable("caption metrics need pycocoevalcap: pip install pycocoevalcap "
                           "(it is in requirements.txt)") from None
    if shutil.which("java") is None:
        raise ScorerUnavailable("caption metrics need Java for the PTB tokeniser and METEOR, and no 'java' is on PATH: "
                           "install a JRE (Debian: apt-get install -y default-jre-headless)")


@functools.lru_cache(maxsize=1)
def meteor_scorer():
    """The process's METEOR scorer (pycocoevalcap's ``Meteor``): one Java process, started on first use and kept,
    since starting it (loading its paraphrase tables) takes seconds."""
    from pycocoevalcap.meteor.meteor import Meteor

    check_scorer_available()
    return Meteor()


def ptb_tokenize(captions: Mapping[object, Sequence[str]]) -> dict:
    """{key: [caption, ...]} -> {key: [tokenised caption, ...]} with the Stanford PTB tokeniser as the COCO
    evaluation runs it (lowercased, punctuation tokens dropped)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    check_scorer_available()
    # PTBTokenizer reads {key: [{"caption": str}]} and pairs its output lines with the keys in order; trailing empty
    # captions produce no output line, so keys it did not return get empty captions (the same count as given).
    tokenized = PTBTokenizer().tokenize({key: [{"caption": c} for c in values] for key, values in captions.items()})
    out = {}
    for key, values in captions.items():
        got = list(tokenized.get(key, []))
        out[key] = got + [""] * (len(values) - len(got))
    return out


def score_tokenized(references: Mapping[object, Sequence[str]], predictions: Mapping[object, Sequence[str]]) -> dict:
    """The metrics of already tokenised captions: ``references`` {key: [str, ...]} and ``predictions``
    {key: [str]} (one each) over the same keys. Returns {metric: float} for :data:`CAPTION_METRICS`."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    check_scorer_available()
    if set(references) != set(predictions):
        raise ValueError("score_tokenized: references and predictions must have the same keys")
    if not references:
        raise ValueError("score_tokenized: nothing to score")
    references = {key: list(references[key]) for key in references}
    predictions = {key: list(predictions[key]) for key in references}
    for key, values in predictions.items():
        if len(values) != 1:
            raise ValueError(f"score_tokenized: key {key!r} has {len(values)} predictions, expected exactly one")
        if not references[key]:
            raise ValueError(f"score_tokenized: key {key!r} has no reference caption")
    scores: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(references, predictions, verbose=0)
    scores.update({f"Bleu_{n + 1}": float(value) for n, value in enumerate(bleu)})
    scores["METEOR"] = float(meteor_scorer().compute_score(references, predictions)[0])
    scores["ROUGE_L"] = float(Rouge().compute_score(references, predictions)[0])
    scores["CIDEr"] = float(Cider().compute_score(references, predictions)[0])
    return {name: scores[name] for name in CAPTION_METRICS}


def score_captions(references: Mapping[object, Sequence[str]], predictions: Mapping[object, str]) -> dict:
    """Raw captions -> metrics: ``references`` {image_id: [caption, ...]} and ``predictions`` {image_id: caption};
    every image with references must have a prediction (else ValueError naming the missing ids); predictions for
    images without references are an error too (they usually mean the wrong annotation file)."""
    missing = [key for key in references if key not in predictions]
    if missing:
        raise ValueError(f"score_captions: {len(missing)} images with reference captions have no prediction "
                         f"(first: {missing[:5]})")
    extra = [key for key in predictions if key not in references]
    if extra:
        raise ValueError(f"score_captions: {len(extra)} predicted images have no reference caption "
                         f"(first: {extra[:5]}); is it the right annotation file?")
    tokenized_refs = ptb_tokenize(references)
    tokenized_preds = ptb_tokenize({key: [predictions[key]] for key in references})
    return score_tokenized(tokenized_refs, tokenized_preds)
