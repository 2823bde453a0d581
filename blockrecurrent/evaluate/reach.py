"""How far a probe model's memory reaches: recall scored at multiples of the distance it was
trained at, as a table (`brt probe --beyond 4 16 64`).

Rows are the recall probe's (evaluate/probes.py): a row with `factor` f > 1 scores a model
trained at distances up to `trained_distance` D with the keys f * D blocks before the question.
Everything beyond D is length generalisation: the state must keep what it stored over blocks
of filler that training never showed it.
"""

from __future__ import annotations

from .report import _table

BEYOND = (4, 16, 64)  # the default multiples of the trained distance


def check_beyond(beyond) -> tuple[int, ...]:
    """The multiples to score at, each an int >= 2 (an empty sequence: none)."""
    out = tuple(beyond)
    bad = [f for f in out if isinstance(f, bool) or not isinstance(f, int) or f < 2]
    if bad:
        raise ValueError(f"beyond must hold ints >= 2 (multiples of the trained distance), "
                         f"got {bad}")
    return out


def reach_table(rows: list[dict], markdown: bool = True) -> str:
    """Accuracy at the trained distance D and at each multiple of it, per model, K and D (mean
    over seeds); '(w)' marks an answer within the windows' reach."""
    cells: dict = {}
    factors = sorted({r.get("factor", 1) for r in rows})
    for r in rows:
        if r.get("trained_distance") is None or (r.get("factor", 1) == 1
                                                 and r["distance"] != r["trained_distance"]):
            continue  # a mixed run's shorter trained distances are in the main table
        key = (r["model"], r["num_keys"], r["trained_distance"])
        cells.setdefault(key, {}).setdefault(r.get("factor", 1), []).append(r)
    header = ["model", "K", "trained at D (blocks)"] + [
        "D" if f == 1 else f"{f}D" for f in factors]
    body = []
    for (model, k, d), by_f in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0] !=
                                                                       "recurrent", kv[0])):
        row = [model, str(k), str(d)]
        for f in factors:
            rs = by_f.get(f)
            if not rs:
                row.append("-")
                continue
            mean = sum(r["accuracy"] for r in rs) / len(rs)
            row.append(f"{mean:.2f} ({f * d})" + ("" if rs[0]["beyond_reach"] else " (w)"))
        body.append(row)
    return _table(header, body, markdown)
