"""pytest tests/test_vllm_extract.py -q     # needs the vLLM environment: bash pipelines/vllm-cpu-env.sh

`mod-extract --backend vllm` (vLLM's CPU build, in its own environment with transformers 5.19) against
`--backend hf` (this environment's transformers) on the same inputs, fp32: a text-only Qwen2 teacher and
a tiny LLaVA teacher with images (head_dim 32, weights in the Hub's layout), every position kind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import vllm_env
from modkd.store.encoding import LOGPROB_STEP
from modkd.extract.run import ExtractConfig, run
from modkd.pipelines.toyworld.models import STUDENT_LLM, build_model
from modkd.store import POSITION_KINDS, Cache

RESPONSE, INSTRUCTION, IMAGE = (POSITION_KINDS[k] for k in ("response", "instruction", "image"))
MOD_STUDENT = str(Path(sys.executable).with_name("mod-student"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

TOP_K = 8
ATOL = 1e-4
# stored top-k log-probs below the top-1 are decoded to within LOGPROB_STEP / 2 (store/encoding.py): two backends'
# values ATOL apart may round to neighbouring steps; the top-1, tail mass and target log-probs are kept in float32
DECODED = LOGPROB_STEP + ATOL
TIE = DECODED  # decoded log-probs this close are a tie: either backend may put either id at the top-k boundary


def vllm_extract(python: Path, tmp: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """`mod-extract --backend vllm ...` in the vLLM environment; fails the test with its output on error."""
    cmd = [str(python.parent / "mod-extract"), "--backend", "vllm", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env(tmp), timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def assert_same_topk(hf_ids: np.ndarray, hf_lps: np.ndarray, v_ids: np.ndarray, v_lps: np.ndarray, where: str) -> None:
    """Top-k of one position: same values in rank order; same id set except ids tied at the boundary."""
    np.testing.assert_allclose(v_lps[0], hf_lps[0], atol=ATOL, rtol=0, err_msg=where)  # float32 in the cache
    np.testing.assert_allclose(v_lps, hf_lps, atol=DECODED, rtol=0, err_msg=where)
    lp = {**dict(zip(v_ids.tolist(), v_lps.tolist())), **dict(zip(hf_ids.tolist(), hf_lps.tolist()))}  # hf's first
    differ = set(hf_ids.tolist()) ^ set(v_ids.tolist())
    boundary = hf_lps[-1]
    assert all(abs(lp[t] - boundary) < TIE for t in differ), f"{where}: top-k ids differ beyond a tie: {differ}"
    for j in np.flatnonzero(hf_ids != v_ids):  # another id at rank j: hf's log-prob of it ties with hf's rank j
        assert abs(lp[int(v_ids[j])] - hf_lps[j]) < TIE, f"{where}: rank {j} holds {v_ids[j]} vs {hf_ids[j]}"


def assert_caches_match(hf: Cache, vl: Cache) -> None:
    """The same records, positions and kinds; log-probs within ATOL; the same rejects with the same reasons."""
    a, b = list(hf.records()), list(vl.records())
    assert [r.sample_id for r in a] == [r.sample_id for r in b] and a
    for x, y in zip(a, b):
        for field in ("input_ids", "positions", "position_kinds"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=f"{x.sample_id}.{field}")
        assert x.image == y.image and x.num_image_tokens == y.num_image_tokens
        np.testing.assert_allclose(y.target_logprobs, x.target_logprobs, atol=ATOL, rtol=0, err_msg=x.sample_id)
        np.testing.assert_allclose(y.tail_mass, x.tail_mass, atol=ATOL, rtol=0, err_msg=x.sample_id)  # whole top-k mass
        for p in range(len(x.positions)):
            assert_same_topk(x.topk_ids[p], x.topk_logprobs[p], y.topk_ids[p], y.topk_logprobs[p],
                             f"{x.sample_id} position {x.positions[p]}")
    strip = lambda rejects: [{k: r[k] for k in ("sample_id", "kind", "reason")} for r in rejects]  # noqa: E731
    assert strip(hf.rejects()) == strip(vl.rejects())
    for key in ("teacher", "tokenizer_sha256", "image_tokens_per_image", "data"):
        assert hf.manifest[key] == vl.manifest[key], key
    # image_processor_sha256 names the pixel backend: the vLLM environment has torchvision (CLIPImageProcessor),
    # the main one transformers' PIL fallback (CLIPImageProcessorPil), so caches from the two differ there by design
    # (a worker in the other environment cannot join an extraction); on the toy's images the two backends' pixels
    # agree closely enough for the log-probs compared above to match within ATOL.
    no_bytes = lambda totals: {k: v for k, v in totals.items() if k != "bytes"}  # noqa: E731 (float bits compress differently)
    assert no_bytes(hf.manifest["totals"]) == no_bytes(vl.manifest["totals"])
    assert hf.manifest["settings"]["backend"] == "hf"
    assert vl.manifest["settings"]["backend"] == "vllm"
    assert vl.manifest["settings"]["vllm"] == {"version": "0.32.0", "logprobs_mode": "raw_logprobs"}


def assert_preference_match(hf: Cache, vl: Cache) -> None:
    a, b = list(hf.preference_records()), list(vl.preference_records())
    assert [r.sample_id for r in a] == [r.sample_id for r in b] and a
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.prompt_ids, y.prompt_ids)
        for name in ("chosen", "rejected", "mismatched"):
            np.testing.assert_array_equal(getattr(x, f"{name}_ids"), getattr(y, f"{name}_ids"))
            np.testing.assert_allclose(getattr(y, f"{name}_logprobs"), getattr(x, f"{name}_logprobs"), atol=ATOL, rtol=0)
            assert abs(getattr(y, f"{name}_logprob") - getattr(x, f"{name}_logprob")) < ATOL * len(getattr(x, f"{name}_ids"))
        assert x.mismatched_from == y.mismatched_from and x.image == y.image


@pytest.fixture(scope="module")
def text_data(mixed_data, tmp_path_factory) -> Path:
    """The mixed records as text-only conversations (image and placeholder removed), plus a broken line."""
    records = [json.loads(line) for line in mixed_data.read_text().splitlines()]
    for r in records:
        r.pop("image", None)
        for turn in r["conversations"]:
            turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    lines = [json.dumps(r) for r in records]
    lines.insert(5, '{"id": "broken", "conversations": [')  # malformed: both backends reject it, the same way
    out = tmp_path_factory.mktemp("text") / "text.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_text_teacher_vllm_equals_hf(vllm_python, tmp_path, text_teacher_dir, text_data, world):
    hf = tmp_path / "hf"
    run(ExtractConfig(str(text_teacher_dir), text_data, hf, backend="hf", positions="all", top_k=TOP_K, shards=2))
    vl = tmp_path / "vllm"
    vllm_extract(vllm_python, tmp_path, vl, "--teacher", str(text_teacher_dir), "--data", str(text_data),
                 "--positions", "all", "--top-k", str(TOP_K), "--shards", "2")
    assert_caches_match(Cache.open(hf), Cache.open(vl))
    assert {r["kind"] for r in Cache.open(vl).rejects()} == {"malformed"}
    with pytest.raises(ValueError, match=r"different settings \(settings differ\)"):  # the backend is a setting
        run(ExtractConfig(str(text_teacher_dir), text_data, vl, backend="hf", positions="all", top_k=TOP_K, shards=2))


@pytest.fixture(scope="module")
def llava_caches(vllm_python, tmp_path_factory, teacher_dir, mixed_data, world) -> tuple[Path, Path]:
    """(hf cache, vllm cache) of the LLaVA teacher over the mixed records, every position, images included."""
    tmp = tmp_path_factory.mktemp("llava")
    run(ExtractConfig(str(teacher_dir), mixed_data, tmp / "hf", world, backend="hf", positions="all", top_k=TOP_K))
    vllm_extract(vllm_python, tmp, tmp / "vllm", "--teacher", str(teacher_dir), "--data", str(mixed_data),
                 "--image-root", str(world), "--positions", "all", "--top-k", str(TOP_K))
    return tmp / "hf", tmp / "vllm"


def test_llava_teacher_with_images_vllm_equals_hf(llava_caches):
    """Images go to vLLM as one placeholder + the image; its expansion equals the teacher processor's."""
    hf_cache, vl_cache = (Cache.open(p) for p in llava_caches)
    assert_caches_match(hf_cache, vl_cache)
    images = [r for r in vl_cache.records() if r.image is not None]
    assert images and all(r.num_image_tokens == 9 for r in images)
    assert {k for r in images for k in r.position_kinds.tolist()} == {RESPONSE, INSTRUCTION, IMAGE}


