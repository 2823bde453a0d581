"""transformers and lm-evaluation-harness: loading our directories, logits, generate (greedy,
sampling, beam search) against our own generate, the cache, padding, tokenizers, pipeline,
and the lm-eval command against `brt eval`."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from helpers import write_word_corpus  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

from blockrecurrent.data.corpus import load_documents, split_documents, tokenize_corpus  # noqa: E402
from blockrecurrent.data.tokenizer import load_tokenizer  # noqa: E402
from blockrecurrent.evaluate.evaluation import evaluate  # noqa: E402
from blockrecurrent.hf import (  # noqa: E402
    BlockRecurrentCache,
    BlockRecurrentForCausalLM,
    BlockRecurrentHFConfig,
    add_hf_files,
    hf_config,
    write_choice_task,
    write_rolling_task,
)
from blockrecurrent.model.config import BlockRecurrentConfig, preset  # noqa: E402
from blockrecurrent.model.transformer import BlockRecurrentTransformer  # noqa: E402
from blockrecurrent.train.settings import load_train_config  # noqa: E402
from blockrecurrent.train.trainer import train  # noqa: E402


@pytest.fixture(autouse=True)
def _quiet(quiet_training):
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_word_corpus(tmp_path_factory.mktemp("corpus"), max_words=60)


def brt_train(corpus, out, *extra):
    torch.set_num_threads(1)
    mc, tc = load_train_config(None, "tiny", [
        f"data={corpus}", f"out_dir={out}", "cache_dir=", "batch_size=2", "max_steps=2",
        "warmup_steps=1", "eval_tokens=0", "log_interval=1", *extra])
    return train(mc, tc)["model_dir"]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """Directories written by `brt train` (2 steps), with the byte and with a BPE tokenizer."""
    root = tmp_path_factory.mktemp("trained")
    return {"byte": brt_train(corpus, root / "byte"),
            "bpe": brt_train(corpus, root / "bpe", "tokenizer=bpe", "bpe_vocab_size=300")}


def hf_model(d):
    return AutoModelForCausalLM.from_pretrained(d).eval()


# --- config and loading ----------------------------------------------------------------------

def test_config_maps_one_to_one():
    cfg = preset("tiny", gate="lstm", variant="dual", recurrent_layers=(1, 2), tie_embeddings=True)
    hc = hf_config(cfg)
    assert hc.model_type == "block_recurrent" and hc.to_brt() == cfg
    assert (hc.vocab_size, hc.hidden_size, hc.num_hidden_layers, hc.tie_word_embeddings) == \
        (cfg.num_tokens, cfg.dim, cfg.depth, True)
    import dataclasses
    assert all(hasattr(hc, f.name) for f in dataclasses.fields(BlockRecurrentConfig))
    with pytest.raises(ValueError, match="block_width"):
        BlockRecurrentHFConfig(max_seq_len=50, block_width=16)
    with pytest.raises(TypeError):
        hf_config({"dim": 64})


def test_auto_classes_load_save_pretrained_dir(saved):
    d, model = saved
    assert isinstance(AutoConfig.from_pretrained(d), BlockRecurrentHFConfig)
    hf = hf_model(d)
    assert isinstance(hf, BlockRecurrentForCausalLM)
    assert hf.state_dict().keys() == model.state_dict().keys()
    x = torch.randint(0, 256, (2, 64))  # one segment: one call of our model, exactly ours
    with torch.no_grad():
        ours = model(x)[0]
        assert torch.equal(hf(x).logits, ours)
        long = torch.randint(0, 256, (2, 150))  # read in chunks of max_seq_len: ours up to rounding
        torch.testing.assert_close(hf(long).logits, model(long)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(hf(x).logits.detach(), ours)  # with autograd: one call


def test_directory_saved_before_the_mlp_field_loads_as_gelu(tmp_path):
    """config.json without "mlp" (written before the field existed) describes a GELU MLP, as
    BlockRecurrentConfig.from_dict reads it; the dataclass default (GEGLU) would not fit."""
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(preset("tiny", mlp="gelu")).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["mlp"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert AutoConfig.from_pretrained(tmp_path).mlp == "gelu"
    hf = hf_model(tmp_path)
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x)[0])
    assert BlockRecurrentHFConfig().mlp == BlockRecurrentConfig().mlp  # defaults unchanged


@pytest.mark.parametrize("tie", [False, True])
def test_hf_save_pretrained_writes_our_format(tmp_path, tie):
    model = BlockRecurrentTransformer(preset("tiny", tie_embeddings=tie, use_compressed_mem=True))
    hf = BlockRecurrentForCausalLM.from_brt(model.eval())
    assert all(p is q for p, q in zip(hf.parameters(), model.parameters(), strict=True))
    assert not any(t.is_meta for t in [*hf.parameters(), *hf.buffers()])
    hf.save_pretrained(tmp_path)
    again = BlockRecurrentTransformer.from_pretrained(tmp_path).eval()
    loaded = hf_model(tmp_path)
    assert (loaded.to_logits.weight is loaded.token_emb.weight) == tie
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert torch.equal(again(x)[0], model(x)[0]) and torch.equal(loaded(x).logits, model(x)[0])


def test_trust_remote_code_without_importing_the_package(saved):
    d, model = saved
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(d)!r}, trust_remote_code=True).eval()
assert "blockrecurrent.hf" in sys.modules and type(m).__name__ == "BlockRecurrentForCausalLM"
torch.manual_seed(1)
with torch.no_grad():
    print(m(torch.randint(0, 256, (1, 20))).logits.sum().item())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    torch.manual_seed(1)
    with torch.no_grad():
        want = model(torch.randint(0, 256, (1, 20)))[0].sum().item()
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(want, rel=1e-6)


def test_add_hf_files_to_an_older_directory(saved, tmp_path):
    d, model = saved
    old = tmp_path / "old"
    shutil.copytree(d, old)
    for name in ("block_recurrent_hf.py", "tokenizer.json", "generation_config.json"):
        (old / name).unlink()
    model.config.to_json(old / "config.json")  # no transformers keys
    (old / "tokenizer_config.json").write_text('{"kind": "byte"}')
    weights = (old / "model.safetensors").read_bytes()
    add_hf_files(old)
    assert (old / "model.safetensors").read_bytes() == weights
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.equal(hf_model(old)(x).logits, model(x)[0])
    assert AutoTokenizer.from_pretrained(old)("ab")["input_ids"] == [97, 98]


def test_strict_loading(saved, tmp_path):
    d, _ = saved
    shutil.copytree(d, tmp_path / "m")
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    tensors.pop("norm.weight")
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="norm.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_brt_train_dir_loads(trained, kind):
    d = trained[kind]
    ours = BlockRecurrentTransformer.from_pretrained(d).eval()
    hf = hf_model(d)
    tok = AutoTokenizer.from_pretrained(d)
    our_tok = load_tokenizer(d)
    text = "the cat sat on a mat, é 🙂 <|doc|> then ran"
    assert tok(text)["input_ids"] == our_tok.encode(text)
    assert tok.decode(our_tok.encode(text)) == text
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == our_tok.bos_id
    assert hf.generation_config.eos_token_id == our_tok.bos_id
    ids = torch.tensor([[our_tok.bos_id] + our_tok.encode("the dog ran home " * 8)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], rtol=1e-5, atol=1e-5)


# --- generate ---------------------------------------------------------------------------------

def test_greedy_generate_equals_ours_across_blocks_and_segments(saved):
    d, model = saved
    hf = hf_model(d)
    for n, new in [(5, 40), (80, 40)]:  # 80 > max_seq_len = 64; both cross several blocks of 16
        prompt = torch.randint(0, 256, (2, n))
        want = model.generate(prompt, new, do_sample=False)
        got = hf.generate(prompt, max_new_tokens=new, do_sample=False)
        assert torch.equal(got[:, :n], prompt) and torch.equal(got[:, n:], want)


def test_generate_continues_from_returned_cache(saved):
    hf = hf_model(saved[0])
    prompt = torch.randint(0, 256, (1, 10))
    whole = hf.generate(prompt, max_new_tokens=30, do_sample=False)
    first = hf.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert first.cache.get_seq_length() == 21  # the last token is not read yet
    rest = hf.generate(first.sequences, cache=first.cache, max_new_tokens=18, do_sample=False)
    assert torch.equal(rest, whole)


def test_sampling_is_reproducible(saved):
    hf = hf_model(saved[0])
    prompt = torch.randint(0, 256, (1, 10))
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(hf.generate(prompt, max_new_tokens=20, do_sample=True, top_k=50))
    assert torch.equal(*outs)


def test_beam_search_equals_brute_force():
    """Beam search (3 beams, 4 tokens, vocabulary 8) against beams kept by hand, each candidate
    scored by a fresh forward over its whole sequence: checks the cache reordering."""
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(preset("tiny", num_tokens=8)).eval()
    hf = BlockRecurrentForCausalLM.from_brt(model).eval()
    prompt = torch.randint(0, 8, (1, 14))  # the beams cross the block boundary at 16
    beams = [(0.0, prompt[0].tolist())]
    with torch.no_grad():
        for _ in range(4):
            seqs = torch.tensor([s for _, s in beams])
            logp = model(seqs)[0][:, -1].float().log_softmax(-1)
            cand = [(score + logp[i, t].item(), s + [t]) for i, (score, s) in enumerate(beams)
                    for t in range(8)]
            beams = sorted(cand, key=lambda c: -c[0])[:3]
    out = hf.generate(prompt, max_new_tokens=4, num_beams=3, num_return_sequences=3,
                      do_sample=False, length_penalty=0.0, early_stopping=True,
                      output_scores=True, return_dict_in_generate=True)
    assert out.sequences.tolist() == [s for _, s in beams]
    torch.testing.assert_close(out.sequences_scores, torch.tensor([c for c, _ in beams]),
                               rtol=1e-4, atol=1e-4)


def test_cache_select_and_reorder(saved):
    d, model = saved
    hf = hf_model(d)
    x = torch.randint(0, 256, (3, 21))
    with torch.no_grad():
        out = hf(x[:, :20], use_cache=True)
        cache = out.cache
        assert isinstance(cache, BlockRecurrentCache) and cache.get_seq_length() == 20
        cache.reorder_cache(torch.tensor([2, 0, 0]))
        step = hf(x[[2, 0, 0], 20:], cache=cache).logits[:, -1]
        full = model(x)[0][:, -1]
        torch.testing.assert_close(step, full[[2, 0, 0]], rtol=1e-5, atol=1e-5)
        assert cache.get_seq_length() == 21 and cache.batch_size == 3
        cache.batch_select_indices(torch.tensor([1]))
        assert cache.batch_size == 1 and cache.states.shape[1] == 1
    with pytest.raises(ValueError, match="rolled back"):
        cache.crop(5)


def test_forward_options(saved):
    d, model = saved
    hf = hf_model(d)
    x = torch.randint(0, 256, (2, 30))
    labels = x.clone()
    labels[0, :5] = -100
    out = hf(x, labels=labels)
    logits = model(x)[0]
    keep = labels[:, 1:] != -100
    manual = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()  # gradients reach the parameters, which are our model's
    assert hf.token_emb.weight.grad.abs().sum() > 0
    assert hf.brt.token_emb.weight is hf.token_emb.weight
    with torch.no_grad():
        assert torch.equal(hf(x, logits_to_keep=3).logits, hf(x).logits[:, -3:])
        idx = torch.tensor([0, 7])
        assert torch.equal(hf(x, logits_to_keep=idx).logits, hf(x).logits[:, idx])
        tup = hf(x, return_dict=False, use_cache=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], hf(x).logits)
    for bad, err in [(dict(inputs_embeds=torch.zeros(1, 2, 64)), ValueError),
                     (dict(logits_to_keep=-1), ValueError),
                     (dict(labels=labels, logits_to_keep=1), ValueError),
                     (dict(cache="x"), TypeError), (dict(bogus=1), TypeError)]:
        with pytest.raises(err):
            hf(x, **bad)


def test_padding(saved):
    d, model = saved
    hf = hf_model(d)
    tok = AutoTokenizer.from_pretrained(d)
    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok(["a short prompt", "a longer prompt, padded"], return_tensors="pt",
                    padding=True)
        with pytest.raises(ValueError, match="one prompt at a time"):
            hf.generate(**batch, max_new_tokens=3)
    # Right padding can be scored without a cache: real positions are unaffected.
    tok.padding_side = "right"
    batch = tok(["a short prompt", "a longer prompt, padded"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf(**batch, use_cache=False).logits
        n = int(batch["attention_mask"][0].sum())
        torch.testing.assert_close(out[0, :n], model(batch["input_ids"][:1, :n])[0][0])
        assert hf(**batch).cache is None  # by default: no cache of pads
    tok.padding_side = "left"
    batch = tok(["a short prompt", "a longer prompt, padded"], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="only right padding"):
        hf(**batch, use_cache=False)


def test_pipeline_byte_and_bpe(trained):
    for kind, d in trained.items():
        ours = BlockRecurrentTransformer.from_pretrained(d).eval()
        tok = load_tokenizer(d)
        gen = pipeline("text-generation", model=str(d), device="cpu")
        text = gen("the cat", max_new_tokens=12, do_sample=False, return_full_text=False)
        want = ours.generate(tok.encode("the cat"), 12, do_sample=False, eos_token_id=tok.bos_id)
        want = want[0].tolist()
        want = want[:want.index(tok.bos_id)] if tok.bos_id in want else want
        assert text[0]["generated_text"] == tok.decode(want), kind
    # A prompt read as a document start: the tokenizer prepends bos when asked to.
    d = trained["byte"]
    ours, tok = BlockRecurrentTransformer.from_pretrained(d).eval(), load_tokenizer(d)
    hf_tok = AutoTokenizer.from_pretrained(d, add_bos_token=True)
    assert hf_tok("the cat")["input_ids"] == [tok.bos_id] + tok.encode("the cat")
    gen = pipeline("text-generation", model=str(d), tokenizer=hf_tok, device="cpu")
    text = gen("the cat", max_new_tokens=12, do_sample=False, return_full_text=False)
    want = ours.generate([tok.bos_id] + tok.encode("the cat"), 12, do_sample=False,
                         eos_token_id=tok.bos_id)[0].tolist()
    want = want[:want.index(tok.bos_id)] if tok.bos_id in want else want
    assert text[0]["generated_text"] == tok.decode(want)


# --- lm-evaluation-harness --------------------------------------------------------------------

def test_task_writers_check_input(tmp_path):
    with pytest.raises(ValueError):
        write_rolling_task(tmp_path, [])
    with pytest.raises(ValueError):
        write_choice_task(tmp_path, [("q", ["a", "b"], 2)])
    with pytest.raises(ValueError, match="identifier"):
        write_rolling_task(tmp_path, ["x"], name="a b")


def readme_blocks(lang):
    """The fenced `lang` blocks of docs/huggingface.md from its AutoModel section on (the
    README's quickstart points there); they name the model directory runs/mine/model."""
    text = (Path(__file__).parents[1] / "docs" / "huggingface.md").read_text()
    section = text.split("## AutoModel, generate, pipeline", 1)[1]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def test_readme_python_snippet(trained, capsys):
    (code,) = readme_blocks("python")
    exec(code.replace("runs/mine/model", str(trained["bpe"])), {})
    assert capsys.readouterr().out.strip()


def test_lm_eval_rolling_loglikelihood_equals_brt_eval(trained, corpus, tmp_path):
    """The README's lm_eval commands (hf model type, local tasks) on a `brt train` directory:
    bits per byte over the held-out documents equal `brt eval`'s; the multiple-choice task runs."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    d = trained["byte"]
    script = "\n".join(readme_blocks("bash"))  # the task writers, then lm_eval
    script = (script.replace("runs/mine/model", str(d)).rstrip()
              + f" --output_path {tmp_path / 'out'}")
    bin_dir = os.path.dirname(sys.executable)  # the environment's python and lm_eval
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(["bash", "-euc", script], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results*.json")).read_text())["results"]
    assert 0 <= results["brt_choice"]["acc,none"] <= 1

    docs = split_documents(load_documents(str(corpus)))["test"]
    model = BlockRecurrentTransformer.from_pretrained(d)
    ours = evaluate(model, tokenize_corpus(docs, load_tokenizer(d)), batch_size=1,
                    progress=False)
    print("lm-eval - brt eval, bits per byte:",
          results["brt_heldout"]["bits_per_byte,none"] - ours["bits_per_byte"])
    assert results["brt_heldout"]["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"],
                                                                         rel=1e-5)
