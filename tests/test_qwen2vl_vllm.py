"""pytest tests/test_qwen2vl_vllm.py -q     # needs the vLLM environment: bash pipelines/vllm-cpu-env.sh

`mod-extract --backend vllm` on the tiny Qwen2-VL and Qwen2.5-VL teachers (tests/qwen2vl_model.py), against
`--backend hf` in the same vLLM environment (transformers 5.19 with torchvision, so both run the same
torchvision image processor): the same ids (vLLM's own placeholder expansion equals the processor's, or
the record would be rejected as `vllm_prompt`), positions and kinds, log-probs within 1e-4 at every
position kind, images of four sizes, text-only records, the same video reject.

Across environments the images that need no resampling (sides already multiples of 28 px) also match the
main environment's hf cache; resampled ones do not: there transformers has no torchvision and resizes with
its PIL backend (Qwen2VLImageProcessorPil), whose bicubic pixels differ (~5e-3 in log-probs, measured).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import vllm_env
from modkd.store.encoding import LOGPROB_STEP
from modkd.extract.run import ExtractConfig, run
from modkd.store import Cache
from qwen2vl_model import FAMILIES, build
from test_qwen2vl_extract import IMAGES, RECORDS, data, texts  # noqa: F401 (data: the fixture)
from test_vllm_extract import ATOL, TOP_K, assert_caches_match, vllm_extract


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_qwen2vl_vllm_equals_hf(vllm_python, tmp_path, data, family):
    path, root = data
    teacher = build(tmp_path / family, texts(), family)
    args = ["--teacher", str(teacher), "--data", str(path), "--image-root", str(root), "--positions", "all",
            "--top-k", str(TOP_K)]
    vllm_extract(vllm_python, tmp_path, tmp_path / "vllm", *args)
    hf_cmd = [str(vllm_python.parent / "mod-extract"), "--backend", "hf", "--out", str(tmp_path / "hf"), *args]
    proc = subprocess.run(hf_cmd, capture_output=True, text=True, env=vllm_env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    hf, vl = Cache.open(tmp_path / "hf"), Cache.open(tmp_path / "vllm")
    assert_caches_match(hf, vl)
    assert {r.num_image_tokens for r in vl.records()} == {0, *(n for _, n in IMAGES.values())}
    assert [r["kind"] for r in vl.rejects()] == ["video"]

    run(ExtractConfig(str(teacher), path, tmp_path / "main", root, positions="all", top_k=TOP_K))  # this environment
    main = {r.sample_id: r for r in Cache.open(tmp_path / "main").records()}
    exact = {r["id"] for r in RECORDS if "image" not in r or all(s % 28 == 0 for s in IMAGES[r["image"]][0])}
    assert exact >= {"square", "wide", "text"}
    for rec in vl.records():
        if rec.sample_id in exact:
            m = main[rec.sample_id]
            np.testing.assert_array_equal(rec.input_ids, m.input_ids)
            np.testing.assert_allclose(rec.topk_logprobs, m.topk_logprobs, atol=LOGPROB_STEP + ATOL, rtol=0,
                                       err_msg=rec.sample_id)  # decoded: neighbouring steps of store/encoding.py
            np.testing.assert_allclose(rec.tail_mass, m.tail_mass, atol=ATOL, rtol=0, err_msg=rec.sample_id)
            np.testing.assert_allclose(rec.target_logprobs, m.target_logprobs, atol=ATOL, rtol=0, err_msg=rec.sample_id)