def test_student_trains_from_a_vllm_cache_unchanged(llava_caches, tokenizer, tmp_path):
    """`mod-student train --stage d2d` reads the vLLM-made cache as any other; same first-step loss as hf's."""
    student = build_model(tmp_path / "student", tokenizer, STUDENT_LLM, seed=1)
    losses = {}
    for name, cache in zip(("hf", "vllm"), llava_caches):
        out = tmp_path / f"run-{name}"
        res = subprocess.run([MOD_STUDENT, "train", "--stage", "d2d", "--cache", str(cache), "--student", str(student),
                              "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--grad-accum", "1",
                              "--set", "log_every=1"],
                             capture_output=True, text=True, timeout=300, env=ENV)
        assert res.returncode == 0, res.stderr[-3000:]
        assert (out / "final" / "model.safetensors").is_file()
        losses[name] = [json.loads(line)["loss/kd"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses["vllm"]) == 2
    np.testing.assert_allclose(losses["vllm"], losses["hf"], rtol=1e-4)  # same records, log-probs within 1e-4


def test_preference_scores_vllm_equal_hf(vllm_python, tmp_path, teacher_dir, world):
    pref = world / "pref.jsonl"
    run(ExtractConfig(str(teacher_dir), pref, tmp_path / "hf", world, backend="hf"))
    vllm_extract(vllm_python, tmp_path, tmp_path / "vllm", "--teacher", str(teacher_dir), "--data", str(pref),
                 "--image-root", str(world))
    assert_preference_match(Cache.open(tmp_path / "hf"), Cache.open(tmp_path / "vllm"))


def test_sigkill_then_rerun_gives_the_uninterrupted_cache(vllm_python, tmp_path, text_teacher_dir, text_data):
    """The whole vLLM process group killed after some shards (as a lost node), then the same command again."""
    lines = text_data.read_text().splitlines()
    data = tmp_path / "big.jsonl"  # ~300 records in 12 shards: long enough to kill midway
    data.write_text("".join(line.replace('"id": "', f'"id": "{i}-') + "\n" for i in range(10) for line in lines))
    out, shards = tmp_path / "killed", 12
    args = ["--teacher", str(text_teacher_dir), "--data", str(data), "--shards", str(shards), "--top-k", "4"]
    cmd = [str(vllm_python.parent / "mod-extract"), "--backend", "vllm", "--out", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=vllm_env(tmp_path),
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "shards").glob("*.done.json"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the front end, vLLM's engine core and its worker, at once
    proc.wait()
    done_at_kill = len(list((out / "shards").glob("*.done.json")))
    assert 0 < done_at_kill < shards, f"the kill landed after {done_at_kill} of {shards} shards"
    assert not (out / "manifest.json").exists()

    rerun = vllm_extract(vllm_python, tmp_path, out, *args)
    assert f'"shards_skipped": {done_at_kill}' in rerun.stdout
    assert not [p.name for p in (out / "shards").iterdir() if p.name.startswith(".")]  # no temporaries left
    straight = tmp_path / "straight"
    run(ExtractConfig(str(text_teacher_dir), data, straight, backend="hf", shards=shards, top_k=4))
    assert_caches_match(Cache.open(straight), Cache.open(out))
    assert Cache.open(out).verify() == []
