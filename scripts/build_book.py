"""Assemble the static book's sources from the committed results, and build it with Jupyter Book (offline).

The book is read without running anything: the executed notebooks of every tier (the organism's in
notebooks/, SmolLM2-135M's in results/smollm2-135m/notebooks/), the claims scorecards and the
claim-by-claim comparison, the model cards, the second family's reports (results/gemma3-270m/), the judges'
agreement study, and the course kit (its guide and the list of exercises). Nothing is executed
(`execute_notebooks: off`): the pages show the outputs the notebooks were committed with.

Links between included files are rewritten to point at their pages in the book; a relative link to a file the
book does not include becomes its repository path in code font (a static site cannot serve it), so that every
link in the built site resolves. `scripts/check_book.py` then opens every page in headless Chromium.

Usage:
    python scripts/build_book.py sources OUT_DIR     # write the book's sources (markdown, notebooks, _toc.yml)
    python scripts/build_book.py build OUT_DIR BIN   # sources, then the site into OUT_DIR/html (BIN: the bin/
                                                     # folder holding jupyter-book and sphinx-build)
`make book` runs the second with the book's own environment (.venv-book) into build/book/.
"""

from __future__ import annotations

import csv
import json
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NOTEBOOKS = ("01_probe", "02_classify", "03_freeze_finetune", "04_alignment_budget", "05_figures")

# (book page without suffix, repository file): markdown and notebooks copied into the book, in reading order.
PARTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("The model organism (0.9M parameters, synthetic world)",
     [(f"organism/{nb}", f"notebooks/{nb}.ipynb") for nb in NOTEBOOKS]
     + [("organism/model_card", "data/organism/README.md")]),
    ("SmolLM2-135M-Instruct, aligned by the project (real tier, CPU)",
     [(f"smollm2/{nb}", f"results/smollm2-135m/notebooks/{nb}.ipynb") for nb in NOTEBOOKS]
     + [("smollm2/model_card", "results/smollm2-135m/model_card.md")]),
    ("Gemma-3-270M (a second family, pre-trained base)",
     [("gemma3/first_look", "results/gemma3-270m/first_look.md"),
      ("gemma3/units_and_cost", "results/gemma3-270m/units_and_cost.md"),
      ("gemma3/budget", "results/gemma3-270m/budget.md")]),
    ("Claims and judges",
     [("claims/by_tier", "docs/claims_by_tier.md"), ("claims/judges", "docs/judges/README.md")]),
    ("Course kit", [("course/guide", "course/GUIDE.md")]),
]
SCORECARDS = [("organism", "tables/claims_scorecard.csv"), ("SmolLM2-135M", "results/smollm2-135m/tables/claims_scorecard.csv")]
CONFIG = """\
title: "ssah: the Superficial Safety Alignment Hypothesis, reproduced"
author: the ssah developers
copyright: ""
only_build_toc_files: true
execute:
  execute_notebooks: "off"
html:
  use_repository_button: false
  use_issues_button: false
  use_edit_page_button: false
launch_buttons:
  notebook_interface: ""
  binderhub_url: ""
  colab_url: ""
  thebe: false
sphinx:
  config:
    html_show_copyright: false
    html_show_sphinx: false
    suppress_warnings: ["myst.header", "mystnb.unknown_mime_type"]
"""
OFFLINE_DROP = ("sphinx_thebe", "sphinx_comments", "sphinx.ext.intersphinx")
LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s]+)\)")
IMAGE = re.compile(r"!\[([^\]\n]*)\]\(([^)\s]+)\)")


def included() -> dict[str, str]:
    """Repository path -> book page (without suffix) of every included file that exists."""
    out = {}
    for _, pages in PARTS:
        for page, src in pages:
            if (ROOT / src).is_file():
                out[src] = page
    return out


