"""`report` and `fit-rho` on metric logs whose figures are worked out by hand here."""
from __future__ import annotations

import json
import math

import pytest

from conftest import cli_in_process as cli  # report and fit-rho need no megatron-core: run in this process


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def iters(first, last, flops_per_it, layers, hidden, ms=100.0, start_flops=0.0, loss=5.0):
    return [{"iteration": i, "loss": loss, "flops_so_far": start_flops + (i - first + 1) * flops_per_it,
             "elapsed_ms": ms, "num_layers": layers, "hidden_size": hidden} for i in range(first, last + 1)]


def test_report_saving_stages_and_picture(tmp_path):
    # baseline: 10 iterations at 4e12 FLOPs each; final validation loss 3.0 at 4e13 FLOPs
    base = iters(1, 10, 4e12, 4, 128) + [
        {"iteration": 5, "eval_loss": 3.6, "flops_so_far": 2e13}, {"iteration": 10, "eval_loss": 3.0, "flops_so_far": 4e13}]
    # staged: 10 iterations at 1e12, a growth (2 s), 10 at 4e12 (200 ms each)
    raptr = {"event": "raptr_stage", "iteration": 4, "stage": 1, "of": 4, "keep_prob": 0.5,
             "expected_active_layers": 1.0, "num_layers": 2, "until": 8}
    staged = (iters(1, 3, 1e12, 2, 128) + [raptr] + iters(4, 10, 1e12, 2, 128, start_flops=3e12)
              + [{"iteration": 10, "eval_loss": 3.4, "flops_so_far": 1e13}]
              + [{"event": "trigger", "kind": "PRE-GROWTH", "iteration": 10, "slope": -0.05, "threshold": -0.0575,
                  "loss": 3.41, "flops_so_far": 1e13}]
              + [{"event": "growth", "iteration": 10, "growth_seconds": 2.0, "num_layers": 4, "hidden_size": 128}]
              + iters(11, 20, 4e12, 4, 128, ms=200.0, start_flops=1e13)
              + [{"iteration": 15, "eval_loss": 3.2, "flops_so_far": 3e13},
                 {"iteration": 20, "eval_loss": 2.8, "flops_so_far": 5e13}])
    b = write_log(tmp_path / "base.jsonl", base)
    s = write_log(tmp_path / "staged.jsonl", staged)
    png = tmp_path / "out" / "r.png"
    out = cli(["report", s, "--baseline", b, "--out", str(png), "--json"]).stdout
    row = json.loads(out[:out.rindex("]") + 1])[0]
    # 3.0 lies halfway (in loss) between 3.2 at 3e13 and 2.8 at 5e13: log-linear interpolation
    c = 10 ** (math.log10(3e13) + 0.5 * (math.log10(5e13) - math.log10(3e13)))
    assert row["flops_to_target"] == pytest.approx(c, rel=1e-9)
    assert row["saving"] == pytest.approx(1 - c / 4e13, rel=1e-9)
    assert row["final_loss_gap"] == pytest.approx(-0.2)
    assert [(st["layers"], st["iterations"]) for st in row["stages"]] == [(2, 10), (4, 10)]
    assert [st["flops"] for st in row["stages"]] == pytest.approx([1e13, 4e13])
    assert [st["seconds"] for st in row["stages"]] == pytest.approx([1.0, 2.0])
    assert row["seconds"] == pytest.approx(1.0 + 2.0 + 2.0)  # iterations + the growth
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = cli(["report", s, "--baseline", b, "--out", str(png)]).stdout
    assert f"saving {100 * (1 - c / 4e13):+.1f}%" in text and "stage 1: 4 layers x 128: 10 iterations" in text
    assert "from iteration 4 (3.000e+12 FLOPs): RaPTr stage 2/4: 1.00/2 layers expected active" in text
    assert ("growth at iteration 10 (1.000e+13 FLOPs) -> 4 layers x 128 (PRE-GROWTH slope trigger: slope -0.0500 > "
            "-0.0575, loss 3.4100)") in text


def test_report_bad_inputs(tmp_path):
    r = cli(["report", str(tmp_path / "missing.jsonl")], check=False)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    noeval = write_log(tmp_path / "n.jsonl", iters(1, 3, 1e12, 2, 64))
    r = cli(["report", noeval], check=False)
    assert r.returncode == 2 and "no validation losses" in r.stderr


