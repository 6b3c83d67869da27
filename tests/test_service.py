"""service: the systemd unit and launchd agent that start the daemon at login, and install.

The unit is read back as systemd reads it twice: with configparser plus systemd's quoting rules
(below, from systemd.syntax(7) and systemd.service(5)), and, where systemd-analyze exists, by
systemd itself.  No test enables or starts anything: where systemd is simulated, the commands
install would run are recorded instead of run."""

from __future__ import annotations

import configparser
import os
import plistlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qes_edge.agent import service
from qes_edge.agent.service import (ENABLE_SYSTEMD, InstallResult, install, launchd_plist,
                              systemd_unit)

PY = "/usr/bin/python3"
EXE = [PY, "-m", "qes_edge"]
SYSTEMD_RUNS = Path("/run/systemd/system").is_dir()


def parse_unit(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text)
    return parser


def unit_lines(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def systemd_words(value: str, exec_line: bool) -> list[str]:
    """value split into words as systemd does: whitespace separates, double quotes group,
    backslash escapes, `%%` is `%`, and in ExecStart= `$$` is `$`."""
    words, word, quoted, i, started = [], "", False, 0, False
    while i < len(value):
        c = value[i]
        if c == "\\":
            word += value[i + 1]
            i += 2
            started = True
            continue
        if c == '"':
            quoted, started = not quoted, True
        elif c.isspace() and not quoted:
            if started:
                words.append(word)
            word, started = "", False
        else:
            word, started = word + c, True
        i += 1
    if started:
        words.append(word)
    words = [w.replace("%%", "%") for w in words]
    return [w.replace("$$", "$") for w in words] if exec_line else words


def environment(text: str) -> dict[str, str]:
    pairs = [systemd_words(v, exec_line=False) for v in unit_lines(text, "Environment")]
    assert all(len(p) == 1 for p in pairs), pairs
    return dict(p[0].split("=", 1) for p in pairs)


# ---- the systemd unit -------------------------------------------------------------------------

def test_unit_parses_with_the_expected_sections_and_keys(tmp_path):
    text = systemd_unit(EXE, tmp_path, nice=10)
    unit = parse_unit(text)
    assert unit.sections() == ["Unit", "Service", "Install"]
    s = unit["Service"]
    assert (s["Restart"], s["RestartSec"], s["KillSignal"], s["TimeoutStopSec"], s["Nice"]) == (
        "on-failure", "30", "SIGTERM", "120", "10")
    assert unit["Install"]["WantedBy"] == "default.target"
    assert s["ExecStart"].endswith(" daemon run")
    assert systemd_words(s["ExecStart"], exec_line=True) == [*EXE, "daemon", "run"]
    assert environment(text) == {"QES_EDGE_HOME": str(tmp_path), "OMP_WAIT_POLICY": "PASSIVE"}


def test_no_nice_line_unless_asked(tmp_path):
    assert "Nice" not in parse_unit(systemd_unit(EXE, tmp_path))["Service"]


def test_paths_with_spaces_percent_quotes_and_dollars(tmp_path):
    home = tmp_path / "my home 100% \"done\""
    exe = ["/opt/my apps/100%/python", "-m", "qes_edge", "--x=$HOME", "back\\slash", ";", ""]
    text = systemd_unit(exe, home, env={"EXTRA": "a b %h $HOME \"q\""})
    exec_start = parse_unit(text)["Service"]["ExecStart"]
    assert exec_start.startswith(
        '"/opt/my apps/100%%/python" -m qes_edge --x=$$HOME "back\\\\slash" ";" ""')
    assert systemd_words(exec_start, exec_line=True) == [*exe, "daemon", "run"]
    assert f'Environment="QES_EDGE_HOME={tmp_path}/my home 100%% \\"done\\""' in text
    assert environment(text) == {"QES_EDGE_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE",
                                 "EXTRA": "a b %h $HOME \"q\""}


def test_env_may_override_openmp_but_not_contradict_home(tmp_path):
    text = systemd_unit(EXE, tmp_path, env={"OMP_WAIT_POLICY": "ACTIVE",
                                            "QES_EDGE_HOME": str(tmp_path)})
    assert environment(text)["OMP_WAIT_POLICY"] == "ACTIVE"
    with pytest.raises(ValueError, match="env sets QES_EDGE_HOME=/elsewhere but home is"):
        systemd_unit(EXE, tmp_path, env={"QES_EDGE_HOME": "/elsewhere"})


@pytest.mark.parametrize("exe, env, nice, message", [
    (["python3", "-m", "qes_edge"], None, None, "must be an absolute path"),
    ([], None, None, "must be an absolute path"),
    (["/opt/$x/python"], None, None, "holds '\\$'"),
    ([PY, "a\nb"], None, None, "control characters"),
    (EXE, {"BAD NAME": "1"}, None, "not a valid environment variable name"),
    (EXE, {"X": "line\nbreak"}, None, "control characters"),
    (EXE, None, 20, "nice must be an integer from 0 to 19"),
    (EXE, None, -5, "nice must be an integer from 0 to 19"),
])
def test_unit_refuses_what_systemd_could_not_run(tmp_path, exe, env, nice, message):
    with pytest.raises(ValueError, match=message):
        systemd_unit(exe, tmp_path, nice=nice, env=env)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here, so systemd's own parser "
                           "cannot check the unit (the configparser checks still ran)")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    """systemd reads the unit as written.  verify fails while ExecStart's program is missing:
    its error names the path as systemd decoded it, and its debug dump shows how it read
    Environment=; once the program exists, verify passes."""
    program = tmp_path / "my %h dir" / "py thon"
    home = tmp_path / "home with space 100%"
    env = {"EXTRA": "a b %h $HOME \"q\" back\\slash"}
    unit = tmp_path / "qes-edge.service"
    argv = [str(program), "-m", "qes_edge", "--x=$HOME", "a;b", ""]
    unit.write_text(systemd_unit(argv, home, nice=5, env=env))

    def verify():
        return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                              text=True, timeout=60,
                              env=dict(os.environ, SYSTEMD_LOG_LEVEL="debug"))

    missing = verify()
    assert f"qes-edge.service: Command {program} is not executable" in missing.stderr
    # The debug dump (on stdout; its format is systemd's to change, so checked where found)
    # shows argv before $ expansion, re-quoted, and the environment as values.
    dumped = dict(re.findall(r"^\s+Environment: ([^=]+)=(.*)$", missing.stdout, re.M))
    if dumped:
        assert dumped == {"QES_EDGE_HOME": str(home), "OMP_WAIT_POLICY": "PASSIVE", **env}
    command = re.search(r"^\s+Command Line: (.*)$", missing.stdout, re.M)
    if command:
        assert systemd_words(command.group(1), exec_line=True) == [*argv, "daemon", "run"]
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    done = verify()
    problems = [line for line in done.stderr.splitlines()
                if line.startswith("qes-edge.service:") and "job" not in line]
    assert done.returncode == 0 and not problems, problems or done.stderr[-3000:]