def rewrite_links(text: str, src: str, pages: dict[str, str], page: str, images: dict[str, str]) -> str:
    """Links of `text` (markdown of repository file `src`, placed at book page `page`): to an included file ->
    its page; external or in-page -> kept; anything else -> the repository path in code font. Relative
    images are copied (recorded in `images`: book path -> repository path) and pointed at."""
    here = posixpath.dirname(src)
    page_dir = posixpath.dirname(page)

    def target_of(url: str) -> tuple[str, str]:
        path, _, frag = url.partition("#")
        return posixpath.normpath(posixpath.join(here, path)), frag

    def image(m: re.Match) -> str:
        alt, url = m.group(1), m.group(2)
        if re.match(r"^[a-z]+:", url) or url.startswith("data:"):
            return m.group(0)
        path, _ = target_of(url)
        if not (ROOT / path).is_file():
            return f"*(image `{path}` is not in the repository)*"
        dest = f"_repo/{path}"
        images[dest] = path
        return f"![{alt}]({posixpath.relpath(dest, page_dir or '.')})"

    def link(m: re.Match) -> str:
        label, url = m.group(1), m.group(2)
        if re.match(r"^[a-z]+:", url) or url.startswith("#"):
            return m.group(0)
        path, frag = target_of(url)
        if path in pages:
            rel = posixpath.relpath(pages[path], page_dir or ".")
            return f"[{label}]({rel}.{'ipynb' if path.endswith('.ipynb') else 'md'}{'#' + frag if frag else ''})"
        shown = path if path != "." else "the repository"
        return label if label.strip("`") == shown else f"{label} (`{shown}`)"

    return LINK.sub(link, IMAGE.sub(image, text))


