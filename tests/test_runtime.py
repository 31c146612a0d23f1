"""nanoseek/_runtime.py: how much memory a new allocation can take (MemAvailable, memory cgroups)."""

from __future__ import annotations

from nanoseek import _runtime


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_meminfo_available(tmp_path):
    meminfo = tmp_path / "meminfo"
    _write(meminfo, "MemTotal:       24000000 kB\nMemFree:          100 kB\nMemAvailable:   20000000 kB\n")
    assert _runtime._meminfo_available(str(meminfo)) == 20000000 * 1024
    _write(meminfo, "MemTotal: 1 kB\n")  # an old kernel without the field
    assert _runtime._meminfo_available(str(meminfo)) is None
    assert _runtime._meminfo_available(str(tmp_path / "missing")) is None


def test_cgroup_room_v2_takes_the_tightest_ancestor(tmp_path):
    proc = tmp_path / "cgroup"
    _write(proc, "0::/a/b\n")
    root = tmp_path / "sys"
    _write(root / "a/b/memory.max", "max\n")  # the process's own cgroup: unlimited
    _write(root / "a/b/memory.current", "100\n")
    _write(root / "a/memory.max", "1000\n")  # its parent: 1000 bytes, 400 used
    _write(root / "a/memory.current", "400\n")
    assert _runtime._cgroup_room(str(proc), str(root)) == 600
    _write(root / "a/memory.max", "max\n")
    assert _runtime._cgroup_room(str(proc), str(root)) is None  # nothing limited
    _write(root / "memory.max", "500\n")  # the root (read as written; real roots have no memory.max)
    _write(root / "memory.current", "700\n")
    assert _runtime._cgroup_room(str(proc), str(root)) == 0  # over the limit: no room, never negative


def test_cgroup_room_v1_memory_controller(tmp_path):
    proc = tmp_path / "cgroup"
    _write(proc, "5:cpu,cpuacct:/x\n4:memory:/job\n0::/\n")
    root = tmp_path / "sys"
    _write(root / "memory/job/memory.limit_in_bytes", str(8 << 30) + "\n")
    _write(root / "memory/job/memory.usage_in_bytes", str(3 << 30) + "\n")
    _write(root / "memory/memory.limit_in_bytes", "9223372036854771712\n")  # v1's "unlimited"
    _write(root / "memory/memory.usage_in_bytes", "1\n")
    assert _runtime._cgroup_room(str(proc), str(root)) == 5 << 30
    assert _runtime._cgroup_room(str(tmp_path / "missing"), str(root)) is None


def test_available_memory_on_this_machine():
    got = _runtime.available_memory("cpu")
    assert got is None or got > 0
    assert _runtime.available_memory("meta") is None
