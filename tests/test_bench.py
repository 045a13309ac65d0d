"""Sweeps: spec validation, parallel runs, resumability, failures, the store, the report."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import yaml

from prunelab.bench import ResultStore, SweepSpec, run_sweep
from prunelab.bench.stats import summarize
from prunelab.config import load_config, validate
from prunelab.errors import ConfigError, PrunelabError, UnknownNameError
from prunelab.tracking import TrackConfig

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "examples" / "digits-smoke.yaml"


def tiny_spec(**grid) -> dict:
    """A sweep of seconds: digits, few epochs, no latency."""
    return {
        "name": "tiny",
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "schedule": "cosine"},
        "finetune": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "latency": {"enabled": False},
        "grid": {"methods": ["magnitude"], "targets": {"sparsity": [0.5]}, "seeds": [0],
                 "controls": False} | grid,
    }


def sweep_cli(spec: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prunelab.cli", "sweep", str(spec), "--out", str(out), "-q", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def ok_rows(out: Path) -> list[dict]:
    with ResultStore(out / "results.sqlite") as store:
        return store.rows()


def test_spec_errors_name_the_key_before_any_training(tmp_path) -> None:
    bad = tiny_spec()
    bad["grid"]["methds"] = bad["grid"].pop("methods")
    with pytest.raises(ConfigError, match=r"unknown key 'grid\.methds'.*Did you mean 'methods'"):
        validate(SweepSpec, bad)
    with pytest.raises(ConfigError, match=r"grid\.targets\.sparsity"):
        validate(SweepSpec, tiny_spec(targets={"sparsity": [1.5]}))
    with pytest.raises(ConfigError, match="at least one target"):
        validate(SweepSpec, tiny_spec(targets={}))
    with pytest.raises(ConfigError, match=r"grid\.recoveries\.0\.kind"):
        validate(SweepSpec, tiny_spec(recoveries=["scratch-c"]))
    spec = validate(SweepSpec, tiny_spec(methods=["magnitude", "snip-typo"]))
    with pytest.raises(UnknownNameError, match="snip-typo"):
        run_sweep(spec, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "dense").exists()  # failed before training anything


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"grid": {"methods": [{"method": "magnitude", "options": {"bogus": 1}}]}}, "no option"),
     ({"grid": {"recoveries": [{"kind": "rewind", "rewind_epoch": 3}]}}, "below the training"),
     ({"schedule": {"kind": "gradual"}, "grid": {"recoveries": ["rewind"]}}, "cannot be combined"),
     ({"grid": {"methods": ["l1-filter"], "recoveries": ["rewind"]}}, "cannot rewind"),
     ({"schedule": {"kind": "iterative"}, "grid": {"methods": ["l1-filter"]}}, "one-shot")],
)
def test_plans_that_cannot_work_fail_before_training(tmp_path, changes, message) -> None:
    data = tiny_spec()
    data["grid"] |= changes.pop("grid", {})
    spec = validate(SweepSpec, data | changes)
    with pytest.raises(PrunelabError, match=message):
        run_sweep(spec, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "dense").exists()


def test_two_different_methods_need_different_labels() -> None:
    twins = [{"method": "random", "options": {"seed": 1}}, {"method": "random"}]
    with pytest.raises(ConfigError, match="distinct label"):
        validate(SweepSpec, tiny_spec(methods=twins))
    with pytest.raises(ConfigError, match="listed twice"):
        validate(SweepSpec, tiny_spec(methods=["random", "random"]))
    twins[0]["label"] = "random (seed 1)"
    assert len(validate(SweepSpec, tiny_spec(methods=twins)).runs()) == 2


def test_a_method_may_list_its_own_recoveries() -> None:
    """Static uniform masks once, ERK masks with three updates: 4 runs, not 6; keys as if the
    recoveries had come from the grid."""
    static, rigl = {"kind": "sparse-train"}, {"kind": "sparse-train", "update": "rigl"}
    methods = [{"method": "random", "scope": "layer", "label": "uniform", "recoveries": [static]},
               {"method": "random", "scope": "erk", "label": "erk",
                "recoveries": [static, {"kind": "sparse-train", "update": "set"}, rigl]}]
    spec = validate(SweepSpec, tiny_spec(methods=methods, recoveries=["finetune"]))
    runs = [(r.choice.name, r.recovery.label()) for r in spec.runs()]
    assert runs == [("uniform", "sparse-train"), ("erk", "sparse-train"),
                    ("erk", "sparse-train(update=set)"), ("erk", "sparse-train(update=rigl)")]
    plain = validate(SweepSpec, tiny_spec(methods=[methods[1] | {"recoveries": None}],
                                          recoveries=[static, rigl]))
    assert spec.run_key(spec.runs()[-1]) == plain.run_key(plain.runs()[-1])
    bare = validate(SweepSpec, tiny_spec(methods=["magnitude"]))
    assert [r.recovery.label() for r in bare.runs()] == ["finetune"]  # the grid's default
    with pytest.raises(ConfigError, match=r"grid\.methods\.0\.recoveries.*must not be empty"):
        validate(SweepSpec, tiny_spec(methods=[{"method": "random", "recoveries": []}]))


def test_run_keys_hash_method_defaults(monkeypatch) -> None:
    """Spelling out a default gives the same key; changing a default gives a new one, so a
    sweep does not reuse results computed under the old default."""
    spelled = [{"method": "grasp", "options": {"batchnorm": "batch"}}]
    key = lambda methods: [  # noqa: E731
        spec.run_key(r) for spec in [validate(SweepSpec, tiny_spec(methods=methods))]
        for r in spec.runs()]
    assert key(["grasp"]) == key(spelled)
    from prunelab.methods.grasp import GraSP

    fields = dict(GraSP.__dataclass_fields__)
    monkeypatch.setattr(fields["batchnorm"], "default", "running")
    assert GraSP.defaults()["batchnorm"] == "running"
    assert key(["grasp"]) != key(spelled)


def test_smoke_example_in_parallel_then_nothing_left(tmp_path) -> None:
    spec = load_config(SweepSpec, SMOKE)
    assert len(spec.runs()) == 8
    started = time.perf_counter()
    summary = run_sweep(spec, tmp_path, jobs=2, quiet=True)
    assert time.perf_counter() - started < 60
    assert (summary.ok, summary.failed, summary.skipped) == (8, 0, 0)
    rows = ok_rows(tmp_path)
    assert len([r for r in rows if r["method"] == "dense"]) == 2
    runs = [r for r in rows if r["method"] != "dense"]
    assert sorted((r["label"], r["target_value"], r["seed"]) for r in runs) == sorted(
        (f"{m}/global", s, seed) for m in ("magnitude", "random") for s in (0.5, 0.9)
        for seed in (0, 1))
    for row in runs:
        assert row["achieved_sparsity"] == pytest.approx(row["target_value"], abs=1e-3)
        assert row["git_commit"] is not None and row["config_json"] and row["environment_json"]
        assert row["dense_top1"] > 90 and row["latency_ms"] > 0
    again = run_sweep(spec, tmp_path, jobs=2, quiet=True)
    assert (again.skipped, again.ok) == (8, 0)


def test_same_spec_same_numbers(tmp_path) -> None:
    spec = validate(SweepSpec, tiny_spec(methods=["random", "taylor"]))
    run_sweep(spec, tmp_path / "a", quiet=True)
    run_sweep(spec, tmp_path / "b", quiet=True)
    key = lambda r: r["run_key"]  # noqa: E731
    a, b = sorted(ok_rows(tmp_path / "a"), key=key), sorted(ok_rows(tmp_path / "b"), key=key)
    assert [(r["run_key"], r["test_top1"], r["test_loss"]) for r in a] == [
        (r["run_key"], r["test_top1"], r["test_loss"]) for r in b]


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path) -> None:
    # Passes every check before training; fails in the run: a VGG-16 preset on the digits MLP.
    wrong_preset = {"method": "l1-filter", "options": {"preset": "vgg16-a"}}
    spec = validate(SweepSpec, tiny_spec(methods=["magnitude", wrong_preset]))
    summary = run_sweep(spec, tmp_path, quiet=True)
    assert (summary.ok, summary.failed) == (1, 1)
    with ResultStore(tmp_path / "results.sqlite") as store:
        failed = store.rows(status="failed")
    assert len(failed) == 1 and "matches no prunable layer" in failed[0]["error"]
    assert failed[0]["label"] == "l1-filter/global"
    retry = run_sweep(spec, tmp_path, quiet=True)  # failed runs are retried, finished ones not
    assert (retry.skipped, retry.failed) == (1, 1)


def test_report_of_a_sweep_whose_runs_all_failed(tmp_path) -> None:
    from prunelab.bench.report import write_report

    wrong_preset = {"method": "l1-filter", "options": {"preset": "vgg16-a"}}
    run_sweep(validate(SweepSpec, tiny_spec(methods=[wrong_preset])), tmp_path, quiet=True)
    page = write_report(tmp_path).read_text()  # the dense baseline and the failure, no curves
    assert "1 failed" in page and "matches no prunable layer" in page


def test_recovery_modes_including_scratch_b_budget(tmp_path) -> None:
    spec = validate(SweepSpec, tiny_spec(
        recoveries=["finetune", "scratch-e", "scratch-b", {"kind": "rewind", "rewind_epoch": 1}],
        targets={"sparsity": [0.75]}))
    summary = run_sweep(spec, tmp_path, quiet=True)
    assert (summary.ok, summary.failed) == (4, 0)
    rows = {r["recovery"]: r for r in ok_rows(tmp_path) if r["method"] != "dense"}
    assert set(rows) == {"finetune", "scratch-e", "scratch-b", "rewind(rewind_epoch=1)"}
    assert all(r["achieved_sparsity"] == pytest.approx(0.75, abs=1e-3) for r in rows.values())


@pytest.mark.parametrize(("sparsity", "cap", "epochs"), [(0.3, None, 5), (0.75, None, 12),
                                                         (0.75, 2.0, 6)])
def test_scratch_b_epochs_follow_the_flops_budget(sparsity: float, cap: float | None,
                                                  epochs: int) -> None:
    from prunelab.experiment import Experiment
    from prunelab.experiment_config import MethodChoice
    from prunelab.recoveries import RECOVERIES

    spec = validate(SweepSpec, tiny_spec())
    phases: list[str] = []
    experiment = Experiment(spec, on_phase=phases.append)
    dense = experiment.train_dense(0)
    experiment.prune_and_recover(dense, MethodChoice(method="magnitude"), "sparsity", sparsity,
                                 0, RECOVERIES.get("scratch-b")(scratch_b_cap=cap))
    # 3 dense epochs x FLOPs ratio (1/0.7 -> 5 epochs; 4x -> 12, capped at 2x -> 6 epochs).
    assert phases[-1] == f"scratch-b epoch {epochs}/{epochs}"


def test_compression_and_speedup_targets(tmp_path) -> None:
    spec = validate(SweepSpec, tiny_spec(targets={"compression": [4.0], "speedup": [5.0]}))
    run_sweep(spec, tmp_path, quiet=True)
    rows = {r["target_kind"]: r for r in ok_rows(tmp_path) if r["method"] != "dense"}
    assert rows["compression"]["compression"] == pytest.approx(4.0, rel=0.01)
    assert rows["speedup"]["theoretical_speedup"] == pytest.approx(5.0, rel=0.01)


def test_kill_9_then_resume_finishes_only_what_is_missing(tmp_path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec = tiny_spec(targets={"sparsity": [0.3, 0.5, 0.7, 0.8, 0.9, 0.95]}, seeds=[0])
    spec["finetune"]["epochs"] = 4
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    process = sweep_cli(spec_path, out)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "results.sqlite").exists() and len(ok_rows(out)) >= 3:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    before = {r["run_key"]: r["finished_at"] for r in ok_rows(out)}
    assert 3 <= len(before) < 7, "the kill should land mid-sweep"
    finish = sweep_cli(spec_path, out)
    _, stderr = finish.communicate(timeout=300)
    assert finish.returncode == 0, stderr
    rows = ok_rows(out)
    assert len(rows) == 7  # 6 runs + the dense baseline, no duplicates
    assert all(before[k] == r["finished_at"] for r in rows for k in [r["run_key"]] if k in before)
    with ResultStore(out / "results.sqlite") as store:
        assert store.integrity() == "ok"
        assert not store.rows(status="failed")


def test_store_replaces_failed_rows_whole_and_keeps_ok_rows(tmp_path) -> None:
    with ResultStore(tmp_path / "r.sqlite") as store:
        store.put({"run_key": "a", "status": "failed", "error": "boom", "seed": 3})
        store.put({"run_key": "a", "status": "ok", "test_top1": 90.0})
        store.put({"run_key": "a", "status": "failed", "error": "late failure"})
        (row,) = store.rows()
    assert (row["status"], row["error"], row["seed"], row["test_top1"]) == ("ok", None, None, 90.0)


def test_local_executor_survives_a_worker_that_died(tmp_path) -> None:
    from prunelab.bench.executors import LocalExecutor
    from prunelab.bench.sweep import plan

    spec = validate(SweepSpec, tiny_spec())
    with ResultStore(tmp_path / "r.sqlite") as store:
        dense, _, _ = plan(spec, store, tmp_path, 1)
    pool = LocalExecutor(1)
    killed: list[int] = []

    def kill_the_worker_once() -> None:  # while the task runs, as when killed for memory
        for process in [] if killed else list(pool._pool._processes.values()):
            process.kill()
            killed.append(process.pid)

    try:
        with pytest.raises(BrokenProcessPool):
            pool._pool.submit(os._exit, 1).result()  # a worker dies between two batches
        ((_, row),) = list(pool.run(dense, lambda: None))
        assert row["status"] == "ok", row.get("error")
        first_pool = pool._pool
        longer = tiny_spec() | {"train": {"epochs": 40, "batch_size": 64, "lr": 0.05}}
        again = [task | {"out": str(tmp_path / "again"), "spec": longer} for task in dense]
        ((_, row),) = list(pool.run(again, kill_the_worker_once))  # ... and during one
        assert killed and row["status"] == "ok", row.get("error")
        assert pool._pool is not first_pool  # the task was retried on a fresh pool
    finally:
        pool.close()


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an exited one not yet reaped is a zombie: not live)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_workers_stop_when_the_sweep_process_is_killed() -> None:
    """`kill PID` of a sweep reaches the sweep process only; its workers must not go on."""
    script = (
        "import time\n"
        "from prunelab.bench.executors import LocalExecutor\n"
        "pool = LocalExecutor(1)\n"
        "pool._pool.submit(time.sleep, 120)\n"
        "print(*[p.pid for p in pool._pool._processes.values()], flush=True)\n"
        "time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                               text=True)
    try:
        (pid,) = map(int, process.stdout.readline().split())
        assert _running(pid)
    finally:
        process.kill()
        process.wait()
    deadline = time.time() + 30
    while _running(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _running(pid), "the worker outlived its sweep process"


def test_two_sweeps_on_one_folder_split_the_runs(tmp_path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec(targets={"sparsity": [0.3, 0.6, 0.9]},
                                                  seeds=[0, 1])))
    out = tmp_path / "out"
    first, second = sweep_cli(spec_path, out), sweep_cli(spec_path, out)
    finished = []
    for process in (first, second):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        finished.append(int(re.search(r"(\d+) finished", stdout).group(1)))
    assert sum(finished) == 6, finished  # each run computed by exactly one of them
    rows = ok_rows(out)
    assert len(rows) == 8 and len({r["run_key"] for r in rows}) == 8
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_summary_statistics_by_hand() -> None:
    s = summarize([90.0, 92.0, 94.0])
    assert (s.n, s.mean, s.std) == (3, 92.0, 2.0)
    assert s.ci95 == pytest.approx(4.302653 * 2.0 / 3**0.5, rel=1e-5)  # t(0.975, 2)
    assert summarize([91.0]).ci95 is None


def test_results_cli_filters_and_exports(tmp_path) -> None:
    from typer.testing import CliRunner

    from prunelab.cli import app

    run_sweep(validate(SweepSpec, tiny_spec(methods=["magnitude", "random"])), tmp_path,
              quiet=True)
    csv_path = tmp_path / "rows.csv"
    result = CliRunner().invoke(app, ["results", str(tmp_path), "--where", "method=random",
                                      "--csv", str(csv_path)])
    assert result.exit_code == 0, result.output
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 2 and "random" in lines[1] and "run_key" in lines[0]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_one_folder_holds_several_sweeps_reported_apart(tmp_path) -> None:
    from prunelab.bench.report import markdown_summary, write_report

    run_sweep(validate(SweepSpec, tiny_spec() | {"name": "a"}), tmp_path, quiet=True)
    run_sweep(validate(SweepSpec, tiny_spec(methods=["random"]) | {"name": "b"}), tmp_path,
              quiet=True)
    with pytest.raises(PrunelabError, match=r"several sweeps \(a, b\)"):
        write_report(tmp_path)
    assert "magnitude/global" in markdown_summary(tmp_path, "a")
    only_b = markdown_summary(tmp_path, "b")  # b shares a's dense model: it is b's too
    assert "magnitude" not in only_b and "over 1 seeds" in only_b
    assert write_report(tmp_path, "b").parent.name == "report-b"
    run_sweep(validate(SweepSpec, tiny_spec() | {"name": "c"}), tmp_path, quiet=True)  # = a
    assert markdown_summary(tmp_path, "c") == markdown_summary(tmp_path, "a")
    other = tiny_spec() | {"name": "a", "data_limit": 300}  # the same name, other data
    with pytest.raises(ConfigError, match="another experiment"):
        run_sweep(validate(SweepSpec, other), tmp_path, quiet=True)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make test installs it)")
def test_report_renders_in_headless_chromium(tmp_path) -> None:
    from prunelab.bench.report import write_report

    spec = validate(SweepSpec, tiny_spec(methods=["magnitude", "random"],
                                         targets={"sparsity": [0.5, 0.8]},
                                         recoveries=["finetune", "scratch-e"], seeds=[0, 1]))
    run_sweep(spec, tmp_path, quiet=True)
    page = write_report(tmp_path)
    for name in ("top1_vs_compression", "top1_vs_theoretical_speedup"):
        assert (page.parent / f"{name}.png").stat().st_size > 1000
        assert (page.parent / f"{name}.svg").read_text().startswith("<?xml")
    text = page.read_text()
    assert "Recovery modes compared" in text and "95% CI" in text and "Unpruned baseline" in text
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert 'data-figures="2/2"' in dom, dom[:500]
    assert 'data-errors="0"' in dom


def test_ray_executor_says_at_once_when_nothing_listens_at_the_address() -> None:
    import socket

    from prunelab.bench.executors import RayExecutor

    pytest.importorskip("ray")
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(PrunelabError, match=f"nothing answers at the Ray address .*:{port}'"):
        RayExecutor(1, 1, f"127.0.0.1:{port}")
    assert time.monotonic() - start < 30


@pytest.fixture
def ray_cluster(monkeypatch):
    """A one-machine Ray cluster started as users start one: ``ray start --head``.

    It gets a port the OS reports free and its own authentication token, shared with this
    process through Ray's environment variables, so this test cannot connect to another cluster
    or pick up a token from ``~/.ray``. (``ray stop --force`` at the end stops every Ray
    cluster of the machine: a test machine's.)
    """
    import secrets
    import socket

    ray_bin = Path(sys.executable).parent / "ray"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    for name, value in auth.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    pytest.importorskip("ray")
    try:  # Ray reads its authentication settings once per process; make it read them again
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        def reread_auth_settings() -> None:
            pass
    else:
        def reread_auth_settings() -> None:
            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()
    reread_auth_settings()
    env = os.environ | auth | {"RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run(
        [str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp}"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env,
                       timeout=120)
        monkeypatch.undo()  # this process leaves token mode before the token file goes
        reread_auth_settings()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_executor_gives_the_local_results(tmp_path, ray_cluster) -> None:
    spec = validate(SweepSpec, tiny_spec(methods=["magnitude", "random"],
                                         targets={"sparsity": [0.5, 0.9]}) | {"threads": 1})
    local = run_sweep(spec, tmp_path / "local", jobs=2, quiet=True)
    # Tracked on Ray (when TensorBoard is installed): each worker logs the tasks it runs, and
    # tracking changes no result key.
    tracked = importlib.util.find_spec("tensorboard") is not None
    remote_spec = spec.model_copy(update={"track": TrackConfig(backend="tensorboard")}
                                  if tracked else {})
    remote = run_sweep(remote_spec, tmp_path / "ray", jobs=2, executor="ray",
                       address=ray_cluster, quiet=True)
    assert (local.ok, remote.ok, remote.failed) == (4, 4, 0)
    numbers = lambda out: sorted((r["run_key"], r["test_top1"]) for r in ok_rows(out))  # noqa
    assert numbers(tmp_path / "local") == numbers(tmp_path / "ray")
    if tracked:  # the dense model and 4 runs, each with its event file
        logged = sorted((tmp_path / "ray" / "tensorboard").iterdir())
        assert len(logged) == 5 and all(list(d.glob("events.out.tfevents.*")) for d in logged)


def test_ray_executor_replaces_a_worker_that_died(tmp_path, ray_cluster) -> None:
    import signal

    from prunelab.bench.executors import RayExecutor
    from prunelab.bench.sweep import plan

    longer = tiny_spec() | {"train": {"epochs": 40, "batch_size": 64, "lr": 0.05}}
    with ResultStore(tmp_path / "r.sqlite") as store:
        dense, _, _ = plan(validate(SweepSpec, longer), store, tmp_path, 1)
    pool = RayExecutor(1, 1, ray_cluster)
    (actor,) = pool._idle
    pid = pool.ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))
    killed: list[int] = []

    def kill_the_worker_once() -> None:  # while its task runs, as when killed for memory
        if not killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    try:
        ((_, row),) = list(pool.run(dense, kill_the_worker_once))
        assert killed and row["status"] == "ok", row.get("error")
        assert pool._idle and pool._idle[0] is not actor  # a fresh actor ran it again
    finally:
        pool.close()


def test_ray_executor_fits_its_jobs_to_the_cluster(ray_cluster) -> None:
    from prunelab.bench.executors import RayExecutor

    with pytest.warns(UserWarning, match="2 CPUs: running 2 job"):
        pool = RayExecutor(4, 1, ray_cluster)  # two more than the cluster's CPUs
    try:
        assert len(pool._idle) == 2
    finally:
        pool.close()
    with pytest.raises(PrunelabError, match=r"2 CPU.*asks for 3 thread"):
        RayExecutor(1, 3, ray_cluster)


def test_controls_join_every_comparison_unless_switched_off() -> None:
    spec = validate(SweepSpec, tiny_spec(methods=[{"method": "taylor", "scope": "layer"},
                                                  "l1-filter", "random"], controls=True,
                                         recoveries=["finetune"]))
    names = [c.name for c in spec.grid.choices()]
    assert names == ["taylor/layer", "l1-filter/global", "random/global", "magnitude/layer",
                     "random-channel/global", "l2-channel/global"]
    recoveries = {(r.choice.method, r.recovery.kind) for r in spec.runs()}
    assert ("l1-filter", "scratch-b") in recoveries and ("l2-channel", "scratch-b") in recoveries
    assert ("taylor", "scratch-b") not in recoveries and ("magnitude", "finetune") in recoveries
    off = validate(SweepSpec, tiny_spec(methods=["taylor"]))
    assert [r.choice.method for r in off.runs()] == ["taylor"]


def test_pareto_front_by_hand() -> None:
    from prunelab.bench.stats import pareto_front

    # (speed-up, top-1): B dominates A; C is faster but worse; D is dominated by C; E has no
    # measurement.
    points = [(1.5, 80.0), (2.0, 85.0), (3.0, 70.0), (2.5, 60.0), (None, 99.0)]
    assert pareto_front(points) == [False, True, True, False, False]
    assert pareto_front([(2.0, 80.0), (2.0, 80.0)]) == [True, True]  # ties both stay


def test_markdown_and_report_show_measured_speedups_and_the_front(tmp_path) -> None:
    from prunelab.bench.report import markdown_summary, write_report

    spec = validate(SweepSpec, tiny_spec(controls=True, targets={"sparsity": [0.5, 0.9]})
                    | {"latency": {"repeats": 3}})
    run_sweep(spec, tmp_path, quiet=True)
    markdown = markdown_summary(tmp_path)
    header, _, *lines = markdown.splitlines()[2:]
    assert "measured speed-up | Pareto" in header
    rows = [line.split("|") for line in lines]
    assert {r[1].strip() for r in rows} == {"magnitude/global", "random/global"}
    assert all(float(r[9]) > 0 for r in rows)  # a measured speed-up in every row
    assert any("T" in r[10] for r in rows)  # something is on the theoretical front
    page = write_report(tmp_path)
    assert (page.parent / "top1_vs_measured_speedup.png").stat().st_size > 1000
    assert "Pareto front" in (page.parent / "top1_vs_theoretical_speedup.svg").read_text()
