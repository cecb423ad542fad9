"""DCP checkpoint integrity: every file's size and CRC-32 recorded at save time, verified at resume; a damaged
checkpoint is named file by file and the run resumes from the newest one that verifies (or stops)."""

import glob
import json
import os

import pytest
from train_helpers import read_metrics, small_config

from libra_model.checksums import checksum_files, file_checksum, verify_files
from libra_model.hf_checkpoint import CheckpointError
from libra_model.parallel import dcp_checkpoint as ckpt
from libra_model.trainer import train


def _step_dir(run, step):
    return os.path.join(run, "checkpoints", ckpt.step_dir_name(step))


def _data_file(directory):
    files = sorted(glob.glob(os.path.join(directory, "*.distcp")))
    assert files, directory
    return max(files, key=os.path.getsize)


def _flip_middle(path, count=64):
    with open(path, "r+b") as handle:
        size = os.path.getsize(path)
        handle.seek(size // 2)
        data = handle.read(count)
        handle.seek(size // 2)
        handle.write(bytes(b ^ 0xFF for b in data))


def test_checksum_helpers_detect_every_change(tmp_path):
    (tmp_path / "a.bin").write_bytes(os.urandom(10_000))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"")
    record = checksum_files(str(tmp_path))
    assert sorted(record) == ["a.bin", "sub/b.bin"]
    assert record["sub/b.bin"] == {"size": 0, "crc32": "00000000"}
    assert verify_files(str(tmp_path), record) == []
    _flip_middle(str(tmp_path / "a.bin"), 1)
    (problem,) = verify_files(str(tmp_path), record)
    assert "a.bin" in problem and "changed" in problem
    os.remove(tmp_path / "sub" / "b.bin")
    problems = verify_files(str(tmp_path), record)
    assert any("b.bin: missing" in p for p in problems)
    assert file_checksum(str(tmp_path / "a.bin")) != record["a.bin"]["crc32"]


def test_save_records_every_file_and_the_model_config(finished_run):
    run, _, _ = finished_run
    directory = _step_dir(run, 6)
    meta = ckpt.read_meta(directory)
    on_disk = {os.path.relpath(p, directory) for p in glob.glob(os.path.join(directory, "*")) +
               glob.glob(os.path.join(directory, ".metadata"))} - {ckpt.META_NAME}
    assert set(meta["files"]) == on_disk and ".metadata" in on_disk
    assert meta["model_config"]["num_hidden_layers"] == 2
    assert ckpt.verify_checkpoint(directory) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero", "remove", "metadata", "meta_json"])
def test_every_kind_of_damage_is_named_and_the_previous_checkpoint_is_chosen(run_copy, damage):
    six = _step_dir(run_copy, 6)
    target = _data_file(six)
    if damage == "flip":
        _flip_middle(target)  # 64 changed bytes in the middle of a DCP data file
    elif damage == "truncate":
        with open(target, "r+b") as handle:
            handle.truncate(os.path.getsize(target) // 2)
    elif damage == "zero":
        open(target, "wb").close()
    elif damage == "remove":
        os.remove(target)
    elif damage == "metadata":
        target = os.path.join(six, ".metadata")
        _flip_middle(target, 8)
    else:
        target = os.path.join(six, ckpt.META_NAME)
        with open(target, "w", encoding="utf-8") as handle:
            handle.write('{"step": 6, "files": ')  # cut off mid-write
    problems = ckpt.verify_checkpoint(six)
    assert problems and all(target in p for p in problems), problems
    path, found = ckpt.find_resume_checkpoint(os.path.join(run_copy, "checkpoints"))
    assert path == _step_dir(run_copy, 4)
    assert found == sorted(problems)


def test_unreadable_file_is_reported(run_copy, monkeypatch):
    import builtins

    target = _data_file(_step_dir(run_copy, 6))
    real_open = builtins.open

    def refusing_open(path, *args, **kwargs):
        if os.fspath(path) == target:
            raise PermissionError(13, "Permission denied", target)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)  # as a file of another user without read permission
    (problem,) = ckpt.verify_checkpoint(_step_dir(run_copy, 6))
    assert target in problem and "unreadable (Permission denied)" in problem
    path, _ = ckpt.find_resume_checkpoint(os.path.join(run_copy, "checkpoints"))
    assert path == _step_dir(run_copy, 4)


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(processor_dir, finished_run, run_copy, capsys):
    _, reference, expected = finished_run
    damaged = _data_file(_step_dir(run_copy, 6))
    _flip_middle(damaged)
    capsys.readouterr()
    resumed = train(small_config(processor_dir, run_copy, save_every=2, keep_last=None, resume=True))
    out = capsys.readouterr().out
    assert f"checkpoint rejected: {damaged}" in out
    assert f"falling back to {_step_dir(run_copy, 4)}" in out
    assert f"resumed from {_step_dir(run_copy, 4)} at step 4" in out
    got = read_metrics(run_copy)
    assert [row["step"] for row in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, got):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), (a, b)  # bit-exact, no NaN
    assert resumed["loss"] == reference["loss"]
    # The damaged step 6 was written again, whole.
    assert ckpt.verify_checkpoint(_step_dir(run_copy, 6)) == []


