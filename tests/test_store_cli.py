"""`attentionpack cache put|ls|rm` and `generate --prefix-store` on the embedded model."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from attentionpack.cli import app

DOC = (
    "William Shakespeare was born at Stratford-on-Avon in 1564. He married Anne Hathaway in 1582 and moved to "
    "London, where he became an actor and a writer of plays for the Lord Chamberlain's company. "
) * 8


@pytest.mark.real_model
def test_put_ls_generate_reuses_rm(tmp_path, real_model):
    runner = CliRunner()
    store = tmp_path / "store"
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    question = tmp_path / "question.txt"
    question.write_text(DOC + "\n\nWhere was Shakespeare born?")

    res = runner.invoke(app, ["cache", "put", "-f", str(doc), "--store", str(store)])
    assert res.exit_code == 0, res.output
    stored = int(re.search(r"stored ([\d,]+) of", res.output).group(1).replace(",", ""))
    assert stored > 100

    res = runner.invoke(app, ["cache", "ls", "--store", str(store)])
    assert res.exit_code == 0 and "1 entries" in res.output and "balanced / doc.txt" in res.output

    # the document followed by a question reuses the document's cache (only the rest is prefilled)
    res = runner.invoke(app, ["generate", "-f", str(question), "--prefix-store", str(store), "-n", "8"])
    assert res.exit_code == 0, res.output
    reused = int(re.search(r"reused a cache of ([\d,]+) of", res.output).group(1).replace(",", ""))
    assert reused == stored

    # another preset is another context: a miss, and that prompt's prefix is stored for next time
    res = runner.invoke(app, ["generate", "-f", str(question), "--prefix-store", str(store), "-n", "4", "-p", "max"])
    assert res.exit_code == 0 and "prefix store: miss; stored" in res.output, res.output
    res = runner.invoke(app, ["cache", "ls", "--store", str(store)])
    assert "2 entries" in res.output

    key = re.search(r"^([0-9a-f]{32}) ", res.output, re.MULTILINE).group(1)
    assert runner.invoke(app, ["cache", "rm", key, "--store", str(store)]).exit_code == 0
    res = runner.invoke(app, ["cache", "rm", key, "--store", str(store)])
    assert res.exit_code == 2 and "no entry with key" in res.output
    assert runner.invoke(app, ["cache", "rm", "--all", "--store", str(store)]).exit_code == 0
    assert "0 entries" in runner.invoke(app, ["cache", "ls", "--store", str(store)]).output


def test_rm_needs_keys_or_all(tmp_path):
    res = CliRunner().invoke(app, ["cache", "rm", "--store", str(tmp_path)])
    assert res.exit_code == 2 and "--all" in res.output
