"""Issue 4's goals, checked against one run of `make bench`.

goal_rows() turns the rows that bench.run and bench.persist measured into
one row per goal: what was measured, against what, and whether the goal is
met.  It only reads the rows; a goal whose cells were not measured (a
server left out with --servers, wrk not installed, --million 0) is left out.

Throughput and latency goals compare the *means* of every run of a cell,
not the table's best run: each server ran the cell the same number of
times, interleaved (see bench.run.measure_load), and a mean is what a
repeated run would settle on.  The ratios of single pairs of runs, taken
seconds apart, are shown next to it, because on a shared VM they spread
widely and a reader should see how widely.
"""

OURS = "server:always"


def _find(rows, match):
    """The first row whose test name satisfies `match`, or None."""
    return next((row for row in rows if match(row["test"])), None)


def _cell(results, server, test):
    return _find(results.get(server, ()), lambda name: name == test)


def _runs(row, key):
    """Every run's value of `key` for a load cell (the best run's alone, if only that is kept)."""
    return row.get("runs_" + key) or [row[key]]


def _mean(values):
    return sum(values) / len(values)


def _ratio_row(goal, ours, other, key, bound, at_least):
    """A goal on the ratio of our mean to another server's, with the single pairs' range."""
    mine, theirs = _runs(ours, key), _runs(other, key)
    if None in mine or None in theirs or not all(theirs):
        # A run without a single reply has no p99, and nothing to divide by.
        return {"goal": goal, "measured": "no figure: a run had no replies", "ratio": None,
                "pairs": [], "met": False}
    ratio = _mean(mine) / _mean(theirs)
    measured = "%.2fx" % ratio
    pairs = [m / t for m, t in zip(mine, theirs)]
    if len(pairs) > 1:
        measured += " (single pairs %.2fx-%.2fx)" % (min(pairs), max(pairs))
    met = ratio >= bound if at_least else ratio <= bound
    return {"goal": goal, "measured": measured, "ratio": ratio, "pairs": pairs, "met": met}


def _load_goals(results):
    rows = []
    for label in ("", "wrk "):
        for method, naive_bound, asyncio_bound in (("GET", 10, 0.5), ("PUT", 10, 0.35)):
            test = "%s%s c=64" % (label, method)
            ours = _cell(results, OURS, test)
            if ours is None:
                continue
            for name, bound in (("naive", naive_bound), ("asyncio", asyncio_bound)):
                other = _cell(results, name, test)
                if other is not None:
                    rows.append(_ratio_row("%s req/s: at least %gx %s's" % (test, bound, name),
                                           ours, other, "rps", bound, at_least=True))
        test = "%sGET c=256" % label
        ours, other = _cell(results, OURS, test), _cell(results, "asyncio", test)
        if ours is not None and other is not None:
            rows.append(_ratio_row("%s: p99 at most 10x asyncio's" % test,
                                   ours, other, "p99_ms", 10, at_least=False))
    return rows


def _burst_goal(results):
    ours, other = (_find(results.get(name, ()), lambda test: test.startswith("burst "))
                   for name in (OURS, "asyncio"))
    if ours is None or other is None:
        return []
    size = ours["answered"] + ours["errors"]
    ratio = ours["seconds"] / other["seconds"]
    return [{"goal": "burst of %d: every request answered, in at most 3x asyncio's time" % size,
             "measured": "%d/%d answered 200; %.1f s against %.1f s: %.2fx"
                         % (ours["ok"], size, ours["seconds"], other["seconds"], ratio),
             "ratio": ratio, "met": ours["ok"] == size and ratio <= 3}]


def _million_goals(persistence):
    rows = []
    for suffix, goal, mine, bare, bound in (
            ("SIGTERM to exit", "SIGTERM to exit at most 2x a bare pickle and fsync",
             "seconds", "bare_s", 2),
            ("start to serving", "start to serving at most 2x a bare unpickle",
             "seconds", "bare_s", 2),
            ("server RSS", "RSS at most 1.3x a bare process holding the dict",
             "rss_kib", "bare_rss_kib", 1.3)):
        row = _find(persistence, lambda test: test.endswith(suffix))
        if row is None:
            continue
        ratio = row[mine] / row[bare]
        rows.append({"goal": "%s: %s" % (row["test"].split(":")[0], goal),
                     "measured": "%.2fx" % ratio, "ratio": ratio, "met": ratio <= bound})
    return rows


def goal_rows(results, persistence):
    """One dict per goal: goal, measured (text), ratio, met."""
    return _load_goals(results) + _burst_goal(results) + _million_goals(persistence)


def markdown(rows):
    lines = ["| goal | measured | verdict |", "|---|---|---|"]
    for row in rows:
        lines.append("| %s | %s | %s |" % (row["goal"], row["measured"],
                                            "met" if row["met"] else "**not met**"))
    return "\n".join(lines)
