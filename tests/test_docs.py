"""The README: its table of the real study says what that committed study (docs/smollm2-study)
measured, and its reading path points at the code it names."""

import csv
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "docs" / "smollm2-study"


def shown_equal(text: str, value: float) -> bool:
    """A figure as printed ('12.89', '−0.41', '119') is value rounded to the digits shown."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return abs(float(text.replace("−", "-")) - value) <= 0.5 * 10**-decimals + 1e-9


def readme_row(label: str) -> list[list[str]]:
    """The numbers of each cell of the README table row starting with label."""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f"| {label} |"):
            return [
                re.findall(r"[−-]?\d+(?:\.\d+)?", cell) for cell in line.strip("|").split("|")[1:]
            ]
    pytest.fail(f"README has no table row '{label}'")


def study_tables():
    claim = {r["source"]: r for r in csv.DictReader(open(STUDY / "tables" / "claim.csv"))}
    ppl = {
        (r["variant"], r["step_type"]): r
        for r in csv.DictReader(open(STUDY / "tables" / "table5.csv"))
    }
    answers = json.loads((STUDY / "study.json").read_text())["answers"]
    return claim, ppl, answers


@pytest.mark.parametrize(
    "variant,label", [("paper", "minroute `paper`, 3 seeds"), ("noreg", "minroute `noreg`, 1 seed")]
)
def test_readme_study_table_is_the_committed_study(variant, label):
    claim, ppl, answers = study_tables()
    claim = claim[f"minroute {variant}"]
    cells = readme_row(label)
    for cell, key in zip(cells[:3], ("skip_tool", "skip_planning", "diff")):
        assert shown_equal(cell[0], float(claim[key])), (
            f"{label}: README {key} {cell[0]} vs study {claim[key]}"
        )
    if not math.isnan(float(claim["diff_ci_low"])):
        assert shown_equal(cells[2][1], float(claim["diff_ci_low"])) and shown_equal(
            cells[2][2], float(claim["diff_ci_high"])
        )
    full, gated = cells[3][0], cells[3][1]
    tool = ppl[(variant, "tool")]
    assert shown_equal(full, float(tool["ppl_full"])) and shown_equal(
        gated, float(tool["ppl_gated"])
    ), cells[3]
    # answers: all blocks open -> gated, BFCL AST and GSM8K
    for cell, task in ((cells[4], "bfcl"), (cells[5], "gsm8k")):
        for shown, method in zip(cell[:2], ("full", "gated")):
            got = answers[f"{variant} / {method}"][task]["pct"]
            assert shown_equal(shown, got), f"{label}: README {task} {method} {shown} vs {got}"


def test_readme_lora_only_row_is_the_committed_study():
    """LoRA alone has no routers: no skip cells, its one gate setting (every block open)."""
    _, ppl, answers = study_tables()
    cells = readme_row("minroute `lora-only`, 1 seed")
    assert cells[:3] == [[], [], []], cells
    assert shown_equal(cells[3][0], float(ppl[("lora-only", "tool")]["ppl_full"])), cells[3]
    for cell, task in ((cells[4], "bfcl"), (cells[5], "gsm8k")):
        assert shown_equal(cell[0], answers["lora-only / full"][task]["pct"]), (task, cell)


def test_reading_path_points_at_the_code_it_names():
    """README's "Read the code in this order": each row's file exists; a row naming a function or
    class and a line range holds that definition inside the range, the range ends at the
    definition's end, and the total stays near the promised ~700 lines."""
    import ast

    text = (ROOT / "README.md").read_text()
    section = text.split("## Read the code in this order", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if re.match(r"\| \d \|", r)]
    assert 3 <= len(rows) <= 5, rows
    total = 0
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        path = ROOT / re.search(r"\(([^)]+)\)", cells[1]).group(1)
        assert path.is_file(), path
        n_lines = len(path.read_text().splitlines())
        if cells[2].startswith("all"):
            assert int(cells[2].split(",")[1]) == n_lines, (path, n_lines)
            total += n_lines
            continue
        names = re.findall(r"`(\w+)`", cells[2])
        a, b = (int(x) for x in re.search(r"(\d+)\D(\d+)", cells[2]).groups())
        defs = {
            node.name: (node.lineno, node.end_lineno)
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))
        }
        assert defs[names[0]][0] == a, (path, names[0], defs[names[0]], a)
        assert max(end for start, end in defs.values() if a <= start <= b) == b, (path, a, b)
        total += b - a + 1
    assert total <= 760, f"the reading path is {total} lines"
