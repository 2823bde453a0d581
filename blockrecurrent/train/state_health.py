"""The state's health during training: at each evaluation, what the recurrent state is worth on
a small held-out budget, logged beside the loss (metrics.jsonl, TensorBoard, the progress bar's
evaluation line), with a warning when it has been worth nothing for several evaluations in a
row: the paper notes that a model that learns to ignore its state does not recover, so a run
in that condition is worth stopping early.

The measure is the other-document ablation (train.streaming, reset_state "other-document"): the
same documents read with every row given, at every segment, the state another row's document
reached, against the state carried as in training. The state is then of the usual kind (no
surprise of an initial state in mid-document) but holds nothing about this document, so
    state_gain = loss(other document's state) - loss(own state)   (nats per token)
is what the state knows about the document; state_gain_pct is it in percent of the loss.
"""

from __future__ import annotations

from .train_data import eval_subset

# The state counts as worth nothing below this share of the loss...
MIN_GAIN_PCT = 0.1
# ...for this many evaluations in a row.
WARN_AFTER = 3


class StateHealth:
    """The documents the ablation reads (the first validation documents that fit in
    state_eval_tokens; at least two per process: the ablation swaps states between rows) and the
    recent gains; `measure` runs it, `warning` says when to stop trusting the run."""

    def __init__(self, eval_corpus, budget: int, world_size: int, recurrent: bool):
        subset = eval_subset(eval_corpus, budget) if (recurrent and budget > 0
                                                     and eval_corpus is not None) else None
        self.corpus = subset if subset is not None and len(subset) >= 2 * world_size else None
        self.gains: list[float] = []
        self.warned = False

    def measure(self, stream_loss) -> dict:
        """stream_loss(corpus, reset_state) -> (nats, tokens); returns the record's fields."""
        own, other = ((lambda nats, tokens: nats / max(tokens, 1.0))(
            *stream_loss(self.corpus, reset)) for reset in ("carry", "other-document"))
        gain = other - own
        pct = 100.0 * gain / own if own > 0 else 0.0
        self.gains.append(pct)
        return {"state_gain": gain, "state_gain_pct": pct}

    def warning(self) -> str | None:
        """A one-line warning, once, when the last WARN_AFTER gains were all below
        MIN_GAIN_PCT of the loss."""
        recent = self.gains[-WARN_AFTER:]
        if self.warned or len(recent) < WARN_AFTER or max(recent) >= MIN_GAIN_PCT:
            return None
        self.warned = True
        return (f"the recurrent state has been worth less than {MIN_GAIN_PCT}% of the loss for "
                f"{WARN_AFTER} evaluations in a row (state_gain_pct {recent[-1]:+.3f}); a model "
                f"that learns to ignore its state does not recover (docs/design.md, \"The "
                f"state's health\"): consider stopping and checking the recurrent settings")
