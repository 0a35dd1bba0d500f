"""Offline batch jobs over JSONL prompt files: `attentionpack batch` (locally or on Ray Data with `--ray`)."""
