"""Sharing bases through the Hub API, end to end against a Hub-compatible server on loopback.

Downloads go through `olah` (a self-hosted Hub mirror) serving local git repositories; uploads
are checked at the HTTP boundary. Client code runs in a fresh Python process with ``HF_ENDPOINT``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` set, as users set them (huggingface_hub reads them at import).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from transformers_headq import QueryBasis

from .helpers import random_basis, tiny_model
from .hub_server import MirrorHub, RecordingHub

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = MirrorHub(tmp_path_factory.mktemp("hub"))
    yield server
    server.close()


def run_client(endpoint: str, cache: Path, code: str, offline: bool = False, **env: str) -> str:
    """Run ``code`` in a fresh interpreter against ``endpoint``; return its stdout (fails loudly)."""
    environment = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache), **env}
    environment["HF_HUB_OFFLINE"] = "1" if offline else "0"
    if "HF_TOKEN" not in env:
        environment.pop("HF_TOKEN", None)  # a developer's own token must not reach the loopback server
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environment,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def publish_basis(hub: MirrorHub, tmp_path: Path, repo_id: str, basis: QueryBasis | None = None) -> tuple[Path, str]:
    folder = (basis or random_basis(tiny_model(), rank=4)).save_pretrained(tmp_path / repo_id.replace("/", "--"))
    return folder, hub.publish(repo_id, folder)


def test_downloaded_basis_generates_exactly_like_the_local_one(hub, tmp_path):
    folder, commit = publish_basis(hub, tmp_path, "org/tiny-basis")
    out = run_client(
        hub.endpoint,
        tmp_path / "cache",
        f"""
        import torch
        from tests.helpers import tiny_model
        from transformers_headq import HeadQCache

        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        outputs = []
        for source, revision in (("org/tiny-basis", None), ("org/tiny-basis", "{commit}"), ("{folder}", None)):
            model = tiny_model()
            cache = HeadQCache.from_pretrained(source, model=model, revision=revision, rank=4, block_size=4)
            outputs.append(model.generate(ids, past_key_values=cache, max_new_tokens=16, do_sample=False))
        assert all(torch.equal(outputs[0], o) for o in outputs), outputs
        print("IDENTICAL", outputs[0].tolist())
        """,
    )
    assert "IDENTICAL" in out
    snapshot = tmp_path / "cache" / "models--org--tiny-basis" / "snapshots" / commit
    assert sorted(p.name for p in snapshot.iterdir()) == ["basis.safetensors", "config.json"]


def test_offline_use_from_the_cache_and_a_clear_error_when_missing(hub, tmp_path):
    publish_basis(hub, tmp_path, "org/offline-basis")
    cache = tmp_path / "cache"
    pull = "from transformers_headq.cli import app; app(['pull', 'org/offline-basis'])"
    pulled = run_client(hub.endpoint, cache, pull)
    assert "org/offline-basis ->" in pulled and "2 KV heads" in pulled
    out = run_client(
        "http://127.0.0.1:9",  # nothing listens there: offline mode must not try
        cache,
        """
        from transformers_headq import QueryBasis
        from transformers_headq.errors import BasisFormatError

        print("RANK", QueryBasis.from_pretrained("org/offline-basis").rank)
        try:
            QueryBasis.from_pretrained("org/never-downloaded")
        except BasisFormatError as err:
            print("ERROR", type(err).__name__, err)
        """,
        offline=True,
    )
    assert "RANK 4" in out
    assert "ERROR BasisNotAvailableError" in out
    assert "not in the local Hugging Face cache" in out and "headq pull org/never-downloaded" in out


def test_a_sub_basis_is_fetched_alone_and_a_missing_one_is_said(hub, tmp_path):
    """``QueryBasis.from_pretrained(repo, subfolder="key-pca")`` fetches only that sub-basis's files (what
    ``push_to_hub(extra_folders=...)`` uploads beside the basis); a sub-basis the repo lacks is named as such."""
    model = tiny_model()
    folder = random_basis(model, rank=4).save_pretrained(tmp_path / "with-control")
    random_basis(model, rank=4).save_pretrained(folder / "key-pca")
    commit = hub.publish("org/with-control", folder)
    out = run_client(
        hub.endpoint,
        tmp_path / "cache",
        """
        from transformers_headq import QueryBasis
        from transformers_headq.hub import BasisNotAvailableError

        print("RANK", QueryBasis.from_pretrained("org/with-control", subfolder="key-pca").rank)
        try:
            QueryBasis.from_pretrained("org/with-control", subfolder="oblique")
        except BasisNotAvailableError as err:
            print("ERROR", err)
        """,
    )
    assert "RANK 4" in out and "ERROR the basis 'org/with-control' has no sub-basis 'oblique'" in out
    snapshot = tmp_path / "cache" / "models--org--with-control" / "snapshots" / commit
    assert sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()) == [
        "key-pca/basis.safetensors",
        "key-pca/config.json",
    ]
    pull = "from transformers_headq.cli import app; app(['pull', 'org/with-control'])"
    pulled = run_client(hub.endpoint, tmp_path / "pulled", pull)
    assert "; with key-pca" in " ".join(pulled.split())
    offline = (
        'from transformers_headq import QueryBasis; QueryBasis.from_pretrained("org/with-control", subfolder="key-pca")'
    )
    run_client("http://127.0.0.1:9", tmp_path / "pulled", offline, offline=True)  # pulled: no network needed


def _other_model_basis(tmp_path: Path) -> Path:
    return random_basis(tiny_model(layers=3), rank=4).save_pretrained(tmp_path / "other")


def _truncated(tmp_path: Path) -> Path:
    folder = random_basis(tiny_model(), rank=4).save_pretrained(tmp_path / "truncated")
    weights = folder / "basis.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def _tampered(tmp_path: Path) -> Path:
    folder = random_basis(tiny_model(), rank=4).save_pretrained(tmp_path / "tampered")
    config = json.loads((folder / "config.json").read_text())
    config["fingerprint"]["num_key_value_heads"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _pickled(tmp_path: Path) -> Path:
    folder = random_basis(tiny_model(), rank=4).save_pretrained(tmp_path / "pickled")
    torch.save({"U": torch.eye(4)}, folder / "basis.bin")
    (folder / "basis.safetensors").unlink()
    return folder


@pytest.mark.parametrize(
    ("make", "error", "says"),
    [
        (_other_model_basis, "BasisMismatchError", "does not fit the model"),
        (_truncated, "BasisFormatError", "is invalid and was removed from the cache"),
        (_tampered, "BasisFormatError", "is invalid and was removed from the cache"),
        (_pickled, "BasisFormatError", "pickle files are never downloaded or loaded"),
    ],
    ids=["other-model", "truncated", "tampered-config", "pickle"],
)
def test_bad_bases_are_refused_and_leave_nothing_usable_in_the_cache(hub, tmp_path, make, error, says):
    repo_id = f"org/bad-{make.__name__.strip('_')}"
    hub.publish(repo_id, make(tmp_path))
    cache = tmp_path / "cache"
    out = run_client(
        hub.endpoint,
        cache,
        f"""
        from tests.helpers import tiny_model
        from transformers_headq import HeadQCache
        from transformers_headq.errors import HeadQError

        try:
            HeadQCache.from_pretrained("{repo_id}", model=tiny_model())
        except HeadQError as err:
            print("ERROR", type(err).__name__, err)
        """,
    )
    assert f"ERROR {error}" in out and says in out, out
    if error == "BasisFormatError":
        snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
        assert not snapshots.exists() or not any(snapshots.iterdir()), list(snapshots.rglob("*"))


def test_push_sends_one_commit_with_the_basis_card_and_control(tmp_path):
    basis = random_basis(tiny_model(), rank=4)
    basis.metadata.update(corpus="pydoc", calibration_tokens=1024, sequence_length=256)
    folder = basis.save_pretrained(tmp_path / "basis")
    basis.save_pretrained(folder / "key-pca")
    server = RecordingHub()
    try:
        out = run_client(
            server.endpoint,
            tmp_path / "cache",
            f"""
            from transformers_headq.cli import app
            app(["push", "{folder}", "org/pushed", "--message", "Add tiny basis", "--base-model", "org/tiny"])
            """,
            HF_TOKEN="hf_loopback_test_token",
        )
    finally:
        server.close()
    assert "pushed" in out and "a" * 40 in out
    posts = [r for r in server.requests if r["method"] == "POST"]  # GETs: the client's own probes, answered 404
    assert [r["path"] for r in posts] == [
        "/api/repos/create",
        "/api/validate-yaml",
        "/api/models/org/pushed/preupload/main",
        "/api/models/org/pushed/commit/main",
    ]
    assert json.loads(posts[0]["body"])["name"] == "pushed"
    assert all(r["headers"].get("authorization") == "Bearer hf_loopback_test_token" for r in posts)
    (commit,) = server.commits()
    assert commit["path"] == "/api/models/org/pushed/commit/main"
    assert commit["summary"] == "Add tiny basis"
    assert sorted(commit["files"]) == [
        "README.md",
        "basis.safetensors",
        "config.json",
        "key-pca/basis.safetensors",
        "key-pca/config.json",
    ]
    uploaded = safetensors.torch.load(commit["files"]["basis.safetensors"])
    local = safetensors.torch.load_file(folder / "basis.safetensors")
    assert uploaded.keys() == local.keys() and all(torch.equal(uploaded[k], local[k]) for k in local)
    card = commit["files"]["README.md"].decode()
    assert "library_name: transformers-headq" in card and "base_model: org/tiny" in card


@pytest.mark.skipif(
    not (os.environ.get("HF_TOKEN") and os.environ.get("HEADQ_HUB_TEST_REPO")),
    reason="pushes to the real Hub: set HF_TOKEN and HEADQ_HUB_TEST_REPO (a repo you own) to run",
)
def test_round_trip_through_the_real_hub(tmp_path):
    repo_id = os.environ["HEADQ_HUB_TEST_REPO"]
    basis = random_basis(tiny_model(), rank=4)
    commit = basis.push_to_hub(repo_id, commit_message="transformers-headq test round trip", private=True)
    again = QueryBasis.from_pretrained(repo_id, revision=commit.oid, cache_dir=tmp_path, force_download=True)
    for a, b in zip(basis.layers, again.layers, strict=True):
        torch.testing.assert_close(a.U, b.U, rtol=0, atol=0)
