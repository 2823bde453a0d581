"""Profile one segment of the reference config (or a preset) with torch.profiler on the CPU.

    python benchmarks/profile_segment.py --threads 1                  # training segment
    python benchmarks/profile_segment.py --mode infer --by-shape --trace /tmp/trace.json

The profiled segment is the second of a stream, so it carries memories and states like every
segment after the first; the first one also warms up the allocator and the optimizer state.
Prints the top ops by self CPU time and the number of aten calls (a proxy for Python and
dispatch overhead: at ~10-20 us each, thousands of calls matter for small segments).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from blockrecurrent import PRESETS, BlockRecurrentConfig, BlockRecurrentTransformer, preset
from blockrecurrent.bench.run import REFERENCE_CONFIG, REFERENCE_RUN


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="profile a preset instead of the reference config")
    ap.add_argument("--batch-size", type=int, default=REFERENCE_RUN["batch_size"])
    ap.add_argument("--mode", choices=["train", "infer"], default="train")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--rows", type=int, default=25, help="ops to list")
    ap.add_argument("--by-shape", action="store_true", help="also group by input shapes")
    ap.add_argument("--trace", help="write a chrome trace here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset) if args.preset else BlockRecurrentConfig(**REFERENCE_CONFIG)
    model = BlockRecurrentTransformer(cfg).train(args.mode == "train")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seg = cfg.max_seq_len
    tokens = torch.randint(0, cfg.num_tokens, (args.batch_size, 2 * seg + 1))

    def segment(i, mems, states):
        x, y = tokens[:, i:i + seg], tokens[:, i + 1:i + seg + 1]
        if args.mode == "infer":
            with torch.inference_mode():
                return model(x, xl_memories=mems, states=states)[1:]
        with record_function("forward"):
            logits, mems, states = model(x, xl_memories=mems, states=states)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return mems, states

    mems, states = segment(0, None, None)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.by_shape) as prof:
        segment(seg, mems, states)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                      max_name_column_width=44))
    if args.by_shape:
        print(prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=34,
            max_shapes_column_width=70))
    calls = sum(e.count for e in table if e.key.startswith("aten::"))
    print(f"aten calls (nested included): {calls}; {torch.get_num_threads()} threads; "
          f"batch {args.batch_size} x segment {seg}, {args.mode}")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
