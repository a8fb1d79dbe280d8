"""The documentation runs as written: every ```python block of README.md and docs/*.md is executed, and
every command line of a ```bash / ```shell block is checked against the job it calls (the job exists and
its argument parser accepts every flag), so the docs cannot drift from the API or the CLI.

Only what cannot exist offline, or would take hours, is swapped (``SWAPS``): the Hub CLIP becomes a
local random tiny CLIP (with the image processor a Hub CLIP repo has), the paper's schedules become a
couple of steps, a trained model directory is a fresh framework saved from that CLIP; a folder of images
and a photo are provided, and the Hub is a local folder (``push_to_hub`` writes to it, ``from_pretrained``
of a Hub id reads from it; a page that pulls the docs' mask without pushing it finds one there)."""

import importlib
import re
import shlex
import shutil
import warnings
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image

from opentrans_hf.commands import COMMANDS, build_parser, command_module

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
SWAPS = {  # doc text -> what the test runs instead (each must occur in a python block of some page)
    "openai/clip-vit-base-patch16": None,  # the local tiny CLIP (fixture)
    "runs/demo/train/model": None,  # a trained model directory: a framework saved from the tiny CLIP (fixture)
    "num_rounds=22, steps_per_round=5000": "num_rounds=2, steps_per_round=1",  # IMP: the paper's schedule
    "max_steps=20000": "max_steps=2, embedded_size=16, max_eval_examples=8",  # training: 2 steps, small data
}
HUB_MASK = "me/clip-b16-sparse90"  # a mask the docs push (sparse masks) and pull (frameworks)
COMMAND_START = re.compile(r"(?:^|[;&|(]\s*|\bdo\s+|\bthen\s+)((?:[A-Z_][A-Z0-9_]*=\S+\s+)*)"
                           r"(opentrans-hf|python\s+(?:scripts|examples)/\S+|accelerate\s+launch)\b")


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """(section title, line number, code) of every ```python block."""
    return [(title, line, code) for lang, title, line, code in fenced_blocks(text) if lang == "python"]


def fenced_blocks(text: str) -> list[tuple[str, str, int, str]]:
    """(language, section title, line number, code) of every fenced block."""
    blocks = []
    for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        line = text.count("\n", 0, m.start()) + 1
        outside = re.sub(r"^```.*?^```", "", text[: m.start()], flags=re.DOTALL | re.MULTILINE)  # no comments as titles
        titles = re.findall(r"^#+ (.+)$", outside, flags=re.MULTILINE)
        blocks.append((m.group(1), titles[-1] if titles else "", line, m.group(2)))
    return blocks


def command_lines(code: str) -> list[tuple[int, list[str]]]:
    """(line offset, argv) of every command a shell block runs: continuation lines joined, comments
    dropped, environment assignments and loop keywords skipped; argv starts with the program."""
    commands, lines = [], code.split("\n")
    logical = []
    buffer, first = "", None
    for i, raw in enumerate(lines):
        if first is None:
            first = i
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        logical.append((first, buffer + stripped))
        buffer, first = "", None
    for offset, line in logical:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = []
        for token in [*lexer, ";"]:
            if token and set(token) <= set(";&|()"):  # a command ends
                while words and (words[0] in ("do", "then", "time") or re.match(r"^[A-Z_][A-Z0-9_]*=", words[0])):
                    words = words[1:]
                if words and (words[0] in ("opentrans-hf", "accelerate") or (
                        words[0].startswith("python") and len(words) > 1 and words[1].startswith(("scripts/", "examples/")))):
                    commands.append((offset, words))
                words = []
            else:
                words.append(token)
    return commands


def job_and_args(argv: list[str]) -> tuple[str | None, Path | None, list[str]]:
    """(job name, script path, the job's arguments) of a command: ``opentrans-hf JOB ...``, ``python
    scripts/X.py ...`` or ``accelerate launch [launcher options] scripts/X.py ...``. A script that is no
    job (a benchmark) gives job None."""
    if argv[0] == "opentrans-hf":
        assert len(argv) > 1, "opentrans-hf without a command"
        return argv[1], None, argv[2:]
    if argv[0] == "accelerate":
        assert argv[1:2] == ["launch"], f"unknown accelerate command {argv[1:2]}"
        scripts = [i for i, a in enumerate(argv) if a.endswith(".py")]
        assert scripts, "accelerate launch without a script"
        i = scripts[0]
    else:
        i = 1
    script = ROOT / argv[i]
    assert script.is_file(), f"no such script {argv[i]}"
    job = script.stem.replace("_", "-")
    return (job if job in COMMANDS else None), script, argv[i + 1:]


def flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"]


def known_flags(job: str | None, script: Path | None):
    """A predicate: is ``--flag`` an option of the job (its parser) or of the benchmark script (its source)?"""
    if job is None:
        source = script.read_text()
        return lambda flag: f'"{flag}"' in source
    known = {s for action in build_parser(job)._actions for s in action.option_strings}
    return known.__contains__


def check_command(argv: list[str]) -> None:
    """The command exists and every flag it uses is accepted by its parser (nothing is run)."""
    job, script, args = job_and_args(argv)
    if job is None:  # a benchmark script with its own argparse: every flag is one it declares
        accepts = known_flags(None, script)
        for flag in flags(args):
            assert accepts(flag), f"{script.name} has no option {flag}"
        return
    assert job in COMMANDS, f"unknown command {job!r}"
    if "--help" in args or "-h" in args:
        return
    module = command_module(job)
    if hasattr(module, "preprocess_argv"):
        args = module.preprocess_argv(list(args))
    parser = build_parser(job)
    accepts = known_flags(job, None)
    for flag in flags(args):
        assert accepts(flag), f"`opentrans-hf {job}` has no option {flag}"
    try:
        _, rest = parser.parse_known_args(args)
    except SystemExit as exit_:
        raise AssertionError(f"`opentrans-hf {job}` refuses {shlex.join(args)} (exit {exit_.code})") from None
    assert not rest, f"`opentrans-hf {job}` does not take {rest}"


@pytest.fixture
def local_clip(tmp_path, tiny_clip_dir):
    """The tiny CLIP plus a CLIPImageProcessor for its input size, as a Hub CLIP repo has."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    d = shutil.copytree(tiny_clip_dir, tmp_path / "clip")
    size = CLIPVisionConfig.from_pretrained(d).image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(d)
    return d


@pytest.fixture
def trained_model(tmp_path, local_clip):
    """A model directory as `train` writes one (framework + tokenizer), of the tiny CLIP."""
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    d = tmp_path / "trained-model"
    CLIPDeepLabV3ForOVS.from_clip(str(local_clip)).save_pretrained(d)
    return d


@pytest.fixture
def local_hub(fake_hub, monkeypatch):
    """The Hub as a local folder: pushes (one commit each, ``fake_hub``) copy there, downloads read from there."""
    root = fake_hub.root

    def hf_hub_download(repo_id, filename, **kwargs):
        path = root / repo_id / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return root


def test_docs_have_the_api_snippets():
    titles = {name(page): [title for title, _, _ in python_blocks(page.read_text())] for page in PAGES}
    assert titles["README.md"], "no ```python block in the README"
    for page, section in (("docs/spectral-analysis.md", "Spectral analysis"), ("docs/spectral-tuning.md", "Spectral tuning"),
                          ("docs/sparse-masks.md", "Sparse masks"), ("docs/frameworks.md", "OVS frameworks")):
        assert section in titles[page], f"no ```python block under '# {section}' in {page}"


def test_every_swap_is_used():
    codes = [code for page in PAGES for _, _, code in python_blocks(page.read_text())]
    for old in SWAPS:
        assert any(old in code for code in codes), f"no python block of the docs contains {old!r}: update SWAPS"


def test_docs_links_resolve():
    """Every relative link of the docs names an existing file, and its #anchor a heading of that file."""
    def anchors(page: Path) -> set[str]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
        return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}

    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{name(page)} links to {target}: no such file"
            if anchor:
                assert anchor in anchors(file), f"{name(page)} links to {target}: no such heading"


