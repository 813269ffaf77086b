"""Evaluation beside the recipe: python -m fastdistil.evaluate fine-tunes a run's teacher, its student and a
random student of the student's shape on a downstream task and scores them (finetune), on the tasks of tasks
with the metrics of metrics."""

from fastdistil.evaluate.finetune import EvalConfig, cli, main, parse_args

__all__ = ["EvalConfig", "cli", "main", "parse_args"]
