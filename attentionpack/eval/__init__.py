"""Evaluation: what compression costs in quality, memory and speed, measured in one run.

`evaluate(out, ...)` runs every metric for every configuration (see runner.py); each metric is also usable alone:
perplexity.continuation_perplexity, agreement.agreement, needle.needle_grid, child.measure_memory,
speed.measure_speed. Imported lazily so that `import attentionpack.eval.cli` stays light."""

__all__ = ["evaluate"]


def __getattr__(name):
    if name == "evaluate":
        from .runner import evaluate

        return evaluate
    raise AttributeError(name)
