"""The SSD tier on a disk smaller than its budget says (a real tmpfs of 8 MiB under a 64 MiB
budget): the disk, not only the budget, decides what is evicted for room; when nothing can make
room, a waiting instance still gets its checkpoint from DRAM and the SSD copy is given up with
a warning; a prefetch into the SSD tier alone fails with a message that names the disk. Never a
file under a final name that is not complete, and nothing left in staging."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllm_knative.loader import errors
from sllm_knative.models import ModelSpec
from tests.loader_sidecar.test_sidecar_fetch import ssd_states, tier, wait_for

DISK = 8 << 20
SPEC = ModelSpec(hidden_size=128, intermediate_size=512, num_hidden_layers=4, vocab_size=512)  # ~4.4 MB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "ssd-disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here (mount: {r.stderr.strip()}); this test needs one")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sllm_knative.convert import convert
    from sllm_knative.models import build_model

    root = tmp_path_factory.mktemp("enospc-store")
    for name, seed in (("a", 1), ("b", 2)):
        convert(build_model(root / "src" / name, SPEC, seed=seed), root / "models" / name, block_size=64 << 10)
    return root / "models"


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def test_the_disk_under_the_ssd_tier_bounds_it(sidecar, small_disk: Path, two_models: Path) -> None:
    size = sum(p.stat().st_size for p in (two_models / "a").iterdir())
    assert DISK / 2 < size < DISK - (1 << 20), size  # one fits, not two
    thread, client = sidecar([f"file://{two_models}"], "--ssd-dir", str(small_disk))

    # Two checkpoints that fit the budget but not the disk: the second evicts the first.
    for name in ("a", "b"):
        with client.acquire(name) as lease:
            lease.wait_complete(timeout=30)
            assert lease.source == "remote"
        wait_for(lambda: ssd_states(client) == ["ready"], 30)
    assert [e.model.rsplit("/", 1)[-1] for e in tier(client.inventory(), "ssd").entries] == ["b"]
    assert not any(f.startswith(".staging") for f in _files(small_disk)), _files(small_disk)

    # Other data fills the disk: no entry can make room. b's SSD copy goes (evicted for the
    # filler), then a waiting instance still gets a from the store, into DRAM only.
    client.evict("b", tier="ssd")
    client.evict("a", tier="dram")
    filler = small_disk / "other-data"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * DISK)
        except OSError:
            pass  # ENOSPC: the disk is full now
    with client.acquire("a") as lease:
        lease.wait_complete(timeout=30)
        assert lease.source == "remote"
    inv = client.inventory()
    assert [e.model for e in tier(inv, "ssd").entries] == []
    assert "a" in {e.model.rsplit("/", 1)[-1] for e in tier(inv, "dram").entries}
    assert _files(small_disk) == ["other-data"]  # nothing half-written, nothing in staging

    # Filling the SSD tier alone has no instance to serve: it fails, and says why.
    with pytest.raises(errors.TierFull, match=r"ssd tier: needs \d+ bytes but the room on its disk \(\d+ bytes free "
                                              rf"under {small_disk}\) is \d+ bytes"):
        client.prefetch("b", tier="ssd", wait=True)
    assert _files(small_disk) == ["other-data"]

    # Room again: the next fill makes its SSD copy.
    filler.unlink()
    client.prefetch("b", tier="ssd", wait=True)
    assert [e.state for e in tier(client.inventory(), "ssd").entries] == ["ready"]
