"""AI-T2I: aggregating-and-isolating cross-attention guidance for diffusers pipelines.

from ait2i_ext import generate
out = generate(pipe, "a red circle and a blue square", subjects=["red circle", "blue square"])
"""

from .config import AIT2IConfig, LossConfig, ScheduleConfig
from .pipeline import GuidedOutput, generate
from .tokens import Subject, TokenGroup, describe, infer_subjects, resolve_groups

__version__ = "0.1.0"

__all__ = [
    "AIT2IConfig",
    "GuidedOutput",
    "LossConfig",
    "ScheduleConfig",
    "Subject",
    "TokenGroup",
    "describe",
    "generate",
    "infer_subjects",
    "resolve_groups",
]
