"""Rules the test suite keeps: timings belong in benchmarks, so no test asserts how long
something took (on a loaded machine such a test fails for no defect of satrun)."""

from __future__ import annotations

import re
from pathlib import Path

CLOCKS = r"(?:time\.perf_counter|time\.monotonic|time\.time|perf_counter|monotonic)\(\)"


def wall_clock_asserts(source: str) -> list[str]:
    """Assertions that compare a measured duration with a limit: ``clock() - start < N`` inside
    the assert, or a name assigned such a difference and then asserted below a number."""
    durations = set(re.findall(rf"^\s*(\w+)\s*=\s*{CLOCKS}\s*-", source, re.M))
    found = []
    for line in source.splitlines():
        if not line.strip().startswith("assert"):
            continue
        if re.search(rf"{CLOCKS}\s*-\s*\w+\s*[<>]", line) or any(re.search(rf"\b{name}\s*<=?\s*\d", line) for name in durations):
            found.append(line.strip())
    return found


def test_no_test_asserts_a_wall_clock_limit() -> None:
    tests = Path(__file__).resolve().parent
    found = {str(p.relative_to(tests)): hits for p in sorted(tests.rglob("*.py"))
             if p.name != Path(__file__).name and (hits := wall_clock_asserts(p.read_text()))}
    assert not found, found


def test_the_rule_finds_the_forms_it_forbids() -> None:
    assert wall_clock_asserts("    seconds = time.perf_counter() - started\n    assert seconds < 60, seconds\n")
    assert wall_clock_asserts("    assert result.returncode == 2 and time.monotonic() - started < 20\n")
    assert not wall_clock_asserts("    assert proc.poll() is None and time.monotonic() < deadline\n")  # a guard against a hang
