"""`python -c "from modkd.store.schema import DISTILL_SCHEMA; print(DISTILL_SCHEMA)"`: the cache's Parquet schema.

One row per distillation record. Position t stores the teacher's distribution over the token at t + 1
(the shift lives in the data: `positions` are the predicting positions, never the predicted ones).
"""

import pyarrow as pa

SCHEMA_VERSION = 1

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

DISTILL_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # (T,) tokens the teacher saw, image tokens expanded
        pa.field("positions", pa.list_(pa.int32()), nullable=False),  # (P,) stored positions t
        pa.field("position_kinds", pa.list_(pa.int8()), nullable=False),  # (P,) values of POSITION_KINDS
        pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),  # (P * k,) row-major (P, k)
        pa.field("topk_logprobs", pa.list_(pa.float32()), nullable=False),  # (P * k,) normalised over the full vocab
        pa.field("target_logprobs", pa.list_(pa.float32()), nullable=False),  # (P,) log-prob of input_ids[t + 1]
        pa.field("image_path", pa.string(), nullable=True),  # posix path relative to the image root
        pa.field("image_sha256", pa.string(), nullable=True),  # hex digest of the image file
        pa.field("num_image_tokens", pa.int32(), nullable=False),  # 0 for text-only records
    ]
)
