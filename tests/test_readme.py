"""The README's commands are the ones CI runs, and the in-repo spec is the shared contract."""
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _ci_test_command() -> str:
    run = _read(".ci", "run")
    m = re.search(r"# README: test command \(begin\)\n(.*?)# README: test command \(end\)", run, flags=re.S)
    assert m, ".ci/run lost its README test-command markers"
    lines = [ln for ln in m.group(1).splitlines() if ln.strip()]
    assert len(lines) == 1, "the README's test command is one line; keep .ci/run's the same"
    return lines[0].strip()


def test_readme_first_two_commands_are_setup_and_the_ci_test_command():
    blocks = _bash_blocks(_read("README.md"))
    assert len(blocks) >= 2
    setup, tests = blocks[0].strip(), blocks[1].strip()
    assert tests == _ci_test_command()
    assert "pmoe train --data digits-patch" in setup and "pip install" in setup


def test_readme_setup_installs_what_ci_installs():
    setup = _bash_blocks(_read("README.md"))[0]
    ci = _ci_test_command()
    first_install = ci.split("&&")[0].strip()  # torch and triton pins
    assert first_install in setup


@pytest.mark.parametrize("block", range(2))
def test_readme_commands_parse_as_shell(block):
    cmd = _bash_blocks(_read("README.md"))[block]
    for part in cmd.split("&&"):
        assert shlex.split(part)


def test_readme_links_exist():
    for target in re.findall(r"\]\(([^)#]+)\)", _read("README.md")):
        if "://" not in target:
            assert os.path.exists(os.path.join(ROOT, target)), f"README links to missing {target}"


def test_readme_pmoe_commands_are_registered():
    from pmoe.cli import COMMANDS

    names = {c[0] for c in COMMANDS}
    for cmd in re.findall(r"^pmoe (\S+)", "\n".join(_bash_blocks(_read("README.md"))), flags=re.M):
        if not cmd.startswith("-"):
            assert cmd in names, f"README shows `pmoe {cmd}`, which the CLI does not have"


def test_spec_copy_matches_the_shared_contract():
    """docs/SPEC.md is the shared contract, verbatim, followed by the project's own sections
    (numbered after it, e.g. §6 HierarchicalPMoE): nothing of the contract may be changed."""
    shared = os.path.join(ROOT, "..", "shared", "SPEC.md")
    if not os.path.exists(shared):
        pytest.skip("../shared is not beside this checkout")
    contract = open(shared, encoding="utf-8").read()
    ours = _read("docs", "SPEC.md")
    assert ours.startswith(contract), "docs/SPEC.md must start with ../shared/SPEC.md, unchanged"
    extra = ours[len(contract):]
    assert not extra or extra.startswith("\n## "), "project sections follow the contract as new '## ' sections"
