"""bench.spawned.run_spawned: the same results in this process and in spawned workers."""

from bench.spawned import run_spawned


def _collect(jobs: int) -> dict:
    got: dict = {}
    calls = [(("row", i), (float(i * i),), {}) for i in range(4)]
    run_spawned("math", "sqrt", calls, jobs=jobs, on_result=got.__setitem__)
    return got


def test_run_spawned_gives_each_tag_its_own_result_serial_and_in_workers():
    expected = {("row", i): float(i) for i in range(4)}
    assert _collect(1) == expected
    assert _collect(2) == expected


def test_run_spawned_passes_keyword_arguments():
    got = []
    run_spawned("builtins", "int", [("a", ("ff",), {"base": 16}), ("b", ("10",), {"base": 2})],
                jobs=2, on_result=lambda tag, value: got.append((tag, value)))
    assert sorted(got) == [("a", 255), ("b", 2)]
