"""Instance configuration (functions.llm.config): flags over environment over defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from functions.llm.config import ServeConfig, parse


@pytest.fixture()
def model_dir(tmp_path):
    d = tmp_path / "my-model"
    d.mkdir()
    return d


def test_defaults(model_dir):
    cfg, level = parse([], {"SLLM_MODEL_DIR": str(model_dir)})
    assert cfg == ServeConfig(model_dir=model_dir, model_name="my-model")
    assert level is None and cfg.kv_slots == 16


@pytest.mark.parametrize("argv,env,expected", [
    pytest.param([], {"PORT": "9000"}, dict(port=9000, internal_port=9001), id="knative-port"),
    pytest.param(["--port", "7000"], {"PORT": "9000"}, dict(port=7000, internal_port=7001), id="flag-wins"),
    pytest.param([], {"CONTAINER_CONCURRENCY": "3"}, dict(max_concurrency=3, parked_slots=3), id="knative-cc"),
    pytest.param([], {"CONTAINER_CONCURRENCY": "0"}, dict(max_concurrency=8), id="cc-0-unlimited"),
    pytest.param([], {"SLLM_MAX_CONCURRENCY": "2", "CONTAINER_CONCURRENCY": "5"}, dict(max_concurrency=2),
                 id="sllm-over-knative"),
    pytest.param(["--device", "cuda"], {}, dict(device="cuda", numerics="fast", warmup=True), id="cuda-fast"),
    pytest.param([], {}, dict(warmup=False), id="cpu-no-warmup"),
    pytest.param(["--warmup"], {"SLLM_WARMUP": "0"}, dict(warmup=True), id="warmup-flag-wins"),
    pytest.param(["--device", "cuda", "--no-warmup"], {}, dict(warmup=False), id="cuda-no-warmup"),
    pytest.param(["--device", "cuda"], {"SLLM_WARMUP": "auto"}, dict(warmup=True), id="warmup-auto"),
    pytest.param([], {"SLLM_WARMUP": "on"}, dict(warmup=True), id="warmup-env-on"),
    pytest.param(["--device", "cuda:1", "--numerics", "exact"], {}, dict(numerics="exact"), id="cuda-exact"),
    pytest.param([], {"SLLM_FORWARD": "transformers"}, dict(forward="transformers"), id="forward"),
    pytest.param([], {"SLLM_THREADS": "3"}, dict(threads=3), id="threads-env"),
    pytest.param([], {}, dict(dtype="auto", tile_rows=None), id="dtype-auto-tile-by-dtype"),
    pytest.param([], {"SLLM_DTYPE": "BFloat16"}, dict(dtype="bfloat16"), id="dtype-env"),
    pytest.param(["--dtype", "float32"], {"SLLM_DTYPE": "bfloat16"}, dict(dtype="float32"), id="dtype-flag-wins"),
    pytest.param([], {"SLLM_TILE_ROWS": "4"}, dict(tile_rows=4), id="tile-rows-env"),
    pytest.param(["--threads", "1"], {"SLLM_THREADS": "3"}, dict(threads=1), id="threads-flag-wins"),
    pytest.param([], {"SLLM_INTERNAL_TOKEN": "s3cret", "SLLM_WARMUP": "0"},
                 dict(internal_token="s3cret", warmup=False), id="token-env-only"),
    pytest.param(["--served-model-name", "llama"], {"HOSTNAME": "pod-1", "NODE_NAME": "n1"},
                 dict(model_name="llama", instance="pod-1", node="n1", service=None), id="names"),
    pytest.param([], {"SLLM_SERVICE": "team/llama", "SLLM_INSTANCE": "llama-1", "SLLM_NODE": "n2"},
                 dict(service="team/llama", instance="llama-1", node="n2"), id="log-fields"),
])
def test_parse(model_dir, argv, env, expected):
    cfg, _ = parse(["--model", str(model_dir), *argv], env)
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name


@pytest.mark.parametrize("with_model,argv,env,message", [
    pytest.param(False, [], {}, "pass --model DIR", id="no-model"),
    pytest.param(False, ["--model", "/nonexistent/dir"], {}, "does not exist", id="missing-dir"),
    pytest.param(True, ["--max-concurrency", "-1"], {}, "max-concurrency = -1, must be at least 1", id="concurrency"),
    pytest.param(True, ["--port", "70000"], {}, "port = 70000", id="port-range"),
    pytest.param(True, ["--port", "9000", "--internal-port", "9000"], {}, "must differ", id="same-ports"),
    pytest.param(True, ["--device", "tpu"], {}, "device = 'tpu'", id="device"),
    pytest.param(True, [], {"PORT": "eighty"}, "PORT = 'eighty', must be an integer", id="port-env"),
    pytest.param(True, [], {"SLLM_WARMUP": "maybe"}, "SLLM_WARMUP = 'maybe', must be 1, 0 or auto", id="warmup-env"),
    pytest.param(True, ["--threads", "0"], {}, "threads = 0, must be at least 1", id="threads"),
    pytest.param(True, [], {"SLLM_DTYPE": "int8"},
                 r"dtype = 'int8' \(--dtype / SLLM_DTYPE\), must be one of auto, bfloat16, float32, float16",
                 id="dtype-env"),
    pytest.param(True, ["--tile-rows", "0", "--step-tokens", "0"], {}, "tile-rows = 0, .*step-tokens = 0",
                 id="all-problems-reported"),
])
def test_rejects(model_dir, with_model, argv, env, message):
    args = ["--model", str(model_dir), *argv] if with_model else argv
    with pytest.raises(ValueError, match=message):
        parse(args, env)


def test_checkpoint_leased_from_a_loader():
    cfg, _ = parse(["--checkpoint", "hf://org/llama-7b@main", "--loader", "unix:///run/loader.sock",
                    "--lease-timing", "/tmp/t.json"], {})
    assert (cfg.model_dir, cfg.checkpoint, cfg.loader) == (None, "hf://org/llama-7b@main", "unix:///run/loader.sock")
    assert cfg.model_name == "llama-7b" and str(cfg.lease_timing) == "/tmp/t.json"


@pytest.mark.parametrize("argv,env,expected", [
    pytest.param([], {"SLLM_CHECKPOINT": "s3://b/p/tiny", "SLLM_LOADER": "127.0.0.1:9000"},
                 dict(checkpoint="s3://b/p/tiny", loader="127.0.0.1:9000", model_name="tiny"), id="env"),
    pytest.param(["--checkpoint", "file:///s/tiny"], {"SLLM_LOADER": "h:1", "SLLM_LEASE_TIMING": "/t.json"},
                 dict(loader="h:1", lease_timing=Path("/t.json")), id="loader-from-env"),
    pytest.param(["--checkpoint", "org/tiny"], {"SLLM_NODE": "n7"},
                 dict(loader="unix:///tmp/sllm-knative/n7/loader.sock"), id="the-node's-default-socket"),
    pytest.param(["--checkpoint", "org/tiny", "--loader", "h:2"], {"SLLM_MODEL_DIR": "/nowhere"},
                 dict(loader="h:2", model_dir=None), id="flag-wins-over-env"),
])
def test_checkpoint_sources(argv, env, expected):
    cfg, _ = parse(argv, env)
    for name, value in expected.items():
        assert getattr(cfg, name) == value, name


@pytest.mark.parametrize("argv,env,message", [
    pytest.param(["--checkpoint", "org/tiny", "--model", "/m"], {}, "not both", id="both-flags"),
    pytest.param([], {"SLLM_CHECKPOINT": "org/tiny", "SLLM_MODEL_DIR": "/m"}, "both set", id="both-env"),
    pytest.param(["--model", "/nonexistent", "--loader", "h:1"], {}, "--loader ADDRESS needs --checkpoint",
                 id="loader-without-checkpoint"),
    pytest.param([], {"SLLM_LOADER": "h:1"}, "pass --model DIR or --checkpoint URI", id="nothing-to-serve"),
])
def test_checkpoint_rejects(argv, env, message):
    with pytest.raises(ValueError, match=message):
        parse(argv, env)


def _mounted(tmp_path: Path) -> tuple[str, Path]:
    """A container root as the test node agent makes it: a symlink at each mountPath."""
    root = tmp_path / "rootfs" / "user-container"
    (root / "var" / "run").mkdir(parents=True)
    host = tmp_path / "nodes" / "n1" / "hostpath" / "var" / "run" / "sllm-knative"
    host.mkdir(parents=True)
    (root / "var" / "run" / "sllm-knative").symlink_to(host)
    (root / "models" / "m").mkdir(parents=True)
    return str(root), host


@pytest.mark.parametrize("argv,env,expected", [
    pytest.param([], {"SLLM_LOADER": "unix:///var/run/sllm-knative/loader.sock"},
                 dict(loader="unix://{host}/loader.sock"), id="loader-socket-under-root-real-path"),
    pytest.param(["--loader", "10.0.0.1:7070"], {}, dict(loader="10.0.0.1:7070"), id="tcp-loader-unchanged"),
    pytest.param(["--loader", "unix:///var/run/sllm-knative/loader.sock", "--lease-timing", "/tmp/t.json"], {},
                 dict(lease_timing="{root}/tmp/t.json"), id="lease-timing-under-root"),
    pytest.param(["--lease-timing", "t.json", "--loader", "unix:///x.sock"], {},
                 dict(lease_timing="t.json"), id="relative-path-unchanged"),
])
def test_container_paths_resolve_under_the_mount_root(tmp_path, argv, env, expected):
    root, host = _mounted(tmp_path)
    cfg, _ = parse(["--checkpoint", "tiny", *argv], {**env, "SLLM_MOUNT_ROOT": root})
    for name, want in expected.items():
        assert str(getattr(cfg, name)) == want.format(root=root, host=host.resolve())


def test_model_dir_under_the_mount_root_and_nothing_changes_without_one(tmp_path):
    root, _ = _mounted(tmp_path)
    cfg, _ = parse(["--model", "/models/m"], {"SLLM_MOUNT_ROOT": root})
    assert cfg.model_dir == Path(root) / "models" / "m"
    cfg, _ = parse(["--checkpoint", "tiny"], {"SLLM_LOADER": "unix:///var/run/sllm-knative/loader.sock"})
    assert cfg.loader == "unix:///var/run/sllm-knative/loader.sock"
