"""`python -m torch.distributed.run ... tests/interrupt_run.py STEP [trainer arguments]`: the
trainer's main, with a SIGINT (as from Ctrl-C) sent to rank 0 during optimizer step STEP."""
import os
import signal
import sys

from blockrecurrent.train.__main__ import main
from blockrecurrent.train.trainer import Trainer

stop_at = int(sys.argv[1])
original = Trainer.train_step


def train_step(self):
    if self.step + 1 == stop_at and self.env.rank == 0:
        os.kill(os.getpid(), signal.SIGINT)
    return original(self)


Trainer.train_step = train_step
sys.exit(main(sys.argv[2:]))
