"""Checkpoints survive crashes and bit rot (peftcli.checkpoint), checked on small payloads:

- the manifest (written last) records each file's size and SHA-256, and verifies them;
- damage is named: a missing manifest, a missing file, a short file, zeroed bytes;
- resume_checkpoint falls back to the newest intact checkpoint and warns naming what was wrong;
- a write that the disk refuses (ENOSPC, EIO) leaves the previous checkpoints as they were, removes
  its partial files, and raises one line saying how much space it needs;
- rotation never leaves a half-deleted step-N behind.
"""

from __future__ import annotations

import errno
import hashlib
import json

import pytest
import torch

import peftcli.checkpoint as ckpt
from peftcli.recipe import RecipeError


def payload(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    weight = torch.randn(64, 32, generator=g)
    return {
        "trainable": {"layer.lora_A.weight": weight},
        "optimizer": {"state": {0: {"exp_avg": weight * 0.1, "step": torch.tensor(float(step))}}},
        "method_state": {},
        "rng": {"torch": torch.get_rng_state()},
        "trainer_state": {"step": step, "epoch": 0, "batch_index": step},
    }


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 2, payload(2), keep=3)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["step"] == 2
    files = sorted(p.name for p in path.iterdir() if p.name != ckpt.MANIFEST)
    assert sorted(manifest["files"]) == files
    for name in files:
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path) is None


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda p: (p / ckpt.MANIFEST).unlink(), "manifest.json is missing"),
        (lambda p: (p / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
        (
            lambda p: (p / "trainable.safetensors").write_bytes(
                (p / "trainable.safetensors").read_bytes()[:-10]
            ),
            "trainable.safetensors has",
        ),
        (lambda p: _zero_tail(p / "trainable.safetensors", 16), "trainable.safetensors is damaged"),
        (lambda p: (p / ckpt.MANIFEST).write_text("{not json"), "manifest.json is damaged"),
    ],
)
def test_damage_is_named(tmp_path, damage, named):
    path = ckpt.save_checkpoint(tmp_path, 4, payload(4), keep=3)
    damage(path)
    assert named in ckpt.verify_checkpoint(path)


def _zero_tail(path, n):
    data = bytearray(path.read_bytes())
    data[-n:] = bytes(n)
    path.write_bytes(bytes(data))


def test_resume_falls_back_to_the_newest_intact_checkpoint_with_a_warning(tmp_path):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, payload(step), keep=3)
    _zero_tail(tmp_path / "checkpoints" / "step-6" / "trainable.safetensors", 8)
    (tmp_path / "checkpoints" / "step-4" / ckpt.MANIFEST).unlink()
    warnings = []
    chosen = ckpt.resume_checkpoint(tmp_path, warn=warnings.append)
    assert chosen == tmp_path / "checkpoints" / "step-2"
    assert "step-6 is not usable: trainable.safetensors is damaged" in warnings[0]
    assert "step-4 is not usable: manifest.json is missing" in warnings[1]
    assert warnings[2] == "resuming from step-2 instead"
    loaded = ckpt.load_checkpoint(chosen)
    assert torch.equal(
        loaded["trainable"]["layer.lora_A.weight"], payload(2)["trainable"]["layer.lora_A.weight"]
    )


def test_resume_with_no_intact_checkpoint_is_an_error_not_a_silent_restart(tmp_path):
    ckpt.save_checkpoint(tmp_path, 2, payload(2), keep=3)
    _zero_tail(tmp_path / "checkpoints" / "step-2" / "optimizer.safetensors", 4)
    with pytest.raises(
        RecipeError, match=r"--resume: no intact checkpoint .*step-2: optimizer.safetensors is damaged"
    ):
        ckpt.resume_checkpoint(tmp_path, warn=lambda text: None)
    assert ckpt.resume_checkpoint(tmp_path / "elsewhere", warn=lambda text: None) is None


def test_checkpoint_with_other_tensors_is_refused_listing_them(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 2, payload(2), keep=3)
    expected = {"layer.lora_A.weight": torch.zeros(64, 16), "layer.lora_B.weight": torch.zeros(8, 8)}
    with pytest.raises(RecipeError) as err:
        ckpt.load_checkpoint(path, expected_trainable=expected)
    assert "missing: layer.lora_B.weight" in str(err.value)
    assert "wrong shape: layer.lora_A.weight (64, 32) (expected (64, 16))" in str(err.value)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_failed_write_keeps_the_previous_checkpoint_and_removes_partial_files(tmp_path, monkeypatch, code):
    ckpt.save_checkpoint(tmp_path, 2, payload(2), keep=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step-2").iterdir()}
    real_save = ckpt.save_file
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second file of the new checkpoint: some bytes land, then the disk is full
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 100)
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Input/output error")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(RecipeError) as err:
        ckpt.save_checkpoint(tmp_path, 4, payload(4), keep=2)
    text = str(err.value)
    assert "\n" not in text and text.startswith("output_dir: could not write checkpoint step-4")
    assert "it needs about " in text and " is free" in text and "step-2 is intact" in text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]  # no partial dir
    after = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step-2").iterdir()}
    assert after == before and ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step-2") is None


def test_other_write_errors_are_not_disguised(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        ckpt.save_checkpoint(tmp_path, 2, payload(2), keep=2)


def test_rotation_keeps_the_newest_and_leaves_no_half_deleted_dirs(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, payload(step), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-5"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]
