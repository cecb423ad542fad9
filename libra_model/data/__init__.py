"""Data pipelines: sample sources (webdataset tars, COCO caption JSON, LLaVA instruction JSON, a generated
coloured-shapes caption set), deterministic resumable sampling per DP replica, and a loader that skips, counts and
reports bad samples instead of failing."""

from libra_model.data.json_sources import CocoCaptions, LlavaInstructions
from libra_model.data.loader import ResumableLoader, SampleError, SkipStats
from libra_model.data.sampler import ResumableSampler
from libra_model.data.shapes import ShapesCaptions
from libra_model.data.webdataset import WebDatasetCaptions, expand_braces

__all__ = [
    "CocoCaptions",
    "LlavaInstructions",
    "ResumableLoader",
    "ResumableSampler",
    "SampleError",
    "ShapesCaptions",
    "SkipStats",
    "WebDatasetCaptions",
    "expand_braces",
]
