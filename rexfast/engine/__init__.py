"""Training and evaluation: loops, checkpoints, DDP, configs. Imports point down
to rexfast.models, rexfast.data and rexfast.metrics only."""
