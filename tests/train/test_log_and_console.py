"""se3tutor.train: what a run tells (its log's times and versions, one epoch numbering, the
loss from the first step, plain lines where there is no terminal), more epochs for a finished
run, and a full disk (exit 2, the last checkpoint intact, no partial files).

Tiny runs in process (13-atom clusters, float64, one thread), as in test_train.py.
"""

import errno
import os
import platform
import re
import sys
from datetime import datetime, timedelta, timezone

import e3nn
import pytest
import torch
from test_train import TINY, TINY_CONFIG, records

import se3tutor
from se3tutor.data import emt_clusters
from se3tutor.train import SetupError, TrainConfig, fit, loop, main, read_log, runlog
from se3tutor.train import checkpoint as checkpoint_module
from se3tutor.train.checkpoint import load_latest_checkpoint

# 10 clusters: 8 to train on in batches of 2, 4 steps an epoch
SMALL = ["--num-structures", "10", "--batch-size", "2"]


def tiny_config(tmp_path, **changes) -> TrainConfig:
    options = dict(TINY_CONFIG, batch_size=2, progress=False, out=str(tmp_path))
    return TrainConfig(**{**options, **changes})


def test_every_record_has_its_utc_time_and_elapsed_seconds_and_the_first_the_versions(tmp_path):
    before = datetime.now(timezone.utc)
    fit(tiny_config(tmp_path, epochs=1, log_every=1), emt_clusters(10, shells=(2,), seed=1))
    log = read_log(tmp_path)
    times = [datetime.fromisoformat(record["time"]) for record in log]
    assert all(time.utcoffset() == timedelta(0) for time in times)  # UTC, said so
    assert before - timedelta(seconds=1) <= times[0] <= times[-1] <= datetime.now(timezone.utc)
    elapsed = [record["elapsed_s"] for record in log]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0
    assert log[0]["event"] == "start"
    assert log[0]["versions"] == {
        "se3tutor": se3tutor.__version__,
        "torch": torch.__version__,
        "e3nn": e3nn.__version__,
        "python": platform.python_version(),
    }
    assert not any("versions" in record for record in log[1:])


