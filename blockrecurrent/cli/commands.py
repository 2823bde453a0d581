"""`brt`'s subcommands: each a thin wrapper over a plain function, given argparse's namespace
(parser.py defines the options) -> exit status. Heavy modules are imported inside them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..report import main_job  # stdlib only at import


def _overrides(values: list[str]) -> list[str]:
    bad = [v for v in values if "=" not in v or v.startswith("=")]
    if bad:
        raise ValueError(f"settings must look like key=value (a training field) or "
                         f"model.key=value (a model field), got {bad}")
    return values


# --- subcommands -------------------------------------------------------------------------


def cmd_train(args) -> int:
    overrides = _overrides(args.overrides)
    from ..train.resume import load_resume_config
    from ..train.settings import load_train_config
    from ..train.trainer import train

    if args.tune_state is not None:
        overrides = _tune_state_overrides(args, overrides)
    if args.resume:  # the run's own settings, from its checkpoint, and those given over them
        model_config, train_config, note = load_resume_config(args.config, args.preset, overrides)
        if note:
            print(note, file=sys.stderr)
    else:
        model_config, train_config = load_train_config(args.config, args.preset, overrides)
    summary = train(model_config, train_config, resume=args.resume)
    print(json.dumps(summary, indent=2, default=str))
    if summary.get("status") == "interrupted":  # checkpointed: `--resume` continues it
        print(f"interrupted at step {summary.get('step')}; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    return 0


def _tune_state_overrides(args, overrides: list[str]) -> list[str]:
    """`--tune-state MODEL_DIR [--tune-state-ids]`: init_from=MODEL_DIR tune=state[+ids]."""
    if args.resume:
        raise ValueError("--tune-state starts a new tuning run; continue one with "
                         "brt train --resume out_dir=...")
    given = {o.split("=", 1)[0].strip().removeprefix("train.") for o in overrides}
    if given & {"init_from", "tune"}:
        raise ValueError("--tune-state MODEL_DIR names the base model and what trains; drop "
                         + " and ".join(sorted(given & {"init_from", "tune"})))
    tune = "state+ids" if args.tune_state_ids else "state"
    return [*overrides, f"init_from={args.tune_state}", f"tune={tune}"]


def cmd_eval(args) -> int:
    from ..evaluate.evaluation import evaluate_checkpoint
    from ..evaluate.report import count_of, eval_table, human_count

    out = args.out if args.out is not None else Path(args.checkpoint) / "eval"
    res = evaluate_checkpoint(
        args.checkpoint, data=args.data, split=args.split, text_field=args.text_field,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        cache_dir=args.cache_dir, batch_size=args.batch_size, segment_len=args.segment_len,
        dtype=args.dtype, max_docs=args.max_docs, max_tokens=args.max_tokens,
        device=args.device, out_dir=out, reset_state=args.reset_state,
        state_tune=args.state_tune,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        name=f"eval-{args.split}" + {"carry": "", "every-segment": "-state-reset",
                                     "other-document": "-state-other-document"}[args.reset_state])
    print(f"model: {args.checkpoint} ({human_count(res['params'])} parameters, "
          f"{human_count(res['non_embedding_params'])} non-embedding)")
    print(f"data: {res['data']!r}, {args.split} split: {count_of(res['documents'], 'document')}, "
          f"{res['tokens']:,} tokens, {res['bytes']:,} bytes "
          f"({res['seconds']:.1f} s, {res['tokens_per_s']:,.0f} tokens/s)")
    print(eval_table(res))
    print(f"bits per byte: {res['bits_per_byte']:.4f}   bits per token: "
          f"{res['bits_per_token']:.4f}   (bits/byte per bucket ~ bits/token x "
          f"{1 / res['bytes_per_token']:.3f} tokens/byte)")
    print("wrote " + ", ".join(p for p in res["report"].values() if p))
    return 0


def cmd_generate(args) -> int:
    from ..generate.text import generate_text

    generate_text(args.checkpoint, prompt=args.prompt, prompt_file=args.prompt_file,
                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device,
                  state_in=args.state_in, state_out=args.state_out,
                  state_tune=args.state_tune)
    return 0


def cmd_serve(args) -> int:
    from ..serve.server import serve  # fastapi and uvicorn: imported when it starts
    serve(args.checkpoint, host=args.host, port=args.port, session_dir=args.session_dir,
          device=args.device, name=args.name, max_tokens=args.max_tokens,
          max_prompt_tokens=args.max_prompt_tokens,
          max_in_memory=args.max_sessions_in_memory, max_batch=args.max_batch,
          state_tune=args.state_tune)
    return 0


def cmd_compare(args) -> int:
    overrides = _overrides(args.overrides)
    from ..evaluate.compare import compare

    res = compare(args.config, args.preset, overrides, args.out,
                  extra_layer=not args.no_extra_layer, eval_batch_size=args.eval_batch_size,
                  max_eval_tokens=args.max_eval_tokens)
    print(res["markdown"])
    print(f"wrote {args.out}/comparison.md, comparison.json, comparison.png")
    return 0


def cmd_bench(args) -> int:
    from ..bench import command as bench

    bench.main(args)
    return 0


def cmd_probe(args) -> int:
    from ..evaluate.probes import evaluate_saved, probe_table, run_probes, write_probe_report
    from ..evaluate.reach import reach_table
    from ..train.settings import load_train_config

    if args.task == "mqar":
        from ..evaluate.mqar_report import probe_main
        return probe_main(args, _overrides(args.overrides))
    if "full" in (args.models or ()):
        raise ValueError("--models full is for --task mqar")
    # Model settings over the probe preset, parsed as the trainer parses model.key=value.
    config = load_train_config(preset="probe", overrides=[
        "model." + o.strip().removeprefix("model.") for o in _overrides(args.overrides)])[0]
    task = dict(kind=args.kind, num_keys=args.keys, distances=args.distances,
                queries=args.queries, lead=args.lead)
    if args.model is not None:
        rows = evaluate_saved(args.model, **task)
    else:
        rows = run_probes(config, **task, models=args.models or ["recurrent", "slide"],
                          steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          betas=tuple(args.betas), seeds=args.seeds, mixed=args.mixed,
                          beyond=args.beyond, train_leads=args.train_leads,
                          save_dir=Path(args.out) / "models" if args.save_models else None)
    paths = write_probe_report(rows, args.out, title=f"recall probe ({args.kind})")
    print(probe_table(rows, markdown=False))
    if any(r.get("factor", 1) > 1 for r in rows):
        print("\nbeyond the trained distance D:\n" + reach_table(rows, markdown=False))
    print("wrote " + ", ".join(p for p in paths.values() if p))
    return 0


def cmd_run(args) -> int:
    main_job(args.out, quick=args.quick, config=args.config, overrides=_overrides(args.overrides),
             max_eval_tokens=args.max_eval_tokens)
    return 0


def cmd_passkey(args) -> int:
    from ..data.tokenizer import load_tokenizer
    from ..evaluate.passkey import passkey_eval, passkey_table, write_passkey_report
    from ..model.transformer import BlockRecurrentTransformer

    model = BlockRecurrentTransformer.from_pretrained(args.checkpoint, map_location=args.device)
    tokenizer = load_tokenizer(args.checkpoint)
    name = Path(args.checkpoint).resolve().name

    def progress(row: dict) -> None:
        print(f"{row['length']:,} tokens: {row['correct']} of {row['num_docs']} keys "
              f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)

    rows = passkey_eval(model, tokenizer, lengths=args.lengths, num_docs=args.docs,
                        seed=args.seed, batch_size=args.batch_size, name=name,
                        progress=progress)
    paths = write_passkey_report(rows, args.out or Path(args.checkpoint) / "passkey")
    print(passkey_table(rows, markdown=False))
    print("wrote " + ", ".join(str(p) for p in paths.values() if p))
    return 0
