"""The Ray Serve application: an `Ingress` deployment (the OpenAI-compatible FastAPI app of `serve.app`, holding
no model) in front of `ModelServer` replicas routed by `PrefixAffinityRouter`.

    ray start --head                      # or nothing: `attentionpack serve --ray` starts a local cluster
    attentionpack serve --ray --replicas 2 --budget 1/8
    serve run attentionpack.serve.cluster:build_app replicas=2 budget=1/8    # Ray's own CLI, or a YAML config:

    applications:
      - name: attentionpack
        route_prefix: /
        import_path: attentionpack.serve.cluster:build_app
        args: {replicas: 4, budget: "1/8", kv_memory: 8GiB, prefix_store: /shared/prefixes}

`build_app(args)` takes the fields of `ServeOptions` plus `replicas`, `max_ongoing_requests` (per replica) and
`replica_cpus`. Replicas that see one `prefix_store` folder share stored prefixes; without one each keeps its own.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from ray import serve
from ray.serve.config import RequestRouterConfig

from ..app import create_app
from ..options import ServeOptions
from .remote import RemoteEngine
from .replica import ModelServer

HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 10.0
ROUTER = "attentionpack.serve.cluster.router.PrefixAffinityRouter"


class ClusterOptions(ServeOptions):
    """`ServeOptions` plus the shape of the Ray application."""

    replicas: int = Field(default=2, ge=1)
    max_ongoing_requests: int = Field(default=64, ge=1)
    replica_cpus: float = Field(default=1.0, gt=0)


@serve.ingress()
class Ingress:
    """The HTTP side: validation, tokenizing, stop strings, streaming; every request is one `generate` call."""

    def __init__(self, server: Any, options: dict[str, Any]) -> None:
        self.server = server
        self.options = ServeOptions(**options)

    async def __serve_build_asgi_app__(self) -> Any:
        info = await self.server.info.remote()
        tokenizer = await self.server.tokenizer_object.remote()
        self.engine = RemoteEngine(self.server, info)
        return create_app(
            self.engine, tokenizer, info["model_name"], default_max_tokens=self.options.default_max_tokens
        )


def build_app(args: dict[str, Any]) -> Any:
    """The application (Ray Serve's app builder: `serve run attentionpack.serve.cluster:build_app key=value ...`)."""
    options = ClusterOptions(**args)
    serve_fields = options.model_dump(include=set(ServeOptions.model_fields))
    options.spec()  # --preset and --budget together fail here, before any replica starts
    deployment: Any = serve.deployment  # ray types the decorator's overloads loosely
    server = deployment(ModelServer).options(
        name="ModelServer",
        num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.replica_cpus},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),  # type: ignore[arg-type]
    )
    ingress = deployment(Ingress).options(name="Ingress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(server.bind(serve_fields), serve_fields)
