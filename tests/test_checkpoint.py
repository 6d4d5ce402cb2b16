"""fastsnn.checkpoint: files from outside are read with weights_only=True only, every unusable file is one
clear CheckpointError line, role and architecture are checked, RNG states survive a round trip."""
import os
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch

from fastsnn import checkpoint as ckpt
from fastsnn import models


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _student_checkpoint(arch="digits_snn", role="student", **extra):
    model = models.create(arch, 10, T=4) if role == "student" else models.create(arch, 10)
    return {**ckpt.describe(role=role, arch=arch), "model": model.state_dict(), "config": {"arch": arch},
            "num_classes": 10, "in_channels": 1, **extra}


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_a_crafted_file_is_refused_and_runs_nothing(tmp_path, container):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": torch.zeros(1)}, "args": _RunsCode(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ckpt.CheckpointError, match=r"^--resume .*evil\.pt: ") as info:
        ckpt.load(str(path), what="--resume")
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("make", ["truncated", "random bytes", "empty", "text", "zip without data", "directory",
                                  "missing"])
def test_unreadable_files_are_one_line(tmp_path, make):
    path = tmp_path / "bad.pt"
    if make == "truncated":
        torch.save(_student_checkpoint(), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif make == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif make == "empty":
        path.write_bytes(b"")
    elif make == "text":
        path.write_text("model: none\n")
    elif make == "zip without data":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/readme.txt", "not a checkpoint")
    elif make == "directory":
        path.mkdir()
    with pytest.raises(ckpt.CheckpointError, match=r"^--teacher-weights .*bad\.pt: ") as info:
        ckpt.load(str(path), what="--teacher-weights")
    assert "\n" not in str(info.value)


def test_a_whole_checkpoint_loads_and_is_checked(tmp_path):
    path = str(tmp_path / "last.pt")
    ckpt.save_atomic(_student_checkpoint(rng=ckpt.rng_state()), path)
    state = ckpt.check_training_checkpoint(ckpt.load(path), path, what="--resume", role="student",
                                           arch="digits_snn")
    assert state["role"] == "student" and state["version"] == ckpt.VERSION
    with pytest.raises(ckpt.CheckpointError, match="holds a student .* but a teacher is needed"):
        ckpt.check_training_checkpoint(state, path, what="--resume", role="teacher")
    with pytest.raises(ckpt.CheckpointError, match="holds the architecture 'digits_snn', but 'spiking_resnet18'"):
        ckpt.check_training_checkpoint(state, path, what="--resume", arch="spiking_resnet18")
    old = {k: v for k, v in state.items() if k not in ("format", "version")}
    with pytest.raises(ckpt.CheckpointError, match="not a fastsnn.train checkpoint"):
        ckpt.check_training_checkpoint(old, path, what="--resume")
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        ckpt.check_training_checkpoint({**state, "version": 99}, path, what="--resume")
    with pytest.raises(ckpt.CheckpointError, match="missing model"):
        ckpt.check_training_checkpoint({k: v for k, v in state.items() if k != "model"}, path, what="--resume")


def test_model_files_check_role_and_accept_plain_state_dicts(tmp_path):
    student = str(tmp_path / "student.pt")
    torch.save(_student_checkpoint(), student)
    with pytest.raises(ckpt.CheckpointError, match="student.pt: holds a student .* a teacher is needed"):
        ckpt.load_model_file(student, what="--teacher-weights", role="teacher", arch="digits_ann")
    teacher = str(tmp_path / "teacher.pt")
    torch.save(_student_checkpoint(arch="digits_ann", role="teacher"), teacher)
    state, header = ckpt.load_model_file(teacher, what="--teacher-weights", role="teacher", arch="digits_ann")
    assert header["arch"] == "digits_ann" and "fc.weight" in state
    with pytest.raises(ckpt.CheckpointError, match="architecture 'digits_ann', but 'resnet18'"):
        ckpt.load_model_file(teacher, what="--teacher-weights", role="teacher", arch="resnet18")
    plain = str(tmp_path / "plain.pt")
    weights = models.create("digits_ann", 10).state_dict()
    for obj in (weights, {"state_dict": weights}):
        torch.save(obj, plain)
        state, header = ckpt.load_model_file(plain, what="--teacher-weights", role="teacher", arch="digits_ann")
        assert header == {} and state.keys() == weights.keys()
    for junk in ({}, [torch.zeros(2)], {"fc.weight": 3}, torch.zeros(3)):
        torch.save(junk, plain)
        with pytest.raises(ckpt.CheckpointError, match="holds no model weights"):
            ckpt.load_model_file(plain, what="--teacher-weights", role="teacher", arch="digits_ann")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.normal()  # a cached Gaussian in NumPy's state
    path = str(tmp_path / "rng.pt")
    ckpt.save_atomic({"rng": ckpt.rng_state()}, path)
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(ckpt.load(path)["rng"])
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    ckpt.save_atomic({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


def test_role_must_be_known():
    with pytest.raises(ValueError, match="role must be one of"):
        ckpt.describe(role="pupil", arch="digits_snn")
