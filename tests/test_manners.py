"""manners: when the daemon pauses (battery, heat) and how it lowers its priorities.

The sysfs trees are fakes built in tmp_path, shaped like the real ones of a laptop, a desktop and
a Jetson.  An unreadable attribute is a folder where a file should be: reading it fails with an
OSError even as root, as a sleeping device's attribute does."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qes_edge.agent import manners
from qes_edge.agent.manners import Manners, Zone, battery_state, be_nice, thermal_zones

ROOT = Path(__file__).resolve().parent.parent


def write_attrs(folder: Path, **attrs) -> Path:
    """A sysfs device folder; an attribute given as None is made unreadable."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in attrs.items():
        if value is None:
            (folder / name).mkdir()
        else:
            (folder / name).write_text(f"{value}\n")
    return folder


def mains(root: Path, online, name="AC"):
    return write_attrs(root / name, type="Mains", online=online)


def battery(root: Path, status, capacity, name="BAT0", **more):
    return write_attrs(root / name, type="Battery", status=status, capacity=capacity, **more)


def zone(root: Path, n: int, kind: str, milli) -> Path:
    return write_attrs(root / f"thermal_zone{n}", type=kind, temp=milli)


@pytest.fixture
def power(tmp_path):
    root = tmp_path / "power_supply"
    root.mkdir()
    return root


@pytest.fixture
def thermal(tmp_path):
    root = tmp_path / "thermal"
    root.mkdir()
    return root


def quiet(power: Path, thermal: Path, **kw) -> Manners:
    return Manners(power_root=power, thermal_root=thermal, **kw)


# ---- battery ----------------------------------------------------------------------------------

def test_laptop_on_mains_charging(power, thermal):
    mains(power, 1)
    battery(power, "Charging", 80)
    assert battery_state(power) == manners.BatteryState(False, 80.0, "sysfs")
    assert quiet(power, thermal).reason_to_pause() is None


def test_laptop_on_battery_discharging(power, thermal):
    mains(power, 0)
    battery(power, "Discharging", 37)
    assert battery_state(power) == manners.BatteryState(True, 37.0, "sysfs")
    assert quiet(power, thermal).reason_to_pause() == "on battery (37%)"
    assert quiet(power, thermal, pause_on_battery=False).reason_to_pause() is None


def test_battery_full_on_mains(power, thermal):
    mains(power, 1)
    battery(power, "Full", 100)
    assert not battery_state(power).on_battery
    assert quiet(power, thermal).reason_to_pause() is None


def test_desktop_without_battery(power, thermal):
    assert battery_state(power) is None
    mains(power, 1)
    # A wireless mouse's battery is the mouse's, not the machine's.
    battery(power, "Discharging", 20, name="hid-00:11:22-battery", scope="Device")
    assert battery_state(power) is None
    assert quiet(power, thermal).reason_to_pause() is None


def test_usb_c_charger(power, thermal):
    battery(power, "Charging", 55)
    charger = write_attrs(power / "ucsi-source-psy-USBC000:001", type="USB", online=1)
    assert not battery_state(power).on_battery
    (charger / "online").write_text("0\n")
    assert battery_state(power).on_battery
    write_attrs(power / "ucsi-source-psy-USBC000:002", type="USB_PD", online=2)
    assert not battery_state(power).on_battery


def test_offline_charger_means_on_battery_whatever_the_battery_says(power):
    mains(power, 0)
    battery(power, "Not charging", 90)
    assert battery_state(power).on_battery


def test_no_charger_listed_battery_status_decides(power):
    bat = battery(power, "Charging", 60)
    assert not battery_state(power).on_battery
    (bat / "status").write_text("Discharging\n")
    assert battery_state(power).on_battery


def test_two_batteries_mean_charge(power, thermal):
    mains(power, 0)
    battery(power, "Discharging", 30, name="BAT0")
    battery(power, "Unknown", 50, name="BAT1")
    assert battery_state(power).percent == 40.0
    assert quiet(power, thermal).reason_to_pause() == "on battery (40%)"


def test_unreadable_files_are_skipped(power, thermal):
    mains(power, None)                               # online unreadable: tells nothing
    battery(power, "Discharging", None)              # capacity unreadable
    write_attrs(power / "weird", type=None, online=1)  # type unreadable: not a supply we know
    write_attrs(power / "garbled", type="Mains", online="N/A")
    state = battery_state(power)
    assert state == manners.BatteryState(True, None, "sysfs")
    assert quiet(power, thermal).reason_to_pause() == "on battery"


def test_unreadable_battery_type_means_no_battery(power):
    write_attrs(power / "BAT0", type=None, status="Discharging", capacity=10)
    assert battery_state(power) is None


def fake_psutil(monkeypatch, result):
    battery_tuple = namedtuple("sbattery", "percent secsleft power_plugged")
    module = type(sys)("psutil")
    module.sensors_battery = lambda: None if result is None else battery_tuple(*result)
    monkeypatch.setitem(sys.modules, "psutil", module)


