"""Bad input gives one clear error, and nothing is silently wrong (issue 15, section 3)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import prunelab
from prunelab.bench import ResultStore, SweepSpec, run_sweep
from prunelab.bench.store import Claimant
from prunelab.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from prunelab.cli import main
from prunelab.config import validate
from prunelab.errors import (
    CheckpointError,
    ConfigError,
    DiskFullError,
    PrunelabError,
    TrainingDivergedError,
)
from prunelab.training import TrainRecipe, train

SRC = Path(__file__).resolve().parents[1] / "src"


def cli_error(capsys, args: list[str], status: int = 2) -> str:
    """Run the CLI in-process; it must exit ``status`` with one error line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


def tiny_spec(**grid) -> dict:
    return {
        "name": "tiny",
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "schedule": "cosine"},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "latency": {"enabled": False},
        "grid": {"methods": ["magnitude"], "targets": {"sparsity": [0.5]}, "seeds": [0],
                 "controls": False} | grid,
    }


# -- user text is printed as it is, not as rich markup ----------------------------------------

def test_user_text_is_not_markup(tmp_path, capsys) -> None:
    line = cli_error(capsys, ["run", "--model", "[/x]"])
    assert "unknown model '[/x]'" in line
    assert "got nan" in cli_error(capsys, ["run", "--sparsity", "nan"])
    err = capsys.readouterr().err
    assert "(got )" not in err