# ---- the launchd agent ------------------------------------------------------------------------

def test_plist_round_trips(tmp_path):
    home = tmp_path / "a <b> & 'c' 100%"
    agent = plistlib.loads(launchd_plist(EXE, home, nice=7, env={"X": "<&>"}).encode())
    assert agent["Label"] == "org.qes-edge.daemon"
    assert agent["ProgramArguments"] == [*EXE, "daemon", "run"]
    assert agent["EnvironmentVariables"] == {"QES_EDGE_HOME": str(home),
                                             "OMP_WAIT_POLICY": "PASSIVE", "X": "<&>"}
    assert agent["RunAtLoad"] is True
    assert agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["Nice"] == 7
    assert Path(agent["StandardOutPath"]).parent == home
    assert Path(agent["StandardErrorPath"]).parent == home
    assert "Nice" not in plistlib.loads(launchd_plist(EXE, home).encode())


# ---- install ----------------------------------------------------------------------------------

@pytest.fixture
def no_commands(monkeypatch):
    """Record the commands install runs; only the read-only `systemctl --user show` probe runs."""
    ran = []
    real = service._run

    def run(argv, timeout=10.0):
        if argv[:3] == ["systemctl", "--user", "show"]:
            return real(argv, timeout)
        ran.append(argv)
        return True, ""

    monkeypatch.setattr(service, "_run", run)
    return ran


def test_install_on_linux_writes_the_unit_and_tells_the_truth_about_systemd(tmp_path, no_commands):
    result = install(EXE, tmp_path / "home", system="Linux", config_home=tmp_path)
    path = tmp_path / "systemd" / "user" / "qes-edge.service"
    assert (result.path, result.written, result.replaced) == (path, True, False)
    assert path.read_text() == systemd_unit(EXE, tmp_path / "home")
    assert sorted(p.name for p in path.parent.iterdir()) == ["qes-edge.service"]  # no temp left
    if not SYSTEMD_RUNS:
        assert not result.manager_running
        assert result.notes == [service.systemd_status()[1]]
        assert "systemd is not running here (no /run/systemd/system)" in str(result)
        assert "run `qes-edge daemon start` instead" in str(result)
        assert result.commands == [] and no_commands == []
    elif result.manager_running:
        assert no_commands == [["systemctl", "--user", "daemon-reload"]]
        assert f"to enable it: {ENABLE_SYSTEMD}" in str(result)
    else:
        assert "this user's manager does not answer" in str(result)


