"""bench/gpu.py, the GPU check: its CPU dry run (every row there, none FAILs), its refusal without
CUDA, and on CUDA (tests marked `gpu`) its checks themselves."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPT = BENCH / "gpu.py"
NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.py's checks)"
)
# the rows a CPU dry run cannot run: their kernels need CUDA
CUDA_ONLY = {"varlen isolation, flash_attention_2", "varlen isolation, flex_attention", "fla kernels"}


def gpu_module():
    """bench/gpu.py as a module (it imports bench/common.py as `common`)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if "bench_gpu" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_gpu"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["bench_gpu"]


def table_rows(text: str) -> dict[str, list[str]]:
    """{check: [result, measured, criterion, seconds]} of the report's markdown table."""
    lines = [x for x in text.splitlines() if x.startswith("| ")]
    rows = {}
    for line in lines[1:]:  # lines[0] is the header; the separator starts with "| -"
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = cells[1:]
    return rows


def run_script(*args, timeout=300):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
    )


@pytest.mark.slow
def test_dry_run_has_every_check_and_none_fails(tmp_path):
    out = tmp_path / "gpu-dry.md"
    p = run_script("--dry", "--out", str(out), timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = out.read_text()
    assert report.strip() in p.stdout
    rows = table_rows(report)
    names = [name for name, _ in gpu_module().CHECKS]
    assert list(rows) == names, report
    for name, (result, measured, criterion, seconds) in rows.items():
        assert result in ("pass", "skipped"), f"{name}: {result} {measured}"
        float(seconds)
        if result == "skipped":
            assert any(name.startswith(c) for c in CUDA_ONLY), f"{name} skipped: {criterion}"
            assert "needs CUDA" in criterion
        else:
            assert measured != "-" and criterion
    for name in names:  # every CUDA-only row is there, skipped with its reason
        if any(name.startswith(c) for c in CUDA_ONLY):
            assert rows[name][0] == "skipped"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_the_full_run_refuses_and_points_to_dry():
    p = run_script(timeout=120)
    assert p.returncode == 2
    assert "no CUDA device" in p.stderr and "--dry" in p.stderr
    assert "| check" not in p.stdout


def test_a_failing_check_is_a_fail_row_not_a_crash(tmp_path):
    gpu = gpu_module()
    ctx = gpu.Ctx(dry=True, root=tmp_path)

    def broken(ctx):
        raise RuntimeError("kernel exploded\nsecond line")

    def skipped(ctx):
        raise gpu.Skip("needs CUDA")

    row = gpu.run_check(ctx, "broken", broken)
    assert (row.check, row.result) == ("broken", "FAIL") and "kernel exploded" in row.measured
    assert "second line" not in row.measured
    assert gpu.run_check(ctx, "skipped", skipped).result == "skipped"
    assert "|" not in "".join(gpu.Row("a|b", "pass", "x|y", "c").cells())


# ---- on CUDA: the checks themselves (the full command as one test, quick checks one by one)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize(
    "check",
    [
        "check_bf16_loss",
        "check_fused_loss",
        "check_fused_adamw",
        "check_sdpa",
        "check_flash",
        "check_flex",
    ],
)
def test_gpu_check(check, tmp_path):
    gpu = gpu_module()
    row = gpu.run_check(gpu.Ctx(dry=False, root=tmp_path), check, getattr(gpu, check))
    assert row.result != "FAIL", f"{row.check}: {row.measured} (criterion: {row.criterion})"


@pytest.mark.gpu
@pytest.mark.slow
@NEEDS_CUDA
def test_full_gpu_check_passes(tmp_path):
    out = tmp_path / "gpu.md"
    p = run_script("--out", str(out), timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    rows = table_rows(out.read_text())
    assert list(rows) == [name for name, _ in gpu_module().CHECKS]
    assert all(r[0] != "FAIL" for r in rows.values())
