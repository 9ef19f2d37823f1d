"""The README is executable documentation: its python blocks run, and its test command is what CI runs."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Runs each block in turn in one namespace, as a reader pasting them into one session would.
RUNNER = """
import sys
namespace = {"__name__": "__main__"}
for index, block in enumerate(sys.stdin.read().split("\\n# ---- next block ----\\n")):
    try:
        exec(compile(block, f"README python block {index + 1}", "exec"), namespace)
    except BaseException:
        print(f"README python block {index + 1} failed:\\n{block}", file=sys.stderr)
        raise
"""


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


def bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)


def test_readme_python_blocks_run_offline_from_an_empty_folder(tmp_path):
    blocks = python_blocks()
    assert blocks, "the README has no python example"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RUNNER)],
        input="\n# ---- next block ----\n".join(blocks),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_commands = [line for block in bash_blocks() for line in block.splitlines() if "pytest" in line]
    assert len(test_commands) == 1, test_commands
    assert test_commands[0] in ci.splitlines()
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_no_dependency_on_torchvision_or_timm():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'"(torchvision|timm)\b', pyproject)
