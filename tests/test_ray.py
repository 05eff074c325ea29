"""pytest tests/test_ray.py -q

`mod-extract --ray` on a local Ray cluster (ray.init(num_cpus=2)): 2 workers x 3 shards give the
single-process cache bit for bit, and a worker killed in the middle of a shard is retried by Ray and
still gives it; `mod-store status` shows the half-done cache the kill left behind.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
import torch
from typer.testing import CliRunner

from modkd.extract.ray_engine import gpus_per_task, run_on_ray
from modkd.extract.run import TEST_EXIT_HOOK, ExtractConfig, run
from modkd.extract.vllm_backend import VLLMOptions
from modkd.pipelines.cli_extract import app as extract_app
from modkd.pipelines.cli_store import app as store_app
from modkd.store import Cache
from test_extract import assert_same_records
from test_extract_overlap import assert_bit_identical

SHARDS = 3


@pytest.fixture(scope="module")
def single(tmp_path_factory, teacher_dir, mixed_data, world) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    with one_thread():
        run(ExtractConfig(str(teacher_dir), mixed_data, out, world, shards=SHARDS, batch_size=2, row_group_size=2))
    return out


@contextmanager
def one_thread():
    """Compute here with one torch thread, as a Ray task on CPU does (Ray gives a task OMP_NUM_THREADS = its
    num_cpus, 1): another thread count may change float sums in the last bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def local_ray():
    """A fresh local cluster per test: tasks inherit the environment the test set before it started."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_two_ray_workers_equal_one_process(tmp_path, teacher_dir, mixed_data, world, single, local_ray):
    out = tmp_path / "cache"
    result = CliRunner().invoke(extract_app, [
        "--ray", "--num-workers", "2", "--teacher", str(teacher_dir), "--data", str(mixed_data), "--image-root",
        str(world), "--out", str(out), "--shards", str(SHARDS), "--batch-size", "2", "--row-group-size", "2"])
    assert result.exit_code == 0, result.output
    assert f"[ray] {SHARDS}/{SHARDS} shards complete" in result.output and "cache complete" in result.output
    summary = json.loads(result.output.split("Ray, 2 workers: ", 1)[1].splitlines()[0])
    assert summary["shards_done_now"] == SHARDS and summary["gpus_per_worker"] == 0
    assert_bit_identical(out, single)
    assert_same_records(Cache.open(out), Cache.open(single), atol=0)


def test_a_worker_killed_mid_shard_is_retried_and_the_cache_is_identical(tmp_path, teacher_dir, mixed_data, world,
                                                                          single, monkeypatch):
    flag = tmp_path / "killed-once"
    monkeypatch.setenv(TEST_EXIT_HOOK, f"2:{flag}")  # exit after 2 records of a shard are written (row groups of 2)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        out = tmp_path / "cache"
        cfg = ExtractConfig(str(teacher_dir), mixed_data, out, world, shards=SHARDS, batch_size=2, row_group_size=2,
                            num_workers=2)
        summary = run_on_ray(cfg, log=print)
    finally:
        ray.shutdown()
    assert flag.exists()  # a worker process did exit in the middle of a shard, once
    assert summary["shards_done_now"] + summary["shards_skipped"] == SHARDS
    assert_bit_identical(out, single)
    assert_same_records(Cache.open(out), Cache.open(single), atol=0)


def test_status_shows_complete_partial_and_missing(tmp_path, teacher_dir, mixed_data, world, single):
    out = tmp_path / "cache"
    for worker in (0, 2):  # 2 of 3 workers finish: shards 0 and 2 complete, shard 1 missing
        with one_thread():
            run(ExtractConfig(str(teacher_dir), mixed_data, out, world, shards=SHARDS, batch_size=2, row_group_size=2,
                              num_workers=3, worker_index=worker))
    runner = CliRunner()
    status = json.loads(runner.invoke(store_app, ["status", str(out), "--json"]).output)
    assert status["shards"] == {"num_shards": 3, "complete": [0, 2], "partial": [], "missing": [1],
                                "manifest_final": False}
    assert status["preference"] is None
    (out / "shards" / ".part-00001-of-00003.parquet.tmp-123").write_bytes(b"PAR1")  # a worker on it, or killed on it
    result = runner.invoke(store_app, ["status", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "shards: 2 of 3 shards complete, 1 partial, 0 missing; manifest not written yet"
    assert lines[1:4] == ["  complete: 0, 2", "  partial:  1", "  missing:  none"]
    assert lines[4] == "preference: not started"
    with one_thread():  # the rerun redoes the partial shard
        run(ExtractConfig(str(teacher_dir), mixed_data, out, world, shards=SHARDS, batch_size=2, row_group_size=2,
                          num_workers=3, worker_index=1))
    status = json.loads(runner.invoke(store_app, ["status", str(out), "--json"]).output)["shards"]
    assert status["complete"] == [0, 1, 2] and status["manifest_final"]
    assert_bit_identical(out, single)


def test_gpus_reserved_per_worker():
    cpu, gpu = {"CPU": 2.0}, {"CPU": 16.0, "GPU": 8.0}
    cfg = ExtractConfig("t", Path("d"), Path("o"), backend="hf")
    assert gpus_per_task(cfg, cpu) == 0 and gpus_per_task(cfg, gpu) == 1
    vllm = ExtractConfig("t", Path("d"), Path("o"), backend="vllm", vllm=VLLMOptions(tensor_parallel_size=4))
    assert gpus_per_task(vllm, gpu) == 4 and gpus_per_task(vllm, cpu) == 0
    assert gpus_per_task(ExtractConfig("t", Path("d"), Path("o"), backend="vllm", device="cpu"), gpu) == 0
