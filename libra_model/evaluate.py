"""Caption and VQA benchmarks on local data: ``python -m libra_model.evaluate run|score ...``.

    python -m libra_model.evaluate run --checkpoint DIR --processor DIR --task caption --images ROOT \\
        --annotations captions_val2014.json --output results/captions.json [--batch-size 8] [--limit 500]
    python -m libra_model.evaluate run --checkpoint DIR --task vqa --images ROOT --questions questions.json \\
        --annotations annotations.json --output results/vqa.json
    python -m libra_model.evaluate score --task caption --annotations FILE --predictions FILE
    python -m libra_model.evaluate score --task vqa --questions FILE --annotations FILE --predictions FILE

``run`` generates answers in batches (the prompts of :mod:`libra_model.eval.predict`), writes them in the official
submission formats (captions ``[{"image_id", "caption"}]``, VQA ``[{"question_id", "answer"}]``), skipping and
counting missing or corrupt images, then scores them as ``score`` does. Captions: BLEU-1..4, METEOR, ROUGE-L,
CIDEr of the COCO caption evaluation (needs Java); VQA: the VQAv2 accuracy, overall and per answer type. Scores
cover the images / questions that have a prediction (the table says how many of how many). Both print a table
and, as the last line of stdout, one JSON object: caption metrics as fractions, VQA accuracies as percentages.
A VQA ``run`` without ``--annotations`` (test-dev) only writes the submission file; its JSON line then holds the
counts.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from libra_model.eval.caption_metrics import (
    CAPTION_METRICS,
    ScorerUnavailable,
    check_scorer_available,
    score_captions,
)
from libra_model.eval.datasets import (
    load_caption_predictions,
    load_caption_set,
    load_vqa_predictions,
    load_vqa_set,
    match_predictions,
    resolve_vqa_image,
    write_results,
)
from libra_model.eval.vqa_metrics import ANSWER_TYPES, vqa_accuracy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_NEW_TOKENS = {"caption": 30, "vqa": 10}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see ``--help`` of each verb)."""
    parser = argparse.ArgumentParser(prog="python -m libra_model.evaluate", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="generate answers for a benchmark, write the results file and score it")
    run.add_argument("--checkpoint", required=True, help="Libra model directory (config.json + weights)")
    run.add_argument("--processor", default=None, help="processor directory (default: the checkpoint)")
    run.add_argument("--task", required=True, choices=["caption", "vqa"])
    run.add_argument("--images", required=True, help="image root (caption file names and VQA images under it)")
    run.add_argument("--annotations", default=None,
                     help="caption annotations (COCO format; required for captions) or VQA annotations (optional: "
                          "without them the VQA results are written but not scored)")
    run.add_argument("--questions", default=None, help="VQA questions file (required for --task vqa)")
    run.add_argument("--output", required=True, help="results file to write (the official submission format)")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-new-tokens", type=int, default=None, help="default: 30 for captions, 10 for VQA")
    run.add_argument("--num-beams", type=int, default=1, help="1 = greedy decoding (default)")
    run.add_argument("--limit", type=int, default=None, help="only the first N images / questions")
    run.add_argument("--image-template", default=None,
                     help="VQA image path under --images, e.g. 'val2014/COCO_val2014_{image_id:012d}.jpg' "
                          "(default: the COCO names are searched)")
    run.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="model dtype (default: as saved)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cpp"])
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    score = verbs.add_parser("score", help="score an existing results file")
    score.add_argument("--task", required=True, choices=["caption", "vqa"])
    score.add_argument("--annotations", required=True, help="caption or VQA annotations file")
    score.add_argument("--questions", default=None, help="VQA questions file (required for --task vqa)")
    score.add_argument("--predictions", required=True, help="results file (the official submission format)")
    args = parser.parse_args(argv)
    if args.task == "vqa" and not args.questions:
        parser.error("--task vqa needs --questions")
    if args.task == "caption" and not args.annotations:
        parser.error("--task caption needs --annotations")
    if args.verb == "run":
        for name in ("batch_size", "max_new_tokens", "num_beams", "limit"):
            value = getattr(args, name)
            if value is not None and value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


# ------------------------------------------------------------------------------------------------------ scoring
def score_caption_predictions(caption_set, predictions: dict, predictions_path: str) -> tuple[dict, int]:
    """(metrics, number of scored images) of {image_id: caption} against a loaded CaptionSet: every predicted
    image must be in the annotations; images without a prediction are left out of the score."""
    match_predictions(predictions, caption_set.references, predictions_path, caption_set.path, "image_id")
    references = {key: caption_set.references[key] for key in caption_set.references if key in predictions}
    return score_captions(references, {key: predictions[key] for key in references}), len(references)


