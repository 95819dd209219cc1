"""`make demo`: the main job on the embedded default (local mode).

Until the control plane lands (activator, autoscaler, local cluster), the demo shows the
loading path end to end on this machine: build a random-weight Llama-style model and a
tokenizer locally, convert it to the loading-optimized format, load it cold from disk,
from the DRAM tier (tmpfs, mapped) and with transformers' from_pretrained for comparison,
check the logits are identical, and generate a few tokens.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default=".demo", help="working directory (models are cached here)")
    p.add_argument("--model-mb", type=int, default=512, help="size of the random model")
    p.add_argument("--shm", default="/dev/shm", help="tmpfs directory used as the DRAM tier")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sllm_knative import log
    from sllm_knative.convert import convert
    from sllm_knative.loading import load_checkpoint, load_model
    from sllm_knative.models import build_model, spec_for_size
    from sllm_knative.pagecache import evict

    log.setup()
    work = Path(args.work)
    spec = spec_for_size(args.model_mb << 20, vocab_size=8192)
    hf = work / f"llama-{args.model_mb}mb"
    if not (hf / "config.json").exists():
        print(f"[1/5] building a random {spec.nbytes() / 2**20:.0f} MiB Llama-style model and tokenizer in {hf}")
        build_model(hf, spec)
    else:
        print(f"[1/5] using the model built earlier in {hf}")
    ckpt = work / f"llama-{args.model_mb}mb.sllm"
    print(f"[2/5] converting to the loading-optimized format -> {ckpt}")
    convert(hf, ckpt, overwrite=True, progress=True)

    rows = [("load path", "seconds", "GB/s", "how")]
    print("[3/5] loading cold from disk (page cache evicted), O_DIRECT + checksums")
    evict(*ckpt.glob("partition-*.bin"))
    t = time.perf_counter()
    loaded = load_checkpoint(ckpt)
    cold = time.perf_counter() - t
    rows.append(("sllm-knative, SSD (cold)", f"{cold:.3f}", f"{loaded.bytes / cold / 1e9:.2f}",
                 loaded.partitions[0].method))
    del loaded

    print("[4/5] loading from the DRAM tier (tmpfs, mapped) and with from_pretrained for comparison")
    dram = Path(args.shm) / f"sllm-demo-{os.getpid()}"
    try:
        shutil.copytree(ckpt, dram)
        t = time.perf_counter()
        loaded = load_checkpoint(dram)
        warm = time.perf_counter() - t
        rows.append(("sllm-knative, DRAM tier", f"{warm:.3f}", f"{loaded.bytes / warm / 1e9:.2f}",
                     loaded.partitions[0].method))
        model = load_model(dram)
        evict(*hf.glob("*.safetensors"))
        t = time.perf_counter()
        ref = AutoModelForCausalLM.from_pretrained(str(hf)).eval()
        base = time.perf_counter() - t
        rows.append(("transformers from_pretrained (cold)", f"{base:.3f}", f"{loaded.bytes / base / 1e9:.2f}",
                     "safetensors"))
        print()
        print(_table(rows))
        print()
        tok = AutoTokenizer.from_pretrained(str(ckpt))
        ids = tok("Serverless inference scales to zero", return_tensors="pt").input_ids
        with torch.no_grad():
            same = torch.equal(model(ids).logits, ref(ids).logits)
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        print(f"[5/5] logits identical to from_pretrained: {same}")
        print(f"      greedy continuation (random weights): {tok.decode(out[0][ids.shape[1]:])!r}")
        return 0 if same else 1
    finally:
        shutil.rmtree(dram, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