def test_no_checkpoint_verifies_stops_unless_asked_to_start_fresh(processor_dir, run_copy, capsys):
    for step in (2, 4, 6):
        _flip_middle(_data_file(_step_dir(run_copy, step)))
    config = small_config(processor_dir, run_copy, save_every=2, keep_last=None, resume=True, max_steps=2)
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies.*resume_fresh_if_none"):
        train(config)
    out = capsys.readouterr().out
    for step in (2, 4, 6):
        assert _data_file(_step_dir(run_copy, step)) in out
    fresh = train(small_config(processor_dir, run_copy, save_every=2, keep_last=None, resume=True, max_steps=2,
                               resume_fresh_if_none=True))
    assert fresh["step"] == 2 and "starting from scratch" in capsys.readouterr().out


def test_checkpoint_without_a_record_is_not_trusted(run_copy):
    six = _step_dir(run_copy, 6)
    meta_path = os.path.join(six, ckpt.META_NAME)
    with open(meta_path, encoding="utf-8") as handle:
        meta = json.load(handle)
    del meta["files"]
    with open(meta_path, "w", encoding="utf-8") as handle:
        json.dump(meta, handle)
    (problem,) = ckpt.verify_checkpoint(six)
    assert meta_path in problem and "no checksum record" in problem


def _fake_checkpoint(root, step, files):
    directory = os.path.join(root, ckpt.step_dir_name(step))
    os.makedirs(directory)
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
    record = checksum_files(directory)
    with open(os.path.join(directory, ckpt.META_NAME), "w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": record}, handle)
    return directory


def test_shares_split_the_files_and_cover_them_all(tmp_path):
    files = {".metadata": b"m", **{f"__{i}_0.distcp": os.urandom(100 + i) for i in range(5)}}
    directory = _fake_checkpoint(str(tmp_path), 1, files)
    for name in files:
        _flip_middle(os.path.join(directory, name), 1)
    full = ckpt.verify_checkpoint(directory)
    assert len(full) == 6
    parts = [ckpt.verify_checkpoint(directory, (i, 3)) for i in range(3)]
    assert sorted(p for part in parts for p in part) == sorted(full) and all(len(part) == 2 for part in parts)


WORKER = """
import json, os, sys
from libra_model.parallel import dcp_checkpoint as ckpt
from libra_model.parallel.mesh import init_parallel

import torch.distributed as dist

parallel = init_parallel(1, timeout_s=60)
print(json.dumps(ckpt.find_resume_checkpoint(sys.argv[1], parallel)), flush=True)
# A process group left alive at exit can abort the interpreter in gloo's threads ("terminate called ...").
dist.barrier()
dist.destroy_process_group()
"""


def test_ranks_split_the_reading_and_agree(tmp_path):
    import socket
    import subprocess
    import sys

    root = str(tmp_path / "checkpoints")
    files = {".metadata": b"m", **{f"__{i}_0.distcp": os.urandom(1000) for i in range(4)}}
    older = _fake_checkpoint(root, 2, files)
    newer = _fake_checkpoint(root, 4, files)
    for name in ("__1_0.distcp", "__2_0.distcp"):  # one file for each rank's share
        _flip_middle(os.path.join(newer, name), 4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, root], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                                       PYTHONPATH=repo)) for r in range(2)]
    answers = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        answers.append(json.loads(out.strip().splitlines()[-1]))
    assert answers[0] == answers[1]
    path, problems = answers[0]
    assert path == older
    assert [os.path.basename(p.split(":")[0]) for p in problems] == ["__1_0.distcp", "__2_0.distcp"]
