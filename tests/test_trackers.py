"""logger=wandb and logger=tensorboard, offline: the files each tracker writes, read back with the tracker's own
formats, hold the same metrics as metrics.jsonl under the same names, the sample tables and the redacted config."""

import json
import logging
import struct
import sys

import pytest

from online_rl.checks import check_config
from online_rl.loop import run
from online_rl.redaction import REDACTED

from .conftest import compose_config

SECRET = "sk-THISISNOTAREALKEY0123456789"
TWO_STEPS = [
    "max_steps=2",
    "eval_every=0",
    "data.synthetic_rows=64",
    "prompts_per_step=4",
    "algo.num_generations=4",
    "micro_batch_size=8",
    "sampling.max_completion_length=16",
    "logger.sample_table_every=1",
    f"+rewards.digits.kwargs.api_key={SECRET}",
]
TABLE_COLUMNS = ["prompt", "completion", "reward", "digits", "overlong"]


def metrics_by_step(run_dir) -> dict[int, dict[str, float]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line.pop("step"): line for line in lines}


def assert_no_secret_under(directory):
    leaked = [
        path for path in directory.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()
    ]
    assert leaked == []


def wandb_records(path):
    """The protobuf records of a .wandb file: wandb's header, then LevelDB's log format (32 KiB blocks of
    chunks, each with a 7-byte header: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString((pending if kind == 4 else b"") + chunk)
            yield record


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_wandb_offline_run_holds_the_metrics_tables_and_redacted_config(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level(logging.INFO):
        summary = run(compose_config([f"output_dir={tmp_path}", "logger=wandb", *TWO_STEPS]))
    assert len(summary.history) == 2
    import wandb

    wandb.teardown()  # what the end of `python train.py` does: wandb's service writes out the run's last records
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert f"Dashboard: wandb sync {run_file.parent}" in caplog.text  # the upload command, offline
    history, config = {}, {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {
                "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                for item in record.history.item
            }
            history[items["_step"]] = items
        elif record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    expected = metrics_by_step(tmp_path)
    assert sorted(history) == [1, 2]
    for step, metrics in expected.items():
        logged = {key: value for key, value in history[step].items() if not key.startswith(("_", "samples/"))}
        assert logged == metrics  # every metric, under its own name, with its value
        assert history[step]["samples/nrows"] == 8 and history[step]["samples/_type"] == "table-file"
        table = json.loads((run_file.parent / "files" / history[step]["samples/path"]).read_text())
        assert table["columns"] == TABLE_COLUMNS and len(table["data"]) == 8
    assert config["rewards"]["digits"]["kwargs"]["api_key"] == REDACTED
    assert config["max_steps"] == 2
    assert_no_secret_under(tmp_path)


@pytest.mark.slow  # over 30 s on 2 cores: `make test-slow` (and CI) runs it
def test_tensorboard_event_file_holds_the_metrics_tables_and_redacted_config(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with caplog.at_level(logging.INFO):
        run(compose_config([f"output_dir={tmp_path}", "logger=tensorboard", *TWO_STEPS]))
    assert f"Dashboard: tensorboard --logdir {tmp_path / 'tensorboard'}" in caplog.text
    (run_dir,) = (tmp_path / "tensorboard").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = metrics_by_step(tmp_path)
    names = {key for metrics in expected.values() for key in metrics}
    assert set(events.Tags()["scalars"]) == names
    for name in names:
        logged = {event.step: event.value for event in events.Scalars(name)}
        assert logged == {
            step: pytest.approx(m[name], rel=1e-6, abs=1e-30) for step, m in expected.items() if name in m
        }
    tables = events.Tensors("samples/text_summary")
    assert [event.step for event in tables] == [1, 2]
    markdown = tables[0].tensor_proto.string_val[0].decode()
    assert (
        markdown.split("\n")[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
        and len(markdown.split("\n")) == 2 + 8
    )
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert REDACTED in config_text and '"max_steps": 2' in config_text
    assert_no_secret_under(tmp_path)


@pytest.mark.parametrize("backend", ["wandb", "tensorboard"])
def test_a_logger_whose_package_is_missing_names_the_pip_command(monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # what `import` finds when the package is not installed
    with pytest.raises(
        ModuleNotFoundError, match=rf"logger={backend} needs .* pip install 'online-rl\[{backend}\]'"
    ):
        check_config(compose_config([f"logger={backend}"]))
