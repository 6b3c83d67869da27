"""Start the overnight daemon at login: a systemd user unit on Linux, a launchd agent on macOS.

Both run `<exe...> daemon run`, the daemon's foreground entry point, and let the service manager
restart it after a crash.  On stop both send SIGTERM and wait two minutes before killing, which
is how long the daemon may take to finish or abandon its step cleanly.  The files are written
atomically, so a crash mid-install never leaves a half unit that the manager refuses."""

from __future__ import annotations

import os
import platform
import plistlib
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from qes_edge.agent.manners import check_nice
from qes_edge.atomic import atomic_output
from qes_edge.home import ENV as HOME_ENV

UNIT_NAME = "qes-edge.service"
LAUNCHD_LABEL = "org.qes-edge.daemon"
STOP_TIMEOUT_S = 120
RESTART_DELAY_S = 30
SYSTEMD_RUNNING_MARK = Path("/run/systemd/system")
ENABLE_SYSTEMD = "systemctl --user daemon-reload && systemctl --user enable --now qes-edge"
FALLBACK = "run `qes-edge daemon start` instead"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NEEDS_QUOTES = re.compile(r"""[\s"'\\;]""")


def _command(exe: list[str]) -> list[str]:
    """exe + `daemon run`.  The program must be an absolute path: neither systemd nor launchd
    searches the user's PATH, so a bare `qes-edge` would not be found at login."""
    exe = [str(a) for a in exe]
    if not exe or not os.path.isabs(exe[0]):
        raise ValueError(f"the daemon's program must be an absolute path, not {exe[:1]!r}: "
                         "give e.g. [sys.executable, '-m', 'qes_edge']")
    return [*exe, "daemon", "run"]


def _environment(home: Path, env: dict | None) -> dict[str, str]:
    """The daemon's environment: its home, OpenMP threads that sleep instead of spinning while
    they wait (a spinning pool keeps a laptop's cores busy between steps), then env."""
    merged = {HOME_ENV: str(home), "OMP_WAIT_POLICY": "PASSIVE"}
    for name, value in (env or {}).items():
        if not _ENV_NAME.fullmatch(str(name)):
            raise ValueError(f"{name!r} is not a valid environment variable name")
        if name == HOME_ENV and str(value) != str(home):
            raise ValueError(f"env sets {HOME_ENV}={value} but home is {home}; give one")
        merged[name] = str(value)
    return merged


def _systemd_value(text: str) -> str:
    """text with systemd's escapes for a double-quoted word: backslash and quote escaped, `%`
    doubled (else it is a specifier such as %h).  Control characters cannot be written."""
    if _CONTROL.search(text):
        raise ValueError(f"{text!r}: a systemd unit cannot hold control characters")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")


def _exec_word(word: str) -> str:
    """One ExecStart= argument: `$` doubled (ExecStart= expands $VAR, Environment= does not),
    quoted when it holds whitespace, quotes, a backslash or a `;` (a lone `;` separates
    commands), or is empty."""
    escaped = _systemd_value(word).replace("$", "$$")
    return f'"{escaped}"' if not word or _NEEDS_QUOTES.search(word) else escaped


