"""A module:function reward is found from the current folder, as `python -m` finds modules, and a
missing one says where it was looked for."""

import subprocess
import sys

import pytest

from qes_edge.tasks.base import load_callable


def test_found_in_the_current_folder_by_the_installed_command(tmp_path):
    (tmp_path / "myreward_mod.py").write_text("def reward(prompt, completion, example):\n    return 0.5\n")
    code = ("import sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "  # as the qes-edge script runs
            "from qes_edge.tasks.base import load_callable; print(load_callable('myreward_mod:reward')('p', 'c', {}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "0.5", r.stderr


def test_missing_module_or_function_says_where(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"no module 'nosuch_mod_x' in the current folder \({tmp_path}\)"):
        load_callable("nosuch_mod_x:f")
    (tmp_path / "has_no_fn_mod.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"has_no_fn_mod.py has no 'reward'"):
        load_callable("has_no_fn_mod:reward")
    (tmp_path / "raising_mod.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"importing raising_mod raised RuntimeError: boom"):
        load_callable("raising_mod:reward")
