"""Rows → ids + completion mask; truncation reported; the fingerprint that keys scores."""

import json
import logging

import pytest
from conftest import CHAT_TEMPLATE, make_tokenizer

from collm.data.rows import DataConfig, encode_file, length_order, read_rows
from collm.errors import CollmError


def char_tokenizer(template: str | None = CHAT_TEMPLATE):
    """The shared character tokenizer with a chosen chat template (None: no template)."""
    tok = make_tokenizer()
    tok.chat_template = template
    return tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_completion_masks_only_the_completion(tmp_path):
    tok = char_tokenizer(None)  # no chat template: raw concatenation
    data = encode_file(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab=", "completion": "3"}]), tok)
    (ex,) = data.examples
    assert tok.convert_ids_to_tokens(ex.input_ids) == ["a", "b", "=", "3", "</s>"]
    assert ex.completion_mask == [False, False, False, True, True]
    assert ex.num_targets == 2 and data.stats.targets == 2


def test_messages_use_the_chat_template_and_the_last_assistant_turn(tmp_path):
    tok = char_tokenizer()
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": "x"}, {"role": "assistant", "content": "yo"}]}]
    (ex,) = encode_file(write_jsonl(tmp_path / "d.jsonl", rows), tok).examples
    text = tok.convert_ids_to_tokens(ex.input_ids)
    completion = [t for t, m in zip(text, ex.completion_mask) if m]
    assert completion == ["y", "o", "</s>"]
    assert "".join(text[: -3]).endswith("<|user|>x</s><|assistant|>")


def test_prompt_completion_rows_use_the_chat_template_like_generate(tmp_path):
    tok = char_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi", "completion": "yo"}])
    (ex,) = encode_file(path, tok).examples
    assert "".join(tok.convert_ids_to_tokens(ex.input_ids)) == "<|user|>hi</s><|assistant|>yo</s>"
    (raw,) = encode_file(path, tok, DataConfig(chat=False)).examples
    assert "".join(tok.convert_ids_to_tokens(raw.input_ids)) == "hiyo</s>"


def test_truncation_is_counted_and_reported(tmp_path, caplog):
    tok = char_tokenizer()
    rows = [{"prompt": "abc", "completion": "defgh"}, {"prompt": "abcdefgh", "completion": "x"},
            {"prompt": "a", "completion": "b"}]
    with caplog.at_level(logging.WARNING):
        data = encode_file(write_jsonl(tmp_path / "d.jsonl", rows), tok, DataConfig(max_len=5, chat=False))
    assert (data.stats.rows, data.stats.truncated, data.stats.dropped) == (3, 2, 1)
    assert [len(e.input_ids) for e in data.examples] == [5, 3]
    assert "2 truncated, 1 dropped" in data.stats.describe()
    assert "exceed max_len=5" in caplog.text


def test_fingerprint_tracks_bytes_tokenizer_and_max_len(tmp_path):
    tok = char_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "c"}])
    first = encode_file(path, tok).fingerprint
    assert encode_file(path, char_tokenizer()).fingerprint == first
    assert encode_file(path, tok, DataConfig(max_len=64)).fingerprint != first
    assert encode_file(path, char_tokenizer(CHAT_TEMPLATE.replace("</s>", "</s>\\n"))).fingerprint != first
    write_jsonl(path, [{"prompt": "ab", "completion": "d"}])
    assert encode_file(path, tok).fingerprint != first


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"d.jsonl:1: not valid JSON"),
        ('{"prompt": "a"}', "needs string 'prompt' and 'completion'"),
        ('{"prompt": "a", "completion": ""}', "'completion' is empty"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "assistant"),
        ("[1]", "JSON object"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(CollmError, match=message):
        read_rows(path)


def test_missing_file_and_missing_template_are_errors(tmp_path):
    with pytest.raises(CollmError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "completion": "c"}])
    messages = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    with pytest.raises(CollmError, match="no chat template"):
        encode_file(write_jsonl(path, messages), char_tokenizer(None))
    with pytest.raises(CollmError, match="max_len"):
        DataConfig(max_len=1)


def test_length_order_is_longest_first_and_stable(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "abc", "completion": "d"},
            {"prompt": "a", "completion": "c"}]
    data = encode_file(write_jsonl(tmp_path / "d.jsonl", rows), char_tokenizer())
    assert length_order(data.examples) == [1, 0, 2]


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    from collm.data.rows import read_rows

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(CollmError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 50\): save the file as UTF-8"):
        read_rows(path)
