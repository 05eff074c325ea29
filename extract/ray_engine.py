"""mod-extract --ray --num-workers 8 --teacher qwen15-7b-llava --data train.jsonl --image-root imgs/ --out cache/ --shards 256

Ray as mod-extract's cluster engine (optional: `pip install "modkd[ray]"`; imported only with --ray).

The driver scans the data file once (extract/data_index.py records it in the cache), then submits one
Ray task per worker index; each runs the ordinary `run(cfg)` for its index (shards s with
s % num_workers == index) and reserves the GPUs its teacher needs. A task whose process or node dies is
retried: shards are idempotent, so the retry skips the shards that have done markers and redoes the one
that was cut. The driver prints progress over all shards while the tasks run and makes sure the
manifest is written once every shard is complete. Every worker must see the same --out (a shared file
system) and the data file, teacher and images, at any path (paths are not part of the extraction's identity).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from modkd.store import finalize_manifest, shard_progress

from .data_index import part_dir, prepare
from .run import ExtractConfig, resolve_backend, run
from .vllm_backend import VLLMOptions

MAX_RETRIES = 3  # a task whose process or node died is run again this often (a Python exception is not: it would recur)
POLL_S = 5.0  # seconds between progress checks; a line is printed when the count of complete shards changes
TASK_ENV = {"TQDM_DISABLE": "1"}  # N progress bars interleaved in the driver's log help no one: the driver prints one


def run_on_ray(cfg: ExtractConfig, address: str | None = None, log=print, poll_s: float = POLL_S) -> dict:
    """Run workers 0..cfg.num_workers-1 as Ray tasks; returns a summary over all of them with the manifest.

    `address`: a Ray cluster ("auto", "ray://host:10001", ...) or None: $RAY_ADDRESS, else a local cluster
    (ray.init's own rule). A Ray already initialised in this process is used as it is."""
    try:
        import ray
    except ImportError:
        raise ImportError('--ray needs Ray: pip install "modkd[ray]" (or "ray>=2.9")') from None
    if not ray.is_initialized():
        ray.init(address=address)
    log(f"[ray] scanning {cfg.data} once for all workers")
    preference, subdir, _ = prepare(cfg.data, cfg.out, cfg.shards)
    gpus = gpus_per_task(cfg, ray.cluster_resources())
    task = ray.remote(_worker).options(num_gpus=gpus, max_retries=MAX_RETRIES, retry_exceptions=False,
                                       runtime_env={"env_vars": TASK_ENV})
    refs = {task.remote(replace(cfg, worker_index=i)): i for i in range(cfg.num_workers)}
    log(f"[ray] {cfg.num_workers} workers submitted, {gpus} GPU(s) each, {cfg.shards} shards in {cfg.out}")
    pending, results, errors, shown = list(refs), {}, {}, None
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
        for ref in ready:
            try:
                results[refs[ref]] = ray.get(ref)
            except Exception as e:  # the other workers go on: their shards count for the rerun
                errors[refs[ref]] = e
        done, _ = shard_progress(cfg.out, cfg.shards, subdir)
        if (done, len(ready)) != (shown, 0):
            log(f"[ray] {done}/{cfg.shards} shards complete; {len(results) + len(errors)}/{cfg.num_workers} workers finished"
                + (f", {len(errors)} failed" if errors else ""))
            shown = done
    if errors:
        first = min(errors)
        raise RuntimeError(f"{len(errors)} of {cfg.num_workers} Ray workers failed (after up to {MAX_RETRIES} retries "
                           f"of a lost process); rerun the same command to finish the missing shards. Worker {first}: "
                           f"{errors[first]}") from errors[first]
    manifest = next((r["manifest"] for r in results.values() if r["manifest"] is not None), None)
    if manifest is None:  # the worker that completes the last shard writes it; this covers any race doubly
        header = json.loads((part_dir(cfg.out, subdir) / "extract_config.json").read_text())
        manifest = finalize_manifest(cfg.out, cfg.shards, header, subdir)
    summary = {k: sum(r[k] for r in results.values()) for k in ("shards_skipped", "shards_done_now", "internal_errors")}
    return {"workers": cfg.num_workers, "gpus_per_worker": gpus, **summary, "preference": preference,
            "backend": results[0]["backend"], "manifest": manifest}


def gpus_per_task(cfg: ExtractConfig, resources: dict) -> float:
    """GPUs one worker reserves: vLLM's --tensor-parallel-size (hf: 1) when it runs on GPUs, else 0."""
    on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and resources.get("GPU", 0) > 0)
    if not on_gpu:
        return 0
    return (cfg.vllm or VLLMOptions()).tensor_parallel_size if resolve_backend(cfg.backend) == "vllm" else 1


def _worker(cfg: ExtractConfig) -> dict:
    """One Ray task: the plain worker, with its node's name in the summary."""
    summary = run(cfg, log=lambda line: print(f"[worker {cfg.worker_index}] {line}", flush=True))
    return {**summary, "node": os.uname().nodename}
