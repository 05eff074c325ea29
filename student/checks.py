"""pytest tests/test_student_train.py -q -k refuses   # what the trainer checks before it trains

Before a step is taken: the cache's tokenizer fingerprint must equal the student's (the cached ids and
top-k ids are meaningless otherwise), the student's vision tower must yield as many tokens per image
as the cache's input_ids hold, and the cache must hold the position kinds the run distils.
"""

from __future__ import annotations

import torch
from PIL import Image

from modkd.store import POSITION_MODES, Cache
from modkd.store.fingerprint import tokenizer_sha256


def check_student_matches_cache(cache: Cache, model, processor, student: str, kd_positions: str | None) -> None:
    """kd_positions=None: the run reads the cache's preference records (stage pd), checked against their manifest."""
    manifest = cache.manifest if kd_positions is not None else cache.preference_manifest
    if manifest is None:
        part = "distillation" if kd_positions is not None else "preference"
        raise ValueError(f"the cache {cache.path} holds no {part} records; run mod-extract on a "
                         f"{'LLaVA-format' if kd_positions is not None else 'preference (chosen/rejected)'} "
                         f"data file with --out {cache.path}")
    ours = tokenizer_sha256(processor.tokenizer, processor.chat_template)
    theirs = manifest["tokenizer_sha256"]
    if ours != theirs:
        raise ValueError(
            f"tokenizer mismatch: the cache {cache.path} was extracted with teacher "
            f"{manifest['teacher']['name']!r} whose tokenizer (with chat template) has sha256 {theirs[:16]}..., "
            f"but student {student} has {ours[:16]}...; student and teacher must share one tokenizer")
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < len(processor.tokenizer):
        raise ValueError(f"student {student}'s lm_head has {rows} rows for a {len(processor.tokenizer)}-token tokenizer; "
                         f"resize its token embeddings first")
    cached = manifest.get("image_tokens_per_image")
    if cached is not None:
        tokens = vision_tokens_per_image(model, processor)
        if tokens != cached:
            raise ValueError(f"image tokens differ: the cache's records hold {cached} tokens per image but student "
                             f"{student}'s vision tower yields {tokens}; the student cannot read these records")
    if kd_positions is None:
        return
    have = set(POSITION_MODES[manifest["settings"]["positions"]])
    want = set(POSITION_MODES[kd_positions])
    if not want <= have:
        raise ValueError(f"kd_positions={kd_positions!r} needs {sorted(want)} positions, but the cache was "
                         f"extracted with --positions {manifest['settings']['positions']} ({sorted(have)})")


@torch.no_grad()
def vision_tokens_per_image(model, processor) -> int:
    """Tokens the student's vision tower feeds the LLM for one square image of the processor's size (CLS dropped by
    the "default" strategy; anyres models: base view + unpadded tiles + one image_newline per row, as the
    teacher's processor counted them for the manifest)."""
    size = processor.image_processor.crop_size or processor.image_processor.size
    side = size.get("height") or size.get("shortest_edge")
    inputs = processor.image_processor(images=[Image.new("RGB", (side, side))], return_tensors="pt")
    pixels = inputs["pixel_values"]  # (1, 3, H, W); anyres: (1, tiles + 1, 3, H, W)
    tower = model.model.vision_tower
    if "image_sizes" in inputs:  # LLaVA-OneVision: the tiles are packed with the image sizes
        features = model.model.get_image_features(pixel_values=pixels.to(tower.dtype).to(tower.device),
                                                  image_sizes=inputs["image_sizes"].to(tower.device)).pooler_output
        return features[0].shape[0]  # one (tokens, D) per image
    out = tower(pixels.to(tower.dtype).to(tower.device)).last_hidden_state  # (1, tokens, D)
    return out.shape[1] - (model.config.vision_feature_select_strategy == "default")


def check_llava_kd_inputs(cache: Cache, vis: bool, relation: str | None, stage: str) -> None:
    """LLaVA-KD's terms need what only some extractions store: L_vis the image positions (`--positions all`),
    L_rel the teacher's relation matrices (`--relation logits|embeddings`). Refused here, before the first step,
    naming the flag, rather than training on nothing."""
    settings = cache.manifest["settings"]
    if vis and "image" not in POSITION_MODES[settings["positions"]]:
        raise ValueError(f"stage {stage} distils the image positions (vis_weight > 0: LLaVA-KD's L_vis) but the cache "
                         f"{cache.path} was extracted with --positions {settings['positions']}, which stores none; "
                         f"re-extract with `mod-extract ... --positions all`, or set vis_weight=0")
    have = settings.get("relation", "none")
    if relation is not None and have != relation:
        held = "holds no relation matrices" if have == "none" else f"holds the {have!r} form"
        raise ValueError(f"stage {stage} needs the teacher's relation matrices (rel_weight > 0: LLaVA-KD's RDist, "
                         f"relation={relation}) but the cache {cache.path} {held} (manifest settings.relation = "
                         f"{have}); re-extract with `mod-extract ... --relation {relation} --backend hf`, "
                         + (f"or train with relation={have}, " if have != "none" else "") + "or set rel_weight=0")
