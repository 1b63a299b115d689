"""train.loggers: TensorBoard, W&B (offline) and MLflow (local file store) get metrics.jsonl's events.

References: metrics.jsonl of the same run (the scalars read back from each tracker's own files must
equal its numbers, float32 tolerance 1e-6 relative for TensorBoard which stores float32, exact for the
others) and the resolved recipe (the hyperparameters).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import kit
import pytest
from helpers.kill_after_checkpoint import run_killed_after_checkpoint
from typer.testing import CliRunner

import peftcli
from peftcli.cli import app
from peftcli.recipe import RecipeError
from peftcli.recipe_loader import load_recipe
from peftcli.training.loggers import check_installed, flat_hyperparameters


def write_recipe(tmp_path: Path, loggers: list[str], **train) -> Path:
    return kit.write_recipe(
        tmp_path,
        data={"max_train_examples": 32, "max_eval_examples": 8},
        method={"r": 2},
        train={
            "max_steps": 6,
            "batch_size": 8,
            "lr": 5.0e-3,
            "log_every": 1,
            "eval_every": 3,
            "seed": 1,
            "loggers": loggers,
            **train,
        },
    )


def events_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(run: Path) -> dict[str, dict[int, float]]:
    """{"train/loss": {step: value}, "eval/eval_loss": {...}, ...} straight from metrics.jsonl."""
    series: dict[str, dict[int, float]] = {}
    for event in events_of(run):
        for key, value in event.items():
            if key not in ("event", "step"):
                series.setdefault(f"{event['event']}/{key}", {})[event["step"]] = float(value)
    return series


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_unknown_logger_is_a_recipe_error_with_did_you_mean(tmp_path):
    path = write_recipe(tmp_path, ["tensorbord"])
    with pytest.raises(RecipeError, match=r"train\.loggers\[0\].*did you mean 'tensorboard'"):
        load_recipe(path)


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        RecipeError, match=r"train\.loggers\[1\]: wandb is not installed; pip install 'peftcli\[wandb\]'"
    ):
        check_installed(["tensorboard", "wandb"])
    # through the CLI: one line, exit 2, and no run directory (nothing loaded or written)
    path = write_recipe(tmp_path, ["wandb"])
    result = CliRunner().invoke(app, ["train", str(path), "-q"])
    assert result.exit_code == 2
    assert "peftcli[wandb]" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    path = write_recipe(tmp_path, ["tensorboard"])
    peftcli.train(path)
    run = tmp_path / "run"
    expected = expected_scalars(run)
    got = tensorboard_scalars(run)
    assert set(got) == set(expected)
    assert {"train/loss", "train/lr", "eval/eval_loss", "eval/perplexity"} <= set(got)
    for tag, series in expected.items():
        assert [s for s, _ in got[tag]] == sorted(series), tag  # every step once, in order
        for step, value in got[tag]:
            assert value == pytest.approx(series[step], rel=1e-6, abs=1e-12), (tag, step)
    # the resolved recipe rides along as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "lr: 0.005" in text and "loggers:\n  - tensorboard" in text


@pytest.mark.slow
def test_resume_delivers_each_event_once(tmp_path):
    """A run killed after its step-6 checkpoint, resumed from step 3 (step-6 removed): the tracker
    already holds steps 4-6, so it must not get them twice; its values equal the final metrics.jsonl."""
    path = write_recipe(tmp_path, ["tensorboard"], max_steps=8, save_every=3, keep_checkpoints=5)
    run = tmp_path / "run"
    proc = run_killed_after_checkpoint(6, path)
    assert proc.returncode < 0, proc.stderr
    assert [s for s, _ in tensorboard_scalars(run)["train/loss"]] == [1, 2, 3, 4, 5, 6]
    shutil.rmtree(run / "checkpoints" / "step-6")
    peftcli.train(path, resume=True)
    got = tensorboard_scalars(run)
    expected = expected_scalars(run)
    for tag in ("train/loss", "train/lr", "eval/eval_loss"):
        # each step exactly once; the accumulator lists event files in name order (time, host, pid),
        # which need not be the order the two processes wrote them in
        assert sorted(s for s, _ in got[tag]) == sorted(expected[tag]), tag
        for step, value in got[tag]:
            assert value == pytest.approx(expected[tag][step], rel=1e-5), (tag, step)


def wandb_records(run: Path) -> list:
    """The records of the offline W&B run, decoded from its .wandb transaction log.

    wandb 0.2x+ ships no Python reader, so this reads the documented LevelDB-log layout itself: a 7-byte
    header (":W&B", magic, version), then 32 KiB blocks of chunks (crc32 u32, length u16, type u8:
    1 full, 2 first, 3 middle, 4 last), each whole record one protobuf ``Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (log_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    data = log_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run: Path) -> list[dict]:
    rows = []
    for record in wandb_records(run):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


@pytest.mark.slow
def test_wandb_offline_history_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    path = write_recipe(tmp_path, ["wandb"])
    peftcli.train(path)
    run = tmp_path / "run"
    rows = wandb_history(run)
    expected = expected_scalars(run)
    got: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if "/" in key:
                got.setdefault(key, {})[row["_step"]] = value
    assert got == expected
    config = {}
    for record in wandb_records(run):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    recipe = load_recipe(run / "recipe.yaml")
    assert {k: config[k] for k in flat_hyperparameters(recipe)} == flat_hyperparameters(recipe)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["default", "file"])
def test_mlflow_metrics_and_params(tmp_path, monkeypatch, store):
    """``default``: no MLFLOW_TRACKING_URI, so the SQLite store in RUN/mlflow.db; ``file``: a local file
    store given by the user (MLflow 3 wants MLFLOW_ALLOW_FILE_STORE=true for it)."""
    if store == "file":
        uri = (tmp_path / "mlruns").as_uri()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    path = write_recipe(tmp_path, ["mlflow"])
    peftcli.train(path)
    run = tmp_path / "run"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run_id = json.loads((run / "loggers.json").read_text())["mlflow"]["run_id"]
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    expected = expected_scalars(run)
    assert set(info.data.metrics) == set(expected)
    for key, series in expected.items():
        history = client.get_metric_history(run_id, key)
        assert sorted((m.step, m.value) for m in history) == sorted(series.items()), key
    params = info.data.params
    recipe = load_recipe(run / "recipe.yaml")
    assert params == {k: str(v) for k, v in flat_hyperparameters(recipe).items()}


@pytest.mark.slow
@pytest.mark.parametrize(("error", "status"), [("interrupt", "KILLED"), ("crash", "FAILED")])
def test_a_run_that_stops_early_ends_its_mlflow_run(tmp_path, monkeypatch, error, status):
    """An interrupted run's tracker run is KILLED (resumable), a crashed one FAILED: never left RUNNING."""
    import peftcli.training.loop as loop

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real_step = loop.optimizer_step

    def step_then_stop(run, micro, n_targets, step):
        if step == 2:
            if error == "interrupt":
                raise KeyboardInterrupt
            raise RuntimeError("boom at step 2")
        return real_step(run, micro, n_targets, step)

    monkeypatch.setattr(loop, "optimizer_step", step_then_stop)
    path = write_recipe(tmp_path, ["mlflow"])
    with pytest.raises(KeyboardInterrupt if error == "interrupt" else RuntimeError):
        peftcli.train(path)
    run = tmp_path / "run"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    run_id = json.loads((run / "loggers.json").read_text())["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == status