def resolve(path: str):
    """The module or object a dotted ``opentrans_hf...`` path names (AssertionError if none)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"{'.'.join(parts[:i])} has no {attr!r}"
            obj = getattr(obj, attr)
        return obj
    raise AssertionError(f"no module {path}")


def is_deprecated_alias(path: str) -> bool:
    """``path`` is (under) a 0.1 module path kept as a FutureWarning alias."""
    parts = path.split(".")
    for i in range(len(parts), 1, -1):
        base = ROOT.joinpath(*parts[:i])
        for file in (base.with_suffix(".py"), base / "__init__.py"):
            if file.is_file():
                return "opentrans_hf.utils.deprecation" in file.read_text()
    return False


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_module_paths_exist_and_are_current(page):
    """Every ``opentrans_hf.x.y`` the page names exists; a 0.1 path only beside its 0.2 replacement (the
    tables of moved modules)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for number, line in enumerate(page.read_text().split("\n"), 1):
            for path in re.findall(r"\bopentrans_hf(?:\.\w+)+", line):
                path = path.rstrip(".")
                try:
                    resolve(path)
                except AssertionError as err:
                    raise AssertionError(f"{name(page)}:{number} names {path}: {err}") from None
                if is_deprecated_alias(path):
                    assert line.startswith("|") and line.count("opentrans_hf") > 1, (
                        f"{name(page)}:{number} names the 0.1 path {path}: use its 0.2 path")


def check_inline_command(span: str) -> None:
    """A command named in running text (often a synopsis: ``opentrans-hf analyze MODEL [--estimator
    opentrans|ww]``): the job or script exists and every ``--flag`` in it is one of its options."""
    m = re.match(r"(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:opentrans-hf\s+(?P<job>[\w-]+)|.*?\b(?P<script>(?:scripts|examples)/\w+\.py))(?P<rest>.*)", span)
    if m is None:  # e.g. `accelerate launch --multi_gpu --num_processes 2`: the launcher alone
        return
    if m["job"]:
        job, script = m["job"], None
        assert job in COMMANDS, f"unknown command {job!r}"
    else:
        script = ROOT / m["script"]
        assert script.is_file(), f"no such script {m['script']}"
        job = script.stem.replace("_", "-") if script.stem.replace("_", "-") in COMMANDS else None
    accepts = known_flags(job, script)
    for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", m["rest"]):
        assert accepts(flag), f"{job or script.name} has no option {flag}"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_inline_commands_name_real_flags(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    for span in re.findall(r"`([^`]+)`", text.replace("\n", " ")):
        if re.match(r"(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:opentrans-hf\s|python\s+(?:scripts|examples)/|accelerate\s+launch\s)", span):
            try:
                check_inline_command(span)
            except AssertionError as err:
                raise AssertionError(f"{name(page)}: `{span}`: {err}") from None


def test_inline_check_catches_drift():
    check_inline_command("opentrans-hf analyze MODEL [--estimator opentrans|ww] [--target-modules fc1,fc2 | re:<regex>]")
    check_inline_command("accelerate launch --config_file configs/accelerate/<ddp|fsdp>.yaml scripts/train.py --mask M")
    for span, error in (("opentrans-hf analyze MODEL [--estimatr ww]", "analyze has no option --estimatr"),
                        ("opentrans-hf anlyze MODEL", "unknown command 'anlyze'"),
                        ("python scripts/bench_masks.py --sise tiny", "bench_masks.py has no option --sise")):
        with pytest.raises(AssertionError, match=re.escape(error)):
            check_inline_command(span)


def test_every_block_says_its_language():
    """Code is ```python or ```bash (run or checked above); output and layouts are ```text."""
    for page in PAGES:
        for lang, title, line, _ in fenced_blocks(page.read_text()):
            assert lang in ("python", "bash", "shell", "text"), f"{name(page)}:{line} ({title}): ```{lang}"


@pytest.mark.parametrize("page", PAGES, ids=name)
def test_shell_commands_are_accepted(page):
    checked = 0
    for lang, title, line, code in fenced_blocks(page.read_text()):
        if lang not in ("bash", "shell", "sh"):
            continue
        for offset, argv in command_lines(code):
            if argv[0] == "make":
                continue
            try:
                check_command(argv)
            except AssertionError as err:
                raise AssertionError(f"{name(page)}:{line + 1 + offset} ({title}): {shlex.join(argv)}: {err}") from None
            checked += 1
    if any(lang in ("bash", "shell", "sh") and COMMAND_START.search(code) for lang, _, _, code in
           fenced_blocks(page.read_text())):
        assert checked, f"{name(page)}: shell blocks with commands, none checked"


def put_mask_on_hub(hub: Path, clip_dir: Path) -> None:
    """A mask of the tiny CLIP under ``HUB_MASK``, for a page that pulls it without pushing it first."""
    from transformers import CLIPModel

    from opentrans_hf import magnitude_prune

    magnitude_prune(CLIPModel.from_pretrained(clip_dir), 0.5).save_pretrained(hub / HUB_MASK)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())], ids=name)
