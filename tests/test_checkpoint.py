import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import mamlab.checkpoint as ckpt_mod
from mamlab.checkpoint import (
    Checkpoint,
    CheckpointError,
    capture_rng_states,
    check_model_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    restore_rng_states,
    save_checkpoint,
    save_model,
)
from mamlab.errors import MamlabError


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    x = torch.randn(16, 3, generator=gen)
    y = x.sum(1, keepdim=True)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()  # dropout draws from the global RNG
    opt.step()


def save(run_dir, model, it=1, **kw):
    return save_checkpoint(run_dir, model_state=model.state_dict(), iteration=it, **kw)


def test_adam_resume_is_bitwise_identical(tmp_path):
    n, k = 8, 3
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    for i in range(n):
        if i == k:
            save_checkpoint(
                tmp_path,
                model_state=model.state_dict(),
                optimizer_state=opt.state_dict(),
                rng_states=capture_rng_states({"tasks": gen}),
                iteration=k,
                config={"lr": 1e-2},
                metrics=[{"iteration": 0, "loss": 1.0}],
            )
        train_step(model, opt, gen)
    reference = {name: p.detach().clone() for name, p in model.named_parameters()}

    torch.manual_seed(99)  # scramble the global RNG: the checkpoint must restore it
    fresh = make_model(5)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_gen = torch.Generator().manual_seed(123)
    ck = load_checkpoint(tmp_path)
    assert ck.iteration == k and ck.config == {"lr": 1e-2} and ck.metrics == [{"iteration": 0, "loss": 1.0}]
    ck.restore(fresh, fresh_opt)
    restore_rng_states(ck.rng_states, {"tasks": fresh_gen})
    for _ in range(k, n):
        train_step(fresh, fresh_opt, fresh_gen)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, reference[name]), name


def test_optimizer_state_round_trips_exactly(tmp_path):
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(3e-3), betas=(0.8, 0.99))
    train_step(model, opt, torch.Generator().manual_seed(0))
    save(tmp_path, model, optimizer_state=opt.state_dict())
    loaded = load_checkpoint(tmp_path).optimizer_state
    original = opt.state_dict()
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.99)  # tuples survive JSON
    assert torch.equal(loaded["param_groups"][0]["lr"], original["param_groups"][0]["lr"])
    assert set(loaded["state"]) == set(original["state"])  # integer param ids survive JSON
    for pid, s in original["state"].items():
        for key, v in s.items():
            assert torch.equal(loaded["state"][pid][key], v) and loaded["state"][pid][key].dtype == v.dtype


def test_rng_states_round_trip_bitwise(tmp_path):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(8)
    torch.rand(3), torch.rand(3, generator=gen)
    save(tmp_path, make_model(0), rng_states=capture_rng_states({"g": gen}))
    expected_global, expected_gen = torch.rand(5), torch.rand(5, generator=gen)
    torch.manual_seed(0)
    other = torch.Generator().manual_seed(0)
    restore_rng_states(load_checkpoint(tmp_path).rng_states, {"g": other})
    assert torch.equal(torch.rand(5), expected_global)
    assert torch.equal(torch.rand(5, generator=other), expected_gen)
    with pytest.raises(CheckpointError, match="'missing'"):
        restore_rng_states(load_checkpoint(tmp_path).rng_states, {"missing": torch.Generator()})


def test_model_state_and_extra_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 2))  # non-trivial running stats and an int64 counter
    extra = {"note": "hi", "pair": (1, 2.5), "t": torch.arange(3), "nested": {"x": [torch.ones(2), None]}}
    save(tmp_path, model, it=12, extra=extra)
    ck = load_checkpoint(tmp_path)
    assert isinstance(ck, Checkpoint) and ck.format_version == ckpt_mod.FORMAT_VERSION
    assert ck.torch_version == torch.__version__
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model_state[k], v) and ck.model_state[k].dtype == v.dtype
    assert ck.extra["note"] == "hi" and ck.extra["pair"] == (1, 2.5)
    assert torch.equal(ck.extra["t"], torch.arange(3))
    assert torch.equal(ck.extra["nested"]["x"][0], torch.ones(2)) and ck.extra["nested"]["x"][1] is None


