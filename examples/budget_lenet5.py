"""The sparsity each allocation reaches within 0.5 pt of dense accuracy, one-shot (README "Know when to stop").

Run: ``.venv/bin/python examples/budget_lenet5.py`` (about a minute on 2 cores). LeNet-5 on MNIST-5k,
8 epochs of Adam, seed 0; magnitude pruning allocated by uniform, ERK and LAMP, searched by bisection on
the test set (the budget is measured on the data it searches on).
"""

import copy

import torch

from prunekit import prune_to_budget
from prunekit.apps.models import LeNet5
from prunekit.training.data import load_mnist5k
from prunekit.training.loop import evaluate, train


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    X, y = load_mnist5k("train")
    Xt, yt = load_mnist5k("test")
    model = LeNet5()
    train(model, X, y, epochs=8, batch_size=64, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), seed=0,
          progress=False)

    def accuracy(m: torch.nn.Module) -> float:
        return evaluate(m, Xt, yt)["accuracy"]

    print(f"dense accuracy {accuracy(model):.4f}")
    for rule in ("uniform", "erk", "lamp"):
        result = prune_to_budget(copy.deepcopy(model), accuracy, max_drop=0.005, rule=rule, tol=0.005, progress=False)
        print(f"{rule:8s} sparsity {result.sparsity:.4f}  accuracy {result.metric:.4f}  trials {len(result.trials)}")


if __name__ == "__main__":
    main()
