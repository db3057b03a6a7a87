"""The benchmark scripts, tiny: they measure what they claim (every variant did the same work), report consistent
ratios and leave no scratch behind; their figures themselves are for the bench, not asserted here."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO


def run_bench_in_scratch_cwd(tmp_path, *args, timeout):
    """Runs a bench without --workdir from an empty working folder, with its own TMPDIR; returns its stdout lines
    after checking that it left nothing behind in either place (scratch goes to the temp dir, never the cwd)."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / args[0]), *args[1:]],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == [], "the bench wrote into the working folder"
    assert [p.name for p in tmp.iterdir() if "bench" in p.name] == [], "the bench left its scratch folder"
    return proc.stdout.strip().splitlines()


def rates(lines, names):
    """{variant: img/s} from the bench table's rows."""
    out = {}
    for line in lines:
        for name in names:
            if line.startswith(name + " ") and re.match(re.escape(name) + r"\s+(\d+)\s", line):
                out[name] = float(re.match(re.escape(name) + r"\s+(\d+)\s", line).group(1))
    return out


def test_prep_throughput_bench_shards_every_image_and_leaves_no_scratch(tmp_path):
    lines = run_bench_in_scratch_cwd(
        tmp_path, "prep_throughput.py", "--images", "120", "--rounds", "1", "--max-samples", "40", timeout=300
    )
    main = "shard, 2 workers x 2 threads"
    table = rates(lines, ["tar", main])
    ratio = float(re.fullmatch(r"ratio_vs_tar: (\d+\.\d\d)", lines[-1]).group(1))
    assert table["tar"] > 0 and table[main] > 0  # every shard run wrote all 120 images (the bench exits otherwise)
    assert ratio == pytest.approx(table[main] / table["tar"], abs=0.02)


def test_checkpoint_integrity_bench_saves_both_ways_checks_and_leaves_no_scratch(tmp_path):
    lines = run_bench_in_scratch_cwd(
        tmp_path,
        "checkpoint_integrity.py",
        *("--arch", "swin_nano", "--img-size", "64", "--classes", "10", "--rounds", "1"),
        timeout=300,
    )
    figures = dict(line.split(": ", 1) for line in lines if ": " in line)
    with_, without = (
        float(figures[k].split("median ")[1].rstrip(")")) for k in ("save_s_with_checksums", "save_s_without")
    )
    assert float(figures["save_ratio_median"]) == pytest.approx(with_ / without, rel=0.1, abs=0.01)
    assert {"check_hot_s_per_gb", "read_cold_s_per_gb", "check_vs_read_cold"} <= set(figures)


def test_loader_throughput_bench_every_variant_decodes_the_same_images(tmp_path):
    lines = run_bench_in_scratch_cwd(
        tmp_path, "loader_throughput.py", "--images", "300", "--rounds", "1", "--batch-size", "32", timeout=600
    )
    # 300 images in one epoch of batches of 32, less the first batch (not timed): 8 x 32
    assert "images timed per epoch, every variant: 256" in lines
    table = rates(lines, ["torch", "dali"])
    ratio = float(re.fullmatch(r"ratio_dali_vs_torch: (\d+\.\d\d)", lines[-1]).group(1))
    assert ratio == pytest.approx(table["dali"] / table["torch"], abs=0.02)


