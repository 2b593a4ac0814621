"""Notebook parameters: what each numbered notebook runs with, from one source of truth.

A notebook's configuration is its `parameters` cell (literals only, read with `ast`), then the CPU-sized
defaults of its preset (`notebooks/params/<preset>.yaml`, for presets whose paper-size counts would not
fit a laptop), then the values papermill injected into an executed copy, then explicit overrides (05's
preset, model and seed). `make reproduce` passes the preset's file to papermill (`-f`), and 03, 04 and
05 rebuild the configs of the notebooks they read with `notebook_params`, so every stage agrees on what
a run was.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

from . import config as _config

PARAMS_DIR = _config.NOTEBOOKS_DIR / "params"


def notebook_folder(path: str | Path | None = None) -> Path:
    """The folder whose notebooks' parameters are read ('' or None = the repository's notebooks/)."""
    return Path(path) if path else _config.REPO_ROOT / "notebooks"


def _literal_assignments(source: str, where: str) -> dict[str, Any]:
    """`name = literal` statements of a parameters cell, in order; anything else is a clear error."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise ValueError(f"{where}: the parameters cell is not valid Python ({err.msg}, line {err.lineno})") from err
    out: dict[str, Any] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{where}, line {node.lineno}: a parameters cell holds only `name = literal` lines "
                             f"(STYLE.md); got {ast.get_source_segment(source, node)!r}")
        name = node.targets[0].id
        try:
            out[name] = ast.literal_eval(node.value)
        except ValueError as err:
            raise ValueError(f"{where}, line {node.lineno}: parameter {name!r} must be a literal (a number, string, "
                             f"bool, None, tuple or list of those), got {ast.get_source_segment(source, node.value)!r}; "
                             "derive values in the config cell, not in the parameters cell") from err
    return out


def read_parameters(path: str | Path) -> list[tuple[str, Any, str]]:
    """(name, value, source) of a notebook's parameters in the order they apply: its `parameters`
    cell, then papermill's `injected-parameters` cell of an executed copy (its `-p` values)."""
    import nbformat

    path = Path(path)
    if not path.is_file():
        avail = sorted(p.stem for p in path.parent.glob("*.ipynb")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"notebook {path} not found; notebooks in {path.parent}: {avail or 'none'}")
    nb = nbformat.read(path, as_version=4)
    tagged = {t: [c for c in nb.cells if c.cell_type == "code" and t in c.metadata.get("tags", [])]
              for t in ("parameters", "injected-parameters")}
    if len(tagged["parameters"]) != 1:
        raise ValueError(f"{path.name}: expected exactly one cell tagged 'parameters', found {len(tagged['parameters'])}")
    rows = []
    for tag, source in (("parameters", "parameters cell"), ("injected-parameters", "injected (papermill -p)")):
        for cell in tagged[tag]:
            rows += [(k, v, source) for k, v in _literal_assignments(cell.source, f"{path.name} ({tag})").items()]
    return rows


def preset_defaults_file(preset: str) -> Path:
    return PARAMS_DIR / f"{preset}.yaml"


def preset_defaults(preset: str, name: str | None = None) -> dict[str, Any]:
    """The CPU-sized defaults of `preset` (`notebooks/params/<preset>.yaml`): for one notebook (`name`,
    e.g. '02_classify') or, with `name` None, the whole file ({notebook: {parameter: value}}). A preset
    without a file has none ({}). A malformed file is an error that names it."""
    import yaml

    path = preset_defaults_file(preset)
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or any(not isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of notebook name -> {{parameter: value}}")
    known = sorted(p.stem for p in _config.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))
    bad = sorted(set(data) - set(known))
    if bad:
        raise ValueError(f"{path}: unknown notebooks {bad}; notebooks: {known}")
    if name is None:
        return data
    return dict(data.get(name.removesuffix(".ipynb"), {}))


def notebook_params(name: str, overrides: dict | None = None, folder: str | Path | None = None) -> dict[str, Any]:
    """The parameters notebook `name` (e.g. '01_probe') runs with: its `parameters` cell (literals only),
    then the run's preset defaults (`preset_defaults`), then an executed copy's injected values, then
    `overrides` (05's preset, model, seed), so that 05 rebuilds exactly the config the notebook used.
    Unknown parameter names (in the overrides or the preset's file) are an error."""
    path = notebook_folder(folder) / (name if name.endswith(".ipynb") else f"{name}.ipynb")
    rows = read_parameters(path)
    cell = {k: v for k, v, src in rows if src == "parameters cell"}
    injected = {k: v for k, v, src in rows if src != "parameters cell"}
    preset = (overrides or {}).get("preset") or injected.get("preset") or cell.get("preset") or _config.DEFAULT_PRESET
    defaults = preset_defaults(str(preset), path.stem)
    for source, values in ((f"{preset_defaults_file(str(preset)).name} ({path.stem})", defaults),
                           ("overrides", overrides or {})):
        unknown = sorted(set(values) - set(cell) - set(injected))
        if unknown:
            raise ValueError(f"{path.name} has no parameter {unknown[0]!r} (from {source}); its parameters: "
                             f"{', '.join(cell)}")
    params = dict(cell)
    params.update(defaults)
    params.update(injected)
    params.update(overrides or {})
    return params


def _main(argv: list[str]) -> int:
    """`python -m ssah_utils.nbparams yaml PRESET NOTEBOOK`: the preset's defaults for one notebook as a
    papermill parameters file (YAML, `{}` when there are none), on stdout; the Makefile passes it with -f."""
    import yaml

    if len(argv) != 3 or argv[0] != "yaml":
        print("usage: python -m ssah_utils.nbparams yaml PRESET NOTEBOOK", file=sys.stderr)
        return 2
    try:
        _config.get_preset(argv[1])
        name = Path(argv[2]).stem
        values = preset_defaults(argv[1], name)
        cell = {k for k, _, src in read_parameters(_config.NOTEBOOKS_DIR / f"{name}.ipynb") if src == "parameters cell"}
        unknown = sorted(set(values) - cell)
        if unknown:
            raise ValueError(f"{preset_defaults_file(argv[1])}: {name} has no parameter(s) {unknown}")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump(values, sort_keys=False) if values else "{}\n")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
