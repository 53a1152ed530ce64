"""What the README says runs and holds: its layer example computes the gradients its comment
names, and every dataset the command line offers is mentioned."""
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_layer_example_gives_the_gradients_its_comment_names():
    block = re.search(r"```python\n(.*?)```", _readme(), flags=re.S).group(1)
    names = re.search(r"# grads for (.*)", block).group(1).split(", ")
    scope = {}
    torch.manual_seed(0)
    exec(compile(block, "README.md", "exec"), scope)
    for name in names:
        tensor = eval(name, scope)
        assert tensor.grad is not None and bool(tensor.grad.abs().sum() > 0), f"README: no gradient for {name}"


def test_every_dataset_of_the_command_line_is_in_the_readme():
    from pmoe.cli import DATA_CHOICES

    readme = _readme()
    assert [name for name in DATA_CHOICES if f"`{name}`" not in readme] == []
