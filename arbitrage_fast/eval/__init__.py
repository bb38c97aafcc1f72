"""Evaluation: datasets and splits, answer grading, threshold sweeps, calibration, intervals, reports."""

from .datasets import DATASETS, EvalItem, load_dataset
from .grading import answers_match, extract_answer, extract_boxed, grade
from .pareto import (
    frontier,
    load_points_json,
    pareto_frontiers,
    plot_pareto,
    save_points_json,
)
from .sweep import THRESHOLDLESS_POLICIES, run_sweep, sweep_plan

__all__ = [
    "DATASETS",
    "EvalItem",
    "THRESHOLDLESS_POLICIES",
    "answers_match",
    "extract_answer",
    "extract_boxed",
    "frontier",
    "grade",
    "load_dataset",
    "load_points_json",
    "pareto_frontiers",
    "plot_pareto",
    "run_sweep",
    "save_points_json",
    "sweep_plan",
]
