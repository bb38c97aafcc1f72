"""Evaluation: datasets, answer grading, threshold sweeps and Pareto readouts."""

from .datasets import DATASETS, EvalItem, load_dataset
from .grading import answers_match, extract_answer, extract_boxed, grade
from .pareto import (
    fastest_at_accuracy,
    frontier,
    load_points_json,
    pareto_frontiers,
    plot_pareto,
    save_points_json,
    speedup_at_matched_accuracy,
)
from .sweep import THRESHOLDLESS_POLICIES, run_sweep, sweep_plan

__all__ = [
    "DATASETS",
    "EvalItem",
    "THRESHOLDLESS_POLICIES",
    "answers_match",
    "extract_answer",
    "extract_boxed",
    "fastest_at_accuracy",
    "frontier",
    "grade",
    "load_dataset",
    "load_points_json",
    "pareto_frontiers",
    "plot_pareto",
    "run_sweep",
    "save_points_json",
    "speedup_at_matched_accuracy",
    "sweep_plan",
]