def scorecard_page() -> str:
    lines = ["# Claims scorecards", "",
             "Each claim of the paper, the rule that decides it, the number a run measured and the verdict, per tier "
             "(written by 05_figures into the tier's `claims_scorecard.csv`).", ""]
    for tier, path in SCORECARDS:
        f = ROOT / path
        if not f.is_file():
            continue
        with f.open(encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        cols = [c for c in ("id", "claim", "paper", "run", "control", "verdict") if rows and c in rows[0]]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.get("verdict", "")] = counts.get(r.get("verdict", ""), 0) + 1
        lines += [f"## {tier}", "", f"`{path}`: {len(rows)} claims; "
                  + ", ".join(f"{v or '(none)'}: {n}" for v, n in sorted(counts.items())) + ".", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def exercises_page() -> str:
    from ssah_utils import course

    lines = ["# Exercises", "", "Every exercise of the course kit (`ssah_utils.course.EXERCISES`): the notebook it sits "
             "in, what the student writes, and its checker. `make course` builds the student copies.", "",
             "| id | notebook | the student writes | goal | difficulty | minutes |", "|---|---|---|---|---|---|"]
    for ex in course.EXERCISES.values():
        lines.append(f"| {ex.id} | {ex.notebook} | `{ex.function}` | {ex.goal} | {ex.difficulty} | {ex.minutes} |")
    return "\n".join(lines) + "\n"


def intro_page(pages: dict[str, str]) -> str:
    inv = {v: k for k, v in pages.items()}
    first = [p for p in ("organism/01_probe", "smollm2/01_probe") if p in inv]
    lines = ["# ssah: the Superficial Safety Alignment Hypothesis, reproduced", "",
             "This book is the read-only face of the `ssah` repository: every page below is a committed result of a "
             "run (executed notebooks, tables, model cards), shown as it was committed; nothing here is recomputed "
             "when the book is built. To rerun a page, clone the repository and use `make reproduce` (the organism, "
             "about 25 minutes on 2 cores) or `make reproduce PRESET=smollm2-135m` (the real tier, hours).", "",
             "The paper (Li & Kim, ICLR 2026) claims that safety alignment teaches a capable model a binary choice, "
             "fulfil or refuse, made at the start of the answer; that the choice lives in a few exclusive safety "
             "units; that freezing them during fine-tuning keeps a model safe; and that a base model's redundant "
             "units are enough to align it. Each tier runs the same five notebooks: 01 probes where the choice is "
             "made, 02 classifies units, 03 freezes them during fine-tuning attacks, 04 aligns a base through its "
             "redundant units, 05 gathers the figures and scores every claim.", "",
             "Start with " + " or ".join(f"[{p.split('/')[0]}'s first notebook]({p}.ipynb)" for p in first)
             + ", or go straight to the [claims scorecards](claims/scorecards.md).", ""]
    return "\n".join(lines)


def write_sources(out: Path) -> Path:
    """Write the book's sources into `out` (emptied first) and return it."""
    pages = included()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    images: dict[str, str] = {}
    toc_parts = []
    for caption, items in PARTS:
        chapters = []
        for page, src in items:
            if src not in pages:
                continue
            dest = out / (page + Path(src).suffix)
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = (ROOT / src).read_text(encoding="utf-8")
            if src.endswith(".ipynb"):
                nb = json.loads(text)
                for cell in nb["cells"]:
                    tags = cell.setdefault("metadata", {}).setdefault("tags", [])
                    if cell["cell_type"] == "code" and "solution" in tags and "hide-input" not in tags:
                        tags.append("hide-input")  # an exercise's answer stays folded until the reader opens it
                    if cell["cell_type"] == "markdown":
                        body = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                        cell["source"] = rewrite_links(body, src, pages, page, images)
                dest.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")
            else:
                dest.write_text(rewrite_links(text, src, pages, page, images), encoding="utf-8")
            chapters.append(page)
        if caption == "Claims and judges":
            (out / "claims").mkdir(exist_ok=True)
            (out / "claims" / "scorecards.md").write_text(scorecard_page(), encoding="utf-8")
            chapters.insert(0, "claims/scorecards")
        if caption == "Course kit":
            (out / "course").mkdir(exist_ok=True)
            (out / "course" / "exercises.md").write_text(exercises_page(), encoding="utf-8")
            chapters.append("course/exercises")
        if chapters:
            toc_parts.append((caption, chapters))
    for dest, src in images.items():
        (out / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / src, out / dest)
    (out / "intro.md").write_text(intro_page(pages), encoding="utf-8")
    toc = ["format: jb-book", "root: intro", "parts:"]
    for caption, chapters in toc_parts:
        toc += [f"  - caption: {json.dumps(caption)}", "    chapters:"] + [f"      - file: {c}" for c in chapters]
    (out / "_toc.yml").write_text("\n".join(toc) + "\n", encoding="utf-8")
    (out / "_config.yml").write_text(CONFIG, encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("sources", "build") or (argv[0] == "build" and len(argv) != 3):
        print(__doc__, file=sys.stderr)
        return 2
    src = write_sources(Path(argv[1]) / "src")
    print(f"[book] sources in {src}", flush=True)
    if argv[0] == "build":
        bindir = Path(argv[2])
        html = Path(argv[1]) / "html"
        if html.exists():
            shutil.rmtree(html)
        # Jupyter Book writes the Sphinx configuration; the extensions that reach the network (thebe's and the
        # comments' scripts, intersphinx's inventories) are left out so that the build and the site work offline.
        r = subprocess.run([str(bindir / "jupyter-book"), "config", "sphinx", str(src)], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout + r.stderr, file=sys.stderr)
            return r.returncode
        conf = src / "conf.py"
        text = conf.read_text(encoding="utf-8")
        for ext in OFFLINE_DROP:
            if f"'{ext}', " not in text:
                raise SystemExit(f"[book] expected the extension {ext!r} in {conf}; the Jupyter Book version changed?")
            text = text.replace(f"'{ext}', ", "")
        conf.write_text(text, encoding="utf-8")
        tmp = Path(argv[1]) / "_html.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        r = subprocess.run([str(bindir / "sphinx-build"), "-q", "-b", "html", "-W", "-n", "--keep-going", str(src), str(tmp)])
        if r.returncode != 0:
            print("[book] Sphinx reported warnings or errors (above); the site is not published", file=sys.stderr)
            return r.returncode
        tmp.rename(html)
        print(f"[book] built {html}/index.html", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