def test_without_sysfs_psutil_answers(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-sysfs"
    fake_psutil(monkeypatch, (42.0, 3600, False))
    assert battery_state(missing) == manners.BatteryState(True, 42.0, "psutil")
    fake_psutil(monkeypatch, (99.0, -2, True))
    assert battery_state(missing) == manners.BatteryState(False, 99.0, "psutil")
    fake_psutil(monkeypatch, (50.0, -2, None))      # unknown plug: do not pause on a guess
    assert not battery_state(missing).on_battery
    fake_psutil(monkeypatch, None)                  # psutil sees no battery
    assert battery_state(missing) is None
    monkeypatch.setitem(sys.modules, "psutil", None)  # psutil not installed
    assert battery_state(missing) is None


# ---- thermal ----------------------------------------------------------------------------------

def jetson(thermal: Path, cpu_milli=45500) -> None:
    zone(thermal, 0, "AO-therm", 40000)
    zone(thermal, 1, "CPU-therm", cpu_milli)
    zone(thermal, 2, "GPU-therm", 44000)
    zone(thermal, 3, "PMIC-Die", 100000)            # a real 100 °C is a reading, not an error
    zone(thermal, 4, "Tboard_tegra", -40000)        # disabled sensor
    zone(thermal, 5, "thermal-fan-est", 250000)     # absurd
    zone(thermal, 6, "iwlwifi_1", None)             # ENODATA while the card sleeps
    zone(thermal, 10, "Tdiode_tegra", 39000)
    write_attrs(thermal / "cooling_device0", type="pwm-fan", cur_state=0)


def test_jetson_zones(thermal):
    jetson(thermal)
    assert thermal_zones(thermal) == [
        Zone("thermal_zone0", "AO-therm", 40.0),
        Zone("thermal_zone1", "CPU-therm", 45.5),
        Zone("thermal_zone2", "GPU-therm", 44.0),
        Zone("thermal_zone3", "PMIC-Die", 100.0),
        Zone("thermal_zone10", "Tdiode_tegra", 39.0),
    ]


def test_zone_with_unreadable_type_still_counts(thermal):
    zone(thermal, 0, None, 50000)
    assert thermal_zones(thermal) == [Zone("thermal_zone0", "unknown", 50.0)]


def test_no_thermal_tree(tmp_path):
    assert thermal_zones(tmp_path / "missing") == []


def test_hot_zone_pauses_cool_zones_run(power, thermal):
    zone(thermal, 0, "acpitz", 50000)
    zone(thermal, 3, "CPU-therm", 91500)
    m = quiet(power, thermal)
    assert m.reason_to_pause() == "thermal zone thermal_zone3 (CPU-therm) at 91.5 °C > 85 °C"
    zone(thermal, 3, "CPU-therm", 60000)
    assert quiet(power, thermal).reason_to_pause() is None
    assert quiet(power, thermal, max_temp_c=55).reason_to_pause() == (
        "thermal zone thermal_zone3 (CPU-therm) at 60.0 °C > 55 °C")


def test_disabled_sensor_never_pauses(power, thermal):
    jetson(thermal)
    assert quiet(power, thermal, max_temp_c=101).reason_to_pause() is None


def test_heat_check_off(power, thermal):
    zone(thermal, 0, "x86_pkg_temp", 140000)
    assert quiet(power, thermal, max_temp_c=None).reason_to_pause() is None


def test_hysteresis_across_calls(power, thermal):
    m = quiet(power, thermal)
    for milli, paused in [(84000, False), (91500, True), (85000, True), (80100, True),
                          (80000, False), (84900, False), (85100, True), (70000, False)]:
        zone(thermal, 1, "CPU-therm", milli)
        reason = m.reason_to_pause()
        assert (reason is not None) == paused, (milli, reason)
    zone(thermal, 1, "CPU-therm", 91000)
    m.reason_to_pause()
    zone(thermal, 1, "CPU-therm", 82000)
    assert m.reason_to_pause() == ("cooling down: thermal zone thermal_zone1 (CPU-therm) at "
                                   "82.0 °C, resuming at 80 °C or below")
    assert quiet(power, thermal).reason_to_pause() is None  # a fresh object never paused


def test_battery_reason_comes_first_and_heat_state_still_updates(power, thermal):
    mains(power, 0)
    battery(power, "Discharging", 12)
    zone(thermal, 0, "CPU-therm", 90000)
    m = quiet(power, thermal)
    assert m.reason_to_pause() == "on battery (12%)"
    assert m.cooling
    (power / "AC" / "online").write_text("1\n")
    zone(thermal, 0, "CPU-therm", 83000)
    assert m.reason_to_pause().startswith("cooling down:")


@settings(max_examples=60, deadline=None)
@given(temps=st.lists(st.integers(-60000, 250000), max_size=6),
       limit=st.integers(20, 120))
def test_pause_iff_a_valid_zone_is_above_the_limit(temps, limit):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for n, milli in enumerate(temps):
            zone(root, n, "t", milli)
        valid = [m / 1000 for m in temps if -30000 <= m <= 150000]
        reason = Manners(max_temp_c=limit, power_root=root / "none",
                         thermal_root=root, pause_on_battery=False).reason_to_pause()
        assert (reason is not None) == any(c > limit for c in valid)


def test_from_env_points_at_a_fake_tree(tmp_path, monkeypatch):
    power = tmp_path / "class" / "power_supply"
    mains(power, 0)
    battery(power, "Discharging", 64)
    zone(tmp_path / "class" / "thermal", 0, "CPU-therm", 95000)
    monkeypatch.setenv("QES_EDGE_SYSFS", str(tmp_path))
    m = Manners.from_env(pause_on_battery=False, max_temp_c=90)
    assert (m.power_root, m.thermal_root) == (power, tmp_path / "class" / "thermal")
    assert m.reason_to_pause() == "thermal zone thermal_zone0 (CPU-therm) at 95.0 °C > 90 °C"
    assert Manners.from_env(True, None).reason_to_pause() == "on battery (64%)"
    monkeypatch.delenv("QES_EDGE_SYSFS")
    m = Manners.from_env()
    assert (m.power_root, m.thermal_root) == (Path("/sys/class/power_supply"),
                                              Path("/sys/class/thermal"))
    assert (m.pause_on_battery, m.max_temp_c) == (True, 85.0)


# ---- priorities -------------------------------------------------------------------------------

# Reads back this thread's IO priority with ioprio_get (x86_64: 252), so the check does not go
# through the psutil call it is checking.
PROBE = r"""
import ctypes, json, os, sys
if sys.argv[1] == "no-psutil":
    sys.modules["psutil"] = None
from qes_edge.agent.manners import be_nice
os.nice(int(sys.argv[2]))
notes = be_nice(int(sys.argv[3]), sys.argv[4])
prio = ctypes.CDLL(None, use_errno=True).syscall(252, 1, 0)
print(json.dumps({"nice": os.nice(0), "io_class": prio >> 13, "io_level": prio & 0x1fff,
                  "notes": notes}))
"""

linux_x86_64 = pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64",
    reason="reads the IO priority back with the x86_64 ioprio_get syscall number")


