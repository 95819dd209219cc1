"""Benchmark of the inference function (functions/llm) against transformers' own generate().

    .venv/bin/python -m bench.function --out DIR [--device cpu|cuda] [--runs 5]

Builds a small random-weight Llama-style model, converts it to the loading-optimised format,
starts `python -m functions.llm` on it, and measures, in the same run, the same model with
transformers' `model.generate()` in this process:

* single_decode: decode tokens/s of one streaming request (first to last token) against
  generate()'s decode rate ((t(N) - t(1)) / (N - 1)); target ratio >= 0.9.
* concurrent8: aggregate tokens/s of 8 concurrent streaming requests against 8 sequential
  generate() calls; target ratio >= 2.
* startup: process start to ready, as the server measures it, split into imports, weight
  load and warm-up (median over fresh processes).
* http_ttft_overhead: time to first token through HTTP minus one bare forward pass over the
  same prompt.

Every figure is the median over `--runs` runs after one discarded warm run. Writes
DIR/function.json and DIR/function.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench._common import machine, write_json

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Serverless inference scales to zero and back. The activator holds requests while"
CONCURRENT = 8


def _spec() -> Any:
    from sllm_knative.models import ModelSpec

    return ModelSpec(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=512, max_position_embeddings=2048)


def _median(fn: Callable[[], float], runs: int) -> tuple[float, list[float]]:
    fn()  # warm
    values = [fn() for _ in range(runs)]
    return statistics.median(values), values


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, model_dir: Path, device: str, numerics: str | None, log: Path) -> None:
        self.port, self.internal = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "functions.llm", "--model", str(model_dir), "--served-model-name", "bench",
                "--device", device, "--host", "127.0.0.1", "--internal-host", "127.0.0.1", "--port", str(self.port),
                "--internal-port", str(self.internal), "--max-concurrency", str(CONCURRENT), "--parked-slots", "0",
                "--max-model-len", "1024"]
        if numerics:
            args += ["--numerics", numerics]
        self._log = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.spawned = time.time()
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see its log")
            try:
                r = httpx.get(f"{self.url}/health/ready", timeout=5)
                if r.status_code == 200:
                    report = r.json()
                    report["observed_s"] = time.time() - self.spawned
                    return report
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def stream_times(url: str, prompt: str, max_tokens: int, client: httpx.Client) -> tuple[float, list[float], int]:
    """(request sent, arrival time of each token chunk, completion tokens) of one greedy stream."""
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


def measure_server(url: str, runs: int, new_tokens: int) -> dict[str, Any]:
    client = httpx.Client(timeout=300)

    def single() -> float:
        _, arrivals, tokens = stream_times(url, PROMPT, new_tokens, client)
        assert tokens == new_tokens
        return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])

    def concurrent() -> float:
        results: list[Any] = [None] * CONCURRENT
        clients = [httpx.Client(timeout=300) for _ in range(CONCURRENT)]

        def one(i: int) -> None:
            results[i] = stream_times(url, f"{i} {PROMPT}", new_tokens, clients[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for c in clients:
            c.close()
        return sum(r[2] for r in results) / wall

    def ttft() -> float:
        sent, arrivals, _ = stream_times(url, PROMPT, 1, client)
        return arrivals[0] - sent

    single_tps, single_runs = _median(single, runs)
    conc_tps, conc_runs = _median(concurrent, runs)
    ttft_s, ttft_runs = _median(ttft, max(runs, 10))
    client.close()
    return {"single_tps": single_tps, "single_runs": single_runs, "concurrent_tps": conc_tps,
            "concurrent_runs": conc_runs, "ttft_s": ttft_s, "ttft_runs": ttft_runs}


def measure_generate(model_dir: Path, device: str, runs: int, new_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def ids(prompt: str) -> Any:
        return torch.tensor([tok.encode(prompt)], device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.inference_mode()
    def gen(prompt: str, n: int) -> float:
        x = ids(prompt)
        sync()
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - t0

    def decode_tps() -> float:
        return (new_tokens - 1) / (gen(PROMPT, new_tokens) - gen(PROMPT, 1))

    def sequential_tps() -> float:
        return CONCURRENT * new_tokens / sum(gen(f"{i} {PROMPT}", new_tokens) for i in range(CONCURRENT))

    @torch.inference_mode()
    def forward() -> float:
        x = ids(PROMPT)
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
        return time.perf_counter() - t0

    decode, decode_runs = _median(decode_tps, runs)
    seq, seq_runs = _median(sequential_tps, runs)
    fwd, fwd_runs = _median(forward, max(runs, 10))
    return {"decode_tps": decode, "decode_runs": decode_runs, "sequential_tps": seq, "sequential_runs": seq_runs,
            "forward_s": fwd, "threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-function-"))
    src, ckpt = work / "hf", work / "ckpt"
    if not (src / "config.json").exists():
        build_model(src, _spec())
    if not ckpt.exists():
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
    server = Server(ckpt, args.device, args.numerics, log)
    try:
        server.wait_ready()
        ours = measure_server(server.url, args.runs, args.tokens)
    finally:
        server.stop()
    base = measure_generate(src, args.device, args.runs, args.tokens)

    def med(key: str) -> float:
        values = [s["startup"][key] for s in startups]
        return round(statistics.median(values), 4)

    rows = [
        {"name": "single_decode", "ratio_vs_generate": round(ours["single_tps"] / base["decode_tps"], 3),
         "tokens_per_s": round(ours["single_tps"], 1), "generate_tokens_per_s": round(base["decode_tps"], 1),
         "target": 0.9},
        {"name": "concurrent8", "ratio_vs_sequential_generate": round(ours["concurrent_tps"] / base["sequential_tps"], 3),
         "tokens_per_s": round(ours["concurrent_tps"], 1),
         "sequential_generate_tokens_per_s": round(base["sequential_tps"], 1), "target": 2.0},
        {"name": "startup", "seconds": med("total_s"), "imports_s": med("imports_s"), "load_s": med("load_s"),
         "warmup_s": med("warmup_s"),
         "observed_s": round(statistics.median(s["observed_s"] for s in startups), 4),
         "runs_s": [s["startup"]["total_s"] for s in startups]},
        {"name": "http_ttft_overhead", "ms": round((ours["ttft_s"] - base["forward_s"]) * 1e3, 2),
         "ttft_ms": round(ours["ttft_s"] * 1e3, 2), "bare_forward_ms": round(base["forward_s"] * 1e3, 2)},
    ]
    spec = _spec()
    return {
        "rows": rows,
        "meta": {"device": args.device, "numerics": args.numerics or ("fast" if args.device != "cpu" else "exact"),
                 "runs": args.runs, "new_tokens": args.tokens, "prompt": PROMPT, "concurrent": CONCURRENT,
                 "model": {"hidden_size": spec.hidden_size, "layers": spec.num_hidden_layers,
                           "heads": spec.num_attention_heads, "kv_heads": spec.num_key_value_heads,
                           "vocab": spec.vocab_size, "bytes": spec.nbytes()},
                 "generate_threads": base["threads"], "machine": machine(),
                 "raw": {"server": ours, "generate": base},
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
    ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="transformers generate()")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("tokens/s")
    ax.set_title("decode throughput")
    ax.legend()
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
    tmp = path.with_name(path.name + ".part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


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