def test_train_throughput_bench_runs_and_zero_partitions_as_the_theory_says():
    proc = subprocess.run(
        [
            sys.executable,
            "bench/train_throughput.py",
            "--arch",
            "swin_nano",
            "--img-size",
            "64",
            "--window",
            "4",
            "--batch",
            "8",
            "--rounds",
            "2",
            "--memory-worlds",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"ratio_vs_plain: \d+\.\d\d", lines[-1])
    rows = [line.split() for line in lines if re.fullmatch(r"\s+\d\s+\d\s+[\d.]+\s+[\d.]+\s+[\d.]+", line)]
    assert len(rows) == 4  # ZeRO 0-3 on 2 ranks (a world of one partitions nothing: the full run shows it too)
    for stage, world, measured, theory, _ in rows:  # optimizer bytes per parameter held by one rank
        assert float(measured) == float(theory), f"ZeRO-{stage} world {world}: {measured} B/param, theory {theory}"
    assert [float(row[3]) for row in rows] == [12.0, 6.0, 6.0, 6.0]  # ZeRO 1-3 halve it on 2 ranks


def test_bicubic_tables_keep_a_source_that_leans_on_them_closer_than_zero_tables():
    """bench/bias_table_transfer.py, short: a source whose tables carry a locality pattern (zeroing them at its
    own size changes its answers), moved from 64/w4 to 96/w6, agrees better with itself with bicubic tables than
    with zero ones, in top-1 and in KL (30 epochs, 3 seeds: 71-80% against 34-51%; 5 epochs: ~32% against ~21%)."""
    proc = subprocess.run(
        [sys.executable, "bench/bias_table_transfer.py", "--epochs", "5", "--sources", "locality-prior"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"agreement_gain_bicubic_vs_zeros: -?\d+\.\d{3}", lines[-1])
    number = r"\s+([\d.]+)"
    row = re.match(r"\s+0\s+locality-prior" + number * 3 + number + " /" + number + number + " /" + number, lines[-2])
    assert row, lines
    val_top1, _mean_abs, own_size_zeros, bicubic, bicubic_kl, zeros, zeros_kl = map(float, row.groups())
    assert val_top1 > 0.8 and own_size_zeros < 0.95  # a working source that leans on its tables
    assert bicubic > zeros + 0.05 and bicubic_kl < zeros_kl, lines[-2]


def test_gpu_check_dry_run_and_its_cpu_parts(tmp_path):
    """bench/gpu_check.sh --dry-run passes on a machine without a GPU (every command it would call starts; the GPU
    tier is collected), and the DALI comparison's code runs on CPU (DALI CPU against itself: no difference)."""
    dry = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    planned = [line.split("]")[0].split("[")[1] for line in dry.stdout.splitlines() if line.startswith("would run [")]
    assert planned == [
        "facts",
        "data",
        "steps",
        "dali_mixed_vs_cpu",
        "swin_b_bf16_engine_vs_plain",
        "tiny_fp16_zero2",
        "tiny_fp16_zero2_figures",
        "tiny_fp16_zero0",
        "tiny_fp16_zero0_figures",
        "pytest_gpu",
    ]
    caps = sum(
        int(re.search(r"\(at most (\d+)s\)", line).group(1))
        for line in dry.stdout.splitlines()
        if line.startswith("would run [")
    )
    assert caps <= 360  # the whole check fits 6 minutes of one GPU
    found = re.search(r"dry run: OK, (\d+) GPU-tier tests collected, steps capped at (\d+)s", dry.stdout)
    assert int(found.group(1)) >= 4 and int(found.group(2)) == caps
    check = [sys.executable, str(REPO / "bench" / "gpu_check.py")]
    made = subprocess.run(
        [*check, "data", str(tmp_path), "--images", "40"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert made.returncode == 0, made.stderr[-3000:]
    dali = subprocess.run(
        [*check, "dali", str(tmp_path / "photos"), "--device", "cpu", "--batch-size", "8", "--compare-batches", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dali.returncode == 0, dali.stderr[-3000:]
    assert "dali_mixed_vs_cpu_mean_abs_diff: 0.000 (0-255 scale, 2 batches of 8" in dali.stdout


@pytest.mark.s3
def test_s3_read_ahead_bench_reads_the_same_images_from_s3_and_locally(tmp_path, s3_server):
    lines = run_bench_in_scratch_cwd(
        tmp_path,
        "s3_read_ahead.py",
        "--images",
        "200",
        "--rounds",
        "1",
        "--image-size",
        "32",
        "--delay-ms",
        "5",
        timeout=600,
    )
    assert "images per epoch, every variant: 192" in lines[0]  # 200 images, whole batches of 64
    table = {line[:44].strip(): float(line[44:].split()[0]) for line in lines[2:5]}  # epoch img/s
    local, ahead = table["local, warm"], table["s3 +5 ms, cold, read-ahead 4"]
    ratio = float(re.fullmatch(r"ratio_s3_cold_vs_local_warm: (\d+\.\d\d)", lines[-1]).group(1))
    assert ratio == pytest.approx(ahead / local, rel=0.02)


@pytest.mark.s3
def test_shardset_scale_bench_opens_every_variant_to_the_same_set(tmp_path, s3_server):
    lines = run_bench_in_scratch_cwd(
        tmp_path, "shardset_scale.py", "--shards", "30", "--rounds", "1", "--delay-ms", "5", timeout=600
    )
    assert lines[0].startswith("30 train shards of 10 images, 300 samples")
    per_sample = float(re.fullmatch(r"held_bytes_per_sample_at_1000_per_shard: (\d+\.\d)", lines[-3]).group(1))
    assert 0 < per_sample <= 64
    assert float(re.fullmatch(r"open_s3_seconds: (\d+\.\d\d)", lines[-1]).group(1)) > 0


def test_webdataset_compare_bench_both_readers_read_every_sample(tmp_path):
    lines = run_bench_in_scratch_cwd(
        tmp_path, "webdataset_compare.py", "--images", "200", "--shard-images", "100", "--rounds", "1", timeout=300
    )
    assert lines[0].startswith("2 shards, 200 samples")  # both readers read all of them (the bench checks)
    assert any("TarWriter" in line for line in lines)
    assert float(re.fullmatch(r"ratio_resume_ours_vs_webdataset: (\d+\.\d)", lines[-1]).group(1)) > 0


def test_listing_memory_bench_reports_a_slope_per_listed_image(tmp_path):
    lines = run_bench_in_scratch_cwd(tmp_path, "listing_memory.py", "--synsets", "200", "--rounds", "1", timeout=300)
    assert lines[0].startswith("data_prep shard --list-only over 200 synset tars")
    assert int(re.fullmatch(r"bytes_per_image: (-?\d+)", lines[-1]).group(1)) < 2000


def test_startup_bench_times_every_help_against_the_bare_interpreter(tmp_path):
    lines = run_bench_in_scratch_cwd(tmp_path, "startup.py", "--repeats", "1", "--only", "help", timeout=600)
    rows = [line for line in lines if "--help" in line]
    assert len(rows) == 5 and all(
        re.search(r"\d+\.\d\d\s+python\s+[+-]\d+\.\d\d\s+under 1\.0 s: (met|NOT met)$", r) for r in rows
    ), lines
    assert lines[1].startswith("  baselines: python ")