def test_fit_rho(tmp_path):
    # small: L = 2 + 10/t; large: L = 1.5 + 10/t. At S_pre the large run reaches 2 + 10/S_pre at the
    # first t with 10/t <= 0.5 + 10/S_pre, i.e. t = ceil(10 / (0.5 + 10/S_pre)).
    small = [{"iteration": t, "loss": 2 + 10 / t} for t in range(1, 201)]
    large = [{"iteration": t, "loss": 1.5 + 10 / t} for t in range(1, 201)]
    a, b = write_log(tmp_path / "s.jsonl", small), write_log(tmp_path / "l.jsonl", large)
    out = cli(["fit-rho", "--small", a, "--large", b, "--smooth", "1", "--at-iteration", "40"]).stdout
    s_target = math.ceil(10 / (0.5 + 10 / 40))
    assert f"S_target {s_target}: rho = {40 / s_target:.3f}" in out
    for bad in ("0", "-5"):  # rho = S_pre / S_target would come out 0 or negative
        r = cli(["fit-rho", "--small", a, "--large", b, "--at-iteration", bad], check=False)
        assert r.returncode == 2 and f"--at-iteration {bad} must be >= 1" in r.stderr and "rho =" not in r.stdout
    table = cli(["fit-rho", "--small", a, "--large", b, "--smooth", "1"]).stdout
    rhos = [s / math.ceil(10 / (0.5 + 10 / s)) for s in (40, 80, 120, 160)]
    assert f"median rho = {sorted(rhos)[1] / 2 + sorted(rhos)[2] / 2:.3f}" in table


def test_report_baseline_trained_past_its_last_validation(tmp_path):
    # baseline: 12 iterations at 4e12 FLOPs (4.8e13 in all), last validation at iteration 10 (4e13 FLOPs):
    # its final loss 3.0 was measured at 4e13, the last 2 iterations bought no measured loss
    base = iters(1, 12, 4e12, 4, 128) + [
        {"iteration": 5, "eval_loss": 3.6, "flops_so_far": 2e13}, {"iteration": 10, "eval_loss": 3.0, "flops_so_far": 4e13}]
    run = iters(1, 10, 3e12, 4, 128) + [{"iteration": 10, "eval_loss": 3.0, "flops_so_far": 3e13}]
    b, r = write_log(tmp_path / "base.jsonl", base), write_log(tmp_path / "run.jsonl", run)
    rows = json.loads(_json(cli(["report", r, b, "--baseline", b, "--out", str(tmp_path / "r.png"), "--json"])))
    assert rows[0]["saving"] == pytest.approx(1 - 3e13 / 4e13)   # 25%, not 1 - 3/4.8 = 37.5%
    assert rows[1]["saving"] == pytest.approx(0.0)                # the baseline against itself saves nothing


def _json(result) -> str:
    return result.stdout


def test_report_and_fit_rho_read_a_crashed_runs_log(tmp_path):
    # a run killed mid-write leaves a partial record; the same run resumed appends after it
    recs = iters(1, 4, 1e12, 2, 64, loss=4.0) + [{"iteration": 4, "eval_loss": 3.5, "flops_so_far": 4e12}]
    text = "".join(json.dumps(x) + "\n" for x in recs)
    crashed = tmp_path / "crashed.jsonl"
    crashed.write_text(text + '{"iteration": 5, "loss": 3.9, "flops_so')  # no newline: killed here
    r = cli(["report", str(crashed), "--out", str(tmp_path / "r.png"), "--json"])
    row = json.loads(_json(r))[0]
    assert row["final_eval_loss"] == 3.5 and row["flops"] == 4e12 and "crashed.jsonl:6" in r.stderr
    assert "3.9" not in r.stdout
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text(text + '{"iteration": 5, "lo' + json.dumps(iters(5, 5, 1e12, 2, 64, start_flops=4e12)[0])
                       + "\n" + json.dumps({"iteration": 5, "eval_loss": 3.25, "flops_so_far": 5e12}) + "\n")
    row = json.loads(_json(cli(["report", str(resumed), "--out", str(tmp_path / "r.png"), "--json"])))[0]
    assert row["final_eval_loss"] == 3.25 and row["flops"] == 4e12  # iteration 5's record was the cut line
    assert "rho" in cli(["fit-rho", "--small", str(crashed), "--large", str(resumed), "--smooth", "1"]).stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text + "Traceback (most recent call last):\n")
    r = cli(["report", str(bad)], check=False)
    assert r.returncode == 2 and "bad.jsonl:6: not a JSON line" in r.stderr


