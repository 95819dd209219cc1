"""The ray-serve profile of bench/replay.py: real Ray Serve (the `ray` extra of pyproject.toml,
`pip install -e '.[ray]'`) serving every service's model with transformers.

One Serve application per service, `route_prefix=/<service>`, reached through Ray Serve's own
HTTP proxy. Each has one deployment, `LLM`, with autoscaling `min_replicas=0`,
`initial_replicas=0`, `max_replicas=1` (as the other profiles' services: one instance each),
`target_ongoing_requests=1`, `upscale_delay_s=0`, `downscale_delay_s` = the replay's keep-alive
(the same idle time before scaling to zero as every other profile), `look_back_period_s` and
`metrics_interval_s` short so that a scale-up from zero is not delayed by Ray's default 30 s
look-back (in Ray's favour). Each replica takes `num_cpus=0.5` of a Ray cluster of 2 CPUs, so
at most 4 replicas run at once: the 2 nodes x 2 slots of the other profiles.

A replica's constructor drops the page cache of the model directory (the store read at disk
speed, as knative-default) and loads it with transformers `from_pretrained` in bf16 on one
thread; a completion runs a greedy decode loop with the KV cache and streams OpenAI
`text_completion` chunks (the text of a token is its id: the random model has no words worth
decoding; what is measured is the time to the first chunk). The response carries
`x-sllm-instance: <replica id>`, how the replay sees which instance served it.

(No `from __future__ import annotations` here: FastAPI reads the route's annotations at
definition time, and `Request` is imported inside `_app`.)
"""


import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RAY_CPUS = 2
REPLICA_CPUS = 0.5


def _app() -> Any:
    """The Serve deployment (built here: importing ray is for this profile only)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from ray import serve

    api = FastAPI()

    @serve.ingress(api)
    class LLM:
        def __init__(self, model_dir: str, name: str) -> None:
            import torch
            from transformers import AutoModelForCausalLM

            from bench._fresh import drop_page_cache

            torch.set_num_threads(1)
            t0 = time.perf_counter()
            drop_page_cache(Path(model_dir))
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).eval()
            self.load_s = time.perf_counter() - t0
            self.name = name
            self.replica = serve.get_replica_context().replica_id.unique_id

        def _generate(self, ids: list[int], max_tokens: int) -> Iterator[str]:
            import torch

            cid = f"cmpl-{self.replica}-{time.monotonic_ns()}"
            past = None
            x = torch.tensor([ids])
            with torch.no_grad():
                for i in range(max_tokens):
                    out = self.model(input_ids=x, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    tok = int(out.logits[0, -1].argmax())
                    x = torch.tensor([[tok]])
                    chunk = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": self.name,
                             "choices": [{"index": 0, "text": f" {tok}", "logprobs": None,
                                          "finish_reason": "length" if i == max_tokens - 1 else None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        @api.post("/v1/completions")
        async def completions(self, request: Request) -> StreamingResponse:
            body = await request.json()
            prompt = body["prompt"]
            ids = [int(t) for t in (prompt if isinstance(prompt, list) else [1])]
            return StreamingResponse(self._generate(ids, int(body.get("max_tokens") or 16)),
                                     media_type="text/event-stream", headers={"x-sllm-instance": self.replica})

    return LLM


class RayServe:
    """Ray (a local cluster started by ray.init in this process) and one Serve app per service."""

    def __init__(self, models: Mapping[str, Path], port: int, idle_s: float) -> None:
        self.models, self.port, self.idle_s = dict(models), port, idle_s
        self.started = False

    def start(self) -> None:
        import ray
        from ray import serve

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; no token file in ~/.ray
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the replay's progress stays readable
        ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        self.started = True
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        llm: Any = serve.deployment(_app())
        for name, model_dir in self.models.items():
            dep = llm.options(name="LLM", ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=8,
                              autoscaling_config={"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1,
                                                  "target_ongoing_requests": 1, "upscale_delay_s": 0,
                                                  "downscale_delay_s": self.idle_s, "look_back_period_s": 2,
                                                  "metrics_interval_s": 0.5})
            serve.run(dep.bind(str(model_dir), name), name=name, route_prefix=f"/{name}", blocking=False)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            apps = serve.status().applications
            if all(name in apps and str(apps[name].status).endswith("RUNNING") for name in self.models):
                return
            time.sleep(0.5)
        raise TimeoutError(f"Ray Serve apps not RUNNING within 300 s: {serve.status().applications}")

    def base_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.port}/{service}/v1"

    def replicas(self) -> dict[str, int]:
        """service -> replicas that exist (starting or running)."""
        from ray import serve

        out: dict[str, int] = {}
        for name, app in serve.status().applications.items():
            out[name] = sum(n for d in app.deployments.values() for s, n in d.replica_states.items()
                            if str(s).split(".")[-1] in ("STARTING", "RUNNING", "UPDATING", "RECOVERING"))
        return out

    def stop(self) -> None:
        if not self.started:
            return
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.started = False
