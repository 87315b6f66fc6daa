"""One source of truth per fact: the masked-image and hole rules, LitEma's name mangling, the eps/x0/v dispatch,
the schedule buffer names and the ignored ``log_images`` keywords each live in one place, and the code says so.

The source scans read code tokens only (strings and comments are dropped), over the library, scripts and
benchmarks, so a second copy of a rule fails here instead of drifting silently.
"""

from __future__ import annotations

import functools
import io
import re
import tokenize
from pathlib import Path

import numpy as np
import torch

from ldm import compat
from ldm.data.masks import binarize_mask, is_hole, masked_image
from ldm.inference import SCHEDULE_BUFFERS
from ldm.models.diffusion.schedule import NoiseSchedule
from tests.helpers import REPO

SOURCES = sorted(p for d in ("ldm", "scripts", "benchmarks") for p in (REPO / d).rglob("*.py")) + [REPO / "main.py"]


@functools.cache
def _code(path: Path) -> tuple[list[str], list[str]]:
    """The file's lines with comments and docstrings blanked out: (all string literals blanked too, kept)."""
    text = path.read_text()
    bare, strings = [list(line) for line in text.splitlines()], [list(line) for line in text.splitlines()]
    prev = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        statement_start = prev in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
        is_string = tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_START", -1)
        targets = [bare, strings] if tok.type == tokenize.COMMENT or (is_string and statement_start) else \
            [bare] if is_string else []
        (r0, c0), (r1, c1) = tok.start, tok.end
        for rows in targets:
            for r in range(r0, r1 + 1):
                row = rows[r - 1]
                lo, hi = (c0 if r == r0 else 0), (c1 if r == r1 else len(row))
                row[lo:hi] = " " * (hi - lo)
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type
    return ["".join(r) for r in bare], ["".join(r) for r in strings]


def code_lines(path: Path, keep_strings: bool = False) -> list[tuple[int, str]]:
    """``(line number, code)`` without comments and docstrings (and without any string literal unless
    ``keep_strings``)."""
    return list(enumerate(_code(path)[1 if keep_strings else 0], start=1))


def occurrences(pattern: str, allowed: set[str], keep_strings: bool = False) -> list[str]:
    rx = re.compile(pattern)
    return [f"{p.relative_to(REPO)}:{n}: {code.strip()}" for p in SOURCES if str(p.relative_to(REPO)) not in allowed
            for n, code in code_lines(p, keep_strings) if rx.search(code)]


def test_masked_image_is_the_d5_rule_for_numpy_and_torch():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (6, 5, 3)).astype(np.float32)
    image[0, 0] = -0.25  # a negative pixel in the hole: the product keeps ldm's signed zero
    mask = rng.choice(np.array([0.0, 0.49, 0.5, 1.0], np.float32), (6, 5, 1))
    mask[0, 0] = 1.0
    expected = image * (mask < 0.5)
    out = masked_image(image, mask)
    assert out.dtype == np.float32 and np.array_equal(out.view(np.int32), expected.view(np.int32))  # bit for bit
    assert np.signbit(out[0, 0]).all()
    timg, tmask = torch.from_numpy(image).permute(2, 0, 1)[None], torch.from_numpy(mask).permute(2, 0, 1)[None]
    tout = masked_image(timg, tmask)  # B x 3 x H x W with B x 1 x H x W
    assert tout.dtype == torch.float32
    assert torch.equal(tout.view(torch.int32), (timg * (tmask < 0.5)).view(torch.int32))
    assert np.array_equal(is_hole(mask), mask >= 0.5) and set(np.unique(binarize_mask(mask))) <= {0.0, 1.0}
    assert torch.equal(binarize_mask(tmask), (tmask >= 0.5).float())


def test_hole_and_masked_image_rules_are_written_once():
    hits = occurrences(r"mask\w*\)?(\[[^\]]*\])?\s*(<|>=)\s*(0\.5|127|128)\b|1(\.0)?\)?\s*-\s*\w*mask\b",
                       allowed={"ldm/data/masks.py", "ldm/models/diffusion/ddim.py"})  # ddim: ldm's latent blend
    assert not hits, "use ldm.data.masks.is_hole / binarize_mask / masked_image:\n" + "\n".join(hits)


def test_only_parameterization_branches_on_eps_x0_v():
    hits = occurrences(r"""(==|!=|\bin)\s*[\[(]?\s*["'](eps|x0|v)["']|["'](eps|x0|v)["']\s*(==|!=)|"""
                       r"""\bparameterization\s*(==|!=)""",
                       allowed={"ldm/models/diffusion/parameterization.py"}, keep_strings=True)
    assert not hits, "branch in ldm.models.diffusion.parameterization only:\n" + "\n".join(hits)


def test_ema_name_mangling_is_written_once():
    hits = occurrences(r"""\.replace\(\s*["']\.["']\s*,\s*["']{2}\s*\)""", allowed={"ldm/compat.py"}, keep_strings=True)
    assert not hits, "use ldm.compat.ema_buffer_name:\n" + "\n".join(hits)
    assert compat.INPAINT_FINETUNE_KEYS[1] == "model_ema.diffusion_modelinput_blocks00weight"


def test_schedule_buffer_names_come_from_noise_schedule():
    names = NoiseSchedule.buffer_names()
    assert SCHEDULE_BUFFERS == set(names) and len(names) == 12
    manifest = (REPO / "tests" / "fixtures" / "sd2-inpainting-keys.tsv").read_text()
    keys = {line.split("\t")[0] for line in manifest.splitlines() if line and not line.startswith("#")}
    assert set(names) <= keys  # the names SD2 checkpoints carry


def test_ignored_log_images_keywords_are_listed_once():
    ignored = compat.IGNORED_LOG_IMAGES_KWARGS
    assert {"inpaint", "plot_progressive_rows", "plot_diffusion_rows"} <= set(ignored)
    assert all(compat.IGNORED_PARAMS[f"ImageLogger.log_images_kwargs.{k}"] == why for k, why in ignored.items())
    assert not occurrences(r"IGNORED_KWARGS\s*=", allowed=set())


def test_no_file_over_500_lines_except_the_unet():
    files = [*SOURCES, *(REPO / "tests").glob("*.py")]
    long = [f"{p.relative_to(REPO)}: {n}" for p in files if p.name != "openaimodel.py"
            and (n := len(p.read_text().splitlines())) > 500]
    assert not long, "split these files by concern:\n" + "\n".join(long)
