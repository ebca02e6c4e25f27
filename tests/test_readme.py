"""The README cannot drift from what it documents or quotes.

Its configuration reference is the schema's own documentation (medpeft.config.docs);
``python tests/test_readme.py --write`` rewrites those tables in place.

Its measured figures are the results files'. A block of README.md (a paragraph, a list item or a
table; code fences are skipped) that cites results files (`benchmarks/results/NAME.md`, a glob such
as `benchmarks/results/lora_costs*.md`, or, in backticks, a bare `NAME.md` of that folder) may quote
only figures those files hold: a figure in a sentence that cites files is looked up in those files, any
other in the files of the whole block. A figure is a number outside backticks (code spans hold config values
and commands) that has a decimal point (0.957, +1.24, 1.7x) or is followed by %, x or a unit of time,
memory or speed (65%, 90x, 297 s, 1,475 MB, 214 GFLOP/s); both ends of a range (65-66%, 2.2-2.5x) are
figures; plain integers (2 cores, 3 seeds, ViT-B/16, 3,651 images) are not. A figure written with d
decimals matches a number f of a cited file, its .md or its .json sibling, when f, 100 f or f / 100
rounds to it at d decimals (|f - figure| <= half a unit of its last digit): 0.957 matches 0.9569273,
95.7 matches 0.9569, 297 s matches 296.7. The sign is not compared. A cited file that does not exist
is an error. A block whose figures come from elsewhere (a paper) cites no results file, or says why
in an HTML comment `<!-- figures: REASON -->`, which exempts it."""

from __future__ import annotations

import bisect
import functools
import re
import sys
from pathlib import Path

from medpeft.config.docs import key_tables as run_key_tables
from medpeft.files import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"


def key_tables() -> dict[str, str]:
    """The run config's tables, and the generate config's and a generative study's (when diffusers is
    installed)."""
    try:
        from medpeft.generate.config import key_tables as generate_key_tables
    except ImportError:
        return run_key_tables()
    from medpeft.config.docs import section_table
    from medpeft.study.spec import StudyEvaluation

    return {**run_key_tables(), **generate_key_tables(), "study.generate": section_table(StudyEvaluation, "generate.")}


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- keys:{re.escape(name)} -->\n)(.*?)(<!-- /keys:{re.escape(name)} -->)", re.S)


def rendered(text: str) -> str:
    """`text` with every marked table replaced by the schema's."""
    for name, table in key_tables().items():
        text, found = _block(name).subn(lambda m, table=table: m.group(1) + table + "\n" + m.group(3), text)
        assert found == 1, f"README.md has no (or more than one) <!-- keys:{name} --> block"
    return text


CITATION = re.compile(r"benchmarks/results/([\w*.-]+\.md)\b|`([\w*.-]+\.md)`")
EXEMPT = re.compile(r"<!-- figures: .+? -->")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`*])")
FIGURE = re.compile(
    r"(?<![\w.])(?<![A-Za-z]/)"  # not part of a name: fp32, v0.1, ViT-B/16
    r"(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?:(?:-| to )(\d+(?:\.\d+)?))?"  # 1,475; a range: 0.74-0.82, 9 to 12
    r"(%|x|\s(?:ms|s|min|h|kB|MB|GB|GFLOP/s|images/s)(?![\w/]))?"
    r"(?!\w|\.\d)")
NUMBER = re.compile(r"\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def blocks(text: str):
    """(first line number, lines) of each paragraph, list item and table of `text` outside code fences."""
    block: list[str] = []
    start, fenced = 0, False
    for n, line in enumerate(text.splitlines(), 1):
        table = line.startswith("|")
        if (line.startswith("```") or fenced or not line.strip() or re.match(r"#|[-*] |\d+\. ", line)
                or (block and table != block[0].startswith("|"))):
            if block:
                yield start, block
            block = []
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.strip():
            start = start if block else n
            block.append(line)
    if block:
        yield start, block


def cited_files(block: str) -> tuple[list[Path], list[str]]:
    """The results files `block` cites (.md and existing .json siblings), and the cited paths that do not exist."""
    files, missing = [], []
    for match in CITATION.finditer(block):
        name = match.group(1) or match.group(2)
        found = sorted(RESULTS.glob(name))
        if not found and match.group(1):
            missing.append(f"benchmarks/results/{name}")
        for md in found:
            files += [md] + [md.with_suffix(".json")] * md.with_suffix(".json").is_file()
    return list(dict.fromkeys(files)), missing


@functools.cache
def _numbers(files: tuple[Path, ...]) -> list[float]:
    text = " ".join(f.read_text() for f in files)
    return sorted(float(n) for n in NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)))


def _held(figure: str, numbers: list[float]) -> bool:
    decimals = len(figure.partition(".")[2])
    value, tolerance = float(figure), 0.5 * 10 ** -decimals + 1e-9
    for scale in (1, 100, 0.01):  # AUROC as a fraction in a file, in points in the README, or the reverse
        i = bisect.bisect_left(numbers, (value - tolerance) / scale)
        if i < len(numbers) and numbers[i] * scale <= value + tolerance:
            return True
    return False


