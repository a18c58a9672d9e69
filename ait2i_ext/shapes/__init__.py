"""The shapes world: generated scenes of coloured shapes, a small text-to-image model trained on them
(shipped in ``ait2i_ext/assets/shapes_model``), an evaluator that reads images back, and fixed
benchmark prompt sets.

    from ait2i_ext.shapes import default_model_path, evaluate, prompt_set
"""

from .data import (
    CLOSE_COLOURS,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    Scene,
    ShapeObject,
    render_scene,
    sample_scene,
)
from .evaluator import Detection, EvaluatorConfig, ObjectScore, PromptScore, detect, evaluate
from .gligen import default_gligen_path, load_gligen_pipeline
from .model import (
    build_shapes_pipeline,
    default_controlnet_path,
    default_model_path,
    load_controlnet_pipeline,
    scene_edges,
)
from .prompts import (
    PROMPT_SETS,
    BenchmarkPrompt,
    PromptObject,
    SubjectWords,
    parse_prompt,
    prompt_set,
    subjects_for,
)

__all__ = [
    "CLOSE_COLOURS",
    "COLOURS",
    "HELD_OUT_PAIRS",
    "PROMPT_SETS",
    "SHAPES",
    "BenchmarkPrompt",
    "Detection",
    "EvaluatorConfig",
    "ObjectScore",
    "PromptObject",
    "PromptScore",
    "Scene",
    "ShapeObject",
    "SubjectWords",
    "build_shapes_pipeline",
    "default_controlnet_path",
    "default_gligen_path",
    "default_model_path",
    "detect",
    "evaluate",
    "load_controlnet_pipeline",
    "load_gligen_pipeline",
    "parse_prompt",
    "prompt_set",
    "render_scene",
    "sample_scene",
    "scene_edges",
    "subjects_for",
]
