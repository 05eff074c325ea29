"""python benchmarks/common.py    # prints the machine line and the text directory

Shared bits of the benchmarks: machine line, passages of real English text, LLaVA records, results
JSON. Not a framework: small functions the benchmark scripts import (they run as
`python benchmarks/<name>.py`, so this directory is on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEXT_DIR = REPO.parent / "shared" / "papers"  # CI layout: the papers sit in ../shared/papers beside the repo
TEXT_FILES = ("llava-mod.txt", "llava-kd.txt")
RESULTS = REPO / "benchmarks" / "results"
PROMPT = "Continue the text."


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
    }


def machine_line(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    return (f"machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
            f"torch {m['torch']}, device {m['device']}{gpu}")


def passages(tokenizer, n: int, tokens: int | list[int], text_dir: Path = TEXT_DIR) -> list[str]:
    """`n` consecutive windows of `tokens` teacher tokens (or tokens[i] for window i) of the papers' text,
    decoded back to strings.

    Each paper is taken from its abstract on (the title block is a run of author names, not prose);
    windows wrap around if the text runs out (the two papers are ~38k SmolLM2 tokens)."""
    paths = [Path(text_dir) / f for f in TEXT_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"text files not found: {missing}; pass --text-dir")
    texts = [p.read_text(encoding="utf-8") for p in paths]
    texts = [t[t.lower().find("abstract"):] if "abstract" in t.lower() else t for t in texts]
    text = "\n\n".join(" ".join(t.split()) for t in texts)  # whitespace collapsed
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # (N_text,)
    lengths = [tokens] * n if isinstance(tokens, int) else list(tokens)
    out, offset = [], 0
    for length in lengths:
        start = offset % max(1, len(ids) - length)
        out.append(tokenizer.decode(ids[start : start + length]).strip())
        offset += length
    return out


def llava_records(texts: list[str], prefix: str = "paper") -> list[dict]:
    """LLaVA-format text-only records whose assistant response is the passage (what gets distilled)."""
    return [{"id": f"{prefix}-{i:05d}", "conversations": [{"from": "human", "value": PROMPT},
                                                          {"from": "gpt", "value": t}]}
            for i, t in enumerate(texts)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def save_results(name: str, results: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (resident at the peak) of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def resident() -> int:
    """Bytes in use now: CUDA allocated memory on a GPU, else the process's resident set."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return status_bytes("VmRSS")


def reset_peak() -> bool:
    """Restart the peak counter (CUDA's, or the kernel's VmHWM via clear_refs); False if it cannot."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak() -> int:
    """Peak bytes since reset_peak()."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return status_bytes("VmHWM")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    print(machine_line(machine()))
    print(f"text: {', '.join(f'{TEXT_DIR / f} ({(TEXT_DIR / f).stat().st_size} bytes)' for f in TEXT_FILES)}")
