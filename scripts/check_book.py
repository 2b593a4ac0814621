"""Open every page of the built book in headless Chromium and check that it renders: a title and body text,
every image loaded (complete, with a width), and every link inside the site resolving to an existing page (and
anchor, when it names one). External links are listed, not fetched (the machine may be offline).

Usage:
    python scripts/check_book.py HTML_DIR [--chromium /usr/bin/chromium]   # exit 1 listing every problem
    python scripts/check_book.py --self-test [--chromium ...]             # the checker finds planted faults

Needs Playwright (`pip install playwright`; its own browser download is not used) and a Chromium binary:
Debian's `chromium` package (`apt-get install chromium`), or --chromium / $SSAH_CHROMIUM.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

PAGE_JS = """() => ({
  title: document.title,
  text: (document.querySelector('main') || document.body).innerText.trim().length,
  images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0})),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id).concat(
       Array.from(document.querySelectorAll('a[name]')).map(e => e.name)),
})"""


def find_chromium(given: str | None) -> str:
    for c in (given, os.environ.get("SSAH_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
              shutil.which("google-chrome")):
        if c and Path(c).is_file():
            return c
    raise SystemExit("no Chromium found: install Debian's `chromium` (apt-get install chromium) or pass --chromium PATH")


def check(html_dir: Path, chromium: str) -> tuple[int, list[str], int]:
    """(pages checked, problems, external links seen)."""
    from playwright.sync_api import sync_playwright

    root = html_dir.resolve()
    pages = sorted(p for p in root.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)
    problems: list[str] = []
    ids: dict[Path, set[str]] = {}
    links: list[tuple[Path, str]] = []
    external = 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        for p in pages:
            html = p.read_text(encoding="utf-8", errors="replace")
            refresh = re.search(r'http-equiv="refresh"[^>]*url=([^"\'>]+)', html, re.I)
            if refresh:  # a redirect page (index.html -> the root page): check where it points, do not follow it
                links.append((p, (p.parent / refresh.group(1).strip()).resolve().as_uri()))
                ids[p] = set()
                continue
            errors.clear()
            page.goto(p.as_uri(), wait_until="load")
            info = page.evaluate(PAGE_JS)
            rel = p.relative_to(root)
            if p.name not in ("genindex.html", "search.html", "index.html") and (not info["title"] or info["text"] < 20):
                problems.append(f"{rel}: renders no title or no text")
            for img in info["images"]:
                if not img["ok"]:
                    problems.append(f"{rel}: image did not load: {img['src']}")
            for e in errors:
                problems.append(f"{rel}: script error: {e}")
            ids[p] = set(info["ids"])
            links += [(p, href) for href in info["links"]]
        browser.close()
    for p, href in links:
        u = urlparse(href)
        if u.scheme in ("http", "https", "mailto"):
            external += 1
            continue
        if u.scheme != "file":
            problems.append(f"{p.relative_to(root)}: link with scheme {u.scheme!r}: {href}")
            continue
        target = Path(unquote(u.path))
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"{p.relative_to(root)}: broken link to {href}")
        elif u.fragment and target in ids and u.fragment not in ids[target]:
            problems.append(f"{p.relative_to(root)}: link to a missing anchor #{u.fragment} of {target.name}")
    return len(pages), problems, external


def self_test(chromium: str) -> int:
    """A tiny site with one good page and one with a broken link, a missing anchor and a missing image: the
    checker must pass the first and report each fault of the second."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                            "1f15c4890000000d49444154789c6360000002000100ffff03000006000557bfabd40000000049454e44ae426082")
        (d / "ok.png").write_bytes(png)
        (d / "good.html").write_text("<html><head><title>Good</title></head><body><main><h1 id='top'>A good page</h1>"
                                     "<p>Some text on it.</p><img src='ok.png'><a href='bad.html'>bad</a>"
                                     "<a href='good.html#top'>top</a></main></body></html>")
        (d / "bad.html").write_text("<html><head><title>Bad</title></head><body><main><p>A page with faults.</p>"
                                    "<img src='missing.png'><a href='nowhere.html'>x</a><a href='good.html#nope'>y</a>"
                                    "</main></body></html>")
        n, problems, _ = check(d, chromium)
        want = ["bad.html: image did not load", "bad.html: broken link", "bad.html: link to a missing anchor #nope"]
        missing = [w for w in want if not any(p.startswith(w) for p in problems)]
        extra = [p for p in problems if not p.startswith("bad.html")]
        if n != 2 or missing or extra:
            print(f"self-test FAILED: pages {n}, missing reports {missing}, unexpected {extra}", file=sys.stderr)
            return 1
    print("self-test passed: the checker reports a missing image, a broken link and a missing anchor, and passes a good page")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html_dir", nargs="?")
    ap.add_argument("--chromium")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args(argv)
    chromium = find_chromium(a.chromium)
    if a.self_test:
        return self_test(chromium)
    if not a.html_dir or not (Path(a.html_dir) / "index.html").is_file():
        ap.error(f"{a.html_dir!r} holds no built book (index.html); run `make book` first")
    n, problems, external = check(Path(a.html_dir), chromium)
    for p in problems:
        print(f"FAIL {p}")
    print(f"[book] {n} pages opened in headless Chromium; {len(problems)} problems; {external} external links not fetched")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
