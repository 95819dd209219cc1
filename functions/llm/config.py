"""Configuration of one function instance: defaults, then environment, then flags, then validate.

Knative sets `PORT`; everything else has an `SLLM_*` variable and a flag (flags win):

| flag                  | environment                                   | default                  |
|-----------------------|-----------------------------------------------|--------------------------|
| --model DIR           | SLLM_MODEL_DIR                                | (this or --checkpoint)   |
| --checkpoint URI      | SLLM_CHECKPOINT                               | (this or --model)        |
| --loader ADDRESS      | SLLM_LOADER                                   | the node's loader socket |
| --lease-timing FILE   | SLLM_LEASE_TIMING                             | none                     |
| --served-model-name   | SLLM_MODEL_NAME                               | basename of DIR or URI   |
| --device              | SLLM_DEVICE                                   | cpu                      |
| --host / --port       | SLLM_HOST / PORT                              | 0.0.0.0 / 8080           |
| --internal-host/-port | SLLM_INTERNAL_HOST / SLLM_INTERNAL_PORT       | 0.0.0.0 / port + 1       |
| (token)               | SLLM_INTERNAL_TOKEN                           | none (no token required) |
| --max-concurrency     | SLLM_MAX_CONCURRENCY, else CONTAINER_CONCURRENCY | 8                     |
| --parked-slots        | SLLM_PARKED_SLOTS                             | max-concurrency          |
| --max-model-len       | SLLM_MAX_MODEL_LEN                            | 4096 (capped by the model) |
| --numerics            | SLLM_NUMERICS                                 | exact on cpu, fast on cuda |
| --dtype               | SLLM_DTYPE                                    | auto: cpu bf16 if native, else float32; cuda the checkpoint's |
| --tile-rows           | SLLM_TILE_ROWS                                | 16 in bf16 on cpu, else 2 |
| --linear              | SLLM_LINEAR                                   | auto: exact bf16 on a cpu: amx-bf16 with AMX, else avx512-bf16 with it, else torch |
| --threads             | SLLM_THREADS                                  | fast: torch's (all cores); exact: torch 1, our kernels the usable cores |
| --forward             | SLLM_FORWARD                                  | auto (lean Llama-family path) |
| --step-tokens         | SLLM_STEP_TOKENS                              | 256                      |
| --max-body-bytes      | SLLM_MAX_BODY_BYTES                           | 4194304                  |
| --stall-timeout       | SLLM_STALL_TIMEOUT                            | 60 (seconds)             |
| --[no-]warmup         | SLLM_WARMUP=1/0/auto                          | on on cuda, off on cpu   |
| (log fields)          | SLLM_SERVICE, SLLM_INSTANCE or HOSTNAME, SLLM_NODE or NODE_NAME | none       |

The internal token is read from the environment only, so it never shows in a process list.

Paths are the container's: under the test node agent (no mount namespace) they are joined to
`$SLLM_MOUNT_ROOT` (sllm_knative/mounts.py): --model, --lease-timing and a `unix://` --loader
socket (through its folder's real path, as the loader does, so it stays within a socket path's
107 bytes). Unset on a real cluster, where nothing changes.

`--checkpoint URI` (a checkpoint URI or bare name the loader resolves, docs/sidecar.md) makes the
instance take its own lease on the checkpoint from the node's loader sidecar at `--loader` (a
gRPC target: `unix:///path` or `host:port`; default `$SLLM_LOADER`, else the node's default
socket) and load the leased DRAM-tier copy (functions/llm/weights.py, `LeasedCheckpoint`); the
lease's timing is written to `--lease-timing` when given. `--model DIR` loads a directory.

Warm-up (one prefill and two decode steps before the instance reports ready) pays for a GPU's
lazy initialisation (cuBLAS handles, kernel loading) off the request path. On the CPU there is
little to pay for: on the 0.5 GB benchmark model the first request was 12-47 ms slower without
warm-up, while the warm-up itself took 0.3-0.5 s of every cold start; so `auto` skips it there.

`--dtype auto` computes in bfloat16 on a CPU that multiplies bf16 natively (amx_bf16 or
avx512_bf16 in /proc/cpuinfo) and in float32 on any other CPU; on CUDA in the checkpoint's dtype
(functions/llm/dtypes.py). A checkpoint of another dtype is cast tensor by tensor at load.
The default tile of exact numerics follows the dtype: 16 rows in bfloat16 on the CPU (one AMX
tile; a 16-row bf16 product costs about what a 2-row one does), 2 otherwise. `--linear auto`
replaces the tiles by one of our batch-invariant kernels (functions/llm/kernels.py): `amx-bf16`
on a CPU with AMX whose tiles Linux grants, else `avx512-bf16` on one with AVX512-BF16.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from functions.llm.dtypes import SETTINGS as DTYPE_SETTINGS
from functions.llm.kernels import SETTINGS as LINEAR_SETTINGS
from sllm_knative.api.auth import token_from_env
from sllm_knative.loader.address import default_listen, default_node
from sllm_knative.mounts import container_path, mount_root, unix_target


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    model_dir: Path | None
    model_name: str
    device: str = "cpu"
    host: str = "0.0.0.0"
    port: int = 8080
    internal_host: str = "0.0.0.0"
    internal_port: int = 8081
    internal_token: str | None = None
    max_concurrency: int = 8
    parked_slots: int = 8
    max_model_len: int = 4096
    numerics: str = "exact"
    dtype: str = "auto"  # compute dtype setting (functions/llm/dtypes.py): auto or a dtype name
    tile_rows: int | None = None  # exact numerics' tile; None: by dtype (numerics.default_tile_rows)
    linear: str = "auto"  # the linear layers' kernel (functions/llm/kernels.py): auto, torch or avx512-bf16
    # The instance's compute threads: torch's intra-op threads in fast numerics (exact numerics
    # keeps torch on one), and our kernels' in both (their split never changes a bit).
    # None: every usable core. The autoscaler sets the instance's share of its node (SLLM_THREADS,
    # sllm_knative.config.compute_threads).
    threads: int | None = None
    forward: str = "auto"
    step_tokens: int = 256
    max_body_bytes: int = 4 << 20
    # Seconds a stream's client may leave a write unread (its socket full) before the stream is
    # ended and its concurrency slot given back: a client that stops reading holds nothing forever.
    stall_timeout_s: int = 60
    warmup: bool = False
    instance: str | None = None
    node: str | None = None
    service: str | None = None  # the service key, namespace/name (for the log lines only)
    checkpoint: str | None = None  # leased from `loader` instead of reading model_dir
    loader: str | None = None
    lease_timing: Path | None = None

    @property
    def kv_slots(self) -> int:
        return self.max_concurrency + self.parked_slots


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m functions.llm",
                                description="OpenAI-compatible LLM inference function (sllm-knative)")
    p.add_argument("--model", dest="model_dir", metavar="DIR", help="serve the checkpoint in this directory")
    p.add_argument("--checkpoint", metavar="URI",
                   help="lease this checkpoint from the node's loader sidecar and serve it")
    p.add_argument("--loader", metavar="ADDRESS",
                   help="the loader sidecar's gRPC target (unix:///path or host:port) for --checkpoint")
    p.add_argument("--lease-timing", metavar="FILE", help="write the lease's timing here (JSON)")
    p.add_argument("--served-model-name", dest="model_name")
    p.add_argument("--device")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--internal-host")
    p.add_argument("--internal-port", type=int)
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--parked-slots", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--numerics", choices=["exact", "fast"])
    p.add_argument("--dtype", choices=list(DTYPE_SETTINGS),
                   help="compute dtype; auto: bfloat16 on a CPU with a native bf16 multiply, else float32; "
                        "on cuda the checkpoint's")
    p.add_argument("--tile-rows", type=int)
    p.add_argument("--linear", choices=list(LINEAR_SETTINGS),
                   help="the linear layers' kernel; auto, for exact bf16 on the CPU: our amx-bf16 kernel "
                        "with AMX, else avx512-bf16 with AVX512-BF16, else torch's products")
    p.add_argument("--threads", type=int)
    p.add_argument("--forward", choices=["auto", "transformers"])
    p.add_argument("--step-tokens", type=int)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--stall-timeout", type=int, metavar="SECONDS",
                   help="end a stream whose client has not read for this long (default 60)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--log-level")
    return p


def _env_switch(env: Mapping[str, str], name: str) -> bool | None:
    """1/true/on, 0/false/off, or None for unset or `auto`."""
    raw = env.get(name, "auto").strip().lower()
    if raw in ("1", "true", "on", "yes"):
        return True
    if raw in ("0", "false", "off", "no"):
        return False
    if raw in ("", "auto"):
        return None
    raise ValueError(f"{name} = {raw!r}, must be 1, 0 or auto")


def _env_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name} = {raw!r}, must be an integer") from None
    return None


def parse(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> tuple[ServeConfig, str | None]:
    """(config, log level) from flags and environment; raises ValueError naming the bad setting."""
    env = os.environ if env is None else env
    args = _parser().parse_args(argv)

    def pick(flag: object, *names: str) -> str | None:
        if flag is not None:
            return str(flag)
        for name in names:
            if env.get(name, "").strip():
                return env[name].strip()
        return None

    root = mount_root(env)  # paths are the container's: under $SLLM_MOUNT_ROOT when it is set
    model_dir, checkpoint = _weights(args, env)
    path = container_path(model_dir, root) if model_dir else None
    loader = None
    if checkpoint:
        loader = unix_target(pick(args.loader, "SLLM_LOADER") or default_listen(env.get("SLLM_NODE") or default_node()),
                             root)
    elif args.loader:
        raise ValueError("--loader ADDRESS needs --checkpoint URI (the checkpoint to lease from it)")
    lease_timing = pick(args.lease_timing, "SLLM_LEASE_TIMING")
    device = pick(args.device, "SLLM_DEVICE") or "cpu"
    port = args.port if args.port is not None else _env_int(env, "PORT")
    port = 8080 if port is None else port
    internal_port = args.internal_port if args.internal_port is not None else _env_int(env, "SLLM_INTERNAL_PORT")
    max_conc = args.max_concurrency if args.max_concurrency is not None else _env_int(
        env, "SLLM_MAX_CONCURRENCY", "CONTAINER_CONCURRENCY")
    if max_conc == 0:  # Knative: containerConcurrency 0 means unlimited; we still need a bound for KV slots
        max_conc = None
    parked = args.parked_slots if args.parked_slots is not None else _env_int(env, "SLLM_PARKED_SLOTS")
    warmup = args.warmup if args.warmup is not None else _env_switch(env, "SLLM_WARMUP")

    def num(flag: int | None, name: str, default: int) -> int:
        value = flag if flag is not None else _env_int(env, name)
        return default if value is None else value

    cfg = ServeConfig(
        model_dir=path,
        model_name=pick(args.model_name, "SLLM_MODEL_NAME") or (
            path.resolve().name if path is not None else _checkpoint_name(checkpoint or "")),
        device=device,
        host=pick(args.host, "SLLM_HOST") or "0.0.0.0",
        port=port,
        internal_host=pick(args.internal_host, "SLLM_INTERNAL_HOST") or "0.0.0.0",
        internal_port=port + 1 if internal_port is None else internal_port,
        internal_token=token_from_env(env),
        max_concurrency=8 if max_conc is None else max_conc,
        parked_slots=parked if parked is not None else (8 if max_conc is None else max_conc),
        max_model_len=num(args.max_model_len, "SLLM_MAX_MODEL_LEN", 4096),
        numerics=pick(args.numerics, "SLLM_NUMERICS") or ("fast" if device.startswith("cuda") else "exact"),
        dtype=(pick(args.dtype, "SLLM_DTYPE") or "auto").lower(),
        tile_rows=args.tile_rows if args.tile_rows is not None else _env_int(env, "SLLM_TILE_ROWS"),
        linear=(pick(args.linear, "SLLM_LINEAR") or "auto").lower(),
        threads=args.threads if args.threads is not None else _env_int(env, "SLLM_THREADS"),
        forward=pick(args.forward, "SLLM_FORWARD") or "auto",
        step_tokens=num(args.step_tokens, "SLLM_STEP_TOKENS", 256),
        max_body_bytes=num(args.max_body_bytes, "SLLM_MAX_BODY_BYTES", 4 << 20),
        stall_timeout_s=num(args.stall_timeout, "SLLM_STALL_TIMEOUT", 60),
        warmup=device.startswith("cuda") if warmup is None else warmup,
        instance=env.get("SLLM_INSTANCE") or env.get("HOSTNAME") or None,
        node=env.get("SLLM_NODE") or env.get("NODE_NAME") or None,
        service=env.get("SLLM_SERVICE") or None,
        checkpoint=checkpoint,
        loader=loader,
        lease_timing=container_path(lease_timing, root) if lease_timing else None,
    )
    validate(cfg)
    return cfg, args.log_level


def _weights(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(model directory, checkpoint URI): exactly one; a flag wins over both variables."""
    if args.model_dir and args.checkpoint:
        raise ValueError("pass --model DIR or --checkpoint URI, not both")
    if args.model_dir or args.checkpoint:
        return args.model_dir or None, args.checkpoint or None
    model_dir = env.get("SLLM_MODEL_DIR", "").strip() or None
    checkpoint = env.get("SLLM_CHECKPOINT", "").strip() or None
    if model_dir and checkpoint:
        raise ValueError("SLLM_MODEL_DIR and SLLM_CHECKPOINT are both set: set one")
    if not model_dir and not checkpoint:
        raise ValueError("model: pass --model DIR or --checkpoint URI (leased from --loader), "
                         "or set SLLM_MODEL_DIR or SLLM_CHECKPOINT")
    return model_dir, checkpoint


