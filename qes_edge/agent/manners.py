"""When the overnight daemon should pause, and how it keeps out of the owner's way.

The daemon trains on laptops and Jetsons that people also use.  Between steps it asks
`Manners.reason_to_pause()`: a laptop that has gone on battery should not be drained by a
training run, and a fanless board or a laptop in a bag should not be cooked by one.  Both are
read from Linux sysfs (`/sys/class/power_supply`, `/sys/class/thermal`); `QES_EDGE_SYSFS`
replaces the `/sys` prefix so that tests (and odd systems) can point at a fake tree.  Elsewhere
(macOS, Windows) the battery comes from psutil and there are no thermal zones, so heat never
pauses there.

`be_nice()` lowers the process's CPU and IO priority once, at start, so that an interactive user
hardly notices the run."""

from __future__ import annotations

import ctypes
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

SYSFS_ENV = "QES_EDGE_SYSFS"
POWER_ROOT = "/sys/class/power_supply"
THERMAL_ROOT = "/sys/class/thermal"

# Sensors outside this range are disabled or broken (Jetsons report -40 °C or 100+ °C for
# zones whose sensor is off); they must neither pause the daemon nor keep it paused.
VALID_C = (-30.0, 150.0)
# Once paused for heat, resume only this far below the limit, so that a zone hovering at the
# limit does not toggle the daemon every step.
RESUME_BELOW_C = 5.0

# Supplies that power the machine from outside when `online` is non-zero.  USB covers the
# kernel's USB_* variants (USB_C, USB_PD, ...).
_EXTERNAL = ("Mains", "USB", "Wireless", "BrickID")


def _read(path: Path) -> str | None:
    """A sysfs attribute's text, or None when it is absent or cannot be read: many attributes
    fail with EIO/ENODATA while their device sleeps, and that must not crash the daemon."""
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class BatteryState:
    """on_battery: the machine runs from its battery now; percent: the charge left (mean over
    the batteries that report it) or None; source: "sysfs" or "psutil"."""
    on_battery: bool
    percent: float | None
    source: str


def battery_state(root: str | Path = POWER_ROOT) -> BatteryState | None:
    """The machine's battery state, or None when it has no battery (a desktop, a server).

    Batteries of peripherals (a mouse, a headset: `scope` is Device) are not the machine's and
    are ignored.  The machine is on battery when no external supply (Mains, USB*, Wireless) is
    online; where the kernel lists no readable external supply, a battery reporting Discharging
    decides, since without a charger entry the battery's own status is the only evidence.
    When root does not exist (not Linux) psutil answers, if it is installed."""
    root = Path(root)
    if not root.is_dir():
        return _psutil_battery()
    batteries, online = [], []
    for supply in sorted(root.iterdir()):
        kind = _read(supply / "type")
        if kind == "Battery" and _read(supply / "scope") != "Device":
            batteries.append(supply)
        elif kind is not None and kind.startswith(_EXTERNAL):
            online.append(_int(_read(supply / "online")))
    if not batteries:
        return None
    online = [o for o in online if o is not None]  # an unreadable charger tells nothing
    if online:
        on_battery = not any(online)
    else:
        on_battery = any(_read(b / "status") == "Discharging" for b in batteries)
    levels = [c for c in (_int(_read(b / "capacity")) for b in batteries) if c is not None]
    percent = sum(levels) / len(levels) if levels else None
    return BatteryState(on_battery, percent, "sysfs")


def _psutil_battery() -> BatteryState | None:
    """psutil's view of the battery where there is no sysfs.  An unknown plug state counts as
    on mains: the daemon should not stop on a guess."""
    try:
        import psutil
        battery = psutil.sensors_battery()
    except (ImportError, AttributeError, OSError, RuntimeError):
        return None
    if battery is None:
        return None
    return BatteryState(battery.power_plugged is False, battery.percent, "psutil")


@dataclass(frozen=True)
class Zone:
    name: str      # the sysfs folder, e.g. thermal_zone3
    type: str      # what the driver calls it, e.g. x86_pkg_temp or CPU-therm
    celsius: float


def _zone_number(path: Path) -> tuple[int, str]:
    digits = re.sub(r"\D", "", path.name)
    return (int(digits) if digits else -1, path.name)


def thermal_zones(root: str | Path = THERMAL_ROOT) -> list[Zone]:
    """The readable thermal zones with a plausible temperature, in zone order.  Zones whose
    `temp` cannot be read (a sleeping Wi-Fi card answers ENODATA) or reads outside -30..150 °C
    (a disabled Jetson sensor) are left out."""
    root = Path(root)
    if not root.is_dir():
        return []
    zones = []
    for folder in sorted(root.glob("thermal_zone*"), key=_zone_number):
        milli = _int(_read(folder / "temp"))
        if milli is None:
            continue
        celsius = milli / 1000.0
        if VALID_C[0] <= celsius <= VALID_C[1]:
            zones.append(Zone(folder.name, _read(folder / "type") or "unknown", celsius))
    return zones


def _zone_text(zone: Zone) -> str:
    return f"thermal zone {zone.name} ({zone.type}) at {zone.celsius:.1f} °C"


