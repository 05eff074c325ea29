"""pytest tests/test_vllm_rows.py -q

How the vLLM backend reads vLLM's flat prompt log-probs, without vLLM: a stand-in engine returns rows laid
out as vLLM 0.32 lays them out (vllm/logprobs.py: per prompt token i >= 1, the actual token i with its
rank first, then the top-K by rank; token 0 has an empty row), so the mapping onto the cache's positions
and the refusal of a prompt vLLM expanded differently are checked here in every environment.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from modkd.extract.encode import Encoded, Rejected
from modkd.extract.vllm_backend import VLLMBackend, _collapse

IMG = 7


class FakeLLM:
    """Scores every prompt with a fixed (T, V) log-prob table, as vLLM's flat prompt log-probs."""

    def __init__(self, logp: np.ndarray, expand: int):
        self.logp, self.expand, self.prompts = logp, expand, []

    def generate(self, prompts, params, use_tqdm=False):
        self.prompts += prompts
        out = []
        for p in prompts:
            ids = [t for i in p["prompt_token_ids"] for t in ([i] * self.expand if i == IMG else [i])]
            starts, ends, tok, lps = [0], [0], [], []  # row 0: no log-probs
            for i in range(1, len(ids)):
                row = self.logp[i - 1]  # (V,) the distribution that predicts token i
                top = np.argsort(-row, kind="stable")[: params.prompt_logprobs]
                starts.append(len(tok))
                tok += [ids[i], *top.tolist()]
                lps += [float(row[ids[i]]), *row[top].tolist()]
                ends.append(len(tok))
            flat = SimpleNamespace(start_indices=starts, end_indices=ends, token_ids=tok, logprobs=lps)
            out.append(SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=flat))
        return out


def backend(llm: FakeLLM, k: int) -> VLLMBackend:
    b = object.__new__(VLLMBackend)  # no engine: only the reading of its output is under test
    b.llm, b.top_k, b.image_token_id, b.max_model_len, b.vocab = llm, k, IMG, 64, llm.logp.shape[1]
    b._params = {n: SimpleNamespace(prompt_logprobs=n) for n in (k, 0)}
    return b


def test_rows_map_to_positions_and_a_different_expansion_is_refused():
    rng = np.random.default_rng(0)
    V, k = 12, 3
    logp = np.log(rng.dirichlet(np.ones(V), size=16)).astype(np.float32)  # (T, V)
    ids = [1, 2, IMG, IMG, IMG, 3, 4, 5, 6]  # an image expanded to 3 placeholders by the teacher's processor
    e = Encoded("a", ids, np.zeros(len(ids), np.int8), {}, None, 3, pil=object())
    positions = np.array([0, 4, 5, 7], dtype=np.int32)  # each predicts ids[t + 1]
    llm = FakeLLM(logp, expand=3)
    [(top_ids, top_lps, target)] = backend(llm, k).run([e], [positions])
    assert llm.prompts[0]["prompt_token_ids"] == [1, 2, IMG, 3, 4, 5, 6]  # one placeholder goes to vLLM
    assert llm.prompts[0]["multi_modal_data"] == {"image": e.pil}
    want = np.argsort(-logp[positions], axis=1, kind="stable")[:, :k]  # (P, k)
    np.testing.assert_array_equal(top_ids, want)
    np.testing.assert_array_equal(top_lps, np.take_along_axis(logp[positions], want, 1))
    np.testing.assert_array_equal(target, logp[positions, np.array(ids)[positions + 1]])
    [tgt] = backend(llm, k).target_logprobs([e], [positions])
    np.testing.assert_array_equal(tgt, target)

    [refused] = backend(FakeLLM(logp, expand=4), k).run([e], [positions])  # vLLM expanded to 4: not written
    assert isinstance(refused, Rejected) and refused.kind == "vllm_prompt"


def test_collapse_keeps_one_placeholder_per_image_run():
    assert _collapse([IMG, IMG, 1, IMG, IMG, IMG, 2], IMG) == [IMG, 1, IMG, 2]
    assert _collapse([1, 2, 3], None) == [1, 2, 3]


def test_a_preference_pair_vllm_refuses_is_rejected_whole():
    """score_pairs through the vLLM backend: the pair whose image vLLM expands differently is rejected with
    the reason; the text-only pair beside it gets its per-token log-probs from the actual-token rows."""
    from modkd.extract.preference import EncodedPreference, score_pairs

    logp = np.log(np.random.default_rng(1).dirichlet(np.ones(12), size=16)).astype(np.float32)  # (T, V)
    responses = {"chosen": [4, 5], "rejected": [6], "mismatched": [8, 9, 10]}
    with_image = EncodedPreference("img", [1, IMG, IMG, IMG, 2], responses, "x", {}, None, 3, pil=object())
    text = EncodedPreference("txt", [1, 2, 3], responses, "img", {}, None, 0)
    refused, scored = score_pairs([with_image, text], backend(FakeLLM(logp, expand=4), 3))
    assert isinstance(refused, Rejected) and refused.kind == "vllm_prompt" and refused.reason.startswith("chosen: ")
    for name, ids in responses.items():  # response token i sits at prompt length + i, predicted by the row before
        rows = np.arange(len(ids)) + len(text.prompt_ids) - 1
        np.testing.assert_array_equal(getattr(scored, f"{name}_logprobs"), logp[rows, ids])


def test_an_id_beyond_the_tokenizer_stops_the_run():
    """A padded lm_head's rows are dropped inside vLLM (extract/vllm_backend.py); should a returned top-k id still be
    one (>= len(tokenizer)), the run stops rather than write it."""
    logp = np.log(np.full((16, 12), 1 / 12)).astype(np.float32)  # (T, rows)
    logp[:, 11] = np.log(0.5)  # the last row, a padding row for a tokenizer of 11, first at every position
    e = Encoded("a", [1, 2, 3, 4], np.zeros(4, np.int8), {}, None, 0)
    b = backend(FakeLLM(logp, expand=1), 3)
    b.vocab = 11
    with pytest.raises(RuntimeError, match=r"token id 11 >= the tokenizer's 11"):
        b.run([e], [np.array([0, 1, 2], dtype=np.int32)])
