"""The goals (issues 19, 24, 27 and 28), checked against one run of `make bench`.

goal_rows() turns the rows that bench.run and bench.persist measured into
one row per goal: what was measured, against what, and whether the goal is
met.  It only reads the rows; a goal whose cells were not measured (a
server left out with --servers, wrk not installed, --sizes without the
size, --checkpoint-keys 0) is left out.

Every goal is a ratio within the same run, our server on its defaults
against the asyncio server, the naive one, a bare Python script, or
itself without the thing that disturbs it:

    GET c=64 req/s        >= 0.6x asyncio's, >= 10x naive's
    PUT c=64 req/s        >= 0.45x asyncio's, >= 10x naive's  (--fsync always)
    GET c=256 p99         <= 2x asyncio's
    pipelined bulk load   the preload (4 connections, 100 PUTs in flight on
                          each) >= 1x our own PUT c=64 req/s
    burst of 10,000 PUT   every request answered, in <= 1.5x asyncio's time
    1,000,000 keys        start to serving <= 1.5x a bare unpickle,
                          SIGTERM to exit <= 1.5x a bare pickle and fsync,
                          RSS <= 1.3x a bare process holding the dict
    checkpoints           PUT c=64 p99 while checkpoints of 1,000,000 keys
                          run <= 3x the p99 without
    watches               GET and PUT c=64 req/s with 1,000 watches held
                          >= 0.9x without
    expiry                PUT c=64 p99 while 100,000 keys expire <= 2x without
    import by batches     1,000,000 keys by POST /batch >= 1x the keys/s of
                          the preload (pipelined PUTs)
    export                1,000,000 keys by GET /export <= 3x the time of
                          GET /snapshot of the same store
    writers beside an     PUT c=64 p99 while exports of 1,000,000 keys run
    export                <= 2x the p99 without

Throughput and latency goals compare the *means* of every run of a cell,
not the table's best run: each side ran the cell the same number of times,
interleaved (see bench.run.measure_load), and a mean is what a repeated run
would settle on.  The ratios of single pairs of runs, taken seconds apart,
are shown next to it, because on a shared VM they spread widely and a
reader should see how widely.
"""

OURS = "server"             # our server's column in bench.run's results

# (method, {other server: least ratio of our req/s to its})
THROUGHPUT_GOALS = (("GET", {"naive": 10, "asyncio": 0.6}),
                    ("PUT", {"naive": 10, "asyncio": 0.45}))
THROUGHPUT_CONNECTIONS = 64
TAIL_CONNECTIONS, TAIL_BOUND = 256, 2          # GET p99 at most 2x asyncio's
BULK_BOUND = 1.0                               # pipelined bulk load: at least PUT c=64's rate
BURST_BOUND = 1.5                              # in at most 1.5x asyncio's time
GOAL_KEYS = 1000000                            # the size the persistence goals are about
# (figure, what the bare baseline did, our key, the baseline's key, greatest ratio)
SCALE_GOALS = (("start to serving", "a bare unpickle", "seconds", "bare_s", 1.5),
               ("SIGTERM to exit", "a bare pickle and fsync", "seconds", "bare_s", 1.5),
               ("server RSS", "a bare process holding the dict", "rss_kib", "bare_rss_kib", 1.3))
CHECKPOINT_P99_BOUND = 3
WATCH_BOUND = 0.9                              # req/s with 1,000 watches held, against none
EXPIRY_P99_BOUND = 2                           # PUT p99 while keys expire, against none
IMPORT_BOUND = 1.0             # POST /batch keys/s: at least the preload's
EXPORT_BOUND = 3.0             # GET /export: at most 3x GET /snapshot's time
EXPORT_P99_BOUND = 2           # PUT c=64 p99 beside exports: at most 2x without


def _find(rows, match):
    """The first row that satisfies `match`, or None."""
    return next((row for row in rows if match(row)), None)


def _cell(results, server, test):
    return _find(results.get(server, ()), lambda row: row["test"] == test)


def _runs(row, key):
    """Every run's value of `key` for a load cell (the best run's alone, if only that is kept)."""
    return row.get("runs_" + key) or [row[key]]


