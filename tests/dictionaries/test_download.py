"""Unpacking and verification of the Marks et al. dictionary archive (no network)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from feature_circuits.dictionaries import download as dl
from feature_circuits.dictionaries.download import (
    MissingDictionariesError,
    UnsafeArchiveError,
    download_marks_saes,
    expected_marks_files,
    site_dirs,
    unpack_zip,
    verify_marks_layout,
)

REL = [f"pythia-70m-deduped/{site}/10_32768/ae.pt" for site in site_dirs()]


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def marks_members(prefix: str = "dictionaries/", skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    out = {}
    for rel in REL:
        if any(s in rel for s in skip):
            continue
        out[prefix + rel] = f"weights of {rel}".encode()
        out[prefix + rel.replace("ae.pt", "config.json")] = b"{}"
    return out


@pytest.fixture
def no_network(monkeypatch):
    """Replace hf_hub_download; records calls and returns whatever zip the test sets."""
    calls = []
    state = {"zip": None}

    def fake(*, repo_id, filename, cache_dir=None, **kw):
        calls.append((repo_id, filename))
        return str(state["zip"])

    monkeypatch.setattr(dl, "hf_hub_download", fake)
    return calls, state


def test_expected_files():
    files = expected_marks_files("/r")
    assert len(files) == 19 == len(set(files))
    assert Path("/r/pythia-70m-deduped/embed/10_32768/ae.pt") in files
    for kind in ("attn", "mlp", "resid"):
        for layer in range(6):
            assert Path(f"/r/pythia-70m-deduped/{kind}_out_layer{layer}/10_32768/ae.pt") in files


@pytest.mark.parametrize("prefix", ["dictionaries/", ""])
def test_download_unpacks_and_verifies(tmp_path, no_network, prefix):
    calls, state = no_network
    state["zip"] = make_zip(tmp_path / "d.zip", marks_members(prefix))
    out = tmp_path / "saes" / "dictionaries"
    assert verify_marks_layout(out) == expected_marks_files(out)
    assert download_marks_saes(out, progress=False) == out
    assert calls == [(dl.DEFAULT_REPO_ID, dl.DEFAULT_FILENAME)]
    assert verify_marks_layout(out) == []
    ae = out / "pythia-70m-deduped/mlp_out_layer3/10_32768/ae.pt"
    assert ae.read_bytes() == b"weights of pythia-70m-deduped/mlp_out_layer3/10_32768/ae.pt"
    assert not list(out.rglob("*.partial"))
    assert not (out / "dictionaries").exists()

    # already complete: no download at all
    download_marks_saes(out, progress=False)
    assert len(calls) == 1
    # --force unpacks again
    ae.write_bytes(b"stale")
    download_marks_saes(out, force=True, progress=False)
    assert len(calls) == 2
    assert ae.read_bytes().startswith(b"weights of")


def test_missing_file_is_reported(tmp_path, no_network):
    _, state = no_network
    state["zip"] = make_zip(tmp_path / "d.zip", marks_members(skip=("resid_out_layer4", "/embed/")))
    out = tmp_path / "out"
    with pytest.raises(MissingDictionariesError) as info:
        download_marks_saes(out, progress=False)
    missing = [
        out / "pythia-70m-deduped/embed/10_32768/ae.pt",
        out / "pythia-70m-deduped/resid_out_layer4/10_32768/ae.pt",
    ]
    assert info.value.missing == missing
    assert "2 dictionary file(s) missing" in str(info.value)
    for p in missing:
        assert str(p) in str(info.value)
    assert verify_marks_layout(out) == missing


def test_empty_file_counts_as_missing(tmp_path):
    out = tmp_path / "out"
    unpack_zip(make_zip(tmp_path / "d.zip", marks_members()), out, progress=False)
    bad = out / "pythia-70m-deduped/attn_out_layer0/10_32768/ae.pt"
    bad.write_bytes(b"")
    assert verify_marks_layout(out) == [bad]


@pytest.mark.parametrize(
    "evil",
    [
        "../evil",
        "dictionaries/../../evil",
        "/abs/evil",
        "dictionaries/pythia-70m-deduped/../../../evil",
        "C:/evil",
        "..\\evil",
    ],
)
def test_unsafe_member_rejected_before_writing(tmp_path, evil):
    members = marks_members()
    members[evil] = b"pwned"
    zpath = make_zip(tmp_path / "evil.zip", members)
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(UnsafeArchiveError, match="evil"):
        unpack_zip(zpath, out, progress=False)
    assert not out.exists() or not any(out.rglob("*"))  # nothing written
    assert not list(tmp_path.rglob("evil"))


def _download_saes(*argv: str) -> int:
    """``feature-circuits download-saes ARGV`` in-process (what scripts/download_saes.py runs)."""
    from feature_circuits.cli import main

    return main(["download-saes", *argv])


def test_script_verify_only(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _download_saes("--verify-only", "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "19 dictionary file(s) missing" in err and "resid_out_layer5" in err
    unpack_zip(make_zip(tmp_path / "d.zip", marks_members()), out, progress=False)
    assert _download_saes("--verify-only", "--out", str(out)) == 0
    assert "all 19 dictionaries present" in capsys.readouterr().out

    def boom(**kw):
        raise AssertionError("must not download")

    monkeypatch.setattr(dl, "hf_hub_download", boom)
    assert _download_saes("--out", str(out), "--quiet") == 0


def test_network_failure_is_a_clear_error(tmp_path, monkeypatch, capsys):
    def offline(**kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr(dl, "hf_hub_download", offline)
    with pytest.raises(dl.DownloadError, match="saprmarks/pythia-70m-deduped-saes"):
        download_marks_saes(tmp_path / "out", progress=False)

    # a user-facing error: the CLI prints it once and exits with its error status (2)
    assert _download_saes("--out", str(tmp_path / "out"), "--quiet") == 2
    assert "could not fetch" in capsys.readouterr().err

    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"not a zip")
    monkeypatch.setattr(dl, "hf_hub_download", lambda **kw: str(corrupt))
    assert _download_saes("--out", str(tmp_path / "out"), "--quiet") == 2
    assert "corrupt" in capsys.readouterr().err