def test_tied_and_noncontiguous_tensors_save(tmp_path):
    w = torch.randn(4, 3)
    state = {"a": w, "b": w, "c": w.t()}
    save_checkpoint(tmp_path, model_state=state, iteration=0)
    loaded = load_checkpoint(tmp_path).model_state
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_layout_latest_and_listing(tmp_path):
    model = make_model(0)
    paths = [save(tmp_path, model, it) for it in (0, 500, 1000, 1_000_000)]
    assert paths[1] == tmp_path / "checkpoints" / "iter_000500"
    assert sorted(p.name for p in paths[1].iterdir()) == ["SHA256SUMS", "state.json", "weights.safetensors"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_1000000"
    assert list_checkpoints(tmp_path) == paths  # numeric order, all kept by default
    # at most 2 or 3, evenly spaced: the first and the last always, then the middle by index
    assert list_checkpoints(tmp_path, most=2) == [paths[0], paths[-1]]
    assert list_checkpoints(tmp_path, most=3) == [paths[0], paths[2], paths[-1]]
    assert list_checkpoints(tmp_path, most=4) == paths
    with pytest.raises(MamlabError, match="most must be an integer >= 2"):
        list_checkpoints(tmp_path, most=1)
    assert latest_checkpoint(tmp_path) == paths[-1]
    # load_checkpoint accepts a run dir, a checkpoint dir, or a file in one
    assert load_checkpoint(tmp_path).iteration == 1_000_000
    assert load_checkpoint(paths[1]).iteration == 500
    assert load_checkpoint(paths[2] / "state.json").iteration == 1000
    assert list_checkpoints(tmp_path / "nothing") == [] and latest_checkpoint(tmp_path / "nothing") is None


def test_keep_last_prunes_oldest(tmp_path):
    model = make_model(0)
    for it in range(5):
        save(tmp_path, model, it, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000003", "iter_000004"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(CheckpointError, match="keep_last"):
        save(tmp_path, model, 9, keep_last=0)


def test_resaving_an_iteration_replaces_it(tmp_path):
    save(tmp_path, make_model(0), 3, metrics={"v": 1})
    save(tmp_path, make_model(1), 3, metrics={"v": 2})
    assert load_checkpoint(tmp_path).metrics == {"v": 2}
    assert len(list_checkpoints(tmp_path)) == 1


def test_latest_falls_back_when_pointer_is_stale(tmp_path):
    model = make_model(0)
    save(tmp_path, model, 1)
    save(tmp_path, model, 2)
    (tmp_path / "checkpoints" / "latest").write_text("iter_000099\n")
    assert latest_checkpoint(tmp_path).name == "iter_000002"
    (tmp_path / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "iter_000002"


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_failed_write_keeps_previous_latest(tmp_path, monkeypatch, fail_on_call):
    model = make_model(0)
    save(tmp_path, model, 1, metrics={"v": 1})
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_on_call:  # 1: moving the checkpoint dir into place, 2: the latest pointer
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="iter_000002.*No space left"):
        save(tmp_path, make_model(1), 2, metrics={"v": 2})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "iter_000001"
    assert load_checkpoint(tmp_path).metrics == {"v": 1}
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []


def test_failure_while_writing_weights_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    model = make_model(0)
    save(tmp_path, model, 1)

    def half_write(path, data):
        path.write_bytes(data[: len(data) // 2])
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ckpt_mod, "_write_fsynced", half_write)
    with pytest.raises(CheckpointError, match="Input/output error"):
        save(tmp_path, model, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000001", "latest"]
    assert load_checkpoint(tmp_path).iteration == 1


def test_sigkill_mid_write_keeps_latest_loadable(tmp_path):
    # A real crash: the child process kills itself while fsyncing checkpoint 2's files.
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        import mamlab.checkpoint as c
        state = {{"w": torch.ones(3)}}
        c.save_checkpoint({str(tmp_path)!r}, model_state=state, iteration=1)
        real = os.fsync
        def die(fd):
            os.kill(os.getpid(), signal.SIGKILL)
        os.fsync = die
        c.save_checkpoint({str(tmp_path)!r}, model_state={{"w": torch.zeros(3)}}, iteration=2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert latest_checkpoint(tmp_path).name == "iter_000001"
    assert torch.equal(load_checkpoint(tmp_path).model_state["w"], torch.ones(3))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000001"]
    # the crashed writer's temp dir is swept by the next save
    assert any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    save_checkpoint(tmp_path, model_state={"w": torch.zeros(3)}, iteration=2)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_truncated_weights_is_a_clear_error(tmp_path):
    path = save(tmp_path, make_model(0))
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"weights\.safetensors.*truncated") as e:
        load_checkpoint(tmp_path)
    assert "\n" not in str(e.value) and isinstance(e.value, MamlabError)


def test_flipped_byte_in_weights_is_detected(tmp_path):
    path = save(tmp_path, make_model(0))
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_corrupted_json_is_a_clear_error(tmp_path):
    path = save(tmp_path, make_model(0))
    state = path / "state.json"
    state.write_text(state.read_text()[:50])
    with pytest.raises(CheckpointError, match=r"state\.json.*not valid JSON") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_wrong_format_version_is_a_clear_error(tmp_path):
    path = save(tmp_path, make_model(0))
    state = json.loads((path / "state.json").read_text())
    state["format_version"] = 999
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"state\.json.*format version 999"):
        load_checkpoint(path)


def test_missing_field_or_file_is_a_clear_error(tmp_path):
    path = save(tmp_path, make_model(0))
    state = json.loads((path / "state.json").read_text())
    del state["model_keys"]
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="'model_keys'"):
        load_checkpoint(path)
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state\.json: missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path)  # no complete checkpoint left in the run
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "nope")


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    save(tmp_path, nn.Sequential(nn.Linear(2, 40), nn.Linear(40, 1)))
    ck = load_checkpoint(tmp_path)
    wrong = nn.Sequential(nn.Linear(3, 40), nn.Linear(40, 1))
    with pytest.raises(
        CheckpointError,
        match=r"iter_000001: tensor '0\.weight' has shape \(40, 2\), the model expects \(40, 3\)",
    ):
        ck.restore(wrong)
    with pytest.raises(CheckpointError, match=r"missing tensor '2\.weight'"):
        check_model_state(nn.Sequential(nn.Linear(2, 40), nn.Linear(40, 1), nn.Linear(1, 1)), ck)
    with pytest.raises(CheckpointError, match=r"unexpected tensor '1\.bias'"):
        check_model_state(nn.Sequential(nn.Linear(2, 40), nn.Linear(40, 1, bias=False)), ck)
    with pytest.raises(CheckpointError, match="dtype"):
        check_model_state(nn.Sequential(nn.Linear(2, 40), nn.Linear(40, 1)).double(), ck)
    check_model_state(nn.Sequential(nn.Linear(2, 40), nn.Linear(40, 1)), ck)  # a matching model passes


