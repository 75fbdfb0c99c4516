"""The benchmark suites of tools/perf_suite.sh: argument handling, the tiny suite end to end (the
same rows as the gpu suite with toy models on the CPU), the row runner (timeouts, failures,
budget), the targets check and table, and the offline wheel folder for the GPU machine."""

import hashlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SUITE = os.path.join(ROOT, "tools", "perf_suite.sh")


def _load(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


targets = _load("convmae_det/benchmark/targets.py", "perf_targets_under_test")
perf_rows = _load("tools/perf_rows.py", "perf_rows_under_test")
gpu_wheels = _load("scripts/gpu_wheels.py", "gpu_wheels_under_test")


def _suite(*args, env=None, timeout=60):
    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(
        ["bash", SUITE, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _rows(suite: str, tmp_path) -> list:
    proc = _suite(suite, str(tmp_path / f"list_{suite}"), env={"PERF_LIST": "1"})
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


# ------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "args, message",
    [
        ((), "missing the suite"),
        (("bogus", "out"), "unknown suite 'bogus'"),
        (("gpu",), "missing OUTDIR"),
        (("tiny", ""), "missing OUTDIR"),
    ],
)
def test_bad_arguments_exit_2_with_the_usage_line(args, message):
    proc = _suite(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: perf_suite.sh gpu|cpu|tiny OUTDIR")
    assert message in proc.stderr


def test_gpu_and_tiny_suites_have_the_same_rows_and_every_target_row(tmp_path):
    gpu, tiny = _rows("gpu", tmp_path), _rows("tiny", tmp_path)
    names = [r[0] for r in gpu]
    assert names == [r[0] for r in tiny]
    assert len(set(names)) == len(names)
    for target in targets.TARGETS:
        for row in target.rows + ((target.baseline_row,) if target.baseline_row else ()):
            assert row in names, f"{target.key}: row {row} is not in the suite"
    # the compile row is last, the rows of the targets come first
    assert "--compile" in gpu[-1]
    first = {r for t in targets.TARGETS for r in t.rows[:1] + (t.baseline_row,) if r}
    assert first <= set(names[: len(first) + 1])


@pytest.mark.parametrize("suite", ["gpu", "tiny", "cpu"])
def test_every_row_is_a_valid_benchmark_command(suite, tmp_path):
    bench = _load("tools/benchmark.py", "benchmark_tool_under_test")
    parser = bench.get_parser()
    for name, limit, *args in _rows(suite, tmp_path):
        assert float(limit) > 0, name
        parsed = parser.parse_args(args)
        assert parsed.output is None  # the runner adds --output
        if parsed.config_file:
            assert os.path.exists(os.path.join(ROOT, parsed.config_file)), name
        if suite == "gpu":
            assert parsed.device == "cuda" and (parsed.iters or 50) <= 20, name


# ---------------------------------------------------------------------------- tiny suite
def test_tiny_suite_runs_every_row_and_prints_the_targets(tmp_path):
    out = tmp_path / "tiny"
    proc = _suite(
        "tiny", str(out),
        env={"PERF_SITE": str(tmp_path / "site"), "PERF_WHEELS": str(tmp_path / "none")},
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [shlex.split(line)[0] for line in (out / "rows.txt").read_text().splitlines()]
    status = targets.load_row_status(str(out / "rows.tsv"))
    assert set(status) == set(rows)
    for name in rows:
        if name == "backbone_fast_compiled":  # compile is off in the tiny suite
            assert status[name]["status"] == "skipped"
            assert not (out / f"tiny_{name}.json").exists()
            continue
        assert status[name]["status"] == "ok", (name, status[name])
        result = json.loads((out / f"tiny_{name}.json").read_text())
        assert "speedup" in result or result["ms_per_img"] > 0, name
    results_md = (out / "results.md").read_text()
    assert results_md.startswith("| card | torch | date |")
    table = (out / "targets.md").read_text()
    assert table == proc.stdout[proc.stdout.index("Targets (tiny suite") :]
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| ")}
    for target in targets.TARGETS:
        cells = [c.strip() for c in lines[target.title].split("|")[1:-1]]
        assert cells[2].strip("*") in targets.STATUSES
        if target.key == "backbone_train":  # toy rows on the CPU: marked as another setting
            assert cells[2].endswith("*") and "setting differs" in cells[5]


# ------------------------------------------------------------------------------ row runner
DUMMY = """
import json, sys, time
args = sys.argv[1:]
if args[0] == "--table":
    print("| table |"); sys.exit(0)
out = args[args.index("--output") + 1]
if args[0] == "ok":
    json.dump({"name": "x", "fast_paths": {}}, open(out, "w")); print("summary of", args[1])
elif args[0] == "fail":
    print("it broke", file=sys.stderr); sys.exit(3)
elif args[0] == "sleep":
    time.sleep(60)
"""


def test_runner_records_ok_failed_timeout_and_skipped_rows(tmp_path):
    script = tmp_path / "dummy.py"
    script.write_text(DUMMY)
    rows = [
        perf_rows.Row("good", 30, ["ok", "a"]),
        perf_rows.Row("bad", 30, ["fail"]),
        perf_rows.Row("slow", 1, ["sleep"]),
        perf_rows.Row("compiled", 30, ["ok", "b", "--compile"]),
        perf_rows.Row("too_long", 10_000, ["ok", "c"]),
    ]
    rc = perf_rows.run_rows(
        rows, str(tmp_path), prefix="gpu", isolate=True, budget_s=600, skip_compile=True,
        script=str(script),
    )  # fmt: skip
    assert rc == 1
    status = targets.load_row_status(str(tmp_path / "rows.tsv"))
    assert {k: v["status"] for k, v in status.items()} == {
        "good": "ok",
        "bad": "failed",
        "slow": "timeout",
        "compiled": "skipped",
        "too_long": "skipped",
    }
    assert "it broke" in status["bad"]["reason"] and "rc 3" in status["bad"]["reason"]
    assert "budget" in status["too_long"]["reason"]
    assert (tmp_path / "gpu_good.json").exists() and not (tmp_path / "gpu_bad.json").exists()
    assert "summary of a" in (tmp_path / "gpu_good.log").read_text()
    assert (tmp_path / "results.md").read_text().strip() == "| table |"


def test_runner_exit_code_is_0_when_only_skips(tmp_path):
    script = tmp_path / "dummy.py"
    script.write_text(DUMMY)
    rows = [perf_rows.Row("good", 30, ["ok", "a"]), perf_rows.Row("c", 30, ["--compile"])]
    assert (
        perf_rows.run_rows(rows, str(tmp_path), isolate=True, skip_compile=True, script=str(script))
        == 0
    )


def test_rows_file_errors(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("# comment\n\na 10 --x\nb 5\n")
    assert [(r.name, r.limit_s, r.args) for r in perf_rows.parse_rows(str(path))] == [
        ("a", 10.0, ["--x"]),
        ("b", 5.0, []),
    ]
    for bad, message in (("a 10\na 20\n", "twice"), ("a ten\n", "not a number"), ("a\n", "NAME")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            perf_rows.parse_rows(str(path))


# --------------------------------------------------------------------------------- targets
H200 = dict(device="cuda:0", device_name="NVIDIA H200")


def _result(**kw):
    base = dict(
        H200,
        name="convvitdet_b",
        batch_size=4,
        image_size=[1024, 1024],
        fast_paths=dict(
            dtype="bf16", attn="auto", channels_last=True, act_checkpoint=[], compile=False
        ),
        ms_per_img=20.0,
        img_per_s=50.0,
        mfu=0.40,
        peak_tflops=790.0,
        peak_mem_per_img_bytes=4.0e9,
    )
    base.update(kw)
    return base


def _by_key(evaluations):
    return {ev.target.key: ev for ev in evaluations}


def test_backbone_target_boundaries():
    ev = _by_key(targets.evaluate({"backbone_fast": _result(mfu=0.35, peak_mem_per_img_bytes=5e9)}))
    assert ev["backbone_train"].status == "PASS" and not ev["backbone_train"].differs
    ev = _by_key(targets.evaluate({"backbone_fast": _result(mfu=0.3499)}))
    assert ev["backbone_train"].status == "FAIL"
    ev = _by_key(targets.evaluate({"backbone_fast": _result(peak_mem_per_img_bytes=5e9 + 1)}))
    assert ev["backbone_train"].status == "FAIL"


def test_backbone_target_takes_the_candidate_that_meets_both():
    results = {
        "backbone_fast": _result(mfu=0.40, peak_mem_per_img_bytes=6e9),  # too much memory
        "backbone_fast_ckpt1": _result(mfu=0.36, peak_mem_per_img_bytes=4e9),
    }
    ev = _by_key(targets.evaluate(results))["backbone_train"]
    assert (ev.status, ev.row) == ("PASS", "backbone_fast_ckpt1")
    assert any(n.startswith("backbone_fast:") for n in ev.notes)
    # none meets both: FAIL on the row meeting most checks (the first one on a tie)
    results["backbone_fast_ckpt1"]["mfu"] = 0.2
    ev = _by_key(targets.evaluate(results))["backbone_train"]
    assert (ev.status, ev.row) == ("FAIL", "backbone_fast")


@pytest.mark.parametrize(
    "row, key, limit",
    [
        ("maskrcnn_train", "detector_train", 35.0),
        ("seg_backbone_train", "segmentation_backbone", 4.0),
    ],
)
def test_time_targets_boundaries(row, key, limit):
    setting = dict(batch_size=8, image_size=[512, 512]) if key.startswith("seg") else {}
    for ms, status in ((limit, "PASS"), (limit + 0.01, "FAIL")):
        ev = _by_key(targets.evaluate({row: _result(ms_per_img=ms, **setting)}))[key]
        assert ev.status == status and not ev.differs, (ms, ev.differs)


def test_inference_target_wants_batch_1():
    ev = _by_key(targets.evaluate({"maskrcnn_infer": _result(ms_per_img=25.0, batch_size=1)}))
    assert ev["detector_inference"].status == "PASS" and not ev["detector_inference"].differs
    ev = _by_key(targets.evaluate({"maskrcnn_infer": _result(ms_per_img=25.0)}))
    assert ev["detector_inference"].marked_status == "PASS*"
    assert ev["detector_inference"].differs == ["batch 4 (target: 1)"]


def test_pretrain_target_is_a_ratio_to_the_official_settings_row():
    pt = dict(batch_size=64, image_size=[224, 224])
    fast = _result(img_per_s=200.0, **pt)
    for official, status in ((100.0, "PASS"), (100.5, "FAIL")):
        results = {"pretrain_fast": fast, "pretrain_official": _result(img_per_s=official, **pt)}
        ev = _by_key(targets.evaluate(results))["pretrain"]
        assert ev.status == status and ev.measured[0].startswith(f"{200 / official:.2f}x")
    ev = _by_key(
        targets.evaluate(
            {"pretrain_fast": fast},
            {"pretrain_official": {"status": "timeout", "reason": "killed after 150 s"}},
        )
    )
    assert ev["pretrain"].status == "NOT RUN"
    assert "baseline pretrain_official: timeout (killed after 150 s)" in ev["pretrain"].notes


def test_not_run_when_rows_are_missing_or_not_measured():
    status = {"maskrcnn_train": {"status": "failed", "reason": "rc 1: CUDA out of memory"}}
    results = {"backbone_fast": _result(mfu=None)}
    ev = _by_key(targets.evaluate(results, status))
    assert all(e.status == "NOT RUN" for e in ev.values())
    assert "maskrcnn_train: failed (rc 1: CUDA out of memory)" in ev["detector_train"].notes
    assert "maskrcnn_infer: no result" in ev["detector_inference"].notes
    assert any("mfu: not measured" in n for n in ev["backbone_train"].notes)


def test_setting_differences_mark_the_status():
    cpu = _result(device="cpu", device_name="AMD EPYC", batch_size=1, image_size=[64, 64])
    cpu["fast_paths"] = dict(cpu["fast_paths"], dtype="fp32")
    ev = _by_key(targets.evaluate({"backbone_fast": cpu}))["backbone_train"]
    assert ev.status == "PASS" and ev.marked_status == "PASS*"
    assert [d.split()[0] for d in ev.differs] == ["device", "card", "batch", "size", "dtype"]


def test_markdown_table_lists_every_target_once():
    results = {"backbone_fast": _result()}
    table = targets.markdown_table(targets.evaluate(results), results)
    body = [ln for ln in table.splitlines() if ln.startswith("| ")][1:]
    assert len(body) == len(targets.TARGETS)
    for target, line in zip(targets.TARGETS, body):
        assert line.startswith(f"| {target.title} | {target.requirement} | **")
    assert "**PASS**" in body[0] and "MFU 40.0% of 790 TFLOP/s; 4.00 GB/img" in body[0]
    assert sum("**NOT RUN**" in ln for ln in body) == len(targets.TARGETS) - 1
    assert "official code itself is not run" in table


def test_loading_results_and_row_status(tmp_path):
    (tmp_path / "gpu_backbone_fast.json").write_text(json.dumps(_result()))
    (tmp_path / "gpu_backbone_ab.json").write_text(json.dumps({"speedup": 1.5}))
    (tmp_path / "other.json").write_text(json.dumps({"unrelated": 1}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "rows.tsv").write_text(
        perf_rows.TSV_HEADER + "gpu_maskrcnn_train\ttimeout\t-9\t150.0\t150\tkilled after 150 s\n"
    )
    assert set(targets.load_results([str(tmp_path)])) == {"backbone_fast", "backbone_ab"}
    assert (
        targets.load_row_status(str(tmp_path / "rows.tsv"))["maskrcnn_train"]["status"] == "timeout"
    )
    assert targets.load_row_status(str(tmp_path / "missing.tsv")) == {}
    assert targets.row_key("OUT/tiny_pretrain_fast.json") == "pretrain_fast"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "perf_targets.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "maskrcnn_train: timeout (killed after 150 s)" in proc.stdout


def test_targets_module_needs_no_torch():
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('t', {os.path.join(ROOT, 'convmae_det', 'benchmark', 'targets.py')!r}); "
        "m = importlib.util.module_from_spec(spec); sys.modules['t'] = m; spec.loader.exec_module(m); "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


# ------------------------------------------------------------------------------ GPU wheels
def test_wheel_folder_is_ignored_by_git():
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "/wheels/" in f.read().splitlines()


def test_prepare_dry_run_lists_every_pin_for_every_python():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gpu_wheels.py"), "prepare", "--dry-run",
         "--python-version", "3.10,3.12", "--python-version", "3.11"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sal-detectron2==0.7.2") and "sha256" in lines[0]
    for pin in gpu_wheels.PINS:
        mine = [ln for ln in lines if ln.startswith(pin.requirement + " ")]
        pythons = sorted(ln.split()[2] for ln in mine)
        assert pythons == (["3.10", "3.11", "3.12"] if pin.compiled else ["any"]), pin


def test_prepare_rejects_a_bad_python_version():
    with pytest.raises(SystemExit) as exc:
        gpu_wheels.main(["prepare", "--dry-run", "--python-version", "312"])
    assert exc.value.code == 2


def test_pins_satisfy_requirements_txt():
    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "requirements.txt")) as f:
        reqs = [Requirement(ln.split("#")[0].strip()) for ln in f if ln.split("#")[0].strip()]
    wanted = {gpu_wheels._normalize(r.name): r for r in reqs}
    for pin in gpu_wheels.PINS:
        req = wanted.get(gpu_wheels._normalize(pin.name))
        if req is not None:
            assert req.specifier.contains(pin.version, prereleases=True), (pin, str(req))


def _manifest(tmp_path, pins, files, pythons=None):
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    manifest = {
        "python_versions": pythons or [py],
        "pins": pins,
        "python_coverage": {name: [py] for name in pins},
        "files": {},
    }
    for name, data in files.items():
        (wheels / name).write_bytes(data)
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest()}
    (wheels / "manifest.json").write_text(json.dumps(manifest))
    return str(wheels)


def test_install_checks_the_folder_before_installing(tmp_path, capsys):
    target = str(tmp_path / "site")
    assert gpu_wheels.install(str(tmp_path / "nowhere"), target) == 1
    assert "prepare the folder" in capsys.readouterr().err
    wheels = _manifest(tmp_path, {"pytest": "1.0"}, {"a.whl": b"abc"}, pythons=["2.7"])
    assert gpu_wheels.install(wheels, target) == 1
    assert "prepare again with --python-version" in capsys.readouterr().err
    wheels = _manifest(tmp_path, {"pytest": "1.0"}, {"a.whl": b"abc"})
    with open(os.path.join(wheels, "a.whl"), "wb") as f:
        f.write(b"tampered")
    assert gpu_wheels.install(wheels, target) == 1
    assert "differs from the manifest" in capsys.readouterr().err
    assert not os.path.exists(target)


def test_install_only_installs_what_is_missing(tmp_path, capsys):
    wheels = _manifest(
        tmp_path, {"pytest": "0.0.1", "surely-not-installed-pkg": "1.0"}, {"a.whl": b"abc"}
    )
    assert gpu_wheels.install(wheels, str(tmp_path / "site"), dry_run=True) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(": surely-not-installed-pkg==1.0")  # pytest is installed
    wheels = _manifest(tmp_path, {"pytest": "0.0.1"}, {"a.whl": b"abc"})
    assert gpu_wheels.install(wheels, str(tmp_path / "site")) == 0
    assert "nothing to install" in capsys.readouterr().out


def test_check_finds_the_installed_dependencies():
    assert gpu_wheels.check() == 0