def figures(line: str) -> list[tuple[str, str, int]]:
    """The figures of `line` (see the module's docstring): number, unit and offset; code spans left out."""
    line = re.sub(r"`[^`]*`", lambda m: " " * len(m.group()), line)
    found = []
    for match in FIGURE.finditer(line):
        for group in (1, 2):
            if match.group(group) and ("." in match.group(group) or match.group(3)):
                found.append((match.group(group).replace(",", ""), match.group(3) or "", match.start(group)))
    return found


def drifted_figures(text: str, name: str = "README.md") -> list[str]:
    """One line per figure of `text` that the results files of its sentence, or else of its block, do not hold."""
    problems = []
    for start, lines in blocks(text):
        joined = "\n".join(lines)
        files, missing = cited_files(joined)
        problems += [f"{name}:{start}: cites {path}, which does not exist" for path in missing]
        if not files or EXEMPT.search(joined):
            continue
        sentences, begin = [], 0  # (end offset, files to look in) of each sentence of the block
        for end in [m.start() for m in SENTENCE_END.finditer(joined)] + [len(joined)]:
            sentences.append((end, cited_files(joined[begin:end])[0] or files))
            begin = end
        offset = 0
        for n, line in enumerate(lines, start):
            for figure, unit, at in figures(line):
                look_in = next(f for end, f in sentences if offset + at < end)
                if not _held(figure, _numbers(tuple(look_in))):
                    where = ", ".join(str(f.relative_to(ROOT)) for f in look_in)
                    problems.append(f"{name}:{n}: {figure}{unit} is in none of {where}")
            offset += len(line) + 1
    return problems


def test_the_readmes_key_tables_are_the_schemas():
    text = README.read_text()
    assert rendered(text) == text, "README.md's key tables differ from the schema: python tests/test_readme.py --write"


def test_every_key_of_every_section_and_method_is_in_the_readme():
    from medpeft.config import METHODS, TrainConfig

    text = README.read_text()
    assert all(f"`train.{f.name}`" in text for f in TrainConfig.fields())
    assert all(f"| `{name}` |" in text for name in METHODS.classes)


def test_the_python_the_readme_names_is_the_lowest_the_package_allows():
    import tomllib

    lowest = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"].removeprefix(">=")
    named = set(re.findall(r"Python (3\.\d+)", README.read_text()))
    assert named == {lowest}, f"README.md names Python {sorted(named)}; pyproject.toml requires >={lowest}"


def test_every_figure_the_readme_quotes_next_to_a_results_file_is_that_files():
    problems = drifted_figures(README.read_text())
    assert not problems, "README.md quotes figures its cited results files do not hold:\n" + "\n".join(problems)


def test_a_changed_figure_fails_the_check():
    text = README.read_text()
    quoted = "reaches test AUROC 88.4 with"  # kermany_evidence.md's LoRA run
    line = text[:text.index(quoted)].count("\n") + 1
    changed = text.replace(quoted, "reaches test AUROC 88.9 with")
    assert drifted_figures(changed) == [f"README.md:{line}: 88.9 is in none of benchmarks/results/kermany_evidence.md, "
                                        "benchmarks/results/kermany_evidence.json"]


def test_what_counts_as_a_figure_and_where_it_is_looked_up():
    text = (
        "Decoded in 2.4 s, then 0.05 s: 45.9x, 2148.7 images/s or 2,149 images/s (`benchmarks/results/image_check.md`).\n"
        "Wrong: 2.5 s, 47x faster, 91.5%, 7-9% and 0.05-0.07 s; not figures: 5216 JPEGs, 2 cores, ViT-B/16,\n"
        "fp32, `data.split: 0.7`, 1.5e-4. An uncited sentence uses the block's files: 0.053 s, 0.06.\n"
        "A cited one its own: 2.77x, not 2.4 s (`benchmarks/results/pretrain_precision.md`).\n"
        "\n"
        "From a paper: 80.6 AUROC (`benchmarks/results/image_check.md`) <!-- figures: Lian et al. 2024 -->\n"
        "\n"
        "Gone: 1.0 (`benchmarks/results/no_such_file.md`).\n")
    mae = "benchmarks/results/pretrain_precision.md, benchmarks/results/pretrain_precision.json"
    both = f"benchmarks/results/image_check.md, benchmarks/results/image_check.json, {mae}"
    assert drifted_figures(text, "T.md") == [f"T.md:2: {figure} is in none of {both}"
                                             for figure in ("2.5 s", "47x", "91.5%", "7%", "9%", "0.07 s")] + [
        f"T.md:3: 0.06 is in none of {both}", f"T.md:4: 2.4 s is in none of {mae}",
        "T.md:8: cites benchmarks/results/no_such_file.md, which does not exist"]


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_text_atomic(README, rendered(README.read_text()))
    else:
        print("\n".join(drifted_figures(README.read_text())) or "README figures: all in their results files")
