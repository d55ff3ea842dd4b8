"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_readme_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)[1].strip()
    assert "pytest" in test_cmd and test_cmd in ci, "CI must run the README's test command verbatim"
    assert "torch==2.13.0" in test_cmd
