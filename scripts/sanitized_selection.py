"""Prints the emu tests that the sanitized (ASan/UBSan) run executes: every test
function that has an emu variant, with two of its parameter sets (the first,
usually the smallest shape, and the middle one), so that every emulated kernel
runs under the sanitizers within a bounded time. tests/test_deterministic.py is
left out: it reruns the same kernels on large shapes to compare bits, which the
sanitizers add nothing to. Reads `pytest --collect-only -q` output on stdin."""
import collections
import sys

by_function = collections.OrderedDict()
for line in sys.stdin:
    node = line.strip()
    if node.startswith("tests/test_deterministic.py"):
        continue
    if "::" not in node or "[" not in node:
        if "::" in node:
            by_function.setdefault(node, []).append(node)
        continue
    by_function.setdefault(node.split("[", 1)[0], []).append(node)
for ids in by_function.values():
    for node in sorted({ids[0], ids[len(ids) // 2]}, key=ids.index):
        print(node)
