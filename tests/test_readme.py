"""What the front page shows stays true: the README's example of the layer and the builder runs
as it is written, and every results table in README.md and docs/ is what `python plot.py
--tables` makes from the results files (so no number in them is typed by hand)."""
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, user_env

import plot  # noqa: E402

EXAMPLE = re.compile(r"<!-- example: run by tests/test_readme.py -->\s*```python\n(.*?)```", re.S)


def readme_example(text):
    found = EXAMPLE.findall(text)
    assert len(found) == 1, "README.md holds one example marked for this test"
    return found[0]


def test_the_readmes_example_runs_as_written(tmp_path):
    code = readme_example((REPO / "README.md").read_text())
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                            env=user_env(PYTHONPATH=REPO), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_wrong_example_fails(tmp_path):
    """The test above can fail: the same example with 5 groups (which do not divide 16
    channels) stops with the builder's own error."""
    code = readme_example((REPO / "README.md").read_text())
    broken = code.replace("groups=8", "groups=5", 1)
    assert broken != code
    result = subprocess.run([sys.executable, "-c", broken], cwd=tmp_path,
                            env=user_env(PYTHONPATH=REPO), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "groups should divide every stage's width" in result.stderr


def test_the_tables_are_what_the_results_files_give():
    assert plot.update_tables(check=True) == []
    names = {m.group(2) for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]
             for m in plot.BLOCK.finditer(doc.read_text())}
    assert names == set(plot.TABLES), "every table is in the docs, once or more"


def copy_of_the_docs(root):
    """README.md, docs/ and the results files, in a folder of their own."""
    for name in ["README.md", "results.csv", "docs", "results"]:
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    return root


def test_a_number_changed_by_hand_is_found_and_rewritten(tmp_path, capsys):
    root = copy_of_the_docs(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    block = next(b for b in plot.BLOCK.finditer(text) if b.group(2) == "figure1")
    number = re.search(r"\d+\.\d\d", block.group(3)).group(0)
    wrong = text[:block.start(3)] + block.group(3).replace(number, "99.99", 1) + text[block.end(3):]
    readme.write_text(wrong)
    assert plot.update_tables(root, check=True) == [("README.md", block.group(2))]
    assert readme.read_text() == wrong, "--check writes nothing"
    assert plot.update_tables(root) == [("README.md", block.group(2))]
    assert readme.read_text() == text


def test_the_command_says_which_table_is_stale(tmp_path):
    root = copy_of_the_docs(tmp_path)
    (root / "plot.py").write_text((REPO / "plot.py").read_text())
    for name in ("gnrepro", "layer.py"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    stale = root / "results.csv"
    lines = stale.read_text().splitlines(keepends=True)
    cells = lines[1].split(",")
    column = lines[0].split(",").index("median_last5_error")
    cells[column] = "1.23"   # one run's number, not what its record gave
    stale.write_text("".join([lines[0], ",".join(cells), *lines[2:]]))
    result = subprocess.run([sys.executable, "plot.py", "--tables", "--check"], cwd=root,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "README.md: table figure1 is not what its results file gives" in result.stderr


@pytest.mark.parametrize("cells, want", [([55.0], "55.00"), ([], "-"),
                                         ([1.0, 3.0], "2.00 \u00b1 1.41 (n=2)")])
def test_a_cell_shows_mean_sd_and_the_number_of_seeds(cells, want):
    assert plot.summary(cells) == want


def test_the_front_page_says_in_its_first_lines_how_many_runs_are_done(tmp_path):
    """The status line is generated from results.csv: fewer rows, a smaller count."""
    lines = (REPO / "README.md").read_text().splitlines()
    head = "\n".join(lines[:15])
    assert re.search(r"\*\*Status: \d+ of Figure 1's 30 paper-scale runs are done\*\*", head)
    assert "<!-- table figure1-status -->" in head
    assert "| BN |" in "\n".join(lines[:20]) and "| GN |" in "\n".join(lines[:20])
    root = copy_of_the_docs(tmp_path)
    import pandas as pd
    df = pd.read_csv(root / "results.csv")
    before = plot.table_text("figure1-status", root)
    count = int(re.search(r"Status: (\d+) of", before).group(1))
    assert count == len(df[(df.workers == 8) & (df.epochs == 100)])
    df[df.norm != "gn"].to_csv(root / "results.csv", index=False)   # the GN runs gone
    assert plot.update_tables(root, check=True) == [("README.md", "figure1-status"),
                                                    ("README.md", "figure1")]
    plot.update_tables(root)
    after = (root / "README.md").read_text()
    gn_done = len(df[(df.norm == "gn") & (df.workers == 8) & (df.epochs == 100)])
    assert f"Status: {count - gn_done} of Figure 1's 30" in after
    assert "| GN | \u2013 | \u2013 | \u2013 | \u2013 | \u2013 |" in after
    assert "So far, BN \u2212 GN" not in after                      # no pair of BN and GN


def test_the_status_gives_bn_minus_gn_where_both_ran():
    import pandas as pd
    rows = [dict(norm=norm, groups=8, batch_size=32, workers=8, epochs=100, seed=seed,
                 moving_statistics="first" if norm == "bn" else "", median_last5_error=err)
            for norm, seed, err in [("bn", 1, 13.0), ("bn", 2, 14.0), ("gn", 1, 15.0),
                                    ("gn", 2, 15.0), ("gn", 3, 99.0)]]
    status = plot.figure1_status(pd.DataFrame(rows))
    assert "**Status: 5 of Figure 1's 30 paper-scale runs are done**" in status
    assert ("So far, BN \u2212 GN per seed, in points (below 0: GN is worse): -1.50 \u00b1 0.71 "
            "(n=2) at N = 32 (the paper's -0.5).") in status
    assert "BN's rise at 8, 4 and 2 images per worker, the paper's claim, has no result yet." \
        in status
    small = [dict(rows[0], batch_size=n, seed=1, norm=norm, median_last5_error=err)
             for n, norm, err in [(2, "bn", 16.5), (2, "gn", 15.0), (4, "bn", 14.0)]]
    status = plot.figure1_status(pd.DataFrame(rows + small))
    assert "the paper's claim, has results at N = 4 and 2." in status
    assert "-1.50 \u00b1 0.71 (n=2) at N = 32 (the paper's -0.5), +1.50 at N = 2 (the paper's +10.6)." \
        in status
    assert "the whole curve" not in status
    curve = [dict(rows[0], batch_size=n, seed=seed, norm=norm, median_last5_error=15.0)
             for n in (16, 8, 4, 2) for norm in ("bn", "gn") for seed in (1, 3)]
    status = plot.figure1_status(pd.DataFrame(rows + curve))
    assert "Seed 1 has the whole curve: BN and GN at every N." in status   # seed 3: no BN at 32
    status = plot.figure1_status(pd.DataFrame(rows + curve + [dict(rows[0], seed=3)]))
    assert "Seeds 1 and 3 have the whole curve: BN and GN at every N." in status

