"""The side-by-side table of a board under two protocol versions (bench/studies/versions.py)."""
import shutil
from pathlib import Path

from invbench.studies import versions

QUICK = Path(__file__).resolve().parents[1] / "leaderboards" / "quick"


def test_every_old_entry_gets_a_row_and_a_rerun_one_is_compared(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(QUICK, old)
    shutil.copytree(QUICK, new)
    for path in new.glob("gaussian-sigma-1-5*.json"):
        path.unlink()  # not rerun under the new version
    text = versions.table(old, new)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "4 of 5 entries rerun" in text
    assert "| not rerun yet |" in rows["gaussian-sigma-1-5"]
    same = rows["no-defence"].split(" | ")
    assert same[1] == same[2] == "leaks" and same[5] == "yes"  # the same entry: same verdict, inside its own interval
    assert same[3] == same[4] and same[3].startswith("1.000 [")  # value and 95% interval
    assert same[-1].rstrip(" |") == "yes"  # its committed verification record still holds
