"""Benchmark of the inference function (functions/llm) against transformers' own generate().

    .venv/bin/python -m bench.function --out DIR [--device cpu|cuda] [--runs 5]

Builds a small random-weight Llama-style model, converts it to the loading-optimised format,
starts `python -m functions.llm` on it, and measures, in the same run, the same model with
transformers' `model.generate()` in this process:

* single_decode: decode tokens/s of one streaming request against generate()'s, both as
  (N - 1) / (T(N) - T(1)); target ratio >= 0.9. generate() runs with the intra-op threads the
  server's engine uses (one in exact numerics); the row also gives the ratio against torch's
  default thread count.
* concurrent8: aggregate tokens/s of 8 concurrent streaming requests against 8 sequential
  generate() calls; target ratio >= 2.
* startup: process start to ready, as the server measures it, split into imports, weight
  load and warm-up (median over fresh processes).
* http_ttft_overhead: time to first token through HTTP minus one bare forward pass over the
  same prompt.

Server and generate() measurements alternate run by run (the machine may be shared); each
figure is the median over `--runs` runs after one discarded warm run, and each ratio the
median of the per-run ratios. Writes DIR/function.json and DIR/function.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench._common import ensure_model, machine, save_figure, write_json
from sllm_knative.ports import free_port as _free_port
from testkit.proc import Proc

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Serverless inference scales to zero and back. The activator holds requests while"
CONCURRENT = 8


def _spec() -> Any:
    from sllm_knative.models import ModelSpec

    return ModelSpec(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=512, max_position_embeddings=2048)


class Server(Proc):
    def __init__(self, model_dir: Path, device: str, numerics: str | None, log: Path) -> None:
        super().__init__("server")
        self.port, self.internal = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "functions.llm", "--model", str(model_dir), "--served-model-name", "bench",
                "--device", device, "--host", "127.0.0.1", "--internal-host", "127.0.0.1", "--port", str(self.port),
                "--internal-port", str(self.internal), "--max-concurrency", str(CONCURRENT), "--parked-slots", "0",
                "--max-model-len", "1024"]
        if numerics:
            args += ["--numerics", numerics]
        self.spawned = time.time()
        self.start(args, log, append=True)

    def wait_ready(self, timeout: float = 300) -> dict[str, Any]:
        report: dict[str, Any] = self.wait_http(f"{self.url}/health/ready", timeout, interval=0.02).json()
        report["observed_s"] = time.time() - self.spawned
        return report

    def stop(self, grace: float = 30.0) -> int:
        return super().stop(grace)


def stream_times(url: str, prompt: str, max_tokens: int, client: httpx.Client) -> tuple[float, list[float], int]:
    """(request sent, arrival of each chunk, completion tokens) of one greedy stream.

    A token whose text is an incomplete character yields no chunk, so rates use the token count
    from usage, never the number of chunks.
    """
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return sent, arrivals, tokens


class Ours:
    """Measurements through HTTP against a running server."""

    def __init__(self, url: str, new_tokens: int) -> None:
        self.url = url
        self.n = new_tokens
        self.client = httpx.Client(timeout=300)

    def _request_s(self, n: int, prompt: str = PROMPT, client: httpx.Client | None = None) -> float:
        sent, arrivals, tokens = stream_times(self.url, prompt, n, client or self.client)
        assert tokens == n, (tokens, n)
        return arrivals[-1] - sent

    def decode_tps(self) -> float:
        """(N - 1) / (T(N) - T(1)): the same definition as for generate()."""
        return (self.n - 1) / (self._request_s(self.n) - self._request_s(1))

    def concurrent_tps(self) -> float:
        clients = [httpx.Client(timeout=300) for _ in range(CONCURRENT)]
        threads = [threading.Thread(target=self._request_s, args=(self.n, f"{i} {PROMPT}", clients[i]))
                   for i in range(CONCURRENT)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for c in clients:
            c.close()
        return CONCURRENT * self.n / wall

    def ttft_s(self) -> float:
        sent, arrivals, _ = stream_times(self.url, PROMPT, 1, self.client)
        return arrivals[0] - sent


class Generate:
    """transformers' own generate() on the same model, in this process."""

    def __init__(self, model_dir: Path, device: str, new_tokens: int, threads: int | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = device
        self.n = new_tokens
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        self.model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' stubs type .to oddly
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.default_threads = torch.get_num_threads()
        self.threads = threads or self.default_threads
        torch.set_num_threads(self.threads)

    def _ids(self, prompt: str) -> Any:
        return self.torch.tensor([self.tok.encode(prompt)], device=self.device)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def _gen_s(self, prompt: str, n: int) -> float:
        x = self._ids(prompt)
        with self.torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            self.model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            self._sync()
        return time.perf_counter() - t0

    def decode_tps(self) -> float:
        return (self.n - 1) / (self._gen_s(PROMPT, self.n) - self._gen_s(PROMPT, 1))

    def decode_tps_default_threads(self) -> float:
        """The same with torch's default number of intra-op threads."""
        self.torch.set_num_threads(self.default_threads)
        try:
            return self.decode_tps()
        finally:
            self.torch.set_num_threads(self.threads)

    def sequential_tps(self) -> float:
        return CONCURRENT * self.n / sum(self._gen_s(f"{i} {PROMPT}", self.n) for i in range(CONCURRENT))

    def forward_s(self) -> float:
        x = self._ids(PROMPT)
        with self.torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            self.model(x)
            self._sync()
        return time.perf_counter() - t0


def paired(ours: Callable[[], float], theirs: Callable[[], float], runs: int,
           also: Callable[[], float] | None = None) -> dict[str, Any]:
    """Alternate the measurements (one warm round first): on a shared machine all see the same load."""
    fns = [ours, theirs] + ([also] if also else [])
    for fn in fns:
        fn()
    values: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, values, strict=True):
            out.append(fn())
    a, b = values[0], values[1]
    result = {"ours": statistics.median(a), "theirs": statistics.median(b),
              "ratio": statistics.median(x / y for x, y in zip(a, b, strict=True)), "ours_runs": a, "theirs_runs": b}
    if also:
        c = values[2]
        result.update({"also": statistics.median(c), "also_ratio": statistics.median(
            x / y for x, y in zip(a, c, strict=True)), "also_runs": c})
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sllm_knative.convert import convert
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-function-"))
    src, ckpt = work / "hf", work / "ckpt"
    if ensure_model(src, _spec()) or not ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        convert(src, ckpt)
    log = Path(args.out) / "function-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)

    startups = []
    for _ in range(args.runs):
        server = Server(ckpt, args.device, args.numerics, log)
        try:
            startups.append(server.wait_ready())
        finally:
            server.stop()
    numerics = args.numerics or ("exact" if args.device == "cpu" else "fast")
    # Same compute for both sides: the server's engine uses one intra-op thread in exact numerics.
    base = Generate(src, args.device, args.tokens, threads=1 if numerics == "exact" else None)
    server = Server(ckpt, args.device, args.numerics, log)
    try:
        server.wait_ready()
        ours = Ours(server.url, args.tokens)
        single = paired(ours.decode_tps, base.decode_tps, args.runs, also=base.decode_tps_default_threads)
        concurrent = paired(ours.concurrent_tps, base.sequential_tps, args.runs)
        ttft = paired(ours.ttft_s, base.forward_s, max(args.runs, 10))
    finally:
        server.stop()

    def med(key: str) -> float:
        values = [s["startup"][key] for s in startups]
        return round(statistics.median(values), 4)

    rows = [
        {"name": "single_decode", "ratio_vs_generate": round(single["ratio"], 3),
         "tokens_per_s": round(single["ours"], 1), "generate_tokens_per_s": round(single["theirs"], 1),
         "generate_threads": base.threads, "target": 0.9,
         "ratio_vs_generate_default_threads": round(single["also_ratio"], 3),
         "generate_default_threads_tokens_per_s": round(single["also"], 1),
         "default_threads": base.default_threads},
        {"name": "concurrent8", "ratio_vs_sequential_generate": round(concurrent["ratio"], 3),
         "tokens_per_s": round(concurrent["ours"], 1),
         "sequential_generate_tokens_per_s": round(concurrent["theirs"], 1), "target": 2.0},
        {"name": "startup", "seconds": med("total_s"), "imports_s": med("imports_s"), "load_s": med("load_s"),
         "warmup_s": med("warmup_s"),
         "observed_s": round(statistics.median(s["observed_s"] for s in startups), 4),
         "runs_s": [s["startup"]["total_s"] for s in startups]},
        {"name": "http_ttft_overhead", "ms": round((ttft["ours"] - ttft["theirs"]) * 1e3, 2),
         "ttft_ms": round(ttft["ours"] * 1e3, 2), "bare_forward_ms": round(ttft["theirs"] * 1e3, 2)},
    ]
    spec = _spec()
    return {
        "rows": rows,
        "meta": {"device": args.device, "numerics": numerics,
                 "runs": args.runs, "new_tokens": args.tokens, "prompt": PROMPT, "concurrent": CONCURRENT,
                 "model": {"hidden_size": spec.hidden_size, "layers": spec.num_hidden_layers,
                           "heads": spec.num_attention_heads, "kv_heads": spec.num_key_value_heads,
                           "vocab": spec.vocab_size, "bytes": spec.nbytes()},
                 "generate_threads": base.threads, "load_average": os.getloadavg(), "machine": machine(),
                 "raw": {"single_decode": single, "concurrent8": concurrent, "ttft": ttft},
                 "command": " ".join([".venv/bin/python", "-m", "bench.function", *sys.argv[1:]])},
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["name"]: r for r in doc["rows"]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax = axes[0]
    labels = ["single stream", f"{CONCURRENT} streams"]
    ours = [rows["single_decode"]["tokens_per_s"], rows["concurrent8"]["tokens_per_s"]]
    theirs = [rows["single_decode"]["generate_tokens_per_s"], rows["concurrent8"]["sequential_generate_tokens_per_s"]]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], ours, 0.4, label="functions.llm (HTTP)")
    ax.bar([x + 0.2 for x in xs], theirs, 0.4,
           label=f"transformers generate() ({doc['meta']['generate_threads']} thread(s))")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("tokens/s")
    ax.set_title("decode throughput")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    s = rows["startup"]
    bottom = 0.0
    other = max(0.0, s["seconds"] - s["imports_s"] - s["load_s"] - s["warmup_s"])
    for part, label in ((other, "interpreter + server"), (s["imports_s"], "imports"), (s["load_s"], "weight load"),
                        (s["warmup_s"], "warm-up")):
        ax.bar([0], [part], 0.5, bottom=bottom, label=label)
        bottom += part
    ax.set_xticks([0], ["process start -> ready"])
    ax.set_ylabel("seconds")
    ax.set_title("startup")
    ax.legend(fontsize=8)
    ax = axes[2]
    t = rows["http_ttft_overhead"]
    ax.bar(["bare forward", "HTTP TTFT"], [t["bare_forward_ms"], t["ttft_ms"]])
    ax.set_ylabel("ms")
    ax.set_title(f"TTFT overhead {t['ms']:.1f} ms")
    fig.suptitle(f"functions.llm on {doc['meta']['device']} ({doc['meta']['numerics']} numerics)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--numerics", choices=["exact", "fast"], default=None, help="default: exact on cpu, fast on cuda")
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm run (median reported)")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--work", default=None, help="where the model is built (default: a temporary directory)")
    args = p.parse_args(argv)
    doc = run(args)
    out = Path(args.out)
    path = write_json(out, "function", doc)
    plot(doc, out / "function.png")
    for row in doc["rows"]:
        print(json.dumps(row))
    print(f"wrote {path} and {out / 'function.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