@dataclass
class Manners:
    """Whether the daemon may run now.  pause_on_battery: pause while the machine runs from its
    battery; max_temp_c: pause while any thermal zone is above it (None: never for heat).

    The object remembers whether it paused for heat (`cooling`): from then on it keeps pausing
    until every zone is at least 5 °C below max_temp_c, so ask the same object every time."""
    pause_on_battery: bool = True
    max_temp_c: float | None = 85.0
    power_root: Path = Path(POWER_ROOT)
    thermal_root: Path = Path(THERMAL_ROOT)
    cooling: bool = field(default=False, init=False)

    @classmethod
    def from_env(cls, pause_on_battery: bool = True, max_temp_c: float | None = 85.0) -> Manners:
        """Manners reading the sysfs tree under $QES_EDGE_SYSFS (default /sys)."""
        sysfs = Path(os.environ.get(SYSFS_ENV) or "/sys")
        return cls(pause_on_battery, max_temp_c,
                   sysfs / "class" / "power_supply", sysfs / "class" / "thermal")

    def reason_to_pause(self) -> str | None:
        """A short human reason to pause now, or None when the daemon may run.  Heat is checked
        even when the battery already says pause, so that the cooling state stays current."""
        heat = self._heat_reason()
        if self.pause_on_battery:
            battery = battery_state(self.power_root)
            if battery is not None and battery.on_battery:
                charge = f" ({battery.percent:.0f}%)" if battery.percent is not None else ""
                return f"on battery{charge}"
        return heat

    def _heat_reason(self) -> str | None:
        if self.max_temp_c is None:
            return None
        zones = thermal_zones(self.thermal_root)
        hottest = max(zones, key=lambda z: z.celsius, default=None)
        limit = self.max_temp_c
        if hottest is not None and hottest.celsius > limit:
            self.cooling = True
            return f"{_zone_text(hottest)} > {limit:g} °C"
        resume_at = limit - RESUME_BELOW_C
        if self.cooling and hottest is not None and hottest.celsius > resume_at:
            return f"cooling down: {_zone_text(hottest)}, resuming at {resume_at:g} °C or below"
        self.cooling = False
        return None


# ---- priorities -------------------------------------------------------------------------------

IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_BE = 2
IOPRIO_CLASS_IDLE = 3
# ioprio_set by machine; ioprio_get is the next number on each of them.
IOPRIO_SET_SYSCALL = {"x86_64": 251, "amd64": 251, "aarch64": 30, "arm64": 30, "arm": 314}
DEFAULT_BEST_EFFORT_LEVEL = 4  # what ionice(1) uses when no level is given


def check_nice(nice: int) -> int:
    """nice as a niceness the daemon may ask for: 0 (normal) to 19 (lowest), never negative,
    since raising priority needs privileges a user's daemon does not have."""
    if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
        raise ValueError(f"nice must be an integer from 0 to 19, not {nice!r}")
    return nice


def parse_ionice(ionice: str) -> tuple[int, int]:
    """'idle', 'best-effort' or 'best-effort:N' (N 0..7, 7 lowest) as (ioprio class, level)."""
    text = ionice.strip().lower() if isinstance(ionice, str) else ""
    if text == "idle":
        return IOPRIO_CLASS_IDLE, 0
    if text == "best-effort":
        return IOPRIO_CLASS_BE, DEFAULT_BEST_EFFORT_LEVEL
    match = re.fullmatch(r"best-effort:([0-7])", text)
    if match:
        return IOPRIO_CLASS_BE, int(match.group(1))
    raise ValueError(f"ionice must be 'idle', 'best-effort' or 'best-effort:N' with N from "
                     f"0 to 7, not {ionice!r}")


def be_nice(nice: int | None = None, ionice: str | None = None) -> list[str]:
    """Lower this process's CPU priority to niceness `nice` (never raising it) and its IO
    priority to `ionice`; returns what was done, or why not, as lines for the daemon's log.

    Both values are checked before anything is applied (ValueError).  On Linux both settings
    belong to the calling thread and are inherited by threads started after it, so call this
    from the main thread before any worker (OpenMP, llama.cpp) thread exists."""
    if nice is not None:
        check_nice(nice)
    io = parse_ionice(ionice) if ionice is not None else None
    done = []
    if nice is not None:
        done.append(_lower_cpu_priority(nice))
    if io is not None:
        done.append(_lower_io_priority(*io, label=ionice.strip().lower()))
    return done


def _lower_cpu_priority(nice: int) -> str:
    if not hasattr(os, "nice"):
        return f"CPU priority left unchanged: {platform.system()} has no os.nice"
    current = os.nice(0)
    if current >= nice:
        return f"CPU niceness already {current} (asked {nice}); left unchanged"
    return f"CPU niceness {current} -> {os.nice(nice - current)}"


def _lower_io_priority(io_class: int, level: int, label: str) -> str:
    if platform.system() != "Linux":
        return f"IO priority left unchanged: not supported on {platform.system()}"
    try:
        import psutil
    except ImportError:
        return _ioprio_syscall(io_class, level, label)
    try:
        psutil.Process().ionice(io_class, level if io_class == IOPRIO_CLASS_BE else None)
    except (OSError, psutil.Error) as e:
        return f"IO priority left unchanged: {e}"
    return f"IO priority {label}"


def _ioprio_syscall(io_class: int, level: int, label: str) -> str:
    """ioprio_set(IOPRIO_WHO_PROCESS, 0 = this thread, class << 13 | level) through libc."""
    machine = platform.machine().lower()
    number = IOPRIO_SET_SYSCALL.get("arm" if machine.startswith("armv") else machine)
    if number is None:
        return f"IO priority left unchanged: ioprio_set's number on {machine} is not known"
    libc = ctypes.CDLL(None, use_errno=True)
    prio = io_class << IOPRIO_CLASS_SHIFT | level
    if libc.syscall(number, IOPRIO_WHO_PROCESS, 0, prio) != 0:
        return f"IO priority left unchanged: {os.strerror(ctypes.get_errno())}"
    return f"IO priority {label}"