def _mean(values):
    return sum(values) / len(values)


def _ratio_row(goal, ours, other, key, bound, at_least):
    """A goal on the ratio of our mean to another's, with the single pairs' range."""
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
        for method, bounds in THROUGHPUT_GOALS:
            test = "%s%s c=%d" % (label, method, THROUGHPUT_CONNECTIONS)
            ours = _cell(results, OURS, test)
            if ours is None:
                continue
            for name, bound in sorted(bounds.items()):
                other = _cell(results, name, test)
                if other is not None:
                    rows.append(_ratio_row("%s req/s: at least %gx %s's" % (test, bound, name),
                                           ours, other, "rps", bound, at_least=True))
        test = "%sGET c=%d" % (label, TAIL_CONNECTIONS)
        ours, other = _cell(results, OURS, test), _cell(results, "asyncio", test)
        if ours is not None and other is not None:
            rows.append(_ratio_row("%s: p99 at most %gx asyncio's" % (test, TAIL_BOUND),
                                   ours, other, "p99_ms", TAIL_BOUND, at_least=False))
    return rows


def _bulk_goal(results):
    """The preload (pipelined PUTs over a few connections) against our PUT c=64 req/s."""
    ours = results.get(OURS, ())
    bulk = _find(ours, lambda row: row["test"].startswith("preload "))
    put = _cell(results, OURS, "PUT c=%d" % THROUGHPUT_CONNECTIONS)
    if bulk is None or put is None or not bulk.get("seconds"):
        return []
    rate = bulk["ok"] / bulk["seconds"]
    ratio = rate / _mean(_runs(put, "rps"))
    return [{"goal": "pipelined bulk load (preload): at least %gx our PUT c=%d req/s"
                     % (BULK_BOUND, THROUGHPUT_CONNECTIONS),
             "measured": "%.0f/s against %.0f/s: %.2fx" % (rate, _mean(_runs(put, "rps")), ratio),
             "ratio": ratio, "met": ratio >= BULK_BOUND}]


def _burst_goal(results):
    ours, other = (_find(results.get(name, ()), lambda row: row["test"].startswith("burst "))
                   for name in (OURS, "asyncio"))
    if ours is None or other is None:
        return []
    size = ours["answered"] + ours["errors"]
    ratio = ours["seconds"] / other["seconds"]
    return [{"goal": "burst of %d: every request answered, in at most %gx asyncio's time"
                     % (size, BURST_BOUND),
             "measured": "%d/%d answered 200; %.1f s against %.1f s: %.2fx"
                         % (ours["ok"], size, ours["seconds"], other["seconds"], ratio),
             "ratio": ratio, "met": ours["ok"] == size and ratio <= BURST_BOUND}]


def _goal_size(rows):
    """The key count the persistence goals are checked at: GOAL_KEYS, else the largest measured."""
    sizes = {row["keys"] for row in rows if "keys" in row}
    return GOAL_KEYS if GOAL_KEYS in sizes or not sizes else max(sizes)


def _scale_goals(persistence):
    rows = []
    scaled = [row for row in persistence if "figure" in row]
    keys = _goal_size(scaled)
    for figure, baseline, mine, bare, bound in SCALE_GOALS:
        row = _find(scaled, lambda r: r["figure"] == figure and r["keys"] == keys)
        if row is None:
            continue
        ratio = row[mine] / row[bare]
        rows.append({"goal": "%d keys: %s at most %gx %s" % (keys, figure, bound, baseline),
                     "measured": "%.2fx" % ratio, "ratio": ratio, "met": ratio <= bound})
    return rows


def _checkpoint_goal(persistence):
    during = _find(persistence, lambda row: row.get("checkpoints") == "running")
    without = _find(persistence, lambda row: row.get("checkpoints") == "none")
    if during is None or without is None:
        return []
    row = _ratio_row("PUT c=%d p99 while checkpoints of %d keys run: at most %gx the p99 without"
                     % (during["connections"], during["keys"], CHECKPOINT_P99_BOUND),
                     during, without, "p99_ms", CHECKPOINT_P99_BOUND, at_least=False)
    if not sum(during.get("runs_checkpoints") or [0]):
        # No checkpoint ran: the p99s compare two quiet servers, not what the goal is about.
        row.update(measured=row["measured"] + "; but no checkpoint ran", met=False)
    return [row]


