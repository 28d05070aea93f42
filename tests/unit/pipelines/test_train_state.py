"""Training checkpoints: pruning, completeness, exact resume, and the errors for a changed config or a
damaged file."""
import os
import random
import shutil

import numpy as np
import pytest
import torch

from pipelines.train.optim import OptimConfig, build_optimizer, build_scheduler
from pipelines.train.state import (CheckpointError, CheckpointMismatch, CorruptCheckpoint, capture_rng_state,
                                   checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint,
                                   restore_rng_state, save_checkpoint)
from tiny_models import make_batch, tiny_stage1

CFG = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_start_lr=1e-4, warmup_steps=2, total_steps=10)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are fastest (and bitwise reproducible) on one thread on a shared box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(seed: int = 0):
    model = tiny_stage1(dropout=0.1, seed=seed).train()
    optimizer = build_optimizer(model, CFG)
    return model, optimizer, build_scheduler(optimizer, CFG)


def _train(model, optimizer, scheduler, batches):
    for image, ids, mask in batches:
        optimizer.zero_grad(set_to_none=True)
        model(image, ids, mask).loss.backward()
        optimizer.step()
        scheduler.step()


def _save(tmp_path, step, parts, keep=3, config_hash="hash-a"):
    state = {"config_hash": config_hash, "samples_seen": 4 * step, "seed": 0, "loader": [{"shard": 1, "row": step}],
             "rng": [capture_rng_state()]}
    return save_checkpoint(tmp_path, step, *parts, state=state, keep=keep)


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_keep_prunes_older_checkpoints(tmp_path):
    parts = _setup()
    for step in range(1, 6):
        path = _save(tmp_path, step, parts, keep=2)
        assert path == checkpoint_path(tmp_path, step) and path.endswith(f"checkpoints/step-{step:08d}")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000004", "step-00000005"]
    files = sorted(os.listdir(tmp_path / "checkpoints" / "step-00000005"))
    assert files == ["config.json", "model.safetensors", "optimizer.pt", "rng.pt", "scheduler.pt", "state.json"]
    _save(tmp_path, 3, parts, keep=2)  # a run that resumed from an earlier step supersedes the later ones
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]


def test_leftover_temp_and_half_written_dirs_are_ignored(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    _save(tmp_path, 2, _setup())
    root = tmp_path / "checkpoints"
    shutil.copytree(root / "step-00000002", root / ".step-00000003.tmp-999999-deadbeef")  # interrupted write
    (root / "step-00000004").mkdir()
    shutil.copy(root / "step-00000002" / "model.safetensors", root / "step-00000004")  # half a checkpoint
    (root / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == (2, str(root / "step-00000002"))
    with pytest.raises(CorruptCheckpoint, match="step-00000004/config.json: missing"):
        load_checkpoint(root / "step-00000004", *_setup(), config_hash="hash-a")
    _save(tmp_path, 5, _setup())  # the next save clears another process's temp dir
    assert not (root / ".step-00000003.tmp-999999-deadbeef").exists()


def test_resume_equals_uninterrupted_training(tmp_path):
    batches = [make_batch(4, seed=s) for s in range(6)]
    torch.manual_seed(7)
    model, optimizer, scheduler = parts = _setup()
    _train(*parts, batches[:3])
    path = _save(tmp_path, 3, parts)
    _train(*parts, batches[3:])
    want_weights, want_optim = _trainable(model), optimizer.state_dict()

    def resumed(restore: bool):
        fresh = _setup()  # the same frozen encoder (rebuilt from the config in a real run) ...
        with torch.no_grad():
            for p in fresh[0].parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))  # ... and other trainable weights: the checkpoint must overwrite them
        torch.manual_seed(1234)  # a fresh process's RNG
        state = load_checkpoint(path, *fresh, config_hash="hash-a")
        assert state["step"] == 3 and state["samples_seen"] == 12 and state["loader"] == [{"shard": 1, "row": 3}]
        assert fresh[2].last_epoch == 3
        if restore:
            restore_rng_state(state["rng"][0])
        _train(*fresh, batches[3:])
        return fresh

    model_b, optimizer_b, scheduler_b = resumed(restore=True)
    for name, value in _trainable(model_b).items():
        torch.testing.assert_close(value, want_weights[name], rtol=0, atol=0, msg=name)
    got_optim = optimizer_b.state_dict()
    assert got_optim["param_groups"] == want_optim["param_groups"]  # lr, names, step counts
    for index, entry in want_optim["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(got_optim["state"][index][key], value, rtol=0, atol=0)
    assert scheduler_b.get_last_lr() == scheduler.get_last_lr()
    model_c = resumed(restore=False)[0]  # dropout and negative sampling depend on the restored RNG
    assert any(not torch.equal(v, want_weights[n]) for n, v in _trainable(model_c).items())


def test_rng_state_round_trip():
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    restore_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_changed_config_hash_is_a_mismatch(tmp_path):
    path = _save(tmp_path, 1, _setup())
    with pytest.raises(CheckpointMismatch) as error:
        load_checkpoint(path, *_setup(), config_hash="hash-b")
    message = str(error.value)
    assert "hash-a" in message and "hash-b" in message and str(path) in message and "new output" in message
    assert isinstance(error.value, CheckpointError) and isinstance(error.value, RuntimeError)


def test_truncated_weights_are_named_and_nothing_is_loaded(tmp_path):
    path = _save(tmp_path, 1, _setup(seed=0))
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as handle:
        handle.truncate(os.path.getsize(weights) // 2)
    model, optimizer, scheduler = _setup(seed=1)
    before = _trainable(model)
    with pytest.raises(CorruptCheckpoint, match="model.safetensors"):
        load_checkpoint(path, model, optimizer, scheduler, config_hash="hash-a")
    assert all(torch.equal(v, before[n]) for n, v in _trainable(model).items())


def test_truncated_optimizer_state_is_named(tmp_path):
    path = _save(tmp_path, 1, _setup())
    optim_file = os.path.join(path, "optimizer.pt")
    with open(optim_file, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(CorruptCheckpoint, match="optimizer.pt"):
        load_checkpoint(path, *_setup(), config_hash="hash-a")


class _Payload:
    """Unpickling this runs code (makes a directory): weights_only=True must refuse it."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_optimizer_state_is_loaded_with_weights_only(tmp_path):
    parts = _setup()
    path = _save(tmp_path / "run", 1, parts)
    target = str(tmp_path / "code-ran")
    state = parts[1].state_dict()
    state["payload"] = _Payload(target)
    torch.save(state, os.path.join(path, "optimizer.pt"))
    with pytest.raises(CorruptCheckpoint, match="optimizer.pt.*weights_only=True"):
        load_checkpoint(path, *_setup(), config_hash="hash-a")
    assert not os.path.exists(target)


def test_optimizer_for_other_parameters_is_a_mismatch(tmp_path):
    path = _save(tmp_path, 1, _setup())
    model, _, _ = _setup()
    model.query_tokens.requires_grad_(False)  # another set of trainable parameters
    optimizer = build_optimizer(model, CFG)
    with pytest.raises(CheckpointMismatch, match="query_tokens"):
        load_checkpoint(path, model, optimizer, build_scheduler(optimizer, CFG), config_hash="hash-a")


def test_state_must_be_json_and_carry_the_config_hash(tmp_path):
    parts = _setup()
    with pytest.raises(ValueError, match="config_hash"):
        save_checkpoint(tmp_path, 1, *parts, state={"samples_seen": 0})
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, *parts, state={"config_hash": "h", "x": torch.ones(1)})
    assert latest_checkpoint(tmp_path) is None
