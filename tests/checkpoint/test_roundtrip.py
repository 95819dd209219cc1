"""Convert -> load round-trips: bit-identical bytes, strides, storage offsets and sharing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sllm_knative import format as fmt
from sllm_knative.convert import convert
from sllm_knative.loading import load_checkpoint, load_state_dict

ALL_DTYPES = [getattr(torch, name) for name in fmt.DTYPES]


def _random(shape, dtype, gen) -> torch.Tensor:
    raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * torch.empty(0, dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def _bytes(t: torch.Tensor) -> bytes:
    if not t.numel():
        return b""
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t)
    return dense.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(loaded: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert loaded.keys() == ref.keys()
    for k, r in ref.items():
        t = loaded[k]
        assert t.dtype == r.dtype and t.shape == r.shape, k
        assert _bytes(t) == _bytes(r), k  # bitwise: NaNs and float8 included


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=[str(d).removeprefix("torch.") for d in ALL_DTYPES])
def test_every_dtype_round_trips_through_bin(dtype: torch.dtype, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    sd = {"w": _random((7, 13), dtype, gen), "scalar": _random((), dtype, gen)}
    src = tmp_path / "src"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    loaded = load_state_dict(convert(src, tmp_path / "dst"))
    assert_same(loaded, sd)


def test_safetensors_dtypes_and_odd_vocab(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    sd = {
        "embed": _random((32001, 8), torch.float16, gen),  # a vocabulary of 32001 in fp16
        "bf": _random((3, 5), torch.bfloat16, gen),
        "f8": _random((9,), torch.float8_e4m3fn, gen),
        "f8b": _random((9,), torch.float8_e5m2, gen),
        "mask": _random((3, 3), torch.bool, gen),
        "i64": _random((2,), torch.int64, gen),
        "empty": torch.empty(0, 4, dtype=torch.float32),
    }
    src = tmp_path / "src"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"))
    dst = convert(src, tmp_path / "dst")
    idx = fmt.read_index(dst)
    assert all(s.offset % 256 == 0 for s in idx.storages)
    assert all(p.size % 4096 == 0 for p in idx.partitions)
    assert_same(load_state_dict(dst), sd)


def test_shared_storages_views_and_offsets(tmp_path: Path) -> None:
    base = torch.arange(120, dtype=torch.float32).reshape(10, 12)
    sd = {
        "base": base,
        "tied": base,  # tied weights: same tensor twice
        "transposed": base.t(),  # non-contiguous view
        "rows": base[3:7],  # storage offset
        "every_other": base[:, ::2],  # strided with offset 0
        "inner": base[2:5, 4:9],  # offset and stride
        "other": torch.ones(5, dtype=torch.int32),
    }
    src = tmp_path / "src"
    src.mkdir()
    torch.save(sd, src / "pytorch_model.bin")
    dst = convert(src, tmp_path / "dst")
    idx = fmt.read_index(dst)
    assert len(idx.storages) == 2  # the shared storage is stored once
    loaded = load_state_dict(dst)
    assert_same(loaded, sd)
    ptr = loaded["base"].untyped_storage().data_ptr()
    for k in ("tied", "transposed", "rows", "every_other", "inner"):
        assert loaded[k].untyped_storage().data_ptr() == ptr, k
        assert loaded[k].stride() == sd[k].stride(), k
    assert loaded["rows"].data_ptr() - loaded["base"].data_ptr() == 3 * 12 * 4
    loaded["base"][0, 0] = -1.0  # views really share: a write shows through
    assert loaded["tied"][0, 0].item() == -1.0 and loaded["transposed"][0, 0].item() == -1.0


def test_sharded_sources_and_partitions(tmp_path: Path, tiny_src: Path) -> None:
    from sllm_knative.models import TINY, build_model

    sharded = build_model(tmp_path / "sharded", TINY, max_shard_bytes=200_000)
    assert (sharded / "model.safetensors.index.json").exists()
    bins = build_model(tmp_path / "bins", TINY, weights="bin", max_shard_bytes=200_000)
    assert (bins / "pytorch_model.bin.index.json").exists()
    ref = load_state_dict(convert(tiny_src, tmp_path / "one"))
    for src in (sharded, bins):
        dst = convert(src, tmp_path / f"{src.name}-3", partitions=3)
        assert len(fmt.read_index(dst).partitions) == 3
        assert_same(load_state_dict(dst), ref)


@st.composite
def tensor_sets(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    out = {}
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64,
                                      torch.bool, torch.complex64, torch.float8_e5m2]))
        shape = draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))
        t = _random(shape, dtype, gen)
        out[f"t{i}"] = t
        if t.dim() >= 2 and draw(st.booleans()):
            out[f"t{i}.T"] = t.transpose(0, 1)
        if t.shape[0] > 2 and draw(st.booleans()):
            start = draw(st.integers(1, t.shape[0] - 1))
            out[f"t{i}.slice"] = t[start:]
        if t.dim() >= 1 and t.shape[-1] > 1 and draw(st.booleans()):
            out[f"t{i}.step"] = t[..., ::2]
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(tensor_sets())
def test_property_round_trip(tmp_path_factory, sd) -> None:
    d = tmp_path_factory.mktemp("prop")
    (d / "src").mkdir()
    torch.save(sd, d / "src" / "pytorch_model.bin")
    dst = convert(d / "src", d / "dst")
    loaded = load_checkpoint(dst)
    assert_same(loaded.state_dict, sd)
    for k, t in sd.items():
        if t.numel():
            assert loaded.state_dict[k].stride() == t.stride(), k
