"""The experiment report: t intervals, Table 4 numbers, partial runs, plots and comparisons.

The synthetic experiment below is built so every number has a hand-computed value:

- Pass@1 of (method, seed, round, client) = FINAL[method][seed] - 0.05 * (last round - round)
  +/- 0.05 (client-0 / client-1), so the mean over clients at the final round is FINAL.
- 3 seeds (t = 4.303), 3 rounds, 2 clients. ``random-p2p`` has no seed 3 (t = 12.706);
  ``knexa-fl-concat`` stopped after round 2; ``central-kd``'s seed 2 stopped at round 2 (left
  out, so n = 1); Pass@5 is only sampled at ``knexa-fl``'s final round for seeds 1 and 2.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knexa_lab.experiment.methods.base import METRIC_FIELDS
from knexa_lab.experiment.report import compare, format_table4, load_experiment, write_report
from knexa_lab.experiment.stats import mean_ci, paired_difference, t_critical

SEEDS = (1, 2, 3)
ROUNDS = 3
CLIENTS = {"client-0": "tiny-gpt2", "client-1": "tiny-llama"}
CONFIG_ORDER = ["knexa-fl", "local-only", "random-p2p", "knexa-fl-concat", "central-kd"]
#: method -> seed -> (last round, mean Pass@1 over clients at that round)
RUNS: dict[str, dict[int, tuple[int, float]]] = {
    "central-kd": {1: (3, 0.20), 2: (2, 0.30)},
    "random-p2p": {1: (3, 0.35), 2: (3, 0.25)},
    "knexa-fl": {1: (3, 0.40), 2: (3, 0.50), 3: (3, 0.45)},
    "local-only": {1: (3, 0.30), 2: (3, 0.30), 3: (3, 0.33)},
    "knexa-fl-concat": {1: (2, 0.38), 2: (2, 0.42), 3: (2, 0.40)},
}
P2P = ("random-p2p", "knexa-fl", "knexa-fl-concat")
T2, T3 = 12.706204736174707, 4.302652729749464  # t_{0.975} for 1 and 2 d.o.f.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(method: str, seed: int, rnd: int, client: str, last: int, final: float) -> dict[str, Any]:
    ci = int(client[-1])
    p1 = final - 0.05 * (last - rnd) + (0.05 if ci else -0.05)
    row = {k: None for k in METRIC_FIELDS}
    row.update(method=method, seed=seed, round=rnd, client=client, model=CLIENTS[client],
               family="gpt2" if ci == 0 else "llama", pass_at_1=p1, codebleu=0.1 + p1 / 2,
               val_loss=2.0 - p1, train_loss=1.0, role="local", bytes_sent=0, bytes_received=0,
               wall_s=1.0 + ci)
    if method in P2P:
        # client-0 teaches client-1, except in round 3 where they swap
        student = "client-1" if rnd < 3 else "client-0"
        teacher = "client-0" if student == "client-1" else "client-1"
        if client == student:
            row.update(role="student", partner=teacher, reward=0.1 * rnd + 0.01 * seed,
                       bytes_received=500_000, kd_loss=0.5)
        else:
            row.update(role="teacher", partner=student, bytes_sent=500_000)
    if method == "central-kd":
        row.update(role="server_student", partner="server", bytes_sent=100_000, bytes_received=100_000)
    if method == "knexa-fl" and rnd == last and seed in (1, 2):
        row.update(pass_at_5=p1 + 0.1, pass_at_10=p1 + 0.2)
    if method == "local-only" and seed == 1 and rnd == last and ci == 1:
        row["val_loss"] = None
    if method == "local-only" and seed == 2 and rnd == last and ci == 1:
        row["codebleu"] = float("nan")  # json.dumps writes NaN; the report must treat it as missing
    return row


def make_rows() -> list[dict[str, Any]]:
    return [_row(m, s, r, c, last, final) for m, seeds in RUNS.items() for s, (last, final) in seeds.items()
            for r in range(1, last + 1) for c in CLIENTS]


def make_results(directory: Path, *, config: bool = True, mode: str = "sim", torn: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in make_rows())
    (directory / "metrics.jsonl").write_text(text + ('{"method": "knexa-f' if torn else ""))
    if config:
        (directory / "config.json").write_text(json.dumps({
            "preset": "synthetic", "experiment": {"methods": CONFIG_ORDER, "seeds": list(SEEDS),
                                                  "rounds": ROUNDS, "models": list(CLIENTS.values())}}))
        (directory / "run-info.json").write_text(json.dumps({
            "seeds": list(SEEDS), "mode": mode, "git": {"commit": "0123456789abcdef0123", "dirty": False}}))
    return directory


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The Table 4 body as method label -> column header -> cell."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("| method |")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    body = markdown.split(lines[0], 1)[1].splitlines()[2:]
    out = {}
    for ln in body:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0]] = dict(zip(header, cells, strict=True))
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = make_results(tmp_path_factory.mktemp("results"), torn=True)
    return out, write_report(out)


# ---- stats --------------------------------------------------------------------------------------

def test_t_critical_matches_the_table():
    assert t_critical(2) == pytest.approx(12.706, abs=1e-3)
    assert t_critical(3) == pytest.approx(4.303, abs=1e-3)
    assert t_critical(31) == pytest.approx(2.042, abs=1e-3)
    with pytest.raises(ValueError):
        t_critical(1)


def test_mean_ci_by_hand():
    ci = mean_ci([1.0, 3.0])  # s = sqrt(2): half = 12.706 * sqrt(2) / sqrt(2)
    assert (ci.mean, ci.n) == (2.0, 2) and ci.half_width == pytest.approx(T2)
    assert (ci.low, ci.high) == (pytest.approx(2 - T2), pytest.approx(2 + T2))
    ci = mean_ci([1.0, None, 2.0, float("nan"), 3.0])  # s = 1
    assert (ci.mean, ci.n) == (2.0, 3) and ci.half_width == pytest.approx(T3 / math.sqrt(3))
    one = mean_ci([0.7, None])
    assert (one.mean, one.half_width, one.n, one.low, one.excludes_zero) == (0.7, None, 1, None, None)
    assert mean_ci([None, float("nan")]).mean is None and mean_ci([]).n == 0


def test_paired_difference_pairs_by_seed_and_drops_unpaired():
    d = paired_difference({1: 0.4, 2: 0.5, 3: 0.45, 4: None}, {2: 0.25, 1: 0.35, 4: 0.1})
    assert d.seeds == (1, 2) and d.differences == pytest.approx((0.05, 0.25))
    assert d.ci.mean == pytest.approx(0.15) and d.ci.half_width == pytest.approx(T2 * 0.1)
    assert d.ci.excludes_zero is False
    assert paired_difference({1: 1.0, 2: 1.2}, {1: 0.0, 2: 0.1}).ci.excludes_zero is True


# ---- Table 4 ------------------------------------------------------------------------------------

def test_table4_cells_are_hand_computed_means_and_cis(report):
    out, _ = report
    rows = table_rows((out / "table4.md").read_text())
    kfl = rows["KNEXA-FL"]
    # Pass@1 per seed 0.40, 0.50, 0.45: s = 0.05
    assert kfl["Pass@1 (%)"] == f"45.00 ± {100 * T3 * 0.05 / math.sqrt(3):.2f}" == "45.00 ± 12.42"
    # Pass@5 only for seeds 1 and 2 (0.50, 0.60): n differs from the row's, so it is shown
    assert kfl["Pass@5 (%)"] == f"55.00 ± {100 * T2 * math.sqrt(0.005) / math.sqrt(2):.2f} (n=2)"
    assert kfl["Pass@10 (%)"].startswith("65.00 ± ")
    assert kfl["CodeBLEU"] == f"0.325 ± {T3 * 0.025 / math.sqrt(3):.3f}"
    # rewards 0.1 r + 0.01 s over r = 1..3: per seed 0.21, 0.22, 0.23
    assert kfl["Mean reward"] == f"0.220 ± {T3 * 0.01 / math.sqrt(3):.3f}"
    # 500 kB per round on one side of each pair: 3 rounds * 1 MB / 2 clients
    assert kfl["MB exchanged/client"] == "1.500 ± 0.000"
    assert kfl["Wall (s)"] == "9.0 ± 0.0"  # simulation: (1 s + 2 s) per round, 3 rounds
    lo = rows["LocalOnly"]
    assert lo["Pass@1 (%)"] == f"31.00 ± {100 * T3 * math.sqrt(0.0003) / math.sqrt(3):.2f}"
    assert lo["Pass@5 (%)"] == "—" and lo["Mean reward"] == "—" and lo["MB exchanged/client"] == "0.000 ± 0.000"
    # seed 1 lost client-1's val loss (None), seed 2 client-1's CodeBLEU (NaN): mean of the rest
    assert lo["Val loss"].startswith(f"{(1.75 + 1.70 + 1.67) / 3:.3f} ± ")
    assert lo["CodeBLEU"].startswith(f"{(0.225 + 0.250 + 0.265) / 3:.3f} ± ")
    assert rows["Random-P2P (partial)"]["Pass@1 (%)"] == f"30.00 ± {100 * T2 * math.sqrt(0.005) / math.sqrt(2):.2f}"
    assert rows["KNEXA-FL (concat) (partial)"]["Pass@1 (%)"] == f"40.00 ± {100 * T3 * 0.02 / math.sqrt(3):.2f}"
    assert rows["Central-KD (partial)"]["Pass@1 (%)"] == "20.00 (n=1)"


def test_methods_follow_the_config_order_and_partial_runs_are_marked(report):
    out, _ = report
    text = (out / "table4.md").read_text()
    assert list(table_rows(text)) == ["KNEXA-FL", "LocalOnly", "Random-P2P (partial)",
                                      "KNEXA-FL (concat) (partial)", "Central-KD (partial)"]
    assert "3 rounds · 2 clients · 3 seeds (1, 2, 3)" in text
    notes = {ln.split("`")[1]: ln for ln in text.splitlines() if ln.startswith("- ")}
    assert "n=3 seeds (1, 2, 3), final round 3 of 3" in notes["knexa-fl"] and "partial" not in notes["knexa-fl"]
    assert "n=2 seeds (1, 2)" in notes["random-p2p"] and "no rows for seed 3" in notes["random-p2p"]
    assert "stopped after round 2 of 3" in notes["knexa-fl-concat"]
    assert "n=1 seed (1)" in notes["central-kd"] and "seed 2 stopped at round 2 (left out)" in notes["central-kd"]
    summary = json.loads((out / "summary.json").read_text())
    by = {m["name"]: m for m in summary["methods"]}
    assert [m["name"] for m in summary["methods"]] == CONFIG_ORDER
    assert (by["knexa-fl"]["partial"], by["random-p2p"]["partial"]) == (False, True)
    assert by["random-p2p"]["missing_seeds"] == [3] and by["central-kd"]["short_seeds"] == {"2": 2}
    assert by["knexa-fl"]["metrics"]["pass_at_1"]["per_seed"] == pytest.approx({"1": 0.4, "2": 0.5, "3": 0.45})


def test_format_table4_is_the_file_and_states_the_comparisons(report):
    out, _ = report
    text = format_table4(out)
    assert text == (out / "table4.md").read_text()
    lines = {ln.split("|")[1].strip() + "/" + ln.split("|")[2].strip(): ln for ln in text.splitlines()
             if " − " in ln and ln.startswith("| ")}
    assert "no significant difference (CI includes 0)" in lines["KNEXA-FL − Random-P2P/Pass@1 (%)"]
    assert "KNEXA-FL higher (CI excludes 0)" in lines["KNEXA-FL − LocalOnly/Pass@1 (%)"]
    assert "| +14.00 |" in lines["KNEXA-FL − LocalOnly/Pass@1 (%)"]
    assert "KNEXA-FL (concat) − Random-P2P/Pass@1 (%)" in lines


def test_per_client_table(report):
    out, _ = report
    text = (out / "per_client.md").read_text()
    # client-0 of knexa-fl at round 3: 0.35, 0.45, 0.40 -> the same spread as the method's row
    assert "| client-0 | tiny-gpt2 | 40.00 ± 12.42 | 26.00 ± 4.30 |" in text
    section = text.split("## Central-KD (partial) — round 3, seed 1\n")[1]
    assert "| client-1 | tiny-llama | 25.00 (n=1) |" in section


# ---- comparisons --------------------------------------------------------------------------------

def test_compare_is_paired_over_common_seeds(report):
    out, _ = report
    c = compare(out, "knexa-fl", "random-p2p")
    assert c["seeds"] == [1, 2] and c["n"] == 2
    assert c["differences"] == pytest.approx([0.05, 0.25]) and c["mean"] == pytest.approx(0.15)
    assert c["half_width"] == pytest.approx(T2 * 0.1)
    assert (c["ci_low"], c["ci_high"]) == (pytest.approx(0.15 - T2 * 0.1), pytest.approx(0.15 + T2 * 0.1))
    assert c["excludes_zero"] is False
    c = compare(out, "knexa-fl", "local-only")
    s = math.sqrt(((0.10 - 0.14) ** 2 + (0.20 - 0.14) ** 2 + (0.12 - 0.14) ** 2) / 2)
    assert c["n"] == 3 and c["mean"] == pytest.approx(0.14)
    assert c["half_width"] == pytest.approx(T3 * s / math.sqrt(3)) and c["excludes_zero"] is True
    assert (c["a_mean"], c["b_mean"]) == (pytest.approx(0.45), pytest.approx(0.31))
    c = compare(out, "knexa-fl", "central-kd", metric="codebleu")
    assert c["n"] == 1 and c["mean"] == pytest.approx(0.30 - 0.20) and c["half_width"] is None
    assert c["excludes_zero"] is None
    with pytest.raises(ValueError, match="fedavg"):
        compare(out, "knexa-fl", "fedavg")
    with pytest.raises(ValueError, match="metric"):
        compare(out, "knexa-fl", "local-only", metric="accuracy")


# ---- plots --------------------------------------------------------------------------------------

def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_every_plot_is_a_real_png(report):
    import matplotlib.image

    out, paths = report
    names = {p.relative_to(out).as_posix() for p in paths}
    expected_plots = {"plots/pass_at_1_vs_round.png", "plots/final_per_client.png", "plots/cumulative_reward.png",
                      *(f"plots/match_heatmap_{m}.png" for m in P2P)}
    assert names == {"table4.md", "per_client.md", "summary.json", *expected_plots}
    for name in expected_plots:
        w, h = _png_size(out / name)
        assert w > 300 and h > 200, (name, w, h)
        pixels = matplotlib.image.imread(out / name)
        assert pixels.shape[:2] == (h, w) and float(np.std(pixels)) > 0.01, name  # not a blank image


def test_heatmap_counts_match_the_rows(report):
    out, _ = report
    summary = {m["name"]: m for m in json.loads((out / "summary.json").read_text())["methods"]}
    for method in P2P:
        matches = summary[method]["matches"]
        counted = Counter((r["partner"], r["client"]) for r in make_rows()
                          if r["method"] == method and r["role"] == "student")
        got = {(t, s): matches["counts"][i][j] for i, t in enumerate(matches["teachers"])
               for j, s in enumerate(matches["students"]) if matches["counts"][i][j]}
        assert got == dict(counted)
    # by hand: client-0 teaches in rounds 1-2, client-1 in round 3, over 3 seeds
    assert summary["knexa-fl"]["matches"]["counts"] == [[0, 6], [3, 0]]
    assert summary["local-only"]["matches"] is None and summary["central-kd"]["matches"] is None


# ---- degraded inputs ----------------------------------------------------------------------------

def test_without_config_the_rows_decide(tmp_path):
    out = make_results(tmp_path, config=False)
    exp = load_experiment(out)
    # registry order, rounds and seeds from the rows
    assert exp.methods == ("local-only", "random-p2p", "knexa-fl", "knexa-fl-concat", "central-kd")
    assert (exp.rounds, exp.seeds, exp.mode) == (3, (1, 2, 3), "sim")
    text = format_table4(out)
    assert "config.json missing" in text and "run-info.json missing" in text
    assert table_rows(text)["KNEXA-FL"]["Pass@1 (%)"] == "45.00 ± 12.42"


def test_daemons_mode_counts_the_slowest_client_per_round(tmp_path):
    out = make_results(tmp_path, mode="daemons")
    assert table_rows(format_table4(out))["KNEXA-FL"]["Wall (s)"] == "6.0 ± 0.0"  # max(1, 2) * 3 rounds


def test_small_traffic_and_long_runs_get_readable_units(tmp_path):
    out = make_results(tmp_path)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r["bytes_sent"], r["bytes_received"] = r["bytes_sent"] // 100, r["bytes_received"] // 100
        r["wall_s"] *= 100
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kfl = table_rows(format_table4(out))["KNEXA-FL"]
    assert kfl["kB exchanged/client"] == "15.00 ± 0.00"  # 3 rounds * 10 kB / 2 clients
    assert kfl["Wall (min)"] == "15.00 ± 0.00"  # 3 rounds * 300 s


def test_an_empty_run_still_reports(tmp_path):
    out = make_results(tmp_path)
    (out / "metrics.jsonl").write_text("")
    paths = write_report(out)
    assert {p.name for p in paths} == {"table4.md", "per_client.md", "summary.json"}
    text = (out / "table4.md").read_text()
    assert table_rows(text) == {} and "`knexa-fl`): no rows yet" in text
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nowhere")


@pytest.mark.parametrize("n", [4, 12, 17])
def test_every_method_gets_its_own_colour_and_marker(n):
    """tab10 repeats after ten colours; the default skills preset draws twelve methods."""
    from matplotlib.figure import Figure

    from knexa_lab.experiment.plots import _method_cycle

    ax = Figure().subplots()
    _method_cycle(ax, n)
    lines = [ax.plot([0, 1], [i, i])[0] for i in range(n)]
    styles = {(tuple(line.get_color()), line.get_marker()) for line in lines}
    assert len(styles) == n
    assert len({tuple(line.get_color()) for line in lines}) == n