def probe(mode: str, start_nice: int, nice: int, ionice: str) -> dict:
    """be_nice in a child process, so that this test process keeps its priorities."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(start_nice), str(nice), ionice],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    return json.loads(out.stdout)


@linux_x86_64
def test_be_nice_raises_niceness_and_sets_idle_io():
    pytest.importorskip("psutil")
    got = probe("psutil", 0, 12, "idle")
    assert (got["nice"], got["io_class"]) == (12, manners.IOPRIO_CLASS_IDLE)
    assert got["notes"] == ["CPU niceness 0 -> 12", "IO priority idle"]


@linux_x86_64
def test_be_nice_through_the_syscall_without_psutil():
    got = probe("no-psutil", 0, 5, "best-effort:6")
    assert (got["nice"], got["io_class"], got["io_level"]) == (5, manners.IOPRIO_CLASS_BE, 6)
    assert got["notes"] == ["CPU niceness 0 -> 5", "IO priority best-effort:6"]
    got = probe("no-psutil", 0, 0, "idle")
    assert got["io_class"] == manners.IOPRIO_CLASS_IDLE


@linux_x86_64
def test_be_nice_never_lowers_niceness():
    got = probe("psutil", 15, 5, "best-effort")
    assert got["nice"] == 15
    assert got["notes"][0] == "CPU niceness already 15 (asked 5); left unchanged"
    assert (got["io_class"], got["io_level"]) == (manners.IOPRIO_CLASS_BE, 4)


@pytest.mark.parametrize("nice, ionice, message", [
    (-1, None, "nice must be an integer from 0 to 19"),
    (20, None, "nice must be an integer from 0 to 19"),
    ("5", None, "nice must be an integer"),
    (True, None, "nice must be an integer"),
    (5, "realtime", "ionice must be 'idle', 'best-effort' or 'best-effort:N'"),
    (None, "best-effort:8", "not 'best-effort:8'"),
    (None, "best-effort:", "ionice must be"),
    (None, "idle:3", "ionice must be"),
    (None, "", "ionice must be"),
])
def test_be_nice_rejects_bad_values_before_applying_anything(nice, ionice, message):
    before = os.nice(0)
    with pytest.raises(ValueError, match=message):
        be_nice(nice, ionice)
    assert os.nice(0) == before


def test_be_nice_with_nothing_asked_does_nothing():
    assert be_nice() == []


def test_io_priority_elsewhere_is_a_note(monkeypatch):
    monkeypatch.setattr(manners.platform, "system", lambda: "Darwin")
    assert be_nice(None, "idle") == ["IO priority left unchanged: not supported on Darwin"]
