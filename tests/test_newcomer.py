"""The newcomer's path around the docs: where benchmark records go, smoke runs that judge no goals,
the demo's record, and what the Makefile prints. (README's code and numbers: tests/test_docs.py.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import glm.bench
from glm.bench import BenchError, run_suite
from glm.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
RESULTS = os.path.join(BENCHMARKS, "results")


@pytest.fixture
def argv_of_run(monkeypatch):
    """Records the command line glm bench would run instead of running it."""
    seen: dict = {}

    class Failed:
        returncode = 1

    def fake_run(argv, cwd):
        seen["argv"] = argv
        seen["out"] = argv[argv.index("--out") + 1]
        return Failed()

    monkeypatch.setattr(glm.bench.subprocess, "run", fake_run)
    return seen


def _out_of(seen: dict, suite: str, **kw) -> str:
    with pytest.raises(BenchError, match="exited with status 1"):  # the fake run "fails" once it was started
        run_suite(suite, **kw)
    return seen["out"]


def test_a_plain_bench_run_does_not_rewrite_the_committed_records(argv_of_run):
    assert _out_of(argv_of_run, "attention") == os.path.join(RESULTS, "local")
    assert _out_of(argv_of_run, "decode", quick=True) == os.path.join(RESULTS, "quick")
    assert _out_of(argv_of_run, "attention", publish=True) == RESULTS
    assert _out_of(argv_of_run, "train", out="somewhere") == os.path.abspath("somewhere")


def test_publish_refuses_a_smoke_run_and_a_second_destination(argv_of_run):
    with pytest.raises(BenchError, match="cannot be published"):
        run_suite("attention", quick=True, publish=True)
    with pytest.raises(BenchError, match="pass one of them"):
        run_suite("attention", publish=True, out="elsewhere")
    assert "argv" not in argv_of_run  # refused before anything ran


def test_local_results_are_not_tracked():
    if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/local/attention_cpu.json"], cwd=REPO)
    assert ignored.returncode == 0, "benchmarks/results/local/ must be git-ignored"


@pytest.mark.parametrize("suite", glm.bench.SUITES)
def test_each_script_defaults_to_the_local_folder(suite, bench_script):
    # `python benchmarks/SUITE.py` without --out must not rewrite the committed records either.
    common = bench_script("common")
    assert common.LOCAL == os.path.join(RESULTS, "local")
    with open(os.path.join(BENCHMARKS, f"{suite}.py"), encoding="utf-8") as f:
        source = f.read()
    assert 'add_argument("--out", default=LOCAL' in source, f"benchmarks/{suite}.py: --out defaults elsewhere"


def test_quick_tells_goal_judging_scripts_it_is_a_smoke_run(argv_of_run):
    for suite in glm.bench.JUDGES_GOALS:
        _out_of(argv_of_run, suite, quick=True)
        assert "--smoke" in argv_of_run["argv"], suite
    _out_of(argv_of_run, "attention")
    assert "--smoke" not in argv_of_run["argv"]


def test_smoke_runs_judge_no_goals(bench_script):
    convert = bench_script("convert")
    assert convert.goal_met(2 * 10**9, 10**9) is False and convert.goal_met(10**9, 10**9) is True
    assert convert.goal_met(2 * 10**9, 10**9, smoke=True) is None
    assert convert.VERDICT[None] == "not judged (smoke run)"
    attention = bench_script("attention")
    rows = [{"dtype": "bfloat16", "mask": "prefix", "pass": "fwd", "T": 64, "glm/flex": 0.1, "glm/sdpa": 0.1,
             "TFLOPs": {"glm": 0.01}}]
    assert any(g["met"] is False for g in attention.goals(rows))
    assert [g["met"] for g in attention.goals(rows, smoke=True)] == [None] * len(attention.goals(rows))


def test_quick_run_says_it_is_not_a_measurement(monkeypatch, capsys):
    record = {"benchmark": "convert", "summary": [{"case": "peak RSS", "ours": 1.0, "peer": 2.0, "unit": "GB",
                                                   "ratio": 2.0, "peer_name": "load-everything"}]}
    monkeypatch.setattr(glm.bench, "run_suite", lambda *a, **kw: record)
    assert main(["bench", "convert", "--quick"]) == 0
    assert "goals are not judged" in capsys.readouterr().out
    assert main(["bench", "convert"]) == 0
    assert "goals are not judged" not in capsys.readouterr().out


def test_demo_suite_writes_the_demo_record(bench_script, monkeypatch, tmp_path):
    import glm.demo

    seen = {}

    def fake_demo(cfg):
        seen["cfg"] = cfg
        return {"exact_match_first_word": 0.25, "exact_match": 0.0625, "baseline": 0.15625, "eval_loss": 2.5,
                "eval_ppl": 12.2, "predictions": ["x"] * 16, "parameters": 2021376, "seconds": 3.5, "plot": None}

    monkeypatch.setattr(glm.demo, "demo", fake_demo)
    assert "demo" in glm.bench.SUITES and "demo" in glm.bench.QUICK
    bench_script("demo").main(["--out", str(tmp_path)])
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.model_overrides, cfg.seed) == (glm.demo.DEMO.steps, glm.demo.DEMO.model_overrides, 0)
    assert not cfg.out_dir.startswith(os.path.abspath("runs"))  # a temporary folder, never the user's runs/demo
    record = json.loads((tmp_path / "demo_cpu.json").read_text())
    assert record["benchmark"] == "demo" and record["torch"] and record["git_sha"] and record["cpu_model"]
    assert record["results"] == {"exact_match_first_word": 0.25, "exact_match": 0.0625, "baseline": 0.15625,
                                 "eval_loss": 2.5, "eval_ppl": 12.2, "blanks": 16, "steps": glm.demo.DEMO.steps,
                                 "parameters": 2021376, "seconds": 3.5}
    assert [r["ratio"] for r in record["summary"]] == [pytest.approx(1.6), pytest.approx(0.4)]


def _make_dry_run(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -n prints the recipes without running them; a fake venv path keeps it from touching .venv.
    run = subprocess.run(["make", "-n", "-B", target, "VENV=/nonexistent-venv", "PYTHON=python3"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_make_says_how_to_put_glm_on_path():
    for target in ("install", "demo"):
        out = _make_dry_run(target)
        assert ". /nonexistent-venv/bin/activate" in out and "/nonexistent-venv/bin/glm" in out, target


def test_make_demo_output_is_not_held_back_by_a_pipe():
    # Redirected to a file, Python buffers stdout in blocks: the demo's progress lines would come at exit.
    assert "PYTHONUNBUFFERED=1" in _make_dry_run("demo")


def test_make_gpu_check_publishes_its_records():
    out = _make_dry_run("gpu-check")
    benches = [line for line in out.splitlines() if " bench " in line]
    assert len(benches) == 2 and all(line.rstrip().endswith("--publish") for line in benches)
