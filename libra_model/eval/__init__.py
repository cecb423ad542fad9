"""Benchmark evaluation: ``caption_metrics`` (the COCO caption evaluation), ``vqa_metrics`` (the VQAv2 accuracy),
``datasets`` (the annotation and results formats), ``predict`` (batched generation with the evaluation prompts),
``heldout`` (the trainer's held-out evaluation). The command line is ``python -m libra_model.evaluate``."""
