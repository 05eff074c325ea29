"""pytest tests/test_student_train.py -q -k resume   # checkpoints that resume bit-exactly

A checkpoint is OUT/checkpoints/step-NNNNNNN/: accelerate's `save_state` (model, optimizer, scheduler,
every process's RNG states) plus `stream-rankR.json` per process (step, and the data stream's state
after the last consumed batch). It is written under a temporary name and renamed when complete, so a
killed run leaves either the whole checkpoint or none; the newest complete one is where a rerun resumes.
Only the newest `KEEP` checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator
from safetensors import safe_open

from .engine import is_sharded

KEEP = 2  # the newest, and the one before it in case the newest is from a run that then went bad


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest(out: Path) -> Path | None:
    done = sorted(checkpoint_dir(out).glob("step-*[0-9]"))
    return done[-1] if done else None


def save(accelerator: Accelerator, out: Path, step: int, stream_state: dict) -> Path:
    final = checkpoint_dir(out) / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # safetensors weights, optimizer, scheduler, RNG of every process
    (tmp / f"stream-rank{accelerator.process_index}.json").write_text(
        json.dumps({"step": step, "stream": stream_state}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(final)
        for old in sorted(checkpoint_dir(out).glob("step-*[0-9]"))[:-KEEP]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, model, path: Path) -> tuple[int, dict]:
    """Restores model, optimizer, scheduler and RNG; returns (step, this process's stream state)."""
    if is_sharded(accelerator):  # FSDP / DeepSpeed read their own sharded layout, strictly
        accelerator.load_state(str(path))
    else:
        accelerator.load_state(str(path), strict=False)  # safetensors stores no zero-size tensors (empty shared experts)
        _check_every_weight_was_stored(accelerator.unwrap_model(model), path / "model.safetensors")
    mine = path / f"stream-rank{accelerator.process_index}.json"
    if not mine.is_file():
        raise ValueError(f"{path} was written by a run with fewer processes (no {mine.name}); "
                         f"resume with the same number of processes")
    state = json.loads(mine.read_text())
    return state["step"], {int(worker): s for worker, s in state["stream"].items()}  # JSON made the keys str


def _check_every_weight_was_stored(model, weights: Path) -> None:
    """strict=False above must only forgive empty tensors and tied copies (e.g. lm_head = embed_tokens)."""
    with safe_open(str(weights), framework="pt") as f:
        stored = set(f.keys())
    state = model.state_dict()
    stored_ptrs = {state[k].data_ptr() for k in stored if k in state}
    missing = [k for k, v in state.items() if k not in stored and v.numel() > 0 and v.data_ptr() not in stored_ptrs]
    if missing:
        raise ValueError(f"{weights} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                         f"it was written for another model")
