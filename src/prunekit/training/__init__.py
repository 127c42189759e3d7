"""Training: the one training loop (``loop``), its data (``data``) and resumable checkpoints (``checkpoint``).

``loop.run_loop`` is the loop every training runs through (``loop.train`` is it
with checked arguments); ``checkpoint.Checkpoints`` is its resume/save hook.
The loop knows nothing of pruning: a Pruner attached to the optimizer prunes
through it, because masks follow ``optimizer.step()``.
"""