def test_log_file_appended_after_a_partial_record(tmp_path):
    from megatron_staged.config import Config
    from megatron_staged.training.logger import MetricsLogger

    log = tmp_path / "m.jsonl"
    log.write_text('{"iteration": 1, "loss": 4.0}\n{"iteration": 2, "lo')
    cfg = Config()
    cfg.logging.log_file = str(log)
    logger = MetricsLogger(cfg)
    logger.event("x", event="growth", iteration=2)
    logger.close()
    lines = log.read_text().splitlines()
    assert lines == ['{"iteration": 1, "loss": 4.0}', '{"iteration": 2, "lo', '{"event": "growth", "iteration": 2}']


def test_report_json_is_strict_json(tmp_path):
    # the run never reaches the baseline's 2.0: its figures are unknown, not NaN (which is not JSON)
    base = iters(1, 4, 1e12, 2, 64) + [{"iteration": 4, "eval_loss": 2.0, "flops_so_far": 4e12}]
    run = iters(1, 4, 1e12, 2, 64) + [{"iteration": 4, "eval_loss": 2.5, "flops_so_far": 4e12}]
    b, r = write_log(tmp_path / "b.jsonl", base), write_log(tmp_path / "r.jsonl", run)
    res = cli(["report", r, "--baseline", b, "--out", str(tmp_path / "r.png"), "--json"])

    def no_constants(c):
        raise AssertionError(f"{c} in --json output")
    row = json.loads(res.stdout, parse_constant=no_constants)[0]  # stdout: the JSON document only
    assert row["flops_to_target"] is None and row["saving"] is None and row["final_loss_gap"] == pytest.approx(0.5)
    assert "wrote" in res.stderr


def test_fit_rho_refuses_a_staged_run_and_mismatched_batches(tmp_path):
    small = [{"iteration": t, "loss": 2 + 10 / t, "consumed_samples": 8 * t} for t in range(1, 51)]
    large = [{"iteration": t, "loss": 1.5 + 10 / t, "consumed_samples": 16 * t} for t in range(1, 51)]
    staged = small[:10] + [{"event": "growth", "iteration": 10, "num_layers": 4}] + small[10:]
    a, b, c = (write_log(tmp_path / f"{n}.jsonl", x) for n, x in (("s", small), ("l", large), ("g", staged)))
    r = cli(["fit-rho", "--small", c, "--large", a], check=False)
    assert r.returncode == 2 and "is a staged run (it grows at iteration 10)" in r.stderr
    r = cli(["fit-rho", "--small", a, "--large", b], check=False)
    assert r.returncode == 2 and "global batches differ (8 and 16 samples per iteration)" in r.stderr


def test_report_reads_the_last_run_of_a_log_reused_from_scratch(tmp_path):
    # `train --log-file` appends: a second run from scratch into the same file supersedes the first
    first = iters(1, 4, 1e12, 4, 128) + [{"iteration": 4, "eval_loss": 4.0, "flops_so_far": 4e12}]
    second = iters(1, 2, 1e12, 2, 64) + [{"iteration": 2, "eval_loss": 3.0, "flops_so_far": 2e12}]
    log = write_log(tmp_path / "m.jsonl", first + second)
    r = cli(["report", log, "--out", str(tmp_path / "r.png"), "--json"])
    row = json.loads(_json(r))[0]
    assert (row["final_eval_loss"], row["flops"]) == (3.0, 2e12)
    assert [(st["layers"], st["iterations"]) for st in row["stages"]] == [(2, 2)]
    assert "starts again after iteration 4" in r.stderr
    # fit-rho likewise: a first small run with a flat loss 9 superseded by one with L = 2 + 10/t
    flat = [{"iteration": t, "loss": 9.0} for t in range(1, 41)]
    small = write_log(tmp_path / "s.jsonl", flat + [{"iteration": t, "loss": 2 + 10 / t} for t in range(1, 41)])
    large = write_log(tmp_path / "l.jsonl", [{"iteration": t, "loss": 1.5 + 10 / t} for t in range(1, 41)])
    out = cli(["fit-rho", "--small", small, "--large", large, "--smooth", "1", "--at-iteration", "40"]).stdout
    assert f"S_target {math.ceil(10 / (0.5 + 10 / 40))}:" in out  # as in test_fit_rho
