"""The server on Ray Serve: replicas of the model behind one OpenAI-compatible ingress, with prefix-affinity
routing (`PrefixAffinityRouter`). Needs the `ray` extra; `build_app` is Ray Serve's application builder."""

from __future__ import annotations

from .app import ClusterOptions, build_app

__all__ = ["ClusterOptions", "build_app"]
