"""The documentation site as a reader at 1280 px meets it: the built HTML of the reference pages and the styles."""

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import hf_docstrings  # noqa: E402

from hf_gr import GRArguments  # noqa: E402


def test_hf_style_types_become_plain_types():
    assert hf_docstrings.plain_type("`float`, defaults to 0.1") == "float"
    assert hf_docstrings.plain_type("`int`, *optional*") == "int | None"
    assert hf_docstrings.plain_type("`accelerate.Accelerator`, *optional*") == "accelerate.Accelerator | None"
    assert hf_docstrings.plain_type("`str`") == "str"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _text(page: Path) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8"))).split())


@pytest.mark.slow
def test_the_reference_tables_show_plain_types_and_every_field_is_in_the_toc(site):
    page = (site / "reference-arguments" / "index.html").read_text(encoding="utf-8")
    types = re.findall(r'<td>\s*(?:<code>)?\s*<span class="doc-param-annotation">(.*?)</span>', page, re.S)
    types += re.findall(r"<td>\s*<code>([^<]*)</code>\s*</td>", page)
    assert types and not any("`" in t or "defaults to" in t or "optional" in t for t in types), types[:5]
    toc = set(re.findall(r'<a href="#hf_gr\.GRArguments\.(\w+)" class="md-nav__link">', page))
    fields = {f for f in GRArguments.__dataclass_fields__}
    assert fields <= toc, fields - toc
    for name in ("reference-regularizer", "reference-callbacks", "reference-trainer"):
        text = (site / name / "index.html").read_text(encoding="utf-8")
        assert "defaults to" not in " ".join(re.findall(r"<td>.*?</td>", text, re.S)), name


@pytest.mark.slow
def test_the_trainer_signature_names_its_arguments(site):
    text = _text(site / "reference-trainer" / "index.html")
    assert "GRTrainer( model: Module | None = None, args: GRArguments | None = None," in text


@pytest.mark.slow
def test_pages_are_wide_enough_for_their_tables_and_figures(site):
    css = (site / "stylesheets" / "extra.css").read_text()
    width = float(re.search(r"\.md-grid\s*\{\s*max-width:\s*([\d.]+)rem", css).group(1))
    assert width * 16 >= 1280  # the content may use a 1280 px screen, not Material's 976 px
    assert "white-space: pre-wrap" in css  # long code lines wrap
    for page in ("study-cpu", "reference-arguments", "index"):
        path = site / page / "index.html" if page != "index" else site / "index.html"
        assert "stylesheets/extra.css" in path.read_text(encoding="utf-8"), page
    study = (site / "study-cpu" / "index.html").read_text(encoding="utf-8")
    assert re.search(r'<a href="(\.\./)?study-cpu\.png"><img[^>]*src="(\.\./)?study-cpu\.png"', study)  # full size
