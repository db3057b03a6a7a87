"""The benchmark script runs end to end (tiny); its figures are for the bench, not asserted here."""
import re
import subprocess
import sys

from conftest import REPO


def test_prep_throughput_bench_runs(tmp_path):
    proc = subprocess.run([sys.executable, "bench/prep_throughput.py", "--images", "120", "--rounds", "1",
                           "--max-samples", "40", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio_vs_tar: \d+\.\d\d", lines[-1])
    assert any(line.startswith("shard, 2 workers ") for line in lines)


def test_loader_throughput_bench_runs(tmp_path):
    proc = subprocess.run([sys.executable, "bench/loader_throughput.py", "--images", "300", "--rounds", "1",
                           "--batch-size", "32", "--workdir", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio_dali_vs_torch: \d+\.\d\d", lines[-1])
    assert any(line.startswith("torch + RandAugment") for line in lines)


def test_train_throughput_bench_runs_and_zero_partitions_as_the_theory_says():
    proc = subprocess.run([sys.executable, "bench/train_throughput.py", "--arch", "swin_nano", "--img-size", "64",
                           "--window", "4", "--batch", "8", "--rounds", "2", "--memory-worlds", "1,2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio_vs_plain: \d+\.\d\d", lines[-1])
    rows = [line.split() for line in lines if re.fullmatch(r"\s+\d\s+\d\s+[\d.]+\s+[\d.]+\s+[\d.]+", line)]
    assert len(rows) == 8  # ZeRO 0-3 x world 1, 2
    for stage, world, measured, theory, _ in rows:  # optimizer bytes per parameter held by one rank
        assert float(measured) == float(theory), f"ZeRO-{stage} world {world}: {measured} B/param, theory {theory}"


def test_bias_table_transfer_bench_runs():
    proc = subprocess.run([sys.executable, "bench/bias_table_transfer.py", "--epochs", "1", "--table-lr-scales", "20"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"agreement_gain_bicubic_vs_zeros: -?\d+\.\d{3}", lines[-1])
    assert re.match(r"\s+0\s+x20\s+\d\.\d{3}", lines[-2]), lines
