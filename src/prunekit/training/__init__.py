"""Training: the one training loop (``loop``), its data (``data``) and resumable checkpoints (``checkpoint``).

The loop knows nothing of pruning: a Pruner attached to the optimizer prunes
through it, because masks follow ``optimizer.step()``.
"""