def test_restore_optimizer_without_state_is_an_error(tmp_path):
    model = make_model(0)
    save(tmp_path, model)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path).restore(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_unsaveable_values_are_clear_errors(tmp_path):
    model = make_model(0)
    with pytest.raises(CheckpointError, match="not JSON"):
        save(tmp_path, model, config={"f": object()})
    with pytest.raises(CheckpointError, match="cannot save a object"):
        save(tmp_path, model, extra={"f": object()})
    with pytest.raises(CheckpointError, match="iteration"):
        save(tmp_path, model, -1)
    assert list_checkpoints(tmp_path) == []


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = make_model(0)
    opt = torch.optim.Adam(model.parameters())
    save(tmp_path, model, optimizer_state=opt.state_dict(), rng_states=capture_rng_states())
    save_model(tmp_path / "model.safetensors", model.state_dict())

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    load_checkpoint(tmp_path)
    load_model(tmp_path / "model.safetensors")


def test_save_and_load_model(tmp_path):
    model = make_model(0)
    path = save_model(tmp_path / "sub" / "model.safetensors", model.state_dict())
    loaded = load_model(path)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    check_model_state(model, loaded, source=path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "missing.safetensors")


def test_every_file_of_a_checkpoint_is_checked_and_the_newest_intact_one_named(tmp_path):
    """Editing the iteration in state.json (or the checksums) is caught; the message names what to resume."""
    model = make_model(0)
    for it in (0, 10, 20):
        save(tmp_path, model, it)
    state = tmp_path / "checkpoints" / "iter_000020" / "state.json"
    state.write_text(state.read_text().replace('"iteration": 20', '"iteration": 30'))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    message = str(e.value)
    assert "iter_000020/state.json: contents do not match SHA256SUMS (edited or corrupted)" in message
    assert "the newest intact checkpoint is iter_000010: move iter_000020 out of" in message
    assert "\n" not in message
    with pytest.raises(CheckpointError, match="contents do not match SHA256SUMS"):
        load_checkpoint(tmp_path / "checkpoints" / "iter_000020")  # asked for by name: no suggestion
    (tmp_path / "checkpoints" / "iter_000010" / "SHA256SUMS").unlink()
    with pytest.raises(CheckpointError, match="the newest intact checkpoint is iter_000000"):
        load_checkpoint(tmp_path)
    # moved away as the message says, the run continues from the newest intact one
    (tmp_path / "checkpoints" / "iter_000020").rename(tmp_path / "damaged-20")
    (tmp_path / "checkpoints" / "iter_000010").rename(tmp_path / "damaged-10")
    assert load_checkpoint(tmp_path).iteration == 0