def test_log_and_console_number_the_epochs_from_1(tmp_path, capsys):
    assert main([*TINY, *SMALL, "--epochs", "2", "--log-every", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert [r["epoch"] for r in records(tmp_path, "epoch")] == [1, 2]
    assert re.findall(r"^epoch (\d)/2", printed, re.M) == ["1", "2"]
    assert [r["epoch"] for r in records(tmp_path, "step")] == [1] * 4 + [2] * 4


def test_without_a_terminal_the_console_gets_plain_lines_with_loss_and_speed_from_step_1(
    tmp_path, capsys
):
    # progress is on (the default), but stderr is captured here: not a terminal
    options = ["--epochs", "2", "--log-every", "3"]
    arguments = [a for a in TINY if a != "--no-progress"] + SMALL + options
    assert main([*arguments, "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err  # no progress-bar frames in a file
    steps = re.findall(
        r"^step (\d+)/8 \(epoch (\d)/2\): loss [\d.e+-]+, ([\d.]+) structures/s$", out, re.M
    )
    assert [(int(step), int(epoch)) for step, epoch, _ in steps] == [(1, 1), (3, 1), (6, 2)]
    assert all(float(speed) > 0 for _, _, speed in steps)
    assert out.index("step 1/8") < out.index("epoch 1/2")  # shown before the epoch ends
    assert [r["step"] for r in records(tmp_path, "step")] == [1, 3, 6]  # the log: the same steps


def test_in_a_terminal_the_bar_shows_loss_and_speed_from_step_1(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    config = tiny_config(tmp_path, epochs=1, log_every=10, progress=True)
    fit(config, emt_clusters(4, shells=(2,), seed=1))  # 3 training clusters: 2 steps
    out, err = capsys.readouterr()
    assert re.search(r"1/2 .*loss=[\d.e+-]+, structures_per_s=[\d.]+", err), err
    assert "step 1/2" not in out  # the bar shows them, not lines


def test_more_epochs_extend_a_finished_run_and_say_so(tmp_path, capsys):
    structures = emt_clusters(10, shells=(2,), seed=1)
    fit(tiny_config(tmp_path, epochs=1, log_every=1), structures)
    capsys.readouterr()
    extended = fit(tiny_config(tmp_path, epochs=3, log_every=1, lr=5e-3), structures)
    printed = capsys.readouterr().out
    assert "extending the finished run of 1 epoch to 3 epochs" in printed
    assert "cosine decay from 0.005 to 0 started again" in printed
    [extend] = records(tmp_path, "extend")
    assert (extend["from_epochs"], extend["epochs"], extend["step"]) == (1, 3, 4)
    assert [r["epoch"] for r in records(tmp_path, "epoch")] == [1, 2, 3]
    # The learning rate's cosine decay starts again, from the new --lr to 0 over the 8 new
    # steps (the first run's ended at 0).
    learning_rates = [r["lr"] for r in records(tmp_path, "step")]
    assert learning_rates[3] < TrainConfig().lr and learning_rates[4] == 5e-3
    assert learning_rates[5] < learning_rates[4] and learning_rates[-1] > 0
    state, _ = load_latest_checkpoint(tmp_path)
    assert state["step"] == 12 and state["epoch"] == 3
    assert state["schedule"]["last_epoch"] == 8 == state["schedule"]["T_max"]
    assert all(torch.isfinite(p).all() for p in extended.parameters())


def test_an_extension_that_is_stopped_resumes_to_the_parameters_of_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    structures = emt_clusters(10, shells=(2,), seed=1)
    for out in ("whole", "stopped"):
        fit(tiny_config(tmp_path / out, epochs=1), structures)
    whole = fit(tiny_config(tmp_path / "whole", epochs=3), structures)

    step = loop._train_step

    def stopping_step(run, session, batch):  # as SIGTERM does: stop after step 7
        if run.step == 6:
            session.stop.set()
        return step(run, session, batch)

    monkeypatch.setattr(loop, "_train_step", stopping_step)
    with pytest.raises(loop.Stopped):
        fit(tiny_config(tmp_path / "stopped", epochs=3), structures)
    monkeypatch.setattr(loop, "_train_step", step)
    resumed = fit(tiny_config(tmp_path / "stopped", epochs=3), structures)
    assert records(tmp_path / "stopped", "resume")[-1]["step"] == 7
    assert len(records(tmp_path / "stopped", "extend")) == 1  # extended once, then resumed
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


def test_other_epochs_for_an_unfinished_run_or_fewer_for_a_finished_one_are_refused(
    tmp_path, monkeypatch
):
    structures = emt_clusters(10, shells=(2,), seed=1)
    fit(tiny_config(tmp_path / "finished", epochs=2), structures)
    with pytest.raises(SetupError, match="finished 2 epochs; --epochs 1 is fewer"):
        fit(tiny_config(tmp_path / "finished", epochs=1), structures)

    step = loop._train_step

    def stopping_step(run, session, batch):
        session.stop.set()
        return step(run, session, batch)

    monkeypatch.setattr(loop, "_train_step", stopping_step)
    with pytest.raises(loop.Stopped):
        fit(tiny_config(tmp_path / "unfinished", epochs=2), structures)
    monkeypatch.setattr(loop, "_train_step", step)
    with pytest.raises(SetupError, match=r"a run of 2 epochs that is not finished .* --epochs 2"):
        fit(tiny_config(tmp_path / "unfinished", epochs=3), structures)


class FillingDisk:
    """``open`` for a module under test, on a disk that fills up: the first write for which
    ``full(path, data)`` is true writes half its bytes, then raises OSError(ENOSPC)."""

    def __init__(self, full):
        self.full, self.filled = full, False

    def __call__(self, path, *args, **kwargs):
        disk, file = self, open(path, *args, **kwargs)

        class File:
            def write(self, data):
                if not disk.filled and disk.full(str(path), data):
                    disk.filled = True
                    file.write(data[: len(data) // 2])
                    file.flush()
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return file.write(data)

            def __getattr__(self, name):
                return getattr(file, name)

            def __enter__(self):
                return self

            def __exit__(self, *exception):
                file.close()

        return File()


def no_partial_files(out) -> bool:
    return not [path.name for path in out.iterdir() if ".tmp" in path.name]


def test_a_full_disk_while_saving_a_checkpoint_exits_2_keeping_the_one_before(
    tmp_path, capsys, monkeypatch
):
    disk = FillingDisk(lambda path, data: "checkpoint-00000004.pt" in path)
    monkeypatch.setattr(checkpoint_module, "open", disk, raising=False)
    command = [*TINY, *SMALL, "--epochs", "2", "--checkpoint-every", "2", "--out", str(tmp_path)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: cannot write the checkpoint of step 4 .*No space left on device", err)
    assert "checkpoint-00000002.pt is intact" in err and "Traceback" not in err
    assert disk.filled and no_partial_files(tmp_path)
    assert not list(tmp_path.glob("checkpoint-00000004*"))
    state, path = load_latest_checkpoint(tmp_path)  # no warning: nothing corrupt is left
    assert path.name == "checkpoint-00000002.pt" and state["step"] == 2
    read_log(tmp_path)  # every line a whole record
    assert not (tmp_path / "model.pt").exists()
    monkeypatch.undo()  # space freed: the same command continues
    assert main(command) == 0
    assert records(tmp_path, "resume")[0]["step"] == 2


def test_a_full_disk_while_writing_the_log_exits_2_leaving_whole_records(
    tmp_path, capsys, monkeypatch
):
    disk = FillingDisk(lambda path, data: b'"event": "epoch"' in data)
    monkeypatch.setattr(runlog, "open", disk, raising=False)
    command = [*TINY, *SMALL, "--epochs", "2", "--checkpoint-every", "2", "--out", str(tmp_path)]
    assert main(command) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: cannot write the log .*log.jsonl.*No space left on device", err)
    assert "Traceback" not in err and disk.filled and no_partial_files(tmp_path)
    log = read_log(tmp_path)  # the half record was taken back
    assert log[-1]["event"] == "checkpoint" and log[-1]["step"] == 4
    assert load_latest_checkpoint(tmp_path)[0]["step"] == 4
    monkeypatch.undo()
    assert main(command) == 0
    assert [r["epoch"] for r in records(tmp_path, "epoch")] == [1, 2]


def test_a_full_disk_leaves_no_temporary_file_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(
        checkpoint_module, "open", FillingDisk(lambda path, data: True), raising=False
    )
    (tmp_path / "model.pt").write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"):
        checkpoint_module.write_atomically(tmp_path / "model.pt", b"new model")
    assert (tmp_path / "model.pt").read_bytes() == b"old" and no_partial_files(tmp_path)