def _watch_goals(persistence):
    rows = []
    for method in ("GET", "PUT"):
        held = _find(persistence, lambda row: row.get("watches") and row["method"] == method)
        none = _find(persistence, lambda row: row.get("watches") == 0 and row["method"] == method)
        if held is not None and none is not None:
            rows.append(_ratio_row("%s c=%d req/s with %d watches held: at least %gx without"
                                   % (method, held["connections"], held["watches"], WATCH_BOUND),
                                   held, none, "rps", WATCH_BOUND, at_least=True))
    return rows


def _expiry_goal(persistence):
    during = _find(persistence, lambda row: row.get("expiring"))
    without = _find(persistence, lambda row: row.get("expiring") == 0)
    if during is None or without is None:
        return []
    row = _ratio_row("PUT c=%d p99 while %d keys expire: at most %gx the p99 without"
                     % (during["connections"], during["expiring"], EXPIRY_P99_BOUND),
                     during, without, "p99_ms", EXPIRY_P99_BOUND, at_least=False)
    expired = during.get("runs_expired") or []
    row["measured"] += "; %s of %d expired during each run" % (
        "/".join("%d" % n for n in expired), during["expiring"])
    return [row]


def _batch_goals(results, persistence):
    """Import against the preload; export against /snapshot; writers beside exports."""
    rows = []
    imported = _find(persistence, lambda row: row["test"].startswith("import "))
    bulk = _find(results.get(OURS, ()), lambda row: row["test"].startswith("preload "))
    if imported is not None and bulk is not None and bulk.get("seconds"):
        preload = bulk["ok"] / bulk["seconds"]
        ratio = imported["rate"] / preload
        rows.append({"goal": "import of %d keys by POST /batch: at least %gx the preload's "
                             "keys/s" % (imported["keys"], IMPORT_BOUND),
                     "measured": "%.0f/s against %.0f/s: %.2fx" % (imported["rate"], preload,
                                                                   ratio),
                     "ratio": ratio, "met": ratio >= IMPORT_BOUND})
    exported = _find(persistence, lambda row: "export_s" in row)
    if exported is not None:
        ratio = exported["export_s"] / exported["snapshot_s"]
        rows.append({"goal": "export of %d keys: at most %gx the time of GET /snapshot"
                             % (exported["keys"], EXPORT_BOUND),
                     "measured": "%.2f s against %.2f s: %.2fx" % (
                         exported["export_s"], exported["snapshot_s"], ratio),
                     "ratio": ratio, "met": ratio <= EXPORT_BOUND})
    during = _find(persistence, lambda row: row.get("export") == "running")
    without = _find(persistence, lambda row: row.get("export") == "none")
    if during is not None and without is not None:
        row = _ratio_row("PUT c=64 p99 while exports of %d keys run: at most %gx the p99 "
                         "without" % (during["keys"], EXPORT_P99_BOUND),
                         during, without, "p99_ms", EXPORT_P99_BOUND, at_least=False)
        if not during.get("exports_s"):
            row.update(measured=row["measured"] + "; but no export ran", met=False)
        rows.append(row)
    return rows


def goal_rows(results, persistence):
    """One dict per goal: goal, measured (text), ratio, met."""
    return (_load_goals(results) + _bulk_goal(results) + _burst_goal(results)
            + _scale_goals(persistence)
            + _checkpoint_goal(persistence) + _watch_goals(persistence)
            + _expiry_goal(persistence) + _batch_goals(results, persistence))


def markdown(rows):
    lines = ["| goal | measured | verdict |", "|---|---|---|"]
    for row in rows:
        lines.append("| %s | %s | %s |" % (row["goal"], row["measured"],
                                            "met" if row["met"] else "**not met**"))
    return "\n".join(lines)
