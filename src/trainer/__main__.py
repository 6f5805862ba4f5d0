"""`python -m trainer` (and `torchrun -m trainer`) runs the command line."""

from trainer.cli import app

app(prog_name="trainer")
