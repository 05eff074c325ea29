"""pytest tests/test_extract_bad_input.py -q

Every bad-input case of DESIGN section 4 ends as a rejects entry with its reason; counts reconcile.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from modkd.extract.run import ExtractConfig, run
from modkd.store import Cache


def conv(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture()
def bad_data(tmp_path, world) -> tuple[Path, Path, dict[str, str]]:
    """A copy of the toy world's images plus a data file mixing good records and one of each bad case."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    good_image = "images/000000.png"
    (root / good_image).write_bytes((world / good_image).read_bytes())
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (tmp_path / "outside.png").write_bytes((world / good_image).read_bytes())
    os.symlink(tmp_path / "outside.png", root / "images" / "link.png")
    long_answer = " ".join(["a red circle at the top left."] * 40)
    lines = [
        json.dumps({"id": "good-image", "image": good_image, "conversations": conv("<image>\ndescribe the image.", "a red circle.")}),
        json.dumps({"id": "good-text", "conversations": conv("what is two plus one?", "three")}),
        '{"id": "broken", "conversations": [',  # malformed JSON, line 3
        json.dumps([1, 2, 3]),  # not an object
        json.dumps({"id": "no-conv", "image": good_image}),
        json.dumps({"id": "role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "yes"}]}),
        json.dumps({"id": "empty", "conversations": conv("what is two plus one?", "   ")}),
        json.dumps({"id": "missing-img", "image": "images/nope.png", "conversations": conv("<image>\nhi", "yes")}),
        json.dumps({"id": "corrupt-img", "image": "images/corrupt.png", "conversations": conv("<image>\nhi", "yes")}),
        json.dumps({"id": "escape", "image": "../outside.png", "conversations": conv("<image>\nhi", "yes")}),
        json.dumps({"id": "escape-link", "image": "images/link.png", "conversations": conv("<image>\nhi", "yes")}),
        json.dumps({"id": "too-long", "conversations": conv("describe the image.", long_answer)}),
        json.dumps({"id": "two-placeholders", "image": good_image, "conversations": conv("<image>\n<image>\nhi", "yes")}),
        json.dumps({"id": "no-placeholder", "image": good_image, "conversations": conv("describe the image.", "yes")}),
        json.dumps({"id": "placeholder-no-image", "conversations": conv("<image>\ndescribe the image.", "yes")}),
        json.dumps({"id": "gpt-placeholder", "image": good_image, "conversations": conv("<image>\nhi", "<image> yes")}),
        json.dumps({"id": "two-images", "image": [good_image, good_image], "conversations": conv("<image>\nhi", "yes")}),
        json.dumps({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hello"}, *conv("hi", "yes")]}),
        json.dumps({"id": "good-text", "conversations": conv("what is two plus two?", "four")}),  # a second good-text
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    expected = {
        "line:3": "malformed", "line:4": "malformed", "no-conv": "missing_field", "role": "unknown_role",
        "empty": "empty_response", "missing-img": "image_missing", "corrupt-img": "image_corrupt",
        "escape": "image_outside_root", "escape-link": "image_outside_root", "too-long": "too_long",
        "two-placeholders": "image_placeholders", "no-placeholder": "image_placeholders",
        "placeholder-no-image": "image_placeholders", "gpt-placeholder": "image_placeholders",
        "two-images": "image_field", "gpt-first": "first_turn", "good-text": "duplicate_id",
    }  # fmt: skip
    return data, root, expected


@pytest.mark.parametrize("shards", [1, 3])
def test_every_bad_record_is_rejected_with_its_reason(tmp_path, teacher_dir, bad_data, shards):
    data, root, expected = bad_data
    out = tmp_path / f"cache{shards}"
    summary = run(ExtractConfig(str(teacher_dir), data, out, root, shards=shards, max_length=120))
    cache = Cache.open(out)
    assert sorted(r.sample_id for r in cache.records()) == ["good-image", "good-text"]
    rejects = {r["sample_id"]: r for r in cache.rejects()}
    assert {sid: r["kind"] for sid, r in rejects.items()} == expected
    assert rejects["good-text"]["line"] == 19 and "the record on line 2" in rejects["good-text"]["reason"]
    assert "line 3" in rejects["line:3"]["reason"] and rejects["line:3"]["line"] == 3
    assert "robot" in rejects["role"]["reason"]
    assert "outside --image-root" in rejects["escape"]["reason"]
    assert "found 2" in rejects["two-placeholders"]["reason"]
    assert "exceed --max-length 120" in rejects["too-long"]["reason"]
    totals = summary["manifest"]["totals"]
    assert totals["records_in"] == 19 == totals["records_written"] + totals["records_rejected"]
    assert totals["records_rejected"] == len(expected)
    assert sum(summary["manifest"]["rejects"].values()) == len(expected)


def test_text_only_data_needs_no_image_root(tmp_path, teacher_dir):
    data = tmp_path / "text.json"  # a JSON array, LLaVA's own file format
    data.write_text(json.dumps([{"id": f"t{i}", "conversations": conv("what is two plus one?", "three")} for i in range(3)]))
    run(ExtractConfig(str(teacher_dir), data, tmp_path / "c", image_root=None))
    assert Cache.open(tmp_path / "c").num_records == 3


def test_a_broken_json_array_is_a_clear_error(tmp_path, teacher_dir):
    data = tmp_path / "broken.json"
    data.write_text('[{"id": 1}, ')
    with pytest.raises(ValueError, match="not valid JSON"):
        run(ExtractConfig(str(teacher_dir), data, tmp_path / "c"))


ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
               "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_a_template_error_or_an_unexpected_exception_rejects_one_record(tmp_path, text_teacher_dir, monkeypatch):
    """A template that enforces role alternation refuses one record (kind template); an unexpected exception
    on another is recorded as internal_error with its message; the run goes on and caches the rest, and the
    CLI exits non-zero after completing the run."""
    from typer.testing import CliRunner

    from modkd.extract import encode
    from modkd.pipelines.cli_extract import app

    teacher = tmp_path / "teacher"
    shutil.copytree(text_teacher_dir, teacher)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    (teacher / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": ALTERNATING}))
    (teacher / "chat_template.jinja").unlink(missing_ok=True)
    records = [{"id": f"ok{i}", "conversations": conv("what is two plus one?", "three")} for i in range(3)]
    records.insert(1, {"id": "twice", "conversations": [*conv("hi", "yes"), {"from": "gpt", "value": "again"}]})
    records.append({"id": "boom", "conversations": conv("explode", "now")})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    real = encode.Encoder.encode

    def flaky(self, raw):
        if raw.sample_id == "boom":
            raise KeyError("a surprise")
        return real(self, raw)

    monkeypatch.setattr(encode.Encoder, "encode", flaky)
    result = CliRunner().invoke(app, ["--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "c"),
                                      "--backend", "hf"])
    assert result.exit_code == 1 and "1 record(s)" in result.output
    cache = Cache.open(tmp_path / "c")
    assert sorted(r.sample_id for r in cache.records()) == ["ok0", "ok1", "ok2"]
    rejects = {r["sample_id"]: r for r in cache.rejects()}
    assert rejects["twice"]["kind"] == "template" and "roles must alternate" in rejects["twice"]["reason"]
    assert rejects["boom"]["kind"] == "internal_error" and "KeyError" in rejects["boom"]["reason"]
    assert cache.manifest["totals"]["records_in"] == 5
