"""RayExecutor (qes_edge/training/executors/ray.py): two Ray actors on a local Ray instance, each holding its
own copy of the real model, record exactly the ledger the local executor records; an actor that
dies has its members evaluated here and is replaced.  Without Ray, the error names the extra."""

import os
import subprocess
import sys

import pytest
from conftest import recorded_steps

pytestmark = pytest.mark.slow


def test_without_ray_the_error_names_the_extra(monkeypatch):
    import qes_edge.training.executors.ray as xr
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeError, match=r"pip install 'qes-edge\[ray\]'"):
        xr.RayExecutor(None, 2, opener=lambda info: None)


@pytest.fixture(scope="module")
def local_ledger(tmp_path_factory, tiny_choice_data):
    """4 steps of the quick choice task recorded by one process with --threads 1."""
    path = tmp_path_factory.mktemp("ray") / "local.qes"
    r = subprocess.run([sys.executable, "-m", "qes_edge", "train", *CHOICE(tiny_choice_data), "--threads", "1",
                        "--steps", "4", "--ledger", str(path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return path


def CHOICE(data_dir):
    return ["--task", "choice", "--data", str(data_dir / "bigger.jsonl"), "--population", "4", "--batch", "2",
            "--n-ctx", "128"]


def test_train_with_ray_on_a_local_ray_it_starts(tmp_path, tiny_choice_data, local_ledger):
    """`qes-edge train --ray 2` (before any in-process Ray of the tests below exists): a local Ray
    started by the command, two actors, the ledger of one process."""
    pytest.importorskip("ray")
    r = subprocess.run([sys.executable, "-m", "qes_edge", "train", *CHOICE(tiny_choice_data), "--threads", "1",
                        "--steps", "2", "--ray", "2", "--ledger", str(tmp_path / "ray.qes")],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = recorded_steps(tmp_path / "ray.qes")
    assert [g[:5] for g in got] == [w[:5] for w in recorded_steps(local_ledger)[:2]]
    from qes_edge.ledger.store import Ledger
    lg = Ledger(tmp_path / "ray.qes", readonly=True)
    timings = [rec.timings for rec in lg.steps(lg.run().run_id)]
    lg.close()
    assert [t.get("actors") for t in timings] == [2, 2], timings


@pytest.fixture(scope="module")
def ray_local():
    import os
    from pathlib import Path
    ray = pytest.importorskip("ray")
    # the actors import the toy model from this folder (and qes_edge from the working tree)
    here = str(Path(__file__).resolve().parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([here, str(Path(here).parent)] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def toy_opener(info):
    from test_trainer_unit import ToyDriver, ToyTask
    return ToyDriver(0), ToyTask(), 1


def test_ray_actors_on_a_toy_model_give_the_local_ledger(ray_local, tmp_path):
    from test_executor_peers import rows, run_local
    from test_trainer_unit import ToyDriver, ToyTask

    from qes_edge.training.executors.ray import RayExecutor
    from qes_edge.ledger.store import Ledger
    from qes_edge.training.config import TrainConfig
    from qes_edge.training.trainer import Trainer
    from test_executor_peers import CFG
    lg1, run1 = run_local(tmp_path, 5)
    cfg = TrainConfig(**CFG)
    lg = Ledger(tmp_path / "ray.qes")
    run = lg.create_run("00" * 32, "toy.gguf", cfg.record(), 1)
    tr = Trainer(ToyDriver(0), ToyTask(), lg, run, cfg)
    ex = RayExecutor(tr.executor, 2, opener=toy_opener, threads=1)
    ex.bind(lg, run.run_id)
    tr.executor = ex
    for _ in range(5):
        tr.step()
    assert rows(lg, run) == rows(lg1, run1)
    assert ray_local.get([a.n_steps.remote() for a in ex.actors]) == [4, 4]
    ex.close()


def steps(path):
    return [r[:5] for r in recorded_steps(path)]  # the training, not the timings


def test_two_ray_actors_give_the_local_executor_ledger(ray_local, tmp_path, tiny_choice_data, local_ledger):
    from qes_edge.training.executors.ray import RayExecutor
    from qes_edge.training.session import RUN_OPTIONS, Session, SessionOptions
    from qes_edge.training.config import TrainConfig
    data = tiny_choice_data / "bigger.jsonl"
    opts = dict(task="choice", data=str(data), population=4, batch=2, n_ctx=128)
    said = []
    s = Session.open(SessionOptions(TrainConfig(**opts), ledger=tmp_path / "ray.qes", explicit=RUN_OPTIONS,
                                    threads=1), say=said.append)
    with s:
        ex = RayExecutor.for_session(s, actors=2, threads=1)
        s.trainer.executor = ex
        for k in range(4):
            if k == 2:  # an actor dies between steps: its share is evaluated here, a new one rebuilds
                ray_local.kill(ex.actors[1])
            rec = s.train_step()
            assert rec.timings["actors"] == 2
        assert ex.replaced == 1, said
        assert any("Ray actor 1 failed" in m for m in said), said
        # after the replacement every actor is at step 3 again (the new one rebuilt from base + 3 rows)
        assert ray_local.get([a.n_steps.remote() for a in ex.actors]) == [3, 3]
    assert steps(tmp_path / "ray.qes") == steps(local_ledger)