def systemd_unit(exe: list[str], home: Path, nice: int | None = None,
                 env: dict | None = None) -> str:
    """The text of the systemd user unit qes-edge.service running `<exe...> daemon run`.

    KillMode=mixed sends SIGTERM to the daemon only, leaving any children to it until the
    timeout, so that nothing is killed under a step that the daemon is closing cleanly."""
    argv = _command(exe)
    if "$" in argv[0]:
        raise ValueError(f"{argv[0]}: systemd cannot run a program whose path holds '$' (it "
                         "expands $ in the arguments but not in the program's path)")
    service = [f"ExecStart={' '.join(_exec_word(w) for w in argv)}"]
    service += [f'Environment="{_systemd_value(f"{k}={v}")}"'
                for k, v in _environment(Path(home), env).items()]
    if nice is not None:
        service.append(f"Nice={check_nice(nice)}")
    service += ["Restart=on-failure", f"RestartSec={RESTART_DELAY_S}", "KillSignal=SIGTERM",
                "KillMode=mixed", f"TimeoutStopSec={STOP_TIMEOUT_S}"]
    return "\n".join([
        "# Written by qes-edge (qes_edge/agent/service.py); installing again replaces it.",
        "[Unit]",
        "Description=qes-edge overnight fine-tuning daemon",
        "",
        "[Service]",
        "Type=simple",
        *service,
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def launchd_plist(exe: list[str], home: Path, nice: int | None = None,
                  env: dict | None = None) -> str:
    """The text of the launchd agent org.qes-edge.daemon running `<exe...> daemon run`.

    KeepAlive restarts it only after a failure, ThrottleInterval spaces restarts like systemd's
    RestartSec, ExitTimeOut is the SIGTERM-to-SIGKILL wait, and ProcessType Background lets
    macOS throttle its CPU and IO as it does for other background agents."""
    home = Path(home)
    agent = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": _command(exe),
        "EnvironmentVariables": _environment(home, env),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": RESTART_DELAY_S,
        "ExitTimeOut": STOP_TIMEOUT_S,
        "ProcessType": "Background",
        "StandardOutPath": str(home / "launchd.out.log"),
        "StandardErrorPath": str(home / "launchd.err.log"),
    }
    if nice is not None:
        agent["Nice"] = check_nice(nice)
    return plistlib.dumps(agent).decode()


@dataclass
class InstallResult:
    """What install did.  path: the unit or agent file; written: False on a dry run or when the
    same file was there; replaced: a different file was there and was (or would be) replaced;
    manager_running: the service manager can start it here; commands: what the user runs to
    enable it; notes: anything else the user should read."""
    path: Path
    written: bool
    replaced: bool
    manager_running: bool
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.written:
            head = f"{'replaced' if self.replaced else 'wrote'} {self.path}"
        elif self.replaced:
            head = f"would replace {self.path} (dry run)"
        elif self.path.exists():
            head = f"{self.path} is up to date"
        else:
            head = f"would write {self.path}"
        lines = [head, *self.notes]
        lines += [f"to enable it: {c}" for c in self.commands]
        return "\n".join(lines)


def _run(argv: list[str], timeout: float = 10.0) -> tuple[bool, str]:
    """(succeeded, output or reason) of a short command; a missing program or a hang is a
    failure with its reason, never an exception."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def systemd_status() -> tuple[bool, str]:
    """(True, "") when systemd runs this machine and this user's manager answers; else (False,
    the reason, written to end the sentence "the unit was written but will not start until")."""
    if not SYSTEMD_RUNNING_MARK.is_dir():
        return False, ("systemd is not running here (no /run/systemd/system): the unit was "
                       "written but will not start until this machine boots with systemd (on "
                       "WSL: set systemd=true under [boot] in /etc/wsl.conf and restart it); "
                       f"{FALLBACK}")
    ok, output = _run(["systemctl", "--user", "show", "--property=Version"], timeout=5.0)
    if not ok:
        return False, ("systemd runs but this user's manager does not answer "
                       f"(systemctl --user: {output or 'no output'}): the unit was written but "
                       "will not start until you log in to a graphical or ssh session with "
                       f"systemd's user manager; {FALLBACK}")
    return True, ""


def _config_home(config_home: Path | None, system: str) -> Path:
    """Where service files go: XDG_CONFIG_HOME (~/.config) on Linux, ~/Library on macOS;
    config_home replaces either (the tests' temporary folder)."""
    if config_home is not None:
        return Path(config_home)
    if system == "Darwin":
        return Path.home() / "Library"
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    return Path(xdg) if os.path.isabs(xdg) else Path.home() / ".config"  # relative: ignored


def _write(path: Path, text: str, dry_run: bool) -> tuple[bool, bool]:
    """(written, replaced): writes text atomically unless the same text is there already."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = None
    if old == text:
        return False, False
    if not dry_run:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, "wb") as (_, f):
            f.write(text.encode())
    return not dry_run, old is not None


def install(exe: list[str], home: Path, system: str | None = None, dry_run: bool = False,
            config_home: Path | None = None, nice: int | None = None,
            env: dict | None = None) -> InstallResult:
    """Install the daemon to start at login for this user (system: platform.system() by
    default).  Raises ValueError on systems other than Linux and macOS."""
    system = system or platform.system()
    base = _config_home(config_home, system)
    if system == "Linux":
        return _install_systemd(systemd_unit(exe, home, nice, env),
                                base / "systemd" / "user" / UNIT_NAME, dry_run)
    if system == "Darwin":
        if not dry_run:
            Path(home).mkdir(parents=True, exist_ok=True)  # launchd does not create log folders
        return _install_launchd(launchd_plist(exe, home, nice, env),
                                base / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist", dry_run)
    raise ValueError(f"cannot install the daemon as a service on {system or 'this system'}: "
                     f"only Linux (systemd) and macOS (launchd) are supported; {FALLBACK}")


def _install_systemd(text: str, path: Path, dry_run: bool) -> InstallResult:
    written, replaced = _write(path, text, dry_run)
    running, why_not = systemd_status()
    result = InstallResult(path, written, replaced, running)
    if not running:
        result.notes.append(why_not)
        return result
    if not dry_run:
        ok, output = _run(["systemctl", "--user", "daemon-reload"])
        result.notes.append("ran systemctl --user daemon-reload" if ok else
                            f"systemctl --user daemon-reload failed: {output}")
    restart = " && systemctl --user restart qes-edge" if replaced else ""
    result.commands.append(ENABLE_SYSTEMD + restart)
    result.notes.append("to keep it running after you log out: loginctl enable-linger $USER")
    return result


def _install_launchd(text: str, path: Path, dry_run: bool) -> InstallResult:
    written, replaced = _write(path, text, dry_run)
    result = InstallResult(path, written, replaced, manager_running=True)
    quoted = shlex.quote(str(path))
    unload = f"launchctl unload {quoted} && " if replaced else ""
    result.commands.append(f"{unload}launchctl load -w {quoted}")
    return result
