"""Passkey documents (data/passkey.py) and the passkey evaluation (evaluate/passkey.py)."""

import json

import numpy as np
import pytest
import torch

from blockrecurrent.data.corpus import load_documents
from blockrecurrent.data.passkey import (
    FILLER,
    PREFIX,
    QUESTION,
    key_line,
    passkey_prompt,
    passkey_text,
    random_key,
    write_passkey_documents,
)
from blockrecurrent.data.tokenizer import ByteTokenizer
from blockrecurrent.evaluate import passkey as P
from blockrecurrent.generate.generation import generate
from blockrecurrent.model.config import preset
from blockrecurrent.model.transformer import BlockRecurrentTransformer

TOK = ByteTokenizer()


@pytest.mark.parametrize("length", [300, 1024, 4099])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_has_the_exact_length_and_the_key_where_asked(length, depth):
    p = passkey_prompt(TOK, length, depth, "71432")
    assert len(p.ids) == length and p.ids[0] == TOK.bos_id
    text = TOK.decode(p.ids[1:])
    assert text.startswith(PREFIX) and text.endswith(QUESTION)
    assert text.count("71432") == 2 and key_line("71432") in text
    assert TOK.decode(p.ids[p.key_position:]).startswith(key_line("71432"))
    assert p.answer_ids == TOK.encode(" 71432")
    filler = text[len(PREFIX):text.index(key_line("71432"))]
    total = len(text) - len(PREFIX) - len(key_line("71432")) - len(QUESTION)
    assert abs(len(filler) - depth * total) <= max(len(s) for s in FILLER)
    if depth == 0.0:
        assert filler == ""


def test_prompt_checks():
    with pytest.raises(ValueError, match="length must be an int >= "):
        passkey_prompt(TOK, 100, 0.5, "71432")
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(TOK, 1024, 1.5, "71432")
    with pytest.raises(ValueError, match="5 digits"):
        passkey_prompt(TOK, 1024, 0.5, "7143")


def test_text_documents_and_the_training_folder(tmp_path):
    t = passkey_text(900, 0.5, "12345")
    assert len(t) == 900 and t.startswith(PREFIX)
    assert t.endswith(QUESTION + " 12345.\n") and t.count("12345") == 3
    assert not passkey_text(900, 0.5, "12345", answer=False).endswith("\n")
    paths = write_passkey_documents(tmp_path / "a", 5, 300, 600, seed=3)
    again = write_passkey_documents(tmp_path / "b", 5, 300, 600, seed=3)
    assert [p.read_text() for p in paths] == [p.read_text() for p in again]
    docs = load_documents(tmp_path / "a")
    assert len(docs) == 5 and all(300 <= len(d.text) <= 600 for d in docs)
    keys = {random_key(np.random.default_rng(i)) for i in range(20)}
    assert len(keys) > 15 and all(len(k) == 5 and k[0] != "0" for k in keys)


def _model(recurrent=True):
    torch.manual_seed(0)
    return BlockRecurrentTransformer(preset(
        "tiny", recurrent_layers=(1,) if recurrent else ())).eval()


def test_eval_answers_are_the_greedy_generation():
    """The evaluation's chunked prefill and decoding give what generate() gives for the prompt."""
    model = _model()
    rows = P.passkey_eval(model, TOK, lengths=(300,), num_docs=3, batch_size=2, chunk_size=32)
    docs = P.passkey_docs(TOK, 300, 3)
    for doc, got in zip(docs, rows[0]["docs"], strict=True):
        out = generate(model, doc.ids, len(doc.answer_ids), do_sample=False)
        assert TOK.decode(out[0].tolist()) == got["answer"]
        assert got["correct"] is (out[0].tolist() == doc.answer_ids)
        assert got["distance"] == 300 - doc.key_position


def test_eval_rows_scoring_and_report(tmp_path, monkeypatch):
    model = _model(recurrent=False)
    rows = P.passkey_eval(model, TOK, lengths=(256, 512), num_docs=4, seed=1, name="slide")
    assert [r["length"] for r in rows] == [256, 512]
    for r in rows:
        assert r["num_docs"] == 4 and len(r["docs"]) == 4 and 0 <= r["accuracy"] <= 1
        assert r["model"] == "slide" and r["recurrent"] is False and r["window_reach"] == 32
        assert r["tokens_per_s"] > 0 and r["input_bytes"] == 4 * r["length"] * 8
    assert model.training is False
    # a model that answers right scores 1
    monkeypatch.setattr(P, "_answer", lambda model, ids, steps, chunk: torch.tensor(
        [TOK.encode(" " + TOK.decode(row).split("The pass key is ")[1][:5]) for row in
         ids.tolist()]))
    right = P.passkey_eval(model, TOK, lengths=(256,), num_docs=3, name="oracle")
    assert right[0]["accuracy"] == 1.0 and right[0]["correct"] == 3
    paths = P.write_passkey_report(rows + right, tmp_path)
    md = open(paths["md"]).read()
    assert "| oracle | 256 | 1.00 (3/3) |" in md and "By the key's depth" in md
    assert len(json.load(open(paths["json"]))) == 3
    assert P.summarise_passkey(right) == {"oracle": {256: 1.0}}
    with pytest.raises(ValueError, match="lengths"):
        P.passkey_eval(model, TOK, lengths=(0,))
    with pytest.raises(ValueError, match="num_docs"):
        P.passkey_eval(model, TOK, num_docs=0)


def test_same_documents_for_every_model():
    a = P.passkey_docs(TOK, 512, 4, seed=2)
    b = P.passkey_docs(TOK, 512, 4, seed=2)
    assert [d.ids for d in a] == [d.ids for d in b]
    assert len({d.key for d in a}) == 4
    c = P.passkey_docs(TOK, 512, 4, seed=2, depths=[0.0, 1.0])
    assert [d.depth for d in c] == [0.0, 1.0, 0.0, 1.0]


def test_mix_passkey_adds_its_share_of_characters():
    from blockrecurrent.data.corpus import Document
    from blockrecurrent.data.passkey import mix_passkey, passkey_documents

    docs = [Document(f"z{i}", "x" * 5000) for i in range(4)]
    assert mix_passkey(docs, 0) == docs
    mixed = mix_passkey(docs, 0.5, 300, 500, seed=1)
    extra = [d for d in mixed if d.name.startswith("passkey/")]
    share = sum(len(d.text) for d in extra) / sum(len(d.text) for d in mixed)
    assert 0.4 < share < 0.6 and [d.name for d in mixed] == sorted(d.name for d in mixed)
    assert extra == passkey_documents(len(extra), 300, 500, seed=1)
    with pytest.raises(ValueError, match="share"):
        mix_passkey(docs, 1.0)


def test_brt_passkey_command(capsys, model_dir, tmp_path):
    """`brt passkey MODEL`: accuracy by length printed and written, in one command."""
    from helpers import run

    code, out, err = run(capsys, "passkey", model_dir, "--lengths", "256", "320", "--docs", "2",
                         "--batch-size", "2", "--threads", "1", "--out", tmp_path / "pk")
    assert code == 0, err
    assert "256 tokens: " in err and (tmp_path / "pk" / "passkey.json").is_file()
    rows = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert [r["length"] for r in rows] == [256, 320] and all(r["num_docs"] == 2 for r in rows)
    code, _, err = run(capsys, "passkey", model_dir, "--lengths", "0")
    assert code == 2
