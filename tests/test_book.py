"""The static book's sources (scripts/build_book.py): links rewritten so that every one resolves in the site,
every tier's executed notebooks and the scorecards included. The site itself is built and opened in headless
Chromium by `make test-book` (part of `make test`)."""

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("build_book", REPO / "scripts" / "build_book.py")
bb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bb)


def test_links_point_at_book_pages_or_become_repository_paths():
    pages = {"notebooks/01_probe.ipynb": "organism/01_probe", "course/GUIDE.md": "course/guide",
             "docs/claims_by_tier.md": "claims/by_tier"}
    images: dict[str, str] = {}
    text = ("See [01](../notebooks/01_probe.ipynb#step-2), [the claims](../docs/claims_by_tier.md), "
            "[the code](../ssah_utils/course.py), [`Makefile`](../Makefile), [web](https://arxiv.org/abs/1) "
            "and [here](#top). ![fig](../figures/nope.png)")
    out = bb.rewrite_links(text, "course/GUIDE.md", pages, "course/guide", images)
    assert "[01](../organism/01_probe.ipynb#step-2)" in out
    assert "[the claims](../claims/by_tier.md)" in out
    assert "the code (`ssah_utils/course.py`)" in out and "](../ssah_utils" not in out
    assert "`Makefile`" in out and "(../Makefile)" not in out
    assert "[web](https://arxiv.org/abs/1)" in out and "[here](#top)" in out
    assert "image `figures/nope.png` is not in the repository" in out and not images


def test_a_repository_image_is_copied_and_pointed_at():
    figs = sorted((REPO / "figures").glob("*.png"))
    assert figs, "the organism's committed figures are missing"
    images: dict[str, str] = {}
    out = bb.rewrite_links(f"![a figure](../figures/{figs[0].name})", "docs/x.md", {}, "claims/by_tier", images)
    assert out == f"![a figure](../_repo/figures/{figs[0].name})"
    assert images == {f"_repo/figures/{figs[0].name}": f"figures/{figs[0].name}"}


def test_sources_hold_every_tier_and_a_toc_that_names_only_existing_pages(tmp_path):
    src = bb.write_sources(tmp_path / "src")
    toc = (src / "_toc.yml").read_text()
    files = [line.split("file: ")[1] for line in toc.splitlines() if "file: " in line]
    for nb in bb.NOTEBOOKS:
        assert f"organism/{nb}" in files and f"smollm2/{nb}" in files
    assert "claims/scorecards" in files and "course/guide" in files and "course/exercises" in files
    for f in files:
        assert (src / f"{f}.md").is_file() or (src / f"{f}.ipynb").is_file(), f
    nb = json.loads((src / "organism" / "02_classify.ipynb").read_text())
    assert any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "executed outputs were dropped"
    answers = [c for c in nb["cells"] if "solution" in c["metadata"].get("tags", [])]
    assert answers and all("hide-input" in c["metadata"]["tags"] for c in answers), "an exercise answer is not folded"
    card = (src / "claims" / "scorecards.md").read_text()
    assert "## organism" in card and "## SmolLM2-135M" in card
    assert card.count("| id | claim | paper | run | control | verdict |") == 2
