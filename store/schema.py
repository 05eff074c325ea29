"""`python -c "from modkd.store.schema import DISTILL_SCHEMA; print(DISTILL_SCHEMA)"`: the cache's Parquet schemas.

One row per distillation record. Position t stores the teacher's distribution over the token at t + 1
(the shift lives in the data: `positions` are the predicting positions, never the predicted ones).
"""

import pyarrow as pa

SCHEMA_VERSION = 3  # 3: relation column (LLaVA-KD RDist); 2: distributions bit-packed and quantised; 1: float32 top-k

# Kind of a stored position t: image if input_ids[t] is an image token, else response if
# input_ids[t + 1] is an assistant-response token, else instruction.
POSITION_KINDS = {"response": 0, "instruction": 1, "image": 2}

# Which kinds a stage distils: LLaVA-MoD Table 7 (response vs response+instruction) and
# LLaVA-KD's visual-position KL ("all") all read one cache.
POSITION_MODES = {
    "response": ("response",),
    "response+instruction": ("response", "instruction"),
    "all": ("response", "instruction", "image"),
}

# The distribution columns hold either encoding of store/encoding.py (manifest settings.encoding):
#   topk:    ids = (P, K) top-k ids in rank order, values = the K - 1 log-prob offsets below the top-1 per
#            position, top_logprobs = the top-1's log-prob, tail_mass = 1 - sum(top-K)
#   sampled: ids = each position's unique drawn ids, ascending, values = their counts - 1; top_logprobs and
#            tail_mass empty
DISTILL_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # (T,) tokens the teacher saw, image tokens expanded
        pa.field("positions", pa.list_(pa.int32()), nullable=False),  # (P,) stored positions t
        pa.field("position_kinds", pa.list_(pa.int8()), nullable=False),  # (P,) values of POSITION_KINDS
        pa.field("num_ids", pa.int32(), nullable=False),  # ids stored over all positions
        pa.field("ids", pa.binary(), nullable=False),  # num_ids ids, bit-packed at ceil(log2 V) bits
        pa.field("values", pa.binary(), nullable=False),  # topk: log-prob offset codes; sampled: counts - 1; bit-packed
        pa.field("top_logprobs", pa.list_(pa.float32()), nullable=False),  # topk: (P,) top-1 log-prob; sampled: empty
        pa.field("tail_mass", pa.list_(pa.float32()), nullable=False),  # topk: (P,) 1 - sum(top-K); sampled: empty
        pa.field("target_logprobs", pa.list_(pa.float32()), nullable=False),  # (P,) log-prob of input_ids[t + 1]
        pa.field("image_path", pa.string(), nullable=True),  # posix path relative to the image root
        pa.field("image_sha256", pa.string(), nullable=True),  # hex digest of the image file
        pa.field("num_image_tokens", pa.int32(), nullable=False),  # 0 for text-only records
        # LLaVA-KD RDist (store/relation.py): the teacher's (N_p, N_p) relation matrix over the record's image-token
        # positions, fp16 upper triangle at unit Frobenius norm; empty when absent (manifest settings.relation)
        pa.field("relation", pa.binary(), nullable=False),
    ]
)

# One row per preference pair (DESIGN section 4). The teacher saw prompt_ids + X_ids for X in chosen,
# rejected and mismatched; per-token log-probs are those of X's tokens (position len(prompt) - 1 + i
# predicts X_ids[i]), their sums are accumulated in float64. `mismatched` is another record's chosen
# response after this record's prompt (KTO's reference-point pair), fixed at extraction.
PREFERENCE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),  # (Tp,) image tokens expanded
        pa.field("chosen_ids", pa.list_(pa.int32()), nullable=False),  # (Tc,) response tokens + end of turn
        pa.field("rejected_ids", pa.list_(pa.int32()), nullable=False),  # (Tr,)
        pa.field("mismatched_ids", pa.list_(pa.int32()), nullable=False),  # (Tm,)
        pa.field("mismatched_from", pa.string(), nullable=False),  # sample_id whose chosen response it is
        pa.field("chosen_logprobs", pa.list_(pa.float32()), nullable=False),  # (Tc,) teacher, per token
        pa.field("rejected_logprobs", pa.list_(pa.float32()), nullable=False),  # (Tr,)
        pa.field("mismatched_logprobs", pa.list_(pa.float32()), nullable=False),  # (Tm,)
        pa.field("chosen_logprob", pa.float64(), nullable=False),  # sum of chosen_logprobs, in float64
        pa.field("rejected_logprob", pa.float64(), nullable=False),
        pa.field("mismatched_logprob", pa.float64(), nullable=False),
        pa.field("image_path", pa.string(), nullable=True),
        pa.field("image_sha256", pa.string(), nullable=True),
        pa.field("num_image_tokens", pa.int32(), nullable=False),
    ]
)
