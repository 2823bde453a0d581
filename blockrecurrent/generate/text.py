"""Text in, text out: `generate_text` loads a saved model and its tokenizer, continues a prompt and
prints the new text as it is produced (`brt generate`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..model.transformer import BlockRecurrentTransformer
from .generation import _check, _EvalMode, _start
from .sampling import check_count, check_sampling


def generate_text(model_dir, prompt: str | None = None, prompt_file=None,
                  max_new_tokens: int = 256, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = None, out=None, err=None,
                  device: str = "cpu", state_in=None, state_out=None,
                  state_tune=None) -> dict:
    """Load a saved model and its tokenizer from model_dir, continue `prompt` (or the text of
    `prompt_file`; neither: generate a document from its start) and print the new text to `out`
    as it is produced, then prefill and decode speeds to `err` (default: sys.stdout, sys.stderr
    at call time). The prompt is read as the start of a document (bos first); generation stops
    at max_new_tokens or when the model starts a new document (emits bos).
    state_in: a session file (generate/session.py) whose document the prompt continues (no bos
    is added; without a prompt, generation continues from its saved logits and, unless `seed`
    is given, its saved random stream); state_out: write the session after the new text to
    this file, to continue it in a later call. A document fed in pieces this way gives the same
    text as one call. state_tune: a state tuning file (model/state_tune.py) applied first.

    Returns {"text", "prompt_tokens", "new_tokens", "new_token_ids", "stopped_at_eos",
    "prefill_seconds", "prefill_tokens_per_s", "decode_seconds", "decode_tokens_per_s"}; decode
    counts the tokens after the first, whose logits come from the prefill."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    prompt = _read_prompt(prompt, prompt_file)
    check_count("max_new_tokens", max_new_tokens, 0)
    check_sampling(temperature, top_k, top_p, True)
    if seed is not None:
        check_count("seed", seed, 0)
    model, tokenizer = _load(Path(model_dir), device, state_tune)
    past = _read_state(state_in, model)  # checked before any model work
    ids = ([] if past is not None else [tokenizer.bos_id]) + tokenizer.encode(prompt or "")
    req = _check(model, ids or None, max_new_tokens, temperature, top_k, top_p, True,
                 eos_token_id=tokenizer.bos_id, seed=seed, past=past)

    with _EvalMode(model):
        t0 = time.perf_counter()
        dec = _start(req)
        prefill_s = time.perf_counter() - t0
        text, new = _print_tokens(dec, tokenizer, max_new_tokens, out)  # new: the token ids
        if state_out is not None:
            _write_state(state_out, model, dec, tokenizer.bos_id)

    n, steps, decode_s = len(ids), dec.steps, dec.decode_seconds
    stats = {
        "text": text,
        "prompt_tokens": n,
        "new_tokens": len(new),
        "new_token_ids": new,
        "stopped_at_eos": bool(dec.finished.all()),
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": n / prefill_s if prefill_s > 0 else None,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": steps / decode_s if steps and decode_s > 0 else None,
    }
    err.write(f"prefill: {n} tokens in {prefill_s:.3f} s ({_rate(stats['prefill_tokens_per_s'])});"
              f" decode: {steps} tokens in {decode_s:.3f} s "
              f"({_rate(stats['decode_tokens_per_s'])})\n")
    err.flush()
    return stats


def _read_state(state_in, model):
    """The GenerationResult to continue from a session file, or None."""
    if state_in is None:
        return None
    from .session import load_session

    session = load_session(state_in, model)
    if session.rows != 1:
        raise ValueError(f"{state_in} holds {session.rows} documents; brt generate continues one")
    return None if session.xl_memories is None else session.to_result()


def _write_state(state_out, model, dec, bos_id: int) -> None:
    """Save the session after every returned token (a bos that ended the text is not read)."""
    from .session import Session, save_session

    if dec.pending is not None and int(dec.pending[0]) == bos_id:
        dec.pending = None
    dec.feed_pending()
    gen = dec.generator.get_state() if dec.generator is not None else None
    save_session(state_out, model, Session(dec.mems, dec.states, dec.logits, None, gen))


def _rate(tokens_per_s: float | None) -> str:
    return "n/a" if tokens_per_s is None else f"{tokens_per_s:,.1f} tokens/s"


def _read_prompt(prompt: str | None, prompt_file) -> str | None:
    """The prompt text: `prompt`, or the text of `prompt_file`."""
    if prompt is not None and prompt_file is not None:
        raise ValueError("pass either prompt or prompt_file, not both")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if prompt_file is not None:
        path = Path(prompt_file)
        if path.is_dir():
            raise ValueError(f"prompt file {str(path)!r} is a directory; name a text file")
        if not path.is_file():
            raise ValueError(f"prompt file {str(path)!r} does not exist")
        try:
            prompt = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text ({e.reason} at byte "
                             f"{e.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
    return prompt


def _load(model_dir: Path, device: str, state_tune=None):
    """The saved model (with a state tuning file applied) and its tokenizer, checked to belong
    together."""
    from ..data.tokenizer import load_tokenizer

    model = BlockRecurrentTransformer.from_pretrained(model_dir, map_location=device)
    if state_tune is not None:  # a tuned document-start state
        from ..model.state_tune import apply_state_tune

        apply_state_tune(model, state_tune)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.vocab_size > model.config.num_tokens:
        raise ValueError(f"the tokenizer in {model_dir} has {tokenizer.vocab_size} tokens but the "
                         f"model only num_tokens={model.config.num_tokens}; are they from the "
                         f"same run?")
    return model, tokenizer


def _print_tokens(dec, tokenizer, max_new_tokens: int, out) -> tuple[str, int]:
    """Decode up to max_new_tokens tokens, writing the text to `out` as it comes, until the
    model starts a new document (emits bos). Returns the text and the new token ids."""
    decoder, pieces, new = tokenizer.stream_decoder(), [], []
    try:
        for tok in dec.tokens(max_new_tokens):
            tok = int(tok[0])
            if tok == tokenizer.bos_id:  # the model starts a new document: this one is done
                break
            new.append(tok)
            piece = decoder.feed([tok])
            if piece:
                out.write(piece)
                out.flush()
                pieces.append(piece)
    except KeyboardInterrupt:  # end the text's line, so that "interrupted" starts its own
        if pieces and not pieces[-1].endswith("\n"):
            out.write("\n")
            out.flush()
        raise
    pieces.append(decoder.flush())
    text = "".join(pieces)
    out.write(pieces[-1] + ("\n" if text and not text.endswith("\n") else ""))
    out.flush()
    return text, new
