"""One run per directory and the checks before loading weights (peftcli.training.rundir), without training.

- the lock names the holder (pid, host, start time) and refuses a second owner while the first lives,
  also from another process; a lock left by a dead process is taken over with a note;
- a finished run is recognised by its results.json; --overwrite removes only what a run writes;
- the free-space check compares the estimate (trainable count × bytes per parameter) with the disk;
- the meta-device estimate of the trainable count equals the count of the really built model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections import namedtuple

import kit
import pytest

from peftcli.recipe import RecipeError, TrainConfig
from peftcli.recipe_loader import load_recipe
from peftcli.training import rundir

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from peftcli.training.rundir import acquire_lock
    lock = acquire_lock(sys.argv[1], note=lambda text: None)
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _hold_in_child(run_dir):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "locked"
    return child


def test_lock_names_its_holder_and_refuses_a_second_owner(tmp_path):
    child = _hold_in_child(tmp_path)
    try:
        holder = json.loads((tmp_path / rundir.LOCK_NAME).read_text())
        assert holder["pid"] == child.pid and holder["host"] == socket.gethostname()
        assert holder["started"].endswith("Z")
        with pytest.raises(RecipeError) as err:
            rundir.acquire_lock(tmp_path)
        message = str(err.value)
        assert f"pid {child.pid} on {socket.gethostname()}" in message and "\n" not in message
        assert message.startswith("output_dir: ") and "in use by another peftcli train" in message
    finally:
        child.kill()
        child.wait()


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_note(tmp_path):
    child = _hold_in_child(tmp_path)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (tmp_path / rundir.LOCK_NAME).exists()  # SIGKILL left the file behind
    notes = []
    lock = rundir.acquire_lock(tmp_path, note=notes.append)
    assert len(notes) == 1 and f"pid {child.pid}" in notes[0] and "no longer running" in notes[0]
    assert json.loads((tmp_path / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / rundir.LOCK_NAME).exists()
    # A clean release leaves nothing to take over: no note the next time.
    notes.clear()
    rundir.acquire_lock(tmp_path, note=notes.append).release()
    assert notes == []


def test_lock_in_the_same_process_is_exclusive_too(tmp_path):
    with rundir.acquire_lock(tmp_path), pytest.raises(RecipeError, match="in use"):
        rundir.acquire_lock(tmp_path)


def test_finished_run_and_overwrite(tmp_path):
    assert rundir.finished_run(tmp_path) is None
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "results.json").write_text(json.dumps({"steps": 7}))
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    err = rundir.refuse_finished(tmp_path, rundir.finished_run(tmp_path))
    assert "finished run (7 steps" in str(err)
    for offer in ("--resume", "--output-dir", "--overwrite"):
        assert offer in str(err)
    removed = rundir.discard_run(tmp_path)
    assert sorted(removed) == ["adapter", "checkpoints", "metrics.jsonl", "results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_partial_files_of_a_killed_run_are_removed_and_a_half_replaced_checkpoint_restored(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".step-4.tmp-abc").mkdir(parents=True)
    (ckpts / ".step-2.deleting").mkdir()
    (ckpts / ".step-6.old-123").mkdir()  # killed between AtomicDir's two renames: the only copy
    (ckpts / ".step-6.old-123" / "manifest.json").write_text("{}")
    (tmp_path / ".results.json.x1y2").write_text("partial")
    (tmp_path / rundir.LOCK_NAME).write_text("{}")
    rundir.remove_partial_files(tmp_path)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-6"]
    assert (ckpts / "step-6" / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.LOCK_NAME, "checkpoints"]


def test_space_needed_counts_checkpoints_and_adapter():
    cfg = TrainConfig(optimizer="adamw", keep_checkpoints=2, save_every=10)
    n = 1_000_000
    one = int(n * (4 + 8) * 1.25) + 1_000_000  # fp32 weights + two fp32 Adam moments, 25% slack
    needed, how = rundir.space_needed(n, cfg)
    assert needed == 3 * one + (n * 8 + 20_000_000)  # keep + 1 during rotation, and the adapter
    assert "3 checkpoint(s)" in how and "1,000,000 trainable" in how
    assert rundir.space_needed(n, cfg, checkpoints_on_disk=2)[0] == one + n * 8 + 20_000_000
    sgd = TrainConfig(optimizer="sgd", momentum=0.0)
    assert rundir.checkpoint_bytes(n, sgd) == int(n * 4 * 1.25) + 1_000_000


def test_free_space_check_refuses_with_the_numbers(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5_000_000, 5_000_000))
    with pytest.raises(RecipeError) as err:
        rundir.check_free_space(tmp_path, 80_000_000, "2 checkpoint(s) of ~30.0 MB + the adapter")
    message = str(err.value)
    assert "has 5.0 MB free; this run needs about 80.0 MB" in message and "\n" not in message
    rundir.check_free_space(tmp_path, 4_000_000, "fits")


def test_unwritable_output_dir_is_refused(tmp_path):
    # A path below a regular file can never be created, whoever runs the test (root ignores chmod).
    (tmp_path / "file").write_text("")
    with pytest.raises(RecipeError) as err:
        rundir.check_writable(tmp_path / "file" / "run")
    assert str(err.value).startswith(f"output_dir: cannot write to {tmp_path / 'file' / 'run'}: ")
    assert "choose another --output-dir" in str(err.value)


def test_missing_data_file_is_refused_before_loading(tmp_path):
    recipe = load_recipe("recipes/tiny/lora.yaml", [f"data.train={tmp_path}/nope.jsonl"])
    with pytest.raises(RecipeError, match=r"data.train: file not found"):
        rundir.check_data_files(recipe)


@pytest.mark.parametrize("name", ["lora", "ia3", "prefix_tuning_t5", "adalora", "bitfit"])
def test_meta_estimate_equals_the_built_models_trainable_count(name):
    from peftcli.methods.registry import count_parameters

    recipe, base, _, model, _ = kit.build(name)
    assert rundir.estimate_trainable(recipe, base) == count_parameters(model)[0]
