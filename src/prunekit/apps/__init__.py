"""Applications: the MNIST demo, YAML recipes, experiments, reference models and the ``prunekit`` CLI.

They compose the library's public API and are never imported by it.
"""
