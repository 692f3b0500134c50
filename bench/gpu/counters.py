"""Reads the snapshots of the engine's counters that bench/gpu/run-gpu.sh takes from /metrics."""

import pathlib


def counters(path: pathlib.Path) -> dict:
    """`isthmus_local_NAME_total{...} VALUE` lines, summed over labels, by NAME."""
    values = {}
    for line in path.read_text().splitlines():
        name, value = line.rsplit(" ", 1)
        key = name.split("{")[0].removeprefix("isthmus_local_").removesuffix("_total")
        values[key] = values.get(key, 0.0) + float(value)
    return values
