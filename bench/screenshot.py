"""A PNG of a local page (the leaderboard's index.html) in headless Chromium, to look at and commit.

    python -m invbench.screenshot leaderboards/c4-smollm2-10tok/index.html docs/leaderboard.png [--width 1600]

Needs Debian's `chromium` (the browser test's); the page needs no network (its CSP allows none).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def screenshot(page: Path, out: Path, *, width: int = 1600, height: int = 2200) -> Path:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("error: no chromium on PATH (apt-get install chromium)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="invbench-chromium-") as profile:
        subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={out.resolve()}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m invbench.screenshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=2200)
    args = parser.parse_args(argv)
    print(screenshot(args.page, args.out, width=args.width, height=args.height))


if __name__ == "__main__":
    main()
