"""Threads on a shared machine: llama.cpp's OpenMP threads wait passively unless the user chose
otherwise, and --threads reaches prompt processing as well as generation."""

import os
import subprocess
import sys

import pytest


def _py(code, **env):
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          timeout=60, check=True).stdout.strip()


def test_importing_qes_edge_sets_a_passive_wait_policy():
    code = "import os, qes_edge.threads as t; print(os.environ['OMP_WAIT_POLICY'], '|', t.wait_policy())"
    assert _py(code) == "PASSIVE | PASSIVE (OMP_WAIT_POLICY, qes-edge default)"


def test_a_policy_the_user_chose_is_kept():
    code = "import os, qes_edge.threads as t; print(os.environ['OMP_WAIT_POLICY'], '|', t.wait_policy())"
    assert _py(code, OMP_WAIT_POLICY="active") == "active | ACTIVE (OMP_WAIT_POLICY, set by the user)"


def test_llama_cpp_imported_first_is_reported():
    code = ("import sys, types; sys.modules['llama_cpp'] = types.ModuleType('llama_cpp'); "
            "import qes_edge.threads as t; print(t.wait_policy())")
    assert "imported before qes_edge" in _py(code)


def test_thread_counts():
    from qes_edge.threads import available_cores, default_threads, resolve_threads
    assert default_threads() == available_cores() >= 1
    assert resolve_threads(0) == resolve_threads(None) == default_threads()
    assert resolve_threads(3) == 3
    with pytest.raises(ValueError, match="--threads"):
        resolve_threads(-1)


def test_info_names_the_policy():
    from typer.testing import CliRunner

    from qes_edge.cli.main import app
    res = CliRunner().invoke(app, ["info"])
    assert res.exit_code == 0, res.output
    assert "OMP_WAIT_POLICY" in " ".join(res.output.split())


@pytest.mark.slow
def test_threads_reach_prompt_processing(default_model):
    from qes_edge.llama.runtime import load_llama
    llm = load_llama(default_model, n_ctx=64, n_threads=1)
    assert llm.context_params.n_threads == 1 and llm.context_params.n_threads_batch == 1