def test_install_again_is_a_no_op_and_a_changed_file_is_replaced(tmp_path, no_commands):
    first = install(EXE, tmp_path / "home", system="Linux", config_home=tmp_path)
    again = install(EXE, tmp_path / "home", system="Linux", config_home=tmp_path)
    assert (again.written, again.replaced) == (False, False)
    assert str(again).startswith(f"{first.path} is up to date")
    changed = install(EXE, tmp_path / "home", system="Linux", config_home=tmp_path, nice=19)
    assert (changed.written, changed.replaced) == (True, True)
    assert str(changed).startswith(f"replaced {first.path}")
    assert "Nice=19" in first.path.read_text()


def test_a_failed_write_keeps_the_old_unit_and_leaves_no_temp(tmp_path, monkeypatch, no_commands):
    path = install(EXE, tmp_path / "home", system="Linux", config_home=tmp_path).path
    old = path.read_text()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        install(EXE, tmp_path / "home", system="Linux", config_home=tmp_path, nice=3)
    assert path.read_text() == old
    assert sorted(p.name for p in path.parent.iterdir()) == ["qes-edge.service"]


def test_dry_run_writes_and_runs_nothing(tmp_path, monkeypatch, no_commands):
    monkeypatch.setattr(service, "systemd_status", lambda: (True, ""))
    result = install(EXE, tmp_path / "home", system="Linux", config_home=tmp_path, dry_run=True)
    assert not result.path.exists() and not result.written
    assert str(result).startswith(f"would write {result.path}")
    assert no_commands == []


def test_with_systemd_running_only_daemon_reload_runs(tmp_path, monkeypatch, no_commands):
    monkeypatch.setattr(service, "systemd_status", lambda: (True, ""))
    result = install(EXE, tmp_path / "home", system="Linux", config_home=tmp_path)
    assert result.manager_running
    assert no_commands == [["systemctl", "--user", "daemon-reload"]]
    assert result.commands == [ENABLE_SYSTEMD]
    assert "loginctl enable-linger" in str(result)
    replaced = install(EXE, tmp_path / "home", system="Linux", config_home=tmp_path, nice=4)
    assert replaced.commands == [ENABLE_SYSTEMD + " && systemctl --user restart qes-edge"]


def test_systemd_present_but_user_manager_unreachable(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "SYSTEMD_RUNNING_MARK", tmp_path)  # pretend systemd is PID 1
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))             # and systemctl is absent
    running, why = service.systemd_status()
    assert not running
    assert why.startswith("systemd runs but this user's manager does not answer")

    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired("systemctl", 5)

    monkeypatch.setattr(service.subprocess, "run", hang)
    assert not service.systemd_status()[0]


def test_xdg_config_home_is_honoured(tmp_path, monkeypatch, no_commands):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    result = install(EXE, tmp_path / "home", system="Linux", dry_run=True)
    assert result.path == tmp_path / "xdg" / "systemd" / "user" / "qes-edge.service"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    result = install(EXE, tmp_path / "home", system="Linux", dry_run=True)
    assert result.path == tmp_path / "user" / ".config" / "systemd" / "user" / "qes-edge.service"


def test_install_on_macos_writes_the_agent(tmp_path):
    home = tmp_path / "app support"
    result = install(EXE, home, system="Darwin", config_home=tmp_path / "Library")
    path = tmp_path / "Library" / "LaunchAgents" / "org.qes-edge.daemon.plist"
    assert isinstance(result, InstallResult) and result.path == path and result.written
    assert plistlib.loads(path.read_bytes())["ProgramArguments"][-2:] == ["daemon", "run"]
    assert home.is_dir()  # launchd would not create the folder of its log files
    assert result.commands == [f"launchctl load -w {path}"]
    replaced = install(EXE, home, system="Darwin", config_home=tmp_path / "Library", nice=10)
    assert replaced.replaced
    assert replaced.commands == [f"launchctl unload {path} && launchctl load -w {path}"]


def test_other_systems_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only Linux .systemd. and macOS .launchd. are supported"):
        install(EXE, tmp_path, system="Windows", config_home=tmp_path)
    assert list(tmp_path.iterdir()) == []