def score_vqa_predictions(vqa_set, predictions: dict, predictions_path: str) -> tuple[dict, int]:
    """(accuracies in %, number of scored questions) of {question_id: answer} against a loaded VQASet with
    annotations; every predicted question must be in the questions file."""
    match_predictions(predictions, vqa_set.questions, predictions_path, vqa_set.questions_path, "question_id")
    annotations = {qid: vqa_set.annotations[qid] for qid in vqa_set.annotations if qid in predictions}
    return vqa_accuracy(predictions, annotations), len(annotations)


def print_caption_table(scores: dict, scored: int, total: int) -> None:
    """The caption table, then the JSON line (fractions)."""
    print(f"caption metrics (COCO caption evaluation, PTB tokenisation) on {scored} of {total} images")
    for name in CAPTION_METRICS:
        print(f"  {name:<8} {scores[name]:.4f}")
    print(json.dumps({name: scores[name] for name in CAPTION_METRICS}))


def print_vqa_table(scores: dict, scored: int, total: int) -> None:
    """The VQA table, then the JSON line (percentages; null for an answer type without questions)."""
    print(f"VQA accuracy (VQAv2 metric) on {scored} of {total} questions")
    for name in ("overall", *ANSWER_TYPES):
        value = scores.get(name)
        print(f"  {name:<8} {'-' if value is None else f'{value:.2f}'}")
    print(json.dumps({name: scores.get(name) for name in ("overall", *ANSWER_TYPES)}))


def score_command(args: argparse.Namespace) -> int:
    """The ``score`` verb."""
    if args.task == "caption":
        caption_set = load_caption_set(args.annotations)
        predictions = load_caption_predictions(args.predictions)
        check_scorer_available()
        scores, scored = score_caption_predictions(caption_set, predictions, args.predictions)
        print_caption_table(scores, scored, len(caption_set.images))
    else:
        vqa_set = load_vqa_set(args.questions, args.annotations)
        predictions = load_vqa_predictions(args.predictions)
        scores, scored = score_vqa_predictions(vqa_set, predictions, args.predictions)
        print_vqa_table(scores, scored, len(vqa_set.questions))
    return 0


# ---------------------------------------------------------------------------------------------------------- run
def run_command(args: argparse.Namespace) -> int:
    """The ``run`` verb: load, generate, write, score."""
    import os

    from libra_model.data.loader import SkipStats
    from libra_model.eval.predict import EvalItem, decoding_kwargs, predict
    from libra_model.model import LibraForCausalLM
    from libra_model.processor import LibraProcessor

    decoding_kwargs(args.num_beams, torch.device(args.device))  # a bad --num-beams fails before anything loads
    if args.task == "caption":
        dataset = load_caption_set(args.annotations)
        check_scorer_available()
        items = [EvalItem(image_id, os.path.join(args.images, name)) for image_id, name in dataset.images.items()]
    else:
        dataset = load_vqa_set(args.questions, args.annotations)
        items = [EvalItem(qid, resolve_vqa_image(args.images, q["image_id"], dataset.subtype, args.image_template),
                          q["question"]) for qid, q in dataset.questions.items()]
    total = len(items)
    items = items[:args.limit] if args.limit else items
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    model = LibraForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device, backend=args.backend)
    processor = LibraProcessor.from_pretrained(args.processor or args.checkpoint, model.config, device=device)
    stats = SkipStats()
    answers = predict(model, processor, args.task, items, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.task],
                      num_beams=args.num_beams, stats=stats, progress=not args.no_progress)
    field = "caption" if args.task == "caption" else "answer"
    key = "image_id" if args.task == "caption" else "question_id"
    write_results(args.output, [{key: k, field: v} for k, v in answers.items()])
    print(f"wrote {len(answers)} {args.task} results to {args.output} ({len(items)} of {total} "
          f"{'images' if args.task == 'caption' else 'questions'} asked; images {stats.summary()})")
    if not answers:
        raise SystemExit(f"evaluate run: no image could be read under {args.images} ({stats.summary()})")
    if args.task == "caption":
        scores, scored = score_caption_predictions(dataset, answers, args.output)
        print_caption_table(scores, scored, total)
    elif dataset.annotations is not None:
        scores, scored = score_vqa_predictions(dataset, answers, args.output)
        print_vqa_table(scores, scored, total)
    else:
        print("no --annotations: the VQA results are not scored")
        print(json.dumps({"results": len(answers), "skipped_images": stats.total}))
    return 0


def main(argv=None) -> int:
    """Entry point."""
    args = parse_args(argv)
    try:
        return run_command(args) if args.verb == "run" else score_command(args)
    except (ValueError, FileNotFoundError, ScorerUnavailable) as error:
        print(f"evaluate {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
