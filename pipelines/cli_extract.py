"""`mod-extract`: run a teacher once over a data file and write its top-k log-probs as a sharded cache.

    mod-extract --teacher toy-teacher --data world/train.jsonl --image-root world/ --out cache/ --shards 8
    mod-extract --teacher toy-teacher --data world/pref.jsonl --image-root world/ --out cache/   # preference pairs
    mod-extract --backend vllm --tensor-parallel-size 2 --teacher qwen15-7b-llava ...         # the teacher under vLLM
    mod-extract --format webdataset --embed-images ...                                        # tar shards, images inside
    mod-extract --ray --num-workers 8 --teacher qwen15-7b-llava ...        # 8 Ray tasks (--ray-address ADDR: a cluster)

Thin: parses options into an ExtractConfig, prints it whole, calls `modkd.extract.run.run`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from modkd.extract.run import BACKENDS, ExtractConfig, config_dict, run
from modkd.extract.teacher import PRESETS
from modkd.extract.vllm_backend import VLLMOptions
from modkd.store import ENCODINGS, FORMATS, POSITION_MODES

app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])


@app.command()
def extract(
    teacher: str = typer.Option(..., help=f"preset ({', '.join(PRESETS)}), local HF directory or hub id"),
    data: Path = typer.Option(..., exists=True, dir_okay=False,
                              help="LLaVA-format JSON or JSONL; records with chosen/rejected are preference pairs"),
    out: Path = typer.Option(..., help="cache directory (created; a rerun resumes it)"),
    image_root: Path = typer.Option(None, exists=True, file_okay=False, help="directory image paths are relative to"),
    shards: int = typer.Option(1, min=1, help="number of output shards (a deterministic split of the data file)"),
    encoding: str = typer.Option("topk", help="how each position's distribution is stored: topk (the K most likely "
                                              "tokens' log-probs, any backend) | sampled (N draws, --backend hf)"),
    top_k: int = typer.Option(20, min=1, help="topk: teacher log-probs kept per position (not used for preference pairs)"),
    samples: int = typer.Option(32, min=1, help="sampled: draws per position from the teacher's distribution"),
    sample_seed: int = typer.Option(0, help="sampled: draws are fixed by (seed, sample id, position)"),
    positions: str = typer.Option("response", help=f"which positions to store: {' | '.join(POSITION_MODES)} "
                                                   "(preference pairs: every response token)"),
    relation: str = typer.Option("none", help="LLaVA-KD RDist targets per record: none | logits (R = Y_v Y_v^T over "
                                              "the image tokens' logits, Eq. 4) | embeddings (cosine self-correlation "
                                              "of the projected image embeddings); --backend hf"),
    batch_size: int = typer.Option(8, min=1),
    max_length: int = typer.Option(4096, min=2, help="records longer than this (after image expansion) are rejected"),
    num_workers: int = typer.Option(int(os.environ.get("WORLD_SIZE", 1)), min=1, help="default: $WORLD_SIZE"),
    worker_index: int = typer.Option(int(os.environ.get("RANK", 0)), min=0, help="default: $RANK"),
    ray: bool = typer.Option(False, "--ray", help="run all --num-workers workers as Ray tasks (pip install "
                                                  "'modkd[ray]'); without --ray-address: $RAY_ADDRESS or a local cluster"),
    ray_address: str = typer.Option(None, help="the Ray cluster to run on (auto, ray://HOST:10001, ...); implies --ray"),
    encode_workers: int = typer.Option(None, min=0, help="processes encoding records ahead of the teacher (0: serial "
                                                         "in this process); default 2 on GPU, 0 on CPU"),
    row_group_size: int = typer.Option(256, min=1, help="records per Parquet row group / WebDataset chunk"),
    shard_format: str = typer.Option("parquet", "--format", help="shard format: parquet | webdataset (tar shards)"),
    embed_images: bool = typer.Option(False, help="webdataset: carry the image bytes in the shards (no image root "
                                                  "needed to train)"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA, fp32 on CPU)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    trust_remote_code: bool = typer.Option(False, help="allow the checkpoint's own Python code to run"),
    backend: str = typer.Option("auto", help="hf (transformers) | vllm | auto (vllm when installed, else hf)"),
    tensor_parallel_size: int = typer.Option(VLLMOptions.tensor_parallel_size, min=1, help="vllm: GPUs per teacher"),
    gpu_memory_utilization: float = typer.Option(
        VLLMOptions.gpu_memory_utilization, min=0.05, max=1.0,
        help="vllm: share of GPU memory for weights + KV cache; the rest holds prompt log-probs, which vLLM does not profile"),
    max_model_len: int = typer.Option(None, min=2, help="vllm: context length (default: the model's)"),
    max_num_batched_tokens: int = typer.Option(
        VLLMOptions.max_num_batched_tokens, min=16,
        help="vllm: tokens per engine step; bounds prompt log-prob memory (tokens x vocab x 4 B)"),
    enforce_eager: bool = typer.Option(False, help="vllm: no CUDA graphs / compilation (faster start)"),
):
    if backend not in BACKENDS:
        raise typer.BadParameter(f"--backend must be one of {', '.join(BACKENDS)}")
    if shard_format not in FORMATS or (embed_images and shard_format != "webdataset"):
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}; --embed-images needs --format webdataset")
    if encoding not in ENCODINGS:
        raise typer.BadParameter(f"--encoding must be one of {', '.join(ENCODINGS)}")
    if positions not in POSITION_MODES:
        raise typer.BadParameter(f"--positions must be one of {', '.join(POSITION_MODES)}")
    cfg = ExtractConfig(teacher=teacher, data=data, out=out, image_root=image_root, shards=shards, top_k=top_k,
                        encoding=encoding, samples=samples, sample_seed=sample_seed, positions=positions, relation=relation, batch_size=batch_size, max_length=max_length, num_workers=num_workers,
                        worker_index=worker_index, row_group_size=row_group_size, dtype=dtype, device=device,
                        trust_remote_code=trust_remote_code, backend=backend, format=shard_format,
                        embed_images=embed_images, encode_workers=encode_workers,
                        vllm=VLLMOptions(tensor_parallel_size, gpu_memory_utilization, max_model_len,
                                         max_num_batched_tokens, enforce_eager))
    typer.echo(f"mod-extract config: {json.dumps(config_dict(cfg))}")
    if ray or ray_address:
        from modkd.extract.ray_engine import run_on_ray  # Ray is optional: imported only here

        summary = run_on_ray(cfg, ray_address, log=typer.echo)
    else:
        summary = run(cfg)
    manifest = summary.pop("manifest")
    who = f"Ray, {num_workers} workers" if ray or ray_address else f"worker {worker_index}/{num_workers}"
    typer.echo(f"{who}: {json.dumps(summary)}")
    _report(summary, manifest, out)
    if summary["internal_errors"]:  # after the whole run: every other record is cached
        typer.echo(f"mod-extract: {summary['internal_errors']} record(s) of this worker's shards raised an unexpected "
                   f"error (kind internal_error in {out}/*/*.rejects.jsonl); please report it", err=True)
        raise typer.Exit(1)


def _report(summary: dict, manifest: dict | None, out: Path) -> None:
    if manifest is None:
        typer.echo("other workers' shards are not complete yet; the last worker to finish writes manifest.json")
        return
    t = manifest["totals"]
    part = "preference" if summary["preference"] else "shards"
    where, what = (f"{out}/preference/manifest.json", "preference pairs") if summary["preference"] else \
        (f"{out}/manifest.json", f"records; {t['positions']} positions")
    typer.echo(f"cache complete: {where}  records in {t['records_in']} = written {t['records_written']}"
               f" + rejected {t['records_rejected']} {what}, {t['bytes']} bytes")
    if manifest["rejects"]:
        typer.echo(f"rejected by reason: {json.dumps(manifest['rejects'])} (details: {out}/{part}/*.rejects.jsonl,"
                   f" or `mod-store inspect {out}`)")


def main():
    app()