def test_python_blocks_run(page, tmp_path, monkeypatch, request, local_clip, local_hub):
    blocks = python_blocks(page.read_text())
    code = "".join(code for _, _, code in blocks)
    swaps = {old: new for old, new in SWAPS.items() if new is not None}
    swaps = {"openai/clip-vit-base-patch16": str(local_clip), **swaps}
    if "runs/demo/train/model" in code:  # only the pages that load a trained model pay for making one
        swaps["runs/demo/train/model"] = str(request.getfixturevalue("trained_model"))
    if f'"{HUB_MASK}"' in code and f'push_to_hub("{HUB_MASK}")' not in code:
        put_mask_on_hub(local_hub, local_clip)
    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(work / "images" / f"{i}.jpg")
    shutil.copy(work / "images" / "0.jpg", work / "photo.jpg")
    monkeypatch.chdir(work)
    for title, line, code in blocks:
        for old, new in swaps.items():
            code = code.replace(old, new)
        try:
            exec(compile(code, f"{name(page)}:{line} ({title})", "exec"), {"__name__": "__docs__"})
        except Exception as err:
            raise AssertionError(f"the python block at {name(page)}:{line} (section '{title}') fails: "
                                 f"{type(err).__name__}: {err}") from err
    text = page.read_text()
    for repo, file in (("me/my-adapter", "adapter_model.safetensors"), (HUB_MASK, "adapter_config.json")):
        if f'push_to_hub("{repo}")' in text:
            assert (local_hub / repo / file).is_file(), f"{name(page)} pushes {repo}, the Hub has no {file}"


@pytest.mark.parametrize("command, error", [
    ("opentrans-hf train --no_such_flag 1", "has no option --no_such_flag"),
    ("opentrans-hf trian --max_steps 1", "unknown command 'trian'"),
    ("opentrans-hf train --framework unet", "refuses"),
    ("accelerate launch --num_processes 2 scripts/prune.py --sparsity 0.9", "has no option --sparsity"),
    ("python scripts/no_such_script.py", "no such script"),
    ("OMP_NUM_THREADS=1 python scripts/bench_spectral.py --quick", "bench_spectral.py has no option --quick"),
    ("for b in a b; do opentrans-hf prepare-dataset $b --raw_dir r --output_dir o --split x; done", "--split"),
])
def test_shell_check_catches_drift(command, error):
    (_, argv), = command_lines(command)
    with pytest.raises(AssertionError, match=re.escape(error)):
        check_command(argv)


def test_shell_commands_are_found():
    code = ("opentrans-hf reproduce  # 3 seeds\naccelerate launch scripts/train.py --framework fcclip \\\n"
            "    --max_steps 2\nfor b in x y; do\n  opentrans-hf prepare-dataset $b --raw_dir /r --output_dir /o/$b\ndone\n"
            "OMP_NUM_THREADS=1 python scripts/bench_spectral.py --size tiny && opentrans-hf benchmarks --json")
    found = [(offset, argv[:2]) for offset, argv in command_lines(code)]
    assert found == [(0, ["opentrans-hf", "reproduce"]), (1, ["accelerate", "launch"]),
                     (4, ["opentrans-hf", "prepare-dataset"]), (6, ["python", "scripts/bench_spectral.py"]),
                     (6, ["opentrans-hf", "benchmarks"])]
    for _, argv in command_lines(code):
        check_command(argv)


def test_module_path_check_tells_old_from_new():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert is_deprecated_alias("opentrans_hf.pruning.SparseMask") and is_deprecated_alias("opentrans_hf.io")
        assert is_deprecated_alias("opentrans_hf.frameworks.modeling_base")
        assert not is_deprecated_alias("opentrans_hf.methods.sparse_mask.SparseMask")
        assert not is_deprecated_alias("opentrans_hf.utils.io") and not is_deprecated_alias("opentrans_hf.models")
        assert resolve("opentrans_hf.methods.sparse_mask.SparseMask").__name__ == "SparseMask"
        with pytest.raises(AssertionError, match="has no 'NoSuchThing'"):
            resolve("opentrans_hf.methods.sparse_mask.NoSuchThing")