def test_malformed_yaml_names_the_line(tmp_path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: lenet-5\ngrid: {methods: [magnitude], targets: [\ntrain:\n  lr: 1\n")
    line = cli_error(capsys, ["run", "--config", str(config)])
    assert "bad.yaml' is not valid YAML: line 4, column 5" in line
    assert "starts on line 2" in line and line.endswith("'lr: 1'")  # the offending line itself


# -- results stores --------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["results", "report"])
def test_a_store_that_is_not_a_database(tmp_path, capsys, command) -> None:
    (tmp_path / "results.sqlite").write_text("not a database\n" * 10)
    line = cli_error(capsys, [command, str(tmp_path)])
    assert "is not a prunelab results store" in line


def _without_root_powers() -> list[str]:
    """A command prefix under which file permissions apply (root ignores them otherwise)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be simulated")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_a_read_only_results_folder_can_be_read_and_reported(tmp_path) -> None:
    folder = tmp_path / "results"
    run_sweep(validate(SweepSpec, tiny_spec()), folder, quiet=True)
    elsewhere = tmp_path / "report"
    elsewhere.mkdir()
    before = sorted(p.name for p in folder.iterdir())
    env = os.environ | {"PYTHONPATH": str(SRC)}
    prefix = [*_without_root_powers(), sys.executable, "-m", "prunelab.cli"]
    folder.chmod(0o555)
    try:
        shown = subprocess.run([*prefix, "results", str(folder)], capture_output=True,
                               text=True, env=env, timeout=120)
        report = subprocess.run([*prefix, "report", str(folder), "--out", str(elsewhere)],
                                capture_output=True, text=True, env=env, timeout=120)
        refused = subprocess.run([*prefix, "report", str(folder)], capture_output=True,
                                 text=True, env=env, timeout=120)
    finally:
        folder.chmod(0o755)
    assert shown.returncode == 0, shown.stderr
    assert "2 runs in" in shown.stdout and "magnitude/global" in shown.stdout
    assert report.returncode == 0, report.stderr
    assert (elsewhere / "index.html").is_file()
    assert refused.returncode == 2 and "choose another folder with --out" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in folder.iterdir()) == before


# -- checkpoints -----------------------------------------------------------------------------

def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def test_a_checkpoint_missing_its_parts_is_refused(tmp_path, capsys) -> None:
    path = tmp_path / "incomplete.pt"
    torch.save({"format": "prunelab-checkpoint", "version": 1, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"incomplete.*no model, extra"):
        read_checkpoint(path)
    torch.save({"format": "prunelab-checkpoint", "version": 1, "model": {}, "extra": {},
                "state_dict": [1, 2]}, path)
    with pytest.raises(CheckpointError, match="state_dict has the wrong type"):
        read_checkpoint(path)
    assert "incomplete.pt" in cli_error(capsys, ["inspect", str(path)])


def test_a_corrupted_checkpoint_is_refused(tmp_path, capsys) -> None:
    model = small_model()
    prunelab.prune(model, "magnitude", 0.5)
    path = save_checkpoint(tmp_path / "m.pt", model)
    data = bytearray(path.read_bytes())
    weights = model[0].parametrizations.weight.original.detach().numpy().tobytes()
    at = bytes(data).find(weights[:64])  # somewhere in the first layer's stored weights
    assert at > 0
    data[at + 5] ^= 0x40  # one bit: a different, still finite float
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad, small_model())
    assert "is corrupt" in cli_error(capsys, ["inspect", str(bad)])
    loaded, _ = load_checkpoint(path, small_model())  # the intact file loads
    assert torch.equal(loaded[0].weight, model[0].weight)


def test_a_checkpoint_without_a_checksum_still_loads(tmp_path) -> None:
    model = small_model()
    path = save_checkpoint(tmp_path / "m.pt", model)
    payload = torch.load(path, weights_only=True)
    del payload["sha256"]  # as written before checksums existed
    torch.save(payload, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt", small_model())
    assert torch.equal(loaded[2].weight, model[2].weight)


def test_checkpoints_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "m.pt", small_model())
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        path = save_checkpoint(tmp_path / "private.pt", small_model())
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "private.pt"]  # no temp files


# -- NaN losses ------------------------------------------------------------------------------

def blobs_with_a_nan_batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=generator) * 3
    y = torch.randint(0, 3, (128,), generator=generator)
    x = centers[y] + torch.randn(128, 10, generator=generator)
    x[64:96] = float("nan")  # the third batch of four
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))


def test_a_nan_loss_stops_training_naming_where() -> None:
    model = bn_model()
    with pytest.raises(TrainingDivergedError,
                       match=r"loss became nan at epoch 1/3, step 3/4.*lower the learning rate"):
        train(model, blobs_with_a_nan_batch(), TrainRecipe(epochs=3, lr=0.05), quiet=True)
    with pytest.raises(TrainingDivergedError, match="loss became"):  # divergence, not bad data
        train(bn_model(), blobs_with_a_nan_batch()[:2], TrainRecipe(epochs=50, lr=1e12),
              quiet=True)


def test_non_finite_batches_can_be_skipped() -> None:
    model = bn_model()
    recipe = TrainRecipe(epochs=3, lr=0.05, on_nonfinite="skip")
    result = train(model, blobs_with_a_nan_batch(), recipe, quiet=True)
    assert [h["skipped_batches"] for h in result.history] == [1, 1, 1]
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())  # BN stats too
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert "on_nonfinite" not in TrainRecipe().model_dump()  # the default keeps config hashes


# -- sweeps ----------------------------------------------------------------------------------

def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_sweep_whose_runs_all_failed_on_bad_input_exits_2(tmp_path, capsys) -> None:
    spec = tiny_spec(methods=["magnitude", "random"]) | {"dataset": "mnist",
                                                         "data_dir": str(tmp_path / "none")}
    line = cli_error(capsys, ["sweep", str(write_spec(tmp_path, spec)), "-q",
                              "--out", str(tmp_path / "out")])
    assert line.startswith("error: 2 of 2 runs failed: not run: its dense model failed: dataset")
    assert "(2 runs)" in line and "prunelab results" in line
    with ResultStore(tmp_path / "out" / "results.sqlite") as store:
        failed = store.rows(status="failed")
    assert len(failed) == 3  # the dense model and both runs, each with its error


def test_a_sweep_with_an_unreachable_target_exits_2(tmp_path, capsys) -> None:
    spec = tiny_spec(targets={"compression": [1000.0]})
    line = cli_error(capsys, ["sweep", str(write_spec(tmp_path, spec)), "-q",
                              "--out", str(tmp_path / "out")])
    assert "1 of 1 runs failed" in line and "out of reach" in line


def test_a_full_disk_stops_the_sweep_at_once(tmp_path, monkeypatch, capsys) -> None:
    calls = []

    def full(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    spec = tiny_spec(seeds=[0, 1], targets={"sparsity": [0.5, 0.9]})
    with pytest.raises(DiskFullError, match="no space left on device"):
        run_sweep(validate(SweepSpec, spec), tmp_path / "a", quiet=True)
    assert len(calls) == 1  # the first dense model: nothing else was tried
    line = cli_error(capsys, ["sweep", str(write_spec(tmp_path, spec)), "-q",
                              "--out", str(tmp_path / "b")])
    assert "no space left on device" in line and "run the same command again" in line
    assert len(calls) == 2
    assert not list((tmp_path / "b" / "dense").glob("*.pt*"))  # no half-written file


def test_a_sweep_name_is_claimed_atomically(tmp_path) -> None:
    path = tmp_path / "results.sqlite"
    ResultStore(path).close()
    barrier = threading.Barrier(6)
    won: list[int] = []

    def claim(i: int) -> None:
        with ResultStore(path) as store:
            barrier.wait()
            if store.claim_sweep_name("tiny", {"experiment": i}):
                won.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    with ResultStore(path) as store:
        assert store.claim_sweep_name("tiny", {"experiment": won[0]})  # the same one again


def test_claims_of_live_dead_and_lapsed_sweeps(tmp_path) -> None:
    me, other = Claimant(), Claimant()
    with ResultStore(tmp_path / "r.sqlite") as store:
        assert store.claim("a", me) and store.claim("a", me)  # one's own claim holds
        assert not store.claim("a", other)  # held by a live process (this one)
        store.release("a", me)
        assert store.claim("a", other)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        killed = Claimant(pid=int(dead.stdout))  # a sweep killed on this host
        assert store.claim("b", killed) and store.claim("b", me)
        far = Claimant(host="another-machine", pid=1)  # no pid check across hosts: the lease
        assert store.claim("c", far) and not store.claim("c", me)
        store._db.execute("UPDATE claims SET expires = 0 WHERE run_key = 'c'")
        assert store.claim("c", me)
        store.put({"run_key": "d", "status": "ok"})
        assert not store.claim("d", me)  # finished runs are not claimed


# -- leftovers -------------------------------------------------------------------------------

def test_a_failed_run_leaves_no_empty_results_folder(tmp_path, capsys) -> None:
    out = tmp_path / "runs"
    cli_error(capsys, ["run", "--dataset", "mnist", "--data-dir", str(tmp_path / "none"),
                       "--out", str(out)])
    assert not out.exists()


def test_the_run_hash_does_not_depend_on_where_results_go(tmp_path) -> None:
    from prunelab.job import RunConfig, run_hash

    a = validate(RunConfig, {"out": str(tmp_path / "a")})
    b = validate(RunConfig, {"out": str(tmp_path / "b"), "data_dir": str(tmp_path)})
    assert run_hash(a) == run_hash(b)
    assert run_hash(a) != run_hash(validate(RunConfig, {"seed": 1}))


# -- the Python API --------------------------------------------------------------------------

def test_config_objects_raise_prunelab_errors() -> None:
    with pytest.raises(ConfigError, match="epochs: Input should be greater than or equal to 0"):
        TrainRecipe(epochs=-1)
    with pytest.raises(ConfigError, match=r"unknown key 'epoch'.*Did you mean 'epochs'"):
        TrainRecipe(epoch=3)


def test_prune_measure_evaluate_name_the_expected_input() -> None:
    model = prunelab.models.create("resnet20")
    with pytest.raises(PrunelabError, match=r"needs a torch.nn.Module.*NoneType"):
        prunelab.prune(None, "magnitude", 0.5)
    with pytest.raises(PrunelabError, match=r"shape \(batch, 3, 32, 32\), got \(1, 3, 32\)"):
        prunelab.measure(model, torch.zeros(1, 3, 32))
    with pytest.raises(PrunelabError, match=r"add the batch dimension"):
        prunelab.measure(model, torch.zeros(3, 32, 32))
    gray = [(torch.zeros(4, 1, 32, 32), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(PrunelabError, match=r"\(batch, 3, 32, 32\), got \(4, 1, 32, 32\)"):
        prunelab.evaluate(model, gray)
    with pytest.raises(PrunelabError, match=r"\(batch, 3, 32, 32\), got \(4, 1, 32, 32\)"):
        prunelab.prune(model, "taylor", 0.5, data=gray)
    lenet = prunelab.models.create("lenet-300-100")  # built for 1x28x28: 8x8 cannot work
    small = [(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(PrunelabError, match=r"shape \(4, 1, 8, 8\); it takes \(batch, 1, 28, 28\)"):
        prunelab.evaluate(lenet, small)
    plain = nn.Sequential(nn.Linear(10, 3))  # not from the zoo: its first layer says
    with pytest.raises(PrunelabError, match="it takes 10 features"):
        prunelab.measure(plain, torch.zeros(1, 5))


# -- compression -----------------------------------------------------------------------------

def test_an_unpruned_model_has_compression_exactly_1() -> None:
    model = prunelab.models.create("resnet20")  # BatchNorm biases start at exactly 0
    x = torch.zeros(1, 3, 32, 32)
    m = prunelab.measure(model, x)
    assert m.compression == 1.0 and m.sparsity == 0.0 and m.nonzero_params == m.params
    prunelab.prune(model, "magnitude", 0.5)
    pruned = prunelab.measure(model, x)
    removed = sum(int((mod.parametrizations.weight[0].mask == 0).sum())
                  for _, mod in prunelab.sparsity.masked_modules(model))
    assert pruned.nonzero_params == m.params - removed
    prunelab.make_permanent(model)  # the zeros baked into plain weights still count
    assert prunelab.measure(model, x).nonzero_params == m.params - removed


# -- option bounds, targets and scopes: refused when the method is created or the sweep planned

@pytest.mark.parametrize(("method", "options", "message"), [
    ("snip", {"batches": 0}, "'batches' must be int >= 1 \\| None, got 0"),
    ("grasp", {"temperature": 0}, "'temperature' must be float > 0"),
    ("obd", {"probes": 0}, "'probes' must be int >= 1"),
    ("synflow", {"rounds": 0}, "'rounds' must be int >= 1"),
    ("synflow", {"rounds": True}, "'rounds' must be int >= 1, got True"),  # not the number 1
    ("synflow", {"nm": "2:4", "rounds": 3}, "set rounds: 1"),
    ("merge", {"calibration_batches": 0}, "'calibration_batches' must be int >= 1"),
    ("autoslim", {"min_width": 0}, "'min_width' must be float > 0 and < 1"),
    ("autoslim", {"step": 0}, "'step' must be float > 0 and < 1"),
    ("autoslim", {"search_batches": -1}, "'search_batches' must be int >= 1"),
    ("slimmable", {"widths": [0, 1.0]}, "'widths' must be list\\[float > 0 and <= 1\\]"),
    ("slimmable", {"sandwich": 1}, "'sandwich' must be int >= 2"),
    ("sss", {"strength": -1.0}, "'strength' must be float >= 0"),
    ("sss", {"momentum": 2.0}, "'momentum' must be float >= 0 and < 1"),
    ("slimming", {"l1": -1.0}, "'l1' must be float >= 0"),
    ("sparse-vd", {"threshold": float("nan")}, "'threshold' must be a finite number"),
    ("sparse-vd", {"threshold": -8.0}, "threshold is a log α in \\(-8, 8\\)"),
    ("magnitude", {"nm": "4:2"}, "0 < N < M"),
])
@pytest.mark.parametrize("build", ["create", "constructor"])
def test_option_values_out_of_bounds_are_refused_at_creation(method, options, message,
                                                             build) -> None:
    """The same rules hold for ``create`` (configs, the CLI) and a class built directly."""
    from prunelab.methods import METHODS

    cls = METHODS.get(method)
    with pytest.raises(PrunelabError, match=message):
        cls.create(**options) if build == "create" else cls(**options)


def _out_of_bounds(hint) -> list:
    """Values just outside each bound of an option's annotated type (none when unbounded)."""
    from typing import Annotated, get_args, get_origin

    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        bounds = [b for info in args[1:] for b in info.metadata]
        return [args[0](getattr(b, name) + outside) for b in bounds
                for name, outside in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0))
                if hasattr(b, name)]
    if origin is list:
        return [[value] for value in _out_of_bounds(args[0])]
    return [value for arg in args for value in _out_of_bounds(arg)]  # X | None


def test_every_methods_bounds_hold_when_it_is_built_directly() -> None:
    """Every bounded option of every registered method, set through the constructor."""
    from prunelab.methods import METHODS
    from prunelab.methods.base import _option_adapters

    checked = 0
    for _, cls in METHODS.items():
        for option, (hint, _) in _option_adapters(cls).items():
            for bad in _out_of_bounds(hint):
                with pytest.raises(PrunelabError, match=f"option {option!r} must be"):
                    cls(**{option: bad})
                checked += 1
    assert checked > 60


def test_options_are_kept_as_their_validated_types() -> None:
    from prunelab.methods.synflow import SynFlow

    method = SynFlow(rounds="3", input_shape=[1, 28, 28])
    assert method.rounds == 3 and method.input_shape == (1, 28, 28)


@pytest.mark.parametrize(("method", "option", "value", "message"), [
    ("sparsegpt", "input_blocks", 0, "'input_blocks' must be int >= 1"),
    ("l2-channel", "round_to", -4, "'round_to' must be int >= 1 \\| None"),
    ("obd", "probes", 0, "'probes' must be int >= 1"),
    ("grasp", "temperature", 0.0, "'temperature' must be float > 0"),
    ("slimmable", "widths", [True, 0.5], "'widths' must be list"),  # a bool is not a width
    ("l1-filter", "round_to", np.True_, "'round_to' must be int"),
    ("l0", "strength", float("nan"), "'strength' must be a finite number, got nan"),
    ("magnitude", "nm", "3:2", "0 < N < M"),
])
def test_options_set_after_construction_are_checked_too(method, option, value, message) -> None:
    from prunelab.methods import METHODS

    built = METHODS.get(method)()
    with pytest.raises(PrunelabError, match=message):
        setattr(built, option, value)


class UsersType:
    """A class of the user's own, as a method option's type."""


def test_options_of_any_type_work_in_a_users_method() -> None:
    """A tensor option, an option of the user's own class, one whose class the method's module
    cannot see: each method can still be built (checked with isinstance where possible)."""
    from dataclasses import dataclass

    from prunelab.methods.base import UnstructuredMethod

    class Local:  # the annotations below are strings: this name cannot be resolved later
        pass

    @dataclass
    class UsersMethod(UnstructuredMethod):
        reference: torch.Tensor | None = None
        helper: UsersType | None = None
        later: Local | None = None  # taken as is

        def scores(self, model, weights, data):
            return [w.weight.abs() for w in weights]

    method = UsersMethod(reference=torch.ones(2), helper=UsersType(), later=Local())
    assert method.reference.shape == (2,) and isinstance(method.later, Local)
    with pytest.raises(PrunelabError, match="option 'helper' must be"):
        UsersMethod(helper=3)
    with pytest.raises(PrunelabError, match="method 'UsersMethod' option 'reference'"):
        UsersMethod(reference="not a tensor")


def test_prunelab_methods_shows_each_options_bounds() -> None:
    from prunelab.methods import METHODS

    table = {name: kind for name, kind, _ in METHODS.get("autoslim").option_table()}
    assert table["min_width"] == "float > 0 and < 1" and table["sandwich"] == "int >= 2"


@pytest.mark.parametrize(("method", "options", "target", "value", "scope", "message"), [
    ("magnitude", {"nm": "2:4"}, "sparsity", 0.9, "global", "pass sparsity=0.5"),
    ("autoslim", {}, "sparsity", 0.5, "global", "takes a target of speedup or latency"),
    ("slimmable", {}, "compression", 2.0, "global", "takes a target of speedup or sparsity"),
    ("l2-channel", {}, "sparsity", 0.5, "erk", "takes scope global or layer, not 'erk'"),
    ("magnitude", {}, "sparsity", 0.5, "rows", "takes scope global, layer, er or erk, not 'rows'"),
    ("sparsegpt", {"nm": "2:4"}, "sparsity", 0.9, "global", "pass sparsity=0.5"),
    ("magnitude", {}, "compression", float("inf"), "global", "ratio >= 1"),
    ("magnitude", {}, "speedup", float("nan"), "global", "ratio >= 1"),
])
def test_requests_a_method_cannot_serve_are_refused(method, options, target, value, scope,
                                                    message) -> None:
    from prunelab.methods import METHODS

    with pytest.raises(PrunelabError, match=message):
        METHODS.get(method).create(**options).check_request(target, value, scope)


def test_a_one_in_three_pattern_takes_the_sparsity_as_printed() -> None:
    layer = nn.Linear(6, 4)
    prunelab.prune(layer, "magnitude", 0.6667, nm="1:3")
    assert ((layer.weight != 0).reshape(4, 2, 3).sum(-1) == 1).all()


@pytest.mark.parametrize(("grid", "message"), [
    ({"targets": {"compression": [float("inf")]}}, "finite ratios >= 1"),
    ({"targets": {"speedup": [float("nan")]}}, "finite ratios >= 1"),
    ({"methods": [{"method": "sparse-vd", "options": {"threshold": float("nan")}}]},
     "must be a finite number"),
    ({"methods": [{"method": "magnitude", "options": {"nm": "2:4"}}],
      "targets": {"sparsity": [0.9]}}, "pass sparsity=0.5"),
    ({"methods": [{"method": "l1-filter", "scope": "erk"}]}, "takes scope global or layer"),
    ({"methods": [{"method": "slimmable", "options": {"sandwich": 1}}]}, "'sandwich' must be"),
    ({"methods": [{"method": "autoslim", "options": {"search_batches": 8}}],  # of 8 calibration
      "targets": {"speedup": [2.0]}}, "raise calibration_batches above search_batches"),
])
def test_sweeps_refuse_what_no_run_could_serve_before_writing_anything(tmp_path, capsys, grid,
                                                                       message) -> None:
    spec = tiny_spec(**grid) | {"dataset": "digits"}
    line = cli_error(capsys, ["sweep", str(write_spec(tmp_path, spec)), "-q",
                              "--out", str(tmp_path / "out")])
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_static_sparse_training_refuses_dynamic_options(tmp_path, capsys) -> None:
    spec = {k: v for k, v in tiny_spec(methods=[{"method": "snip"}]).items() if k != "finetune"} | {
        "dataset": "digits", "schedule": "at-init",
        "recovery": {"kind": "sparse-train", "update": "static", "delta_t": 10}}
    line = cli_error(capsys, ["sweep", str(write_spec(tmp_path, spec)), "-q",
                              "--out", str(tmp_path / "out")])
    assert "delta_t would be ignored" in line


def test_layer_densities_refuses_indices_of_no_layer() -> None:
    from prunelab.sparsity.distributions import layer_densities

    for dense in ([-1], [2]):
        with pytest.raises(PrunelabError, match="dense holds indices of the 2 layers"):
            layer_densities([(10, 10), (5, 10)], 0.5, dense=dense)
    with pytest.raises(PrunelabError, match="no empty weight shape"):
        layer_densities([(0, 10)], 0.5)


def test_training_with_a_plain_dict_for_a_recipe_says_what_to_pass() -> None:
    with pytest.raises(PrunelabError, match="recipe must be a prunelab TrainRecipe"):
        train(nn.Linear(4, 2), [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))],
              {"epochs": 1})


def test_merging_on_one_sample_is_refused_and_on_few_is_warned() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(12, 8)
    with pytest.raises(PrunelabError, match="needs at least 2"):
        prunelab.prune(copy_of(model), "merge", 0.5, data=[(x[:1], None)])
    with pytest.warns(UserWarning, match="rank-deficient"):
        prunelab.prune(copy_of(model), "merge", 0.5, data=[(x, None)])


def copy_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_latency_settings_without_a_latency_target_are_refused() -> None:
    with pytest.raises(PrunelabError, match="would be ignored"):
        prunelab.prune(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), "l1-filter",
                       speedup=1.5, backend="onnxruntime")


def test_labels_beyond_the_models_outputs_are_one_clear_error() -> None:
    with pytest.raises(PrunelabError, match=r"labels must be class indices in \[0, 3\)"):
        train(nn.Linear(4, 3), [(torch.randn(8, 4), torch.full((8,), 5))],
              TrainRecipe(epochs=1), quiet=True)
