"""The README's offline usage snippet runs as pasted."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_offline_snippet_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    offline = [b for b in blocks if "LlamaConfig(" in b]
    assert len(offline) == 1, "the README should hold exactly one offline snippet"
    exec(compile(offline[0], "README.md", "exec"), {})
    assert "torch.Size([1, 44]) 43" in capsys.readouterr().out
