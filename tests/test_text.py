"""generate/text.py: text in and out through a saved model and its tokenizer (`brt generate`)."""

import io

import pytest
from models import make_model

from blockrecurrent.generate.text import generate_text


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_generate_text_with_byte_tokenizer(tmp_path, model):
    from blockrecurrent.data.tokenizer import ByteTokenizer

    model.save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    stats = generate_text(tmp_path, prompt="héllo wörld", max_new_tokens=30, seed=0,
                          temperature=0.8, top_k=40, out=out, err=err)
    assert stats["prompt_tokens"] == 1 + len("héllo wörld".encode())  # bos + bytes
    assert 1 <= stats["new_tokens"] <= 30
    assert out.getvalue().rstrip("\n") == stats["text"].rstrip("\n") and stats["text"]
    assert "prefill" in err.getvalue() and "tokens/s" in err.getvalue()
    assert stats["prefill_tokens_per_s"] > 0
    # The same run again, from a prompt file, prints the same text.
    (tmp_path / "prompt.txt").write_text("héllo wörld", encoding="utf-8")
    again = generate_text(tmp_path, prompt_file=tmp_path / "prompt.txt", max_new_tokens=30,
                          seed=0, temperature=0.8, top_k=40, out=io.StringIO(), err=io.StringIO())
    assert again["text"] == stats["text"]
    with pytest.raises(ValueError, match="either prompt or prompt_file"):
        generate_text(tmp_path, prompt="a", prompt_file=tmp_path / "prompt.txt")
    with pytest.raises(ValueError, match="does not exist"):
        generate_text(tmp_path, prompt_file=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="top_p"):
        generate_text(tmp_path, prompt="a", top_p=2.0)
