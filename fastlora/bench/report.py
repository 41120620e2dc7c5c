"""Results on disk: ``results.json`` (every row), ``results.md`` (a section of tables per suite) and PNG plots, all
drawn from rows, never from live measurements.

A folder holds one device's results. Running some suites into a folder that already has results keeps the rows of
the other suites (when they were measured on the same device) and replaces those of the suites run; results.md and
every plot are then drawn again from the merged rows, so no file is left from an older run of a suite that the
tables no longer show. Each row carries its own environment (device, versions, timestamp), and each suite's
section says when it was measured.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .common import CPU_DISCLAIMER, ENV_KEYS, Suite

JSON, MARKDOWN = "results.json", "results.md"


@dataclasses.dataclass(frozen=True)
class Written:
    """The files ``write_results`` wrote."""

    json: Path
    markdown: Path
    plots: tuple[Path, ...]
    rows: tuple[dict, ...] = ()  # every row now in results.json: this run's and the other suites' kept
    targets: Path | None = None  # targets.md, written by headline runs


def environment_of(rows: list[dict]) -> dict:
    if not rows:
        raise ValueError("fastlora.bench: no rows to write")
    return {key: rows[0].get(key) for key in ENV_KEYS}


def read_rows(out_dir: str | Path) -> list[dict]:
    """The rows of ``out_dir/results.json``, or none when it is missing or unreadable."""
    path = Path(out_dir) / JSON
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return rows if isinstance(rows, list) else []


def merge_rows(old: list[dict], new: list[dict], suites: dict[str, Suite]) -> list[dict]:
    """``new``, plus the rows of ``old`` from other suites measured on the same device, ordered by suite."""
    run = {row["suite"] for row in new}
    device = new[0]["device"] if new else None
    kept = [
        row for row in old if row.get("suite") in suites and row["suite"] not in run and row.get("device") == device
    ]
    order = {name: i for i, name in enumerate(suites)}
    return sorted(kept + new, key=lambda row: order[row["suite"]])  # stable: the order within a suite stays


def _measured(env: dict) -> str:
    quick = " (`--quick`: a smoke run)" if env.get("quick") else ""
    quick += " (`--headline`: the cases of the README's targets)" if env.get("headline") else ""
    return (
        f"Measured {env['timestamp']} on {env['device']}: torch {env['torch']}, triton {env['triton']}, fastlora "
        f"{env['fastlora']}, backend `{env['backend']}`{quick}."
    )


def format_markdown(rows: list[dict], suites: dict[str, Suite]) -> str:
    """The report: the device, the CPU disclaimer when it applies, then a section per suite with its tables."""
    env = environment_of(rows)
    lines = [f"# fastlora benchmarks: {env['device']}"]
    if env["device_type"] != "cuda":
        lines += ["", f"**{CPU_DISCLAIMER}**"]
    by_suite: dict[str, list[dict]] = {}
    for row in rows:
        by_suite.setdefault(row["suite"], []).append(row)
    for name, group in by_suite.items():
        lines += ["", f"## {name}", "", _measured(environment_of(group)), "", *suites[name].markdown(group)]
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], out_dir: str | Path, suites: dict[str, Suite], merge: bool = True) -> Written:
    """Write ``rows`` (merged with the other suites' rows already in ``out_dir`` unless ``merge=False``) as
    ``results.json``, ``results.md`` and each suite's plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment_of(rows)  # this run's; each suite's own is under "suites"
    rows = merge_rows(read_rows(out_dir), rows, suites) if merge else rows
    by_suite = {name: [row for row in rows if row["suite"] == name] for name in suites}
    document = {
        "environment": env,
        "suites": {name: environment_of(group) for name, group in by_suite.items() if group},
        "rows": rows,
    }
    json_path, md_path = out_dir / JSON, out_dir / MARKDOWN
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path.write_text(format_markdown(rows, suites))
    plots: list[Path] = []
    for name, suite in suites.items():
        for stale in suite.plot_names:
            (out_dir / stale).unlink(missing_ok=True)
        if by_suite[name]:
            plots += suite.plots(by_suite[name], out_dir)
    return Written(json_path, md_path, tuple(plots), tuple(rows))