def _checkpoint_name(uri: str) -> str:
    """hf://org/name@rev -> name; s3://bucket/prefix/name -> name; org/name -> name."""
    return uri.split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def validate(cfg: ServeConfig) -> None:
    """Raise ValueError with every problem of cfg, one per line."""
    problems = []

    def at_least(name: str, value: int, low: int) -> None:
        if value < low:
            problems.append(f"{name} = {value}, must be at least {low}")

    if cfg.model_dir is not None and not cfg.model_dir.is_dir():
        problems.append(f"model directory {str(cfg.model_dir)!r} does not exist")
    if (cfg.model_dir is None) == (cfg.checkpoint is None):
        problems.append("model: one of a model directory and a checkpoint to lease")
    if cfg.checkpoint is not None and not cfg.loader:
        problems.append("loader: a checkpoint is leased from a loader (--loader ADDRESS)")
    if not cfg.model_name:
        problems.append("served model name must not be empty")
    if cfg.device != "cpu" and not (cfg.device == "cuda" or cfg.device.startswith("cuda:")):
        problems.append(f"device = {cfg.device!r}, must be 'cpu', 'cuda' or 'cuda:N'")
    for name, port in (("port", cfg.port), ("internal-port", cfg.internal_port)):
        if not 0 <= port <= 65535:
            problems.append(f"{name} = {port}, must be between 0 and 65535")
    if cfg.port == cfg.internal_port and cfg.port != 0:
        problems.append(f"internal-port = {cfg.internal_port}, must differ from port")
    at_least("max-concurrency", cfg.max_concurrency, 1)
    at_least("parked-slots", cfg.parked_slots, 0)
    at_least("max-model-len", cfg.max_model_len, 16)
    if cfg.tile_rows is not None:
        at_least("tile-rows", cfg.tile_rows, 1)
    if cfg.dtype not in DTYPE_SETTINGS:
        problems.append(f"dtype = {cfg.dtype!r} (--dtype / SLLM_DTYPE), must be one of {', '.join(DTYPE_SETTINGS)}")
    if cfg.linear not in LINEAR_SETTINGS:
        problems.append(f"linear = {cfg.linear!r} (--linear / SLLM_LINEAR), must be one of {', '.join(LINEAR_SETTINGS)}")
    if cfg.threads is not None:
        at_least("threads", cfg.threads, 1)
    at_least("step-tokens", cfg.step_tokens, 1)
    at_least("max-body-bytes", cfg.max_body_bytes, 1024)
    at_least("stall-timeout", cfg.stall_timeout_s, 1)
    if cfg.numerics not in ("exact", "fast"):
        problems.append(f"numerics = {cfg.numerics!r}, must be 'exact' or 'fast'")
    if cfg.forward not in ("auto", "transformers"):
        problems.append(f"forward = {cfg.forward!r}, must be 'auto' or 'transformers'")
    if problems:
        raise ValueError("; ".join(problems))
