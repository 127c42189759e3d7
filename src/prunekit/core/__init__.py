"""The pruning core: how sparse (schedules), which weights (criteria, granularity, scope), and keeping it so.

``schedules``, ``criteria``, ``granularity`` and ``layerspec`` are pure policy
atoms; ``scope`` turns a model into prune targets; ``masks`` keeps masks applied
to parameters through training (the one mask engine); ``pruner`` is the
scheduled Pruner built on them; ``report`` counts what was pruned. Nothing
here imports from ``methods``, ``training``, ``formats``, ``runtime`` or ``apps``.
"""
