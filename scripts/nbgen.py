"""The one helper behind the notebook generators (`scripts/nb_0*.py`): collect markdown and code cells,
then write an unexecuted notebook into notebooks/. Execute it with papermill (`make reproduce`)."""

from __future__ import annotations

from pathlib import Path

import nbformat as nbf

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


class NotebookWriter:
    """Cells of one generated notebook, in order; `write()` saves it as notebooks/<name>."""

    def __init__(self, name: str):
        self.out = NOTEBOOKS / name
        self.cells: list = []

    def md(self, text: str) -> None:
        self.cells.append(nbf.v4.new_markdown_cell(text.strip()))

    def code(self, text: str, tags: list[str] | None = None) -> None:
        c = nbf.v4.new_code_cell(text.strip())
        if tags:
            c.metadata["tags"] = tags
        self.cells.append(c)

    def write(self) -> Path:
        nb = nbf.v4.new_notebook()
        nb.cells = self.cells
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        nbf.write(nb, self.out)
        print(f"wrote {self.out} ({len(self.cells)} cells)")
        return self.out
